//! `hypertensor bench`: speed and memory, each beside a baseline measured in
//! the same run. Prints a table and writes JSON.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use clap::{Args, Subcommand};
use model::{Checkpoint, LocalModel, Precision, SpanCache, sampling::argmax};
use serde::Serialize;

use crate::local::ModelArgs;

/// `hypertensor bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Prompt and decode tokens/s of the local executor against candle-transformers' quantized_llama.
    Local(LocalBench),
    /// Per-hop overhead of one inference step through a server on loopback.
    Hop(crate::bench_hop::HopBench),
    /// Generation through 1, 2 and 3 servers and concurrent clients, against one process.
    Swarm(crate::bench_swarm::SwarmBench),
    /// Resident memory of a process holding a 10-block span, the whole model, and nothing.
    Memory(MemoryBench),
    /// One memory probe (run by `bench memory` in a child process).
    #[command(hide = true)]
    RssProbe(RssProbe),
}

impl BenchCmd {
    pub fn run(self) -> Result<()> {
        match self {
            Self::Local(b) => b.run(),
            Self::Hop(b) => b.run(),
            Self::Swarm(b) => b.run(),
            Self::Memory(b) => b.run(),
            Self::RssProbe(p) => p.run(),
        }
    }
}

/// Options of `bench local`.
#[derive(Debug, Args)]
pub struct LocalBench {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens in the benchmark prompt.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens decoded after the prompt.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Timed runs per engine (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-local.json")]
    json: PathBuf,
}

/// One engine's figures.
#[derive(Debug, Serialize)]
struct Row {
    engine: String,
    prompt_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

/// The operations timed: a prompt pass, then single-token steps.
trait Engine {
    fn name(&self) -> String;
    /// Processes the prompt from position 0 and returns the greedy next token.
    fn prefill(&mut self, ids: &[u32]) -> Result<u32>;
    /// Processes one token and returns the greedy next token.
    fn step(&mut self, id: u32) -> Result<u32>;
}

struct Ours {
    name: String,
    model: LocalModel,
    cache: SpanCache,
}

impl Engine for Ours {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn prefill(&mut self, ids: &[u32]) -> Result<u32> {
        self.cache = self.model.span.new_cache(4096);
        Ok(argmax(&self.model.step(ids, &mut self.cache)?.to_vec1()?))
    }
    fn step(&mut self, id: u32) -> Result<u32> {
        Ok(argmax(&self.model.step(&[id], &mut self.cache)?.to_vec1()?))
    }
}

struct CandleLlama {
    weights: quantized_llama::ModelWeights,
    device: Device,
    pos: usize,
}

impl CandleLlama {
    fn logits_argmax(&mut self, ids: &[u32]) -> Result<u32> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, self.pos)?.squeeze(0)?;
        self.pos += ids.len();
        Ok(argmax(&logits.to_vec1()?))
    }
}

impl Engine for CandleLlama {
    fn name(&self) -> String {
        "candle-transformers quantized_llama".into()
    }
    fn prefill(&mut self, ids: &[u32]) -> Result<u32> {
        // Position 0 makes quantized_llama drop its cache.
        self.pos = 0;
        self.logits_argmax(ids)
    }
    fn step(&mut self, id: u32) -> Result<u32> {
        self.logits_argmax(&[id])
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(engine: &mut dyn Engine, prompt: &[u32], decode: usize, repeats: usize) -> Result<Row> {
    let mut prompt_rates = Vec::new();
    let mut decode_rates = Vec::new();
    for run in 0..=repeats {
        let t0 = Instant::now();
        let mut next = engine.prefill(prompt)?;
        let t1 = Instant::now();
        for _ in 0..decode {
            next = engine.step(next)?;
        }
        let t2 = Instant::now();
        if run > 0 {
            prompt_rates.push(prompt.len() as f64 / (t1 - t0).as_secs_f64());
            decode_rates.push(decode as f64 / (t2 - t1).as_secs_f64());
        }
    }
    Ok(Row {
        engine: engine.name(),
        prompt_tokens_per_s: median(prompt_rates),
        decode_tokens_per_s: median(decode_rates),
    })
}

/// A prompt of exactly `n` tokens cut from ordinary prose.
fn bench_prompt(ckpt: &Checkpoint, n: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "The history of the printing press begins in the fifteenth century, when \
        movable type made books cheap enough for ordinary readers. Within decades, presses spread \
        across Europe, carrying news, science and religious argument to cities and villages alike. ";
    let tok = ckpt.tokenizer()?;
    let ids = tok.encode(TEXT)?;
    Ok(ids.iter().copied().cycle().take(n).collect())
}

impl LocalBench {
    fn run(self) -> Result<()> {
        if self.repeats == 0 || self.prompt_tokens == 0 {
            bail!("--repeats and --prompt-tokens must be at least 1");
        }
        let ckpt = self.model.open()?;
        let prompt = bench_prompt(&ckpt, self.prompt_tokens)?;
        let device = self.model.options()?.device;
        let mut rows = Vec::new();
        for (precision, label) in [
            (Precision::F32, "f32 activations (default)"),
            (Precision::Q8, "q8 activations"),
        ] {
            let opts = model::LoadOptions {
                precision,
                device: device.clone(),
            };
            let model = ckpt.load_local(&opts, &mut |_, _| {})?;
            let cache = model.span.new_cache(4096);
            let mut ours = Ours {
                name: format!("hypertensor, {label}"),
                model,
                cache,
            };
            rows.push(measure(
                &mut ours,
                &prompt,
                self.decode_tokens,
                self.repeats,
            )?);
        }
        let mut file = std::fs::File::open(ckpt.path())?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .context("the candle baseline needs a GGUF model")?;
        let weights = quantized_llama::ModelWeights::from_gguf(content, &mut file, &device)?;
        let mut candle = CandleLlama {
            weights,
            device: device.clone(),
            pos: 0,
        };
        rows.push(measure(
            &mut candle,
            &prompt,
            self.decode_tokens,
            self.repeats,
        )?);

        let base = &rows[2];
        println!(
            "model {} | {} prompt tokens, {} decode tokens, median of {} runs, {} threads, {:?}",
            ckpt.path().display(),
            self.prompt_tokens,
            self.decode_tokens,
            self.repeats,
            rayon::current_num_threads(),
            device.location(),
        );
        println!(
            "{:<44} {:>14} {:>14} {:>10} {:>10}",
            "engine", "prompt tok/s", "decode tok/s", "prompt x", "decode x"
        );
        for r in &rows {
            println!(
                "{:<44} {:>14.1} {:>14.1} {:>10.2} {:>10.2}",
                r.engine,
                r.prompt_tokens_per_s,
                r.decode_tokens_per_s,
                r.prompt_tokens_per_s / base.prompt_tokens_per_s,
                r.decode_tokens_per_s / base.decode_tokens_per_s
            );
        }
        let json = serde_json::json!({
            "model": ckpt.path(),
            "prompt_tokens": self.prompt_tokens,
            "decode_tokens": self.decode_tokens,
            "repeats": self.repeats,
            "threads": rayon::current_num_threads(),
            "device": format!("{:?}", device.location()),
            "baseline": base.engine,
            "rows": rows,
            "decode_ratio_vs_baseline": rows[0].decode_tokens_per_s / base.decode_tokens_per_s,
            "prompt_ratio_vs_baseline": rows[0].prompt_tokens_per_s / base.prompt_tokens_per_s,
        });
        std::fs::write(&self.json, serde_json::to_string_pretty(&json)?)?;
        eprintln!("wrote {}", self.json.display());
        Ok(())
    }
}

/// Options of `bench memory`.
#[derive(Debug, Args)]
pub struct MemoryBench {
    #[command(flatten)]
    model: ModelArgs,
    /// Cache positions filled in each span probe, in sessions of 512: the
    /// server's KV budget in use.
    #[arg(long, default_value_t = 4096)]
    kv_tokens: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-memory.json")]
    json: PathBuf,
}

/// Options of the hidden `bench rss-probe`.
#[derive(Debug, Args)]
pub struct RssProbe {
    #[command(flatten)]
    model: ModelArgs,
    /// `none`, `whole`, or a block range `START:END`.
    #[arg(long)]
    load: String,
    /// Cache positions to fill through the span, in sessions of 512.
    #[arg(long, default_value_t = 0)]
    kv_tokens: usize,
}

/// Positions per session when a probe fills its KV budget.
const PROBE_SESSION: usize = 512;

/// Resident and peak resident memory of this process, KiB.
fn rss_kib() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

impl RssProbe {
    fn run(self) -> Result<()> {
        let ckpt = self.model.open()?;
        let opts = self.model.options()?;
        // What is loaded stays alive until the memory is read.
        let span = match self.load.as_str() {
            "none" => None,
            "whole" => Some(ckpt.load_local(&opts, &mut |_, _| {})?.span),
            range => {
                let (a, b) = range.split_once(':').context("--load START:END")?;
                Some(ckpt.load_span(a.parse()?..b.parse()?, &opts, &mut |_, _| {})?)
            }
        };
        let weights = span.as_ref().map_or(0, model::BlockSpan::size_in_bytes);
        // Sessions as a server holds them: every cached position written.
        let mut caches = Vec::new();
        if let Some(span) = &span {
            let hidden = ckpt.config().hidden_size;
            for _ in 0..self.kv_tokens.div_ceil(PROBE_SESSION) {
                let mut cache = span.new_cache(PROBE_SESSION);
                let x = candle_core::Tensor::zeros(
                    (1, PROBE_SESSION, hidden),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )?;
                span.forward(&x, &mut cache)?;
                caches.push(cache);
            }
        }
        let kv: usize = caches.iter().map(model::SpanCache::size_in_bytes).sum();
        let (rss, hwm) = rss_kib()?;
        println!(
            "{}",
            serde_json::json!({"load": self.load, "rss_kib": rss, "peak_rss_kib": hwm,
                "block_weight_bytes": weights, "kv_tokens": caches.len() * PROBE_SESSION,
                "kv_bytes": kv})
        );
        Ok(())
    }
}

impl MemoryBench {
    /// Runs each probe in a fresh process and prints RSS against what the
    /// process holds: the span's weights and its filled KV cache. The rest,
    /// less the empty process's RSS, is the overhead a server adds.
    fn run(self) -> Result<()> {
        let exe = std::env::current_exe()?;
        let mut rows = Vec::new();
        println!(
            "| loaded | KV tokens | RSS MiB | peak RSS MiB | weights MiB | KV MiB | overhead MiB |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut empty_rss = 0.0;
        for load in ["none", "0:10", "0:30", "whole"] {
            let out = Command::new(&exe)
                .args([
                    "bench",
                    "rss-probe",
                    "--model",
                    &self.model.model,
                    "--load",
                    load,
                ])
                // A probe without a span has no cache to fill.
                .args(["--kv-tokens", &self.kv_tokens.to_string()])
                .output()?;
            if !out.status.success() {
                bail!(
                    "probe {load} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let row: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let mib_of_kib = |k: &str| row[k].as_f64().unwrap_or(0.0) / 1024.0;
            let mib_of_bytes = |k: &str| row[k].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
            if load == "none" {
                empty_rss = mib_of_kib("rss_kib");
            }
            let overhead = mib_of_kib("rss_kib")
                - empty_rss
                - mib_of_bytes("block_weight_bytes")
                - mib_of_bytes("kv_bytes");
            println!(
                "| {load} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {overhead:.1} |",
                row["kv_tokens"],
                mib_of_kib("rss_kib"),
                mib_of_kib("peak_rss_kib"),
                mib_of_bytes("block_weight_bytes"),
                mib_of_bytes("kv_bytes"),
            );
            rows.push(row);
        }
        std::fs::write(&self.json, serde_json::to_string_pretty(&rows)?)?;
        eprintln!("wrote {}", self.json.display());
        Ok(())
    }
}
