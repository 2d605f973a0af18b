//! Tiny randomly-initialised Llama checkpoints, written by the tests
//! themselves in both supported layouts.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

pub const HIDDEN: usize = 64;
pub const INTER: usize = 96;
pub const BLOCKS: usize = 4;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const VOCAB: usize = 128;
pub const MAX_POS: usize = 64;

/// Random weights keyed by GGUF tensor name, `[out, in]` for matrices.
pub fn random_weights(seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let hd = HIDDEN / HEADS;
    let mut mat = |rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    };
    let mut w = vec![
        ("token_embd.weight".to_string(), mat(VOCAB, HIDDEN, 1.0)),
        ("output.weight".to_string(), mat(VOCAB, HIDDEN, 0.3)),
    ];
    let norm = |v: f32| Tensor::full(v, HIDDEN, &Device::Cpu).unwrap();
    w.push(("output_norm.weight".into(), norm(1.0)));
    for i in 0..BLOCKS {
        let p = format!("blk.{i}.");
        w.push((format!("{p}attn_norm.weight"), norm(1.0)));
        w.push((format!("{p}ffn_norm.weight"), norm(0.9)));
        w.push((format!("{p}attn_q.weight"), mat(HEADS * hd, HIDDEN, 0.3)));
        w.push((format!("{p}attn_k.weight"), mat(KV_HEADS * hd, HIDDEN, 0.3)));
        w.push((format!("{p}attn_v.weight"), mat(KV_HEADS * hd, HIDDEN, 0.3)));
        w.push((
            format!("{p}attn_output.weight"),
            mat(HIDDEN, HEADS * hd, 0.3),
        ));
        w.push((format!("{p}ffn_gate.weight"), mat(INTER, HIDDEN, 0.3)));
        w.push((format!("{p}ffn_up.weight"), mat(INTER, HIDDEN, 0.3)));
        w.push((format!("{p}ffn_down.weight"), mat(HIDDEN, INTER, 0.3)));
    }
    w
}

/// A tiny GGUF with matrices in `dtype` (vectors stay F32) and `arch` as its architecture.
pub fn write_gguf(dir: &Path, dtype: GgmlDType, arch: &str) -> PathBuf {
    let path = dir.join(format!("tiny-{arch}-{dtype:?}.gguf"));
    write_gguf_with(&path, arch, |t| {
        let dt = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        QTensor::quantize(t, dt).unwrap()
    });
    path
}

/// A tiny GGUF whose tensors are made from the random weights by `encode`.
pub fn write_gguf_with(path: &Path, arch: &str, encode: impl Fn(&Tensor) -> QTensor) {
    let tensors: Vec<(String, QTensor)> = random_weights(1)
        .iter()
        .map(|(n, t)| (n.clone(), encode(t)))
        .collect();
    use gguf_file::Value;
    let md = vec![
        ("general.architecture", Value::String(arch.into())),
        ("llama.block_count", Value::U32(BLOCKS as u32)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(INTER as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.context_length", Value::U32(MAX_POS as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(VOCAB as u32)),
    ];
    let mut f = std::fs::File::create(path).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
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
    let tensors: HashMap<String, Tensor> = random_weights(1)
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

/// Largest absolute difference between two tensors of equal shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
