//! Chain validators: bonding with a consensus key, unbonding through the
//! unbonding queue, and the committee each chain epoch records (top N by
//! bond at the end of the previous epoch).

mod common;

use common::{genesis, key};
use ledger::TOKEN;
use ledger::genesis::GenesisValidator;
use ledger::runtime::validators;
use ledger::sim::SimChain;
use ledger::{Call, TxError};

fn chain() -> SimChain {
    let mut g = genesis(8);
    g.params.committee_size = 3;
    g.params.chain_epoch_blocks = 10;
    g.validators = (0..3)
        .map(|i| GenesisValidator {
            address: key(i).address(),
            consensus_key: key(i).address(),
            bond: (10 + i as u128) * TOKEN,
        })
        .collect();
    SimChain::new(&g).unwrap()
}

fn members(c: &SimChain, epoch: u64) -> Vec<u8> {
    validators::committee(&c.state, epoch)
        .unwrap()
        .unwrap()
        .iter()
        .map(|v| (0..8).find(|i| key(*i).address() == v.address).unwrap())
        .collect()
}

#[test]
fn genesis_committee_is_the_top_bonds() {
    let c = chain();
    assert_eq!(members(&c, 0), vec![2, 1, 0]);
    assert!(c.audit().holds(), "bonds count in issuance");
}

#[test]
fn a_larger_bond_joins_the_next_epochs_committee() {
    let mut c = chain();
    let k5 = key(5);
    c.exec(
        &k5,
        Call::BondValidator {
            consensus_key: key(6).address(),
            amount: 50 * TOKEN,
        },
    )
    .unwrap();
    assert!(c.audit().holds());
    // Epoch 1's committee is recorded when its first block (height 10) runs.
    assert!(validators::committee(&c.state, 1).unwrap().is_none());
    c.advance_to(10).unwrap();
    assert_eq!(members(&c, 1), vec![5, 2, 1]);
    assert_eq!(members(&c, 0), vec![2, 1, 0], "history is kept");
}

#[test]
fn bond_rules() {
    let mut c = chain();
    // A key held by another validator is refused.
    let e = c
        .exec(
            &key(5),
            Call::BondValidator {
                consensus_key: key(0).address(),
                amount: 5 * TOKEN,
            },
        )
        .unwrap_err();
    assert!(matches!(e, TxError::InvalidArgument(_)), "{e}");
    // Below the minimum bond.
    let e = c
        .exec(
            &key(5),
            Call::BondValidator {
                consensus_key: key(5).address(),
                amount: TOKEN / 2,
            },
        )
        .unwrap_err();
    assert!(matches!(e, TxError::InvalidAmount(_)), "{e}");
    // Not an Ed25519 point.
    let bad = (0..=255u8)
        .map(|i| [i; 32])
        .find(|b| ed25519_dalek::VerifyingKey::from_bytes(b).is_err())
        .unwrap();
    let e = c
        .exec(
            &key(5),
            Call::BondValidator {
                consensus_key: ledger::Address(bad),
                amount: 5 * TOKEN,
            },
        )
        .unwrap_err();
    assert!(matches!(e, TxError::InvalidArgument(_)), "{e}");
}

#[test]
fn unbonding_all_leaves_and_the_bond_is_claimable_later() {
    let mut c = chain();
    let k0 = key(0);
    let before = c.state.entries.len();
    c.exec(&k0, Call::UnbondValidator { amount: 10 * TOKEN })
        .unwrap();
    assert!(validators::load(&c.state, &k0.address()).unwrap().is_none());
    assert!(c.audit().holds());
    assert!(c.state.entries.len() < before + 2);
    let unlock = c.head.height + c.runtime.params.unbonding_blocks;
    c.advance_to(unlock).unwrap();
    let bal = ledger::runtime::accounts::account(&c.state, &k0.address())
        .unwrap()
        .balance;
    c.exec(&k0, Call::Claim).unwrap();
    let after = ledger::runtime::accounts::account(&c.state, &k0.address())
        .unwrap()
        .balance;
    assert_eq!(after + c.runtime.params.tx_fee, bal + 10 * TOKEN);
    // The freed key can be bonded again by another account.
    c.exec(
        &key(4),
        Call::BondValidator {
            consensus_key: k0.address(),
            amount: 2 * TOKEN,
        },
    )
    .unwrap();
}
