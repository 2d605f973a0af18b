//! One validator: marshal (block dissemination, backfill, ordered finalized
//! delivery), the finalizer that commits finalized blocks to redb, the
//! mempool gossip, and the orchestrator that runs one simplex engine per
//! chain epoch and swaps it at the epoch boundary, as commonware's reshare
//! example does.
//!
//! Everything is generic over the commonware runtime and the p2p network,
//! so the same code runs on tokio with authenticated p2p in production and
//! on the deterministic runtime with the simulated network in tests.
//! [`start`] spawns the whole validator as one task: aborting its handle
//! stops (crashes) everything it started.

use std::collections::BTreeMap;
use std::num::{NonZeroU16, NonZeroU64, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commonware_broadcast::buffered;
use commonware_consensus::Reporter;
use commonware_consensus::marshal::core::{Actor as Marshal, Mailbox as MarshalMailbox};
use commonware_consensus::marshal::resolver::p2p as marshal_resolver;
use commonware_consensus::marshal::standard::{Inline, Standard};
use commonware_consensus::marshal::{self, Update};
use commonware_consensus::simplex::{self, elector::RoundRobin};
use commonware_consensus::types::{Epoch, Epocher as _, FixedEpocher, Height, ViewDelta};
use commonware_cryptography::certificate::{Provider, Scoped};
use commonware_cryptography::sha256::Sha256;
use commonware_cryptography::{Digested, Digestible as _, Signer as _};
use commonware_p2p::utils::mux::{Builder as _, MuxHandle, Muxer};
use commonware_p2p::{Blocker, Provider as PeerProvider, Receiver, Recipients, Sender};
use commonware_parallel::Sequential;
use commonware_runtime::buffer::paged::CacheRef;
use commonware_runtime::{Clock, Handle, Metrics, Spawner, Storage};
use commonware_storage::archive::immutable;
use commonware_utils::acknowledgement::Exact;
use commonware_utils::vec::NonEmptyVec;
use commonware_utils::{Acknowledgement as _, NZDuration, ordered::Set};
use futures::StreamExt as _;
use futures::channel::mpsc;
use ledger::SignedTx;
use ledger::types::ChainValidator;

use crate::app::LedgerApp;
use crate::block::ChainBlock;
use crate::chain::{Chain, lock};
use crate::{ConsensusError, Digest, PrivateKey, PublicKey, Scheme};

/// Consensus timing. The defaults suit a LAN or loopback.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// How long a view waits for the leader's proposal.
    pub leader: Duration,
    /// How long a view waits for certification before nullifying.
    pub certification: Duration,
    /// How often votes are re-broadcast while stuck.
    pub retry: Duration,
    /// After this long without progress a silent leader is skipped.
    pub skip: Duration,
    /// Shortest time between a block and its child, so an idle chain does
    /// not spin out empty blocks as fast as the network allows.
    pub block_interval: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            leader: Duration::from_secs(1),
            certification: Duration::from_secs(2),
            retry: Duration::from_millis(1500),
            skip: Duration::from_secs(5),
            block_interval: Duration::from_millis(100),
        }
    }
}

/// The six p2p channels a validator uses, each a (sender, receiver) pair.
pub struct Channels<S, R> {
    /// Simplex votes (multiplexed by epoch).
    pub votes: (S, R),
    /// Simplex certificates (multiplexed by epoch).
    pub certificates: (S, R),
    /// Simplex's certificate resolver (multiplexed by epoch).
    pub resolver: (S, R),
    /// Marshal backfill requests and responses.
    pub backfill: (S, R),
    /// Marshal's block broadcast buffer.
    pub broadcast: (S, R),
    /// Mempool gossip.
    pub mempool: (S, R),
}

/// Channel numbers, the same on every validator.
pub mod channel {
    /// Simplex votes.
    pub const VOTES: u64 = 0;
    /// Simplex certificates.
    pub const CERTIFICATES: u64 = 1;
    /// Simplex resolver.
    pub const RESOLVER: u64 = 2;
    /// Marshal backfill.
    pub const BACKFILL: u64 = 3;
    /// Marshal broadcast.
    pub const BROADCAST: u64 = 4;
    /// Mempool gossip.
    pub const MEMPOOL: u64 = 5;
}

/// A validator's settings.
pub struct Config<B, M> {
    /// The consensus key (signs votes; the p2p identity too).
    pub signer: PrivateKey,
    /// The ledger view (store, runtime, mempool).
    pub chain: Arc<Chain>,
    /// Blocks misbehaving peers on the p2p network.
    pub blocker: B,
    /// The p2p network's peer sets (for broadcast and backfill).
    pub peers: M,
    /// Prefix of every storage partition this validator writes.
    pub partition_prefix: String,
    /// Signing namespace (the chain id), so votes are valid on one chain only.
    pub namespace: Vec<u8>,
    /// Timing.
    pub timeouts: Timeouts,
    /// Largest encoded block.
    pub max_block_bytes: usize,
    /// Transactions submitted locally, to gossip to the other validators.
    pub gossip: mpsc::UnboundedReceiver<SignedTx>,
}

/// The committee of each chain epoch as certificate schemes, for marshal
/// (to check finalizations of any epoch it syncs) and for the orchestrator.
#[derive(Clone)]
pub struct Committees {
    signer: PrivateKey,
    namespace: Arc<Vec<u8>>,
    map: Arc<Mutex<BTreeMap<u64, Arc<Scheme>>>>,
}

impl std::fmt::Debug for Committees {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committees")
            .field("epochs", &lock(&self.map).keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The consensus public key of a validator record.
pub fn consensus_key(v: &ChainValidator) -> Result<PublicKey, ConsensusError> {
    use commonware_codec::DecodeExt as _;
    PublicKey::decode(v.consensus_key.0.to_vec())
        .map_err(|e| ConsensusError::Key(format!("consensus key {}: {e}", v.consensus_key)))
}

impl Committees {
    fn new(signer: PrivateKey, namespace: Vec<u8>) -> Committees {
        Committees {
            signer,
            namespace: Arc::new(namespace),
            map: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    fn insert(
        &self,
        epoch: u64,
        members: &[ChainValidator],
    ) -> Result<Arc<Scheme>, ConsensusError> {
        let keys = members
            .iter()
            .map(consensus_key)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(ConsensusError::EmptyCommittee(epoch));
        }
        let set = Set::from_iter_dedup(keys);
        let scheme = Scheme::signer(&self.namespace[..], set.clone(), self.signer.clone())
            .unwrap_or_else(|| Scheme::verifier(&self.namespace[..], set));
        let scheme = Arc::new(scheme);
        lock(&self.map).insert(epoch, Arc::clone(&scheme));
        Ok(scheme)
    }

    fn get(&self, epoch: u64) -> Option<Arc<Scheme>> {
        lock(&self.map).get(&epoch).cloned()
    }
}

impl Provider for Committees {
    type Scope = Epoch;
    type Scheme = Scheme;

    fn scoped(&self, scope: Epoch) -> Option<Scoped<Scheme>> {
        self.get(scope.get()).map(Scoped::scheme)
    }
}

/// What the orchestrator reacts to.
enum Event {
    /// The last block of an epoch is committed: run the next epoch, whose
    /// consensus starts from that block.
    Enter { epoch: u64, boundary: Digest },
    /// A peer sent consensus traffic for a later epoch than ours.
    Ahead { epoch: u64, from: PublicKey },
}

/// The marshal reporter: hands finalized blocks to the finalizer task
/// (reports are synchronous; committing is not).
#[derive(Clone)]
struct Finalized(mpsc::UnboundedSender<(ChainBlock, Exact)>);

impl Reporter for Finalized {
    type Activity = Update<ChainBlock>;

    fn report(&mut self, activity: Self::Activity) -> commonware_actor::Feedback {
        if let Update::Block(block, ack) = activity {
            let _ = self.0.unbounded_send((block.inner().clone(), ack));
        }
        commonware_actor::Feedback::Ok
    }
}

const MAILBOX: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(n) => n,
    None => unreachable!(),
};
const PAGE_SIZE: NonZeroU16 = match NonZeroU16::new(4096) {
    Some(n) => n,
    None => unreachable!(),
};
const PAGE_CACHE: NonZeroUsize = match NonZeroUsize::new(256) {
    Some(n) => n,
    None => unreachable!(),
};
const ITEMS_PER_SECTION: NonZeroU64 = match NonZeroU64::new(1024) {
    Some(n) => n,
    None => unreachable!(),
};
const BUFFER: NonZeroUsize = match NonZeroUsize::new(64 * 1024) {
    Some(n) => n,
    None => unreachable!(),
};

/// Most transactions per gossip message.
const GOSSIP_BATCH: usize = 256;
/// How often still-pooled transactions are offered to peers again.
const REGOSSIP_EVERY: Duration = Duration::from_secs(3);

/// The runtime a validator needs.
pub trait ValidatorRuntime:
    Spawner + Clock + Storage + Metrics + rand_core::CryptoRng + rand_core::Rng + Send + Sync + 'static
{
}
impl<T> ValidatorRuntime for T where
    T: Spawner
        + Clock
        + Storage
        + Metrics
        + rand_core::CryptoRng
        + rand_core::Rng
        + Send
        + Sync
        + 'static
{
}

/// Spawns a validator. Aborting the returned handle stops everything it
/// started (the runtime supervises tasks as a tree).
pub fn start<E, S, R, B, M>(context: E, cfg: Config<B, M>, channels: Channels<S, R>) -> Handle<()>
where
    E: ValidatorRuntime,
    S: Sender<PublicKey = PublicKey>,
    R: Receiver<PublicKey = PublicKey>,
    B: Blocker<PublicKey = PublicKey> + Clone + Send + Sync + 'static,
    M: PeerProvider<PublicKey = PublicKey> + Clone + Send + Sync + 'static,
{
    context.child("validator").spawn(move |ctx| async move {
        if let Err(e) = run(ctx, cfg, channels).await {
            tracing::error!(error = %e, "validator stopped");
        }
    })
}

fn archive_config<C: Clone>(
    prefix: &str,
    name: &str,
    page_cache: &CacheRef,
    codec_config: C,
) -> immutable::Config<C> {
    let p = |s: &str| format!("{prefix}-{name}-{s}");
    immutable::Config {
        metadata_partition: p("metadata"),
        freezer_table_partition: p("freezer-table"),
        freezer_table_initial_size: 64,
        freezer_table_resize_frequency: 10,
        freezer_table_resize_chunk_size: 10,
        freezer_key_partition: p("freezer-key"),
        freezer_key_page_cache: page_cache.clone(),
        freezer_value_partition: p("freezer-value"),
        freezer_value_target_size: 1024 * 1024,
        freezer_value_compression: None,
        ordinal_partition: p("ordinal"),
        items_per_section: ITEMS_PER_SECTION,
        codec_config,
        replay_buffer: BUFFER,
        freezer_key_write_buffer: BUFFER,
        freezer_value_write_buffer: BUFFER,
        ordinal_write_buffer: BUFFER,
    }
}

async fn run<E, S, R, B, M>(
    context: E,
    cfg: Config<B, M>,
    channels: Channels<S, R>,
) -> Result<(), ConsensusError>
where
    E: ValidatorRuntime,
    S: Sender<PublicKey = PublicKey>,
    R: Receiver<PublicKey = PublicKey>,
    B: Blocker<PublicKey = PublicKey> + Clone + Send + Sync + 'static,
    M: PeerProvider<PublicKey = PublicKey> + Clone + Send + Sync + 'static,
{
    let Config {
        signer,
        chain,
        blocker,
        peers,
        partition_prefix,
        namespace,
        timeouts,
        max_block_bytes,
        gossip,
    } = cfg;
    let me = signer.public_key();
    let epoch_blocks = NonZeroU64::new(chain.epoch_blocks())
        .ok_or_else(|| ConsensusError::Config("chain_epoch_blocks is 0".into()))?;
    let epocher = FixedEpocher::new(epoch_blocks);
    let page_cache = CacheRef::new(PAGE_SIZE, PAGE_CACHE);

    // Committees of every epoch up to the one we resume in.
    let committees = Committees::new(signer.clone(), namespace.clone());
    let head = chain.store().head();
    let current = (head.header.height + 1) / epoch_blocks.get();
    for e in 0..=current {
        match chain.committee(e)? {
            Some(members) => {
                committees.insert(e, &members)?;
            }
            None => {
                return Err(ConsensusError::Config(format!(
                    "no committee for epoch {e}"
                )));
            }
        }
    }

    // Block dissemination.
    let (broadcast_engine, buffer) = buffered::Engine::new(
        context.child("broadcast"),
        buffered::Config {
            public_key: me.clone(),
            mailbox_size: MAILBOX,
            deque_size: 10,
            priority: false,
            codec_config: max_block_bytes,
            peer_provider: peers.clone(),
            strategy: Sequential,
        },
    );
    broadcast_engine.start(channels.broadcast);

    // Backfill.
    let resolver = marshal_resolver::init(
        context.child("backfill"),
        marshal_resolver::Config {
            public_key: me.clone(),
            peer_provider: peers.clone(),
            blocker: blocker.clone(),
            mailbox_size: MAILBOX,
            fetch_timeout: NZDuration!(Duration::from_secs(2)),
            fetch_retry_delay: Duration::from_millis(100),
            priority_requests: false,
            priority_responses: false,
        },
        channels.backfill,
    );

    // Marshal, with its archives of finalized blocks and certificates.
    let finalizations = immutable::Archive::init(
        context.child("finalizations"),
        archive_config(
            &partition_prefix,
            "finalizations",
            &page_cache,
            <Scheme as commonware_cryptography::certificate::Verifier>::certificate_codec_config_unbounded(),
        ),
    )
    .await
    .map_err(|e| ConsensusError::Storage(e.to_string()))?;
    let blocks = immutable::Archive::init(
        context.child("blocks"),
        archive_config(&partition_prefix, "blocks", &page_cache, max_block_bytes),
    )
    .await
    .map_err(|e| ConsensusError::Storage(e.to_string()))?;
    let genesis = chain
        .block_at(0)?
        .ok_or_else(|| ConsensusError::Config("store has no genesis block".into()))?;
    let genesis_digest = genesis.digest();
    let (marshal_actor, mailbox, _floor): (_, MarshalMailbox<Scheme, Standard<ChainBlock>>, _) =
        Marshal::init(
            context.child("marshal"),
            finalizations,
            blocks,
            marshal::Config {
                provider: committees.clone(),
                epocher: epocher.clone(),
                start: marshal::Start::Genesis(Digested::precomputed(genesis, genesis_digest)),
                partition_prefix: format!("{partition_prefix}-marshal"),
                mailbox_size: MAILBOX,
                view_retention: ViewDelta::new(10),
                prunable_items_per_section: ITEMS_PER_SECTION,
                page_cache: page_cache.clone(),
                replay_buffer: BUFFER,
                key_write_buffer: BUFFER,
                value_write_buffer: BUFFER,
                block_codec_config: max_block_bytes,
                max_repair: MAILBOX,
                max_pending_acks: NonZeroUsize::new(16).unwrap_or(MAILBOX),
                strategy: Sequential,
            },
        )
        .await;
    let (finalized_tx, mut finalized_rx) = mpsc::unbounded();
    marshal_actor.start(Finalized(finalized_tx), buffer, resolver);

    let (events_tx, mut events_rx) = mpsc::unbounded::<Event>();

    // Finalizer: finalized blocks into redb, one write transaction each,
    // then the acknowledgement; the next epoch's committee at a boundary.
    {
        let chain = Arc::clone(&chain);
        let committees = committees.clone();
        let events = events_tx.clone();
        let epocher = epocher.clone();
        context.child("finalizer").spawn(move |_| async move {
            // Acknowledgements held back after a fatal error: dropping one
            // would stop marshal, and a node that cannot apply a finalized
            // block must halt rather than diverge.
            let mut held = Vec::new();
            while let Some((block, ack)) = finalized_rx.next().await {
                if !held.is_empty() {
                    held.push(ack);
                    continue;
                }
                let height = block.number();
                match chain.commit_finalized(&block) {
                    Ok(fresh) => {
                        if fresh {
                            tracing::debug!(height, txs = block.block().txs.len(), "committed");
                        }
                        let info = epocher.containing(Height::new(height));
                        if let Some(info) = info
                            && info.last().get() == height
                        {
                            let next = info.epoch().get() + 1;
                            let entered = match chain.committee(next) {
                                Ok(Some(members)) => committees.insert(next, &members).map(|_| ()),
                                Ok(None) => Err(ConsensusError::Config(format!(
                                    "no committee for epoch {next}"
                                ))),
                                Err(e) => Err(e.into()),
                            };
                            if let Err(e) = entered {
                                tracing::error!(error = %e, epoch = next, "cannot enter epoch");
                                held.push(ack);
                                continue;
                            }
                            let _ = events.unbounded_send(Event::Enter {
                                epoch: next,
                                boundary: block.digest(),
                            });
                        }
                        ack.acknowledge();
                    }
                    Err(e) => {
                        tracing::error!(height, error = %e, "cannot commit finalized block; halting");
                        held.push(ack);
                    }
                }
            }
        });
    }

    // Mempool gossip: local submissions out, peers' submissions in.
    let (mut pool_sender, mut pool_receiver) = channels.mempool;
    {
        // Gossip is best effort, so what is still pooled is offered again
        // now and then: a lost message must not strand a transaction on a
        // node that never proposes.
        let chain = Arc::clone(&chain);
        let mut sender = pool_sender.clone();
        context.child("regossip").spawn(move |ctx| async move {
            loop {
                ctx.sleep(REGOSSIP_EVERY).await;
                let txs = chain.pool_oldest(GOSSIP_BATCH);
                if txs.is_empty() {
                    continue;
                }
                if let Ok(bytes) = postcard::to_stdvec(&txs) {
                    sender.send(Recipients::All, bytes, false);
                }
            }
        });
    }
    {
        let mut gossip = gossip;
        context.child("gossip_out").spawn(move |_| async move {
            while let Some(first) = gossip.next().await {
                let mut batch = vec![first];
                while batch.len() < GOSSIP_BATCH {
                    match gossip.try_recv() {
                        Ok(tx) => batch.push(tx),
                        _ => break,
                    }
                }
                match postcard::to_stdvec(&batch) {
                    Ok(bytes) => {
                        pool_sender.send(Recipients::All, bytes, false);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot encode gossip"),
                }
            }
        });
        let chain = Arc::clone(&chain);
        context.child("gossip_in").spawn(move |_| async move {
            while let Ok((from, msg)) = pool_receiver.recv().await {
                let Ok(txs) = postcard::from_bytes::<Vec<SignedTx>>(msg.as_ref()) else {
                    tracing::debug!(?from, "undecodable gossip");
                    continue;
                };
                for tx in txs {
                    if let Err(e) = chain.admit(tx) {
                        tracing::trace!(error = %e, "gossiped transaction not admitted");
                    }
                }
            }
        });
    }

    // Consensus channels, one subchannel per epoch; traffic for an epoch we
    // have not entered lands in the backup receiver.
    let (votes_mux, votes, votes_backup) = Muxer::builder(
        context.child("votes_mux"),
        channels.votes.0,
        channels.votes.1,
    )
    .with_backup()
    .build();
    votes_mux.start();
    let (certs_mux, certs, certs_backup) = Muxer::builder(
        context.child("certs_mux"),
        channels.certificates.0,
        channels.certificates.1,
    )
    .with_backup()
    .build();
    certs_mux.start();
    let (resolver_mux, resolvers) = Muxer::new(
        context.child("resolver_mux"),
        channels.resolver.0,
        channels.resolver.1,
    );
    resolver_mux.start();
    for (name, mut backup) in [("votes", votes_backup), ("certs", certs_backup)] {
        let events = events_tx.clone();
        context.child(name).spawn(move |_| async move {
            while let Some((epoch, (from, _))) = backup.recv().await {
                let _ = events.unbounded_send(Event::Ahead { epoch, from });
            }
        });
    }

    let app = LedgerApp::new(Arc::clone(&chain), max_block_bytes, timeouts.block_interval);
    let inline = Inline::new(
        context.child("inline"),
        app,
        mailbox.clone(),
        epocher.clone(),
    );

    // The orchestrator: one simplex engine at a time.
    let mut orch = Orchestrator {
        context: context.child("orchestrator"),
        committees,
        blocker,
        inline,
        partition_prefix,
        page_cache,
        timeouts,
        votes,
        certs,
        resolvers,
    };
    let mut epoch = current;
    let floor = if epoch == 0 {
        genesis_digest
    } else {
        let boundary = epoch * epoch_blocks.get() - 1;
        chain
            .block_at(boundary)?
            .map(|b| b.digest())
            .ok_or_else(|| ConsensusError::Config(format!("missing boundary block {boundary}")))?
    };
    let mut engine = orch.enter(epoch, floor).await?;
    while let Some(ev) = events_rx.next().await {
        match ev {
            Event::Enter {
                epoch: next,
                boundary,
            } if next > epoch => {
                engine.abort();
                epoch = next;
                engine = orch.enter(epoch, boundary).await?;
            }
            Event::Enter { .. } => {}
            Event::Ahead {
                epoch: theirs,
                from,
            } if theirs > epoch => {
                if let Some(last) = epocher.last(Epoch::new(epoch)) {
                    mailbox.hint_finalized(last, NonEmptyVec::new(from));
                }
            }
            Event::Ahead { .. } => {}
        }
    }
    Ok(())
}

type App<E> = Inline<E, Scheme, LedgerApp, ChainBlock, FixedEpocher>;

struct Orchestrator<E, S, B>
where
    E: ValidatorRuntime,
    S: Sender<PublicKey = PublicKey>,
{
    context: E,
    committees: Committees,
    blocker: B,
    inline: App<E>,
    partition_prefix: String,
    page_cache: CacheRef,
    timeouts: Timeouts,
    votes: MuxHandle<S>,
    certs: MuxHandle<S>,
    resolvers: MuxHandle<S>,
}

impl<E, S, B> Orchestrator<E, S, B>
where
    E: ValidatorRuntime,
    S: Sender<PublicKey = PublicKey>,
    B: Blocker<PublicKey = PublicKey> + Clone + Send + Sync + 'static,
{
    async fn enter(&mut self, epoch: u64, floor: Digest) -> Result<Handle<()>, ConsensusError> {
        let scheme = self
            .committees
            .get(epoch)
            .ok_or_else(|| ConsensusError::Config(format!("no committee for epoch {epoch}")))?;
        let t = &self.timeouts;
        let engine = simplex::Engine::new(
            self.context.child("simplex").with_attribute("epoch", epoch),
            simplex::config::Config {
                scheme: (*scheme).clone(),
                elector: RoundRobin::<Sha256>::default(),
                blocker: self.blocker.clone(),
                automaton: self.inline.clone(),
                relay: self.inline.clone(),
                reporter: self.inline.clone(),
                strategy: Sequential,
                partition: format!("{}-simplex-{epoch}", self.partition_prefix),
                mailbox_size: MAILBOX,
                epoch: Epoch::new(epoch),
                floor: simplex::config::Floor::Genesis(floor),
                replay_buffer: BUFFER,
                write_buffer: BUFFER,
                page_cache: self.page_cache.clone(),
                leader_timeout: t.leader,
                certification_timeout: t.certification,
                timeout_retry: t.retry,
                view_retention: ViewDelta::new(10),
                skip: simplex::config::SkipPolicy::Enabled {
                    timeout: t.skip,
                    budget: simplex::config::SkipBudget::Participants,
                },
                fetch_timeout: NZDuration!(Duration::from_secs(1)),
                fetch_retry_delay: Duration::from_millis(100),
                forward: simplex::config::ForwardPolicy::Disabled,
                track_historical_votes: false,
            },
        );
        let net = |e: commonware_p2p::utils::mux::Error| ConsensusError::Network(e.to_string());
        let vote = self.votes.register(epoch).await.map_err(net)?;
        let cert = self.certs.register(epoch).await.map_err(net)?;
        let res = self.resolvers.register(epoch).await.map_err(net)?;
        tracing::info!(epoch, "entered epoch");
        Ok(engine.start(vote, cert, res))
    }
}
