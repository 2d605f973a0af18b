//! The proof-of-stake gate: which peers a server answers.
//!
//! A server started with a gate asks it about every peer that opens a
//! stream; a refused peer gets one `Forbidden` error frame that says why.
//! [`StakeGate`] admits peers whose peer id is a node of the server's subnet
//! with at least a given class, as the ledger's `proof_of_stake` RPC answers,
//! and remembers each answer for a while so the chain is not asked on every
//! stream.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ledger::rpc_client::LedgerClient;
use ledger::types::{NodeClass, SubnetId};
use libp2p::PeerId;

/// Decides which peers may use a server.
pub trait PeerGate: std::fmt::Debug + Send + Sync + 'static {
    /// `Ok` when `peer` may use the server; otherwise the reason, sent to the
    /// peer in the error frame.
    fn admit<'a>(&'a self, peer: &'a PeerId) -> BoxFuture<'a, Result<(), String>>;
}

/// The chain's answer about a peer, and when it was given.
type Answer = (Instant, Result<(), String>);

/// Admits peers staked in a subnet, per the ledger, with cached answers.
pub struct StakeGate {
    ledger: LedgerClient,
    subnet: SubnetId,
    min_class: NodeClass,
    ttl: Duration,
    answers: Mutex<HashMap<PeerId, Answer>>,
}

impl std::fmt::Debug for StakeGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StakeGate")
            .field("subnet", &self.subnet)
            .field("min_class", &self.min_class)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl StakeGate {
    /// A gate for `subnet` that admits nodes of at least `min_class`, asking
    /// the chain again about a peer once its answer is `ttl` old.
    pub fn new(
        ledger: LedgerClient,
        subnet: SubnetId,
        min_class: NodeClass,
        ttl: Duration,
    ) -> Self {
        Self {
            ledger,
            subnet,
            min_class,
            ttl,
            answers: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, peer: &PeerId) -> Option<Result<(), String>> {
        let answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        let (at, answer) = answers.get(peer)?;
        (at.elapsed() < self.ttl).then(|| answer.clone())
    }

    async fn ask(&self, peer: &PeerId) -> Result<(), String> {
        if let Some(answer) = self.cached(peer) {
            return answer;
        }
        let proof = self
            .ledger
            .proof_of_stake(self.subnet, &peer.to_string(), self.min_class)
            .await
            // Not cached: the chain may be back on the next stream.
            .map_err(|e| format!("cannot check stake on the chain: {e}"))?;
        let answer = if proof.staked {
            Ok(())
        } else {
            Err(match proof.node {
                Some(n) => format!(
                    "peer {peer} is node {} of subnet {} with class {:?} and stake {}; \
                     this server admits class {:?} or above with the subnet's minimum stake",
                    n.id,
                    self.subnet,
                    n.class,
                    ledger::types::format_tokens(n.stake),
                    self.min_class
                ),
                None => format!(
                    "peer {peer} is not a staked node of subnet {}; register it with \
                     `hypertensor tx register-node --subnet {} --peer-id {peer} ...`",
                    self.subnet, self.subnet
                ),
            })
        };
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        answers.retain(|_, (at, _)| at.elapsed() < self.ttl);
        answers.insert(*peer, (Instant::now(), answer.clone()));
        answer
    }
}

impl PeerGate for StakeGate {
    fn admit<'a>(&'a self, peer: &'a PeerId) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.ask(peer))
    }
}
