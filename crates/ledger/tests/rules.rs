//! One test (or a few) per runtime rule, on the in-memory chain.

mod common;

use common::*;
use ledger::runtime::{BlockContext, accounts, nodes, queries, subnets, vaults};
use ledger::state::Overlay;
use ledger::types::{NodeClass, NodeScore, SubnetState};
use ledger::{Call, Hash32, TOKEN, Tx, TxError};

fn refused_changes_nothing(w: &World, tx: &ledger::SignedTx) -> TxError {
    let mut o = Overlay::new(&w.chain.state);
    let ctx = BlockContext {
        height: w.chain.head.height + 1,
        parent_hash: w.chain.head.hash(),
    };
    let e = w.chain.runtime.apply_tx(&mut o, &ctx, tx).unwrap_err();
    assert!(
        o.changes().is_empty(),
        "a refused tx wrote {:?}",
        o.changes()
    );
    e
}

#[test]
fn transfer_moves_balance_and_burns_fee() {
    let mut w = world(0, false);
    let (a, b) = (key(1), key(2));
    let fee = w.chain.runtime.params.tx_fee;
    let before = w.chain.audit().issuance;
    w.chain
        .exec(
            &a,
            Call::Transfer {
                to: b.address(),
                amount: 5 * TOKEN,
            },
        )
        .unwrap();
    assert_eq!(w.balance(&a), 1_000_000 * TOKEN - 5 * TOKEN - fee);
    assert_eq!(w.balance(&b), 1_000_000 * TOKEN + 5 * TOKEN);
    assert_eq!(w.chain.audit().issuance, before - fee);
    assert!(w.chain.audit().holds());
    assert_eq!(w.chain.nonce(&a.address()), 1);
}

#[test]
fn bad_transactions_are_refused_and_change_nothing() {
    let w = world(3, true);
    let a = key(1);
    let to = key(2).address();
    // Bad nonce.
    let tx = w.chain.tx_at(&a, 5, Call::Transfer { to, amount: 1 });
    assert_eq!(
        refused_changes_nothing(&w, &tx),
        TxError::BadNonce {
            expected: 0,
            got: 5
        }
    );
    // Bad signature: signed by someone else.
    let mut tx = w.chain.tx(&a, Call::Transfer { to, amount: 1 });
    tx.tx.signer = key(3).address();
    assert_eq!(refused_changes_nothing(&w, &tx), TxError::BadSignature);
    // Bad signature: wrong chain id.
    let tx = Tx {
        signer: a.address(),
        nonce: 0,
        call: Call::Transfer { to, amount: 1 },
    }
    .sign(&a, "other-chain");
    assert_eq!(refused_changes_nothing(&w, &tx), TxError::BadSignature);
    // Insufficient balance.
    let tx = w.chain.tx(
        &a,
        Call::Transfer {
            to,
            amount: 2_000_000 * TOKEN,
        },
    );
    assert!(matches!(
        refused_changes_nothing(&w, &tx),
        TxError::InsufficientBalance { .. }
    ));
    // An account with nothing cannot pay the fee.
    let pauper = key(99);
    let tx = w.chain.tx(&pauper, Call::Claim);
    assert!(matches!(
        refused_changes_nothing(&w, &tx),
        TxError::InsufficientBalance { .. }
    ));
    // Duplicate peer id.
    let tx = w.chain.tx(
        &cold(9),
        Call::RegisterNode {
            subnet: 1,
            hotkey: hot(9).address(),
            peer_id: "peer0".into(),
            stake: 100 * TOKEN,
        },
    );
    assert_eq!(
        refused_changes_nothing(&w, &tx),
        TxError::DuplicatePeerId("peer0".into())
    );
    // Duplicate hotkey.
    let tx = w.chain.tx(
        &cold(9),
        Call::RegisterNode {
            subnet: 1,
            hotkey: hot(0).address(),
            peer_id: "peerx".into(),
            stake: 100 * TOKEN,
        },
    );
    assert!(matches!(
        refused_changes_nothing(&w, &tx),
        TxError::DuplicateHotkey(_)
    ));
    // Stake out of range, both sides.
    for stake in [TOKEN, 2_000 * TOKEN] {
        let tx = w.chain.tx(
            &cold(9),
            Call::RegisterNode {
                subnet: 1,
                hotkey: hot(9).address(),
                peer_id: "peerx".into(),
                stake,
            },
        );
        assert!(matches!(
            refused_changes_nothing(&w, &tx),
            TxError::StakeOutOfRange { .. }
        ));
    }
    // Wrong class: a Validator-only call from a node that is not one.
    // (Nobody proposed yet, so first check the class rule on a fresh node.)
    let tx = w.chain.tx(
        &cold(0),
        Call::AddStake {
            subnet: 1,
            node: 1,
            amount: 950 * TOKEN,
        },
    );
    assert!(matches!(
        refused_changes_nothing(&w, &tx),
        TxError::StakeOutOfRange { .. }
    ));
    // Not the coldkey.
    let tx = w.chain.tx(
        &cold(1),
        Call::AddStake {
            subnet: 1,
            node: 1,
            amount: TOKEN,
        },
    );
    assert!(matches!(
        refused_changes_nothing(&w, &tx),
        TxError::NotAuthorized(_)
    ));
    // Unknown subnet.
    let tx = w.chain.tx(
        &a,
        Call::Delegate {
            subnet: 77,
            amount: TOKEN,
        },
    );
    assert_eq!(refused_changes_nothing(&w, &tx), TxError::UnknownSubnet(77));
}

#[test]
fn registration_fee_doubles_and_decays() {
    let mut w = world(0, false);
    let p = w.chain.runtime.params.clone();
    let base = p.subnet_base_fee;
    let h = w.chain.head.height;
    let fee_at = |w: &World, h| subnets::registration_fee(&p, &w.chain.state, h).unwrap();
    // Subnet 1 was registered at height 1 and paid the base fee.
    assert_eq!(fee_at(&w, 1), 2 * base);
    assert_eq!(
        fee_at(&w, 1 + p.subnet_fee_decay_blocks / 2),
        base + base / 2
    );
    assert_eq!(fee_at(&w, 1 + p.subnet_fee_decay_blocks), base);
    let before = w.balance(&key(1));
    let next = fee_at(&w, h + 1);
    w.chain
        .exec(
            &key(1),
            Call::RegisterSubnet {
                name: "model-b".into(),
                min_stake: TOKEN,
                max_stake: TOKEN * 10,
            },
        )
        .unwrap();
    assert_eq!(w.balance(&key(1)), before - next - p.tx_fee);
    // The next registration right after costs double what was just paid.
    assert_eq!(fee_at(&w, w.chain.head.height), 2 * next);
    // Names are unique.
    assert_eq!(
        w.chain.exec(
            &key(2),
            Call::RegisterSubnet {
                name: "model-b".into(),
                min_stake: TOKEN,
                max_stake: TOKEN
            }
        ),
        Err(TxError::DuplicateSubnetName("model-b".into()))
    );
    assert!(w.chain.audit().holds());
}

#[test]
fn activation_needs_three_nodes_and_founders_become_validators() {
    let mut w = world(2, false);
    assert_eq!(
        w.chain
            .exec(&w.owner.clone(), Call::ActivateSubnet { subnet: 1 }),
        Err(TxError::NotEnoughNodes { needed: 3, have: 2 })
    );
    w.chain
        .exec(
            &cold(2),
            Call::RegisterNode {
                subnet: 1,
                hotkey: hot(2).address(),
                peer_id: "peer2".into(),
                stake: 100 * TOKEN,
            },
        )
        .unwrap();
    assert!(matches!(
        w.chain.exec(&key(5), Call::ActivateSubnet { subnet: 1 }),
        Err(TxError::NotAuthorized(_))
    ));
    w.chain
        .exec(&w.owner.clone(), Call::ActivateSubnet { subnet: 1 })
        .unwrap();
    let s = subnets::load(&w.chain.state, 1).unwrap();
    assert_eq!(s.state, SubnetState::Active);
    for id in 1..=3 {
        assert_eq!(w.node(id).unwrap().class, NodeClass::Validator);
    }
    // The first epoch boundary elects one of them.
    w.next_epoch();
    let rec = w.record().unwrap();
    assert!((1..=3).contains(&rec.validator));
}

#[test]
fn pause_stops_epochs_and_only_owner_may() {
    let mut w = world(3, true);
    w.next_epoch();
    assert!(w.record().is_some());
    assert!(matches!(
        w.chain.exec(&key(3), Call::PauseSubnet { subnet: 1 }),
        Err(TxError::NotAuthorized(_))
    ));
    w.chain
        .exec(&w.owner.clone(), Call::PauseSubnet { subnet: 1 })
        .unwrap();
    assert!(w.record().is_none());
    w.next_epoch();
    assert!(w.record().is_none(), "no election while paused");
    assert!(matches!(
        w.chain.exec(
            &cold(5),
            Call::RegisterNode {
                subnet: 1,
                hotkey: hot(5).address(),
                peer_id: "p5".into(),
                stake: 100 * TOKEN
            }
        ),
        Err(TxError::WrongSubnetState { .. })
    ));
    w.chain
        .exec(&w.owner.clone(), Call::UnpauseSubnet { subnet: 1 })
        .unwrap();
    w.next_epoch();
    assert!(w.record().is_some());
}

#[test]
fn paused_too_long_is_removed_and_stake_unbonds() {
    let mut g = genesis(10);
    g.params.max_pause_blocks = 15;
    let mut w = world_with(g, 3, true);
    w.chain
        .exec(&w.owner.clone(), Call::PauseSubnet { subnet: 1 })
        .unwrap();
    w.next_epoch();
    assert!(subnets::load(&w.chain.state, 1).is_ok());
    w.next_epoch();
    w.next_epoch();
    assert_eq!(
        subnets::load(&w.chain.state, 1),
        Err(TxError::UnknownSubnet(1))
    );
    assert!(w.node(1).is_none());
    let unb = nodes::unbonding(&w.chain.state, &cold(0).address()).unwrap();
    assert_eq!(unb.iter().map(|u| u.amount).sum::<u128>(), 100 * TOKEN);
    assert!(w.chain.audit().holds());
    // The peer id is free again.
    assert!(
        queries::proof_of_stake(&w.chain.state, 1, "peer0", NodeClass::Registered, 0)
            .unwrap()
            .node
            .is_none()
    );
}

#[test]
fn registered_subnet_not_activated_in_time_is_removed() {
    let mut g = genesis(10);
    g.params.max_registration_blocks = 12;
    let mut w = world_with(g, 2, false);
    w.next_epoch();
    w.next_epoch();
    assert!(subnets::load(&w.chain.state, 1).is_err());
    assert!(w.chain.audit().holds());
}

#[test]
fn stake_bounds_unstake_unbond_and_claim() {
    let mut w = world(3, true);
    let c = cold(0);
    w.chain
        .exec(
            &c,
            Call::AddStake {
                subnet: 1,
                node: 1,
                amount: 50 * TOKEN,
            },
        )
        .unwrap();
    assert_eq!(w.node(1).unwrap().stake, 150 * TOKEN);
    // Leaving less than the minimum is refused.
    assert!(matches!(
        w.chain.exec(
            &c,
            Call::RemoveStake {
                subnet: 1,
                node: 1,
                amount: 145 * TOKEN
            }
        ),
        Err(TxError::StakeOutOfRange { .. })
    ));
    w.chain
        .exec(
            &c,
            Call::RemoveStake {
                subnet: 1,
                node: 1,
                amount: 40 * TOKEN,
            },
        )
        .unwrap();
    let unlock = w.chain.head.height + w.chain.runtime.params.unbonding_blocks;
    assert_eq!(w.node(1).unwrap().stake, 110 * TOKEN);
    assert_eq!(w.chain.exec(&c, Call::Claim), Err(TxError::NothingToClaim));
    w.chain.advance_to(unlock - 1).unwrap();
    let before = w.balance(&c);
    w.chain.exec(&c, Call::Claim).unwrap();
    assert_eq!(
        w.balance(&c),
        before + 40 * TOKEN - w.chain.runtime.params.tx_fee
    );
    // Unstaking everything deregisters the node.
    w.chain
        .exec(
            &c,
            Call::RemoveStake {
                subnet: 1,
                node: 1,
                amount: 110 * TOKEN,
            },
        )
        .unwrap();
    assert!(w.node(1).is_none());
    assert_eq!(subnets::load(&w.chain.state, 1).unwrap().node_count, 2);
    assert!(w.chain.audit().holds());
}

#[test]
fn class_progression_and_promotion_after_n_epochs_in_consensus() {
    let mut w = world(3, true);
    w.chain
        .exec(
            &cold(3),
            Call::RegisterNode {
                subnet: 1,
                hotkey: hot(3).address(),
                peer_id: "peer3".into(),
                stake: 100 * TOKEN,
            },
        )
        .unwrap();
    assert_eq!(w.node(4).unwrap().class, NodeClass::Registered);
    let promotion = w.chain.runtime.params.promotion_epochs;
    let mut classes = vec![];
    for _ in 0..(2 + promotion + 1) {
        w.next_epoch();
        classes.push(w.node(4).unwrap().class);
        // Honest epoch: the validator scores everyone scoreable, all attest.
        let rec = w.record().unwrap();
        let scoreable: Vec<_> = (1..=4)
            .filter(|id| w.node(*id).unwrap().class >= NodeClass::Included)
            .map(|id| NodeScore {
                node: id,
                score: 10,
            })
            .collect();
        // Node 4 cannot attest before it is a Validator.
        if w.node(4).unwrap().class != NodeClass::Validator {
            let e = w.chain.exec(&hot(3), Call::Attest { subnet: 1 });
            assert!(
                matches!(e, Err(TxError::WrongClass { .. }) | Err(TxError::Epoch(_))),
                "{e:?}"
            );
        }
        let vhot = hot((rec.validator - 1) as u8);
        w.chain
            .exec(
                &vhot,
                Call::ProposeAttestation {
                    subnet: 1,
                    scores: scoreable,
                },
            )
            .unwrap();
        for id in 1..=4u32 {
            if id != rec.validator && w.node(id).unwrap().class == NodeClass::Validator {
                w.chain
                    .exec(&hot((id - 1) as u8), Call::Attest { subnet: 1 })
                    .unwrap();
            }
        }
    }
    assert_eq!(classes[0], NodeClass::Idle);
    assert_eq!(classes[1], NodeClass::Included);
    assert_eq!(classes[1 + promotion as usize], NodeClass::Validator);
    assert_eq!(classes[promotion as usize], NodeClass::Included);
}

#[test]
fn propose_only_by_elected_validator_once_and_attest_once() {
    let mut w = world(3, true);
    w.next_epoch();
    let rec = w.record().unwrap();
    let v = rec.validator;
    let other = if v == 1 { 2 } else { 1 };
    let scores = vec![NodeScore { node: 1, score: 1 }];
    assert!(matches!(
        w.chain.exec(
            &hot((other - 1) as u8),
            Call::ProposeAttestation {
                subnet: 1,
                scores: scores.clone()
            }
        ),
        Err(TxError::NotAuthorized(_))
    ));
    assert!(matches!(
        w.chain
            .exec(&hot((other - 1) as u8), Call::Attest { subnet: 1 }),
        Err(TxError::Epoch(_))
    ));
    // Scores must name existing nodes, once each.
    assert!(matches!(
        w.chain.exec(
            &hot((v - 1) as u8),
            Call::ProposeAttestation {
                subnet: 1,
                scores: vec![
                    NodeScore { node: 1, score: 1 },
                    NodeScore { node: 1, score: 2 }
                ]
            }
        ),
        Err(TxError::InvalidArgument(_))
    ));
    assert!(matches!(
        w.chain.exec(
            &hot((v - 1) as u8),
            Call::ProposeAttestation {
                subnet: 1,
                scores: vec![NodeScore { node: 9, score: 1 }]
            }
        ),
        Err(TxError::UnknownNode { .. })
    ));
    let bal = w.balance(&hot((v - 1) as u8));
    w.chain
        .exec(
            &hot((v - 1) as u8),
            Call::ProposeAttestation {
                subnet: 1,
                scores: scores.clone(),
            },
        )
        .unwrap();
    assert_eq!(
        w.balance(&hot((v - 1) as u8)),
        bal,
        "consensus calls are free"
    );
    assert!(matches!(
        w.chain.exec(
            &hot((v - 1) as u8),
            Call::ProposeAttestation { subnet: 1, scores }
        ),
        Err(TxError::Epoch(_))
    ));
    w.chain
        .exec(&hot((other - 1) as u8), Call::Attest { subnet: 1 })
        .unwrap();
    assert!(matches!(
        w.chain
            .exec(&hot((other - 1) as u8), Call::Attest { subnet: 1 }),
        Err(TxError::Epoch(_))
    ));
    // A key that is no node's hotkey.
    assert!(matches!(
        w.chain.exec(&key(7), Call::Attest { subnet: 1 }),
        Err(TxError::NotAuthorized(_))
    ));
}

#[test]
fn attested_epoch_pays_owner_vault_and_nodes_by_score() {
    let mut w = world(3, true);
    let p = w.chain.runtime.params.clone();
    // A delegator so the delegators' cut goes to the vault.
    w.chain
        .exec(
            &key(5),
            Call::Delegate {
                subnet: 1,
                amount: 100 * TOKEN,
            },
        )
        .unwrap();
    w.next_epoch();
    let rec = w.record().unwrap();
    let v = rec.validator;
    let scores = vec![
        NodeScore { node: 1, score: 1 },
        NodeScore { node: 2, score: 3 },
        NodeScore { node: 3, score: 0 },
    ];
    w.chain
        .exec(
            &hot((v - 1) as u8),
            Call::ProposeAttestation { subnet: 1, scores },
        )
        .unwrap();
    for id in 1..=3u32 {
        if id != v {
            w.chain
                .exec(&hot((id - 1) as u8), Call::Attest { subnet: 1 })
                .unwrap();
        }
    }
    let owner_before = w.balance(&w.owner);
    let issuance_before = w.chain.audit().issuance;
    let stakes: Vec<_> = (1..=3).map(|i| w.node(i).unwrap().stake).collect();
    let reps: Vec<_> = (1..=3).map(|i| w.node(i).unwrap().reputation).collect();
    w.next_epoch();
    let e = p.emission_per_epoch;
    let owner_cut = e / 10;
    let deleg_cut = e / 5;
    let pool = e - owner_cut - deleg_cut;
    assert_eq!(w.balance(&w.owner), owner_before + owner_cut);
    assert_eq!(
        vaults::load(&w.chain.state, 1).unwrap().total_stake,
        100 * TOKEN + deleg_cut
    );
    assert_eq!(w.node(1).unwrap().stake, stakes[0] + pool / 4);
    assert_eq!(w.node(2).unwrap().stake, stakes[1] + pool * 3 / 4);
    assert_eq!(w.node(3).unwrap().stake, stakes[2]);
    assert_eq!(
        w.chain.audit().issuance,
        issuance_before + owner_cut + deleg_cut + pool
    );
    assert_eq!(
        w.node(1).unwrap().reputation,
        reps[0] + p.node_reputation_gain
    );
    assert_eq!(
        w.node(3).unwrap().reputation,
        reps[2] - p.node_zero_score_loss
    );
    assert!(w.chain.audit().holds());
}

#[test]
fn below_threshold_slashes_validator_and_pays_nothing() {
    let mut w = world(4, true);
    let p = w.chain.runtime.params.clone();
    w.next_epoch();
    let v = w.record().unwrap().validator;
    w.chain
        .exec(
            &hot((v - 1) as u8),
            Call::ProposeAttestation {
                subnet: 1,
                scores: vec![NodeScore { node: v, score: 5 }],
            },
        )
        .unwrap();
    // One more attestation: 2 of 4 = 50% < 66%.
    let other = (1..=4u32).find(|i| *i != v).unwrap();
    w.chain
        .exec(&hot((other - 1) as u8), Call::Attest { subnet: 1 })
        .unwrap();
    let before = w.node(v).unwrap();
    let issuance = w.chain.audit().issuance;
    let owner = w.balance(&w.owner);
    w.next_epoch();
    let after = w.node(v).unwrap();
    let slash = before.stake * p.failed_proposal_slash as u128 / 1_000_000;
    assert_eq!(after.stake, before.stake - slash);
    assert_eq!(after.reputation, before.reputation - p.failed_proposal_loss);
    assert_eq!(w.chain.audit().issuance, issuance - slash);
    assert_eq!(w.balance(&w.owner), owner);
    assert_eq!(
        subnets::load(&w.chain.state, 1).unwrap().reputation,
        p.subnet_initial_reputation - p.subnet_reputation_loss
    );
    assert!(w.chain.audit().holds());
}

#[test]
fn missed_proposal_costs_reputation_and_no_emission() {
    let mut w = world(3, true);
    let p = w.chain.runtime.params.clone();
    w.next_epoch();
    let v = w.record().unwrap().validator;
    let before = w.node(v).unwrap().reputation;
    let issuance = w.chain.audit().issuance;
    w.next_epoch();
    assert_eq!(
        w.node(v).unwrap().reputation,
        before - p.missed_proposal_loss
    );
    assert_eq!(w.chain.audit().issuance, issuance);
}

#[test]
fn low_reputation_node_is_removed_and_too_few_nodes_removes_subnet() {
    let mut g = genesis(10);
    g.params.missed_proposal_loss = 450_000;
    g.params.max_low_node_epochs = 1;
    let mut w = world_with(g, 3, true);
    w.next_epoch();
    let v = w.record().unwrap().validator;
    w.next_epoch();
    // 500k - 450k = 50k < 100k minimum: removed, stake unbonding.
    assert!(w.node(v).is_none());
    let unb = nodes::unbonding(&w.chain.state, &cold((v - 1) as u8).address()).unwrap();
    assert_eq!(unb[0].amount, 100 * TOKEN);
    assert_eq!(subnets::load(&w.chain.state, 1).unwrap().node_count, 2);
    // Two nodes < 3: tolerated for max_low_node_epochs, then removed.
    w.next_epoch();
    w.next_epoch();
    w.next_epoch();
    assert!(subnets::load(&w.chain.state, 1).is_err());
    assert!(w.chain.audit().holds());
}

#[test]
fn vault_shares_price_and_cooldown() {
    let mut w = world(3, true);
    let (a, b) = (key(5), key(6));
    w.chain
        .exec(
            &a,
            Call::Delegate {
                subnet: 1,
                amount: 100 * TOKEN,
            },
        )
        .unwrap();
    // Simulate the delegators' cut: raise the vault stake by 50%.
    let mut v = vaults::load(&w.chain.state, 1).unwrap();
    assert_eq!(v.total_shares, 100 * TOKEN);
    v.total_stake += 50 * TOKEN;
    vaults::store(&mut w.chain.state, 1, &v);
    accounts::mint(&mut w.chain.state, 50 * TOKEN).unwrap();
    w.chain
        .exec(
            &b,
            Call::Delegate {
                subnet: 1,
                amount: 150 * TOKEN,
            },
        )
        .unwrap();
    assert_eq!(
        vaults::shares(&w.chain.state, 1, &b.address()).unwrap(),
        100 * TOKEN
    );
    assert!(matches!(
        w.chain.exec(
            &a,
            Call::Undelegate {
                subnet: 1,
                shares: 101 * TOKEN
            }
        ),
        Err(TxError::InsufficientShares { .. })
    ));
    w.chain
        .exec(
            &a,
            Call::Undelegate {
                subnet: 1,
                shares: 100 * TOKEN,
            },
        )
        .unwrap();
    let unb = nodes::unbonding(&w.chain.state, &a.address()).unwrap();
    assert_eq!(unb[0].amount, 150 * TOKEN);
    assert_eq!(
        unb[0].unlock_at,
        w.chain.head.height + w.chain.runtime.params.delegate_cooldown_blocks
    );
    assert_eq!(w.chain.exec(&a, Call::Claim), Err(TxError::NothingToClaim));
    w.chain.advance_to(unb[0].unlock_at).unwrap();
    let before = w.balance(&a);
    w.chain.exec(&a, Call::Claim).unwrap();
    assert_eq!(
        w.balance(&a),
        before + 150 * TOKEN - w.chain.runtime.params.tx_fee
    );
    assert!(w.chain.audit().holds());
}

#[test]
fn proof_of_stake_checks_class_and_stake() {
    let w = world(3, true);
    let pos =
        |peer: &str, class| queries::proof_of_stake(&w.chain.state, 1, peer, class, 0).unwrap();
    assert!(pos("peer0", NodeClass::Validator).staked);
    assert_eq!(pos("peer0", NodeClass::Validator).node.unwrap().id, 1);
    assert!(!pos("nobody", NodeClass::Registered).staked);
    assert!(
        !queries::proof_of_stake(&w.chain.state, 9, "peer0", NodeClass::Registered, 0)
            .unwrap()
            .staked
    );
    let mut w2 = world(3, false);
    w2.chain
        .exec(
            &cold(4),
            Call::RegisterNode {
                subnet: 1,
                hotkey: hot(4).address(),
                peer_id: "peer4".into(),
                stake: 10 * TOKEN,
            },
        )
        .unwrap();
    let p = queries::proof_of_stake(&w2.chain.state, 1, "peer4", NodeClass::Included, 0).unwrap();
    assert!(!p.staked, "Registered < Included");
    assert!(
        queries::proof_of_stake(&w2.chain.state, 1, "peer4", NodeClass::Registered, 0)
            .unwrap()
            .staked
    );
}

#[test]
fn genesis_and_blocks_are_deterministic() {
    let a = world(3, true);
    let b = world(3, true);
    assert_eq!(a.chain.root(), b.chain.root());
    assert_ne!(a.chain.root(), Hash32::ZERO);
    let mut c = world(3, true);
    let mut d = world(3, true);
    c.next_epoch();
    d.next_epoch();
    assert_eq!(c.record(), d.record());
    assert_eq!(c.chain.root(), d.chain.root());
}
