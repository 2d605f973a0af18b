//! Measuring one node through the inference protocol: the per-epoch
//! [`Measurement`] record and the [`Prober`] that adds one probe round to it.
//!
//! A probe round, for a node found in the DHT:
//! 1. a timed `Info` request: an answer gives a ping sample (the round trip,
//!    stream opening included) and the span the node serves now;
//! 2. a timed `Forward` of `tokens` random hidden states (seeded RNG)
//!    through that whole span, uncompressed: its answer gives a throughput
//!    sample (tokens/s through the node's span, in milli-tokens/s) and
//!    makes the probe *answered*;
//! 3. a spot check: the same forward recomputed locally from the checkpoint;
//!    it fails when the shapes differ, when
//!    `max |got - expected| > 1e-3 * max(1, max |expected|)` (or a value is
//!    not finite), or when the node answered with an error frame.
//!
//! Error frames that say the node is busy or refuses us (`NoCapacity`,
//! `TooManyRequests`, `Forbidden`, `IdleTimeout`) and transport failures or
//! timeouts leave the probe unanswered instead: they cost availability, not
//! the whole score. A node that is not in the DHT gets an unanswered probe.
//! Request and response frame bytes (length prefix included) are counted as
//! probe traffic.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use ledger::types::NodeId;
use model::{BlockSpan, Checkpoint, LoadOptions, SpanCache};
use p2p::{Multiaddr, NodeHandle, PeerId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use wire::{
    Compression, ErrorCode, ForwardRequest, FrameLimits, Request, Response, ServerInfo, Span,
    WireTensor,
};

use crate::error::ValidatorError;

/// Most samples of each kind a [`Measurement`] keeps (the oldest go first).
pub const MAX_SAMPLES: usize = 64;

/// Relative tolerance of the spot check: `max |diff| <= SPOT_CHECK_TOLERANCE * max(1, max |expected|)`.
pub const SPOT_CHECK_TOLERANCE: f32 = 1e-3;

/// What one validator observed of one node during one epoch. Integers only,
/// so [`scores`](crate::score::scores) is deterministic given these records.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Measurement {
    /// The node's id in its subnet.
    pub node: NodeId,
    /// Its libp2p peer id, as registered on the ledger.
    pub peer_id: String,
    /// Blocks `[start, end)` it last said it serves; `None` until it answered.
    pub span: Option<(u32, u32)>,
    /// Probe rounds attempted.
    pub probes: u32,
    /// Probe rounds fully answered (`Info` and `Forward`).
    pub answered: u32,
    /// `Info` round trips, in microseconds.
    pub ping_us: Vec<u64>,
    /// Forward throughputs through the node's span, in milli-tokens per second.
    pub throughput_mtps: Vec<u64>,
    /// Spot checks run.
    pub spot_checks: u32,
    /// Spot checks failed.
    pub spot_check_failures: u32,
    /// Probe bytes sent to the node.
    pub bytes_sent: u64,
    /// Probe bytes received from it.
    pub bytes_received: u64,
    /// True for the validator's own node, which it cannot probe: see
    /// [`Measurement::self_assessed`].
    pub self_assessed: bool,
}

fn push_sample(v: &mut Vec<u64>, x: u64) {
    if v.len() >= MAX_SAMPLES {
        v.remove(0);
    }
    v.push(x);
}

impl Measurement {
    /// An empty record for `node` with peer id `peer_id`.
    pub fn new(node: NodeId, peer_id: impl Into<String>) -> Self {
        Measurement {
            node,
            peer_id: peer_id.into(),
            ..Measurement::default()
        }
    }

    /// The record a validator keeps for its own node, which it cannot dial:
    /// the span it announces in the DHT (`None`: never found), `found` of
    /// `rounds` probes answered (the rounds in which the DHT had its record),
    /// and the median ping and throughput of `others` (the nodes it did
    /// measure, cheaters and silent ones left out), so that its own score
    /// sits at the swarm's median on speed and ping. Attesters measure the
    /// node for real and compare within the tolerance.
    pub fn self_assessed(
        node: NodeId,
        peer_id: impl Into<String>,
        span: Option<(u32, u32)>,
        rounds: u32,
        found: u32,
        others: &[Measurement],
    ) -> Self {
        let medians = |f: fn(&Measurement) -> &Vec<u64>| -> Vec<u64> {
            others
                .iter()
                .filter(|m| m.answered > 0 && m.spot_check_failures == 0 && !m.self_assessed)
                .filter_map(|m| crate::score::lower_median(f(m)))
                .collect()
        };
        let answered = if span.is_some() { found.min(rounds) } else { 0 };
        let sample = |v: Vec<u64>| {
            crate::score::lower_median(&v)
                .filter(|_| answered > 0)
                .into_iter()
                .collect()
        };
        Measurement {
            node,
            peer_id: peer_id.into(),
            span,
            probes: rounds,
            answered,
            ping_us: sample(medians(|m| &m.ping_us)),
            throughput_mtps: sample(medians(|m| &m.throughput_mtps)),
            self_assessed: true,
            ..Measurement::default()
        }
    }

    /// Lower median ping, in microseconds.
    pub fn median_ping_us(&self) -> Option<u64> {
        crate::score::lower_median(&self.ping_us)
    }

    /// Lower median throughput, in milli-tokens per second.
    pub fn median_throughput_mtps(&self) -> Option<u64> {
        crate::score::lower_median(&self.throughput_mtps)
    }

    /// Probe bytes exchanged with the node, both ways.
    pub fn probe_bytes(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }
}

/// What one probe round found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Answered, and the spot check passed.
    Passed,
    /// Answered, but the local reference could not be computed, so no spot
    /// check was counted (our fault, not the node's).
    Unchecked(String),
    /// Answered wrongly: the spot check failed.
    SpotCheckFailed(String),
    /// No usable answer.
    Unanswered(String),
}

/// Probe settings.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Model id the servers announce.
    pub model_id: String,
    /// Positions in each spot-check forward.
    pub tokens: usize,
    /// Longest wait for each request, stream opening included.
    pub timeout: Duration,
    /// Frame size limits for responses.
    pub limits: FrameLimits,
    /// RNG seed for the spot-check inputs; `None` seeds from the OS, so
    /// servers cannot predict the inputs.
    pub seed: Option<u64>,
}

impl ProbeConfig {
    /// Defaults for `model_id`: 8 tokens, 10 s timeout, OS-seeded inputs.
    pub fn new(model_id: impl Into<String>) -> Self {
        ProbeConfig {
            model_id: model_id.into(),
            tokens: 8,
            timeout: Duration::from_secs(10),
            limits: FrameLimits::default(),
            seed: None,
        }
    }
}

/// Probes nodes over the inference protocol and spot-checks their answers
/// against a local copy of the model.
///
/// The reference blocks are loaded once, on the first spot check, as one
/// span of the whole model (memory: the whole model's weights).
pub struct Prober {
    node: NodeHandle,
    config: ProbeConfig,
    checkpoint: Arc<Checkpoint>,
    reference: OnceCell<Arc<BlockSpan>>,
    rng: Mutex<StdRng>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("peer", &self.node.peer_id())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ValidatorError> + Send + 'static,
) -> Result<T, ValidatorError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ValidatorError::Task(e.to_string()))?
}

fn frame_len<T: Serialize>(msg: &T) -> u64 {
    wire::encode_frame(msg).map_or(0, |f| f.len() as u64)
}

fn elapsed_us(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Error codes that mean "busy" or "not for you", not "wrong".
fn is_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::NoCapacity
            | ErrorCode::TooManyRequests
            | ErrorCode::Forbidden
            | ErrorCode::IdleTimeout
    )
}

impl Prober {
    /// A prober on `node` checking against `checkpoint`.
    pub fn new(node: NodeHandle, checkpoint: Arc<Checkpoint>, config: ProbeConfig) -> Self {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Prober {
            node,
            config,
            checkpoint,
            reference: OnceCell::new(),
            rng: Mutex::new(rng),
        }
    }

    /// Opens the checkpoint at `path` and builds a prober on it.
    ///
    /// # Errors
    /// When the checkpoint cannot be opened.
    pub async fn open(
        node: NodeHandle,
        path: &std::path::Path,
        config: ProbeConfig,
    ) -> Result<Self, ValidatorError> {
        let path = path.to_path_buf();
        let ckpt = blocking(move || Ok(Checkpoint::open(path)?)).await?;
        Ok(Self::new(node, Arc::new(ckpt), config))
    }

    /// Blocks in the model.
    pub fn num_blocks(&self) -> u32 {
        self.checkpoint.config().num_blocks as u32
    }

    /// The node probes are sent from.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// Servers of the model in the DHT, with their announced addresses handed
    /// to the node so that probes can dial them.
    ///
    /// # Errors
    /// When the node has stopped.
    pub async fn discover(&self) -> Result<Vec<(PeerId, ServerInfo)>, ValidatorError> {
        let found = self
            .node
            .find_servers(&self.config.model_id, self.num_blocks())
            .await?;
        for (peer, info) in &found {
            let addrs: Vec<Multiaddr> = info.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if !addrs.is_empty() && *peer != self.node.peer_id() {
                self.node.add_addresses(*peer, addrs).await?;
            }
        }
        Ok(found)
    }

    /// One probe round of the node `m` records; `found` is its DHT record
    /// (`None`: not in the DHT, so the probe goes unanswered). Updates `m`.
    pub async fn probe(&self, m: &mut Measurement, found: Option<&ServerInfo>) -> ProbeOutcome {
        m.probes += 1;
        if found.is_none() {
            return ProbeOutcome::Unanswered("not found in the DHT".into());
        }
        let peer: PeerId = match m.peer_id.parse() {
            Ok(p) => p,
            Err(e) => return ProbeOutcome::Unanswered(format!("bad peer id {}: {e}", m.peer_id)),
        };

        // (a) Info: availability and ping.
        let (response, us) = match self.call(m, peer, &Request::Info).await {
            Ok(r) => r,
            Err(why) => return ProbeOutcome::Unanswered(format!("info: {why}")),
        };
        let info = match response {
            Response::Info(info) => info,
            Response::Error(e) => return ProbeOutcome::Unanswered(format!("info refused: {e}")),
            other => {
                return ProbeOutcome::Unanswered(format!("info answered with {other:?}"));
            }
        };
        push_sample(&mut m.ping_us, us);
        let span = info.span;
        m.span = Some((span.start, span.end));
        if info.model != self.config.model_id || span.is_empty() || span.end > self.num_blocks() {
            m.answered += 1;
            m.spot_checks += 1;
            m.spot_check_failures += 1;
            return ProbeOutcome::SpotCheckFailed(format!(
                "announces {} blocks {span}, outside {} with {} blocks",
                info.model,
                self.config.model_id,
                self.num_blocks()
            ));
        }

        // (b) Forward through the whole span: throughput and spot check.
        let (input, shape) = self.random_input();
        let hidden = match WireTensor::encode(&input, &shape, Compression::None) {
            Ok(t) => t,
            Err(e) => return ProbeOutcome::Unchecked(format!("cannot encode the input: {e}")),
        };
        let request = Request::Forward(ForwardRequest {
            model: self.config.model_id.clone(),
            span,
            hidden,
            compression: Compression::None,
        });
        let (response, us) = match self.call(m, peer, &request).await {
            Ok(r) => r,
            Err(why) => return ProbeOutcome::Unanswered(format!("forward: {why}")),
        };
        if let Response::Error(e) = &response
            && is_refusal(e.code)
        {
            return ProbeOutcome::Unanswered(format!("forward refused: {e}"));
        }
        m.answered += 1;
        let tokens = self.config.tokens as u128;
        push_sample(
            &mut m.throughput_mtps,
            u64::try_from(tokens * 1_000_000_000 / us as u128).unwrap_or(u64::MAX),
        );

        // (c) Spot check.
        let got = match response {
            Response::Forward(t) => t,
            Response::Error(e) => {
                m.spot_checks += 1;
                m.spot_check_failures += 1;
                return ProbeOutcome::SpotCheckFailed(format!("answered an error: {e}"));
            }
            other => {
                m.spot_checks += 1;
                m.spot_check_failures += 1;
                return ProbeOutcome::SpotCheckFailed(format!("answered {other:?}"));
            }
        };
        let expected = match self.expected(span, input, shape).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(
                    node = m.node,
                    "cannot compute the spot-check reference: {e}"
                );
                return ProbeOutcome::Unchecked(e.to_string());
            }
        };
        m.spot_checks += 1;
        match compare(&got, &shape, &expected) {
            Ok(()) => ProbeOutcome::Passed,
            Err(why) => {
                m.spot_check_failures += 1;
                ProbeOutcome::SpotCheckFailed(why)
            }
        }
    }

    /// Sends `request` on a new stream and waits for the response, counting
    /// bytes; returns the response and the round trip in microseconds.
    async fn call(
        &self,
        m: &mut Measurement,
        peer: PeerId,
        request: &Request,
    ) -> Result<(Response, u64), String> {
        m.bytes_sent += frame_len(request);
        let start = Instant::now();
        let opened = tokio::time::timeout(
            self.config.timeout,
            self.node
                .open_inference_with(peer, self.config.limits, request),
        )
        .await;
        let us = elapsed_us(start);
        match opened {
            Err(_) => Err(format!("no answer within {:?}", self.config.timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok((_stream, response))) => {
                m.bytes_received += frame_len(&response);
                Ok((response, us))
            }
        }
    }

    fn random_input(&self) -> (Vec<f32>, [usize; 3]) {
        let shape = [1, self.config.tokens, self.checkpoint.config().hidden_size];
        let n = shape.iter().product();
        // A poisoned lock still holds a usable RNG.
        let mut rng = match self.rng.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let v = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        (v, shape)
    }

    /// The local forward of `input` through `span`.
    async fn expected(
        &self,
        span: Span,
        input: Vec<f32>,
        shape: [usize; 3],
    ) -> Result<Vec<f32>, ValidatorError> {
        let reference = self
            .reference
            .get_or_try_init(|| {
                let ckpt = self.checkpoint.clone();
                blocking(move || {
                    let n = ckpt.config().num_blocks;
                    tracing::info!(blocks = n, "loading the spot-check reference model");
                    Ok(Arc::new(ckpt.load_span(
                        0..n,
                        &LoadOptions::default(),
                        &mut |_, _| {},
                    )?))
                })
            })
            .await?
            .clone();
        blocking(move || {
            let x = Tensor::from_vec(input, shape.to_vec(), &Device::Cpu)
                .map_err(model::ModelError::from)?;
            let range = span.start as usize..span.end as usize;
            let out = reference.forward_range(
                range.clone(),
                &x,
                &mut SpanCache::new(range.len(), shape[1]),
            )?;
            Ok(out
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(model::ModelError::from)?)
        })
        .await
    }
}

/// Compares a node's answer with the local result.
fn compare(got: &WireTensor, shape: &[usize; 3], expected: &[f32]) -> Result<(), String> {
    if got.dims() != shape {
        return Err(format!("shape {:?}, expected {shape:?}", got.dims()));
    }
    let values = got.to_f32().map_err(|e| format!("bad tensor: {e}"))?;
    if values.len() != expected.len() {
        return Err(format!(
            "{} values, expected {}",
            values.len(),
            expected.len()
        ));
    }
    let scale = expected.iter().fold(1.0f32, |a, v| a.max(v.abs()));
    let tolerance = SPOT_CHECK_TOLERANCE * scale;
    let mut worst = 0.0f32;
    for (g, e) in values.iter().zip(expected) {
        let d = (g - e).abs();
        // NaN is not within any tolerance.
        if d.is_nan() || d > tolerance {
            return Err(format!(
                "activations differ by {d} (> {tolerance}): got {g}, expected {e}"
            ));
        }
        worst = worst.max(d);
    }
    tracing::trace!(worst, tolerance, "spot check passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_catches_shifts_shapes_and_nan() {
        let exp = vec![0.5f32, -2.0, 3.0, 0.0];
        let enc = |v: &[f32], s: &[usize]| WireTensor::encode(v, s, Compression::None).unwrap();
        assert_eq!(compare(&enc(&exp, &[1, 2, 2]), &[1, 2, 2], &exp), Ok(()));
        let close: Vec<f32> = exp.iter().map(|v| v + 0.002).collect();
        assert_eq!(compare(&enc(&close, &[1, 2, 2]), &[1, 2, 2], &exp), Ok(()));
        let shifted: Vec<f32> = exp.iter().map(|v| v + 0.5).collect();
        assert!(compare(&enc(&shifted, &[1, 2, 2]), &[1, 2, 2], &exp).is_err());
        assert!(compare(&enc(&exp, &[1, 4, 1]), &[1, 2, 2], &exp).is_err());
        let nan = vec![f32::NAN, -2.0, 3.0, 0.0];
        assert!(compare(&enc(&nan, &[1, 2, 2]), &[1, 2, 2], &exp).is_err());
    }

    #[test]
    fn samples_are_bounded_and_medians_are_lower() {
        let mut m = Measurement::new(1, "p");
        for i in 0..(MAX_SAMPLES as u64 + 10) {
            push_sample(&mut m.ping_us, i);
        }
        assert_eq!(m.ping_us.len(), MAX_SAMPLES);
        assert_eq!(m.ping_us[0], 10);
        m.throughput_mtps = vec![4, 1, 3, 2];
        assert_eq!(m.median_throughput_mtps(), Some(2));
        assert_eq!(Measurement::new(2, "q").median_ping_us(), None);
    }

    #[test]
    fn self_assessment_sits_at_the_median() {
        let mut a = Measurement::new(1, "a");
        a.answered = 1;
        a.ping_us = vec![10];
        a.throughput_mtps = vec![100];
        let mut b = a.clone();
        b.node = 2;
        b.ping_us = vec![30];
        b.throughput_mtps = vec![300];
        let mut cheat = a.clone();
        cheat.node = 3;
        cheat.spot_check_failures = 1;
        cheat.ping_us = vec![1];
        let me = Measurement::self_assessed(9, "me", Some((0, 2)), 3, 2, &[a.clone(), b, cheat]);
        assert_eq!((me.probes, me.answered), (3, 2));
        assert_eq!(me.ping_us, vec![10]);
        assert_eq!(me.throughput_mtps, vec![100]);
        assert!(me.self_assessed);
        let absent = Measurement::self_assessed(9, "me", None, 3, 0, &[a]);
        assert_eq!(absent.answered, 0);
        assert!(absent.ping_us.is_empty());
    }
}
