//! Opening a checkpoint (a GGUF file, or a Hugging Face folder with
//! `config.json` and `*.safetensors`) and loading the parts of it a peer needs.
//!
//! Loading is lazy and per tensor: a server hosting blocks 10..20 reads only
//! those blocks' weights, so its memory follows the span it serves.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTemplate;
use crate::config::{HfConfig, ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::linear::{FusedLinear, Linear, Precision, check_shape};
use crate::llama::{BlockSpan, BlockWeights, Embedding, Head, LocalModel};
use crate::tokenizer::Tokenizer;

/// Where and how weights are materialised.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Device the weights and activations live on.
    pub device: Device,
    /// Activation precision against quantized weights.
    pub precision: Precision,
}

impl LoadOptions {
    /// Parses a device name: `cpu`, `cuda` (the first GPU) or `cuda:N`.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for an unknown name, or for `cuda` in a
    /// build without the `cuda` feature or on a machine without that GPU.
    pub fn device_by_name(name: &str) -> Result<Device> {
        let ordinal = match name.split_once(':') {
            None if name == "cpu" => return Ok(Device::Cpu),
            None if name == "cuda" => 0,
            Some(("cuda", n)) => n.parse::<usize>().map_err(|_| {
                ModelError::Unsupported(format!("`{name}`: the GPU index must be a number"))
            })?,
            _ => {
                return Err(ModelError::Unsupported(format!(
                    "unknown device `{name}` (expected cpu, cuda or cuda:N)"
                )));
            }
        };
        if !candle_core::utils::cuda_is_available() {
            return Err(ModelError::Unsupported(format!(
                "`{name}`: this build has no CUDA support (build with `--features cuda`)"
            )));
        }
        Device::new_cuda(ordinal).map_err(|e| ModelError::Unsupported(format!("`{name}`: {e}")))
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

/// The tensors a Llama block is made of.
#[derive(Debug, Clone, Copy)]
enum BlockTensor {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// The tensors outside the blocks.
#[derive(Debug, Clone, Copy)]
enum GlobalTensor {
    Embedding,
    OutputNorm,
    Output,
}

enum Format {
    Gguf(Box<Content>),
    Safetensors(MmapedSafetensors),
}

/// An opened checkpoint: its config and metadata parsed, its weights still on disk.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    config: Arc<ModelConfig>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Opens `path`: a `.gguf` file, or a folder holding either one `.gguf`
    /// file or a Hugging Face checkpoint.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| ModelError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_file() {
            return Self::open_gguf(path);
        }
        if path.join("config.json").is_file() {
            return Self::open_hf(path);
        }
        let ggufs = list_with_extension(path, "gguf")?;
        match ggufs.as_slice() {
            [one] => Self::open_gguf(one),
            _ => Err(ModelError::UnknownLayout(path.to_path_buf())),
        }
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let corrupt = |reason: String| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(|source| ModelError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let file_len = file.metadata()?.len();
        let content = Content::read(&mut file).map_err(|e| corrupt(e.to_string()))?;
        // A truncated download still has a readable header; find it now rather
        // than when a server reaches the missing block.
        for (name, info) in &content.tensor_infos {
            let bytes = (info.shape.elem_count() / info.ggml_dtype.block_size()) as u64
                * info.ggml_dtype.type_size() as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(corrupt(format!(
                    "tensor {name} ends at byte {end} but the file has {file_len} bytes (truncated?)"
                )));
            }
        }
        let config = gguf_config(&content.metadata, &content)?;
        Ok(Self {
            path: path.to_path_buf(),
            format: Format::Gguf(Box::new(content)),
            config: Arc::new(config),
        })
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
            path: config_path.clone(),
            reason: e.to_string(),
        })?;
        let config = hf.into_config()?;
        let files = list_with_extension(dir, "safetensors")?;
        if files.is_empty() {
            return Err(ModelError::UnknownLayout(dir.to_path_buf()));
        }
        // SAFETY: the files are opened read-only; as with every mmap, changing
        // them while the model runs is the user's error, not undefined safe-Rust state.
        let tensors =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ModelError::Corrupt {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            path: dir.to_path_buf(),
            format: Format::Safetensors(tensors),
            config: Arc::new(config),
        })
    }

    /// The path this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the block weights are stored, e.g. `Q4_1` or `safetensors`: what
    /// servers announce as their quantization.
    pub fn weight_format(&self) -> String {
        match &self.format {
            Format::Gguf(content) => content
                .tensor_infos
                .get("blk.0.attn_q.weight")
                .map_or_else(|| "gguf".to_string(), |t| format!("{:?}", t.ggml_dtype)),
            Format::Safetensors(_) => "safetensors".to_string(),
        }
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer: `tokenizer.json` beside the weights when present,
    /// otherwise built from the GGUF metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let dir = if self.path.is_dir() {
            self.path.clone()
        } else {
            self.path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        };
        let json = dir.join("tokenizer.json");
        match &self.format {
            Format::Gguf(content) if !json.is_file() => Tokenizer::from_gguf(&content.metadata),
            _ => Tokenizer::from_file(&json, &dir),
        }
    }

    /// The model's chat template, or ChatML when it ships none.
    pub fn chat_template(&self, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let source = match &self.format {
            Format::Gguf(content) => match content.metadata.get("tokenizer.chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            },
            Format::Safetensors(_) => {
                let dir = &self.path;
                let cfg = dir.join("tokenizer_config.json");
                std::fs::read_to_string(cfg)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| {
                        v.get("chat_template")
                            .and_then(|t| t.as_str())
                            .map(String::from)
                    })
            }
        };
        ChatTemplate::new(source, tokenizer)
    }

    /// Loads blocks `range`, calling `progress(done, total)` after each block.
    pub fn load_span(
        &self,
        range: Range<usize>,
        options: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<BlockSpan> {
        let n = self.config.num_blocks;
        if range.start >= range.end || range.end > n {
            return Err(ModelError::InvalidSpan {
                start: range.start,
                end: range.end,
                num_blocks: n,
            });
        }
        let mut reader = self.reader()?;
        let mut blocks = Vec::with_capacity(range.len());
        for (done, i) in range.clone().enumerate() {
            blocks.push(self.load_block(&mut reader, i, options)?);
            progress(done + 1, range.len());
        }
        Ok(BlockSpan::new(
            self.config.clone(),
            range,
            blocks,
            options.device.clone(),
        ))
    }

    /// Loads the token embedding.
    pub fn load_embedding(&self, options: &LoadOptions) -> Result<Embedding> {
        let c = &self.config;
        let mut reader = self.reader()?;
        // The table stays in repacked blocks (rows dequantized on lookup) so a
        // client holds it at its quantized size.
        let opts = LoadOptions {
            precision: Precision::F32,
            ..options.clone()
        };
        // A head tied to the table multiplies by it at `options.precision`.
        let w = self
            .load_linear(&mut reader, Name::Global(GlobalTensor::Embedding), &opts)?
            .at(options.precision);
        check_shape("token embedding", &w.dims(), &[c.vocab_size, c.hidden_size])?;
        Embedding::new(w, &options.device)
    }

    /// Loads the final norm and LM head; `embedding` is reused when the head is tied to it.
    pub fn load_head(&self, options: &LoadOptions, embedding: Option<&Embedding>) -> Result<Head> {
        let c = &self.config;
        let mut reader = self.reader()?;
        let norm =
            self.load_vector(&mut reader, Name::Global(GlobalTensor::OutputNorm), options)?;
        let output = Name::Global(GlobalTensor::Output);
        let lm_head = if self.has(output) {
            self.load_linear(&mut reader, output, options)?
        } else if let Some(e) = embedding {
            e.as_linear(options.precision)
        } else {
            self.load_embedding(options)?.as_linear(options.precision)
        };
        check_shape("lm head", &lm_head.dims(), &[c.vocab_size, c.hidden_size])?;
        Ok(Head {
            norm,
            lm_head,
            eps: c.rms_norm_eps as f32,
            combiner: Default::default(),
        })
    }

    /// Loads the whole model into one process.
    pub fn load_local(
        &self,
        options: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LocalModel> {
        let embedding = self.load_embedding(options)?;
        let head = self.load_head(options, Some(&embedding))?;
        let span = self.load_span(0..self.config.num_blocks, options, progress)?;
        Ok(LocalModel {
            embedding,
            span,
            head,
        })
    }

    fn reader(&self) -> Result<Option<File>> {
        match &self.format {
            Format::Gguf(_) => Ok(Some(File::open(&self.path).map_err(|source| {
                ModelError::Open {
                    path: self.path.clone(),
                    source,
                }
            })?)),
            Format::Safetensors(_) => Ok(None),
        }
    }

    fn load_block(&self, r: &mut Option<File>, i: usize, o: &LoadOptions) -> Result<BlockWeights> {
        let c = &self.config;
        let (d, kv, q, ff) = (
            c.hidden_size,
            c.kv_dim(),
            c.num_heads * c.head_dim,
            c.intermediate_size,
        );
        let lin = |r: &mut Option<File>, t: BlockTensor, shape: [usize; 2]| -> Result<Linear> {
            let w = self.load_linear(r, Name::Block(i, t), o)?;
            check_shape(&self.name(Name::Block(i, t)), &w.dims(), &shape)?;
            Ok(w)
        };
        Ok(BlockWeights {
            attn_norm: self.load_vector(r, Name::Block(i, BlockTensor::AttnNorm), o)?,
            qkv: FusedLinear::new(vec![
                lin(r, BlockTensor::Q, [q, d])?,
                lin(r, BlockTensor::K, [kv, d])?,
                lin(r, BlockTensor::V, [kv, d])?,
            ])?,
            o: lin(r, BlockTensor::O, [d, q])?,
            ffn_norm: self.load_vector(r, Name::Block(i, BlockTensor::FfnNorm), o)?,
            gate_up: FusedLinear::new(vec![
                lin(r, BlockTensor::Gate, [ff, d])?,
                lin(r, BlockTensor::Up, [ff, d])?,
            ])?,
            down: lin(r, BlockTensor::Down, [d, ff])?,
        })
    }

    fn name(&self, name: Name) -> String {
        let gguf = matches!(self.format, Format::Gguf(_));
        match name {
            Name::Global(g) => match (g, gguf) {
                (GlobalTensor::Embedding, true) => "token_embd.weight".into(),
                (GlobalTensor::OutputNorm, true) => "output_norm.weight".into(),
                (GlobalTensor::Output, true) => "output.weight".into(),
                (GlobalTensor::Embedding, false) => "model.embed_tokens.weight".into(),
                (GlobalTensor::OutputNorm, false) => "model.norm.weight".into(),
                (GlobalTensor::Output, false) => "lm_head.weight".into(),
            },
            Name::Block(i, t) if gguf => {
                let part = match t {
                    BlockTensor::AttnNorm => "attn_norm",
                    BlockTensor::Q => "attn_q",
                    BlockTensor::K => "attn_k",
                    BlockTensor::V => "attn_v",
                    BlockTensor::O => "attn_output",
                    BlockTensor::FfnNorm => "ffn_norm",
                    BlockTensor::Gate => "ffn_gate",
                    BlockTensor::Up => "ffn_up",
                    BlockTensor::Down => "ffn_down",
                };
                format!("blk.{i}.{part}.weight")
            }
            Name::Block(i, t) => {
                let part = match t {
                    BlockTensor::AttnNorm => "input_layernorm",
                    BlockTensor::Q => "self_attn.q_proj",
                    BlockTensor::K => "self_attn.k_proj",
                    BlockTensor::V => "self_attn.v_proj",
                    BlockTensor::O => "self_attn.o_proj",
                    BlockTensor::FfnNorm => "post_attention_layernorm",
                    BlockTensor::Gate => "mlp.gate_proj",
                    BlockTensor::Up => "mlp.up_proj",
                    BlockTensor::Down => "mlp.down_proj",
                };
                format!("model.layers.{i}.{part}.weight")
            }
        }
    }

    fn has(&self, name: Name) -> bool {
        let n = self.name(name);
        match &self.format {
            Format::Gguf(c) => c.tensor_infos.contains_key(&n),
            Format::Safetensors(s) => s.get(&n).is_ok(),
        }
    }

    fn load_linear(&self, r: &mut Option<File>, name: Name, o: &LoadOptions) -> Result<Linear> {
        let n = self.name(name);
        match (&self.format, r) {
            (Format::Gguf(content), Some(file)) => {
                if !content.tensor_infos.contains_key(&n) {
                    return Err(ModelError::MissingTensor(n));
                }
                let q = content
                    .tensor(file, &n, &o.device)
                    .map_err(|e| ModelError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("{n}: {e}"),
                    })?;
                Linear::from_qtensor(q, o.precision, &o.device)
            }
            (Format::Safetensors(st), _) => Linear::dense(self.load_safetensor(st, &n, o)?),
            (Format::Gguf(_), None) => unreachable!("GGUF checkpoints always get a reader"),
        }
    }

    fn load_vector(&self, r: &mut Option<File>, name: Name, o: &LoadOptions) -> Result<Tensor> {
        let n = self.name(name);
        let t = match (&self.format, r) {
            (Format::Gguf(content), Some(file)) => {
                if !content.tensor_infos.contains_key(&n) {
                    return Err(ModelError::MissingTensor(n));
                }
                content
                    .tensor(file, &n, &o.device)
                    .and_then(|q| q.dequantize(&o.device))
                    .map_err(|e| ModelError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("{n}: {e}"),
                    })?
            }
            (Format::Safetensors(st), _) => self.load_safetensor(st, &n, o)?,
            (Format::Gguf(_), None) => unreachable!("GGUF checkpoints always get a reader"),
        };
        check_shape(&n, t.dims(), &[self.config.hidden_size])?;
        Ok(t.to_dtype(DType::F32)?)
    }

    fn load_safetensor(&self, st: &MmapedSafetensors, n: &str, o: &LoadOptions) -> Result<Tensor> {
        st.get(n)
            .map_err(|_| ModelError::MissingTensor(n.to_string()))?;
        Ok(st.load(n, &o.device)?.to_dtype(DType::F32)?)
    }
}

#[derive(Debug, Clone, Copy)]
enum Name {
    Global(GlobalTensor),
    Block(usize, BlockTensor),
}

fn list_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Open {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads a GGUF metadata value as an unsigned integer, whatever its width.
pub(crate) fn md_usize(md: &HashMap<String, Value>, key: &str) -> Option<usize> {
    match md.get(key)? {
        Value::U8(v) => Some(*v as usize),
        Value::U16(v) => Some(*v as usize),
        Value::U32(v) => Some(*v as usize),
        Value::U64(v) => usize::try_from(*v).ok(),
        Value::I32(v) => usize::try_from(*v).ok(),
        Value::I64(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}

fn md_f64(md: &HashMap<String, Value>, key: &str) -> Option<f64> {
    match md.get(key)? {
        Value::F32(v) => Some(*v as f64),
        Value::F64(v) => Some(*v),
        _ => None,
    }
}

fn gguf_config(md: &HashMap<String, Value>, content: &Content) -> Result<ModelConfig> {
    let arch = match md.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ModelError::Config("general.architecture is missing".into())),
    };
    if arch != "llama" && arch != "mistral" {
        return Err(ModelError::UnsupportedArchitecture(arch));
    }
    let need = |k: &str| {
        md_usize(md, &format!("{arch}.{k}"))
            .ok_or_else(|| ModelError::Config(format!("{arch}.{k} is missing")))
    };
    let hidden_size = need("embedding_length")?;
    let num_heads = need("attention.head_count")?;
    if num_heads == 0 {
        return Err(ModelError::Config("attention.head_count is 0".into()));
    }
    let vocab_size = match md_usize(md, &format!("{arch}.vocab_size")) {
        Some(v) => v,
        None => match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => content
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|i| i.shape.dims().first().copied())
                .ok_or_else(|| ModelError::Config("vocabulary size is unknown".into()))?,
        },
    };
    let config = ModelConfig {
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_blocks: need("block_count")?,
        num_heads,
        num_kv_heads: md_usize(md, &format!("{arch}.attention.head_count_kv")).unwrap_or(num_heads),
        head_dim: md_usize(md, &format!("{arch}.rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads),
        vocab_size,
        max_position_embeddings: md_usize(md, &format!("{arch}.context_length")).unwrap_or(2048),
        rope_theta: md_f64(md, &format!("{arch}.rope.freq_base")).unwrap_or(10_000.0) as f32,
        rms_norm_eps: md_f64(md, &format!("{arch}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        rope_style: RopeStyle::Interleaved,
    };
    config.validate()?;
    Ok(config)
}
