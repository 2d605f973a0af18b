//! The executor on tiny random models: spans compose, caches match full
//! passes, kernels match dense math, and bad input gets clear errors.

mod common;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use model::{Checkpoint, LoadOptions, ModelError, RopeStyle};

fn ids() -> Vec<u32> {
    vec![3, 17, 99, 4, 56, 120, 7, 64, 1, 0, 33]
}

fn full_logits(ckpt: &Checkpoint) -> Tensor {
    let opts = LoadOptions::default();
    let m = ckpt.load_local(&opts, &mut |_, _| {}).unwrap();
    let mut cache = m.span.new_cache(MAX_POS);
    let h = m
        .span
        .forward(&m.embedding.forward(&ids()).unwrap(), &mut cache)
        .unwrap();
    m.head.forward_all(&h).unwrap()
}

#[test]
fn spans_compose_to_the_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    for path in [
        write_gguf(dir.path(), GgmlDType::Q4_1, "llama"),
        write_hf(dir.path(), "llama"),
    ] {
        let ckpt = Checkpoint::open(&path).unwrap();
        let opts = LoadOptions::default();
        let emb = ckpt.load_embedding(&opts).unwrap();
        let head = ckpt.load_head(&opts, None).unwrap();
        let whole = ckpt.load_span(0..BLOCKS, &opts, &mut |_, _| {}).unwrap();
        let x = emb.forward(&ids()).unwrap();
        let want = whole.forward(&x, &mut whole.new_cache(MAX_POS)).unwrap();
        let mut h = x;
        for r in [0..1, 1..3, 3..4] {
            let span = ckpt.load_span(r, &opts, &mut |_, _| {}).unwrap();
            h = span.forward(&h, &mut span.new_cache(MAX_POS)).unwrap();
        }
        let diff = max_diff(
            &head.forward_all(&h).unwrap(),
            &head.forward_all(&want).unwrap(),
        );
        assert!(diff < 1e-4, "{}: {diff}", path.display());
    }
}

#[test]
fn cached_decoding_equals_the_full_pass() {
    let dir = tempfile::tempdir().unwrap();
    for path in [
        write_gguf(dir.path(), GgmlDType::Q8_0, "llama"),
        write_hf(dir.path(), "llama"),
    ] {
        let ckpt = Checkpoint::open(&path).unwrap();
        let m = ckpt
            .load_local(&LoadOptions::default(), &mut |_, _| {})
            .unwrap();
        let want = full_logits(&ckpt);
        // First a 4-token prefill, then one token at a time.
        let mut cache = m.span.new_cache(MAX_POS);
        let ids = ids();
        let mut rows = Vec::new();
        let h = m
            .span
            .forward(&m.embedding.forward(&ids[..4]).unwrap(), &mut cache)
            .unwrap();
        rows.push(m.head.forward_all(&h).unwrap());
        for id in &ids[4..] {
            let h = m
                .span
                .forward(&m.embedding.forward(&[*id]).unwrap(), &mut cache)
                .unwrap();
            rows.push(m.head.forward_all(&h).unwrap());
        }
        let got = Tensor::cat(&rows, 1).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "{}: {diff}", path.display());
        assert_eq!(cache.len(), ids.len());
    }
}

#[test]
fn truncating_a_cache_replays_identically() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(write_gguf(dir.path(), GgmlDType::Q4_0, "llama")).unwrap();
    let m = ckpt
        .load_local(&LoadOptions::default(), &mut |_, _| {})
        .unwrap();
    let ids = ids();
    let mut cache = m.span.new_cache(MAX_POS);
    m.step(&ids[..6], &mut cache).unwrap();
    let first = m.step(&ids[6..8], &mut cache).unwrap();
    cache.truncate(6);
    let again = m.step(&ids[6..8], &mut cache).unwrap();
    assert_eq!(max_diff(&first, &again), 0.0);
}

#[test]
fn quantized_kernels_match_dequantized_dense_weights() {
    // The same Q4_1 weights, once as blocks and once dequantized to F32, must
    // give the same logits: activations stay f32 on both paths.
    let dir = tempfile::tempdir().unwrap();
    let q4 = |t: &Tensor| {
        QTensor::quantize(
            t,
            if t.rank() == 1 {
                GgmlDType::F32
            } else {
                GgmlDType::Q4_1
            },
        )
        .unwrap()
    };
    let blocks = dir.path().join("blocks.gguf");
    write_gguf_with(&blocks, "llama", q4);
    let dense = dir.path().join("dense.gguf");
    write_gguf_with(&dense, "llama", |t| {
        QTensor::quantize(&q4(t).dequantize(&Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
    });
    let a = full_logits(&Checkpoint::open(&blocks).unwrap());
    let b = full_logits(&Checkpoint::open(&dense).unwrap());
    let diff = max_diff(&a, &b);
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn checkpoints_report_their_layout() {
    let dir = tempfile::tempdir().unwrap();
    let g = Checkpoint::open(write_gguf(dir.path(), GgmlDType::Q4_1, "llama")).unwrap();
    assert_eq!(g.config().rope_style, RopeStyle::Interleaved);
    assert_eq!(g.config().num_blocks, BLOCKS);
    assert!(!g.config().tie_word_embeddings);
    let h = Checkpoint::open(write_hf(dir.path(), "llama")).unwrap();
    assert_eq!(h.config().rope_style, RopeStyle::Halves);
    assert_eq!(h.config().num_kv_heads, KV_HEADS);
}

#[test]
fn a_span_holds_only_its_own_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(write_gguf(dir.path(), GgmlDType::Q4_1, "llama")).unwrap();
    let opts = LoadOptions::default();
    let one = ckpt
        .load_span(1..2, &opts, &mut |_, _| {})
        .unwrap()
        .size_in_bytes();
    let all = ckpt
        .load_span(0..BLOCKS, &opts, &mut |_, _| {})
        .unwrap()
        .size_in_bytes();
    assert_eq!(one * BLOCKS, all);
}

#[test]
fn missing_files_are_clear_errors() {
    let err = Checkpoint::open("/nonexistent/model.gguf").unwrap_err();
    assert!(matches!(err, ModelError::Open { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/model.gguf"));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Checkpoint::open(empty.path()),
        Err(ModelError::UnknownLayout(_))
    ));
}

#[test]
fn truncated_and_garbage_gguf_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), GgmlDType::Q4_1, "llama");
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = Checkpoint::open(&cut).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    for junk in [&bytes[..10], b"not a gguf file at all".as_slice()] {
        std::fs::write(&cut, junk).unwrap();
        assert!(matches!(
            Checkpoint::open(&cut),
            Err(ModelError::Corrupt { .. })
        ));
    }
}

#[test]
fn unsupported_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Checkpoint::open(write_gguf(dir.path(), GgmlDType::Q8_0, "gpt2")).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture(a) if a == "gpt2"),
        "{err}"
    );
    let err = Checkpoint::open(write_hf(dir.path(), "bert")).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture(a) if a == "bert"),
        "{err}"
    );
}

#[test]
fn bad_runtime_inputs_are_refused_without_damage() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(write_gguf(dir.path(), GgmlDType::Q4_1, "llama")).unwrap();
    let m = ckpt
        .load_local(&LoadOptions::default(), &mut |_, _| {})
        .unwrap();
    let mut cache = m.span.new_cache(MAX_POS);
    let err = m.step(&[5, VOCAB as u32], &mut cache).unwrap_err();
    assert!(matches!(err, ModelError::TokenOutOfRange { id, .. } if id == VOCAB as u32));
    // Wrong hidden width.
    let bad = Tensor::zeros((1, 2, HIDDEN + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.span.forward(&bad, &mut cache),
        Err(ModelError::InputShape(_))
    ));
    let bad = Tensor::zeros((2, HIDDEN), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.span.forward(&bad, &mut cache),
        Err(ModelError::InputShape(_))
    ));
    // Longer than the model's context.
    let long: Vec<u32> = (0..MAX_POS as u32 + 1).map(|i| i % VOCAB as u32).collect();
    let err = m.step(&long, &mut cache).unwrap_err();
    assert!(
        matches!(err, ModelError::ContextTooLong { limit, .. } if limit == MAX_POS),
        "{err}"
    );
    // Longer than the session's own limit.
    let mut small = m.span.new_cache(4);
    assert!(matches!(
        m.step(&[1, 2, 3, 4, 5], &mut small),
        Err(ModelError::ContextTooLong { limit: 4, .. })
    ));
    // Nothing above touched the cache: it still works from position 0.
    assert_eq!(cache.len(), 0);
    m.step(&[1, 2, 3], &mut cache).unwrap();
    assert_eq!(cache.len(), 3);
    // Spans outside the model.
    for r in [2..2, 3..(BLOCKS + 1)] {
        let err = ckpt
            .load_span(r, &LoadOptions::default(), &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(err, ModelError::InvalidSpan { .. }), "{err}");
    }
}
