//! Subnets: registration with a doubling, decaying fee; activation with the
//! minimum node count; pause and unpause by the owner; removal.

use serde::{Deserialize, Serialize};

use super::{BlockContext, Runtime, accounts, math, nodes, vaults};
use crate::error::{StateError, TxError};
use crate::genesis::Params;
use crate::state::{State, StateRead, get_value, keys, put_value, scan_values};
use crate::types::{Address, Amount, NodeClass, Subnet, SubnetId, SubnetState};

/// The last registration's fee and height; the next fee derives from them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetFeeState {
    /// Fee paid by the last registration.
    pub last_fee: Amount,
    /// Height of the last registration.
    pub last_height: u64,
}

/// The registration fee at `height`: twice the last fee right after a
/// registration, decaying linearly to `subnet_base_fee` over
/// `subnet_fee_decay_blocks`; never below the base.
pub fn registration_fee(
    p: &Params,
    s: &(impl StateRead + ?Sized),
    height: u64,
) -> Result<Amount, StateError> {
    let st: Option<SubnetFeeState> = get_value(s, keys::SUBNET_FEE)?;
    let Some(st) = st else {
        return Ok(p.subnet_base_fee);
    };
    let peak = st.last_fee.saturating_mul(2).max(p.subnet_base_fee);
    let elapsed = height.saturating_sub(st.last_height);
    if elapsed >= p.subnet_fee_decay_blocks {
        return Ok(p.subnet_base_fee);
    }
    let remaining = (p.subnet_fee_decay_blocks - elapsed) as u128;
    let extra = math::mul_div(
        peak - p.subnet_base_fee,
        remaining,
        p.subnet_fee_decay_blocks as u128,
    )
    .unwrap_or(0);
    Ok(p.subnet_base_fee.saturating_add(extra))
}

/// Loads a subnet or fails with `UnknownSubnet`.
pub fn load(s: &(impl StateRead + ?Sized), id: SubnetId) -> Result<Subnet, TxError> {
    get_value(s, &keys::subnet(id))?.ok_or(TxError::UnknownSubnet(id))
}

/// Stores a subnet.
pub fn store(s: &mut (impl State + ?Sized), subnet: &Subnet) {
    put_value(s, keys::subnet(subnet.id), subnet);
}

fn owner_only(subnet: &Subnet, signer: &Address) -> Result<(), TxError> {
    if subnet.owner != *signer {
        return Err(TxError::NotAuthorized(format!(
            "only the owner {} may do this to subnet {}",
            subnet.owner, subnet.id
        )));
    }
    Ok(())
}

/// `RegisterSubnet`: burns the current fee and creates the subnet in state Registered.
pub fn register(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    signer: &Address,
    name: &str,
    min_stake: Amount,
    max_stake: Amount,
) -> Result<SubnetId, TxError> {
    let p = &rt.params;
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
        return Err(TxError::InvalidArgument(
            "subnet name must be 1..=128 printable bytes".into(),
        ));
    }
    if min_stake < p.min_stake_floor || max_stake > p.max_stake_ceiling || min_stake > max_stake {
        return Err(TxError::InvalidArgument(format!(
            "need {} <= min_stake <= max_stake <= {}",
            p.min_stake_floor, p.max_stake_ceiling
        )));
    }
    if s.get(&keys::subnet_name(name))?.is_some() {
        return Err(TxError::DuplicateSubnetName(name.to_string()));
    }
    let fee = registration_fee(p, s, ctx.height)?;
    accounts::debit(s, signer, fee).map_err(|e| match e {
        TxError::InsufficientBalance { have, .. } => TxError::InsufficientBalance {
            need: fee.saturating_add(p.tx_fee),
            have: have.saturating_add(p.tx_fee),
        },
        e => e,
    })?;
    accounts::burn(s, fee)?;
    put_value(
        s,
        keys::SUBNET_FEE.to_vec(),
        &SubnetFeeState {
            last_fee: fee,
            last_height: ctx.height,
        },
    );
    let id: SubnetId = get_value(s, keys::NEXT_SUBNET)?.unwrap_or(1);
    put_value(s, keys::NEXT_SUBNET.to_vec(), &(id + 1));
    put_value(s, keys::subnet_name(name), &id);
    store(
        s,
        &Subnet {
            id,
            name: name.to_string(),
            owner: *signer,
            state: SubnetState::Registered,
            registered_at: ctx.height,
            activated_at: None,
            paused_at: None,
            min_stake,
            max_stake,
            node_count: 0,
            next_node_id: 1,
            reputation: p.subnet_initial_reputation,
            low_node_epochs: 0,
        },
    );
    tracing::debug!(subnet = id, name, fee = %fee, "subnet registered");
    Ok(id)
}

/// `ActivateSubnet`: needs `min_subnet_nodes`; the nodes registered so far
/// become the founding Validator set, so the first epoch can elect a validator.
pub fn activate(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    signer: &Address,
    id: SubnetId,
) -> Result<(), TxError> {
    let mut subnet = load(s, id)?;
    owner_only(&subnet, signer)?;
    if subnet.state != SubnetState::Registered {
        return Err(TxError::WrongSubnetState {
            subnet: id,
            state: subnet.state,
            why: "only a Registered subnet can be activated".into(),
        });
    }
    if subnet.node_count < rt.params.min_subnet_nodes {
        return Err(TxError::NotEnoughNodes {
            needed: rt.params.min_subnet_nodes,
            have: subnet.node_count,
        });
    }
    for (_, mut node) in nodes::all(s, id)? {
        node.class = NodeClass::Validator;
        nodes::store(s, &node);
    }
    subnet.state = SubnetState::Active;
    subnet.activated_at = Some(ctx.height);
    store(s, &subnet);
    Ok(())
}

/// `PauseSubnet`: stops epochs (no election, no emission) until unpaused.
pub fn pause(
    s: &mut dyn State,
    ctx: &BlockContext,
    signer: &Address,
    id: SubnetId,
) -> Result<(), TxError> {
    let mut subnet = load(s, id)?;
    owner_only(&subnet, signer)?;
    if subnet.state != SubnetState::Active {
        return Err(TxError::WrongSubnetState {
            subnet: id,
            state: subnet.state,
            why: "only an Active subnet can be paused".into(),
        });
    }
    subnet.state = SubnetState::Paused;
    subnet.paused_at = Some(ctx.height);
    super::epochs::clear(s, id)?;
    store(s, &subnet);
    Ok(())
}

/// `UnpauseSubnet`: epochs resume at the next epoch boundary.
pub fn unpause(s: &mut dyn State, signer: &Address, id: SubnetId) -> Result<(), TxError> {
    let mut subnet = load(s, id)?;
    owner_only(&subnet, signer)?;
    if subnet.state != SubnetState::Paused {
        return Err(TxError::WrongSubnetState {
            subnet: id,
            state: subnet.state,
            why: "only a Paused subnet can be unpaused".into(),
        });
    }
    subnet.state = SubnetState::Active;
    subnet.paused_at = None;
    store(s, &subnet);
    Ok(())
}

/// Removes a subnet: every node's stake and every delegator's vault value
/// go to unbonding, then the subnet's records are deleted.
pub fn remove(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    id: SubnetId,
    why: &str,
) -> Result<(), StateError> {
    let Some(subnet) = get_value::<Subnet>(s, &keys::subnet(id))? else {
        return Ok(());
    };
    for (_, node) in nodes::all(s, id)? {
        nodes::delete_and_unbond(rt, s, ctx, &node)?;
    }
    vaults::dissolve(rt, s, ctx, id)?;
    super::epochs::clear(s, id)?;
    s.delete(&keys::subnet_name(&subnet.name));
    s.delete(&keys::subnet(id));
    tracing::info!(subnet = id, why, "subnet removed");
    Ok(())
}

/// Every subnet, in id order.
pub fn all(s: &(impl StateRead + ?Sized)) -> Result<Vec<Subnet>, StateError> {
    Ok(scan_values::<Subnet>(s, keys::SUBNET_PREFIX)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}
