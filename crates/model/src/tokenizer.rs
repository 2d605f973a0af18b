//! Text to token ids and back, built from `tokenizer.json` or from the
//! vocabulary and merges stored in GGUF metadata.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use crate::error::{ModelError, Result};

/// Token names that end a turn in common chat formats; any that exist in the
/// vocabulary stop generation alongside the declared end-of-sequence token.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
];

/// llama.cpp's `llama-bpe` (Llama 3) pre-tokenizer split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A Hugging Face tokenizer plus the special ids generation needs.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    add_bos: bool,
    stop_token_ids: Vec<u32>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`, taking special ids from `config.json` or
    /// `tokenizer_config.json` in `dir` when present.
    pub fn from_file(path: &Path, dir: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let id = |key: &str| {
            config.get(key).and_then(|v| match v {
                serde_json::Value::Array(a) => a.first().and_then(|x| x.as_u64()),
                other => other.as_u64(),
            })
        };
        let bos = id("bos_token_id").map(|v| v as u32);
        let eos = id("eos_token_id").map(|v| v as u32);
        Ok(Self::assemble(inner, bos, eos, false))
    }

    /// Builds the tokenizer GGUF files carry (`tokenizer.ggml.*`).
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let string = |k: &str| match md.get(k) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        };
        let model = string("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is not supported; put a tokenizer.json beside the model"
            )));
        }
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let merges = string_array(md, "tokenizer.ggml.merges")?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let pre_tokenizer = match string("tokenizer.ggml.pre").unwrap_or("default") {
            // SmolLM splits every digit apart before the byte-level regex, like llama.cpp does.
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
            "default" | "gpt2" | "gpt-2" => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            }
            "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF pre-tokenizer {other:?} is not supported; put a tokenizer.json beside the model"
                )));
            }
        };
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let added: Vec<_> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                                 "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let merges: Vec<[&str; 2]> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| [a, b])
                    .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge {m:?}")))
            })
            .collect::<Result<_>>()?;
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null, "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_str(&spec.to_string())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let id = |k: &str| crate::checkpoint::md_usize(md, k).map(|v| v as u32);
        let add_bos = matches!(
            md.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        Ok(Self::assemble(
            inner,
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            add_bos,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
        add_bos: bool,
    ) -> Self {
        let mut stop_token_ids: Vec<u32> = END_OF_TURN
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .chain(eos_token_id)
            .collect();
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        Self {
            inner,
            bos_token_id,
            eos_token_id,
            add_bos,
            stop_token_ids,
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`)
    /// become their ids; BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos
            && let Some(bos) = self.bos_token_id
        {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens omitted.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Text of `ids` with special tokens spelled out.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation: the end-of-sequence token and known end-of-turn tokens.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    /// Beginning-of-sequence token text, for chat templates.
    pub fn bos_token(&self) -> String {
        self.token_text(self.bos_token_id)
    }

    /// End-of-sequence token text, for chat templates.
    pub fn eos_token(&self) -> String {
        self.token_text(self.eos_token_id)
    }

    fn token_text(&self, id: Option<u32>) -> String {
        id.and_then(|id| self.inner.id_to_token(id))
            .unwrap_or_default()
    }
}

fn string_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    match md.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(ModelError::Tokenizer(format!("{key} holds a non-string"))),
            })
            .collect(),
        _ => Err(ModelError::Tokenizer(format!(
            "{key} is missing from the GGUF metadata"
        ))),
    }
}
