//! The `kv` interface: contexts as resources owning KV pages.

use wasmtime::component::Resource;

use super::bindings::kv::{Host, HostContext};
use super::state::InstanceState;
use crate::scheduler::{ContextId, Scheduler};

/// A context held by an inferlet. Dropping it (the guest dropping the
/// resource, or the whole store going away after a trap) frees its pages.
pub struct ContextRes {
    pub id: ContextId,
    sched: Scheduler,
}

impl ContextRes {
    pub fn new(sched: &Scheduler, id: ContextId) -> Self {
        ContextRes {
            id,
            sched: sched.clone(),
        }
    }
}

impl Drop for ContextRes {
    fn drop(&mut self) {
        self.sched.kv().release(self.id);
    }
}

impl InstanceState {
    pub fn context_id(&self, ctx: &Resource<ContextRes>) -> wasmtime::Result<ContextId> {
        Ok(self.table.get(ctx)?.id)
    }
}

impl HostContext for InstanceState {
    async fn new(&mut self) -> wasmtime::Result<Resource<ContextRes>> {
        let id = self.sched.kv().create();
        Ok(self.table.push(ContextRes::new(&self.sched, id))?)
    }

    async fn fork(
        &mut self,
        ctx: Resource<ContextRes>,
    ) -> wasmtime::Result<Result<Resource<ContextRes>, String>> {
        let id = self.context_id(&ctx)?;
        let child = match self.sched.kv().fork(id) {
            Ok(child) => child,
            Err(e) => return Ok(Err(e.to_string())),
        };
        Ok(Ok(self.table.push(ContextRes::new(&self.sched, child))?))
    }

    async fn len(&mut self, ctx: Resource<ContextRes>) -> wasmtime::Result<u32> {
        let id = self.context_id(&ctx)?;
        Ok(self.sched.kv().tokens(id).map_or(0, |t| t.len() as u32))
    }

    async fn tokens(&mut self, ctx: Resource<ContextRes>) -> wasmtime::Result<Vec<u32>> {
        let id = self.context_id(&ctx)?;
        Ok(self
            .sched
            .kv()
            .tokens(id)
            .map(|t| t.to_vec())
            .unwrap_or_default())
    }

    async fn trim(
        &mut self,
        ctx: Resource<ContextRes>,
        len: u32,
    ) -> wasmtime::Result<Result<(), String>> {
        let id = self.context_id(&ctx)?;
        Ok(self
            .sched
            .kv()
            .trim(id, len as usize)
            .map_err(|e| e.to_string()))
    }

    async fn reserve(
        &mut self,
        ctx: Resource<ContextRes>,
        tokens: u32,
    ) -> wasmtime::Result<Result<(), String>> {
        let id = self.context_id(&ctx)?;
        Ok(self
            .sched
            .kv()
            .reserve(id, tokens as usize)
            .map_err(|e| e.to_string()))
    }

    async fn num_pages(&mut self, ctx: Resource<ContextRes>) -> wasmtime::Result<u32> {
        let id = self.context_id(&ctx)?;
        Ok(self.sched.kv().pages(id).map_or(0, |p| p.len() as u32))
    }

    async fn drop(&mut self, ctx: Resource<ContextRes>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        Ok(())
    }
}

impl Host for InstanceState {
    async fn free_pages(&mut self) -> wasmtime::Result<u32> {
        Ok(self.sched.kv().free_pages() as u32)
    }

    async fn total_pages(&mut self) -> wasmtime::Result<u32> {
        Ok(self.sched.kv().total_pages() as u32)
    }
}
