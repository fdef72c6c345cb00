//! Token-by-token generation on a context.

use crate::bindings::pie::inferlet::forward::Output;
use crate::forward::{OutputKind, PassFuture};
use crate::{Context, Sampler};

/// A generation being set up: `ctx.generate(s).max_tokens(n).stop(..)`,
/// then one of the `collect` methods.
pub struct Generate<'a> {
    ctx: &'a mut Context,
    sampler: Sampler,
    max_tokens: usize,
    stop_strings: Vec<String>,
    stop_tokens: Vec<u32>,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Generated tokens, without the stop token that ended them.
    pub tokens: Vec<u32>,
    pub text: String,
    /// Sum of the tokens' log-probabilities.
    pub logprob: f32,
}

impl<'a> Generate<'a> {
    pub(crate) fn new(ctx: &'a mut Context, sampler: Sampler) -> Self {
        let stop_tokens = ctx.model.stop_tokens().to_vec();
        Generate {
            ctx,
            sampler,
            max_tokens: 256,
            stop_strings: Vec::new(),
            stop_tokens,
        }
    }

    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }

    /// Stops once the text contains one of these (cut before it).
    pub fn stop<S: AsRef<str>>(mut self, strings: &[S]) -> Self {
        self.stop_strings = strings.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// Replaces the model's stop tokens.
    pub fn stop_tokens(mut self, tokens: &[u32]) -> Self {
        self.stop_tokens = tokens.to_vec();
        self
    }

    pub async fn collect_text(self) -> Result<String, String> {
        Ok(self.collect().await?.text)
    }

    pub async fn collect_tokens(self) -> Result<Vec<u32>, String> {
        Ok(self.collect().await?.tokens)
    }

    /// Runs the generation. The last sampled token stays pending in the
    /// context (it has not been run yet).
    pub async fn collect(self) -> Result<Generated, String> {
        let Generate {
            ctx,
            sampler,
            max_tokens,
            stop_strings,
            stop_tokens,
        } = self;
        ctx.sync_chat()?;
        ctx.ensure_pending()?;
        let mut out = Generated {
            tokens: Vec::new(),
            text: String::new(),
            logprob: 0.0,
        };
        let mut cut = None;
        while out.tokens.len() < max_tokens {
            let input = std::mem::take(&mut ctx.pending);
            let last = input.len() - 1;
            let outs =
                PassFuture::submit(&ctx.kv, input, &[(last, OutputKind::Sample(sampler))]).await?;
            let Some(Output::Token(t)) = outs.into_iter().next() else {
                return Err("the runtime returned no token for a sample request".into());
            };
            ctx.pending.push(t.token);
            if stop_tokens.contains(&t.token) {
                break;
            }
            out.tokens.push(t.token);
            out.logprob += t.logprob;
            if !stop_strings.is_empty() {
                cut = cut_at_stop(ctx, &out.tokens, &stop_strings)?;
                if cut.is_some() {
                    break;
                }
            }
        }
        out.text = match cut {
            Some(text) => text,
            None => ctx.model.detokenize(&out.tokens)?,
        };
        ctx.record_reply(&out.text);
        Ok(out)
    }
}

/// The text before the first stop string, once the text so far has one.
fn cut_at_stop(ctx: &Context, tokens: &[u32], stops: &[String]) -> Result<Option<String>, String> {
    let text = ctx.model.detokenize(tokens)?;
    let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
    Ok(first.map(|at| text[..at].to_string()))
}
