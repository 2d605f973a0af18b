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

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
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
}

impl Compute {
    /// Starts the worker; `batching` off runs every step alone (for
    /// measuring what batching gains). Each pass's step count goes to
    /// `batch_sizes`, and each step's wait for its pass to `queue_waits`.
    pub(crate) fn start(batching: bool, batch_sizes: Histogram, queue_waits: Histogram) -> Self {
        let (messages, rx) = mpsc::channel();
        let metrics = WorkerMetrics {
            batch_sizes,
            queue_waits,
        };
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || worker(&rx, batching, &metrics))
            .expect("spawning the compute thread");
        Self {
            messages,
            next_session: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A session's handle for its steps; the worker forgets the session when
    /// it drops.
    pub(crate) fn session(&self) -> SessionCompute {
        SessionCompute {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            messages: self.messages.clone(),
        }
    }
}

/// One session's way to the compute worker.
pub(crate) struct SessionCompute {
    id: SessionId,
    messages: mpsc::Sender<Message>,
}

impl SessionCompute {
    /// Runs `hidden` through `blocks` of `weights` with the session's cache.
    pub(crate) async fn step(
        &self,
        weights: Arc<BlockSpan>,
        blocks: Range<usize>,
        hidden: Tensor,
        cache: SpanCache,
    ) -> Option<StepResult> {
        let (reply, rx) = oneshot::channel();
        self.messages
            .send(Message::Step(Job {
                session: self.id,
                queued_at: Instant::now(),
                weights,
                blocks,
                hidden,
                cache,
                reply,
            }))
            .ok()?;
        rx.await.ok()
    }
}

impl Drop for SessionCompute {
    fn drop(&mut self) {
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

fn worker(rx: &mpsc::Receiver<Message>, batching: bool, metrics: &WorkerMetrics) {
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
