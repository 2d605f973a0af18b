//! The JSON-RPC server (jsonrpsee; HTTP and WebSocket on one port).
//!
//! Methods take positional parameters. Amounts are decimal strings.
//! Reads answer from the committed state at the head.
//!
//! | method | params | result |
//! |---|---|---|
//! | `ledger_chainInfo` | | [`ChainInfo`] |
//! | `ledger_head` | | [`Head`] |
//! | `ledger_submitTransaction` | [`SignedTx`] | tx hash |
//! | `ledger_nextNonce` | address | nonce counting pooled txs |
//! | `ledger_getAccount` | address | [`Account`] |
//! | `ledger_getSubnet` | subnet id | [`Subnet`](crate::types::Subnet) or null |
//! | `ledger_listSubnets` | | [`Subnet`](crate::types::Subnet)s |
//! | `ledger_getNode` | subnet id, node id | [`Node`](crate::types::Node) or null |
//! | `ledger_listNodes` | subnet id | [`Node`](crate::types::Node)s |
//! | `ledger_getEpoch` | subnet id | [`EpochInfo`] |
//! | `ledger_getBlock` | height or null (head) | [`Block`](crate::types::Block) or null |
//! | `ledger_getTransaction` | tx hash | [`TxLocation`](crate::types::TxLocation) or null |
//! | `ledger_getVault` | subnet id | [`Vault`] |
//! | `ledger_getDelegation` | subnet id, address | [`Delegation`] |
//! | `ledger_getUnbonding` | address | [`Unbonding`]s |
//! | `ledger_registrationFee` | | [`AmountView`] |
//! | `ledger_proofOfStake` | subnet id, peer id, min class | [`ProofOfStake`](crate::types::ProofOfStake) |
//! | `ledger_audit` | | [`IssuanceAudit`] |
//! | `ledger_chainValidators` | | [`ChainValidator`](crate::types::ChainValidator)s |
//! | `ledger_committee` | chain epoch | its committee ([`ChainValidator`](crate::types::ChainValidator)s) or null |
//! | `ledger_sealBlock` | | the sealed [`Block`](crate::types::Block) (dev chain) |
//! | `ledger_subscribeBlocks` | | notifications `ledger_block` with each [`Block`](crate::types::Block) |

use std::net::SocketAddr;

use jsonrpsee::server::{RpcModule, Server, ServerConfig, ServerHandle};
use jsonrpsee::types::{ErrorObjectOwned, Params};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use crate::chain::BlockProducer;
use crate::error::LedgerError;
use crate::genesis::Params as ChainParams;
use crate::runtime::{
    IssuanceAudit, Runtime, epochs, math, nodes, queries, subnets, validators, vaults,
};
use crate::state::{get_value, keys};
use crate::storage::{Head, Snapshot};
use crate::tx::SignedTx;
use crate::types::{
    Account, Address, Amount, EpochInfo, EpochRecord, Hash32, NodeClass, NodeId, SubnetId,
    Unbonding, Vault, amount,
};

/// Error code for a refused transaction.
pub const TX_REJECTED: i32 = -32010;
/// Error code for a server-side failure.
pub const INTERNAL: i32 = -32000;

/// Chain identity and constants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainInfo {
    /// Chain id (needed to sign).
    pub chain_id: String,
    /// Genesis block hash.
    pub genesis_hash: Hash32,
    /// Runtime constants.
    pub params: ChainParams,
    /// Current head.
    pub head: Head,
}

/// An amount as JSON (a decimal string).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmountView(#[serde(with = "amount")] pub Amount);

/// A delegator's position in a vault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// Shares held.
    #[serde(with = "amount")]
    pub shares: Amount,
    /// Their current value in tokens (rounded down).
    #[serde(with = "amount")]
    pub value: Amount,
}

fn err(e: LedgerError) -> ErrorObjectOwned {
    match e {
        LedgerError::Tx(t) => ErrorObjectOwned::owned(TX_REJECTED, t.to_string(), None::<()>),
        other => ErrorObjectOwned::owned(INTERNAL, other.to_string(), None::<()>),
    }
}

fn snap<P: BlockProducer>(p: &P) -> Result<Snapshot, ErrorObjectOwned> {
    p.store().snapshot().map_err(err)
}

fn st<T>(r: Result<T, crate::error::StateError>) -> Result<T, ErrorObjectOwned> {
    r.map_err(|e| err(e.into()))
}

/// The epoch view of a subnet at a snapshot.
pub fn epoch_info(rt: &Runtime, s: &Snapshot, subnet: SubnetId) -> Result<EpochInfo, LedgerError> {
    let height = s.head().header.height;
    let epoch = epochs::epoch_of(rt, height);
    let record: Option<EpochRecord> = epochs::record(s, subnet)?;
    Ok(EpochInfo {
        height,
        epoch,
        epoch_length: rt.params.epoch_length,
        next_epoch_at: (epoch + 1) * rt.params.epoch_length,
        record: record.filter(|r| r.epoch == epoch),
    })
}

/// Builds the RPC module over a block producer.
pub fn module<P: BlockProducer>(producer: P) -> Result<RpcModule<P>, LedgerError> {
    let mut m = RpcModule::new(producer);
    let reg = |e: jsonrpsee::server::RegisterMethodError| LedgerError::Rpc(e.to_string());

    m.register_method("ledger_chainInfo", |_, p, _| {
        Ok::<_, ErrorObjectOwned>(ChainInfo {
            chain_id: p.runtime().chain_id.clone(),
            genesis_hash: p.store().genesis_hash(),
            params: p.runtime().params.clone(),
            head: p.store().head(),
        })
    })
    .map_err(reg)?;
    m.register_method("ledger_head", |_, p, _| {
        Ok::<_, ErrorObjectOwned>(p.store().head())
    })
    .map_err(reg)?;
    m.register_method("ledger_submitTransaction", |params: Params, p, _| {
        let (tx,): (SignedTx,) = params.parse()?;
        p.submit(tx).map_err(err)
    })
    .map_err(reg)?;
    m.register_method("ledger_nextNonce", |params: Params, p, _| {
        let (a,): (Address,) = params.parse()?;
        p.pending_nonce(&a).map_err(err)
    })
    .map_err(reg)?;
    m.register_method("ledger_getAccount", |params: Params, p, _| {
        let (a,): (Address,) = params.parse()?;
        let s = snap(p)?;
        st::<Account>(crate::runtime::accounts::account(&s, &a))
    })
    .map_err(reg)?;
    m.register_method("ledger_getSubnet", |params: Params, p, _| {
        let (id,): (SubnetId,) = params.parse()?;
        let s = snap(p)?;
        st(get_value::<crate::types::Subnet>(&s, &keys::subnet(id)))
    })
    .map_err(reg)?;
    m.register_method("ledger_listSubnets", |_, p, _| {
        let s = snap(p)?;
        st(subnets::all(&s))
    })
    .map_err(reg)?;
    m.register_method("ledger_getNode", |params: Params, p, _| {
        let (sn, id): (SubnetId, NodeId) = params.parse()?;
        let s = snap(p)?;
        st(get_value::<crate::types::Node>(&s, &keys::node(sn, id)))
    })
    .map_err(reg)?;
    m.register_method("ledger_listNodes", |params: Params, p, _| {
        let (sn,): (SubnetId,) = params.parse()?;
        let s = snap(p)?;
        let all = st(nodes::all(&s, sn))?;
        Ok::<_, ErrorObjectOwned>(all.into_iter().map(|(_, n)| n).collect::<Vec<_>>())
    })
    .map_err(reg)?;
    m.register_method("ledger_getEpoch", |params: Params, p, _| {
        let (sn,): (SubnetId,) = params.parse()?;
        let s = snap(p)?;
        epoch_info(p.runtime(), &s, sn).map_err(err)
    })
    .map_err(reg)?;
    m.register_method("ledger_getBlock", |params: Params, p, _| {
        let (h,): (Option<u64>,) = params.parse().unwrap_or((None,));
        let h = h.unwrap_or_else(|| p.store().head().header.height);
        p.store().block(h).map_err(err)
    })
    .map_err(reg)?;
    m.register_method("ledger_getTransaction", |params: Params, p, _| {
        let (h,): (Hash32,) = params.parse()?;
        p.store().tx_location(&h).map_err(err)
    })
    .map_err(reg)?;
    m.register_method("ledger_getVault", |params: Params, p, _| {
        let (sn,): (SubnetId,) = params.parse()?;
        let s = snap(p)?;
        st::<Vault>(vaults::load(&s, sn))
    })
    .map_err(reg)?;
    m.register_method("ledger_getDelegation", |params: Params, p, _| {
        let (sn, a): (SubnetId, Address) = params.parse()?;
        let s = snap(p)?;
        let shares = st(vaults::shares(&s, sn, &a))?;
        let v = st(vaults::load(&s, sn))?;
        let value = math::mul_div(shares, v.total_stake, v.total_shares).unwrap_or(0);
        Ok::<_, ErrorObjectOwned>(Delegation { shares, value })
    })
    .map_err(reg)?;
    m.register_method("ledger_getUnbonding", |params: Params, p, _| {
        let (a,): (Address,) = params.parse()?;
        let s = snap(p)?;
        st::<Vec<Unbonding>>(nodes::unbonding(&s, &a))
    })
    .map_err(reg)?;
    m.register_method("ledger_registrationFee", |_, p, _| {
        let s = snap(p)?;
        let h = s.head().header.height + 1;
        st(subnets::registration_fee(&p.runtime().params, &s, h)).map(AmountView)
    })
    .map_err(reg)?;
    m.register_method("ledger_proofOfStake", |params: Params, p, _| {
        let (sn, peer, class): (SubnetId, String, NodeClass) = params.parse()?;
        let s = snap(p)?;
        let h = s.head().header.height;
        st(queries::proof_of_stake(&s, sn, &peer, class, h))
    })
    .map_err(reg)?;
    m.register_method("ledger_audit", |_, p, _| {
        let s = snap(p)?;
        st::<IssuanceAudit>(queries::audit_issuance(&s))
    })
    .map_err(reg)?;
    m.register_method("ledger_chainValidators", |_, p, _| {
        let s = snap(p)?;
        st(validators::all(&s))
    })
    .map_err(reg)?;
    m.register_method("ledger_committee", |params: Params, p, _| {
        let (e,): (u64,) = params.parse()?;
        let s = snap(p)?;
        st(validators::committee(&s, e))
    })
    .map_err(reg)?;
    m.register_async_method("ledger_sealBlock", |_, p, _| async move {
        p.seal_now().await.map(|b| (*b).clone()).map_err(err)
    })
    .map_err(reg)?;
    m.register_subscription(
        "ledger_subscribeBlocks",
        "ledger_block",
        "ledger_unsubscribeBlocks",
        |_, pending, p, _| async move {
            let mut rx = p.subscribe();
            let Ok(sink) = pending.accept().await else {
                return;
            };
            loop {
                tokio::select! {
                    _ = sink.closed() => break,
                    r = rx.recv() => match r {
                        Ok(block) => {
                            let Ok(msg) = serde_json::value::to_raw_value(&*block) else { break };
                            if sink.send(msg).await.is_err() {
                                break;
                            }
                        }
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "block subscriber lagging");
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            }
        },
    )
    .map_err(reg)?;
    Ok(m)
}

/// A running RPC server.
#[derive(Debug, Clone)]
pub struct RpcServer {
    /// The bound address (useful when asked for port 0).
    pub addr: SocketAddr,
    /// Stops the server.
    pub handle: ServerHandle,
}

impl RpcServer {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Binds `addr` and serves the ledger RPC over `producer`.
pub async fn serve<P: BlockProducer>(
    producer: P,
    addr: SocketAddr,
) -> Result<RpcServer, LedgerError> {
    let module = module(producer)?;
    let config = ServerConfig::builder()
        .max_response_body_size(64 * 1024 * 1024)
        .build();
    let server = Server::builder()
        .set_config(config)
        .build(addr)
        .await
        .map_err(|e| LedgerError::Rpc(format!("cannot bind {addr}: {e}")))?;
    let addr = server.local_addr()?;
    let handle = server.start(module);
    tracing::info!(%addr, "rpc listening");
    Ok(RpcServer { addr, handle })
}
