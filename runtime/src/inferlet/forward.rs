//! The `forward` interface: passes submitted to the scheduler without
//! waiting, polled later; `wait-any` parks the inferlet until one finishes.

use std::sync::{Arc, Mutex};

use wasmtime::component::Resource;

use super::bindings::forward::{
    Host, HostPending, Output, OutputKind as WitKind, Pass, Sampled, Sampler as WitSampler,
};
use super::kv::ContextRes;
use super::state::{InstanceState, Slot};
use crate::sampling::Sampler;
use crate::scheduler::{OutputKind, PassOutput, PassRequest, PassResult};

/// A submitted pass, as the guest holds it.
pub struct PendingPass {
    slot: Slot,
    /// Polled while not yet sent (see `poll`).
    polled_unsent: bool,
}

fn sampler(s: WitSampler) -> Sampler {
    Sampler {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        seed: s.seed,
    }
}

fn request(ctx: u64, pass: Pass) -> PassRequest {
    PassRequest {
        ctx,
        tokens: pass.tokens,
        positions: pass.positions,
        mask: pass.mask,
        outputs: pass
            .outputs
            .into_iter()
            .map(|o| {
                let kind = match o.kind {
                    WitKind::Sample(s) => OutputKind::Sample(sampler(s)),
                    WitKind::Distribution(k) => OutputKind::Distribution(k),
                    WitKind::Logits => OutputKind::Logits,
                };
                (o.index, kind)
            })
            .collect(),
    }
}

fn output(o: PassOutput) -> Output {
    match o {
        PassOutput::Token { token, logprob } => Output::Token(Sampled { token, logprob }),
        PassOutput::Distribution(d) => Output::Distribution(d),
        PassOutput::Logits(l) => Output::Logits(l),
    }
}

impl Host for InstanceState {
    async fn submit(
        &mut self,
        ctx: Resource<ContextRes>,
        pass: Pass,
    ) -> wasmtime::Result<Result<Resource<PendingPass>, String>> {
        let id = self.context_id(&ctx)?;
        let slot: Slot = Arc::new(Mutex::new(None));
        let (filled, notify, wakes) = (slot.clone(), self.pass_done.clone(), self.wakes.clone());
        let reply = Box::new(move |r: PassResult| {
            *filled.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            wakes.defer(notify);
        });
        match self.sched.prepare(request(id, pass), reply) {
            Ok(pass) => self.unsent.push(pass),
            Err(e) => return Ok(Err(e)),
        }
        self.passes.push(slot.clone());
        Ok(Ok(self.table.push(PendingPass {
            slot,
            polled_unsent: false,
        })?))
    }

    async fn wait_any(&mut self) -> wasmtime::Result<bool> {
        self.flush();
        loop {
            if self.passes.is_empty() {
                return Ok(false);
            }
            let any_done = self
                .passes
                .iter()
                .any(|s| s.lock().unwrap_or_else(|p| p.into_inner()).is_some());
            if any_done {
                return Ok(true);
            }
            // A notification sent since the check is kept as a permit, so
            // none is lost.
            self.pass_done.notified().await;
        }
    }
}

impl HostPending for InstanceState {
    async fn poll(
        &mut self,
        pending: Resource<PendingPass>,
    ) -> wasmtime::Result<Option<Result<Vec<Output>, String>>> {
        // Passes are sent when the inferlet waits, so that its branches
        // share a batch; a guest polling the same unsent pass twice is
        // busy-polling instead of waiting, so that sends them too.
        let p = self.table.get_mut(&pending)?;
        if !self.unsent.is_empty() {
            if p.polled_unsent {
                self.flush();
            } else {
                p.polled_unsent = true;
            }
        }
        let slot = self.table.get(&pending)?.slot.clone();
        let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(result) = taken else {
            return Ok(None);
        };
        self.passes.retain(|s| !Arc::ptr_eq(s, &slot));
        Ok(Some(
            result.map(|outs| outs.into_iter().map(output).collect()),
        ))
    }

    async fn drop(&mut self, pending: Resource<PendingPass>) -> wasmtime::Result<()> {
        let gone = self.table.delete(pending)?;
        self.passes.retain(|s| !Arc::ptr_eq(s, &gone.slot));
        Ok(())
    }
}
