//! The executor on tiny random models: spans compose, caches match full
//! passes, kernels match dense math, and bad input gets clear errors.

mod common;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use model::{Checkpoint, LoadOptions, ModelError, RopeStyle, SpanCache};

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

#[test]
fn sub_ranges_run_inside_a_span() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(write_gguf(dir.path(), GgmlDType::Q4_0, "llama")).unwrap();
    let opts = LoadOptions::default();
    let emb = ckpt.load_embedding(&opts).unwrap();
    let whole = ckpt.load_span(0..BLOCKS, &opts, &mut |_, _| {}).unwrap();
    let part = ckpt.load_span(1..3, &opts, &mut |_, _| {}).unwrap();
    let x = emb.forward(&ids()).unwrap();
    let want = part.forward(&x, &mut part.new_cache(MAX_POS)).unwrap();
    let got = whole
        .forward_range(1..3, &x, &mut SpanCache::new(2, MAX_POS))
        .unwrap();
    assert!(max_diff(&got, &want) < 1e-6);
    // Outside the span, or a cache for another number of blocks: refused.
    assert!(
        part.forward_range(0..2, &x, &mut SpanCache::new(2, MAX_POS))
            .is_err()
    );
    assert!(
        whole
            .forward_range(1..3, &x, &mut SpanCache::new(3, MAX_POS))
            .is_err()
    );
}

/// The input gradient matches central finite differences of
/// `sum(output * g)` along a random direction.
#[test]
fn backward_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    for path in [
        write_gguf(dir.path(), GgmlDType::Q4_1, "llama"),
        write_hf(dir.path(), "llama"),
    ] {
        let ckpt = Checkpoint::open(&path).unwrap();
        let opts = LoadOptions::default();
        let emb = ckpt.load_embedding(&opts).unwrap();
        let span = ckpt.load_span(0..BLOCKS, &opts, &mut |_, _| {}).unwrap();
        let x = emb.forward(&ids()).unwrap();
        let g = seeded(x.dims(), 1);
        let d = seeded(x.dims(), 2);
        let grad = span.backward_range(span.range(), &x, &g).unwrap();
        assert_eq!(grad.dims(), x.dims());
        let loss = |x: &Tensor| -> f64 {
            let y = span.forward(x, &mut span.new_cache(MAX_POS)).unwrap();
            let y = y.to_dtype(candle_core::DType::F64).unwrap();
            let g = g.to_dtype(candle_core::DType::F64).unwrap();
            (y * g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        // Central differences, Richardson-extrapolated: the O(eps^2) error of
        // a single difference is large on this deliberately nonlinear model.
        let central = |eps: f64| {
            let plus = loss(&(&x + (&d * eps).unwrap()).unwrap());
            let minus = loss(&(&x - (&d * eps).unwrap()).unwrap());
            (plus - minus) / (2.0 * eps)
        };
        let numeric = (4.0 * central(5e-3) - central(1e-2)) / 3.0;
        let analytic = (grad.to_dtype(candle_core::DType::F64).unwrap()
            * d.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        let rel = (numeric - analytic).abs() / numeric.abs().max(1e-3);
        assert!(
            rel < 1e-2,
            "{}: numeric {numeric} analytic {analytic}",
            path.display()
        );
        // Mismatched gradient shape: refused.
        let bad = Tensor::zeros((1, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(span.backward_range(span.range(), &x, &bad).is_err());
    }
}

/// Batched decode steps of sessions at different positions equal stepping
/// each session alone, and leave each cache as stepping alone would: for
/// GGUF's interleaved rotations and Hugging Face's halves. Bit for bit on
/// quantized weights, whose kernels are batch-invariant; candle's float GEMM
/// is not, so f32 weights agree to rounding (relative to the outputs, which
/// reach about 10 here: a few ulp of that is above 1e-5).
#[test]
fn batched_steps_equal_separate_steps() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_gguf(dir.path(), GgmlDType::Q4_1, "llama");
    let hf = write_hf(&dir.path().join("hf"), "llama");
    for (path, tolerance) in [(gguf, 0.0), (hf, 1e-5)] {
        let close = |a: &Tensor, b: &Tensor| {
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            max_diff(a, b) <= tolerance * scale.max(1.0)
        };
        let ckpt = Checkpoint::open(&path).unwrap();
        let opts = LoadOptions::default();
        let emb = ckpt.load_embedding(&opts).unwrap();
        let span = ckpt.load_span(0..BLOCKS, &opts, &mut |_, _| {}).unwrap();
        let prompts: [&[u32]; 3] = [&[1, 2, 3], &[9], &[4, 5, 6, 7, 8]];
        // Caches below 16 positions are allowed too.
        let mut alone: Vec<SpanCache> = (0..3).map(|_| SpanCache::new(BLOCKS, 7)).collect();
        for (p, c) in prompts.iter().zip(&mut alone) {
            span.forward(&emb.forward(p).unwrap(), c).unwrap();
        }
        let mut batched = alone.clone();
        let next: Vec<Tensor> = [10u32, 11, 12]
            .iter()
            .map(|&t| emb.forward(&[t]).unwrap())
            .collect();
        let want: Vec<Tensor> = next
            .iter()
            .zip(&mut alone)
            .map(|(x, c)| span.forward(x, c).unwrap())
            .collect();
        let got = span.forward_batch(0..BLOCKS, &next, &mut batched).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(close(g, w), "{}", path.display());
        }
        // The caches continue identically.
        let after = emb.forward(&[13]).unwrap();
        for (a, b) in alone.iter_mut().zip(&mut batched) {
            let x = span.forward(&after, a).unwrap();
            let y = span.forward(&after, b).unwrap();
            assert!(close(&x, &y), "{}", path.display());
        }
        assert!(
            span.forward_batch(0..BLOCKS, &next[..2], &mut batched)
                .is_err()
        );
    }
}

/// Deterministic normal-ish values of shape `dims`.
fn seeded(dims: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

#[test]
fn device_names_parse_or_say_what_is_wrong() {
    assert!(LoadOptions::device_by_name("cpu").unwrap().is_cpu());
    for bad in ["gpu", "cuda:x", "cpu:0", ""] {
        let err = LoadOptions::device_by_name(bad).unwrap_err().to_string();
        assert!(err.contains(bad), "{bad}: {err}");
    }
    if !candle_core::utils::cuda_is_available() {
        let err = LoadOptions::device_by_name("cuda:0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
