//! Inferlets: WebAssembly components, written against `runtime/wit/`, that
//! run next to the model. Each runs in its own wasmtime store on a tokio
//! task, with its own time and memory limits; a trap ends that inferlet
//! alone, with an error sent to its client. Forward passes go through the
//! [`Scheduler`], which batches the passes of every inferlet.

mod bindings;
mod client;
mod forward;
mod kv;
mod kv_store;
pub mod limits;
mod model;
mod state;
mod wakes;
mod wasi;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Notify};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, UpdateDeadline};

use crate::scheduler::Scheduler;
pub use limits::Limits;
use state::InstanceState;

/// What an inferlet tells its client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Message(String),
    Log {
        level: &'static str,
        text: String,
    },
    /// The last event: the inferlet returned, failed or was stopped.
    Exit(Result<(), String>),
}

/// Runs inferlets against one scheduler.
pub struct InferletRuntime {
    engine: Engine,
    linker: Linker<InstanceState>,
    sched: Scheduler,
    store: Arc<kv_store::KvStore>,
    next_id: AtomicU64,
    /// Wake-ups of inferlets whose passes finished, sent once per step.
    wakes: Arc<wakes::Wakes>,
}

/// A running inferlet, seen from its client.
pub struct Instance {
    pub id: u64,
    pub events: mpsc::UnboundedReceiver<Event>,
    /// Messages to the inferlet (its `receive`).
    pub input: mpsc::UnboundedSender<String>,
}

impl Instance {
    /// Collects every event until the inferlet exits; returns its messages
    /// and its exit status.
    pub async fn wait(mut self) -> (Vec<Event>, Result<(), String>) {
        let mut seen = Vec::new();
        while let Some(e) = self.events.recv().await {
            if let Event::Exit(r) = e {
                return (seen, r);
            }
            seen.push(e);
        }
        (
            seen,
            Err("the inferlet's task ended without a status".into()),
        )
    }
}

impl InferletRuntime {
    pub fn new(sched: Scheduler) -> Result<Self, String> {
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| format!("wasmtime: {e}"))?;
        let mut linker = Linker::new(&engine);
        bindings::Inferlet::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| format!("wasmtime linker: {e}"))?;
        // WASI p2 for the components that import it (see `wasi.rs`: the
        // context grants nothing of the host).
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| format!("wasmtime linker (WASI): {e}"))?;
        start_epoch_ticker(&engine)?;
        let wakes = Arc::new(wakes::Wakes::default());
        let weak = Arc::downgrade(&wakes);
        sched.after_replies(Arc::new(move || {
            if let Some(w) = weak.upgrade() {
                w.flush();
            }
        }));
        Ok(InferletRuntime {
            engine,
            linker,
            sched,
            store: Default::default(),
            next_id: AtomicU64::new(1),
            wakes,
        })
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Compiles a component (the output of `wasm-tools component new`).
    pub fn compile(&self, wasm: &[u8]) -> Result<Component, String> {
        Component::new(&self.engine, wasm)
            .map_err(|e| format!("not a valid inferlet component: {e:#}"))
    }

    /// Starts an inferlet on the current tokio runtime (without one, the
    /// instance exits at once with an error).
    pub fn launch(&self, component: &Component, args: Vec<String>, limits: Limits) -> Instance {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, events_rx) = mpsc::unbounded_channel();
        let (input, inbox) = mpsc::unbounded_channel();
        let state = InstanceState {
            id,
            args,
            sched: self.sched.clone(),
            store: self.store.clone(),
            table: ResourceTable::new(),
            wasi: wasi::sandbox(&events),
            limiter: limits::MemoryLimiter::new(limits.memory),
            events: events.clone(),
            inbox,
            passes: Vec::new(),
            unsent: Vec::new(),
            pass_done: Arc::new(Notify::new()),
            wakes: self.wakes.clone(),
            started: Instant::now(),
            time_limit: limits.time,
        };
        let events_tx = events.clone();
        let (engine, linker, component) =
            (self.engine.clone(), self.linker.clone(), component.clone());
        let task = async move {
            let status = run(engine, linker, component, state)
                .await
                .map_err(|e| format!("inferlet {id}: {e}"));
            let _ = events.send(Event::Exit(status));
        };
        self.wakes.ensure_dispatcher();
        match tokio::runtime::Handle::try_current() {
            Ok(tokio) => drop(tokio.spawn(task)),
            Err(_) => {
                let msg = format!("inferlet {id}: launch() needs a tokio runtime");
                let _ = events_tx.send(Event::Exit(Err(msg)));
            }
        }
        Instance {
            id,
            events: events_rx,
            input,
        }
    }
}

/// Instantiates and runs one inferlet to its end (or its limit).
async fn run(
    engine: Engine,
    linker: Linker<InstanceState>,
    component: Component,
    state: InstanceState,
) -> Result<(), String> {
    let (started, limit) = (state.started, state.time_limit);
    let mut store = Store::new(&engine, state);
    store.limiter(|s| &mut s.limiter);
    // Every tick: stop an inferlet past its time limit, else yield so a
    // busy one cannot hold a thread that other inferlets need.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if limits::past(started, limit) {
            return Err(wasmtime::Error::msg(limits::time_exceeded(limit)));
        }
        Ok(UpdateDeadline::Yield(1))
    });
    let body = async {
        let instance = bindings::Inferlet::instantiate_async(&mut store, &component, &linker)
            .await
            .map_err(|e| format!("cannot instantiate: {}", describe(&e)))?;
        instance
            .call_run(&mut store)
            .await
            .map_err(|e| describe(&e))?
    };
    // Also bounds time spent waiting in host calls (for a client message,
    // say), where no epoch check runs.
    match tokio::time::timeout(limit, body).await {
        Ok(result) => result,
        Err(_) => Err(limits::time_exceeded(limit)),
    }
}

/// A trap as the client should read it: our limit messages as they are,
/// other traps cause first, then wasmtime's context (the wasm backtrace).
fn describe(e: &wasmtime::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    if let Some(limit) = chain.iter().find(|c| c.contains("limit exceeded")) {
        return limit.clone();
    }
    let cause = e.root_cause().to_string();
    let context: Vec<&String> = chain.iter().filter(|c| **c != cause).collect();
    match context.is_empty() {
        true => format!("trapped: {cause}"),
        false => format!(
            "trapped: {cause}\n{}",
            context
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// Advances the engine's epoch every tick while the engine lives.
fn start_epoch_ticker(engine: &Engine) -> Result<(), String> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("pie-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(limits::EPOCH_TICK);
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the epoch thread: {e}"))
}
