//! Route choice: which servers, in which order, carry a run of blocks.
//!
//! Pure functions over what the DHT announced and what ping measured, so the
//! choice is testable without a swarm. Inference takes the path of least
//! expected latency through (server, block) nodes, as DESIGN.md sets out: a
//! hop costs one round trip plus serialization, a block costs
//! 1/`inference_rps`, and a server that may lack cache for the session pays
//! a penalty rather than being excluded (it may free cache by the time we ask).

use std::ops::Range;
use std::time::Duration;

use p2p::PeerId;
use wire::Span;

/// A server the router may use.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Who.
    pub peer: PeerId,
    /// The blocks it holds.
    pub span: Span,
    /// Single-token steps per second through one of its blocks.
    pub inference_rps: f64,
    /// Hidden-state messages per second its link carries.
    pub network_rps: f64,
    /// Measured round trip, when connected.
    pub rtt: Option<Duration>,
    /// KV-cache positions it has free.
    pub cache_tokens_left: u64,
    /// Longest session it accepts.
    pub max_length: u32,
}

/// One leg of a route: `peer` runs `span`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The server.
    pub peer: PeerId,
    /// The blocks it runs for us (a sub-span of what it holds).
    pub span: Span,
}

/// Assumed round trip to a server we have not pinged yet: a LAN-ish guess
/// that neither favours nor shuns unknown peers much.
pub const UNKNOWN_RTT: Duration = Duration::from_millis(30);

/// Added to a hop whose server announced less free cache than the session
/// needs: it is used only when nothing else covers those blocks.
const SHORT_CACHE_PENALTY_S: f64 = 30.0;

/// The cheapest chain of hops covering `blocks`, or the blocks nobody covers.
///
/// `tokens` is the session's length, checked against each server's free cache.
///
/// # Errors
/// The uncovered sub-ranges of `blocks`, when no chain exists.
pub fn plan(
    candidates: &[Candidate],
    blocks: Range<u32>,
    tokens: u64,
) -> Result<Vec<Hop>, Vec<Range<u32>>> {
    let (start, end) = (blocks.start, blocks.end);
    let n = (end - start) as usize;
    // cost[i]: cheapest way to have run blocks start..start+i; from[i]: how.
    let mut cost = vec![f64::INFINITY; n + 1];
    let mut from: Vec<Option<(usize, usize)>> = vec![None; n + 1];
    cost[0] = 0.0;
    for i in 0..n {
        if !cost[i].is_finite() {
            continue;
        }
        let b = start + i as u32;
        for (c, cand) in candidates.iter().enumerate() {
            if !usable(cand, b, tokens) {
                continue;
            }
            let hop = hop_cost(cand, tokens);
            let last = cand.span.end.min(end);
            for e in b + 1..=last {
                let j = (e - start) as usize;
                let total = cost[i] + hop + f64::from(e - b) / cand.inference_rps;
                if total < cost[j] {
                    cost[j] = total;
                    from[j] = Some((i, c));
                }
            }
        }
    }
    if cost[n].is_finite() {
        let mut hops = Vec::new();
        let mut j = n;
        while j > 0 {
            let Some((i, c)) = from[j] else { break };
            hops.push(Hop {
                peer: candidates[c].peer,
                span: Span {
                    start: start + i as u32,
                    end: start + j as u32,
                },
            });
            j = i;
        }
        hops.reverse();
        return Ok(hops);
    }
    Err(uncovered(candidates, blocks, tokens))
}

/// Whether `c` can run block `b` in a session of `tokens` positions.
fn usable(c: &Candidate, b: u32, tokens: u64) -> bool {
    c.span.contains(b) && c.inference_rps > 0.0 && u64::from(c.max_length) >= tokens
}

fn hop_cost(c: &Candidate, tokens: u64) -> f64 {
    let rtt = c.rtt.unwrap_or(UNKNOWN_RTT).as_secs_f64();
    let serialize = if c.network_rps > 0.0 {
        1.0 / c.network_rps
    } else {
        0.0
    };
    let short = if c.cache_tokens_left < tokens {
        SHORT_CACHE_PENALTY_S
    } else {
        0.0
    };
    rtt + serialize + short
}

/// The runs of `blocks` no usable candidate holds.
fn uncovered(candidates: &[Candidate], blocks: Range<u32>, tokens: u64) -> Vec<Range<u32>> {
    let mut missing: Vec<Range<u32>> = Vec::new();
    for b in blocks {
        if candidates.iter().any(|c| usable(c, b, tokens)) {
            continue;
        }
        match missing.last_mut() {
            Some(r) if r.end == b => r.end = b + 1,
            _ => missing.push(b..b + 1),
        }
    }
    missing
}

/// Formats ranges the way the CLI prints spans: `3:7, 12:13`.
pub fn describe(ranges: &[Range<u32>]) -> String {
    ranges
        .iter()
        .map(|r| format!("{}:{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(start: u32, end: u32, rps: f64, rtt_ms: u64) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            span: Span { start, end },
            inference_rps: rps,
            network_rps: 1e4,
            rtt: Some(Duration::from_millis(rtt_ms)),
            cache_tokens_left: 1 << 20,
            max_length: 2048,
        }
    }

    fn spans(hops: &[Hop]) -> Vec<(u32, u32)> {
        hops.iter().map(|h| (h.span.start, h.span.end)).collect()
    }

    #[test]
    fn one_server_holding_everything_is_one_hop() {
        let all = cand(0, 30, 100.0, 5);
        let hops = plan(std::slice::from_ref(&all), 0..30, 64).unwrap();
        assert_eq!(
            hops,
            vec![Hop {
                peer: all.peer,
                span: Span { start: 0, end: 30 }
            }]
        );
    }

    #[test]
    fn the_chain_is_contiguous_and_prefers_fewer_faster_hops() {
        let a = cand(0, 10, 100.0, 5);
        let b = cand(10, 20, 100.0, 5);
        let c = cand(20, 30, 100.0, 5);
        let slow_whole = cand(0, 30, 1.0, 5);
        let fast_whole = cand(0, 30, 1000.0, 5);
        let hops = plan(&[a.clone(), b, c, slow_whole.clone()], 0..30, 64).unwrap();
        assert_eq!(spans(&hops), vec![(0, 10), (10, 20), (20, 30)]);
        assert_eq!(hops[0].peer, a.peer);
        let hops = plan(&[a, slow_whole, fast_whole.clone()], 0..30, 64).unwrap();
        assert_eq!(hops.len(), 1);
        assert_eq!(hops[0].peer, fast_whole.peer);
    }

    #[test]
    fn overlapping_spans_hand_over_where_it_pays() {
        // b is slow on its own blocks; c overlaps it and is fast.
        let a = cand(0, 16, 100.0, 5);
        let b = cand(10, 30, 1.0, 5);
        let c = cand(14, 30, 100.0, 5);
        let hops = plan(&[a.clone(), b, c.clone()], 0..30, 64).unwrap();
        assert_eq!(hops.len(), 2);
        assert_eq!(hops[0].peer, a.peer);
        assert_eq!(hops[1].peer, c.peer);
        assert_eq!(hops[0].span.end, hops[1].span.start);
    }

    #[test]
    fn distant_and_short_of_cache_servers_lose() {
        let near = cand(0, 30, 100.0, 2);
        let far = cand(0, 30, 100.0, 400);
        let hops = plan(&[far, near.clone()], 0..30, 64).unwrap();
        assert_eq!(hops[0].peer, near.peer);
        let mut full = cand(0, 30, 1000.0, 1);
        full.cache_tokens_left = 10;
        let hops = plan(&[full.clone(), near.clone()], 0..30, 64).unwrap();
        assert_eq!(hops[0].peer, near.peer);
        // ...unless nothing else covers the blocks.
        let hops = plan(&[full.clone()], 0..30, 64).unwrap();
        assert_eq!(hops[0].peer, full.peer);
    }

    #[test]
    fn a_sub_range_is_routed_alone() {
        let a = cand(0, 20, 100.0, 5);
        let hops = plan(&[a], 12..17, 8).unwrap();
        assert_eq!(spans(&hops), vec![(12, 17)]);
    }

    #[test]
    fn missing_blocks_are_named() {
        let a = cand(0, 3, 100.0, 5);
        let b = cand(7, 12, 100.0, 5);
        let mut dead = cand(12, 14, 100.0, 5);
        dead.inference_rps = 0.0;
        let mut short = cand(3, 5, 100.0, 5);
        short.max_length = 4;
        let missing = plan(&[a, b, dead, short], 0..14, 8).unwrap_err();
        assert_eq!(missing, vec![3..7, 12..14]);
        assert_eq!(describe(&missing), "3:7, 12:14");
    }
}
