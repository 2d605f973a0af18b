//! Llama-family transformer blocks on candle: the compute every other crate
//! builds on.
//!
//! This crate loads checkpoints (quantized GGUF, Hugging Face safetensors),
//! builds the tokenizer and chat template, and runs the model in three parts:
//! the token [`Embedding`], any [`BlockSpan`] of blocks with a per-session
//! [`SpanCache`], and the [`Head`]. The `server` crate hosts spans, the `client`
//! crate keeps the embedding and head and chains remote spans through the same
//! [`generate()`] loop via [`BlockRunner`]. It depends on nothing else in the
//! workspace.

pub mod chat;
pub mod checkpoint;
mod combine;
pub mod config;
pub mod error;
mod fused;
pub mod gather;
pub mod generate;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod package;
pub mod quant;
pub mod sampling;
pub mod testing;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use checkpoint::{Checkpoint, LoadOptions};
pub use config::{ModelConfig, RopeStyle};
pub use error::{ModelError, Result};
pub use generate::{
    BlockRunner, FinishReason, Generation, GenerationRequest, LocalBlocks, generate,
};
pub use linear::{Linear, Precision};
pub use llama::{BlockSpan, Embedding, Head, LocalModel, SpanCache};
pub use package::{DEFAULT_MODEL, ModelPackage, cache_dir, resolve_model};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
