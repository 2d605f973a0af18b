//! Concurrent callers' inputs run as one batch (flat combining).
//!
//! Many sessions of one process (the api serving several users, or several
//! clients of one swarm) each need the LM head for one position a step. Run
//! apart, each reads all of the head's weights for one row of output; run
//! together, the weights are read once for every row. Whoever arrives while
//! no batch is running leads: it waits for callers that are due
//! ([`crate::gather`]; each calling thread counts as a session), takes every
//! input queued by then, runs them as one call and hands each caller its
//! rows; inputs that arrive meanwhile queue for the next leader. A lone
//! caller is never due to itself, so it pays only a lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

use candle_core::Tensor;

use crate::error::{ModelError, Result};
use crate::gather::{Gather, Held, SessionId};

/// Each calling thread's identity to the gather policy.
fn caller() -> SessionId {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static CALLER: SessionId = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    CALLER.with(|id| *id)
}

/// Batches calls of a row-wise function across threads.
#[derive(Debug, Default)]
pub(crate) struct Combiner {
    state: Mutex<State>,
    /// Signalled when a batch's results are in.
    finished: Condvar,
    /// Signalled when an input is queued (for a leader waiting for more).
    arrived: Condvar,
}

/// A follower's share of a batch: its rows, or the batch's failure.
type Share = std::result::Result<Tensor, String>;

/// An input waiting for a leader.
#[derive(Debug)]
struct Queued {
    ticket: u64,
    held: Held<()>,
    input: Tensor,
}

#[derive(Debug, Default)]
struct State {
    next_ticket: u64,
    queued: Vec<Queued>,
    results: HashMap<u64, Share>,
    leading: bool,
    gather: Gather<()>,
}

impl Combiner {
    /// `f(input)`, with `input` (`[rows, ...]`) possibly concatenated along
    /// its first dimension with other callers' inputs. `f` must treat rows
    /// independently and return one output row per input row, so that each
    /// caller's rows are the same whatever it was batched with.
    pub(crate) fn run(
        &self,
        input: Tensor,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let held = Held {
            session: caller(),
            key: (),
            queued_at: Instant::now(),
        };
        state.gather.arrived(held.session, (), held.queued_at);
        state.queued.push(Queued {
            ticket,
            held,
            input,
        });
        self.arrived.notify_all();
        loop {
            if let Some(result) = state.results.remove(&ticket) {
                return result.map_err(|e| candle_core::Error::Msg(e).into());
            }
            if state.leading {
                state = self
                    .finished
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.leading = true;
            loop {
                let held: Vec<Held<()>> = state.queued.iter().map(|q| q.held).collect();
                let now = Instant::now();
                let Some(deadline) = state.gather.deadline(&held, now) else {
                    break;
                };
                state = self
                    .arrived
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let batch: Vec<(u64, Tensor)> = std::mem::take(&mut state.queued)
                .into_iter()
                .map(|q| (q.ticket, q.input))
                .collect();
            drop(state);
            let start = Instant::now();
            let (own, others) = Self::lead(&batch, ticket, &f);
            let took = start.elapsed();
            state = self.lock();
            if batch.len() == 1 {
                state.gather.ran_alone((), took);
            }
            state.results.extend(others);
            state.leading = false;
            self.finished.notify_all();
            return own;
        }
    }

    /// Runs `batch` as one call; returns the leader's result and everyone
    /// else's, a failure copied to each.
    fn lead(
        batch: &[(u64, Tensor)],
        leader: u64,
        f: &impl Fn(&Tensor) -> Result<Tensor>,
    ) -> (Result<Tensor>, Vec<(u64, Share)>) {
        let run = || -> Result<Vec<Tensor>> {
            let inputs: Vec<&Tensor> = batch.iter().map(|(_, t)| t).collect();
            let joined = match inputs.as_slice() {
                [one] => (*one).clone(),
                many => Tensor::cat(many, 0)?,
            };
            let out = f(&joined)?;
            let mut offset = 0;
            let mut parts = Vec::with_capacity(batch.len());
            for t in &inputs {
                let rows = t.dim(0)?;
                parts.push(out.narrow(0, offset, rows)?);
                offset += rows;
            }
            Ok(parts)
        };
        // A panic in `f` must not leave the followers waiting for a leader.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .unwrap_or_else(|_| Err(ModelError::Unsupported("a batched call panicked".into())));
        match outcome {
            Ok(parts) => {
                let mut own = None;
                let mut others = Vec::with_capacity(batch.len());
                for ((ticket, _), part) in batch.iter().zip(parts) {
                    if *ticket == leader {
                        own = Some(part);
                    } else {
                        others.push((*ticket, Ok(part)));
                    }
                }
                let own = own.ok_or_else(|| {
                    ModelError::Unsupported("the leader's input was not in its batch".into())
                });
                (own, others)
            }
            Err(e) => {
                let message = format!("batched with other callers: {e}");
                let others = batch
                    .iter()
                    .filter(|(t, _)| *t != leader)
                    .map(|(t, _)| (*t, Err(message.clone())))
                    .collect();
                (Err(e), others)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::Device;

    use super::*;

    fn row(v: f32) -> Tensor {
        Tensor::new(&[[v, 2.0 * v]], &Device::Cpu).expect("tensor")
    }

    #[test]
    fn a_lone_caller_gets_its_own_result() {
        let c = Combiner::default();
        let out = c.run(row(3.0), |x| Ok((x * 10.0)?)).expect("run");
        assert_eq!(out.to_vec2::<f32>().expect("vec"), [[30.0, 60.0]]);
    }

    #[test]
    fn concurrent_callers_each_get_their_rows_and_share_calls() {
        let c = Combiner::default();
        let calls = AtomicUsize::new(0);
        let threads = 8;
        let rounds = 50;
        let start = Barrier::new(threads);
        std::thread::scope(|s| {
            for i in 0..threads {
                let (c, calls, start) = (&c, &calls, &start);
                s.spawn(move || {
                    start.wait();
                    for r in 0..rounds {
                        let v = (i * 1000 + r) as f32;
                        let out = c
                            .run(row(v), |x| {
                                calls.fetch_add(1, Ordering::Relaxed);
                                Ok((x + 1.0)?)
                            })
                            .expect("run");
                        assert_eq!(
                            out.to_vec2::<f32>().expect("vec"),
                            [[v + 1.0, 2.0 * v + 1.0]]
                        );
                    }
                });
            }
        });
        assert!(calls.load(Ordering::Relaxed) <= threads * rounds);
    }

    #[test]
    fn inputs_queued_during_a_call_run_together_in_the_next() {
        let c = Combiner::default();
        let (inside_tx, inside_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let batch_rows = Mutex::new(Vec::new());
        let f = |x: &Tensor| {
            batch_rows.lock().expect("lock").push(x.dim(0)?);
            if x.dim(0)? == 1 && x.to_vec2::<f32>()?[0][0] == 0.0 {
                inside_tx.send(()).expect("send");
                go_rx.lock().expect("lock").recv().expect("go");
            }
            Ok(x.clone())
        };
        std::thread::scope(|s| {
            let first = s.spawn(|| c.run(row(0.0), f));
            inside_rx.recv().expect("the first call started");
            let later: Vec<_> = [1.0, 2.0]
                .into_iter()
                .map(|v| {
                    let (c, f) = (&c, &f);
                    s.spawn(move || c.run(row(v), f))
                })
                .collect();
            // Both queue behind the running call (they block on it, so
            // watching the queue is the only way to see them arrive).
            while c.lock().queued.len() < 2 {
                std::thread::yield_now();
            }
            go_tx.send(()).expect("go");
            for (h, v) in std::iter::once(first).chain(later).zip([0.0, 1.0, 2.0]) {
                let out = h.join().expect("thread").expect("run");
                assert_eq!(out.to_vec2::<f32>().expect("vec"), [[v, 2.0 * v]]);
            }
        });
        assert_eq!(*batch_rows.lock().expect("lock"), [1, 2]);
    }

    #[test]
    fn a_failure_reaches_every_caller_of_the_batch_and_later_calls_run() {
        let c = Combiner::default();
        let err = c
            .run(row(1.0), |_| Err(ModelError::InputShape("no".into())))
            .expect_err("fails");
        assert!(err.to_string().contains("no"), "{err}");
        let err = c.run(row(1.0), |_| -> Result<Tensor> { panic!("boom") });
        assert!(err.is_err());
        // The leader's seat is free again.
        assert!(c.run(row(1.0), |x| Ok(x.clone())).is_ok());
    }
}
