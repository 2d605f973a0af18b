//! The deterministic state machine: the ledger's rules, applied to a
//! [`State`] one block at a time.
//!
//! It knows nothing of storage, block production or time: the dev chain and
//! (later) a BFT engine both call [`Runtime::apply_block`] (or
//! [`Runtime::begin_block`] plus [`Runtime::apply_tx`] while building) on an
//! overlay of the parent state and commit the resulting changes themselves.
//! Given the same parent state and block, every run produces the same changes:
//! integers only, ordered maps only, no clock.
//!
//! The rules live in one module per concern: [`accounts`], [`subnets`],
//! [`nodes`], [`vaults`] and [`epochs`], with exact integer math in [`math`]
//! and read-only views in [`queries`].

pub mod accounts;
pub mod epochs;
pub mod math;
pub mod nodes;
pub mod queries;
pub mod subnets;
pub mod validators;
pub mod vaults;

use serde::{Deserialize, Serialize};

use crate::error::{LedgerError, StateError, TxError};
use crate::genesis::{Genesis, Params};
use crate::state::{Changes, Overlay, State, StateRead, get_value, keys, put_value};
use crate::tx::{Call, SignedTx};
use crate::types::{Account, Amount, Hash32};

pub use subnets::SubnetFeeState;

/// What the runtime knows about the block being applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockContext {
    /// Height of the block.
    pub height: u64,
    /// Hash of its parent; seeds validator election.
    pub parent_hash: Hash32,
}

/// The ledger runtime: the chain id and the genesis constants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runtime {
    /// Chain id every signature covers.
    pub chain_id: String,
    /// Constants.
    pub params: Params,
}

/// A summary of the issuance invariant at one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuanceAudit {
    /// Recorded total issuance.
    #[serde(with = "crate::types::amount")]
    pub issuance: Amount,
    /// Sum of balances.
    #[serde(with = "crate::types::amount")]
    pub balances: Amount,
    /// Sum of node stakes.
    #[serde(with = "crate::types::amount")]
    pub stakes: Amount,
    /// Sum of vault stakes.
    #[serde(with = "crate::types::amount")]
    pub vaults: Amount,
    /// Sum of unbonding entries.
    #[serde(with = "crate::types::amount")]
    pub unbonding: Amount,
}

impl IssuanceAudit {
    /// True when issuance equals balances + stakes + vaults + unbonding.
    pub fn holds(&self) -> bool {
        self.balances
            .checked_add(self.stakes)
            .and_then(|x| x.checked_add(self.vaults))
            .and_then(|x| x.checked_add(self.unbonding))
            == Some(self.issuance)
    }
}

impl Runtime {
    /// The runtime for a validated genesis.
    pub fn new(genesis: &Genesis) -> Result<Runtime, LedgerError> {
        genesis.validate()?;
        Ok(Runtime {
            chain_id: genesis.chain_id.clone(),
            params: genesis.params.clone(),
        })
    }

    /// The genesis state as a change set over an empty state.
    pub fn genesis_changes(&self, genesis: &Genesis) -> Result<Changes, LedgerError> {
        let empty = crate::state::MemState::default();
        let mut o = Overlay::new(&empty);
        let mut issuance: Amount = 0;
        for b in &genesis.balances {
            issuance = issuance
                .checked_add(b.amount)
                .ok_or_else(|| LedgerError::Genesis("issuance overflows".into()))?;
            put_value(
                &mut o,
                keys::account(&b.address),
                &Account {
                    balance: b.amount,
                    nonce: 0,
                },
            );
        }
        for v in &genesis.validators {
            issuance = issuance
                .checked_add(v.bond)
                .ok_or_else(|| LedgerError::Genesis("issuance overflows".into()))?;
            validators::store(
                &mut o,
                &crate::types::ChainValidator {
                    address: v.address,
                    consensus_key: v.consensus_key,
                    bond: v.bond,
                },
            );
        }
        let first = validators::top(&o, self.params.committee_size)?;
        put_value(&mut o, keys::committee(0), &first);
        put_value(&mut o, keys::ISSUANCE.to_vec(), &issuance);
        put_value(&mut o, keys::PARAMS.to_vec(), &self.params);
        put_value(&mut o, keys::NEXT_SUBNET.to_vec(), &1u32);
        put_value(&mut o, keys::UNBOND_SEQ.to_vec(), &0u64);
        put_value(
            &mut o,
            keys::RANDOMNESS.to_vec(),
            &Hash32::digest(&[b"hypertensor/genesis", genesis.chain_id.as_bytes()]),
        );
        Ok(o.into_changes())
    }

    /// Start-of-block work: mixes the parent hash into the randomness and, on
    /// the first block of an epoch, runs the epoch step for every subnet.
    pub fn begin_block(&self, s: &mut dyn State, ctx: &BlockContext) -> Result<(), StateError> {
        let acc: Hash32 = get_value(s, keys::RANDOMNESS)?.unwrap_or_default();
        let acc = Hash32::digest(&[&acc.0, &ctx.parent_hash.0]);
        put_value(s, keys::RANDOMNESS.to_vec(), &acc);
        if ctx.height > 0 && ctx.height.is_multiple_of(self.params.epoch_length) {
            epochs::epoch_step(self, s, ctx)?;
        }
        if ctx.height > 0 && ctx.height.is_multiple_of(self.params.chain_epoch_blocks) {
            // Before any transaction of the new chain epoch: the state is the
            // one at the end of the previous epoch, which the engine also
            // derived this committee from.
            validators::record_committee(self, s, ctx.height / self.params.chain_epoch_blocks)?;
        }
        Ok(())
    }

    /// Applies one signed transaction. On error nothing changes: the call runs
    /// on a child overlay that is merged only on success.
    pub fn apply_tx(
        &self,
        s: &mut dyn State,
        ctx: &BlockContext,
        stx: &SignedTx,
    ) -> Result<(), TxError> {
        stx.verify(&self.chain_id)?;
        let changes = {
            let mut child = Overlay::new(&*s);
            self.execute(&mut child, ctx, stx)?;
            child.into_changes()
        };
        for (k, v) in changes {
            match v {
                Some(v) => s.put(k, v),
                None => s.delete(&k),
            }
        }
        Ok(())
    }

    fn execute(
        &self,
        s: &mut dyn State,
        ctx: &BlockContext,
        stx: &SignedTx,
    ) -> Result<(), TxError> {
        let tx = &stx.tx;
        let signer = tx.signer;
        let mut acct = accounts::account(s, &signer)?;
        if tx.nonce != acct.nonce {
            return Err(TxError::BadNonce {
                expected: acct.nonce,
                got: tx.nonce,
            });
        }
        let fee = if tx.call.is_free() {
            0
        } else {
            self.params.tx_fee
        };
        if acct.balance < fee {
            return Err(TxError::InsufficientBalance {
                need: fee,
                have: acct.balance,
            });
        }
        acct.balance -= fee;
        acct.nonce += 1;
        accounts::put_account(s, &signer, &acct);
        accounts::burn(s, fee)?;

        match &tx.call {
            Call::Transfer { to, amount } => accounts::transfer(s, &signer, to, *amount)?,
            Call::RegisterSubnet {
                name,
                min_stake,
                max_stake,
            } => {
                subnets::register(self, s, ctx, &signer, name, *min_stake, *max_stake)?;
            }
            Call::ActivateSubnet { subnet } => subnets::activate(self, s, ctx, &signer, *subnet)?,
            Call::PauseSubnet { subnet } => subnets::pause(s, ctx, &signer, *subnet)?,
            Call::UnpauseSubnet { subnet } => subnets::unpause(s, &signer, *subnet)?,
            Call::RegisterNode {
                subnet,
                hotkey,
                peer_id,
                stake,
            } => {
                nodes::register(self, s, ctx, &signer, *subnet, hotkey, peer_id, *stake)?;
            }
            Call::AddStake {
                subnet,
                node,
                amount,
            } => nodes::add_stake(s, &signer, *subnet, *node, *amount)?,
            Call::RemoveStake {
                subnet,
                node,
                amount,
            } => nodes::remove_stake(self, s, ctx, &signer, *subnet, *node, *amount)?,
            Call::Claim => nodes::claim(s, ctx, &signer)?,
            Call::Delegate { subnet, amount } => vaults::delegate(s, &signer, *subnet, *amount)?,
            Call::Undelegate { subnet, shares } => {
                vaults::undelegate(self, s, ctx, &signer, *subnet, *shares)?
            }
            Call::ProposeAttestation { subnet, scores } => {
                epochs::propose(self, s, ctx, &signer, *subnet, scores)?
            }
            Call::Attest { subnet } => epochs::attest(self, s, ctx, &signer, *subnet)?,
            Call::BondValidator {
                consensus_key,
                amount,
            } => validators::bond(self, s, &signer, consensus_key, *amount)?,
            Call::UnbondValidator { amount } => validators::unbond(self, s, ctx, &signer, *amount)?,
        }

        // Every included transaction feeds the election randomness.
        let acc: Hash32 = get_value(s, keys::RANDOMNESS)?.unwrap_or_default();
        put_value(
            s,
            keys::RANDOMNESS.to_vec(),
            &Hash32::digest(&[&acc.0, &stx.hash().0]),
        );
        Ok(())
    }

    /// Applies a whole block: [`Runtime::begin_block`], then every
    /// transaction, each of which must succeed (a producer only includes
    /// transactions that applied, so a failure means the block is invalid).
    pub fn apply_block(
        &self,
        s: &mut dyn State,
        ctx: &BlockContext,
        txs: &[SignedTx],
    ) -> Result<(), LedgerError> {
        self.begin_block(s, ctx)?;
        for (i, tx) in txs.iter().enumerate() {
            self.apply_tx(s, ctx, tx)
                .map_err(|e| LedgerError::InvalidBlock(format!("tx {i}: {e}")))?;
        }
        Ok(())
    }

    /// Sums balances, stakes, vaults and unbonding against the recorded issuance.
    pub fn audit_issuance(s: &dyn StateRead) -> Result<IssuanceAudit, StateError> {
        queries::audit_issuance(s)
    }
}
