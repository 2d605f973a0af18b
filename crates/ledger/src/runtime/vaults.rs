//! Share-based delegate-stake vaults, one per subnet.
//!
//! Deposits buy shares at the vault's current price (`total_stake /
//! total_shares`); the delegators' emission cut raises `total_stake`, so it
//! raises every share's value without touching each delegator. Redemption
//! unbonds over the delegate cooldown. Rounding always favours the vault.

use super::{BlockContext, Runtime, accounts, math, subnets};
use crate::error::{StateError, TxError};
use crate::state::{State, StateRead, get_value, keys, put_value, scan_values};
use crate::types::{Address, Amount, SubnetId, Vault};

/// The vault of a subnet (empty if none).
pub fn load(s: &(impl StateRead + ?Sized), id: SubnetId) -> Result<Vault, StateError> {
    Ok(get_value(s, &keys::vault(id))?.unwrap_or_default())
}

/// Stores a vault.
pub fn store(s: &mut (impl State + ?Sized), id: SubnetId, v: &Vault) {
    put_value(s, keys::vault(id), v);
}

/// Shares held by `who` in a subnet's vault.
pub fn shares(
    s: &(impl StateRead + ?Sized),
    id: SubnetId,
    who: &Address,
) -> Result<Amount, StateError> {
    Ok(get_value(s, &keys::delegation(id, who))?.unwrap_or(0))
}

/// `Delegate`: moves `amount` into the vault for shares.
pub fn delegate(
    s: &mut dyn State,
    signer: &Address,
    id: SubnetId,
    amount: Amount,
) -> Result<(), TxError> {
    subnets::load(s, id)?;
    if amount == 0 {
        return Err(TxError::InvalidAmount("delegation of zero".into()));
    }
    let mut v = load(s, id)?;
    let new_shares = if v.total_shares == 0 || v.total_stake == 0 {
        amount
    } else {
        math::mul_div(amount, v.total_shares, v.total_stake).ok_or(TxError::Overflow)?
    };
    if new_shares == 0 {
        return Err(TxError::InvalidAmount("amount buys no shares".into()));
    }
    accounts::debit(s, signer, amount)?;
    v.total_stake = math::add(v.total_stake, amount)?;
    v.total_shares = math::add(v.total_shares, new_shares)?;
    store(s, id, &v);
    let held = shares(s, id, signer)?;
    put_value(
        s,
        keys::delegation(id, signer),
        &math::add(held, new_shares)?,
    );
    Ok(())
}

/// `Undelegate`: redeems shares; their value unbonds over `delegate_cooldown_blocks`.
pub fn undelegate(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    signer: &Address,
    id: SubnetId,
    redeem: Amount,
) -> Result<(), TxError> {
    subnets::load(s, id)?;
    let held = shares(s, id, signer)?;
    if redeem == 0 || redeem > held {
        return Err(TxError::InsufficientShares {
            have: held,
            asked: redeem,
        });
    }
    let mut v = load(s, id)?;
    let value = math::mul_div(redeem, v.total_stake, v.total_shares).ok_or(TxError::Overflow)?;
    v.total_shares -= redeem;
    v.total_stake -= value;
    store(s, id, &v);
    if held == redeem {
        s.delete(&keys::delegation(id, signer));
    } else {
        put_value(s, keys::delegation(id, signer), &(held - redeem));
    }
    accounts::push_unbonding(
        s,
        signer,
        value,
        ctx.height
            .saturating_add(rt.params.delegate_cooldown_blocks),
    )?;
    Ok(())
}

/// On subnet removal: every delegator's value unbonds; rounding dust is burned.
pub fn dissolve(
    rt: &Runtime,
    s: &mut dyn State,
    ctx: &BlockContext,
    id: SubnetId,
) -> Result<(), StateError> {
    let v = load(s, id)?;
    let mut paid: Amount = 0;
    for (key, held) in scan_values::<Amount>(s, &keys::delegation_prefix(id))? {
        let who_bytes = &key[key.len() - 32..];
        let mut who = [0u8; 32];
        who.copy_from_slice(who_bytes);
        let value = math::mul_div(held, v.total_stake, v.total_shares).unwrap_or(0);
        paid = paid.saturating_add(value);
        accounts::push_unbonding(
            s,
            &Address(who),
            value,
            ctx.height
                .saturating_add(rt.params.delegate_cooldown_blocks),
        )?;
        s.delete(&key);
    }
    accounts::burn(s, v.total_stake.saturating_sub(paid))?;
    s.delete(&keys::vault(id));
    Ok(())
}
