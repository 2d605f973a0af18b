//! Epochs: validator election, `propose_attestation` and `attest`, and the
//! epoch step that pays emission by score, slashes, moves reputations,
//! promotes classes and removes nodes and subnets.
//!
//! # Election randomness
//! The seed for subnet `s` at epoch `e` is
//! `SHA-256("hypertensor/elect/v1" || R || s || e)`, where `R` is an
//! accumulator that every block folds its parent hash into and every
//! included transaction folds its hash into. No single transaction sender
//! controls it; the block author can bias it only by choosing which
//! transactions to include (grinding, bounded by what it can withhold).
//! Under the BFT engine the threshold-signature seed of the consensus round
//! is meant to be mixed in the same way, which removes that bias.
//! The validator index is `u128(seed[..16]) mod n` over the Validator-class
//! nodes in id order; the modulo bias is below 2^-100.

use std::collections::{BTreeMap, BTreeSet};

use super::{BlockContext, Runtime, accounts, math, nodes, subnets, vaults};
use crate::error::{StateError, TxError};
use serde::{Deserialize, Serialize};

use crate::state::{State, StateRead, get_value, keys, put_value, scan_values};
use crate::types::{
    Address, Amount, EpochRecord, Hash32, Node, NodeClass, NodeScore, PPM, Subnet, SubnetId,
    SubnetState,
};

/// The epoch a height belongs to.
pub fn epoch_of(rt: &Runtime, height: u64) -> u64 {
    height / rt.params.epoch_length
}

/// What the state keeps per subnet epoch; the proposal and each attestation
/// live under their own keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHead {
    /// Epoch number.
    pub epoch: u64,
    /// Elected validator.
    pub validator: crate::types::NodeId,
    /// Whether the validator has proposed.
    pub proposed: bool,
}

/// The full view of a subnet's stored epoch (head, proposal, attestations).
pub fn record(
    s: &(impl StateRead + ?Sized),
    subnet: SubnetId,
) -> Result<Option<EpochRecord>, StateError> {
    let Some(head) = get_value::<EpochHead>(s, &keys::epoch(subnet))? else {
        return Ok(None);
    };
    let proposal = if head.proposed {
        get_value::<Vec<NodeScore>>(s, &keys::epoch_proposal(subnet))?
    } else {
        None
    };
    Ok(Some(EpochRecord {
        epoch: head.epoch,
        validator: head.validator,
        proposal,
        attestations: attestations(s, subnet, head.epoch)?,
    }))
}

fn attestations(
    s: &(impl StateRead + ?Sized),
    subnet: SubnetId,
    epoch: u64,
) -> Result<BTreeSet<crate::types::NodeId>, StateError> {
    Ok(
        scan_values::<u64>(s, &keys::epoch_attestation_prefix(subnet))?
            .into_iter()
            .filter(|(_, e)| *e == epoch)
            .filter_map(|(k, _)| {
                let id: [u8; 4] = k[k.len() - 4..].try_into().ok()?;
                Some(u32::from_be_bytes(id))
            })
            .collect(),
    )
}

/// Deletes a subnet's epoch head, proposal and attestations.
pub fn clear(s: &mut dyn State, subnet: SubnetId) -> Result<(), StateError> {
    s.delete(&keys::epoch(subnet));
    s.delete(&keys::epoch_proposal(subnet));
    for (k, _) in s.scan_prefix(&keys::epoch_attestation_prefix(subnet))? {
        s.delete(&k);
    }
    Ok(())
}

fn current_head(
    rt: &Runtime,
    s: &dyn State,
    ctx: &BlockContext,
    subnet: SubnetId,
) -> Result<EpochHead, TxError> {
    let rec: EpochHead = get_value(s, &keys::epoch(subnet))?
        .ok_or_else(|| TxError::Epoch(format!("subnet {subnet} has no validator this epoch")))?;
    if rec.epoch != epoch_of(rt, ctx.height) {
        return Err(TxError::Epoch(format!(
            "subnet {subnet} has no validator this epoch"
        )));
    }
    Ok(rec)
}

fn signer_node(s: &dyn State, subnet: SubnetId, signer: &Address) -> Result<Node, TxError> {
    nodes::by_hotkey(s, subnet, signer)?.ok_or_else(|| {
        TxError::NotAuthorized(format!(
            "{signer} is not the hotkey of a node in subnet {subnet}"
        ))
    })
}

/// `ProposeAttestation`: the elected validator's scores, once per epoch.
/// The proposer's own attestation is implied.
pub fn propose(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    signer: &Address,
    subnet_id: SubnetId,
    scores: &[NodeScore],
) -> Result<(), TxError> {
    let subnet = subnets::load(s, subnet_id)?;
    if subnet.state != SubnetState::Active {
        return Err(TxError::WrongSubnetState {
            subnet: subnet_id,
            state: subnet.state,
            why: "proposals need an Active subnet".into(),
        });
    }
    let mut head = current_head(rt, s, ctx, subnet_id)?;
    let me = signer_node(s, subnet_id, signer)?;
    if me.id != head.validator {
        return Err(TxError::NotAuthorized(format!(
            "node {} is not this epoch's validator (node {} is)",
            me.id, head.validator
        )));
    }
    if head.proposed {
        return Err(TxError::Epoch("already proposed this epoch".into()));
    }
    let mut seen = BTreeSet::new();
    for sc in scores {
        if !seen.insert(sc.node) {
            return Err(TxError::InvalidArgument(format!(
                "node {} scored twice",
                sc.node
            )));
        }
        let n = nodes::load(s, subnet_id, sc.node)?;
        if n.class < NodeClass::Included {
            return Err(TxError::WrongClass {
                node: n.id,
                class: n.class,
                needed: NodeClass::Included,
            });
        }
    }
    head.proposed = true;
    put_value(s, keys::epoch(subnet_id), &head);
    put_value(s, keys::epoch_proposal(subnet_id), &scores.to_vec());
    put_value(s, keys::epoch_attestation(subnet_id, me.id), &head.epoch);
    Ok(())
}

/// `Attest`: a Validator-class node agrees with the epoch's proposal, once.
pub fn attest(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    signer: &Address,
    subnet_id: SubnetId,
) -> Result<(), TxError> {
    subnets::load(s, subnet_id)?;
    let head = current_head(rt, s, ctx, subnet_id)?;
    let me = signer_node(s, subnet_id, signer)?;
    if me.class != NodeClass::Validator {
        return Err(TxError::WrongClass {
            node: me.id,
            class: me.class,
            needed: NodeClass::Validator,
        });
    }
    if !head.proposed {
        return Err(TxError::Epoch("nothing proposed yet this epoch".into()));
    }
    let key = keys::epoch_attestation(subnet_id, me.id);
    if get_value::<u64>(s, &key)? == Some(head.epoch) {
        return Err(TxError::Epoch("already attested this epoch".into()));
    }
    put_value(s, key, &head.epoch);
    Ok(())
}

/// The election seed of a subnet for an epoch (see the module docs).
pub fn election_seed(randomness: &Hash32, subnet: SubnetId, epoch: u64) -> Hash32 {
    Hash32::digest(&[
        b"hypertensor/elect/v1",
        &randomness.0,
        &subnet.to_be_bytes(),
        &epoch.to_be_bytes(),
    ])
}

/// Runs at the first block of every epoch: closes the previous epoch of
/// each subnet and opens the new one.
pub fn epoch_step(rt: &Runtime, s: &mut dyn State, ctx: &BlockContext) -> Result<(), StateError> {
    let new_epoch = epoch_of(rt, ctx.height);
    let randomness: Hash32 = get_value(s, keys::RANDOMNESS)?.unwrap_or_default();
    for subnet in subnets::all(s)? {
        let p = &rt.params;
        match subnet.state {
            SubnetState::Registered => {
                if ctx.height.saturating_sub(subnet.registered_at) > p.max_registration_blocks {
                    subnets::remove(rt, s, ctx, subnet.id, "not activated in time")?;
                }
            }
            SubnetState::Paused => {
                let since = subnet.paused_at.unwrap_or(ctx.height);
                if ctx.height.saturating_sub(since) > p.max_pause_blocks {
                    subnets::remove(rt, s, ctx, subnet.id, "paused too long")?;
                }
            }
            SubnetState::Active => {
                step_active(rt, s, ctx, subnet, new_epoch, &randomness)?;
            }
        }
    }
    Ok(())
}

/// Closes epoch `new_epoch - 1` of one active subnet and elects for `new_epoch`.
fn step_active(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    mut subnet: Subnet,
    new_epoch: u64,
    randomness: &Hash32,
) -> Result<(), StateError> {
    let p = &rt.params;
    let record = record(s, subnet.id)?.filter(|r| r.epoch + 1 == new_epoch);
    clear(s, subnet.id)?;
    let mut nodes: Vec<Node> = nodes::all(s, subnet.id)?
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    let mut dirty = vec![false; nodes.len()];
    let index_of = |nodes: &[Node], id| nodes.binary_search_by_key(&id, |n: &Node| n.id).ok();
    let mut minted: Amount = 0;
    let mut burned: Amount = 0;

    if let Some(rec) = record {
        match &rec.proposal {
            None => {
                if let Some(i) = index_of(&nodes, rec.validator) {
                    nodes[i].reputation =
                        math::ppm_sub(nodes[i].reputation, p.missed_proposal_loss);
                    dirty[i] = true;
                }
                subnet.reputation = math::ppm_sub(subnet.reputation, p.subnet_reputation_loss);
                tracing::info!(
                    subnet = subnet.id,
                    epoch = rec.epoch,
                    validator = rec.validator,
                    "missed proposal"
                );
            }
            Some(scores) => {
                let validators = nodes
                    .iter()
                    .filter(|n| n.class == NodeClass::Validator)
                    .count() as u64;
                let attested = rec
                    .attestations
                    .iter()
                    .filter(|id| {
                        index_of(&nodes, **id)
                            .is_some_and(|i| nodes[i].class == NodeClass::Validator)
                    })
                    .count() as u64;
                let passed = validators > 0
                    && attested * PPM as u64 >= p.attestation_threshold as u64 * validators;
                if passed {
                    minted = pay_epoch(rt, s, &mut subnet, &mut nodes, &mut dirty, &rec, scores)?;
                    subnet.reputation = math::ppm_add(subnet.reputation, p.subnet_reputation_gain);
                } else {
                    if let Some(i) = index_of(&nodes, rec.validator) {
                        let slash = math::ppm_of(nodes[i].stake, p.failed_proposal_slash);
                        nodes[i].stake -= slash;
                        burned = slash;
                        nodes[i].reputation =
                            math::ppm_sub(nodes[i].reputation, p.failed_proposal_loss);
                        dirty[i] = true;
                    }
                    subnet.reputation = math::ppm_sub(subnet.reputation, p.subnet_reputation_loss);
                    tracing::info!(
                        subnet = subnet.id,
                        epoch = rec.epoch,
                        attested,
                        validators,
                        "attestation below threshold"
                    );
                }
            }
        }
    }

    // Class progression happens after scoring, so a node is first scored in
    // the epoch after it became Included.
    for (i, n) in nodes.iter_mut().enumerate() {
        let next = match n.class {
            NodeClass::Registered => NodeClass::Idle,
            NodeClass::Idle => NodeClass::Included,
            NodeClass::Included if n.consensus_epochs >= p.promotion_epochs => NodeClass::Validator,
            c => c,
        };
        if next != n.class {
            n.class = next;
            dirty[i] = true;
        }
    }

    accounts::mint(s, minted)?;
    accounts::burn(s, burned)?;
    let mut removed = 0u32;
    let mut survivors = Vec::with_capacity(nodes.len());
    for (n, d) in nodes.into_iter().zip(dirty) {
        if n.reputation < p.node_min_reputation {
            removed += 1;
            tracing::info!(
                subnet = subnet.id,
                node = n.id,
                reputation = n.reputation,
                "node removed"
            );
            nodes::delete_and_unbond(rt, s, ctx, &n)?;
        } else {
            if d {
                nodes::store(s, &n);
            }
            survivors.push(n);
        }
    }
    subnet.node_count = subnet.node_count.saturating_sub(removed);

    if subnet.reputation < p.subnet_min_reputation {
        subnets::store(s, &subnet);
        return subnets::remove(rt, s, ctx, subnet.id, "reputation below minimum");
    }
    if subnet.node_count < p.min_subnet_nodes {
        subnet.low_node_epochs += 1;
        if subnet.low_node_epochs > p.max_low_node_epochs {
            subnets::store(s, &subnet);
            return subnets::remove(rt, s, ctx, subnet.id, "too few nodes");
        }
    } else {
        subnet.low_node_epochs = 0;
    }

    let electable: Vec<&Node> = survivors
        .iter()
        .filter(|n| n.class == NodeClass::Validator)
        .collect();
    if !electable.is_empty() {
        let seed = election_seed(randomness, subnet.id, new_epoch);
        let mut head = [0u8; 16];
        head.copy_from_slice(&seed.0[..16]);
        let pick = (u128::from_be_bytes(head) % electable.len() as u128) as usize;
        let validator = electable[pick].id;
        put_value(
            s,
            keys::epoch(subnet.id),
            &EpochHead {
                epoch: new_epoch,
                validator,
                proposed: false,
            },
        );
    }
    subnets::store(s, &subnet);
    Ok(())
}

/// Pays an attested epoch: the owner's cut to its balance, the delegators'
/// cut into the vault, the rest to scored nodes' stake by score share.
/// Moves reputations and consensus counters. Returns the amount minted
/// (rounding dust is never minted).
fn pay_epoch(
    rt: &Runtime,
    s: &mut dyn State,
    subnet: &mut Subnet,
    nodes: &mut [Node],
    dirty: &mut [bool],
    rec: &EpochRecord,
    scores: &[NodeScore],
) -> Result<Amount, StateError> {
    let p = &rt.params;
    let emission = p.emission_per_epoch;
    let owner_cut = math::ppm_of(emission, p.owner_cut);
    let mut vault = vaults::load(s, subnet.id)?;
    let deleg_cut = if vault.total_shares > 0 {
        math::ppm_of(emission, p.delegator_cut)
    } else {
        0
    };
    let pool = emission - owner_cut - deleg_cut;

    let score_of: BTreeMap<_, u64> = scores.iter().map(|sc| (sc.node, sc.score)).collect();
    let total: u128 = nodes
        .iter()
        .filter(|n| n.class >= NodeClass::Included)
        .map(|n| score_of.get(&n.id).copied().unwrap_or(0) as u128)
        .sum();
    let mut paid: Amount = 0;
    for (i, n) in nodes.iter_mut().enumerate() {
        if n.class < NodeClass::Included {
            continue;
        }
        let score = score_of.get(&n.id).copied().unwrap_or(0);
        n.last_epoch = Some(rec.epoch);
        n.last_score = score;
        n.last_reward = 0;
        if score > 0 {
            let reward = math::mul_div(pool, score as u128, total).unwrap_or(0);
            n.stake = n.stake.saturating_add(reward);
            n.last_reward = reward;
            paid += reward;
            n.reputation = math::ppm_add(n.reputation, p.node_reputation_gain);
            n.consensus_epochs = n.consensus_epochs.saturating_add(1);
        } else {
            n.reputation = math::ppm_sub(n.reputation, p.node_zero_score_loss);
        }
        if n.class == NodeClass::Validator && !rec.attestations.contains(&n.id) {
            n.reputation = math::ppm_sub(n.reputation, p.node_no_attest_loss);
        }
        dirty[i] = true;
    }
    if owner_cut > 0 {
        let owner = subnet.owner;
        let mut acct = accounts::account(s, &owner)?;
        acct.balance = acct.balance.saturating_add(owner_cut);
        accounts::put_account(s, &owner, &acct);
    }
    if deleg_cut > 0 {
        vault.total_stake = vault.total_stake.saturating_add(deleg_cut);
        vaults::store(s, subnet.id, &vault);
    }
    Ok(owner_cut + deleg_cut + paid)
}
