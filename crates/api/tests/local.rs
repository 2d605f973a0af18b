//! `LocalBackend` over HTTP with a tiny random model: what the API answers
//! is exactly what `model::generate` produces in-process.

use std::path::Path;
use std::sync::Arc;

use api::LocalBackend;
use candle_core::quantized::GgmlDType;
use model::{ChatMessage, Checkpoint, GenerationRequest, LoadOptions, LocalBlocks, SamplingParams};
use serde_json::{Value, json};

/// A character-level tokenizer for the tiny model's 128-token vocabulary:
/// ChatML's special tokens, printable ASCII and newline, then a few
/// two-letter tokens the random model may emit but encoding never produces.
fn write_tokenizer(dir: &Path) {
    let mut vocab: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    vocab.push("\n".into());
    vocab.extend((32u8..127).map(|b| (b as char).to_string()));
    let pairs = [
        "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of",
        "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io",
    ];
    vocab.extend(pairs.map(String::from));
    assert_eq!(vocab.len(), model::testing::VOCAB);
    let added: Vec<Value> = vocab[..3]
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let ids: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null, "pre_tokenizer": null,
        "post_processor": null, "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": ids, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

#[tokio::test]
async fn greedy_chat_over_http_equals_local_generation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    model::testing::write_gguf(&path, model::testing::BLOCKS, GgmlDType::Q4_1);
    write_tokenizer(dir.path());

    // What the model says in-process.
    let messages = vec![ChatMessage::new("user", "Hi there")];
    let max_tokens = 12;
    let ckpt = Checkpoint::open(&path).unwrap();
    let local = ckpt
        .load_local(&LoadOptions::default(), &mut |_, _| {})
        .unwrap();
    let tokenizer = ckpt.tokenizer().unwrap();
    let template = ckpt.chat_template(&tokenizer).unwrap();
    let prompt_ids = tokenizer
        .encode(&template.render(&messages, true).unwrap())
        .unwrap();
    let req = GenerationRequest {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens: max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        max_length: model::testing::MAX_POS,
    };
    let mut blocks = LocalBlocks::new(&local.span, req.max_length);
    let expected = model::generate(
        &local.embedding,
        &local.head,
        &mut blocks,
        &tokenizer,
        &req,
        &mut |_| true,
    )
    .unwrap();
    assert!(!expected.token_ids.is_empty() && !expected.text.is_empty());

    // The same through the API.
    let backend = Arc::new(LocalBackend::load("tiny", &path, &LoadOptions::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api::serve(listener, backend, std::future::pending()));
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi there"}],
        "temperature": 0,
        "max_tokens": max_tokens,
    });
    let res = post(body.clone()).await.unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], expected.text);
    assert_eq!(
        answer["usage"]["completion_tokens"],
        expected.token_ids.len()
    );
    assert_eq!(answer["usage"]["prompt_tokens"], prompt_ids.len());

    // Streamed, the pieces add up to the same text.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let text = post(streamed).await.unwrap().text().await.unwrap();
    let content: String = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(content, expected.text);

    // The monitor sees one local pseudo-server covering every block.
    let state: Value = serde_json::from_str(
        &http
            .get(format!("{url}/api/v1/state"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let m = &state["models"][0];
    assert_eq!(m["id"], "tiny");
    assert_eq!(m["num_blocks"], model::testing::BLOCKS);
    assert_eq!(m["servers"][0]["peer_id"], "local");
    assert_eq!(m["coverage"], json!(vec![1; model::testing::BLOCKS]));
    assert!(m["servers"][0]["inference_rps"].as_f64().unwrap() >= 0.0);
}
