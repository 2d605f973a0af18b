//! The OpenAI wire format: request and response types, and the validation
//! that turns a request into a [`Job`] the backend can run.
//!
//! Sampling defaults are OpenAI's, not the CLI's: `temperature` 1 and `top_p`
//! 1, no top-k, no repetition penalty. Clients written against OpenAI expect
//! that meaning when they leave a field out; the web chat sends the CLI's
//! gentler defaults itself. `top_k` and `repetition_penalty` are accepted as
//! extensions (as vLLM does). `presence_penalty` and `frequency_penalty` are
//! range-checked and then ignored: the sampler has no additive penalties, and
//! silently mapping them onto the multiplicative repetition penalty would
//! change their meaning.

use model::{ChatMessage, FinishReason, GenerationRequest, SamplingParams};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ApiError;

/// OpenAI's limit on stop sequences.
const MAX_STOPS: usize = 4;

/// `/v1/completions`' default completion length when `max_tokens` is
/// omitted; OpenAI's own default for that legacy endpoint.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// Fields both completion endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    /// 0 to 2; 0 picks the most likely token. Default 1.
    pub temperature: Option<f32>,
    /// 0 to 1; nucleus sampling mass (0 behaves as greedy). Default 1.
    pub top_p: Option<f32>,
    /// Up to 4 strings that end the completion (not included in it).
    pub stop: Option<Stop>,
    /// Makes sampling repeatable; random when omitted.
    pub seed: Option<i64>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options; only `include_usage` is meaningful.
    pub stream_options: Option<StreamOptions>,
    /// Accepted (-2 to 2) and ignored; see the module docs.
    pub presence_penalty: Option<f32>,
    /// Accepted (-2 to 2) and ignored; see the module docs.
    pub frequency_penalty: Option<f32>,
    /// Extension: sample among the k most likely tokens (0: all).
    pub top_k: Option<usize>,
    /// Extension: divides the logits of recent tokens (1: off).
    pub repetition_penalty: Option<f32>,
    /// Completions per request; only 1 is supported.
    pub n: Option<u32>,
    /// An end-user id; accepted and ignored.
    pub user: Option<String>,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with token usage before `[DONE]`.
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// The model id.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<RequestMessage>,
    /// Most tokens to generate (deprecated name of `max_completion_tokens`).
    pub max_tokens: Option<u64>,
    /// Most tokens to generate. Default: whatever fits the context.
    pub max_completion_tokens: Option<u64>,
    /// Only `false` is supported.
    pub logprobs: Option<bool>,
    /// Tool calling is not supported; a non-empty list is refused.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Only `{"type": "text"}` is supported.
    pub response_format: Option<ResponseFormat>,
    /// Fields shared with `/v1/completions`.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `response_format`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestMessage {
    /// `system`, `developer` (treated as `system`), `user` or `assistant`.
    pub role: String,
    /// The text; `null` only for assistant turns.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// A message's content: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text`, `image_url`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The model id.
    pub model: String,
    /// The text to continue: a string, or a list holding one string.
    pub prompt: Prompt,
    /// Most tokens to generate. Default 16, as OpenAI's.
    pub max_tokens: Option<u64>,
    /// Only `false` is supported.
    pub echo: Option<bool>,
    /// Not supported.
    pub suffix: Option<String>,
    /// Not supported (`null` or 0 only).
    pub logprobs: Option<u32>,
    /// Only 1 is supported.
    pub best_of: Option<u32>,
    /// Fields shared with `/v1/chat/completions`.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// A completion prompt.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    One(String),
    /// A batch; only batches of one are supported.
    Many(Vec<String>),
}

/// What a validated request asks the backend for.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as is.
    Text(String),
}

impl Input {
    /// The request field a too-long input is blamed on.
    pub fn param(&self) -> &'static str {
        match self {
            Input::Chat(_) => "messages",
            Input::Text(_) => "prompt",
        }
    }
}

/// A validated request, ready for the backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The model id.
    pub model: String,
    /// The prompt.
    pub input: Input,
    /// Token choice.
    pub sampling: SamplingParams,
    /// `max_tokens` as the client gave it: exceeding the context is an error.
    pub max_tokens: Option<usize>,
    /// The cap when the client gave none: exceeding the context is clipped.
    pub default_max_tokens: Option<usize>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Answer as server-sent events.
    pub stream: bool,
    /// Add a usage chunk to the stream.
    pub include_usage: bool,
}

impl Job {
    /// The generation request for `prompt_ids` on a model of `limit`
    /// positions, or `context_length_exceeded` when it cannot fit.
    pub fn request(
        &self,
        prompt_ids: Vec<u32>,
        limit: usize,
    ) -> Result<GenerationRequest, ApiError> {
        let param = self.input.param();
        let prompt = prompt_ids.len();
        if prompt == 0 {
            return Err(ApiError::invalid(
                format!("the {param} is empty"),
                Some(param),
            ));
        }
        let wanted = self.max_tokens.unwrap_or(1);
        if prompt + wanted > limit {
            return Err(ApiError::context_too_long(
                prompt.saturating_add(wanted),
                limit,
                param,
            ));
        }
        let room = limit - prompt;
        let max_new_tokens = match (self.max_tokens, self.default_max_tokens) {
            (Some(n), _) => n,
            (None, Some(cap)) => cap.min(room),
            (None, None) => room,
        };
        Ok(GenerationRequest {
            prompt_ids,
            max_new_tokens,
            sampling: self.sampling.clone(),
            stop: self.stop.clone(),
            max_length: limit,
        })
    }
}

impl ChatCompletionRequest {
    /// Checks every field and builds the job.
    pub fn into_job(self) -> Result<Job, ApiError> {
        if self.logprobs == Some(true) {
            return Err(ApiError::unsupported(
                "logprobs are not supported",
                "logprobs",
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::unsupported(
                "tool calling is not supported",
                "tools",
            ));
        }
        if let Some(f) = &self.response_format
            && f.kind != "text"
        {
            return Err(ApiError::unsupported(
                format!(
                    "response_format {:?} is not supported; only \"text\"",
                    f.kind
                ),
                "response_format",
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages must hold at least one message",
                Some("messages"),
            ));
        }
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_chat_message(i))
            .collect::<Result<Vec<_>, _>>()?;
        let max_tokens = match self.max_completion_tokens {
            Some(n) => Some(positive(n, "max_completion_tokens")?),
            None => self
                .max_tokens
                .map(|n| positive(n, "max_tokens"))
                .transpose()?,
        };
        job(
            self.model,
            Input::Chat(messages),
            max_tokens,
            None,
            self.common,
        )
    }
}

impl RequestMessage {
    fn into_chat_message(self, i: usize) -> Result<ChatMessage, ApiError> {
        let role = match self.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "messages[{i}].role {other:?} is not supported; use system, user or assistant"
                    ),
                    Some(format!("messages[{i}].role").as_str()),
                ));
            }
        };
        let content = match self.content {
            Some(MessageContent::Text(t)) => t,
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::unsupported(
                                format!(
                                    "messages[{i}]: content parts of type {kind:?} are not supported; only text"
                                ),
                                &format!("messages[{i}].content"),
                            ));
                        }
                    }
                }
                text
            }
            None if role == "assistant" => String::new(),
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content is required"),
                    Some(format!("messages[{i}].content").as_str()),
                ));
            }
        };
        Ok(ChatMessage::new(role, content))
    }
}

impl CompletionRequest {
    /// Checks every field and builds the job.
    pub fn into_job(self) -> Result<Job, ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::unsupported("echo is not supported", "echo"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix is not supported", "suffix"));
        }
        if self.logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::unsupported(
                "logprobs are not supported",
                "logprobs",
            ));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported(
                "only best_of=1 is supported",
                "best_of",
            ));
        }
        let prompt = match self.prompt {
            Prompt::One(p) => p,
            Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
            Prompt::Many(_) => {
                return Err(ApiError::unsupported(
                    "only one prompt per request is supported",
                    "prompt",
                ));
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
        }
        let max_tokens = self
            .max_tokens
            .map(|n| positive(n, "max_tokens"))
            .transpose()?;
        job(
            self.model,
            Input::Text(prompt),
            max_tokens,
            Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
            self.common,
        )
    }
}

fn positive(n: u64, param: &str) -> Result<usize, ApiError> {
    if n == 0 {
        return Err(ApiError::invalid(
            format!("{param} must be at least 1"),
            Some(param),
        ));
    }
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

fn in_range(v: Option<f32>, lo: f32, hi: f32, param: &str) -> Result<(), ApiError> {
    match v {
        Some(x) if !(x.is_finite() && (lo..=hi).contains(&x)) => Err(ApiError::invalid(
            format!("{param} must be between {lo} and {hi}, got {x}"),
            Some(param),
        )),
        _ => Ok(()),
    }
}

fn job(
    model: String,
    input: Input,
    max_tokens: Option<usize>,
    default_max_tokens: Option<usize>,
    c: CommonFields,
) -> Result<Job, ApiError> {
    if model.is_empty() {
        return Err(ApiError::invalid("model is required", Some("model")));
    }
    in_range(c.temperature, 0.0, 2.0, "temperature")?;
    in_range(c.top_p, 0.0, 1.0, "top_p")?;
    in_range(c.presence_penalty, -2.0, 2.0, "presence_penalty")?;
    in_range(c.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
    if let Some(r) = c.repetition_penalty
        && !(r.is_finite() && r > 0.0)
    {
        return Err(ApiError::invalid(
            format!("repetition_penalty must be > 0, got {r}"),
            Some("repetition_penalty"),
        ));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported("only n=1 is supported", "n"));
    }
    let stop: Vec<String> = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!("at most {MAX_STOPS} stop sequences are allowed"),
            Some("stop"),
        ));
    }
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let top_p = c.top_p.unwrap_or(1.0);
    // top_p 0 keeps only the single most likely token: greedy.
    let temperature = if top_p == 0.0 {
        0.0
    } else {
        c.temperature.unwrap_or(1.0)
    };
    let sampling = SamplingParams {
        temperature,
        top_k: c.top_k.filter(|&k| k > 0),
        top_p: (top_p > 0.0 && top_p < 1.0).then_some(top_p),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        // The seed's bits, whatever its sign: OpenAI takes any integer.
        seed: c.seed.map_or_else(rand::random, |s| s as u64),
        ..SamplingParams::default()
    };
    let stream = c.stream.unwrap_or(false);
    Ok(Job {
        model,
        input,
        sampling,
        max_tokens,
        default_max_tokens,
        stop,
        stream,
        include_usage: stream
            && c.stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
    })
}

/// `finish_reason` as OpenAI spells it.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        // Cancelled answers reach no client; "stop" keeps the field valid.
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens (after the chat template).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage of a prompt and its completion.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// The `usage` field of a stream chunk: absent without `include_usage`,
/// `null` on every chunk but the last with it, as OpenAI sends it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChunkUsage {
    /// Field left out.
    #[default]
    Absent,
    /// `null`.
    Null,
    /// The totals, on the last chunk.
    Some(Usage),
}

impl ChunkUsage {
    fn is_absent(&self) -> bool {
        *self == ChunkUsage::Absent
    }
}

impl Serialize for ChunkUsage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ChunkUsage::Some(u) => u.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for ChunkUsage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<Usage>::deserialize(d)? {
            Some(u) => ChunkUsage::Some(u),
            None => ChunkUsage::Null,
        })
    }
}

/// A non-streamed chat answer (`chat.completion`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`, unique per request.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// Exactly one choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The one choice of a [`ChatCompletion`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The assistant's message.
    pub message: AssistantMessage,
    /// Always `null`: log-probabilities are not supported.
    pub logprobs: Option<serde_json::Value>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// The generated message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: String,
    /// The answer.
    pub content: String,
}

/// One streamed piece of a chat answer (`chat.completion.chunk`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Equal across the chunks of one answer.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds, equal across chunks.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice; empty on the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// See [`ChunkUsage`].
    #[serde(default, skip_serializing_if = "ChunkUsage::is_absent")]
    pub usage: ChunkUsage,
}

/// The choice of a [`ChatCompletionChunk`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What to append.
    pub delta: Delta,
    /// Always `null`.
    pub logprobs: Option<serde_json::Value>,
    /// `null` until the last content chunk.
    pub finish_reason: Option<String>,
}

/// The change a chunk brings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant`, on the first chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A `/v1/completions` answer (`text_completion`), whole or one streamed
/// piece of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCompletion {
    /// `cmpl-...`, unique per request.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice; empty on the usage chunk of a stream.
    pub choices: Vec<TextChoice>,
    /// Token counts: always on a whole answer; see [`ChunkUsage`] for chunks.
    #[serde(default, skip_serializing_if = "ChunkUsage::is_absent")]
    pub usage: ChunkUsage,
}

/// The choice of a [`TextCompletion`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextChoice {
    /// The generated text (a piece of it, when streamed).
    pub text: String,
    /// Always 0.
    pub index: u32,
    /// Always `null`.
    pub logprobs: Option<serde_json::Value>,
    /// `stop` or `length`; `null` on streamed pieces before the last.
    pub finish_reason: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelCard>,
}

/// One model, as `GET /v1/models/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The id to pass as `model`.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds; when this server started.
    pub created: u64,
    /// `hypertensor`.
    pub owned_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: serde_json::Value) -> Result<Job, ApiError> {
        serde_json::from_value::<ChatCompletionRequest>(body)
            .unwrap()
            .into_job()
    }

    #[test]
    fn omitted_sampling_fields_take_openai_defaults() {
        let j = chat(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        assert_eq!(j.sampling.temperature, 1.0);
        assert_eq!(j.sampling.top_p, None);
        assert_eq!(j.sampling.top_k, None);
        assert_eq!(j.sampling.repetition_penalty, 1.0);
        assert_eq!(j.max_tokens, None);
        assert!(!j.stream && !j.include_usage);
    }

    #[test]
    fn fields_map_onto_the_sampler() {
        let j = chat(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null}
            ],
            "temperature": 0, "top_p": 0.5, "top_k": 3, "repetition_penalty": 1.2,
            "seed": -1, "stop": "x", "max_tokens": 9, "max_completion_tokens": 7,
            "stream": true, "stream_options": {"include_usage": true},
            "presence_penalty": 1, "n": 1, "unknown_field": [1, 2]
        }))
        .unwrap();
        assert_eq!(
            j.input,
            Input::Chat(vec![
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "ab"),
                ChatMessage::new("assistant", ""),
            ])
        );
        assert_eq!(j.sampling.temperature, 0.0);
        assert_eq!(j.sampling.top_p, Some(0.5));
        assert_eq!(j.sampling.top_k, Some(3));
        assert_eq!(j.sampling.seed, u64::MAX);
        assert_eq!(j.stop, vec!["x".to_string()]);
        assert_eq!(j.max_tokens, Some(7));
        assert!(j.stream && j.include_usage);
    }

    #[test]
    fn out_of_range_fields_name_their_param() {
        for (field, value) in [
            ("temperature", serde_json::json!(2.5)),
            ("temperature", serde_json::json!(-0.1)),
            ("top_p", serde_json::json!(1.5)),
            ("max_tokens", serde_json::json!(0)),
            ("presence_penalty", serde_json::json!(3)),
            ("repetition_penalty", serde_json::json!(0)),
            ("stop", serde_json::json!(["a", "b", "c", "d", "e"])),
            ("n", serde_json::json!(2)),
        ] {
            let mut body = serde_json::json!({
                "model": "m", "messages": [{"role": "user", "content": "hi"}]
            });
            body[field] = value;
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, 400, "{field}");
            assert_eq!(e.body.param.as_deref(), Some(field), "{field}");
        }
    }

    #[test]
    fn context_limits_follow_openai() {
        let mut j = chat(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        // No max_tokens: the rest of the context.
        assert_eq!(j.request(vec![1; 10], 64).unwrap().max_new_tokens, 54);
        // A prompt filling the context leaves no room for one token.
        let e = j.request(vec![1; 64], 64).unwrap_err();
        assert_eq!(e.body.code.as_deref(), Some("context_length_exceeded"));
        // An explicit max_tokens past the context is refused, not clipped.
        j.max_tokens = Some(60);
        let e = j.request(vec![1; 10], 64).unwrap_err();
        assert_eq!(e.body.code.as_deref(), Some("context_length_exceeded"));
        assert!(e.body.message.contains("70 tokens"), "{}", e.body.message);
        // The completions default is clipped instead.
        j.max_tokens = None;
        j.default_max_tokens = Some(16);
        assert_eq!(j.request(vec![1; 60], 64).unwrap().max_new_tokens, 4);
    }

    #[test]
    fn chunk_usage_is_absent_null_or_set() {
        let mut c = ChatCompletionChunk {
            id: "x".into(),
            object: "chat.completion.chunk".into(),
            created: 0,
            model: "m".into(),
            choices: vec![],
            usage: ChunkUsage::Absent,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert!(v.get("usage").is_none());
        c.usage = ChunkUsage::Null;
        assert!(serde_json::to_value(&c).unwrap()["usage"].is_null());
        c.usage = ChunkUsage::Some(Usage::new(2, 3));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 5);
        assert_eq!(serde_json::from_value::<ChatCompletionChunk>(v).unwrap(), c);
    }
}
