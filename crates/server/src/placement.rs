//! Which blocks a server should host: the span whose blocks have the least
//! total throughput in the swarm, and when moving is worth it (DESIGN.md,
//! Server placement; the rule Petals uses).
//!
//! Pure functions over announced spans and throughputs, so the policy is
//! tested without a network.

use wire::Span;

/// Another server as placement sees it: its span and per-block throughput.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peer {
    /// Blocks it hosts.
    pub span: Span,
    /// Its effective per-block throughput.
    pub throughput: f64,
}

/// Total throughput per block of a `num_blocks`-block model.
pub fn block_throughputs(num_blocks: u32, peers: &[Peer]) -> Vec<f64> {
    let mut t = vec![0.0; num_blocks as usize];
    for p in peers {
        for b in p.span.start..p.span.end.min(num_blocks) {
            t[b as usize] += p.throughput;
        }
    }
    t
}

/// The `len` consecutive blocks with the least total throughput; among equals
/// the first, so servers that start together still spread predictably.
pub fn choose_span(num_blocks: u32, len: u32, peers: &[Peer]) -> Span {
    let len = len.clamp(1, num_blocks.max(1));
    let t = block_throughputs(num_blocks, peers);
    // Compare by (coverage gaps, total): a window containing an uncovered
    // block always beats one that is fully covered.
    let score = |start: u32| {
        let w = &t[start as usize..(start + len) as usize];
        let gaps = w.iter().filter(|&&x| x <= 0.0).count();
        (std::cmp::Reverse(gaps), w.iter().sum::<f64>())
    };
    let best = (0..=num_blocks - len)
        .min_by(|&a, &b| {
            let (ga, sa) = score(a);
            let (gb, sb) = score(b);
            ga.cmp(&gb).then(sa.total_cmp(&sb))
        })
        .unwrap_or(0);
    Span {
        start: best,
        end: best + len,
    }
}

/// Where this server should move, if anywhere: `Some(span)` when hosting
/// `span` instead of `current` would cover more blocks, or cover as many and
/// raise the swarm's minimum block throughput so that the current minimum is
/// below `quality` (0..1) of the new one. Never moves when that would leave
/// one of the current blocks uncovered.
///
/// Coverage comes first because with two gaps the minimum is zero whether
/// one of them is filled or not: four servers that all started on the first
/// blocks of six would otherwise never move.
pub fn rebalance(num_blocks: u32, current: Peer, others: &[Peer], quality: f64) -> Option<Span> {
    let without_me = block_throughputs(num_blocks, others);
    if (current.span.start..current.span.end).any(|b| without_me[b as usize] <= 0.0) {
        return None;
    }
    let candidate = choose_span(num_blocks, current.span.len(), others);
    if candidate == current.span {
        return None;
    }
    // (uncovered blocks, minimum block throughput) with this server on `span`.
    let with = |span: Span| {
        let mut t = without_me.clone();
        for b in span.start..span.end {
            t[b as usize] += current.throughput;
        }
        let gaps = t.iter().filter(|&&x| x <= 0.0).count();
        (gaps, t.into_iter().fold(f64::INFINITY, f64::min))
    };
    let (gaps_now, now) = with(current.span);
    let (gaps_after, after) = with(candidate);
    (gaps_after < gaps_now || (gaps_after == gaps_now && now < quality * after))
        .then_some(candidate)
}

/// Whether `peers` together cover every block.
pub fn covers_all(num_blocks: u32, peers: &[Peer]) -> bool {
    block_throughputs(num_blocks, peers)
        .iter()
        .all(|&t| t > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(start: u32, end: u32, throughput: f64) -> Peer {
        Peer {
            span: Span { start, end },
            throughput,
        }
    }

    #[test]
    fn first_servers_fill_the_gaps() {
        assert_eq!(choose_span(30, 10, &[]), Span { start: 0, end: 10 });
        let a = peer(0, 10, 1.0);
        assert_eq!(choose_span(30, 10, &[a]), Span { start: 10, end: 20 });
        let b = peer(10, 20, 1.0);
        assert_eq!(choose_span(30, 10, &[a, b]), Span { start: 20, end: 30 });
        // A larger span still prefers the uncovered blocks.
        assert_eq!(choose_span(30, 15, &[peer(0, 20, 5.0)]).end, 30);
    }

    #[test]
    fn servers_that_all_started_on_the_same_blocks_fill_one_gap_at_a_time() {
        // Six blocks, four servers of two that all chose 0..2.
        let me = peer(0, 2, 1.0);
        let twins = [peer(0, 2, 1.0), peer(0, 2, 1.0), peer(0, 2, 1.0)];
        assert_eq!(
            rebalance(6, me, &twins, 0.75),
            Some(Span { start: 2, end: 4 })
        );
        let rest = [peer(0, 2, 1.0), peer(0, 2, 1.0), peer(2, 4, 1.0)];
        assert_eq!(
            rebalance(6, me, &rest, 0.75),
            Some(Span { start: 4, end: 6 })
        );
    }

    #[test]
    fn duplicate_server_moves_to_the_gap() {
        // Two servers started together and both took 0..10.
        let me = peer(0, 10, 1.0);
        let others = [peer(0, 10, 1.0), peer(10, 20, 1.0)];
        assert_eq!(
            rebalance(30, me, &others, 0.75),
            Some(Span { start: 20, end: 30 })
        );
    }

    #[test]
    fn never_uncovers_a_block_and_ignores_small_gains() {
        // I am the only server of 0..10: stay, however slow.
        let me = peer(0, 10, 1.0);
        assert_eq!(rebalance(30, me, &[peer(10, 30, 100.0)], 0.75), None);
        // Balanced swarm: moving gains nothing.
        let others = [peer(0, 10, 1.0), peer(10, 20, 1.0), peer(20, 30, 1.0)];
        assert_eq!(rebalance(30, peer(0, 10, 1.0), &others, 0.75), None);
        assert!(covers_all(30, &others));
        assert!(!covers_all(30, &others[..2]));
    }
}
