//! Chain validators: accounts that bond stake with a consensus key to sit
//! on the BFT committee that produces blocks.
//!
//! The committee of chain epoch `e > 0` is the top `committee_size`
//! validators by bond in the state at the end of epoch `e - 1`; ties go to
//! the lower consensus key so every node derives the same list. The engine
//! derives it from its committed state right after the epoch's last block,
//! and the runtime records the same list under [`keys::committee`] when the
//! next epoch's first block begins, so any later state can answer "who was
//! on epoch e's committee" (needed to check old finality certificates).
//! Bonds count towards the issuance invariant like node stakes.

use super::{BlockContext, Runtime, accounts};
use crate::error::{StateError, TxError};
use crate::state::{State, StateRead, get_value, keys, put_value, scan_values};
use crate::types::{Address, Amount, ChainValidator};

/// The validator bonded by `a`, if any.
pub fn load(
    s: &(impl StateRead + ?Sized),
    a: &Address,
) -> Result<Option<ChainValidator>, StateError> {
    get_value(s, &keys::chain_validator(a))
}

/// Stores a validator and its consensus-key index entry.
pub fn store(s: &mut (impl State + ?Sized), v: &ChainValidator) {
    put_value(s, keys::chain_validator(&v.address), v);
    put_value(s, keys::consensus_key(&v.consensus_key), &v.address);
}

/// Every bonded validator, in account order.
pub fn all(s: &(impl StateRead + ?Sized)) -> Result<Vec<ChainValidator>, StateError> {
    Ok(scan_values(s, keys::CHAIN_VALIDATOR_PREFIX)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// The top `n` validators by bond (ties: lower consensus key first), the
/// committee the next chain epoch gets from this state.
pub fn top(s: &(impl StateRead + ?Sized), n: u32) -> Result<Vec<ChainValidator>, StateError> {
    let mut v = all(s)?;
    v.sort_by(|a, b| {
        b.bond
            .cmp(&a.bond)
            .then(a.consensus_key.cmp(&b.consensus_key))
    });
    v.truncate(n as usize);
    Ok(v)
}

/// The committee recorded for chain epoch `epoch`, once its first block ran
/// (epoch 0: at genesis).
pub fn committee(
    s: &(impl StateRead + ?Sized),
    epoch: u64,
) -> Result<Option<Vec<ChainValidator>>, StateError> {
    get_value(s, &keys::committee(epoch))
}

/// Records epoch `epoch`'s committee from the current state (the state at
/// the end of the previous epoch).
pub fn record_committee(rt: &Runtime, s: &mut dyn State, epoch: u64) -> Result<(), StateError> {
    let members = top(s, rt.params.committee_size)?;
    put_value(s, keys::committee(epoch), &members);
    Ok(())
}

/// Bonds `amount` from `signer`'s balance as chain-validator stake.
pub fn bond(
    rt: &Runtime,
    s: &mut dyn State,
    signer: &Address,
    consensus_key: &Address,
    amount: Amount,
) -> Result<(), TxError> {
    if amount == 0 {
        return Err(TxError::InvalidAmount("bond of zero".into()));
    }
    // The key must be a valid Ed25519 point, or the engine could not verify
    // its votes and the committee would lose a member for a whole epoch.
    if ed25519_dalek::VerifyingKey::from_bytes(&consensus_key.0).is_err() {
        return Err(TxError::InvalidArgument(
            "consensus key is not an Ed25519 public key".into(),
        ));
    }
    let owner: Option<Address> = get_value(s, &keys::consensus_key(consensus_key))?;
    if owner.is_some_and(|o| o != *signer) {
        return Err(TxError::InvalidArgument(
            "consensus key already bonded by another account".into(),
        ));
    }
    let mut v = match load(s, signer)? {
        Some(v) if v.consensus_key != *consensus_key => {
            return Err(TxError::InvalidArgument(format!(
                "validator already bonded with consensus key {}",
                v.consensus_key
            )));
        }
        Some(v) => v,
        None => ChainValidator {
            address: *signer,
            consensus_key: *consensus_key,
            bond: 0,
        },
    };
    v.bond = v.bond.checked_add(amount).ok_or(TxError::Overflow)?;
    if v.bond < rt.params.min_validator_bond {
        return Err(TxError::InvalidAmount(format!(
            "validator bond must be at least {}",
            rt.params.min_validator_bond
        )));
    }
    accounts::debit(s, signer, amount)?;
    store(s, &v);
    Ok(())
}

/// Unbonds `amount`; it becomes claimable after the unbonding period.
/// Unbonding everything removes the validator (and frees its key).
pub fn unbond(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    signer: &Address,
    amount: Amount,
) -> Result<(), TxError> {
    let Some(mut v) = load(s, signer)? else {
        return Err(TxError::NotAuthorized("not a chain validator".into()));
    };
    if amount == 0 || amount > v.bond {
        return Err(TxError::InvalidAmount(format!("can unbond 1..={}", v.bond)));
    }
    v.bond -= amount;
    if v.bond == 0 {
        s.delete(&keys::chain_validator(signer));
        s.delete(&keys::consensus_key(&v.consensus_key));
    } else if v.bond < rt.params.min_validator_bond {
        return Err(TxError::InvalidAmount(format!(
            "remaining bond must be 0 or at least {}",
            rt.params.min_validator_bond
        )));
    } else {
        store(s, &v);
    }
    accounts::push_unbonding(
        s,
        signer,
        amount,
        ctx.height.saturating_add(rt.params.unbonding_blocks),
    )?;
    Ok(())
}
