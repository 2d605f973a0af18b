//! The KV-cache memory budget, counted in cached positions.
//!
//! A session reserves `max_length * batch` positions when it opens and gives
//! them back when it ends, however it ends (the reservation is a guard), so a
//! client that vanishes never leaks server memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Shared counter of free cache positions.
#[derive(Debug, Clone)]
pub struct CacheBudget {
    free: Arc<AtomicU64>,
    total: u64,
}

/// Positions held by one session; returned on drop.
#[derive(Debug)]
pub struct Reservation {
    free: Arc<AtomicU64>,
    tokens: u64,
}

impl CacheBudget {
    /// A budget of `total` positions.
    pub fn new(total: u64) -> Self {
        Self {
            free: Arc::new(AtomicU64::new(total)),
            total,
        }
    }

    /// Positions not reserved.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Acquire)
    }

    /// The whole budget.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Reserves `tokens` positions, or `None` when they are not free.
    pub fn reserve(&self, tokens: u64) -> Option<Reservation> {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                f.checked_sub(tokens)
            })
            .ok()
            .map(|_| Reservation {
                free: self.free.clone(),
                tokens,
            })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.free.fetch_add(self.tokens, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_returned_on_drop() {
        let b = CacheBudget::new(100);
        let r1 = b.reserve(60).unwrap();
        assert!(b.reserve(50).is_none());
        let r2 = b.reserve(40).unwrap();
        assert_eq!(b.free(), 0);
        drop(r1);
        assert_eq!(b.free(), 60);
        drop(r2);
        assert_eq!(b.free(), 100);
    }
}
