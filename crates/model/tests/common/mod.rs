//! Tiny randomly-initialised Llama checkpoints, written by the tests
//! themselves in both supported layouts.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_core::quantized::{GgmlDType, QTensor};
pub use model::testing::*;

/// A tiny GGUF with matrices in `dtype` (vectors stay F32) and `arch` as its architecture.
pub fn write_gguf(dir: &Path, dtype: GgmlDType, arch: &str) -> PathBuf {
    let path = dir.join(format!("tiny-{arch}-{dtype:?}.gguf"));
    write_gguf_with(&path, arch, |t| {
        let dt = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        QTensor::quantize(t, dt).unwrap()
    });
    path
}

/// A tiny GGUF of [`BLOCKS`] blocks whose tensors are made by `encode`.
pub fn write_gguf_with(path: &Path, arch: &str, encode: impl Fn(&Tensor) -> QTensor) {
    model::testing::write_gguf_with(path, arch, BLOCKS, encode)
}

/// The same kind of model as a Hugging Face folder: config.json + model.safetensors.
pub fn write_hf(dir: &Path, model_type: &str) -> PathBuf {
    let rename = |n: &str| -> String {
        let map = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
        ];
        if let Some((_, hf)) = map.iter().find(|(g, _)| *g == n) {
            return hf.to_string();
        }
        let rest = n.strip_prefix("blk.").unwrap();
        let (i, part) = rest.split_once('.').unwrap();
        let part = match part {
            "attn_norm.weight" => "input_layernorm.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            other => panic!("{other}"),
        };
        format!("model.layers.{i}.{part}")
    };
    let tensors: HashMap<String, Tensor> = random_weights(1, BLOCKS)
        .into_iter()
        .map(|(n, t)| (rename(&n), t))
        .collect();
    let folder = dir.join(format!("hf-{model_type}"));
    std::fs::create_dir_all(&folder).unwrap();
    candle_core::safetensors::save(&tensors, folder.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": model_type,
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": BLOCKS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POS, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false
    });
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    folder
}

pub use model::testing::max_diff;
