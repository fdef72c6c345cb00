//! Text generation for the OpenAI endpoints, as a task on the scheduler:
//! a context is created, the prompt runs as one pass (the scheduler chunks
//! it), then each sampled token runs as a one-token pass that samples the
//! next. Passes of every request share the scheduler's batches. The
//! context is released when generation ends, fails, or the client goes
//! away (its receiver is dropped).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::detokenize::{Detokenizer, StopMatcher};
use super::metrics::Metrics;
use super::openai::{FinishReason, Usage};
use crate::sampling::Sampler;
use crate::scheduler::{ContextId, OutputKind, PassOutput, PassRequest, Scheduler};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: Sampler,
    /// Stop sequences: the text ends before the first one.
    pub stops: Vec<String>,
}

/// What a generation reports, in order: text pieces, then one `Done` or
/// `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Text(String),
    Done { finish: FinishReason, usage: Usage },
    Failed(String),
}

/// Starts generating on the current tokio runtime; events arrive on the
/// returned receiver. Dropping the receiver stops the generation at its
/// next token and frees its KV pages.
pub fn spawn(
    sched: Scheduler,
    params: GenerateParams,
    metrics: Arc<Metrics>,
) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        metrics.active_generations.fetch_add(1, Ordering::Relaxed);
        let ctx = ContextGuard::new(&sched);
        let prompt_tokens = params.prompt.len();
        if let Err(e) = run(&sched, ctx.id, params, &tx, &metrics).await {
            let _ = tx.send(GenEvent::Failed(e));
        }
        metrics
            .prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        metrics.active_generations.fetch_sub(1, Ordering::Relaxed);
        drop(ctx);
    });
    rx
}

/// Releases its context when dropped (after the pass in flight, if any).
struct ContextGuard<'a> {
    sched: &'a Scheduler,
    id: ContextId,
}

impl<'a> ContextGuard<'a> {
    fn new(sched: &'a Scheduler) -> Self {
        let id = sched.kv().create();
        ContextGuard { sched, id }
    }
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        self.sched.kv().release(self.id);
    }
}

async fn run(
    sched: &Scheduler,
    ctx: ContextId,
    params: GenerateParams,
    tx: &mpsc::UnboundedSender<GenEvent>,
    metrics: &Metrics,
) -> Result<(), String> {
    let model = sched.model();
    let tok = model
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let mut detok = Detokenizer::new();
    let mut stops = StopMatcher::new(params.stops);
    let mut usage = Usage {
        prompt_tokens: params.prompt.len(),
        completion_tokens: 0,
    };
    let mut input = params.prompt;
    let finish = loop {
        let token = next_token(sched, ctx, std::mem::take(&mut input), &params.sampler).await?;
        usage.completion_tokens += 1;
        metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if model.stop_ids.contains(&token) {
            break FinishReason::Stop;
        }
        let (text, stopped) = stops.push(&detok.push(tok, token)?);
        if !text.is_empty() && tx.send(GenEvent::Text(text)).is_err() {
            return Ok(()); // the client is gone
        }
        if stopped {
            let _ = tx.send(GenEvent::Done {
                finish: FinishReason::Stop,
                usage,
            });
            return Ok(());
        }
        if usage.completion_tokens >= params.max_tokens {
            break FinishReason::Length;
        }
        if tx.is_closed() {
            return Ok(());
        }
        input = vec![token];
    };
    let (mut rest, stopped) = stops.push(&detok.flush(tok)?);
    if !stopped {
        rest += &stops.finish();
    }
    if !rest.is_empty() {
        let _ = tx.send(GenEvent::Text(rest));
    }
    let finish = if stopped { FinishReason::Stop } else { finish };
    let _ = tx.send(GenEvent::Done { finish, usage });
    Ok(())
}

/// Runs `tokens` through the context and samples the token after them.
async fn next_token(
    sched: &Scheduler,
    ctx: ContextId,
    tokens: Vec<u32>,
    sampler: &Sampler,
) -> Result<u32, String> {
    let last = tokens.len() as u32 - 1;
    let req = PassRequest {
        ctx,
        tokens,
        outputs: vec![(last, OutputKind::Sample(sampler.clone()))],
        ..PassRequest::default()
    };
    let (done, result) = oneshot::channel();
    sched.submit(
        req,
        Box::new(move |r| {
            let _ = done.send(r);
        }),
    )?;
    let outputs = result
        .await
        .map_err(|_| "the scheduler stopped".to_string())??;
    match outputs.first() {
        Some(PassOutput::Token { token, .. }) => Ok(*token),
        other => Err(format!("the pass returned {other:?} instead of a token")),
    }
}
