//! Raw forward passes: submitted at once, awaited as futures.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::bindings::pie::inferlet::forward::{
    self, Output, OutputKind as WitKind, OutputRequest, Pass as WitPass, Pending,
};
use crate::bindings::pie::inferlet::kv;
use crate::Sampler;

/// What to return for one input token of a pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OutputKind {
    /// A token drawn with the sampler (and its log-probability).
    Sample(Sampler),
    /// The `k` most likely next tokens with their probabilities.
    Distribution(u32),
    /// The raw logits.
    Logits,
}

impl OutputKind {
    fn wit(&self) -> WitKind {
        match self {
            OutputKind::Sample(s) => WitKind::Sample(s.wit()),
            OutputKind::Distribution(k) => WitKind::Distribution(*k),
            OutputKind::Logits => WitKind::Logits,
        }
    }
}

/// A raw forward pass for [`crate::Context::pass`]: tokens appended to the
/// context, optionally with their own rotary positions and attention mask.
#[derive(Debug, Clone, Default)]
pub struct Pass {
    pub tokens: Vec<u32>,
    /// One per token; None = right after the context's last token.
    pub positions: Option<Vec<u32>>,
    /// One row per token over every key position the pass can see: the
    /// context's run tokens, then this pass's tokens (true = attends); None
    /// = causal. See [`tree_mask`].
    pub mask: Option<Vec<Vec<bool>>>,
    /// `(index into tokens, what to return)`.
    pub outputs: Vec<(usize, OutputKind)>,
}

/// The mask of a pass whose tokens form a tree under a context of
/// `ctx_len` run tokens: token `i` sees the whole context, its ancestors in
/// the pass (`parents[i]` is its parent's index, None for a root) and
/// itself, but not its siblings or their descendants (tree drafts of
/// speculative decoding).
pub fn tree_mask(ctx_len: usize, parents: &[Option<usize>]) -> Vec<Vec<bool>> {
    let n = parents.len();
    (0..n)
        .map(|i| {
            let mut row = vec![false; ctx_len + n];
            row[..ctx_len].fill(true);
            let mut at = Some(i);
            // A parent index at or after its child would loop: stop there.
            while let Some(t) = at.filter(|&t| t < n && !row[ctx_len + t]) {
                row[ctx_len + t] = true;
                at = parents[t].filter(|&p| p < t);
            }
            row
        })
        .collect()
}

/// A submitted pass; resolves to its outputs in request order.
pub(crate) enum PassFuture {
    Submitted(Pending),
    Failed(Option<String>),
}

impl PassFuture {
    pub(crate) fn submit(
        ctx: &kv::Context,
        tokens: Vec<u32>,
        outputs: &[(usize, OutputKind)],
    ) -> Self {
        Self::submit_pass(
            ctx,
            Pass {
                tokens,
                outputs: outputs.to_vec(),
                ..Pass::default()
            },
        )
    }

    pub(crate) fn submit_pass(ctx: &kv::Context, pass: Pass) -> Self {
        let pass = WitPass {
            tokens: pass.tokens,
            positions: pass.positions,
            mask: pass.mask,
            outputs: pass
                .outputs
                .iter()
                .map(|(i, k)| OutputRequest {
                    index: *i as u32,
                    kind: k.wit(),
                })
                .collect(),
        };
        match forward::submit(ctx, &pass) {
            Ok(p) => PassFuture::Submitted(p),
            Err(e) => PassFuture::Failed(Some(e)),
        }
    }
}

impl Future for PassFuture {
    type Output = Result<Vec<Output>, String>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            PassFuture::Submitted(p) => match p.poll() {
                Some(r) => Poll::Ready(r),
                None => Poll::Pending,
            },
            PassFuture::Failed(e) => Poll::Ready(Err(e.take().unwrap_or_default())),
        }
    }
}
