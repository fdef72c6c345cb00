//! A conversation and its KV cache.
//!
//! A context holds tokens in two places: those already run (their keys and
//! values are in the runtime's KV pages) and pending ones, run by the next
//! pass. At least one token stays pending before generation, since a pass
//! needs an input token to produce the next token's logits.

use crate::bindings::pie::inferlet::{forward::Output, kv};
use crate::forward::{OutputKind, Pass, PassFuture};
use crate::generate::Generate;
use crate::{Model, Sampler};

pub struct Context {
    pub(crate) model: Model,
    pub(crate) kv: kv::Context,
    /// Chat turns as `(role, content)`; rendered with the chat template
    /// when generation starts.
    messages: Vec<(String, String)>,
    pub(crate) pending: Vec<u32>,
}

impl Context {
    pub fn new(model: &Model) -> Self {
        Context {
            model: model.clone(),
            kv: kv::Context::new(),
            messages: Vec::new(),
            pending: Vec::new(),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn system(&mut self, text: &str) -> &mut Self {
        self.message("system", text)
    }
    pub fn user(&mut self, text: &str) -> &mut Self {
        self.message("user", text)
    }
    pub fn assistant(&mut self, text: &str) -> &mut Self {
        self.message("assistant", text)
    }

    fn message(&mut self, role: &str, text: &str) -> &mut Self {
        self.messages.push((role.to_string(), text.to_string()));
        self
    }

    /// Appends raw tokens (run by the next pass).
    pub fn fill(&mut self, tokens: &[u32]) -> &mut Self {
        self.pending.extend_from_slice(tokens);
        self
    }

    /// Appends text, tokenized without special tokens.
    pub fn fill_text(&mut self, text: &str) -> Result<&mut Self, String> {
        let ids = self.model.tokenize(text)?;
        Ok(self.fill(&ids))
    }

    /// Every token of the context: run ones, then pending ones.
    pub fn tokens(&self) -> Vec<u32> {
        let mut all = self.kv.tokens();
        all.extend_from_slice(&self.pending);
        all
    }

    /// Tokens not yet run; they come first in the next pass.
    pub fn pending(&self) -> &[u32] {
        &self.pending
    }

    /// Turns the chat turns into tokens: the template renders the whole
    /// conversation (ending with the assistant header) and only what
    /// differs from the tokens already held is kept pending; a run suffix
    /// that differs is trimmed away.
    pub fn sync_chat(&mut self) -> Result<(), String> {
        if self.messages.is_empty() {
            return Ok(());
        }
        let text = self.model.render_chat(&self.messages, true)?;
        let want = self.model.tokenize(&text)?;
        let run = self.kv.tokens();
        let common = run.iter().zip(&want).take_while(|(a, b)| a == b).count();
        if common < run.len() {
            self.kv.trim(common as u32)?;
        }
        self.pending = want[common..].to_vec();
        Ok(())
    }

    /// Records the assistant's reply as a chat turn (after generation).
    pub(crate) fn record_reply(&mut self, text: &str) {
        if !self.messages.is_empty() {
            self.assistant(text);
        }
    }

    /// Runs all pending tokens but the last, so forks share them.
    pub async fn flush(&mut self) -> Result<(), String> {
        self.sync_chat()?;
        if self.pending.len() > 1 {
            let last = self.pending.len() - 1;
            let run: Vec<u32> = self.pending.drain(..last).collect();
            PassFuture::submit(&self.kv, run, &[]).await?;
        }
        Ok(())
    }

    /// A branch sharing this context's KV pages (no copy). Pending tokens
    /// are copied, and each branch runs its own: [`Context::flush`] first
    /// so that a shared prompt runs once.
    pub fn fork(&self) -> Result<Context, String> {
        Ok(Context {
            model: self.model.clone(),
            kv: self.kv.fork()?,
            messages: self.messages.clone(),
            pending: self.pending.clone(),
        })
    }

    /// Keeps the first `len` tokens.
    pub fn trim(&mut self, len: usize) -> Result<(), String> {
        let run = self.kv.len() as usize;
        if len >= run {
            self.pending.truncate(len - run);
            return Ok(());
        }
        self.pending.clear();
        self.kv.trim(len as u32)
    }

    /// One pass over the pending tokens followed by `tokens`; `outputs`
    /// index that whole input (pending tokens first).
    pub async fn forward(
        &mut self,
        tokens: &[u32],
        outputs: &[(usize, OutputKind)],
    ) -> Result<Vec<Output>, String> {
        let mut input = std::mem::take(&mut self.pending);
        input.extend_from_slice(tokens);
        if input.is_empty() {
            return Err("forward: no input tokens".into());
        }
        PassFuture::submit(&self.kv, input, outputs).await
    }

    /// Tokens already run (in the KV cache): the key positions a mask's
    /// rows start with.
    pub fn run_len(&self) -> usize {
        self.kv.len() as usize
    }

    /// One raw pass (own positions, custom attention mask) on the run
    /// tokens: a mask's rows cover [`Context::run_len`] key positions
    /// before the pass's tokens. Pending tokens must be run first
    /// ([`Context::forward`]), since they would shift those positions.
    pub async fn pass(&mut self, pass: Pass) -> Result<Vec<Output>, String> {
        if !self.pending.is_empty() {
            return Err(format!(
                "Context::pass: {} tokens are pending; run them first (Context::forward)",
                self.pending.len()
            ));
        }
        PassFuture::submit_pass(&self.kv, pass).await
    }

    /// Starts generation from the conversation or tokens so far.
    pub fn generate(&mut self, sampler: Sampler) -> Generate<'_> {
        Generate::new(self, sampler)
    }

    /// Makes sure a token is pending: generation needs an input token.
    pub(crate) fn ensure_pending(&mut self) -> Result<(), String> {
        if !self.pending.is_empty() {
            return Ok(());
        }
        let run = self.kv.tokens();
        let Some(&last) = run.last() else {
            return Err("cannot generate from an empty context: add a message or tokens".into());
        };
        self.kv.trim(run.len() as u32 - 1)?;
        self.pending.push(last);
        Ok(())
    }
}
