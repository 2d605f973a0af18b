//! Accounts, balances, total issuance and unbonding entries.
//!
//! Issuance is the ledger's conservation law: it only moves through
//! [`mint`] (epoch emission) and [`burn`] (fees, registration fees,
//! slashing), so it always equals balances + stakes + vaults + unbonding.

use crate::error::{StateError, TxError};
use crate::state::{State, StateRead, get_value, keys, put_value};
use crate::types::{Account, Address, Amount, Unbonding};

/// The account at `a` (a default one if it never existed).
pub fn account(s: &(impl StateRead + ?Sized), a: &Address) -> Result<Account, StateError> {
    Ok(get_value(s, &keys::account(a))?.unwrap_or_default())
}

/// Stores an account.
pub fn put_account(s: &mut (impl State + ?Sized), a: &Address, acct: &Account) {
    put_value(s, keys::account(a), acct);
}

/// Takes `amount` from `a`'s balance.
pub fn debit(s: &mut (impl State + ?Sized), a: &Address, amount: Amount) -> Result<(), TxError> {
    let mut acct = account(s, a)?;
    if acct.balance < amount {
        return Err(TxError::InsufficientBalance {
            need: amount,
            have: acct.balance,
        });
    }
    acct.balance -= amount;
    put_account(s, a, &acct);
    Ok(())
}

/// Adds `amount` to `a`'s balance.
pub fn credit(s: &mut (impl State + ?Sized), a: &Address, amount: Amount) -> Result<(), TxError> {
    let mut acct = account(s, a)?;
    acct.balance = acct.balance.checked_add(amount).ok_or(TxError::Overflow)?;
    put_account(s, a, &acct);
    Ok(())
}

/// Moves balance between accounts.
pub fn transfer(
    s: &mut (impl State + ?Sized),
    from: &Address,
    to: &Address,
    amount: Amount,
) -> Result<(), TxError> {
    if amount == 0 {
        return Err(TxError::InvalidAmount("transfer of zero".into()));
    }
    debit(s, from, amount)?;
    credit(s, to, amount)
}

/// The recorded total issuance.
pub fn issuance(s: &(impl StateRead + ?Sized)) -> Result<Amount, StateError> {
    Ok(get_value(s, keys::ISSUANCE)?.unwrap_or(0))
}

/// Records newly minted tokens (the caller credits them somewhere).
pub fn mint(s: &mut (impl State + ?Sized), amount: Amount) -> Result<(), StateError> {
    if amount > 0 {
        let i = issuance(s)?.saturating_add(amount);
        put_value(s, keys::ISSUANCE.to_vec(), &i);
    }
    Ok(())
}

/// Records destroyed tokens (the caller has already taken them out).
pub fn burn(s: &mut (impl State + ?Sized), amount: Amount) -> Result<(), StateError> {
    if amount > 0 {
        let i = issuance(s)?.saturating_sub(amount);
        put_value(s, keys::ISSUANCE.to_vec(), &i);
    }
    Ok(())
}

/// Queues `amount` for `owner`, claimable from height `unlock_at`.
pub fn push_unbonding(
    s: &mut (impl State + ?Sized),
    owner: &Address,
    amount: Amount,
    unlock_at: u64,
) -> Result<(), StateError> {
    if amount == 0 {
        return Ok(());
    }
    let seq: u64 = get_value(s, keys::UNBOND_SEQ)?.unwrap_or(0);
    put_value(s, keys::UNBOND_SEQ.to_vec(), &(seq + 1));
    put_value(
        s,
        keys::unbonding(owner, unlock_at, seq),
        &Unbonding {
            owner: *owner,
            amount,
            unlock_at,
        },
    );
    Ok(())
}
