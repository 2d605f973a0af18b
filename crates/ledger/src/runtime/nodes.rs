//! Nodes: registration by a coldkey with a hotkey and a peer id unique in
//! the subnet, stake within the subnet's bounds, unbonding and claims.

use super::{BlockContext, Runtime, accounts, math, subnets};
use crate::error::{StateError, TxError};
use crate::state::{State, StateRead, get_value, keys, put_value, scan_values};
use crate::types::{Address, Amount, Node, NodeClass, NodeId, SubnetId, SubnetState, Unbonding};

/// Longest accepted peer id (libp2p peer ids are about 52 characters).
pub const MAX_PEER_ID_LEN: usize = 128;

/// Loads a node or fails with `UnknownNode`.
pub fn load(s: &(impl StateRead + ?Sized), subnet: SubnetId, id: NodeId) -> Result<Node, TxError> {
    get_value(s, &keys::node(subnet, id))?.ok_or(TxError::UnknownNode { subnet, node: id })
}

/// Stores a node.
pub fn store(s: &mut (impl State + ?Sized), node: &Node) {
    put_value(s, keys::node(node.subnet, node.id), node);
}

/// Every node of a subnet, in id order.
pub fn all(
    s: &(impl StateRead + ?Sized),
    subnet: SubnetId,
) -> Result<Vec<(NodeId, Node)>, StateError> {
    Ok(scan_values::<Node>(s, &keys::node_prefix(subnet))?
        .into_iter()
        .map(|(_, n)| (n.id, n))
        .collect())
}

/// The node of a subnet with this hotkey.
pub fn by_hotkey(
    s: &(impl StateRead + ?Sized),
    subnet: SubnetId,
    hotkey: &Address,
) -> Result<Option<Node>, StateError> {
    match get_value::<NodeId>(s, &keys::node_hotkey(subnet, hotkey))? {
        Some(id) => get_value(s, &keys::node(subnet, id)),
        None => Ok(None),
    }
}

/// The node of a subnet with this peer id.
pub fn by_peer(
    s: &(impl StateRead + ?Sized),
    subnet: SubnetId,
    peer_id: &str,
) -> Result<Option<Node>, StateError> {
    match get_value::<NodeId>(s, &keys::node_peer(subnet, peer_id))? {
        Some(id) => get_value(s, &keys::node(subnet, id)),
        None => Ok(None),
    }
}

/// `RegisterNode`: bonds `stake` from the coldkey (the signer).
#[allow(clippy::too_many_arguments)]
pub fn register(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    coldkey: &Address,
    subnet_id: SubnetId,
    hotkey: &Address,
    peer_id: &str,
    stake: Amount,
) -> Result<NodeId, TxError> {
    let mut subnet = subnets::load(s, subnet_id)?;
    if subnet.state == SubnetState::Paused {
        return Err(TxError::WrongSubnetState {
            subnet: subnet_id,
            state: subnet.state,
            why: "cannot register nodes while paused".into(),
        });
    }
    if peer_id.is_empty()
        || peer_id.len() > MAX_PEER_ID_LEN
        || !peer_id.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(TxError::InvalidArgument(format!(
            "peer id must be 1..={MAX_PEER_ID_LEN} ASCII alphanumerics"
        )));
    }
    if subnet.node_count >= rt.params.max_subnet_nodes {
        return Err(TxError::SubnetFull(subnet.node_count));
    }
    if s.get(&keys::node_peer(subnet_id, peer_id))?.is_some() {
        return Err(TxError::DuplicatePeerId(peer_id.to_string()));
    }
    if s.get(&keys::node_hotkey(subnet_id, hotkey))?.is_some() {
        return Err(TxError::DuplicateHotkey(*hotkey));
    }
    if stake < subnet.min_stake || stake > subnet.max_stake {
        return Err(TxError::StakeOutOfRange {
            min: subnet.min_stake,
            max: subnet.max_stake,
            got: stake,
        });
    }
    accounts::debit(s, coldkey, stake)?;
    let id = subnet.next_node_id;
    subnet.next_node_id += 1;
    subnet.node_count += 1;
    subnets::store(s, &subnet);
    put_value(s, keys::node_peer(subnet_id, peer_id), &id);
    put_value(s, keys::node_hotkey(subnet_id, hotkey), &id);
    store(
        s,
        &Node {
            subnet: subnet_id,
            id,
            coldkey: *coldkey,
            hotkey: *hotkey,
            peer_id: peer_id.to_string(),
            stake,
            class: NodeClass::Registered,
            reputation: rt.params.node_initial_reputation,
            consensus_epochs: 0,
            last_epoch: None,
            last_score: 0,
            last_reward: 0,
            registered_at: ctx.height,
        },
    );
    Ok(id)
}

fn coldkey_only(node: &Node, signer: &Address) -> Result<(), TxError> {
    if node.coldkey != *signer {
        return Err(TxError::NotAuthorized(format!(
            "only the coldkey {} may change node {}'s stake",
            node.coldkey, node.id
        )));
    }
    Ok(())
}

/// `AddStake`: bonds more; the total must stay at most the subnet's maximum.
pub fn add_stake(
    s: &mut dyn State,
    signer: &Address,
    subnet_id: SubnetId,
    id: NodeId,
    amount: Amount,
) -> Result<(), TxError> {
    let subnet = subnets::load(s, subnet_id)?;
    let mut node = load(s, subnet_id, id)?;
    coldkey_only(&node, signer)?;
    if amount == 0 {
        return Err(TxError::InvalidAmount("stake of zero".into()));
    }
    let new = math::add(node.stake, amount)?;
    if new > subnet.max_stake {
        return Err(TxError::StakeOutOfRange {
            min: subnet.min_stake,
            max: subnet.max_stake,
            got: new,
        });
    }
    accounts::debit(s, signer, amount)?;
    node.stake = new;
    store(s, &node);
    Ok(())
}

/// `RemoveStake`: unbonds part of the stake (what remains must be at least
/// the minimum), or all of it, which deregisters the node.
pub fn remove_stake(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    signer: &Address,
    subnet_id: SubnetId,
    id: NodeId,
    amount: Amount,
) -> Result<(), TxError> {
    let subnet = subnets::load(s, subnet_id)?;
    let mut node = load(s, subnet_id, id)?;
    coldkey_only(&node, signer)?;
    if amount == 0 || amount > node.stake {
        return Err(TxError::InvalidAmount(format!(
            "can unstake 1..={} from node {id}",
            node.stake
        )));
    }
    let rest = node.stake - amount;
    if rest == 0 {
        delete_and_unbond(rt, s, ctx, &node)?;
        return Ok(());
    }
    if rest < subnet.min_stake {
        return Err(TxError::StakeOutOfRange {
            min: subnet.min_stake,
            max: subnet.max_stake,
            got: rest,
        });
    }
    node.stake = rest;
    store(s, &node);
    accounts::push_unbonding(
        s,
        signer,
        amount,
        ctx.height.saturating_add(rt.params.unbonding_blocks),
    )?;
    Ok(())
}

/// Deregisters a node: its stake unbonds to the coldkey, its indexes go.
pub fn delete_and_unbond(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    node: &Node,
) -> Result<(), StateError> {
    accounts::push_unbonding(
        s,
        &node.coldkey,
        node.stake,
        ctx.height.saturating_add(rt.params.unbonding_blocks),
    )?;
    s.delete(&keys::node(node.subnet, node.id));
    s.delete(&keys::node_peer(node.subnet, &node.peer_id));
    s.delete(&keys::node_hotkey(node.subnet, &node.hotkey));
    if let Some(mut subnet) = get_value::<crate::types::Subnet>(s, &keys::subnet(node.subnet))? {
        subnet.node_count = subnet.node_count.saturating_sub(1);
        subnets::store(s, &subnet);
    }
    Ok(())
}

/// Unbonding entries of an owner, in unlock order.
pub fn unbonding(
    s: &(impl StateRead + ?Sized),
    owner: &Address,
) -> Result<Vec<Unbonding>, StateError> {
    Ok(scan_values::<Unbonding>(s, &keys::unbonding_prefix(owner))?
        .into_iter()
        .map(|(_, u)| u)
        .collect())
}

/// `Claim`: releases every matured unbonding entry of the signer to its balance.
pub fn claim(s: &mut dyn State, ctx: &BlockContext, signer: &Address) -> Result<(), TxError> {
    let mut total: Amount = 0;
    for (key, u) in scan_values::<Unbonding>(s, &keys::unbonding_prefix(signer))? {
        if u.unlock_at > ctx.height {
            // Keys sort by unlock height, so nothing later has matured.
            break;
        }
        total = math::add(total, u.amount)?;
        s.delete(&key);
    }
    if total == 0 {
        return Err(TxError::NothingToClaim);
    }
    accounts::credit(s, signer, total)
}
