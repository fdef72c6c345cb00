//! A tiny executor. Every future an inferlet awaits ends in a forward pass
//! (or a blocking host call), so when nothing can make progress the
//! executor parks in `wait-any` until one of the inferlet's passes ends,
//! then polls again.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use crate::bindings::pie::inferlet::forward;

/// Runs a future to completion.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        // Nothing queued and yet pending: the future waits on nothing that
        // can ever finish.
        assert!(
            forward::wait_any(),
            "a future is pending but no forward pass is queued"
        );
    }
}

/// Awaits every future together, so their passes share batches; outputs
/// in input order.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    JoinAll {
        futures: futures.into_iter().map(|f| Some(Box::pin(f))).collect(),
        outputs: Vec::new(),
    }
    .await
}

struct JoinAll<F: Future> {
    futures: Vec<Option<Pin<Box<F>>>>,
    outputs: Vec<Option<F::Output>>,
}

// Nothing is pinned in place: the futures are boxed, outputs plain values.
impl<F: Future> Unpin for JoinAll<F> {}

impl<F: Future> Future for JoinAll<F> {
    type Output = Vec<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.outputs.is_empty() {
            this.outputs = this.futures.iter().map(|_| None).collect();
        }
        for (slot, out) in this.futures.iter_mut().zip(this.outputs.iter_mut()) {
            if let Some(f) = slot {
                if let Poll::Ready(v) = f.as_mut().poll(cx) {
                    *out = Some(v);
                    *slot = None;
                }
            }
        }
        if this.futures.iter().all(|f| f.is_none()) {
            let outs = std::mem::take(&mut this.outputs);
            return Poll::Ready(outs.into_iter().map(|o| o.expect("ready")).collect());
        }
        Poll::Pending
    }
}
