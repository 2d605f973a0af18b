//! The validator's life: following the ledger's epochs, probing the subnet's
//! nodes, and proposing or attesting to scores.
//!
//! Per epoch of `E` blocks starting at height `S`, for a node of class
//! Validator (other nodes only wait):
//! - the targets are the subnet's nodes of class Included or Validator,
//!   except the validator's own node, which it cannot dial and scores with
//!   [`Measurement::self_assessed`];
//! - probe round `k` of `probes_per_epoch` runs at the first block at or
//!   after `S + k * W / probes_per_epoch`, where `W = 2E/3`: rounds are spread
//!   over the first two thirds of the epoch, one per block at most;
//! - from `S + W` on, the scores are computed once ([`scores`]) and:
//!   - the elected validator submits `ProposeAttestation` with them;
//!   - another Validator-class node, once the proposal is on chain, submits
//!     `Attest` when [`agrees`] accepts it, and logs the disagreement otherwise.
//!
//! Submissions that fail are logged and retried a few blocks later while the
//! epoch lasts; nothing here is fatal except an unusable checkpoint or a
//! ledger that stays unreachable. Blocks come from the ledger's subscription,
//! or from polling its head when the subscription ends.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::join_all;
use ledger::LedgerError;
use ledger::rpc_client::LedgerClient;
use ledger::tx::{Call, Keypair};
use ledger::types::{EpochInfo, Node, NodeClass, NodeId, NodeScore, SubnetId};
use p2p::NodeHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use wire::ServerInfo;

use crate::error::ValidatorError;
use crate::measure::{Measurement, ProbeConfig, ProbeOutcome, Prober};
use crate::score::{DEFAULT_TOLERANCE_PPM, agrees, scores};

/// Blocks to wait before submitting a proposal or attestation again when it
/// has not reached the chain.
pub const RETRY_BLOCKS: u64 = 3;

/// How long the ledger may stay unreachable before [`Validator::run`] gives up.
pub const LEDGER_GIVE_UP: Duration = Duration::from_secs(300);

/// What a [`Validator`] validates and how.
#[derive(Clone, Debug)]
pub struct ValidatorConfig {
    /// The subnet.
    pub subnet: SubnetId,
    /// The model id its servers announce in the DHT.
    pub model_id: String,
    /// The checkpoint spot checks recompute with (the same weights the
    /// servers load).
    pub checkpoint: PathBuf,
    /// Probe rounds per epoch. Default 3.
    pub probes_per_epoch: u32,
    /// Positions in each spot-check forward. Default 8.
    pub spot_check_tokens: usize,
    /// Largest difference of a node's score share, in ppm, that still
    /// agrees with the proposal. Default 150,000.
    pub tolerance_ppm: u32,
    /// Longest wait for one probe request. Default 10 s.
    pub probe_timeout: Duration,
    /// How often the head is polled when the block subscription is gone.
    /// Default 1 s.
    pub poll_interval: Duration,
    /// Seed of the spot-check inputs; `None` (the default) seeds from the OS.
    pub seed: Option<u64>,
}

impl ValidatorConfig {
    /// The defaults for `subnet`, serving `model_id` from `checkpoint`.
    pub fn new(
        subnet: SubnetId,
        model_id: impl Into<String>,
        checkpoint: impl Into<PathBuf>,
    ) -> Self {
        ValidatorConfig {
            subnet,
            model_id: model_id.into(),
            checkpoint: checkpoint.into(),
            probes_per_epoch: 3,
            spot_check_tokens: 8,
            tolerance_ppm: DEFAULT_TOLERANCE_PPM,
            probe_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            seed: None,
        }
    }
}

/// What the validator saw and did in one epoch; published once the scores
/// are computed and again whenever the proposal or attestation moves on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochReport {
    /// The subnet.
    pub subnet: SubnetId,
    /// The epoch.
    pub epoch: u64,
    /// This validator's node.
    pub own_node: NodeId,
    /// The epoch's elected validator, if any.
    pub validator: Option<NodeId>,
    /// Probe rounds run.
    pub rounds: u32,
    /// The measurements the scores come from, by node id (the own node's
    /// is self-assessed).
    pub measurements: Vec<Measurement>,
    /// The scores, by node id.
    pub scores: Vec<NodeScore>,
    /// This node proposed (the ledger accepted the transaction, or the
    /// proposal is on chain).
    pub proposed: bool,
    /// This node attested (as above).
    pub attested: bool,
    /// Why this node did not attest, when it disagreed with the proposal.
    pub disagreement: Option<String>,
    /// Probe bytes exchanged with each node this epoch, both ways.
    pub probe_bytes_per_node: Vec<(NodeId, u64)>,
}

/// A subnet validator: see the module docs.
#[derive(Debug)]
pub struct Validator {
    config: ValidatorConfig,
    reports: watch::Sender<Option<EpochReport>>,
}

/// One epoch's progress.
struct EpochState {
    epoch: u64,
    rounds: u32,
    measurements: BTreeMap<NodeId, Measurement>,
    own_span: Option<(u32, u32)>,
    own_found: u32,
    scores: Option<(Vec<Measurement>, Vec<NodeScore>)>,
    proposed_at: Option<u64>,
    attested_at: Option<u64>,
    proposed: bool,
    attested: bool,
    disagreement: Option<String>,
}

impl EpochState {
    fn new(epoch: u64) -> Self {
        EpochState {
            epoch,
            rounds: 0,
            measurements: BTreeMap::new(),
            own_span: None,
            own_found: 0,
            scores: None,
            proposed_at: None,
            attested_at: None,
            proposed: false,
            attested: false,
            disagreement: None,
        }
    }
}

/// The running validator's state between blocks.
struct Runner<'a> {
    config: &'a ValidatorConfig,
    prober: Prober,
    ledger: &'a LedgerClient,
    hotkey: &'a Keypair,
    reports: &'a watch::Sender<Option<EpochReport>>,
    state: Option<EpochState>,
    /// The last epoch in which "not a validator" was logged.
    idle_logged: Option<u64>,
    /// The last height seen and when, to estimate the block interval.
    last_block: Option<(u64, Instant)>,
    /// The observed time per block, bounding probe rounds.
    block_interval: Option<Duration>,
}

enum Event {
    Block,
    SubscriptionEnded(String),
    Poll,
}

/// Whether `stop` says to stop (a dropped sender counts as stop).
fn should_stop(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

impl Validator {
    /// A validator with `config`; nothing runs until [`run`](Self::run).
    pub fn new(config: ValidatorConfig) -> Self {
        Validator {
            config,
            reports: watch::channel(None).0,
        }
    }

    /// The latest [`EpochReport`] (`None` until the first scores), for the
    /// CLI's logs and monitors. Take it before [`run`](Self::run).
    pub fn reports(&self) -> watch::Receiver<Option<EpochReport>> {
        self.reports.subscribe()
    }

    /// Validates until `stop` turns true (or its sender is dropped),
    /// probing from `node`, reading and submitting through `ledger`, and
    /// signing with the node's `hotkey`.
    ///
    /// # Errors
    /// When the checkpoint cannot be opened, or the ledger stays unreachable
    /// for [`LEDGER_GIVE_UP`].
    pub async fn run(
        self,
        node: NodeHandle,
        ledger: LedgerClient,
        hotkey: Keypair,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), ValidatorError> {
        let config = &self.config;
        let probe = ProbeConfig {
            tokens: config.spot_check_tokens.max(1),
            timeout: config.probe_timeout,
            seed: config.seed,
            ..ProbeConfig::new(config.model_id.clone())
        };
        let prober = Prober::open(node, &config.checkpoint, probe).await?;
        tracing::info!(
            subnet = config.subnet,
            model = %config.model_id,
            hotkey = %hotkey.address(),
            "validator started"
        );
        let mut runner = Runner {
            config,
            prober,
            ledger: &ledger,
            hotkey: &hotkey,
            reports: &self.reports,
            state: None,
            idle_logged: None,
            last_block: None,
            block_interval: None,
        };
        let mut subscription = match ledger.subscribe_blocks().await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot subscribe to blocks ({e}); polling the head");
                None
            }
        };
        let mut last_height = None;
        let mut failing_since: Option<Instant> = None;
        loop {
            if should_stop(&stop) {
                break;
            }
            let next = async {
                match subscription.as_mut() {
                    Some(sub) => match sub.next().await {
                        Some(Ok(_)) => Event::Block,
                        Some(Err(e)) => Event::SubscriptionEnded(e.to_string()),
                        None => Event::SubscriptionEnded("closed".into()),
                    },
                    None => {
                        tokio::time::sleep(config.poll_interval).await;
                        Event::Poll
                    }
                }
            };
            let event = tokio::select! {
                biased;
                _ = stop.changed() => continue,
                e = next => e,
            };
            match event {
                Event::Block => {}
                Event::SubscriptionEnded(why) => {
                    tracing::warn!(
                        "block subscription ended ({why}); polling the head every {:?}",
                        config.poll_interval
                    );
                    subscription = None;
                }
                Event::Poll => match ledger.head().await {
                    Ok(head) if Some(head.header.height) == last_height => continue,
                    Ok(head) => last_height = Some(head.header.height),
                    Err(e) => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        tracing::warn!("ledger head: {e}");
                        if since.elapsed() >= LEDGER_GIVE_UP {
                            return Err(ValidatorError::LedgerUnreachable(
                                since.elapsed(),
                                e.to_string(),
                            ));
                        }
                        continue;
                    }
                },
            }
            let ticked = tokio::select! {
                biased;
                _ = stop.changed() => continue,
                r = runner.tick() => r,
            };
            match ticked {
                Ok(()) => failing_since = None,
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    tracing::warn!(subnet = config.subnet, "validator step failed: {e}");
                    if since.elapsed() >= LEDGER_GIVE_UP {
                        return Err(ValidatorError::LedgerUnreachable(
                            since.elapsed(),
                            e.to_string(),
                        ));
                    }
                }
            }
        }
        tracing::info!(subnet = config.subnet, "validator stopped");
        Ok(())
    }
}

impl Runner<'_> {
    /// Reacts to the chain as it is now.
    async fn tick(&mut self) -> Result<(), LedgerError> {
        let subnet = self.config.subnet;
        let info = self.ledger.epoch(subnet).await?;
        self.observe_height(info.height);
        let nodes = self.ledger.nodes(subnet).await?;
        let me = self.hotkey.address();
        let own = match nodes.iter().find(|n| n.hotkey == me) {
            Some(n) if n.class == NodeClass::Validator => n.clone(),
            other => {
                if self.idle_logged != Some(info.epoch) {
                    self.idle_logged = Some(info.epoch);
                    match other {
                        None => tracing::info!(
                            subnet,
                            hotkey = %me,
                            "no node of this subnet has this hotkey (not registered yet?); waiting"
                        ),
                        Some(n) => tracing::info!(
                            subnet,
                            node = n.id,
                            class = ?n.class,
                            "not of class Validator yet; waiting"
                        ),
                    }
                }
                return Ok(());
            }
        };
        if self.state.as_ref().is_none_or(|s| s.epoch != info.epoch) {
            self.state = Some(EpochState::new(info.epoch));
        }
        let len = info.epoch_length.max(1);
        let start = info.epoch * len;
        let window = (2 * len / 3).max(1);
        let h = info.height;
        let probes = self.config.probes_per_epoch.max(1);
        let targets: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.class >= NodeClass::Included && n.id != own.id)
            .collect();

        let rounds = self.state.as_ref().map_or(0, |s| s.rounds);
        let due = start + rounds as u64 * window / probes as u64;
        if h < start + window && rounds < probes && h >= due {
            self.round(&targets, &own, self.time_until(start + window))
                .await;
        } else if h >= start + window && rounds == 0 {
            // Started late: one short round, leaving half of what is left
            // of the epoch to submit in.
            let end = start + window + (len - window) / 2;
            self.round(&targets, &own, self.time_until(end)).await;
        }
        if h < start + window {
            return Ok(());
        }
        self.score(&targets, &own);
        self.submit(&info, &nodes, &own).await;
        self.publish(&info, &own);
        Ok(())
    }

    /// Updates the block-interval estimate with the head at `height`.
    fn observe_height(&mut self, height: u64) {
        let now = Instant::now();
        match self.last_block {
            Some((h, _)) if height <= h => return,
            Some((h, at)) => {
                let per_block =
                    now.duration_since(at) / u32::try_from(height - h).unwrap_or(u32::MAX);
                self.block_interval = Some(per_block);
            }
            None => {}
        }
        self.last_block = Some((height, now));
    }

    /// The time left until `height` is sealed, as far as the observed block
    /// interval tells (at least one block; the probe timeout while the
    /// interval is unknown), capped by the probe timeout.
    fn time_until(&self, height: u64) -> Duration {
        let timeout = self.config.probe_timeout;
        let (Some((head, seen_at)), Some(interval)) = (self.last_block, self.block_interval) else {
            return timeout;
        };
        let blocks = u32::try_from(height.saturating_sub(head).max(1)).unwrap_or(u32::MAX);
        (interval.saturating_mul(blocks))
            .saturating_sub(seen_at.elapsed())
            .max(interval)
            .min(timeout)
    }

    /// One probe round over `targets`, all at once, cut short after `budget`
    /// so that a slow node or lookup never makes this validator miss its
    /// turn to propose: probes still running then go unanswered.
    async fn round(&mut self, targets: &[&Node], own: &Node, budget: Duration) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        for t in targets {
            state
                .measurements
                .entry(t.id)
                .or_insert_with(|| Measurement::new(t.id, t.peer_id.clone()));
        }
        let work = Self::probe_all(&self.prober, &self.config.model_id, state, targets, own);
        if tokio::time::timeout(budget, work).await.is_err() {
            tracing::debug!(
                epoch = state.epoch,
                round = state.rounds,
                ?budget,
                "probe round cut short: the probing window is closing"
            );
        }
        state.rounds += 1;
    }

    /// The body of [`round`](Self::round): looks the servers up, then probes
    /// every target.
    async fn probe_all(
        prober: &Prober,
        model_id: &str,
        state: &mut EpochState,
        targets: &[&Node],
        own: &Node,
    ) {
        let found = match prober.discover().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot look up the servers: {e}");
                Vec::new()
            }
        };
        let mut by_peer: HashMap<String, ServerInfo> =
            found.into_iter().map(|(p, i)| (p.to_string(), i)).collect();
        if !by_peer.contains_key(&own.peer_id)
            && let Ok(peer) = own.peer_id.parse()
            && let Ok(Some(info)) = prober.node().server_info(&peer).await
            && info.model == model_id
        {
            by_peer.insert(own.peer_id.clone(), info);
        }
        match by_peer.get(&own.peer_id) {
            Some(i) => {
                state.own_span = Some((i.span.start, i.span.end));
                state.own_found += 1;
            }
            None => tracing::debug!(
                node = own.id,
                peer = %own.peer_id,
                "own server not found in the DHT"
            ),
        }
        let probes = state
            .measurements
            .values_mut()
            .filter(|m| targets.iter().any(|t| t.id == m.node))
            .map(|m| {
                let found = by_peer.get(&m.peer_id);
                async move {
                    let outcome = prober.probe(m, found).await;
                    (m.node, outcome)
                }
            });
        for (node, outcome) in join_all(probes).await {
            match outcome {
                ProbeOutcome::Passed => tracing::debug!(node, "probe passed"),
                ProbeOutcome::Unchecked(why) => tracing::debug!(node, "probe unchecked: {why}"),
                ProbeOutcome::Unanswered(why) => tracing::debug!(node, "probe unanswered: {why}"),
                ProbeOutcome::SpotCheckFailed(why) => {
                    tracing::warn!(node, "spot check failed: {why}")
                }
            }
        }
    }

    /// Computes the epoch's scores once.
    fn score(&mut self, targets: &[&Node], own: &Node) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        if state.scores.is_some() {
            return;
        }
        let mut ms: Vec<Measurement> = state
            .measurements
            .values()
            .filter(|m| targets.iter().any(|t| t.id == m.node))
            .cloned()
            .collect();
        ms.push(Measurement::self_assessed(
            own.id,
            own.peer_id.clone(),
            state.own_span,
            state.rounds,
            state.own_found,
            &ms,
        ));
        ms.sort_by_key(|m| m.node);
        let s = scores(&ms, self.prober.num_blocks());
        let line: Vec<String> = s
            .iter()
            .map(|x| format!("{}={}", x.node, x.score))
            .collect();
        tracing::info!(
            subnet = self.config.subnet,
            epoch = state.epoch,
            node = own.id,
            rounds = state.rounds,
            scores = %line.join(" "),
            "epoch scores"
        );
        state.scores = Some((ms, s));
    }

    /// Proposes or attests, as the epoch record calls for.
    async fn submit(&mut self, info: &EpochInfo, nodes: &[Node], own: &Node) {
        let (Some(state), Some(record)) = (self.state.as_mut(), info.record.as_ref()) else {
            return;
        };
        let Some((_, ours)) = state.scores.as_ref() else {
            return;
        };
        let subnet = self.config.subnet;
        let h = info.height;
        let retry = |at: Option<u64>| at.is_none_or(|at| h >= at + RETRY_BLOCKS);
        if record.validator == own.id {
            if record.proposal.is_some() {
                state.proposed = true;
                return;
            }
            if !retry(state.proposed_at) {
                return;
            }
            state.proposed_at = Some(h);
            // Only nodes still registered and scorable may be in a proposal.
            let scores: Vec<NodeScore> = ours
                .iter()
                .filter(|s| {
                    nodes
                        .iter()
                        .any(|n| n.id == s.node && n.class >= NodeClass::Included)
                })
                .copied()
                .collect();
            let call = Call::ProposeAttestation { subnet, scores };
            match self.ledger.sign_and_submit(self.hotkey, call).await {
                Ok(tx) => {
                    state.proposed = true;
                    tracing::info!(subnet, epoch = state.epoch, %tx, "proposed the epoch's scores");
                }
                Err(e) => tracing::warn!(subnet, epoch = state.epoch, "proposal failed: {e}"),
            }
            return;
        }
        let Some(proposal) = record.proposal.as_ref() else {
            return;
        };
        if record.attestations.contains(&own.id) {
            state.attested = true;
            return;
        }
        if state.disagreement.is_some() || !retry(state.attested_at) {
            return;
        }
        // A node's score of itself is an assumption, not a measurement (it
        // cannot probe itself): judge the proposal on the other nodes, so an
        // honest proposal that zeroes this node is still attested.
        let others = |scores: &[NodeScore]| -> Vec<NodeScore> {
            scores
                .iter()
                .filter(|s| s.node != own.id)
                .copied()
                .collect()
        };
        if let Err(d) = agrees(&others(ours), &others(proposal), self.config.tolerance_ppm) {
            tracing::warn!(
                subnet,
                epoch = state.epoch,
                validator = record.validator,
                "not attesting: {d}"
            );
            state.disagreement = Some(d.to_string());
            return;
        }
        state.attested_at = Some(h);
        match self
            .ledger
            .sign_and_submit(self.hotkey, Call::Attest { subnet })
            .await
        {
            Ok(tx) => {
                state.attested = true;
                tracing::info!(
                    subnet,
                    epoch = state.epoch,
                    validator = record.validator,
                    %tx,
                    "attested"
                );
            }
            Err(e) => tracing::warn!(subnet, epoch = state.epoch, "attestation failed: {e}"),
        }
    }

    /// Publishes the epoch's report when it changed.
    fn publish(&self, info: &EpochInfo, own: &Node) {
        let Some(state) = self.state.as_ref() else {
            return;
        };
        let Some((ms, s)) = state.scores.as_ref() else {
            return;
        };
        let report = EpochReport {
            subnet: self.config.subnet,
            epoch: state.epoch,
            own_node: own.id,
            validator: info.record.as_ref().map(|r| r.validator),
            rounds: state.rounds,
            measurements: ms.clone(),
            scores: s.clone(),
            proposed: state.proposed,
            attested: state.attested,
            disagreement: state.disagreement.clone(),
            probe_bytes_per_node: ms
                .iter()
                .filter(|m| !m.self_assessed)
                .map(|m| (m.node, m.probe_bytes()))
                .collect(),
        };
        self.reports.send_if_modified(|current| {
            if current.as_ref() == Some(&report) {
                false
            } else {
                *current = Some(report);
                true
            }
        });
    }
}
