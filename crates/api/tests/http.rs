//! The API over real HTTP on 127.0.0.1, against a test double behind the
//! `Backend` trait that "generates" fixed pieces of text.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{Backend, BackendError, ModelState, PeerState, ServerEntry, SwarmState};
use futures::FutureExt;
use futures::future::BoxFuture;
use model::{ChatMessage, FinishReason, Generation, GenerationRequest};
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};

/// The answer the double gives, piece by piece.
const PIECES: &[&str] = &["Hello", ",", " world", "!", " How", " are", " you", "?"];
const ANSWER: &str = "Hello, world! How are you?";
const MAX_LENGTH: usize = 64;

/// Models the double serves:
/// - `fake` answers [`PIECES`];
/// - `endless` answers "tick " until told to stop, then reports it;
/// - `down` is unavailable (no servers), `broken` fails inside.
#[derive(Default)]
struct Double {
    requests: Mutex<Vec<GenerationRequest>>,
    cancelled: Notify,
}

impl Double {
    fn last_request(&self) -> GenerationRequest {
        self.requests.lock().unwrap().last().cloned().unwrap()
    }
}

/// One token per word, plus three for the template's markup.
fn tokens(text: &str) -> Vec<u32> {
    (0..text.split_whitespace().count() as u32 + 3).collect()
}

impl Backend for Double {
    fn models(&self) -> Vec<String> {
        ["fake", "endless", "down", "broken"]
            .map(String::from)
            .to_vec()
    }

    fn chat_prompt(&self, model: &str, messages: &[ChatMessage]) -> Result<Vec<u32>, BackendError> {
        self.encode(
            model,
            &messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        )
    }

    fn encode(&self, model: &str, text: &str) -> Result<Vec<u32>, BackendError> {
        self.max_length(model)?;
        Ok(tokens(text))
    }

    fn max_length(&self, model: &str) -> Result<usize, BackendError> {
        if self.models().iter().any(|m| m == model) {
            Ok(MAX_LENGTH)
        } else {
            Err(BackendError::UnknownModel(model.into()))
        }
    }

    fn generate(
        &self,
        model: &str,
        req: &GenerationRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, BackendError> {
        self.requests.lock().unwrap().push(req.clone());
        let mut generation = Generation {
            text: String::new(),
            token_ids: Vec::new(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: req.prompt_ids.len(),
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        };
        match model {
            "down" => {
                return Err(BackendError::Unavailable(
                    "no servers cover blocks 3..7".into(),
                ));
            }
            "broken" => return Err(BackendError::Internal("kernel exploded".into())),
            "endless" => loop {
                // A real model takes time per token. Without this the double
                // would fill the (unbounded) channel as fast as memory allows
                // in the moment before the server notices the client left.
                std::thread::sleep(Duration::from_millis(1));
                generation.token_ids.push(0);
                if !on_text("tick ") {
                    generation.finish_reason = FinishReason::Cancelled;
                    self.cancelled.notify_one();
                    return Ok(generation);
                }
            },
            _ => {}
        }
        for piece in PIECES {
            if generation.token_ids.len() == req.max_new_tokens {
                generation.finish_reason = FinishReason::Length;
                break;
            }
            generation.token_ids.push(1);
            let before = generation.text.len();
            generation.text.push_str(piece);
            // Stop strings end the text where they start, as model::generate does.
            if let Some(cut) = req
                .stop
                .iter()
                .filter_map(|s| generation.text.find(s.as_str()))
                .min()
            {
                generation.text.truncate(cut);
                if cut > before {
                    on_text(&generation.text[before..]);
                }
                return Ok(generation);
            }
            if !on_text(piece) {
                generation.finish_reason = FinishReason::Cancelled;
                return Ok(generation);
            }
        }
        Ok(generation)
    }

    fn swarm_state(&self) -> BoxFuture<'_, SwarmState> {
        let server = |peer: &str, start, end, state| ServerEntry {
            peer_id: peer.into(),
            start,
            end,
            state,
            inference_rps: 12.5,
            forward_rps: 300.0,
            network_rps: 1000.0,
            cache_tokens_left: 4096,
            ping_ms: Some(3.2),
            version: "0.1.0".into(),
            using_relay: false,
        };
        futures::future::ready(SwarmState {
            models: vec![ModelState::new(
                "fake",
                6,
                vec![
                    server("a", 0, 3, PeerState::Online),
                    server("b", 2, 5, PeerState::Online),
                    server("c", 3, 6, PeerState::Joining),
                ],
            )],
        })
        .boxed()
    }
}

/// A server on an OS-assigned port; it stops when `stop` is sent or dropped.
struct Server {
    url: String,
    double: Arc<Double>,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start() -> Server {
    let double = Arc::new(Double::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(api::serve(listener, double.clone(), stopped.map(|_| ())));
    Server {
        url,
        double,
        // No pooling: a dropped response must close its connection.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
        stop: Some(stop),
        done,
    }
}

impl Server {
    async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let res = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, body)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_raw(path, body.to_string()).await
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let res = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    }

    /// Posts a streaming request and returns the `data:` payloads.
    async fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let res = self
            .http
            .post(format!("{}{path}", self.url))
            .json_body(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        sse_data(&res.text().await.unwrap())
    }
}

/// reqwest's `json` needs a feature; this is all it does.
trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(v.to_string())
    }
}

fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "say hi"}]})
}

fn assert_error(status: u16, body: &Value, want_status: u16, kind: &str, code: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{body}");
    assert_eq!(e["code"], code, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        e.get("param").is_some(),
        "param must be present (maybe null): {body}"
    );
}

#[tokio::test]
async fn chat_completion_answers_in_openai_shape() {
    let s = start().await;
    let (status, body) = s.post("/v1/chat/completions", chat_body("fake")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].as_u64().unwrap() > 0);
    assert_eq!(body["model"], "fake");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], ANSWER);
    assert_eq!(choice["finish_reason"], "stop");
    // "say hi" is 2 words + 3 template tokens.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13})
    );
    // OpenAI's defaults when sampling fields are left out; the rest of the
    // context when max_tokens is.
    let req = s.double.last_request();
    assert_eq!(req.sampling.temperature, 1.0);
    assert_eq!(req.sampling.top_p, None);
    assert_eq!(req.max_new_tokens, MAX_LENGTH - 5);
    assert_eq!(req.max_length, MAX_LENGTH);
}

#[tokio::test]
async fn sampling_fields_reach_the_backend() {
    let s = start().await;
    let mut body = chat_body("fake");
    body["temperature"] = json!(0);
    body["top_p"] = json!(0.5);
    body["top_k"] = json!(7);
    body["repetition_penalty"] = json!(1.3);
    body["seed"] = json!(42);
    body["max_tokens"] = json!(3);
    body["presence_penalty"] = json!(0.5);
    body["frequency_penalty"] = json!(0.5);
    let (status, resp) = s.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["choices"][0]["message"]["content"], "Hello, world");
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
    let req = s.double.last_request();
    assert_eq!(req.sampling.temperature, 0.0, "temperature 0 is greedy");
    assert_eq!(req.sampling.top_p, Some(0.5));
    assert_eq!(req.sampling.top_k, Some(7));
    assert_eq!(req.sampling.repetition_penalty, 1.3);
    assert_eq!(req.sampling.seed, 42);
    assert_eq!(req.max_new_tokens, 3);
}

#[tokio::test]
async fn stop_strings_cut_the_answer() {
    let s = start().await;
    let mut body = chat_body("fake");
    body["stop"] = json!("!");
    let (_, resp) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(resp["choices"][0]["message"]["content"], "Hello, world");
    assert_eq!(resp["choices"][0]["finish_reason"], "stop");
    body["stop"] = json!([" are", "xyz"]);
    assert_eq!(s.double.last_request().stop, vec!["!".to_string()]);
    let (_, resp) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(
        resp["choices"][0]["message"]["content"],
        "Hello, world! How"
    );
    // Streamed, the stop string never shows either.
    body["stream"] = json!(true);
    let text: String = s
        .stream("/v1/chat/completions", body)
        .await
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, "Hello, world! How");
}

#[tokio::test]
async fn streamed_chat_sends_role_deltas_finish_usage_and_done() {
    let s = start().await;
    let mut body = chat_body("fake");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let data = s.stream("/v1/chat/completions", body).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // role, 8 pieces, finish, usage.
    assert_eq!(chunks.len(), 1 + PIECES.len() + 2, "{chunks:#?}");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id per answer");
        assert_eq!(c["model"], "fake");
        assert!(
            c.get("usage").is_some(),
            "include_usage puts usage on every chunk"
        );
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    let pieces: Vec<&str> = chunks[1..=PIECES.len()]
        .iter()
        .map(|c| {
            assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
            assert!(c["usage"].is_null());
            c["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(pieces, PIECES);
    let finish = &chunks[PIECES.len() + 1];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13})
    );
}

#[tokio::test]
async fn streams_leave_usage_out_unless_asked() {
    let s = start().await;
    let mut body = chat_body("fake");
    body["stream"] = json!(true);
    let data = s.stream("/v1/chat/completions", body).await;
    assert_eq!(data.len(), 1 + PIECES.len() + 1 + 1, "{data:?}");
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("usage").is_none(), "{v}");
    }
}

#[tokio::test]
async fn completions_answer_whole_and_streamed() {
    let s = start().await;
    let body = json!({"model": "fake", "prompt": "Once upon a time", "max_tokens": 4});
    let (status, resp) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["object"], "text_completion");
    assert!(resp["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(resp["choices"][0]["text"], "Hello, world!");
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
    assert_eq!(
        resp["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})
    );
    // OpenAI's default of 16 tokens when max_tokens is left out; a list of
    // one prompt is a prompt.
    let (_, resp) = s
        .post(
            "/v1/completions",
            json!({"model": "fake", "prompt": ["Once"]}),
        )
        .await;
    assert_eq!(resp["choices"][0]["text"], ANSWER);
    assert_eq!(s.double.last_request().max_new_tokens, 16);

    let mut body = body;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let data = s.stream("/v1/completions", body).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "Hello, world!");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn models_are_listed_and_looked_up() {
    let s = start().await;
    let (status, text) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model");
            assert_eq!(m["owned_by"], "hypertensor");
            m["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ids, ["fake", "endless", "down", "broken"]);
    let (status, text) = s.get("/v1/models/fake").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["id"], "fake");
    let (status, text) = s.get("/v1/models/org/nope").await;
    let body = serde_json::from_str(&text).unwrap();
    assert_error(
        status,
        &body,
        404,
        "invalid_request_error",
        "model_not_found",
    );
}

#[tokio::test]
async fn malformed_requests_get_openai_400s() {
    let s = start().await;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "truncated JSON",
            r#"{"model": "fake", "#.into(),
            "invalid_json",
        ),
        ("not JSON", "hello".into(), "invalid_json"),
        (
            "missing messages",
            json!({"model": "fake"}).to_string(),
            "invalid_json",
        ),
        (
            "missing model",
            json!({"messages": []}).to_string(),
            "invalid_json",
        ),
        (
            "wrong type",
            json!({"model": "fake", "messages": [], "temperature": "hot"}).to_string(),
            "invalid_json",
        ),
    ];
    for (what, body, code) in cases {
        let (status, resp) = s.post_raw("/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{what}: {resp}");
        assert_error(status, &resp, 400, "invalid_request_error", code);
    }
}

#[tokio::test]
async fn bad_parameters_name_the_field() {
    let s = start().await;
    let cases = [
        ("messages", json!([])),
        ("temperature", json!(2.5)),
        ("temperature", json!(-1)),
        ("top_p", json!(1.5)),
        ("max_tokens", json!(0)),
        ("max_completion_tokens", json!(0)),
        ("presence_penalty", json!(-3)),
        ("repetition_penalty", json!(-1)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
    ];
    for (field, value) in cases {
        let mut body = chat_body("fake");
        body[field] = value.clone();
        let (status, resp) = s.post("/v1/chat/completions", body).await;
        assert_error(status, &resp, 400, "invalid_request_error", "invalid_value");
        assert_eq!(resp["error"]["param"], field, "{field}={value}: {resp}");
    }
    let mut body = chat_body("fake");
    body["messages"] = json!([{"role": "tool", "content": "x"}]);
    let (status, resp) = s.post("/v1/chat/completions", body).await;
    assert_error(status, &resp, 400, "invalid_request_error", "invalid_value");
    assert_eq!(resp["error"]["param"], "messages[0].role");
    let mut body = chat_body("fake");
    body["n"] = json!(3);
    let (status, resp) = s.post("/v1/chat/completions", body).await;
    assert_error(
        status,
        &resp,
        400,
        "invalid_request_error",
        "unsupported_parameter",
    );
}

#[tokio::test]
async fn unknown_models_are_404_whether_streamed_or_not() {
    let s = start().await;
    let mut body = chat_body("gpt-4");
    let (status, resp) = s.post("/v1/chat/completions", body.clone()).await;
    assert_error(
        status,
        &resp,
        404,
        "invalid_request_error",
        "model_not_found",
    );
    assert_eq!(resp["error"]["param"], "model");
    body["stream"] = json!(true);
    let (status, resp) = s.post("/v1/chat/completions", body).await;
    assert_error(
        status,
        &resp,
        404,
        "invalid_request_error",
        "model_not_found",
    );
    let (status, resp) = s
        .post("/v1/completions", json!({"model": "gpt-4", "prompt": "x"}))
        .await;
    assert_error(
        status,
        &resp,
        404,
        "invalid_request_error",
        "model_not_found",
    );
}

#[tokio::test]
async fn context_overflow_is_context_length_exceeded() {
    let s = start().await;
    let long = "word ".repeat(MAX_LENGTH);
    let (status, resp) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "fake", "messages": [{"role": "user", "content": long}]}),
        )
        .await;
    assert_error(
        status,
        &resp,
        400,
        "invalid_request_error",
        "context_length_exceeded",
    );
    assert_eq!(resp["error"]["param"], "messages");
    // A prompt that fits, with a max_tokens that does not.
    let mut body = chat_body("fake");
    body["max_tokens"] = json!(MAX_LENGTH);
    let (status, resp) = s.post("/v1/chat/completions", body).await;
    assert_error(
        status,
        &resp,
        400,
        "invalid_request_error",
        "context_length_exceeded",
    );
    let (status, resp) = s
        .post(
            "/v1/completions",
            json!({"model": "fake", "prompt": long, "stream": true}),
        )
        .await;
    assert_error(
        status,
        &resp,
        400,
        "invalid_request_error",
        "context_length_exceeded",
    );
    assert_eq!(resp["error"]["param"], "prompt");
}

#[tokio::test]
async fn oversize_bodies_are_413() {
    let s = start().await;
    let padding = "x".repeat(api::routes::BODY_LIMIT);
    let body = json!({"model": "fake", "messages": [{"role": "user", "content": padding}]});
    let (status, resp) = s.post("/v1/chat/completions", body).await;
    assert_error(
        status,
        &resp,
        413,
        "invalid_request_error",
        "request_too_large",
    );
}

#[tokio::test]
async fn backend_failures_are_503_and_500_in_openai_shape() {
    let s = start().await;
    let (status, resp) = s.post("/v1/chat/completions", chat_body("down")).await;
    assert_error(status, &resp, 503, "server_error", "service_unavailable");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("blocks 3..7")
    );
    // Before any text, a stream still gets the real status.
    let mut body = chat_body("down");
    body["stream"] = json!(true);
    let (status, resp) = s.post("/v1/chat/completions", body).await;
    assert_error(status, &resp, 503, "server_error", "service_unavailable");
    let (status, resp) = s.post("/v1/chat/completions", chat_body("broken")).await;
    assert_error(status, &resp, 500, "server_error", "internal_error");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_openai_errors() {
    let s = start().await;
    let (status, text) = s.get("/v1/engines").await;
    let body = serde_json::from_str(&text).unwrap();
    assert_error(status, &body, 404, "invalid_request_error", "unknown_url");
    let (status, text) = s.get("/v1/chat/completions").await;
    let body = serde_json::from_str(&text).unwrap();
    assert_error(
        status,
        &body,
        405,
        "invalid_request_error",
        "method_not_allowed",
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_the_generation() {
    let s = start().await;
    let mut body = chat_body("endless");
    body["stream"] = json!(true);
    let mut res = s
        .http
        .post(format!("{}/v1/chat/completions", s.url))
        .json_body(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let first = res.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(res);
    // The double stops only when on_text returns false; the timeout only
    // turns a hang into a failure.
    tokio::time::timeout(Duration::from_secs(30), s.double.cancelled.notified())
        .await
        .expect("the generation was not cancelled after the client left");
}

#[tokio::test]
async fn shutdown_ends_running_streams_and_serve_returns() {
    let mut s = start().await;
    let mut body = chat_body("endless");
    body["stream"] = json!(true);
    let mut res = s
        .http
        .post(format!("{}/v1/chat/completions", s.url))
        .json_body(&body)
        .send()
        .await
        .unwrap();
    res.chunk().await.unwrap().unwrap();
    s.stop.take().unwrap().send(()).unwrap();
    // The stream ends, with an error event rather than [DONE].
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), res.chunk())
        .await
        .expect("stream did not end after shutdown")
        .unwrap()
    {
        rest.extend_from_slice(&chunk);
    }
    let data = sse_data(&String::from_utf8_lossy(&rest));
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "service_unavailable", "{last}");
    tokio::time::timeout(Duration::from_secs(30), s.done)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_latency() {
    let s = start().await;
    let (_, before) = s.get("/metrics").await;
    assert!(
        !before.contains("route=\"/v1/chat/completions\""),
        "{before}"
    );
    s.post("/v1/chat/completions", chat_body("fake")).await;
    let mut body = chat_body("fake");
    body["stream"] = json!(true);
    s.stream("/v1/chat/completions", body).await;
    s.post("/v1/chat/completions", chat_body("nope")).await;
    s.get("/nowhere").await;
    let (status, text) = s.get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"hypertensor_api_requests_total{route="/v1/chat/completions",status="200"} 2"#,
        r#"hypertensor_api_requests_total{route="/v1/chat/completions",status="404"} 1"#,
        r#"hypertensor_api_requests_total{route="unmatched",status="404"} 1"#,
        r#"hypertensor_api_requests_total{route="/metrics",status="200"} 1"#,
        "hypertensor_api_prompt_tokens_total 10",
        "hypertensor_api_generated_tokens_total 16",
        "hypertensor_api_time_to_first_token_seconds_count 2",
        "# TYPE hypertensor_api_request_duration_seconds histogram",
        "# TYPE hypertensor_api_requests_in_flight gauge",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn pages_and_swarm_state_are_served() {
    let s = start().await;
    let (status, page) = s.get("/").await;
    assert_eq!(status, 200);
    for id in [
        r#"id="input""#,
        r#"id="send""#,
        r#"id="stop""#,
        r#"id="model""#,
    ] {
        assert!(page.contains(id), "chat page lacks {id}");
    }
    let (status, page) = s.get("/monitor").await;
    assert_eq!(status, 200);
    assert!(page.contains("/api/v1/state"));
    let (status, text) = s.get("/api/v1/state").await;
    assert_eq!(status, 200);
    let state: Value = serde_json::from_str(&text).unwrap();
    assert!(state["generated_at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let m = &state["models"][0];
    assert_eq!(m["id"], "fake");
    assert_eq!(m["coverage"], json!([1, 1, 2, 1, 1, 0]));
    assert_eq!(m["servers"][2]["state"], "joining");
    assert_eq!(m["servers"][0]["ping_ms"], 3.2);
}
