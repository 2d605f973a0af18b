//! Genesis configuration: the chain id, every runtime constant and the
//! initial balances, read from TOML or JSON.
//!
//! Every field of [`Params`] may be omitted; the documented default applies.
//! Amounts are decimal strings of smallest units (10^18 per token) because
//! TOML integers stop at 2^63.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::types::{Address, Amount, PPM, Ppm, TOKEN, amount};

/// Runtime constants. Reputations, cuts and thresholds are parts per million.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Blocks per epoch. Default 30 (30 s at the dev chain's 1 s blocks).
    pub epoch_length: u64,
    /// Flat fee of every non-consensus transaction, burned. Default 0.001 token.
    #[serde(with = "amount")]
    pub tx_fee: Amount,
    /// Most transactions per block. Default 10,000.
    pub max_block_txs: u32,

    /// Subnet registration fee floor, burned. Default 100 tokens.
    #[serde(with = "amount")]
    pub subnet_base_fee: Amount,
    /// Blocks over which the doubled fee decays linearly back to the floor. Default 7,200.
    pub subnet_fee_decay_blocks: u64,
    /// Nodes needed to activate, and to stay active. Default 3.
    pub min_subnet_nodes: u32,
    /// Most nodes per subnet. Default 65,536.
    pub max_subnet_nodes: u32,
    /// A registered subnet not activated within this many blocks is removed. Default 86,400.
    pub max_registration_blocks: u64,
    /// A subnet paused longer than this many blocks is removed. Default 86,400.
    pub max_pause_blocks: u64,
    /// An active subnet below `min_subnet_nodes` for more than this many
    /// consecutive epochs is removed. Default 3.
    pub max_low_node_epochs: u32,
    /// Initial subnet reputation. Default 500,000 (0.5).
    pub subnet_initial_reputation: Ppm,
    /// Subnets below this reputation are removed. Default 100,000 (0.1).
    pub subnet_min_reputation: Ppm,
    /// Subnet reputation gained per attested epoch. Default 10,000.
    pub subnet_reputation_gain: Ppm,
    /// Subnet reputation lost per epoch without an attested proposal. Default 20,000.
    pub subnet_reputation_loss: Ppm,
    /// Lowest `min_stake` a subnet may set. Default 1 token.
    #[serde(with = "amount")]
    pub min_stake_floor: Amount,
    /// Highest `max_stake` a subnet may set. Default 1,000,000 tokens.
    #[serde(with = "amount")]
    pub max_stake_ceiling: Amount,

    /// Blocks before unstaked funds can be claimed. Default 3,600.
    pub unbonding_blocks: u64,
    /// Blocks before undelegated funds can be claimed. Default 3,600.
    pub delegate_cooldown_blocks: u64,
    /// Epochs in consensus that promote an Included node to Validator. Default 3.
    pub promotion_epochs: u32,
    /// Initial node reputation. Default 500,000 (0.5).
    pub node_initial_reputation: Ppm,
    /// Nodes below this reputation are removed and their stake unbonds. Default 100,000.
    pub node_min_reputation: Ppm,
    /// Reputation gained for a score above zero in an attested epoch. Default 20,000.
    pub node_reputation_gain: Ppm,
    /// Reputation lost by a scored-class node scored zero or left out. Default 50,000.
    pub node_zero_score_loss: Ppm,
    /// Reputation lost by a Validator-class node that did not attest an attested epoch. Default 50,000.
    pub node_no_attest_loss: Ppm,
    /// Reputation lost by an elected validator that proposed nothing. Default 200,000.
    pub missed_proposal_loss: Ppm,
    /// Reputation lost by a validator whose proposal fell below the threshold. Default 200,000.
    pub failed_proposal_loss: Ppm,
    /// Share of its stake a validator loses (burned) when its proposal falls
    /// below the threshold. Default 50,000 (5%).
    pub failed_proposal_slash: Ppm,
    /// Share of Validator-class nodes that must attest. Default 660,000 (66%).
    pub attestation_threshold: Ppm,

    /// Tokens minted per active subnet per attested epoch. Default 10 tokens.
    #[serde(with = "amount")]
    pub emission_per_epoch: Amount,
    /// Owner's cut of the emission. Default 100,000 (10%).
    pub owner_cut: Ppm,
    /// Delegators' cut, added to the vault (paid to nodes when the vault is empty). Default 200,000 (20%).
    pub delegator_cut: Ppm,

    /// Chain validators on each chain epoch's BFT committee: the top N by
    /// bond at the end of the previous chain epoch. Default 100.
    pub committee_size: u32,
    /// Blocks per chain epoch (the BFT committee's term; unrelated to
    /// subnet epochs); at least 2. Default 100.
    pub chain_epoch_blocks: u64,
    /// Smallest bond a chain validator may hold. Default 1 token.
    #[serde(with = "amount")]
    pub min_validator_bond: Amount,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            epoch_length: 30,
            tx_fee: TOKEN / 1000,
            max_block_txs: 10_000,
            subnet_base_fee: 100 * TOKEN,
            subnet_fee_decay_blocks: 7_200,
            min_subnet_nodes: 3,
            max_subnet_nodes: 65_536,
            max_registration_blocks: 86_400,
            max_pause_blocks: 86_400,
            max_low_node_epochs: 3,
            subnet_initial_reputation: 500_000,
            subnet_min_reputation: 100_000,
            subnet_reputation_gain: 10_000,
            subnet_reputation_loss: 20_000,
            min_stake_floor: TOKEN,
            max_stake_ceiling: 1_000_000 * TOKEN,
            unbonding_blocks: 3_600,
            delegate_cooldown_blocks: 3_600,
            promotion_epochs: 3,
            node_initial_reputation: 500_000,
            node_min_reputation: 100_000,
            node_reputation_gain: 20_000,
            node_zero_score_loss: 50_000,
            node_no_attest_loss: 50_000,
            missed_proposal_loss: 200_000,
            failed_proposal_loss: 200_000,
            failed_proposal_slash: 50_000,
            attestation_threshold: 660_000,
            emission_per_epoch: 10 * TOKEN,
            owner_cut: 100_000,
            delegator_cut: 200_000,
            committee_size: 100,
            chain_epoch_blocks: 100,
            min_validator_bond: TOKEN,
        }
    }
}

impl Params {
    /// Checks ranges the runtime relies on.
    pub fn validate(&self) -> Result<(), LedgerError> {
        let bad = |m: &str| Err(LedgerError::Genesis(m.to_string()));
        if self.epoch_length == 0 {
            return bad("epoch_length must be > 0");
        }
        if self.subnet_fee_decay_blocks == 0 {
            return bad("subnet_fee_decay_blocks must be > 0");
        }
        if self.min_stake_floor == 0 || self.min_stake_floor > self.max_stake_ceiling {
            return bad("need 0 < min_stake_floor <= max_stake_ceiling");
        }
        if self.min_subnet_nodes == 0 || self.min_subnet_nodes > self.max_subnet_nodes {
            return bad("need 0 < min_subnet_nodes <= max_subnet_nodes");
        }
        let ppms = [
            self.subnet_initial_reputation,
            self.subnet_min_reputation,
            self.subnet_reputation_gain,
            self.subnet_reputation_loss,
            self.node_initial_reputation,
            self.node_min_reputation,
            self.node_reputation_gain,
            self.node_zero_score_loss,
            self.node_no_attest_loss,
            self.missed_proposal_loss,
            self.failed_proposal_loss,
            self.failed_proposal_slash,
            self.attestation_threshold,
            self.owner_cut,
            self.delegator_cut,
        ];
        if ppms.iter().any(|&p| p > PPM) {
            return bad("parts-per-million values must be <= 1,000,000");
        }
        if self.committee_size == 0 || self.chain_epoch_blocks < 2 {
            return bad("need committee_size > 0 and chain_epoch_blocks >= 2");
        }
        if self.owner_cut + self.delegator_cut > PPM {
            return bad("owner_cut + delegator_cut must be <= 1,000,000");
        }
        Ok(())
    }
}

/// One initial balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisBalance {
    /// Account.
    pub address: Address,
    /// Balance in smallest units.
    #[serde(with = "amount")]
    pub amount: Amount,
}

/// A chain validator bonded at genesis. The bond is new issuance, like a balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisValidator {
    /// Bonding account.
    pub address: Address,
    /// Consensus (vote-signing and p2p) public key.
    pub consensus_key: Address,
    /// Bond in smallest units.
    #[serde(with = "amount")]
    pub bond: Amount,
}

/// The genesis configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    /// Chain id, part of every signature.
    pub chain_id: String,
    /// Runtime constants.
    #[serde(default)]
    pub params: Params,
    /// Initial balances; with the validator bonds they make up the initial total issuance.
    #[serde(default)]
    pub balances: Vec<GenesisBalance>,
    /// Chain validators bonded at genesis: the first committee is drawn from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validators: Vec<GenesisValidator>,
}

impl Genesis {
    /// A dev genesis: default params and the given balances.
    pub fn dev(balances: &[(Address, Amount)]) -> Genesis {
        Genesis {
            chain_id: "hypertensor-dev".into(),
            params: Params::default(),
            balances: balances
                .iter()
                .map(|&(address, amount)| GenesisBalance { address, amount })
                .collect(),
            validators: Vec::new(),
        }
    }

    /// Reads a genesis file: JSON when it ends in `.json`, TOML otherwise.
    pub fn load(path: &Path) -> Result<Genesis, LedgerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LedgerError::Genesis(format!("cannot read {}: {e}", path.display())))?;
        let g = if path.extension().is_some_and(|e| e == "json") {
            Genesis::from_json(&text)?
        } else {
            Genesis::from_toml(&text)?
        };
        Ok(g)
    }

    /// Parses TOML and validates.
    pub fn from_toml(text: &str) -> Result<Genesis, LedgerError> {
        let g: Genesis = toml::from_str(text).map_err(|e| LedgerError::Genesis(e.to_string()))?;
        g.validate()?;
        Ok(g)
    }

    /// Parses JSON and validates.
    pub fn from_json(text: &str) -> Result<Genesis, LedgerError> {
        let g: Genesis =
            serde_json::from_str(text).map_err(|e| LedgerError::Genesis(e.to_string()))?;
        g.validate()?;
        Ok(g)
    }

    /// Writes the genesis: JSON when the path ends in `.json`, TOML otherwise.
    pub fn save(&self, path: &Path) -> Result<(), LedgerError> {
        let text = if path.extension().is_some_and(|e| e == "json") {
            serde_json::to_string_pretty(self).map_err(|e| LedgerError::Genesis(e.to_string()))?
        } else {
            toml::to_string_pretty(self).map_err(|e| LedgerError::Genesis(e.to_string()))?
        };
        std::fs::write(path, text)?;
        Ok(())
    }

    /// Checks the params, the chain id and that no account appears twice.
    pub fn validate(&self) -> Result<(), LedgerError> {
        self.params.validate()?;
        if self.chain_id.is_empty() || self.chain_id.len() > 64 {
            return Err(LedgerError::Genesis("chain_id must be 1..=64 bytes".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut total: Amount = 0;
        for b in &self.balances {
            if !seen.insert(b.address) {
                return Err(LedgerError::Genesis(format!(
                    "account {} listed twice",
                    b.address
                )));
            }
            total = total
                .checked_add(b.amount)
                .ok_or_else(|| LedgerError::Genesis("total issuance overflows".into()))?;
        }
        let mut keys = std::collections::BTreeSet::new();
        let mut bonded = std::collections::BTreeSet::new();
        for v in &self.validators {
            if !bonded.insert(v.address) || !keys.insert(v.consensus_key) {
                return Err(LedgerError::Genesis(format!(
                    "validator {} or its consensus key listed twice",
                    v.address
                )));
            }
            if v.bond < self.params.min_validator_bond {
                return Err(LedgerError::Genesis(format!(
                    "validator {} bonds less than min_validator_bond",
                    v.address
                )));
            }
            total = total
                .checked_add(v.bond)
                .ok_or_else(|| LedgerError::Genesis("total issuance overflows".into()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_defaults_and_overrides() {
        let text = r#"
chain_id = "t"
[params]
epoch_length = 5
tx_fee = "7"
[[balances]]
address = "0101010101010101010101010101010101010101010101010101010101010101"
amount = "1000000000000000000000000"
"#;
        let g = Genesis::from_toml(text).unwrap();
        assert_eq!(g.params.epoch_length, 5);
        assert_eq!(g.params.tx_fee, 7);
        assert_eq!(g.params.min_subnet_nodes, 3);
        assert_eq!(g.balances[0].amount, 1_000_000 * TOKEN);
        let round = Genesis::from_toml(&toml::to_string(&g).unwrap()).unwrap();
        assert_eq!(round, g);
        let json = Genesis::from_json(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(json, g);
    }

    #[test]
    fn rejects_bad_params() {
        let mut g = Genesis::dev(&[]);
        g.params.owner_cut = 900_000;
        g.params.delegator_cut = 200_000;
        assert!(g.validate().is_err());
        let mut g = Genesis::dev(&[(Address([1; 32]), 1), (Address([1; 32]), 2)]);
        assert!(g.validate().is_err());
        g.balances.pop();
        assert!(g.validate().is_ok());
    }
}
