//! The generation loop: embed, run the blocks, predict, sample, stream text.
//!
//! The blocks sit behind [`BlockRunner`], so the same loop drives a model held
//! in one process ([`LocalBlocks`]) and, in the client, a chain of remote servers.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::llama::{BlockSpan, Embedding, Head, SpanCache};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Runs every block of the model over new positions of one sequence.
pub trait BlockRunner {
    /// Takes hidden states `[1, T, hidden]` of the next `T` positions and
    /// returns the last block's output for them.
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor>;
}

/// A [`BlockSpan`] covering the whole model, with its session cache.
#[derive(Debug)]
pub struct LocalBlocks<'a> {
    span: &'a BlockSpan,
    cache: SpanCache,
}

impl<'a> LocalBlocks<'a> {
    /// A fresh session over `span`, allowing up to `max_len` positions.
    pub fn new(span: &'a BlockSpan, max_len: usize) -> Self {
        Self {
            span,
            cache: span.new_cache(max_len),
        }
    }
}

impl BlockRunner for LocalBlocks<'_> {
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor> {
        self.span.forward(hidden, &mut self.cache)
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// The prompt, already tokenized (chat template applied if wanted).
    pub prompt_ids: Vec<u32>,
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: SamplingParams,
    /// Strings that end generation; they are not part of the returned text.
    pub stop: Vec<String>,
    /// Longest sequence (prompt plus generated) allowed.
    pub max_length: usize,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_new_tokens` or the context limit was reached.
    Length,
    /// The text callback asked to stop.
    Cancelled,
}

/// The outcome of one generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    /// Generated text, stop string excluded.
    pub text: String,
    /// Generated token ids, end-of-turn token excluded.
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Time to process the prompt and pick the first token.
    pub prefill_time: Duration,
    /// Time spent on every later token.
    pub decode_time: Duration,
}

/// Generates a continuation of `req.prompt_ids`.
///
/// `on_text` receives each new piece of text as soon as it is certain (never
/// half a UTF-8 character, never the start of a stop string); returning
/// `false` cancels.
pub fn generate(
    embedding: &Embedding,
    head: &Head,
    blocks: &mut dyn BlockRunner,
    tokenizer: &Tokenizer,
    req: &GenerationRequest,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if req.prompt_ids.is_empty() {
        return Err(ModelError::InputShape("the prompt is empty".into()));
    }
    if req.prompt_ids.len() >= req.max_length {
        return Err(ModelError::ContextTooLong {
            requested: req.prompt_ids.len() + 1,
            limit: req.max_length,
        });
    }
    let mut sampler = Sampler::new(req.sampling.clone())?;
    let mut stream = TextStream::new(&req.stop);
    let mut history = req.prompt_ids.clone();
    let mut generated = Vec::new();
    let start = Instant::now();
    let mut prefill_time = None;
    let mut next_input = req.prompt_ids.clone();
    let finish_reason = loop {
        if generated.len() >= req.max_new_tokens || history.len() >= req.max_length {
            break FinishReason::Length;
        }
        let hidden = embedding.forward(&next_input)?;
        let out = blocks.forward(&hidden)?;
        let logits: Vec<f32> = head.forward(&out)?.squeeze(0)?.to_vec1()?;
        let id = sampler.sample(&logits, &history);
        prefill_time.get_or_insert_with(|| start.elapsed());
        if tokenizer.stop_token_ids().contains(&id) {
            break FinishReason::Stop;
        }
        generated.push(id);
        history.push(id);
        next_input = vec![id];
        let text = tokenizer.decode(&generated)?;
        match stream.push(&text) {
            Push::Emit(piece) => {
                if !piece.is_empty() && !on_text(piece) {
                    break FinishReason::Cancelled;
                }
            }
            Push::Stopped(piece) => {
                if !piece.is_empty() {
                    on_text(piece);
                }
                break FinishReason::Stop;
            }
        }
    };
    if finish_reason == FinishReason::Length {
        let rest = stream.flush();
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    let prefill_time = prefill_time.unwrap_or_default();
    Ok(Generation {
        text: stream.finished_text(),
        token_ids: generated,
        finish_reason,
        prompt_tokens: req.prompt_ids.len(),
        prefill_time,
        decode_time: start.elapsed().saturating_sub(prefill_time),
    })
}

/// Turns the growing decoded text into safe-to-show pieces.
struct TextStream<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

enum Push<'t> {
    /// New text that can be shown.
    Emit(&'t str),
    /// A stop string appeared; this is the text before it not yet shown.
    Stopped(&'t str),
}

impl<'a> TextStream<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    fn push(&mut self, text: &str) -> Push<'_> {
        self.text.clear();
        self.text.push_str(text);
        if let Some(cut) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(cut);
            let from = self.emitted.min(cut);
            self.emitted = cut;
            return Push::Stopped(&self.text[from..cut]);
        }
        // A trailing U+FFFD is a character whose bytes have not all arrived.
        let complete = self.text.trim_end_matches('\u{FFFD}').len();
        // Hold back the longest tail that could still grow into a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| self.text[..complete].ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let safe = (complete - hold).max(self.emitted);
        let from = self.emitted;
        self.emitted = safe;
        Push::Emit(&self.text[from..safe])
    }

    fn flush(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }

    fn finished_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], steps: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&stops);
        let mut out = Vec::new();
        for t in steps {
            match s.push(t) {
                Push::Emit(p) => out.push(p.to_string()),
                Push::Stopped(p) => {
                    out.push(p.to_string());
                    return (out, true);
                }
            }
        }
        (out, false)
    }

    #[test]
    fn stop_strings_are_cut_and_never_shown() {
        let (out, stopped) = feed(
            &["\nUser:"],
            &["Hi", "Hi\n", "Hi\nUs", "Hi\nUser:", "Hi\nUser: x"],
        );
        assert!(stopped);
        assert_eq!(out.concat(), "Hi");
    }

    #[test]
    fn held_back_text_is_released_when_it_cannot_be_a_stop() {
        let (out, stopped) = feed(&["STOP"], &["a S", "a ST", "a STA"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a ", "", "STA"]);
    }

    #[test]
    fn a_stop_prefix_before_an_incomplete_character_is_held_too() {
        let (out, stopped) = feed(&["ST"], &["abS\u{FFFD}", "abSX"]);
        assert!(!stopped);
        assert_eq!(out, vec!["ab", "SX"]);
    }

    #[test]
    fn incomplete_characters_wait_for_their_bytes() {
        let (out, _) = feed(&[], &["caf", "caf\u{FFFD}", "café"]);
        assert_eq!(out, vec!["caf", "", "é"]);
    }
}
