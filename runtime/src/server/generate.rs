//! Text generation for the OpenAI endpoints, as a task on the scheduler:
//! a context is created, the prompt runs as one pass (the scheduler chunks
//! it) that samples the first token of every choice, then each choice
//! (the context itself, or a fork of it sharing the prompt's pages) runs
//! one-token passes that sample the next. Passes of every request share
//! the scheduler's batches. Contexts are released when generation ends,
//! fails, or the client goes away (its receiver is dropped).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::detokenize::{Detokenizer, StopMatcher};
use super::metrics::Metrics;
use super::openai::FinishReason;
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
    /// Choices (at least 1); choice `i` samples with seed `seed + i`.
    pub n: usize,
}

/// What a generation reports: text pieces of each choice, then one `Done`
/// per choice; or `Failed`, after which nothing follows.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Text {
        choice: usize,
        text: String,
    },
    Done {
        choice: usize,
        finish: FinishReason,
        completion_tokens: usize,
    },
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
        let prompt_tokens = params.prompt.len();
        if let Err(e) = run(&sched, params, &tx, &metrics).await {
            let _ = tx.send(GenEvent::Failed(e));
        }
        metrics
            .prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        metrics.active_generations.fetch_sub(1, Ordering::Relaxed);
    });
    rx
}

/// Releases its context when dropped (after the pass in flight, if any).
struct ContextGuard<'a> {
    sched: &'a Scheduler,
    id: ContextId,
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        self.sched.kv().release(self.id);
    }
}

async fn run(
    sched: &Scheduler,
    params: GenerateParams,
    tx: &mpsc::UnboundedSender<GenEvent>,
    metrics: &Metrics,
) -> Result<(), String> {
    let n = params.n.max(1);
    let samplers: Vec<Sampler> = (0..n)
        .map(|i| Sampler {
            seed: params.sampler.seed.wrapping_add(i as u64),
            ..params.sampler.clone()
        })
        .collect();
    let root = ContextGuard {
        sched,
        id: sched.kv().create(),
    };
    // The prompt once, sampling every choice's first token.
    let first = pass(sched, root.id, params.prompt, &samplers).await?;
    let mut contexts = vec![root];
    for _ in 1..n {
        let id = sched.kv().fork(contexts[0].id).map_err(|e| e.to_string())?;
        contexts.push(ContextGuard { sched, id });
    }
    let branches = contexts.iter().zip(first).zip(samplers).enumerate().map(
        |(choice, ((ctx, token), sampler))| {
            let stops = StopMatcher::new(params.stops.clone());
            branch(
                sched,
                ctx.id,
                choice,
                token,
                sampler,
                stops,
                params.max_tokens,
                tx,
                metrics,
            )
        },
    );
    for r in join_all(branches).await {
        r?;
    }
    Ok(())
}

/// One choice from its first token to its end.
#[allow(clippy::too_many_arguments)]
async fn branch(
    sched: &Scheduler,
    ctx: ContextId,
    choice: usize,
    mut token: u32,
    sampler: Sampler,
    mut stops: StopMatcher,
    max_tokens: usize,
    tx: &mpsc::UnboundedSender<GenEvent>,
    metrics: &Metrics,
) -> Result<(), String> {
    let model = sched.model();
    let tok = model
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let mut detok = Detokenizer::new();
    let mut generated = 0;
    let send = |text: String| text.is_empty() || tx.send(GenEvent::Text { choice, text }).is_ok();
    let finish = loop {
        generated += 1;
        metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if model.stop_ids.contains(&token) {
            break FinishReason::Stop;
        }
        let (text, stopped) = stops.push(&detok.push(tok, token)?);
        if !send(text) {
            return Ok(()); // the client is gone
        }
        if stopped {
            let _ = tx.send(GenEvent::Done {
                choice,
                finish: FinishReason::Stop,
                completion_tokens: generated,
            });
            return Ok(());
        }
        if generated >= max_tokens {
            break FinishReason::Length;
        }
        if tx.is_closed() {
            return Ok(());
        }
        token = pass(sched, ctx, vec![token], std::slice::from_ref(&sampler)).await?[0];
    };
    let (mut rest, stopped) = stops.push(&detok.flush(tok)?);
    if !stopped {
        rest += &stops.finish();
    }
    send(rest);
    let _ = tx.send(GenEvent::Done {
        choice,
        finish: if stopped { FinishReason::Stop } else { finish },
        completion_tokens: generated,
    });
    Ok(())
}

/// Runs `tokens` through the context and samples the token after them,
/// once per sampler.
async fn pass(
    sched: &Scheduler,
    ctx: ContextId,
    tokens: Vec<u32>,
    samplers: &[Sampler],
) -> Result<Vec<u32>, String> {
    let last = tokens.len() as u32 - 1;
    let req = PassRequest {
        ctx,
        tokens,
        outputs: samplers
            .iter()
            .map(|s| (last, OutputKind::Sample(s.clone())))
            .collect(),
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
    outputs
        .into_iter()
        .map(|o| match o {
            PassOutput::Token { token, .. } => Ok(token),
            other => Err(format!("the pass returned {other:?} instead of a token")),
        })
        .collect()
}
