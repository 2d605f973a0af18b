//! Tiny randomly-initialised Llama checkpoints for tests, here and in the
//! crates above (servers and clients run real swarms over them in seconds).
//! Nothing in the product calls this module.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Hidden width.
pub const HIDDEN: usize = 64;
/// MLP width.
pub const INTER: usize = 96;
/// Default number of blocks.
pub const BLOCKS: usize = 4;
/// Query heads.
pub const HEADS: usize = 4;
/// Key/value heads.
pub const KV_HEADS: usize = 2;
/// Vocabulary size.
pub const VOCAB: usize = 128;
/// Context length.
pub const MAX_POS: usize = 64;

/// Random weights keyed by GGUF tensor name, `[out, in]` for matrices.
pub fn random_weights(seed: u64, blocks: usize) -> Vec<(String, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let hd = HIDDEN / HEADS;
    let mut mat = |rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tiny model")
    };
    let mut w = vec![
        ("token_embd.weight".to_string(), mat(VOCAB, HIDDEN, 1.0)),
        ("output.weight".to_string(), mat(VOCAB, HIDDEN, 0.3)),
    ];
    let norm = |v: f32| Tensor::full(v, HIDDEN, &Device::Cpu).expect("tiny model");
    w.push(("output_norm.weight".into(), norm(1.0)));
    for i in 0..blocks {
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

/// A tiny GGUF of `blocks` blocks with matrices in `dtype` (vectors stay
/// F32), at `path`.
///
/// # Panics
/// When the file cannot be written: this is test scaffolding.
pub fn write_gguf(path: &Path, blocks: usize, dtype: GgmlDType) {
    write_gguf_with(path, "llama", blocks, |t| {
        let dt = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        QTensor::quantize(t, dt).expect("quantize")
    });
}

/// A tiny GGUF whose tensors are made from the random weights by `encode`.
///
/// # Panics
/// When the file cannot be written: this is test scaffolding.
pub fn write_gguf_with(
    path: &Path,
    arch: &str,
    blocks: usize,
    encode: impl Fn(&Tensor) -> QTensor,
) {
    let tensors: Vec<(String, QTensor)> = random_weights(1, blocks)
        .iter()
        .map(|(n, t)| (n.clone(), encode(t)))
        .collect();
    use gguf_file::Value;
    let md = vec![
        ("general.architecture", Value::String(arch.into())),
        ("llama.block_count", Value::U32(blocks as u32)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(INTER as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.context_length", Value::U32(MAX_POS as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(VOCAB as u32)),
    ];
    let mut f = std::fs::File::create(path).expect("tiny model");
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("tiny model");
}

/// Largest absolute difference between two tensors of equal shape.
///
/// # Panics
/// When the shapes differ or a tensor op fails: this is test scaffolding.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar())
        .expect("max_diff")
}
