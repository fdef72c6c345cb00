//! Raw forward passes: submitted at once, awaited as futures.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::bindings::pie::inferlet::forward::{
    self, Output, OutputKind as WitKind, OutputRequest, Pass, Pending,
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
        let pass = Pass {
            tokens,
            positions: None,
            mask: None,
            outputs: outputs
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
