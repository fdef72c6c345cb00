//! The HTTP endpoints: `/health`, `/metrics`, `/v1/models` and the two
//! OpenAI completion endpoints (whole responses or SSE streams).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

use super::error::{json_response, ApiError};
use super::generate::{self, GenEvent, GenerateParams};
use super::openai::{
    ChatRequest, CompletionRequest, Endpoint, FinishReason, ResponseMeta, SamplingFields, Usage,
};
use super::AppState;

pub async fn health() -> Response {
    json_response(&json!({"status": "ok"}))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.sched),
    )
        .into_response()
}

fn model_card(state: &AppState) -> serde_json::Value {
    json!({
        "id": state.opts.model_id,
        "object": "model",
        "created": now(),
        "owned_by": "pie",
    })
}

pub async fn models(State(state): State<AppState>) -> Response {
    json_response(&json!({"object": "list", "data": [model_card(&state)]}))
}

pub async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match id == state.opts.model_id {
        true => json_response(&model_card(&state)),
        false => ApiError::not_found(
            "model_not_found",
            format!(
                "model `{id}` does not exist: this server serves `{}`",
                state.opts.model_id
            ),
        )
        .into_response(),
    }
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 << 20;

pub async fn chat_completions(State(state): State<AppState>, body: Body) -> Response {
    match read_body(body).await {
        // Parsing, templating and tokenizing a long prompt take a while:
        // off the async threads.
        Ok(b) => respond(tokio::task::spawn_blocking(move || chat(&state, &b)).await).await,
        Err(e) => e.into_response(),
    }
}

pub async fn completions(State(state): State<AppState>, body: Body) -> Response {
    match read_body(body).await {
        Ok(b) => respond(tokio::task::spawn_blocking(move || completion(&state, &b)).await).await,
        Err(e) => e.into_response(),
    }
}

async fn respond<F: std::future::Future<Output = Response>>(
    started: Result<Result<F, ApiError>, tokio::task::JoinError>,
) -> Response {
    match started {
        Ok(Ok(resp)) => resp.await,
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::server(format!("request task failed: {e}")).into_response(),
    }
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "cannot read the request body (at most {} MiB): {e}",
                MAX_BODY_BYTES >> 20
            ),
            kind: "invalid_request_error",
            code: "body_too_large",
        })
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_json",
            "empty request body: send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))
}

/// Checks a chat request and starts generating; the returned future
/// produces the response.
fn chat(
    state: &AppState,
    body: &[u8],
) -> Result<impl std::future::Future<Output = Response>, ApiError> {
    let req: ChatRequest = parse(body)?;
    check_model(state, &req.fields)?;
    let messages = req.chat_messages()?;
    let model = state.sched.model();
    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "no_chat_template",
            "the model has no chat template: use /v1/completions",
        )
    })?;
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad_request("template_error", format!("chat template: {e}")))?;
    let ids = tokenizer(state)?
        .encode(&text, false)
        .map_err(|e| ApiError::server(e.to_string()))?;
    start(state, Endpoint::Chat, ids, &req.fields)
}

fn completion(
    state: &AppState,
    body: &[u8],
) -> Result<impl std::future::Future<Output = Response>, ApiError> {
    let req: CompletionRequest = parse(body)?;
    check_model(state, &req.fields)?;
    let prompts = req.prompt.into_vec();
    let [prompt] = prompts.as_slice() else {
        return Err(ApiError::bad_request(
            "unsupported_value",
            format!(
                "prompt: give one string (got a list of {}); send one request per prompt",
                prompts.len()
            ),
        ));
    };
    let ids = tokenizer(state)?
        .encode(prompt, true)
        .map_err(|e| ApiError::server(e.to_string()))?;
    start(state, Endpoint::Completion, ids, &req.fields)
}

fn tokenizer(state: &AppState) -> Result<&crate::tokenizer::Tokenizer, ApiError> {
    state
        .sched
        .model()
        .tokenizer
        .as_ref()
        .ok_or_else(|| ApiError::server("the model has no tokenizer"))
}

fn check_model(state: &AppState, f: &SamplingFields) -> Result<(), ApiError> {
    if f.model != state.opts.model_id {
        return Err(ApiError::not_found(
            "model_not_found",
            format!(
                "model `{}` does not exist: this server serves `{}` (see /v1/models)",
                f.model, state.opts.model_id
            ),
        ));
    }
    Ok(())
}

fn start(
    state: &AppState,
    endpoint: Endpoint,
    prompt: Vec<u32>,
    f: &SamplingFields,
) -> Result<impl std::future::Future<Output = Response>, ApiError> {
    let n = f.n()?;
    let max_tokens = f.max_tokens()?;
    let stops = f.stops()?;
    let sampler = f.sampler(fresh_seed())?;
    let limit = state.opts.max_prompt_tokens;
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_value",
            "the prompt is empty after tokenization",
        ));
    }
    if prompt.len() > limit {
        return Err(ApiError::bad_request(
            "prompt_too_long",
            format!(
                "the prompt has {} tokens, more than the limit of {limit} (max_prompt_tokens)",
                prompt.len()
            ),
        ));
    }
    let capacity = {
        let kv = state.sched.kv();
        kv.total_pages() * kv.page_size()
    };
    // Choices share the prompt's pages; each writes its own tokens.
    if prompt.len() + n * max_tokens > capacity {
        return Err(ApiError::bad_request(
            "context_too_long",
            format!(
                "the prompt ({} tokens) plus n ({n}) x max_tokens ({max_tokens}) exceeds the KV cache ({capacity} tokens)",
                prompt.len()
            ),
        ));
    }
    let prompt_len = prompt.len();
    let meta = ResponseMeta {
        endpoint,
        id: format!(
            "{}-{}",
            match endpoint {
                Endpoint::Chat => "chatcmpl",
                Endpoint::Completion => "cmpl",
            },
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ),
        created: now(),
        model: state.opts.model_id.clone(),
    };
    let events = generate::spawn(
        state.sched.clone(),
        GenerateParams {
            prompt,
            max_tokens,
            sampler,
            stops,
            n,
        },
        state.metrics.clone(),
    );
    let usage = Usage {
        prompt_tokens: prompt_len,
        completion_tokens: 0,
    };
    let include_usage = f.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let stream = f.stream.unwrap_or(false);
    Ok(async move {
        match stream {
            true => sse(meta, events, n, usage, include_usage),
            false => whole(meta, events, n, usage).await,
        }
    })
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A seed for a sampling request that gave none.
fn fresh_seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ NEXT_ID
        .load(Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Waits for the whole generation.
async fn whole(
    meta: ResponseMeta,
    mut events: mpsc::UnboundedReceiver<GenEvent>,
    n: usize,
    mut usage: Usage,
) -> Response {
    let mut choices = vec![(String::new(), None); n];
    let mut left = n;
    while let Some(e) = events.recv().await {
        match e {
            GenEvent::Text { choice, text } => choices[choice].0 += &text,
            GenEvent::Done {
                choice,
                finish,
                completion_tokens,
            } => {
                choices[choice].1 = Some(finish);
                usage.completion_tokens += completion_tokens;
                left -= 1;
                if left == 0 {
                    let choices: Vec<(String, FinishReason)> = choices
                        .into_iter()
                        .map(|(t, f)| (t, f.unwrap_or(FinishReason::Stop)))
                        .collect();
                    return json_response(&meta.full(&choices, usage));
                }
            }
            GenEvent::Failed(msg) => {
                return ApiError::server(format!("generation failed: {msg}")).into_response()
            }
        }
    }
    ApiError::server("generation ended without a result").into_response()
}

fn event(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Streams the generation as server-sent events, ending with `[DONE]`
/// once every choice is done.
fn sse(
    meta: ResponseMeta,
    events: mpsc::UnboundedReceiver<GenEvent>,
    n: usize,
    usage: Usage,
    include_usage: bool,
) -> Response {
    struct S {
        meta: ResponseMeta,
        events: mpsc::UnboundedReceiver<GenEvent>,
        /// Choices that have sent their first chunk.
        started: Vec<bool>,
        left: usize,
        usage: Usage,
        include_usage: bool,
        ended: bool,
    }
    let state = S {
        meta,
        events,
        started: vec![false; n],
        left: n,
        usage,
        include_usage,
        ended: false,
    };
    let body = stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        let mut out = Vec::new();
        let fail = |out: &mut Vec<u8>, msg: String| {
            let err = ApiError::server(format!("generation failed: {msg}"));
            out.extend_from_slice(&event(&err.body()));
            out.extend_from_slice(b"data: [DONE]\n\n");
        };
        match s.events.recv().await {
            Some(GenEvent::Text { choice, text }) => {
                let first = !std::mem::replace(&mut s.started[choice], true);
                if first && s.meta.endpoint == Endpoint::Chat {
                    // The role comes first, as OpenAI sends it.
                    out.extend_from_slice(&event(&s.meta.chunk(choice, "", true, None)));
                }
                out.extend_from_slice(&event(&s.meta.chunk(choice, &text, false, None)));
            }
            Some(GenEvent::Done {
                choice,
                finish,
                completion_tokens,
            }) => {
                if !std::mem::replace(&mut s.started[choice], true)
                    && s.meta.endpoint == Endpoint::Chat
                {
                    out.extend_from_slice(&event(&s.meta.chunk(choice, "", true, None)));
                }
                out.extend_from_slice(&event(&s.meta.chunk(choice, "", false, Some(finish))));
                s.usage.completion_tokens += completion_tokens;
                s.left -= 1;
                if s.left == 0 {
                    if s.include_usage {
                        out.extend_from_slice(&event(&s.meta.usage_chunk(s.usage)));
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    s.ended = true;
                }
            }
            Some(GenEvent::Failed(msg)) => {
                fail(&mut out, msg);
                s.ended = true;
            }
            None => {
                fail(&mut out, "generation ended without a result".into());
                s.ended = true;
            }
        }
        Some((Ok::<Bytes, std::convert::Infallible>(Bytes::from(out)), s))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body.boxed()))
        .unwrap_or_else(|e| ApiError::server(e.to_string()).into_response())
}
