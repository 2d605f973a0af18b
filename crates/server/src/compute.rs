//! The compute worker: every session's inference steps run here, one pass at
//! a time, and decode steps that arrive together are batched.
//!
//! One worker thread owns the compute (whose kernels are themselves parallel
//! across the cores), so concurrent sessions take turns instead of
//! oversubscribing the machine. When it finishes a pass it takes every step
//! that queued meanwhile; single-token steps of sessions over the same blocks
//! run as one [`BlockSpan::forward_batch`], which reads each weight once for
//! all of them.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc;

use candle_core::{Device, Tensor};
use model::{BlockSpan, ModelError, SpanCache};
use tokio::sync::oneshot;

/// A step's result, with the session's cache handed back.
pub(crate) type StepResult = (Result<Tensor, ModelError>, SpanCache);

struct Job {
    weights: Arc<BlockSpan>,
    blocks: Range<usize>,
    hidden: Tensor,
    cache: SpanCache,
    reply: oneshot::Sender<StepResult>,
}

/// Handle to the worker thread; the thread ends when every handle is gone.
#[derive(Clone)]
pub(crate) struct Compute {
    jobs: mpsc::Sender<Job>,
}

impl Compute {
    /// Starts the worker; `batching` off runs every step alone (for
    /// measuring what batching gains).
    pub(crate) fn start(batching: bool) -> Self {
        let (jobs, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || worker(&rx, batching))
            .expect("spawning the compute thread");
        Self { jobs }
    }

    /// Runs `hidden` through `blocks` of `weights` with the session's cache.
    pub(crate) async fn step(
        &self,
        weights: Arc<BlockSpan>,
        blocks: Range<usize>,
        hidden: Tensor,
        cache: SpanCache,
    ) -> Option<StepResult> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                weights,
                blocks,
                hidden,
                cache,
                reply,
            })
            .ok()?;
        rx.await.ok()
    }
}

fn worker(rx: &mpsc::Receiver<Job>, batching: bool) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        if batching {
            jobs.extend(rx.try_iter());
        }
        // Group single-token steps by the weights and blocks they run.
        let mut groups: HashMap<(usize, usize, usize), Vec<Job>> = HashMap::new();
        let mut singles = Vec::new();
        for job in jobs {
            if job.hidden.dims() == [1, 1, job.weights.config().hidden_size] {
                let key = (
                    Arc::as_ptr(&job.weights) as usize,
                    job.blocks.start,
                    job.blocks.end,
                );
                groups.entry(key).or_default().push(job);
            } else {
                singles.push(job);
            }
        }
        for (_, group) in groups {
            if group.len() == 1 {
                singles.extend(group);
            } else {
                run_batch(group);
            }
        }
        for job in singles {
            run_one(job);
        }
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
