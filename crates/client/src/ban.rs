//! Servers that failed us, kept out of routes for a while.
//!
//! Each failure doubles the ban (from `base` up to `max`), so a flapping
//! server is tried less and less often, and a server that recovers is
//! forgiven after its first success.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use p2p::PeerId;

/// Banned servers with exponential backoff.
#[derive(Debug, Clone)]
pub struct BanList {
    base: Duration,
    max: Duration,
    entries: HashMap<PeerId, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    until: Instant,
    strikes: u32,
}

impl Default for BanList {
    /// Petals' defaults: 15 s, doubling, at most 5 minutes.
    fn default() -> Self {
        Self::new(Duration::from_secs(15), Duration::from_secs(300))
    }
}

impl BanList {
    /// Bans start at `base` and double per failure up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            entries: HashMap::new(),
        }
    }

    /// Records a failure of `peer` at `now`; returns how long it is banned.
    pub fn ban(&mut self, peer: PeerId, now: Instant) -> Duration {
        let entry = self.entries.entry(peer).or_insert(Entry {
            until: now,
            strikes: 0,
        });
        let length = self
            .base
            .saturating_mul(1 << entry.strikes.min(16))
            .min(self.max);
        entry.strikes += 1;
        entry.until = now + length;
        length
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.entries.get(peer).is_some_and(|e| e.until > now)
    }

    /// Forgets `peer`'s failures after it served us well.
    pub fn forgive(&mut self, peer: &PeerId) {
        self.entries.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_double_up_to_the_cap_and_expire() {
        let mut bans = BanList::new(Duration::from_secs(1), Duration::from_secs(5));
        let p = PeerId::random();
        let t = Instant::now();
        assert!(!bans.is_banned(&p, t));
        assert_eq!(bans.ban(p, t), Duration::from_secs(1));
        assert!(bans.is_banned(&p, t));
        assert!(!bans.is_banned(&p, t + Duration::from_secs(1)));
        assert_eq!(bans.ban(p, t), Duration::from_secs(2));
        assert_eq!(bans.ban(p, t), Duration::from_secs(4));
        assert_eq!(bans.ban(p, t), Duration::from_secs(5));
        bans.forgive(&p);
        assert!(!bans.is_banned(&p, t));
        assert_eq!(bans.ban(p, t), Duration::from_secs(1));
    }
}
