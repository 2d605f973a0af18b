//! Read-only views over a state, shared by RPC, tests and the benchmark.

use super::{IssuanceAudit, accounts, nodes, subnets};
use crate::error::StateError;
use crate::state::{StateRead, keys, scan_values};
use crate::types::{Amount, Node, NodeClass, ProofOfStake, SubnetId, Unbonding, Vault};

/// Sums balances, node stakes, vault stakes and unbonding entries.
pub fn audit_issuance(s: &(impl StateRead + ?Sized)) -> Result<IssuanceAudit, StateError> {
    let sum = |v: &mut Amount, x: Amount| *v = v.saturating_add(x);
    let mut a = IssuanceAudit {
        issuance: accounts::issuance(s)?,
        balances: 0,
        stakes: 0,
        vaults: 0,
        unbonding: 0,
    };
    for (_, acct) in scan_values::<crate::types::Account>(s, keys::ACCOUNT_PREFIX)? {
        sum(&mut a.balances, acct.balance);
    }
    for (_, n) in scan_values::<Node>(s, keys::NODE_PREFIX)? {
        sum(&mut a.stakes, n.stake);
    }
    for (_, v) in scan_values::<crate::types::ChainValidator>(s, keys::CHAIN_VALIDATOR_PREFIX)? {
        sum(&mut a.stakes, v.bond);
    }
    for (_, v) in scan_values::<Vault>(s, keys::VAULT_PREFIX)? {
        sum(&mut a.vaults, v.total_stake);
    }
    for (_, u) in scan_values::<Unbonding>(s, keys::UNBONDING_PREFIX)? {
        sum(&mut a.unbonding, u.amount);
    }
    Ok(a)
}

/// Whether `peer_id` is a node of `subnet` with at least `min_class` and the
/// subnet's minimum stake: the proof-of-stake gate for p2p connections.
pub fn proof_of_stake(
    s: &(impl StateRead + ?Sized),
    subnet: SubnetId,
    peer_id: &str,
    min_class: NodeClass,
    height: u64,
) -> Result<ProofOfStake, StateError> {
    let Ok(sn) = subnets::load(s, subnet) else {
        return Ok(ProofOfStake {
            staked: false,
            node: None,
            height,
        });
    };
    let node = nodes::by_peer(s, subnet, peer_id)?;
    let staked = node
        .as_ref()
        .is_some_and(|n| n.class >= min_class && n.stake >= sn.min_stake);
    Ok(ProofOfStake {
        staked,
        node,
        height,
    })
}
