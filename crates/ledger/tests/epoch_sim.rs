//! Epoch simulation: three honest nodes, one silent node (never proposes,
//! never attests, scored zero) and a lazy validator (attests and serves but
//! never proposes when elected). A mirror model predicts every node's stake
//! and reputation and the issuance after each epoch.

mod common;

use std::collections::BTreeMap;

use common::*;
use ledger::runtime::{nodes, subnets};
use ledger::types::{NodeScore, SubnetState};
use ledger::{Call, TOKEN};

const SILENT: u32 = 4;
const LAZY: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Mirror {
    stake: u128,
    rep: u32,
}

#[test]
fn honest_silent_and_lazy_validator() {
    let mut g = genesis(10);
    g.params.missed_proposal_loss = 300_000;
    let p = g.params.clone();
    let mut w = world_with(g, 5, true);
    let mut mirror: BTreeMap<u32, Mirror> = (1..=5)
        .map(|id| {
            (
                id,
                Mirror {
                    stake: 100 * TOKEN,
                    rep: p.node_initial_reputation,
                },
            )
        })
        .collect();
    let mut removed_at: BTreeMap<u32, usize> = BTreeMap::new();
    let mut honest_epochs = 0;
    let mut missed = BTreeMap::<u32, u32>::new();

    w.next_epoch();
    for round in 0..200 {
        let rec = w.record().expect("a validator every epoch");
        let v = rec.validator;
        let honest = v <= 3;
        if honest {
            let scores: Vec<_> = mirror
                .keys()
                .map(|&id| NodeScore {
                    node: id,
                    score: if id == SILENT { 0 } else { 100 },
                })
                .collect();
            w.chain
                .exec(
                    &hot((v - 1) as u8),
                    Call::ProposeAttestation { subnet: 1, scores },
                )
                .unwrap();
            for &id in mirror.keys() {
                if id != v && id != SILENT {
                    w.chain
                        .exec(&hot((id - 1) as u8), Call::Attest { subnet: 1 })
                        .unwrap();
                }
            }
        }
        // The silent node never acts; the lazy one attests but never proposes.

        let issuance_before = w.chain.audit().issuance;
        let owner_before = w.balance(&w.owner);
        // Mirror the epoch step.
        let mut minted = 0u128;
        if honest {
            honest_epochs += 1;
            let owner_cut = p.emission_per_epoch * p.owner_cut as u128 / 1_000_000;
            let pool = p.emission_per_epoch - owner_cut;
            let scored = mirror.keys().filter(|&&id| id != SILENT).count() as u128;
            let reward = pool * 100 / (100 * scored);
            for (&id, m) in mirror.iter_mut() {
                if id == SILENT {
                    m.rep = m
                        .rep
                        .saturating_sub(p.node_zero_score_loss + p.node_no_attest_loss);
                } else {
                    m.stake += reward;
                    m.rep = (m.rep + p.node_reputation_gain).min(1_000_000);
                    minted += reward;
                }
            }
            minted += owner_cut;
        } else {
            *missed.entry(v).or_default() += 1;
            let m = mirror.get_mut(&v).unwrap();
            m.rep = m.rep.saturating_sub(p.missed_proposal_loss);
        }
        let gone: Vec<u32> = mirror
            .iter()
            .filter(|(_, m)| m.rep < p.node_min_reputation)
            .map(|(&id, _)| id)
            .collect();
        let mut gone_stake = BTreeMap::new();
        for id in &gone {
            gone_stake.insert(*id, mirror.remove(id).unwrap().stake);
            removed_at.insert(*id, round);
        }

        w.next_epoch();

        assert_eq!(
            w.chain.audit().issuance,
            issuance_before + minted,
            "round {round}"
        );
        assert!(w.chain.audit().holds());
        if honest {
            assert_eq!(
                w.balance(&w.owner),
                owner_before + p.emission_per_epoch * p.owner_cut as u128 / 1_000_000
            );
        } else {
            assert_eq!(
                w.balance(&w.owner),
                owner_before,
                "no emission without a proposal"
            );
        }
        for (&id, m) in &mirror {
            let n = w
                .node(id)
                .unwrap_or_else(|| panic!("node {id} should exist in round {round}"));
            assert_eq!(
                (n.stake, n.reputation),
                (m.stake, m.rep),
                "node {id}, round {round}"
            );
        }
        for id in &gone {
            assert!(
                w.node(*id).is_none(),
                "node {id} should be removed in round {round}"
            );
            let unb = nodes::unbonding(&w.chain.state, &cold((*id - 1) as u8).address()).unwrap();
            assert_eq!(
                unb.iter().map(|u| u.amount).sum::<u128>(),
                gone_stake[id],
                "the whole stake unbonds"
            );
        }
        if removed_at.contains_key(&SILENT) && removed_at.contains_key(&LAZY) && round > 20 {
            break;
        }
    }

    assert!(removed_at.contains_key(&SILENT), "silent node removed");
    assert!(
        removed_at.contains_key(&LAZY),
        "lazy validator removed after missed proposals"
    );
    assert!(missed.get(&LAZY).copied().unwrap_or(0) >= 1);
    assert!(honest_epochs > 5);
    for id in 1..=3 {
        let n = w.node(id).unwrap();
        assert!(n.stake > 100 * TOKEN, "honest node {id} earned rewards");
        assert!(
            n.reputation > p.node_initial_reputation,
            "honest node {id} gained reputation"
        );
    }
    let s = subnets::load(&w.chain.state, 1).unwrap();
    assert_eq!(s.state, SubnetState::Active);
    assert_eq!(s.node_count, 3);
}
