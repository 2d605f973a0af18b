//! When a batch runs, and when it waits for more callers.
//!
//! Concurrent sessions' single-position steps arrive spread out in time: at a
//! server, each client hears from the previous server at a slightly different
//! moment; at a client's LM head, each session hears from the last server so.
//! Running whatever is held the moment the worker wakes runs the first
//! arrival alone and the rest after it, and batches fall apart (measured on
//! 8 clients through 3 servers: 1.5 steps a server pass on average). So a
//! batch waits for the sessions that are due, those that have been stepping
//! at a steady pace and have not stepped since, but never longer than a lone
//! step costs: a straggler left out would cost at least that much on its
//! own, and would hold up the next round.
//!
//! Used by the server's compute worker (keyed by weights and blocks) and by
//! [`Head`](crate::Head)'s batching (one key).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Identifies a session (or any caller with a pace of its own).
pub type SessionId = u64;

/// The shortest and longest time a pass may wait for stragglers.
const WAIT_FLOOR: Duration = Duration::from_micros(500);
const WAIT_CEILING: Duration = Duration::from_millis(20);

/// A session is due again within this many of its recent step intervals.
const DUE_WITHIN_PERIODS: u32 = 2;

/// Sessions that never say they closed (the head's calling threads) are
/// forgotten once this many are known and they have been quiet this long.
const FORGET_PAST: usize = 1024;
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// How a session has been stepping.
#[derive(Debug, Clone, Copy)]
struct Pace<K> {
    key: K,
    last: Instant,
    period: Option<Duration>,
}

/// A step held for the next batch: whose, over what (steps share a batch
/// only with steps of the same key), and since when.
#[derive(Debug, Clone, Copy)]
pub struct Held<K> {
    /// The session that sent it.
    pub session: SessionId,
    /// What it runs over.
    pub key: K,
    /// When it arrived.
    pub queued_at: Instant,
}

/// Memory of sessions' pace and of lone steps' cost, per key.
#[derive(Debug)]
pub struct Gather<K> {
    sessions: HashMap<SessionId, Pace<K>>,
    /// How long the latest lone step over each key took.
    solo: HashMap<K, Duration>,
}

impl<K> Default for Gather<K> {
    fn default() -> Self {
        Self {
            sessions: HashMap::new(),
            solo: HashMap::new(),
        }
    }
}

impl<K: Copy + Eq + Hash> Gather<K> {
    /// Notes a step of `session` over `key`, queued at `at`.
    pub fn arrived(&mut self, session: SessionId, key: K, at: Instant) {
        if self.sessions.len() >= FORGET_PAST {
            self.sessions
                .retain(|_, pace| at.saturating_duration_since(pace.last) < FORGET_AFTER);
        }
        let pace = self.sessions.entry(session).or_insert(Pace {
            key,
            last: at,
            period: None,
        });
        if at > pace.last {
            pace.period = Some(at - pace.last);
        }
        pace.last = at;
        pace.key = key;
    }

    /// Forgets a session that ended.
    pub fn closed(&mut self, session: SessionId) {
        self.sessions.remove(&session);
    }

    /// Notes that a step over `key` ran alone in `took`.
    pub fn ran_alone(&mut self, key: K, took: Duration) {
        self.solo.insert(key, took);
    }

    /// How long to wait for more steps, given the steps `held`: `None`
    /// to run now. A key waits while a session that steps over it is due and
    /// not held, until its first held step has waited as long as a lone step
    /// costs; with several such keys the earliest deadline wins.
    pub fn deadline(&self, held: &[Held<K>], now: Instant) -> Option<Instant> {
        let mut deadline: Option<Instant> = None;
        let mut first_held: HashMap<K, Instant> = HashMap::new();
        for h in held {
            let first = first_held.entry(h.key).or_insert(h.queued_at);
            *first = (*first).min(h.queued_at);
        }
        for (key, first) in first_held {
            let Some(&solo) = self.solo.get(&key) else {
                // Nothing ran alone yet: no measure of what waiting may cost.
                continue;
            };
            let missing = self.sessions.iter().any(|(id, pace)| {
                pace.key == key
                    && !held.iter().any(|h| h.session == *id)
                    && pace
                        .period
                        .is_some_and(|p| now < pace.last + p * DUE_WITHIN_PERIODS)
            });
            if !missing {
                continue;
            }
            let until = first + solo.clamp(WAIT_FLOOR, WAIT_CEILING);
            if until > now {
                deadline = Some(deadline.map_or(until, |d| d.min(until)));
            }
        }
        deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Key = (usize, usize, usize);
    const KEY: Key = (1, 0, 10);
    const OTHER: Key = (1, 10, 20);
    const MS: Duration = Duration::from_millis(1);

    fn held(session: SessionId, key: Key, queued_at: Instant) -> Held<Key> {
        Held {
            session,
            key,
            queued_at,
        }
    }

    /// Sessions 1 and 2 stepping every 10 ms over `KEY`, the last time at
    /// `t0`; a lone step costs 3 ms.
    fn steady_pair(t0: Instant) -> Gather<Key> {
        let mut g = Gather::default();
        for s in [1, 2] {
            g.arrived(s, KEY, t0);
            g.arrived(s, KEY, t0 + 10 * MS);
        }
        g.ran_alone(KEY, 3 * MS);
        g
    }

    #[test]
    fn waits_for_a_due_session_at_most_a_lone_steps_cost() {
        let t0 = Instant::now();
        let g = steady_pair(t0);
        let first = t0 + 20 * MS;
        let now = first + MS;
        assert_eq!(
            g.deadline(&[held(1, KEY, first)], now),
            Some(first + 3 * MS)
        );
        // Once that much has passed, run.
        assert_eq!(g.deadline(&[held(1, KEY, first)], first + 3 * MS), None);
    }

    #[test]
    fn runs_at_once_when_every_due_session_is_held() {
        let t0 = Instant::now();
        let g = steady_pair(t0);
        let now = t0 + 21 * MS;
        let both = [held(1, KEY, now), held(2, KEY, now)];
        assert_eq!(g.deadline(&both, now), None);
    }

    #[test]
    fn does_not_wait_for_closed_idle_or_new_sessions() {
        let t0 = Instant::now();
        let mut g = steady_pair(t0);
        g.closed(2);
        let now = t0 + 21 * MS;
        assert_eq!(g.deadline(&[held(1, KEY, now)], now), None, "closed");

        let mut g = steady_pair(t0);
        // Session 2's pace says it was due by t0 + 30 ms; long past.
        let late = t0 + 200 * MS;
        assert_eq!(g.deadline(&[held(1, KEY, late)], late), None, "idle");

        // A session seen once has no pace yet.
        g.arrived(3, KEY, late);
        g.closed(2);
        assert_eq!(g.deadline(&[held(1, KEY, late)], late), None, "new");
    }

    #[test]
    fn long_quiet_sessions_are_forgotten_once_many_are_known() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        for s in 0..FORGET_PAST as SessionId {
            g.arrived(s, KEY, t0);
        }
        g.arrived(FORGET_PAST as SessionId, KEY, t0 + FORGET_AFTER);
        assert_eq!(g.sessions.len(), 1);
    }

    #[test]
    fn does_not_wait_before_any_lone_step_was_timed() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        for s in [1, 2] {
            g.arrived(s, KEY, t0);
            g.arrived(s, KEY, t0 + 10 * MS);
        }
        let now = t0 + 21 * MS;
        assert_eq!(g.deadline(&[held(1, KEY, now)], now), None);
    }

    #[test]
    fn the_wait_is_clamped_and_keys_wait_only_for_their_own_sessions() {
        let t0 = Instant::now();
        let mut g = steady_pair(t0);
        g.ran_alone(KEY, Duration::from_secs(5));
        let now = t0 + 21 * MS;
        assert_eq!(
            g.deadline(&[held(1, KEY, now)], now),
            Some(now + WAIT_CEILING)
        );
        g.ran_alone(KEY, Duration::from_micros(1));
        assert_eq!(
            g.deadline(&[held(1, KEY, now)], now),
            Some(now + WAIT_FLOOR)
        );
        // A step over other blocks does not wait for KEY's sessions.
        g.ran_alone(OTHER, 3 * MS);
        assert_eq!(
            g.deadline(
                &[held(1, KEY, now), held(2, KEY, now), held(9, OTHER, now)],
                now
            ),
            None
        );
    }
}
