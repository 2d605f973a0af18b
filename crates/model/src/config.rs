//! Hyper-parameters of a Llama-family model, read from GGUF metadata or a
//! Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How rotary embeddings pair the dimensions of a head.
///
/// llama.cpp's converter permutes the Q and K weights so that GGUF files rotate
/// adjacent pairs, while Hugging Face checkpoints rotate the two halves of each
/// head. The math is the same; the weight layout decides which one to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF layout.
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face layout.
    Halves,
}

/// The shape of a Llama-family transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate and up projections.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_blocks: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Rotary embedding base frequency.
    pub rope_theta: f32,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Whether the LM head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Dimension pairing of the rotary embedding.
    pub rope_style: RopeStyle,
}

impl ModelConfig {
    /// Checks the relations between fields that the executor relies on.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(ModelError::Config(m));
        if self.hidden_size == 0 || self.num_blocks == 0 || self.vocab_size == 0 {
            return fail("hidden size, block count and vocabulary must be non-zero".into());
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 {
            return fail("head counts must be non-zero".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fail(format!(
                "{} query heads is not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return fail(format!("head dimension {} must be even", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return fail(format!("rope base {} must be positive", self.rope_theta));
        }
        Ok(())
    }

    /// Width of the key (and value) projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The subset of a Hugging Face `config.json` that Llama-family models use.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    rope_theta: f32,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_max_positions() -> usize {
    2048
}
fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}

/// Architectures whose blocks are plain Llama blocks (RMSNorm, RoPE, GQA, SwiGLU).
const LLAMA_FAMILY: &[&str] = &["llama", "mistral", "LlamaForCausalLM", "MistralForCausalLM"];

impl HfConfig {
    pub(crate) fn into_config(self) -> Result<ModelConfig> {
        // `model_type` names the block structure; `architectures` only the head on top.
        let arch = self
            .model_type
            .clone()
            .or_else(|| self.architectures.first().cloned())
            .unwrap_or_default();
        if !LLAMA_FAMILY.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        if self.num_attention_heads == 0 {
            return Err(ModelError::Config("num_attention_heads is 0".into()));
        }
        let config = ModelConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_blocks: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            rope_style: RopeStyle::Halves,
        };
        config.validate()?;
        Ok(config)
    }
}
