//! A typed client for the ledger's JSON-RPC, for the CLI, the validator and
//! the servers: queries, `proof_of_stake`, signing and submitting
//! transactions, waiting for inclusion and block subscriptions.
//!
//! It speaks WebSocket (subscriptions need it); `http://` URLs are accepted
//! and mapped to `ws://` on the same port, since the server serves both.

use std::sync::Arc;
use std::time::Duration;

use jsonrpsee::core::client::{ClientT, Subscription, SubscriptionClientT};
use jsonrpsee::core::rpc_params;
use jsonrpsee_ws_client::{WsClient, WsClientBuilder};
use serde::de::DeserializeOwned;

use crate::error::LedgerError;
use crate::rpc::{AmountView, ChainInfo, Delegation, TX_REJECTED};
use crate::runtime::IssuanceAudit;
use crate::storage::Head;
use crate::tx::{Call, Keypair, SignedTx, Tx};
use crate::types::{
    Account, Address, Amount, Block, EpochInfo, Hash32, Node, NodeClass, NodeId, ProofOfStake,
    Subnet, SubnetId, TxLocation, Unbonding, Vault,
};

/// A connected ledger RPC client; clones share one connection.
#[derive(Clone)]
pub struct LedgerClient {
    inner: Arc<WsClient>,
    chain_id: Arc<tokio::sync::OnceCell<String>>,
}

impl std::fmt::Debug for LedgerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerClient").finish_non_exhaustive()
    }
}

fn rpc_err(e: jsonrpsee::core::ClientError) -> LedgerError {
    match e {
        jsonrpsee::core::ClientError::Call(obj) if obj.code() == TX_REJECTED => {
            LedgerError::Rpc(format!("transaction rejected: {}", obj.message()))
        }
        jsonrpsee::core::ClientError::Call(obj) => LedgerError::Rpc(obj.message().to_string()),
        other => LedgerError::Rpc(other.to_string()),
    }
}

/// Maps `http(s)://` to `ws(s)://`; other URLs pass through.
pub fn ws_url(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        url.to_string()
    }
}

impl LedgerClient {
    /// Connects to `url` (`http://` or `ws://`).
    pub async fn connect(url: &str) -> Result<LedgerClient, LedgerError> {
        let inner = WsClientBuilder::default()
            .max_response_size(64 * 1024 * 1024)
            .request_timeout(Duration::from_secs(30))
            .build(ws_url(url))
            .await
            .map_err(|e| LedgerError::Rpc(format!("cannot connect to {url}: {e}")))?;
        Ok(LedgerClient {
            inner: Arc::new(inner),
            chain_id: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        params: jsonrpsee::core::params::ArrayParams,
    ) -> Result<T, LedgerError> {
        self.inner.request(method, params).await.map_err(rpc_err)
    }

    /// Chain id, genesis hash, params and head.
    pub async fn chain_info(&self) -> Result<ChainInfo, LedgerError> {
        self.call("ledger_chainInfo", rpc_params![]).await
    }

    /// The committed head.
    pub async fn head(&self) -> Result<Head, LedgerError> {
        self.call("ledger_head", rpc_params![]).await
    }

    /// Submits a signed transaction; the error says why it was refused.
    pub async fn submit(&self, tx: &SignedTx) -> Result<Hash32, LedgerError> {
        self.call("ledger_submitTransaction", rpc_params![tx]).await
    }

    /// The next nonce of an account, counting pooled transactions.
    pub async fn next_nonce(&self, who: &Address) -> Result<u64, LedgerError> {
        self.call("ledger_nextNonce", rpc_params![who]).await
    }

    /// Signs `call` with `key` at its next nonce and submits it.
    pub async fn sign_and_submit(&self, key: &Keypair, call: Call) -> Result<Hash32, LedgerError> {
        let chain_id = self
            .chain_id
            .get_or_try_init(|| async { self.chain_info().await.map(|c| c.chain_id) })
            .await?;
        let nonce = self.next_nonce(&key.address()).await?;
        let tx = Tx {
            signer: key.address(),
            nonce,
            call,
        }
        .sign(key, chain_id);
        self.submit(&tx).await
    }

    /// Polls until the transaction is committed or `timeout` passes.
    pub async fn wait_for_tx(
        &self,
        hash: &Hash32,
        timeout: Duration,
    ) -> Result<TxLocation, LedgerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(loc) = self.transaction(hash).await? {
                return Ok(loc);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LedgerError::Rpc(format!(
                    "transaction {hash} not committed within {timeout:?} (dropped at sealing?)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An account (committed state).
    pub async fn account(&self, who: &Address) -> Result<Account, LedgerError> {
        self.call("ledger_getAccount", rpc_params![who]).await
    }

    /// A subnet.
    pub async fn subnet(&self, id: SubnetId) -> Result<Option<Subnet>, LedgerError> {
        self.call("ledger_getSubnet", rpc_params![id]).await
    }

    /// Every subnet.
    pub async fn subnets(&self) -> Result<Vec<Subnet>, LedgerError> {
        self.call("ledger_listSubnets", rpc_params![]).await
    }

    /// A node.
    pub async fn node(&self, subnet: SubnetId, id: NodeId) -> Result<Option<Node>, LedgerError> {
        self.call("ledger_getNode", rpc_params![subnet, id]).await
    }

    /// Every node of a subnet.
    pub async fn nodes(&self, subnet: SubnetId) -> Result<Vec<Node>, LedgerError> {
        self.call("ledger_listNodes", rpc_params![subnet]).await
    }

    /// The epoch view of a subnet.
    pub async fn epoch(&self, subnet: SubnetId) -> Result<EpochInfo, LedgerError> {
        self.call("ledger_getEpoch", rpc_params![subnet]).await
    }

    /// A block (`None`: the head).
    pub async fn block(&self, height: Option<u64>) -> Result<Option<Block>, LedgerError> {
        self.call("ledger_getBlock", rpc_params![height]).await
    }

    /// Where a committed transaction is.
    pub async fn transaction(&self, hash: &Hash32) -> Result<Option<TxLocation>, LedgerError> {
        self.call("ledger_getTransaction", rpc_params![hash]).await
    }

    /// A subnet's vault.
    pub async fn vault(&self, subnet: SubnetId) -> Result<Vault, LedgerError> {
        self.call("ledger_getVault", rpc_params![subnet]).await
    }

    /// A delegator's position.
    pub async fn delegation(
        &self,
        subnet: SubnetId,
        who: &Address,
    ) -> Result<Delegation, LedgerError> {
        self.call("ledger_getDelegation", rpc_params![subnet, who])
            .await
    }

    /// Unbonding entries of an account.
    pub async fn unbonding(&self, who: &Address) -> Result<Vec<Unbonding>, LedgerError> {
        self.call("ledger_getUnbonding", rpc_params![who]).await
    }

    /// The subnet registration fee for the next block.
    pub async fn registration_fee(&self) -> Result<Amount, LedgerError> {
        let v: AmountView = self.call("ledger_registrationFee", rpc_params![]).await?;
        Ok(v.0)
    }

    /// Whether `peer_id` is staked in `subnet` with at least `min_class`.
    pub async fn proof_of_stake(
        &self,
        subnet: SubnetId,
        peer_id: &str,
        min_class: NodeClass,
    ) -> Result<ProofOfStake, LedgerError> {
        self.call(
            "ledger_proofOfStake",
            rpc_params![subnet, peer_id, min_class],
        )
        .await
    }

    /// The issuance audit at the head.
    pub async fn audit(&self) -> Result<IssuanceAudit, LedgerError> {
        self.call("ledger_audit", rpc_params![]).await
    }

    /// Every bonded chain validator.
    pub async fn chain_validators(&self) -> Result<Vec<crate::types::ChainValidator>, LedgerError> {
        self.call("ledger_chainValidators", rpc_params![]).await
    }

    /// The committee recorded for a chain epoch (null until its first block).
    pub async fn committee(
        &self,
        epoch: u64,
    ) -> Result<Option<Vec<crate::types::ChainValidator>>, LedgerError> {
        self.call("ledger_committee", rpc_params![epoch]).await
    }

    /// Asks the dev chain to seal a block now.
    pub async fn seal_block(&self) -> Result<Block, LedgerError> {
        self.call("ledger_sealBlock", rpc_params![]).await
    }

    /// New blocks as they are committed.
    pub async fn subscribe_blocks(&self) -> Result<Subscription<Block>, LedgerError> {
        self.inner
            .subscribe(
                "ledger_subscribeBlocks",
                rpc_params![],
                "ledger_unsubscribeBlocks",
            )
            .await
            .map_err(rpc_err)
    }
}
