//! What one running inferlet's store holds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use wasmtime::component::ResourceTable;

use super::kv_store::KvStore;
use super::limits::MemoryLimiter;
use super::Event;
use crate::scheduler::{PassResult, Prepared, Scheduler};

/// Where a pass's result lands; filled on the scheduler thread.
pub type Slot = Arc<Mutex<Option<PassResult>>>;

pub struct InstanceState {
    pub id: u64,
    pub args: Vec<String>,
    pub sched: Scheduler,
    pub store: Arc<KvStore>,
    pub table: ResourceTable,
    /// WASI p2 state (empty sandbox; see `wasi.rs`).
    pub wasi: wasmtime_wasi::WasiCtx,
    pub limiter: MemoryLimiter,
    pub events: mpsc::UnboundedSender<Event>,
    pub inbox: mpsc::UnboundedReceiver<String>,
    /// Results of this inferlet's passes not yet read by `poll`.
    pub passes: Vec<Slot>,
    /// Passes submitted since the inferlet last waited: sent to the
    /// scheduler together when it waits, polls or ends, so an inferlet's
    /// branches share a batch.
    pub unsent: Vec<Prepared>,
    /// Signalled whenever one of this inferlet's passes finishes.
    pub pass_done: Arc<Notify>,
    /// Where replies defer that signal to (once per scheduler step).
    pub wakes: Arc<super::wakes::Wakes>,
    pub started: Instant,
    pub time_limit: Duration,
}

impl InstanceState {
    /// Sends an event to the client; a client that went away is no error
    /// (the inferlet finishes its work regardless).
    pub fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Sends the passes submitted since the last flush.
    pub fn flush(&mut self) {
        let passes = std::mem::take(&mut self.unsent);
        // A stopped scheduler answers each pass with the error.
        let _ = self.sched.send(passes);
    }
}

impl Drop for InstanceState {
    /// An inferlet that ends (or traps) right after submitting: its passes
    /// still run, so their contexts are released cleanly.
    fn drop(&mut self) {
        self.flush();
    }
}
