//! Shared fixtures for the ledger's integration tests.
#![allow(dead_code)]

use ledger::runtime::{epochs, nodes};
use ledger::sim::SimChain;
use ledger::types::{EpochRecord, Node, SubnetId};
use ledger::{Call, Genesis, Keypair, TOKEN};

/// Deterministic keys.
pub fn key(i: u8) -> Keypair {
    Keypair::from_seed([i.wrapping_add(1); 32])
}

/// A genesis funding keys 0..n with 1,000,000 tokens each, short epochs and unbonding.
pub fn genesis(n: u8) -> Genesis {
    let balances: Vec<_> = (0..n)
        .map(|i| (key(i).address(), 1_000_000 * TOKEN))
        .collect();
    let mut g = Genesis::dev(&balances);
    g.chain_id = "test".into();
    g.params.epoch_length = 10;
    g.params.unbonding_blocks = 5;
    g.params.delegate_cooldown_blocks = 7;
    g.params.subnet_fee_decay_blocks = 100;
    g
}

/// Cold keys are 10.., hot keys 40.. (all funded).
pub struct World {
    pub chain: SimChain,
    pub owner: Keypair,
    pub subnet: SubnetId,
}

pub fn cold(i: u8) -> Keypair {
    key(10 + i)
}
pub fn hot(i: u8) -> Keypair {
    key(40 + i)
}

/// A chain with subnet 1 registered by key 0 (min stake 10, max 1,000
/// tokens) and `n` nodes (cold(i)/hot(i), peer `peer{i}`, 100 tokens),
/// activated when `activate`.
pub fn world_with(mut g: Genesis, n: u8, activate: bool) -> World {
    // Fund everyone the fixtures use.
    let mut extra = vec![];
    for i in 0..30u8 {
        extra.push(cold(i).address());
        extra.push(hot(i).address());
    }
    for a in extra {
        if !g.balances.iter().any(|b| b.address == a) {
            g.balances.push(ledger::genesis::GenesisBalance {
                address: a,
                amount: 1_000_000 * TOKEN,
            });
        }
    }
    let mut chain = SimChain::new(&g).unwrap();
    let owner = key(0);
    chain
        .exec(
            &owner,
            Call::RegisterSubnet {
                name: "model-a".into(),
                min_stake: 10 * TOKEN,
                max_stake: 1_000 * TOKEN,
            },
        )
        .unwrap();
    for i in 0..n {
        chain
            .exec(
                &cold(i),
                Call::RegisterNode {
                    subnet: 1,
                    hotkey: hot(i).address(),
                    peer_id: format!("peer{i}"),
                    stake: 100 * TOKEN,
                },
            )
            .unwrap();
    }
    if activate {
        chain
            .exec(&owner, Call::ActivateSubnet { subnet: 1 })
            .unwrap();
    }
    World {
        chain,
        owner,
        subnet: 1,
    }
}

pub fn world(n: u8, activate: bool) -> World {
    world_with(genesis(10), n, activate)
}

impl World {
    pub fn node(&self, id: u32) -> Option<Node> {
        nodes::load(&self.chain.state, self.subnet, id).ok()
    }
    pub fn record(&self) -> Option<EpochRecord> {
        epochs::record(&self.chain.state, self.subnet).unwrap()
    }
    /// Advances to the first block of the next epoch.
    pub fn next_epoch(&mut self) {
        let e = self.chain.runtime.params.epoch_length;
        let target = (epochs::epoch_of(&self.chain.runtime, self.chain.head.height) + 1) * e;
        self.chain.advance_to(target).unwrap();
    }
    pub fn balance(&self, k: &Keypair) -> u128 {
        ledger::runtime::accounts::account(&self.chain.state, &k.address())
            .unwrap()
            .balance
    }
}
