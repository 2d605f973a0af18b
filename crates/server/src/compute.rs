//! The compute worker: every session's inference steps run here, one pass at
//! a time, and decode steps that arrive together are batched.
//!
//! One worker thread owns the compute (whose kernels are themselves parallel
//! across the cores), so concurrent sessions take turns instead of
//! oversubscribing the machine. When it finishes a pass it takes every step
//! that queued meanwhile, waits a little for sessions that are due
//! ([`model::gather`]), and runs single-token steps of sessions over the same
//! blocks as one [`BlockSpan::forward_batch`], which reads each weight once
//! for all of them.
//!
//! A session that is the only one open has nobody to batch with, so while
//! the worker is idle its steps run in the session's own task instead
//! ([`tokio::task::block_in_place`]): handing a step to the worker and its
//! result back costs two thread wake-ups, paid by every server of a chain on
//! every token (a tiny model's step, medians of 2000 on a 2-core VM: 105-112
//! us through the worker, 44-91 us in the task).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use candle_core::{Device, Tensor};
use model::gather::{Gather, Held, SessionId};
use model::{BlockSpan, ModelError, SpanCache};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

/// Which steps can share a pass: the weights (by address) and block range.
type PassKey = (usize, usize, usize);

/// A step's result, with the session's cache handed back.
pub(crate) type StepResult = (Result<Tensor, ModelError>, SpanCache);

struct Job {
    session: SessionId,
    queued_at: Instant,
    weights: Arc<BlockSpan>,
    blocks: Range<usize>,
    hidden: Tensor,
    cache: SpanCache,
    reply: oneshot::Sender<StepResult>,
}

impl Job {
    /// Single-token steps over the same weights and blocks can share a pass.
    fn decode_key(&self) -> Option<PassKey> {
        (self.hidden.dims() == [1, 1, self.weights.config().hidden_size]).then_some((
            Arc::as_ptr(&self.weights) as usize,
            self.blocks.start,
            self.blocks.end,
        ))
    }
}

enum Message {
    Step(Job),
    Closed(SessionId),
}

/// Handle to the worker thread; the thread ends when every handle is gone.
#[derive(Clone)]
pub(crate) struct Compute {
    messages: mpsc::Sender<Message>,
    next_session: Arc<AtomicU64>,
    passes: Arc<Passes>,
}

/// What the worker and the sessions' own tasks share to run one pass at a
/// time.
struct Passes {
    /// Held for each pass, wherever it runs: a second pass beside it would
    /// only split the cores the kernels already use.
    running: Mutex<()>,
    /// Sessions open now.
    open: AtomicUsize,
    metrics: WorkerMetrics,
}

impl Compute {
    /// Starts the worker; `batching` off runs every step alone (for
    /// measuring what batching gains). Each pass's step count goes to
    /// `batch_sizes`, and each step's wait for its pass to `queue_waits`.
    pub(crate) fn start(batching: bool, batch_sizes: Histogram, queue_waits: Histogram) -> Self {
        let (compute, rx) = Self::without_worker(batch_sizes, queue_waits);
        let passes = compute.passes.clone();
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || worker(&rx, batching, &passes))
            .expect("spawning the compute thread");
        compute
    }

    /// A handle whose worker's messages arrive at the receiver returned.
    fn without_worker(
        batch_sizes: Histogram,
        queue_waits: Histogram,
    ) -> (Self, mpsc::Receiver<Message>) {
        let (messages, rx) = mpsc::channel();
        let passes = Arc::new(Passes {
            running: Mutex::new(()),
            open: AtomicUsize::new(0),
            metrics: WorkerMetrics {
                batch_sizes,
                queue_waits,
            },
        });
        let compute = Self {
            messages,
            next_session: Arc::new(AtomicU64::new(0)),
            passes,
        };
        (compute, rx)
    }

    /// A session's handle for its steps; the worker forgets the session when
    /// it drops.
    pub(crate) fn session(&self) -> SessionCompute {
        self.passes.open.fetch_add(1, Ordering::Relaxed);
        SessionCompute {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            messages: self.messages.clone(),
            passes: self.passes.clone(),
        }
    }
}

/// One session's way to the compute worker.
pub(crate) struct SessionCompute {
    id: SessionId,
    messages: mpsc::Sender<Message>,
    passes: Arc<Passes>,
}

impl SessionCompute {
    /// Runs `hidden` through `blocks` of `weights` with the session's cache:
    /// here, when this is the only session and no pass is running, else on
    /// the worker.
    pub(crate) async fn step(
        &self,
        weights: Arc<BlockSpan>,
        blocks: Range<usize>,
        hidden: Tensor,
        cache: SpanCache,
    ) -> Option<StepResult> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            session: self.id,
            queued_at: Instant::now(),
            weights,
            blocks,
            hidden,
            cache,
            reply,
        };
        if let Some(job) = self.run_here(job) {
            self.messages.send(Message::Step(job)).ok()?;
        }
        rx.await.ok()
    }

    /// Runs `job` on this thread if nothing could share or contend for its
    /// pass, or hands it back. Only a multi-threaded runtime lets a task
    /// block its thread for a pass (the others' tasks move to another).
    /// GPU passes stay on the worker, one thread that keeps its CUDA context.
    fn run_here(&self, job: Job) -> Option<Job> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let alone = self.passes.open.load(Ordering::Relaxed) == 1;
        if !multi_thread || !alone || !job.weights.device().is_cpu() {
            return Some(job);
        }
        let Ok(_running) = self.passes.running.try_lock() else {
            return Some(job);
        };
        self.passes.metrics.pass(std::slice::from_ref(&job));
        tokio::task::block_in_place(|| run_one(job));
        None
    }
}

impl Drop for SessionCompute {
    fn drop(&mut self) {
        self.passes.open.fetch_sub(1, Ordering::Relaxed);
        let _ = self.messages.send(Message::Closed(self.id));
    }
}

/// What the worker observes.
struct WorkerMetrics {
    batch_sizes: Histogram,
    queue_waits: Histogram,
}

impl WorkerMetrics {
    /// A pass of `jobs` starts now.
    fn pass(&self, jobs: &[Job]) {
        self.batch_sizes.observe(jobs.len() as f64);
        for job in jobs {
            self.queue_waits
                .observe(job.queued_at.elapsed().as_secs_f64());
        }
    }
}

fn worker(rx: &mpsc::Receiver<Message>, batching: bool, passes: &Passes) {
    let metrics = &passes.metrics;
    let mut gather = Gather::default();
    let mut jobs = Vec::new();
    while let Ok(first) = rx.recv() {
        take(first, &mut jobs, &mut gather);
        if batching {
            for message in rx.try_iter() {
                take(message, &mut jobs, &mut gather);
            }
            loop {
                let held: Vec<Held<PassKey>> = jobs
                    .iter()
                    .filter_map(|j| {
                        j.decode_key().map(|key| Held {
                            session: j.session,
                            key,
                            queued_at: j.queued_at,
                        })
                    })
                    .collect();
                let now = Instant::now();
                let Some(deadline) = gather.deadline(&held, now) else {
                    break;
                };
                match rx.recv_timeout(deadline - now) {
                    Ok(message) => take(message, &mut jobs, &mut gather),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        let _running = passes
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Group single-token steps by the weights and blocks they run.
        let mut groups: HashMap<PassKey, Vec<Job>> = HashMap::new();
        let mut singles = Vec::new();
        for job in jobs.drain(..) {
            match job.decode_key() {
                Some(key) if batching => groups.entry(key).or_default().push(job),
                _ => singles.push(job),
            }
        }
        for (key, group) in groups {
            metrics.pass(&group);
            if group.len() == 1 {
                let start = Instant::now();
                group.into_iter().for_each(run_one);
                gather.ran_alone(key, start.elapsed());
            } else {
                run_batch(group);
            }
        }
        for job in singles {
            metrics.pass(std::slice::from_ref(&job));
            run_one(job);
        }
    }
}

/// Holds a step, or forgets a session.
fn take(message: Message, jobs: &mut Vec<Job>, gather: &mut Gather<PassKey>) {
    match message {
        Message::Step(job) => {
            if let Some(key) = job.decode_key() {
                gather.arrived(job.session, key, job.queued_at);
            }
            jobs.push(job);
        }
        Message::Closed(session) => gather.closed(session),
    }
}

/// Results leave the worker in host memory: a GPU buffer must be freed where
/// its context is current, and the sessions that receive them run elsewhere.
fn to_host(t: Tensor) -> Result<Tensor, ModelError> {
    Ok(t.to_device(&Device::Cpu)?)
}

fn run_one(mut job: Job) {
    let position = job.cache.len();
    let result = guarded(|| {
        job.weights
            .forward_range(job.blocks.clone(), &job.hidden, &mut job.cache)
            .and_then(to_host)
    });
    if result.is_err() {
        job.cache.truncate(position);
    }
    let _ = job.reply.send((result, job.cache));
}

fn run_batch(group: Vec<Job>) {
    let weights = group[0].weights.clone();
    let blocks = group[0].blocks.clone();
    let hidden: Vec<Tensor> = group.iter().map(|j| j.hidden.clone()).collect();
    // Cloning a cache shares its buffers; the jobs keep their own lengths,
    // so the fallback below still starts from the right positions.
    let mut caches: Vec<SpanCache> = group.iter().map(|j| j.cache.clone()).collect();
    let outputs = guarded(|| {
        weights
            .forward_batch(blocks.clone(), &hidden, &mut caches)?
            .into_iter()
            .map(to_host)
            .collect::<Result<Vec<_>, _>>()
    });
    match outputs {
        Ok(outputs) => {
            for ((job, out), cache) in group.into_iter().zip(outputs).zip(caches) {
                let _ = job.reply.send((Ok(out), cache));
            }
        }
        // One bad session must not fail the others: run each alone.
        Err(e) => {
            tracing::debug!("batched step failed ({e}); running the steps one by one");
            for job in group {
                run_one(job);
            }
        }
    }
}

/// Runs compute, turning a panic into an error so the worker survives it.
fn guarded<T>(f: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(ModelError::Unsupported("compute panicked".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Checkpoint, LoadOptions};
    use prometheus_client::metrics::histogram::exponential_buckets;

    fn span() -> (tempfile::TempDir, Arc<BlockSpan>) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = crate::testing::tiny_model(dir.path(), 2);
        let checkpoint = Checkpoint::open(&path).expect("the tiny model opens");
        let span = checkpoint
            .load_span(0..2, &LoadOptions::default(), &mut |_, _| {})
            .expect("its blocks load");
        (dir, Arc::new(span))
    }

    fn hidden(span: &BlockSpan) -> Tensor {
        let width = span.config().hidden_size;
        let values: Vec<f32> = (0..width).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_vec(values, (1, 1, width), &Device::Cpu).expect("a hidden state")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("a tensor's values")
    }

    /// A step's output, checked against the span run directly.
    fn checked(span: &BlockSpan, x: &Tensor, result: Option<StepResult>) {
        let (out, cache) = result.expect("the step ran");
        let mut direct = span.new_cache(8);
        let want = span.forward(x, &mut direct).expect("the direct pass");
        assert_eq!(values(&out.expect("the step succeeded")), values(&want));
        assert_eq!(cache.len(), 1);
    }

    /// A handle with no worker behind it: whatever reaches the worker waits
    /// at the receiver.
    fn unserved() -> (Compute, mpsc::Receiver<Message>) {
        let histogram = || Histogram::new(exponential_buckets(1.0, 2.0, 4));
        Compute::without_worker(histogram(), histogram())
    }

    /// `session`'s step of `x` from a fresh cache.
    fn step<'a>(
        session: &'a SessionCompute,
        span: &Arc<BlockSpan>,
        x: &Tensor,
    ) -> impl Future<Output = Option<StepResult>> + 'a {
        session.step(span.clone(), 0..2, x.clone(), span.new_cache(8))
    }

    /// Runs the next step the worker gets, after checking it is `session`'s
    /// and dropping `held`.
    async fn serve_next<T>(
        rx: mpsc::Receiver<Message>,
        session: SessionId,
        held: T,
    ) -> mpsc::Receiver<Message> {
        let (job, rx) = tokio::task::spawn_blocking(move || {
            loop {
                match rx.recv().expect("the handles are alive") {
                    Message::Step(job) => break (job, rx),
                    Message::Closed(_) => {}
                }
            }
        })
        .await
        .expect("the receiving thread");
        assert_eq!(job.session, session);
        drop(held);
        run_one(job);
        rx
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_session_steps_in_its_own_task() {
        let (_dir, span) = span();
        let (compute, rx) = unserved();
        let session = compute.session();
        let x = hidden(&span);
        checked(&span, &x, step(&session, &span, &x).await);
        assert!(rx.try_recv().is_err(), "the worker got nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steps_go_to_the_worker_beside_other_sessions_or_a_running_pass() {
        let (_dir, span) = span();
        let (compute, rx) = unserved();
        let first = compute.session();
        let x = hidden(&span);

        // A pass is running: the step waits for the worker.
        let running = compute.passes.running.lock().expect("the pass lock");
        let (result, rx) = tokio::join!(step(&first, &span, &x), serve_next(rx, first.id, running));
        checked(&span, &x, result);

        // Another session is open: the step may be batched with its steps.
        let second = compute.session();
        let (result, _rx) = tokio::join!(step(&second, &span, &x), serve_next(rx, second.id, ()));
        checked(&span, &x, result);
        drop(first);

        // Alone again.
        checked(&span, &x, step(&second, &span, &x).await);
    }
}
