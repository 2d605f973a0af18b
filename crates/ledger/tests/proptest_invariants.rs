//! Property tests over random transaction sequences: the issuance invariant
//! holds after every block, and replaying the blocks on a fresh chain (through
//! block verification) reproduces every state root.

mod common;

use common::*;
use ledger::runtime::{epochs, nodes};
use ledger::sim::SimChain;
use ledger::types::{NodeClass, NodeScore};
use ledger::{Call, Genesis, TOKEN};
use proptest::prelude::*;

const KEYS: u8 = 5;

#[derive(Clone, Debug)]
enum Op {
    Transfer { from: u8, to: u8, amount: u64 },
    RegisterSubnet { from: u8, min: u8 },
    ActivateSubnet { from: u8 },
    PauseToggle { from: u8 },
    RegisterNode { from: u8, stake: u16 },
    AddStake { from: u8, node: u8, amount: u16 },
    RemoveStake { from: u8, node: u8, amount: u16 },
    Claim { from: u8 },
    Delegate { from: u8, amount: u16 },
    Undelegate { from: u8, shares: u16 },
    Propose { scores: Vec<u8>, attesters: u8 },
    Attest { from: u8 },
    Blocks { n: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS;
    prop_oneof![
        1 => (k.clone(), 0..KEYS, 0u64..2_000).prop_map(|(from, to, amount)| Op::Transfer { from, to, amount }),
        1 => (k.clone(), 1u8..20).prop_map(|(from, min)| Op::RegisterSubnet { from, min }),
        1 => k.clone().prop_map(|from| Op::ActivateSubnet { from }),
        1 => k.clone().prop_map(|from| Op::PauseToggle { from }),
        1 => (k.clone(), 0u16..300).prop_map(|(from, stake)| Op::RegisterNode { from, stake }),
        1 => (k.clone(), 1u8..6, 0u16..100).prop_map(|(from, node, amount)| Op::AddStake { from, node, amount }),
        1 => (k.clone(), 1u8..6, 0u16..150).prop_map(|(from, node, amount)| Op::RemoveStake { from, node, amount }),
        1 => k.clone().prop_map(|from| Op::Claim { from }),
        1 => (k.clone(), 0u16..500).prop_map(|(from, amount)| Op::Delegate { from, amount }),
        1 => (k.clone(), 0u16..500).prop_map(|(from, shares)| Op::Undelegate { from, shares }),
        3 => (proptest::collection::vec(0u8..4, 0..6), any::<u8>()).prop_map(|(scores, attesters)| Op::Propose { scores, attesters }),
        3 => k.clone().prop_map(|from| Op::Attest { from }),
        2 => (1u8..8).prop_map(|n| Op::Blocks { n }),
    ]
}

fn small_genesis() -> Genesis {
    let mut g = genesis(KEYS);
    for i in 0..KEYS {
        g.balances.push(ledger::genesis::GenesisBalance {
            address: hot(i).address(),
            amount: 10 * TOKEN,
        });
    }
    g.params.epoch_length = 4;
    g.params.unbonding_blocks = 3;
    g.params.delegate_cooldown_blocks = 2;
    g.params.subnet_base_fee = 5 * TOKEN;
    g.params.missed_proposal_loss = 150_000;
    g.params.max_low_node_epochs = 2;
    g.params.promotion_epochs = 1;
    g
}

/// Subnet 1's current validator's hotkey index, if any.
fn validator_hot(c: &SimChain) -> Option<u8> {
    let rec = epochs::record(&c.state, 1).ok()??;
    if rec.epoch != epochs::epoch_of(&c.runtime, c.head.height + 1) {
        return None;
    }
    let n = nodes::load(&c.state, 1, rec.validator).ok()?;
    (0..KEYS).find(|&i| hot(i).address() == n.hotkey)
}

fn to_calls(c: &SimChain, op: &Op) -> Vec<(ledger::Keypair, Call)> {
    let mut out = vec![];
    if let Op::Propose { attesters, .. } = op {
        if let Some(one) = to_call(c, op) {
            out.push(one);
            for i in 0..KEYS {
                if attesters & (1 << i) != 0 {
                    out.push((hot(i), Call::Attest { subnet: 1 }));
                }
            }
        }
        return out;
    }
    out.extend(to_call(c, op));
    out
}

fn to_call(c: &SimChain, op: &Op) -> Option<(ledger::Keypair, Call)> {
    let t = |x: u16| x as u128 * TOKEN / 10;
    Some(match op {
        Op::Transfer { from, to, amount } => (
            key(*from),
            Call::Transfer {
                to: key(*to).address(),
                amount: *amount as u128 * TOKEN / 100,
            },
        ),
        Op::RegisterSubnet { from, min } => (
            key(*from),
            Call::RegisterSubnet {
                name: format!("m{}", c.head.height),
                min_stake: *min as u128 * TOKEN,
                max_stake: 40 * TOKEN,
            },
        ),
        Op::ActivateSubnet { from } => (key(*from), Call::ActivateSubnet { subnet: 1 }),
        Op::PauseToggle { from } => {
            let s = ledger::runtime::subnets::load(&c.state, 1).ok()?;
            let call = if s.state == ledger::types::SubnetState::Paused {
                Call::UnpauseSubnet { subnet: 1 }
            } else {
                Call::PauseSubnet { subnet: 1 }
            };
            (key(*from), call)
        }
        Op::RegisterNode { from, stake } => (
            key(*from),
            Call::RegisterNode {
                subnet: 1,
                hotkey: hot(*from).address(),
                peer_id: format!("peer{from}"),
                stake: t(*stake),
            },
        ),
        Op::AddStake { from, node, amount } => (
            key(*from),
            Call::AddStake {
                subnet: 1,
                node: *node as u32,
                amount: t(*amount),
            },
        ),
        Op::RemoveStake { from, node, amount } => (
            key(*from),
            Call::RemoveStake {
                subnet: 1,
                node: *node as u32,
                amount: t(*amount),
            },
        ),
        Op::Claim { from } => (key(*from), Call::Claim),
        Op::Delegate { from, amount } => (
            key(*from),
            Call::Delegate {
                subnet: 1,
                amount: t(*amount),
            },
        ),
        Op::Undelegate { from, shares } => (
            key(*from),
            Call::Undelegate {
                subnet: 1,
                shares: t(*shares),
            },
        ),
        Op::Propose { scores, .. } => {
            let v = validator_hot(c)?;
            let scoreable: Vec<u32> = nodes::all(&c.state, 1)
                .ok()?
                .into_iter()
                .filter(|(_, n)| n.class >= NodeClass::Included)
                .map(|(id, _)| id)
                .collect();
            let scores = scoreable
                .iter()
                .zip(scores.iter().chain(std::iter::repeat(&1)))
                .map(|(&node, &s)| NodeScore {
                    node,
                    score: s as u64,
                })
                .collect();
            (hot(v), Call::ProposeAttestation { subnet: 1, scores })
        }
        Op::Attest { from } => (hot(*from), Call::Attest { subnet: 1 }),
        Op::Blocks { .. } => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn issuance_invariant_and_replay_determinism(ops in proptest::collection::vec(op(), 1..60)) {
        let g = small_genesis();
        let mut chain = SimChain::new(&g).unwrap();
        let mut blocks = vec![];
        let mut roots = vec![];
        // Prelude: an active subnet with three founding validators, so the
        // random part runs through elections, proposals and emission.
        let mut prelude = vec![chain.tx(&key(0), Call::RegisterSubnet { name: "m".into(), min_stake: TOKEN, max_stake: 40 * TOKEN })];
        for i in 1..=3u8 {
            prelude.push(chain.tx(&key(i), Call::RegisterNode { subnet: 1, hotkey: hot(i).address(), peer_id: format!("peer{i}"), stake: 10 * TOKEN }));
        }
        let (b, rejected) = chain.produce(prelude).unwrap();
        prop_assert!(rejected.is_empty());
        roots.push(b.header.state_root);
        blocks.push(b);
        let (b, rejected) = chain.produce(vec![chain.tx(&key(0), Call::ActivateSubnet { subnet: 1 })]).unwrap();
        prop_assert!(rejected.is_empty());
        roots.push(b.header.state_root);
        blocks.push(b);
        // Two ops per block on average exercises multi-tx blocks and nonces.
        let mut pending: Vec<ledger::SignedTx> = vec![];
        let mut nonces = std::collections::BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            if let Op::Blocks { n } = op {
                for _ in 0..*n {
                    let (b, _) = chain.produce(std::mem::take(&mut pending)).unwrap();
                    nonces.clear();
                    roots.push(b.header.state_root);
                    blocks.push(b);
                    let a = chain.audit();
                    prop_assert!(a.holds(), "{a:?}");
                }
                continue;
            }
            for (k, call) in to_calls(&chain, op) {
                let n = nonces.entry(k.address()).or_insert_with(|| chain.nonce(&k.address()));
                pending.push(chain.tx_at(&k, *n, call));
                *n += 1;
            }
            if i % 2 == 1 {
                let (b, _) = chain.produce(std::mem::take(&mut pending)).unwrap();
                nonces.clear();
                roots.push(b.header.state_root);
                blocks.push(b);
                let a = chain.audit();
                prop_assert!(a.holds(), "{a:?}");
            }
        }
        let mut replay = SimChain::new(&g).unwrap();
        for (b, root) in blocks.iter().zip(&roots) {
            replay.import(b).unwrap();
            prop_assert_eq!(replay.root(), *root);
        }
        prop_assert_eq!(&replay.state, &chain.state);
    }
}
