//! The OpenAI request and response shapes the server speaks. Requests keep
//! only the fields we honor (others are ignored, as OpenAI-compatible
//! servers do); responses are built as JSON values.

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::chat_template::ChatMessage;
use crate::sampling::Sampler;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Message content: a string, or a list of parts of which the `text`
/// ones are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// Fields shared by both completion endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct SamplingFields {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub fields: SamplingFields,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub fields: SamplingFields,
}

/// Tokens generated when a request names no limit.
pub const DEFAULT_MAX_TOKENS: usize = 256;

impl SamplingFields {
    /// The sampler the request asks for; checks ranges. Without a seed a
    /// sampling request gets a fresh one.
    pub fn sampler(&self, fresh_seed: u64) -> Result<Sampler, ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("temperature = {temperature}: must be between 0 and 2"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("top_p = {top_p}: must be in (0, 1]"),
            ));
        }
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("min_p = {min_p}: must be between 0 and 1"),
            ));
        }
        // vLLM's convention: -1 (or 0) turns top-k off.
        let top_k = match self.top_k.unwrap_or(0) {
            k if k <= 0 => 0,
            k => k as usize,
        };
        Ok(Sampler {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: self.seed.unwrap_or(fresh_seed),
        })
    }

    pub fn max_tokens(&self) -> Result<usize, ApiError> {
        let n = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        if n == 0 {
            return Err(ApiError::bad_request(
                "invalid_value",
                "max_tokens must be at least 1",
            ));
        }
        Ok(n)
    }

    pub fn stops(&self) -> Result<Vec<String>, ApiError> {
        let stops = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if stops.len() > 4 {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("stop: at most 4 sequences, got {}", stops.len()),
            ));
        }
        Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// Choices to generate: 1 by default, at most [`MAX_N`].
    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) as usize {
            n @ 1..=MAX_N => Ok(n),
            n => Err(ApiError::bad_request(
                "invalid_value",
                format!("n = {n}: give between 1 and {MAX_N} choices"),
            )),
        }
    }
}

/// Most choices one request may ask for.
pub const MAX_N: usize = 16;

impl ChatRequest {
    /// The conversation as the chat template takes it.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_value",
                "messages: give at least one message",
            ));
        }
        Ok(self
            .messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .filter(|p| p.kind == "text")
                        .filter_map(|p| p.text.as_deref())
                        .collect(),
                },
            })
            .collect())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// Identity of one response, shared by all its chunks.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseMeta {
    /// The whole response: one `(text, finish)` per choice.
    pub fn full(&self, choices: &[(String, FinishReason)], usage: Usage) -> Value {
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, (text, finish))| match self.endpoint {
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish.as_str(),
                }),
                Endpoint::Completion => json!({
                    "index": index,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish.as_str(),
                }),
            })
            .collect();
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion",
                Endpoint::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage.to_json(),
        })
    }

    /// A streamed chunk of choice `index`: `text` (with the role on a
    /// choice's first chat chunk), or the finish reason on its last one.
    pub fn chunk(
        &self,
        index: usize,
        text: &str,
        first: bool,
        finish: Option<FinishReason>,
    ) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (first, finish.is_some()) {
                    (_, true) => json!({}),
                    (true, false) => json!({"role": "assistant", "content": text}),
                    (false, false) => json!({"content": text}),
                };
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => {
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The usage chunk `stream_options.include_usage` asks for.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.to_json(),
        })
    }

    fn chunk_object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }
}
