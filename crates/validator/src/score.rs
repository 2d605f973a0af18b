//! Deterministic integer scores from an epoch's [`Measurement`]s, and the
//! tolerance check an attester applies to the elected validator's proposal.
//!
//! Everything here is a pure function of its inputs, in integers only, so
//! every validator that recorded the same measurements computes the same
//! scores bit for bit, on any machine.
//!
//! # The score
//!
//! For each measured node (the input order does not matter; duplicate node
//! ids keep the smallest measurement by its derived order):
//!
//! - **Eligibility.** A node with a failed spot check, or with no answered
//!   probe, scores **0**. The other nodes are *eligible*.
//! - **Coverage**, in micro-blocks: `coverage = Σ_{b ∈ span} 1_000_000 / cover(b)`,
//!   where `cover(b)` is the number of eligible nodes whose span contains
//!   block `b` (the node itself included). Blocks few others serve weigh
//!   more; a block served by one node alone is worth 1_000_000. A node caught
//!   cheating does not count as covering anything. Blocks at or past
//!   `num_blocks` are ignored.
//! - **Availability**: `availability_ppm = answered * 1_000_000 / probes`.
//! - **Speed**: with `t` the node's median throughput (milli-tokens/s) and
//!   `T` the median over eligible nodes of their median throughputs,
//!   `speed_ppm = min(1_000_000, t * 1_000_000 / T)` (1_000_000 when `T` is
//!   0, 0 when the node has no sample), mapped to
//!   `speed_factor = 500_000 + speed_ppm / 2`: a slow node keeps at least half.
//! - **Ping**: with `p` the node's median ping in µs (100_000 when it has no
//!   sample), `ping_factor = 1_000_000 * 100_000 / (100_000 + p)`: 100 ms
//!   halves the score.
//! - **Score**, in `u128` with integer division in this order, then clamped
//!   to `u64`:
//!   `coverage * availability_ppm / 1e6 * speed_factor / 1e6 * ping_factor / 1e6`.
//!
//! Medians are lower medians (the element at index `(n - 1) / 2` of the
//! sorted samples), so they stay integers.
//!
//! # Agreement
//!
//! [`agrees`] compares two score lists. A node missing from a list counts
//! as 0. Zero against non-zero never agrees (a caught cheater must be 0 in
//! both views, and an honest node must not be zeroed). Otherwise each
//! node's share of its list's total, `score * 1_000_000 / total`, may differ
//! by at most `tolerance_ppm` between the two lists. The attester leaves its
//! own node out of both lists before comparing: a node cannot probe itself,
//! so its score of itself is an assumption, not a measurement.

use std::collections::{BTreeMap, BTreeSet};

use ledger::types::{NodeId, NodeScore};

use crate::measure::Measurement;

/// One in parts per million.
pub const PPM: u64 = 1_000_000;
/// The ping at which the ping factor halves a score, in microseconds.
pub const PING_HALF_US: u64 = 100_000;
/// The default share tolerance of [`agrees`]: 15 percentage points.
pub const DEFAULT_TOLERANCE_PPM: u32 = 150_000;

/// The lower median of `samples`, or `None` when there are none.
pub fn lower_median(samples: &[u64]) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    Some(v[(v.len() - 1) / 2])
}

fn eligible(m: &Measurement) -> bool {
    m.answered > 0 && m.spot_check_failures == 0
}

/// Blocks of `m`'s span below `num_blocks`.
fn blocks(m: &Measurement, num_blocks: u32) -> std::ops::Range<u32> {
    match m.span {
        Some((start, end)) => start.min(num_blocks)..end.min(num_blocks),
        None => 0..0,
    }
}

/// Scores every node of `measurements` (see the module docs for the
/// formula), sorted by node id, one entry per node.
pub fn scores(measurements: &[Measurement], num_blocks: u32) -> Vec<NodeScore> {
    // Canonical order first, so the result cannot depend on the input order.
    let mut ms: Vec<&Measurement> = measurements.iter().collect();
    ms.sort();
    ms.dedup_by_key(|m| m.node);

    let mut cover = vec![0u64; num_blocks as usize];
    for m in ms.iter().filter(|m| eligible(m)) {
        for b in blocks(m, num_blocks) {
            cover[b as usize] += 1;
        }
    }
    let medians: Vec<u64> = ms
        .iter()
        .filter(|m| eligible(m))
        .filter_map(|m| lower_median(&m.throughput_mtps))
        .collect();
    let reference = lower_median(&medians).unwrap_or(0);

    ms.iter()
        .map(|m| NodeScore {
            node: m.node,
            score: if eligible(m) {
                score_one(m, num_blocks, &cover, reference)
            } else {
                0
            },
        })
        .collect()
}

fn score_one(m: &Measurement, num_blocks: u32, cover: &[u64], reference: u64) -> u64 {
    let ppm = PPM as u128;
    let coverage: u128 = blocks(m, num_blocks)
        .map(|b| ppm / cover[b as usize].max(1) as u128)
        .sum();
    let answered = m.answered.min(m.probes) as u128;
    let availability = answered * ppm / (m.probes.max(1) as u128);
    let speed_ppm = match lower_median(&m.throughput_mtps) {
        None => 0,
        Some(_) if reference == 0 => ppm,
        Some(t) => (t as u128 * ppm / reference as u128).min(ppm),
    };
    let speed_factor = ppm / 2 + speed_ppm / 2;
    let ping = lower_median(&m.ping_us).unwrap_or(PING_HALF_US) as u128;
    let ping_factor = ppm * PING_HALF_US as u128 / (PING_HALF_US as u128 + ping);
    let score = coverage * availability / ppm * speed_factor / ppm * ping_factor / ppm;
    u64::try_from(score).unwrap_or(u64::MAX)
}

/// Why an attester's own scores do not back a proposal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Disagreement {
    /// One list scores the node 0 and the other does not.
    #[error("node {node}: our score {ours} vs proposed {proposed} (zero against non-zero)")]
    ZeroMismatch {
        /// The node.
        node: NodeId,
        /// Our score (0 when we did not score it).
        ours: u64,
        /// The proposal's score (0 when it left the node out).
        proposed: u64,
    },
    /// The node's share of the total differs by more than the tolerance.
    #[error(
        "node {node}: our share {ours_ppm} ppm (score {ours}) vs proposed {proposed_ppm} ppm \
         (score {proposed}), tolerance {tolerance_ppm} ppm"
    )]
    Share {
        /// The node.
        node: NodeId,
        /// Our score.
        ours: u64,
        /// The proposal's score.
        proposed: u64,
        /// Our share of our total, in ppm.
        ours_ppm: u64,
        /// The proposal's share of its total, in ppm.
        proposed_ppm: u64,
        /// The tolerance that was exceeded.
        tolerance_ppm: u32,
    },
}

/// Checks that `proposal` agrees with `ours` within `tolerance_ppm` (see the
/// module docs). The first zero-against-non-zero node in node-id order is
/// reported, or else the first node whose share is out of tolerance.
pub fn agrees(
    ours: &[NodeScore],
    proposal: &[NodeScore],
    tolerance_ppm: u32,
) -> Result<(), Disagreement> {
    let as_map = |s: &[NodeScore]| -> BTreeMap<NodeId, u64> {
        let mut m = BTreeMap::new();
        for sc in s {
            // Duplicates cannot reach the ledger; keep the larger to stay order-free.
            let e = m.entry(sc.node).or_insert(0);
            *e = (*e).max(sc.score);
        }
        m
    };
    let (a, b) = (as_map(ours), as_map(proposal));
    let total = |m: &BTreeMap<NodeId, u64>| m.values().map(|&v| v as u128).sum::<u128>();
    let (ta, tb) = (total(&a), total(&b));
    let share = |v: u64, t: u128| -> u64 {
        (v as u128 * PPM as u128)
            .checked_div(t)
            .map_or(0, |s| s as u64)
    };
    let nodes: BTreeSet<NodeId> = a.keys().chain(b.keys()).copied().collect();
    let pair = |node: &NodeId| {
        (
            a.get(node).copied().unwrap_or(0),
            b.get(node).copied().unwrap_or(0),
        )
    };
    // Zero against non-zero first: it is the stronger signal.
    for node in &nodes {
        let (ours, proposed) = pair(node);
        if (ours == 0) != (proposed == 0) {
            return Err(Disagreement::ZeroMismatch {
                node: *node,
                ours,
                proposed,
            });
        }
    }
    for node in &nodes {
        let (ours, proposed) = pair(node);
        if ours == 0 {
            continue;
        }
        let (ours_ppm, proposed_ppm) = (share(ours, ta), share(proposed, tb));
        if ours_ppm.abs_diff(proposed_ppm) > tolerance_ppm as u64 {
            return Err(Disagreement::Share {
                node: *node,
                ours,
                proposed,
                ours_ppm,
                proposed_ppm,
                tolerance_ppm,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A healthy node: 3 of 3 probes answered, 1 ms ping, 1000 tokens/s.
    fn m(node: NodeId, span: (u32, u32)) -> Measurement {
        Measurement {
            node,
            peer_id: format!("peer{node}"),
            span: Some(span),
            probes: 3,
            answered: 3,
            ping_us: vec![1_000, 1_100, 900],
            throughput_mtps: vec![1_000_000, 1_100_000, 900_000],
            spot_checks: 3,
            spot_check_failures: 0,
            bytes_sent: 0,
            bytes_received: 0,
            self_assessed: false,
        }
    }

    fn score_of(s: &[NodeScore], node: NodeId) -> u64 {
        s.iter().find(|x| x.node == node).unwrap().score
    }

    fn sc(pairs: &[(NodeId, u64)]) -> Vec<NodeScore> {
        pairs
            .iter()
            .map(|&(node, score)| NodeScore { node, score })
            .collect()
    }

    #[test]
    fn deterministic_and_order_free() {
        let mut input = vec![m(1, (0, 4)), m(2, (0, 2)), m(3, (2, 4)), m(4, (1, 3))];
        input[1].throughput_mtps = vec![400_000];
        input[2].ping_us = vec![50_000];
        input[3].answered = 2;
        let a = scores(&input, 4);
        assert_eq!(a, scores(&input, 4));
        input.reverse();
        input.swap(0, 2);
        assert_eq!(a, scores(&input, 4));
        let ids: Vec<_> = a.iter().map(|s| s.node).collect();
        assert_eq!(ids, vec![1, 2, 3, 4], "sorted by node id");
        assert!(a.iter().all(|s| s.score > 0));
    }

    #[test]
    fn formula_by_hand() {
        // One node alone on 2 blocks: coverage 2e6; full availability;
        // at the median speed; ping 1 ms -> 1e6 * 1e5 / 101_000 = 990_099.
        let s = scores(&[m(7, (0, 2))], 2);
        let expected = 2_000_000u128 * PPM as u128 / PPM as u128 * PPM as u128 / PPM as u128
            * 990_099
            / PPM as u128;
        assert_eq!(s, sc(&[(7, expected as u64)]));
        // A node twice as slow as the median keeps 75%.
        let mut slow = m(2, (0, 1));
        slow.throughput_mtps = vec![500_000];
        let fast = [m(1, (0, 1)), m(3, (0, 1))];
        let s = scores(&[fast[0].clone(), slow, fast[1].clone()], 1);
        let (fast, slow) = (score_of(&s, 1), score_of(&s, 2));
        assert!((slow * 4).abs_diff(fast * 3) <= 8, "{fast} vs {slow}");
    }

    #[test]
    fn cheater_and_silent_nodes_score_zero() {
        let mut cheat = m(2, (0, 4));
        cheat.spot_check_failures = 1;
        let mut silent = m(3, (0, 4));
        silent.answered = 0;
        silent.ping_us.clear();
        silent.throughput_mtps.clear();
        let s = scores(&[m(1, (0, 4)), cheat, silent], 4);
        assert!(score_of(&s, 1) > 0);
        assert_eq!(score_of(&s, 2), 0);
        assert_eq!(score_of(&s, 3), 0);
        // Neither counts as covering: node 1 gets full credit for every block.
        assert_eq!(score_of(&s, 1), scores(&[m(1, (0, 4))], 4)[0].score);
    }

    #[test]
    fn rarely_covered_blocks_weigh_more() {
        // Block 0 is served by node 1 only, block 1 by nodes 2 and 3.
        let s = scores(&[m(1, (0, 1)), m(2, (1, 2)), m(3, (1, 2))], 2);
        assert!(score_of(&s, 1).abs_diff(2 * score_of(&s, 2)) <= 2);
        assert_eq!(score_of(&s, 2), score_of(&s, 3));
        // Node 1 alone on blocks 2 and 3: 0.5 + 0.5 + 1 + 1 against 0.5 + 0.5.
        let s = scores(&[m(1, (0, 4)), m(2, (0, 2))], 4);
        assert!(score_of(&s, 1).abs_diff(3 * score_of(&s, 2)) <= 3);
    }

    #[test]
    fn availability_halves_the_score() {
        let mut half = m(2, (0, 4));
        half.probes = 4;
        half.answered = 2;
        let s = scores(&[m(1, (0, 4)), half], 4);
        let (full, half) = (score_of(&s, 1), score_of(&s, 2));
        assert!(full.abs_diff(2 * half) <= 1, "{full} vs {half}");
    }

    #[test]
    fn ping_of_100ms_halves_the_score() {
        let mut far = m(2, (0, 4));
        far.ping_us = vec![100_000];
        let mut near = m(1, (0, 4));
        near.ping_us = vec![0];
        let s = scores(&[near, far], 4);
        assert!(score_of(&s, 1).abs_diff(2 * score_of(&s, 2)) <= 1);
    }

    #[test]
    fn duplicates_and_out_of_range_spans() {
        let mut dup = m(1, (0, 4));
        dup.answered = 1;
        let a = scores(&[m(1, (0, 4)), dup.clone(), m(2, (2, 9))], 4);
        let b = scores(&[dup, m(2, (2, 9)), m(1, (0, 4))], 4);
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn tolerance_accepts_noise() {
        let ours = sc(&[(1, 1000), (2, 2000), (3, 3000), (4, 0)]);
        let theirs = sc(&[(1, 1100), (2, 1900), (3, 3100), (4, 0)]);
        assert_eq!(agrees(&ours, &theirs, DEFAULT_TOLERANCE_PPM), Ok(()));
        // Scale does not matter, shares do.
        let scaled = sc(&[(1, 10_000), (2, 20_000), (3, 30_000)]);
        assert_eq!(agrees(&ours, &scaled, 0), Ok(()));
    }

    #[test]
    fn tolerance_rejects_a_zeroed_honest_node_and_a_skew() {
        let ours = sc(&[(1, 1000), (2, 1000), (3, 1000)]);
        let zeroed = sc(&[(1, 1000), (2, 0), (3, 1000)]);
        assert_eq!(
            agrees(&ours, &zeroed, DEFAULT_TOLERANCE_PPM),
            Err(Disagreement::ZeroMismatch {
                node: 2,
                ours: 1000,
                proposed: 0
            })
        );
        let skewed = sc(&[(1, 5000), (2, 1000), (3, 1000)]);
        let e = agrees(&ours, &skewed, DEFAULT_TOLERANCE_PPM).unwrap_err();
        assert!(
            matches!(
                e,
                Disagreement::Share {
                    node: 1,
                    ours: 1000,
                    proposed: 5000,
                    ours_ppm: 333_333,
                    proposed_ppm: 714_285,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("node 1"), "{e}");
        // A cheater we zeroed must be zero in the proposal too.
        let ours = sc(&[(1, 1000), (2, 0)]);
        assert!(agrees(&ours, &sc(&[(1, 1000), (2, 10)]), PPM as u32).is_err());
    }

    #[test]
    fn missing_nodes_count_as_zero() {
        let ours = sc(&[(1, 1000), (2, 1000), (3, 0)]);
        // Leaving out a node we scored 0 is fine.
        assert_eq!(
            agrees(&ours, &sc(&[(1, 1000), (2, 1000)]), DEFAULT_TOLERANCE_PPM),
            Ok(())
        );
        // Leaving out a node we scored above 0 is not.
        assert!(matches!(
            agrees(&ours, &sc(&[(1, 1000)]), DEFAULT_TOLERANCE_PPM),
            Err(Disagreement::ZeroMismatch { node: 2, .. })
        ));
        // Nor is scoring one we never saw.
        assert!(matches!(
            agrees(
                &ours,
                &sc(&[(1, 1000), (2, 1000), (9, 5)]),
                DEFAULT_TOLERANCE_PPM
            ),
            Err(Disagreement::ZeroMismatch {
                node: 9,
                ours: 0,
                ..
            })
        ));
        assert_eq!(agrees(&[], &[], DEFAULT_TOLERANCE_PPM), Ok(()));
    }
}
