//! Continuous batching: forward passes submitted by every inferlet (and
//! every branch of one) wait in one FIFO queue; each step takes passes from
//! its head into one driver batch bounded by `max_forward_tokens` and
//! `max_forward_requests`. A long prompt is split across steps (chunked
//! prefill) and the head of the queue always makes progress, so no pass
//! starves.
//!
//! Two threads: the planner (`planner.rs`) owns the queue and the page
//! tables and plans batches; the executor (`executor.rs`) owns the engine
//! and runs them. While the executor runs one batch the planner stages the
//! next from passes not already in flight (`speculation_depth` batches
//! ahead), so the driver does not wait for planning. Forward passes are
//! CPU- or GPU-bound and never block the async tasks running inferlets.

mod executor;
mod ids;
mod inbox;
mod mask;
pub mod outputs;
pub mod pages;
mod planner;
pub mod stats;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pie_driver::Driver;

use crate::chat_template::ChatTemplate;
use crate::engine::Engine;
use crate::error::PieError;
use crate::sampling::Sampler;
use crate::tokenizer::Tokenizer;
pub use pages::{ContextId, KvError, PageManager};
use planner::Msg;
pub use stats::Stats;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most tokens in one driver batch.
    pub max_forward_tokens: usize,
    /// Most passes (sequences) in one driver batch.
    pub max_forward_requests: usize,
    /// Pages in the KV cache, shared by every context; 0 = as many as
    /// `gpu_mem_utilization` of the device's memory holds (drivers with
    /// device memory), else 1024.
    pub kv_pages: usize,
    /// Fraction of the device's memory the weights, activations and KV
    /// cache may use together, when `kv_pages` is 0.
    pub gpu_mem_utilization: f64,
    /// Batches staged while one runs (0: plan only when the driver is idle).
    pub speculation_depth: usize,
    /// Contexts that may hold recurrent state at once (models with Gated
    /// DeltaNet or Mamba2 layers; each row can be megabytes).
    pub max_recurrent_contexts: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_forward_tokens: 10240,
            max_forward_requests: 512,
            kv_pages: 1024,
            gpu_mem_utilization: 0.90,
            speculation_depth: 1,
            max_recurrent_contexts: 64,
        }
    }
}

/// What a pass returns for one of its tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputKind {
    Sample(Sampler),
    /// The `k` most likely tokens.
    Distribution(u32),
    Logits,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PassOutput {
    Token { token: u32, logprob: f32 },
    Distribution(Vec<(u32, f32)>),
    Logits(Vec<f32>),
}

pub type PassResult = Result<Vec<PassOutput>, String>;

/// A forward pass appending `tokens` to a context.
#[derive(Debug, Clone, Default)]
pub struct PassRequest {
    pub ctx: ContextId,
    pub tokens: Vec<u32>,
    /// Rotary positions of the tokens (one each); None = the context's
    /// continuation. They change only the rotation: cache order and the
    /// mask follow the context's token order.
    pub positions: Option<Vec<u32>>,
    /// Attention mask: one row per token, each with one entry per key
    /// position (the context's cached tokens, then this pass's tokens; see
    /// `mask.rs`); None = causal. A masked pass is never split across
    /// batches.
    pub mask: Option<Vec<Vec<bool>>>,
    /// `(index into tokens, what to return)`.
    pub outputs: Vec<(u32, OutputKind)>,
}

/// Called once with a pass's result, on the planner thread.
pub type Reply = Box<dyn FnOnce(PassResult) + Send>;

/// Called after each group of replies (see [`Scheduler::after_replies`]).
pub type AfterReplies = Arc<dyn Fn() + Send + Sync>;

/// The hooks run after each group of replies, shared with the planner.
pub(crate) type Hooks = Arc<Mutex<Vec<AfterReplies>>>;

/// Runs every hook (after replies were called).
pub(crate) fn run_hooks(hooks: &Hooks) {
    for h in hooks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        h();
    }
}

/// The model-level facts front ends need without touching the engine.
pub struct ModelInfo {
    pub name: String,
    pub arch: String,
    pub vocab: usize,
    pub page_size: usize,
    /// Pages in the KV cache.
    pub kv_pages: usize,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
    /// Why passes with custom attention masks are refused on this model
    /// (recurrent or MLA layers); None = they run.
    pub mask_refusal: Option<String>,
}

/// Handle to the scheduler; cheap to clone. The threads stop when the last
/// handle is dropped (after the passes in flight finish).
#[derive(Clone)]
pub struct Scheduler {
    tx: Arc<Sender>,
    kv: Arc<Mutex<PageManager>>,
    model: Arc<ModelInfo>,
    stats: Arc<Stats>,
    max_forward_tokens: usize,
    hooks: Hooks,
}

/// The planner's inbox; dropping the last one tells the planner to stop
/// and waits (up to `SHUTDOWN_WAIT`) for the executor to drop the engine,
/// so device memory and handles are released before the caller goes on —
/// or before the process exits, which must not race the driver's teardown.
struct Sender {
    inbox: Arc<inbox::Inbox>,
    executor: Mutex<Option<JoinHandle<()>>>,
}

const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.inbox.send(Msg::Shutdown);
        let thread = self
            .executor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(thread) = thread else {
            return;
        };
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

impl Scheduler {
    /// Starts the scheduler: the executor thread loads the engine with
    /// `load` (so the engine never crosses threads) and allocates the KV
    /// cache; the planner thread then takes passes.
    pub fn start<D, F>(name: &str, load: F, cfg: SchedulerConfig) -> Result<Self, PieError>
    where
        D: Driver + 'static,
        F: FnOnce() -> Result<Engine<D>, PieError> + Send + 'static,
    {
        let stats = Arc::new(Stats::default());
        let inbox = Arc::new(inbox::Inbox::default());
        let (info, exec, recurrent, executor) =
            executor::start(name.to_string(), load, &cfg, inbox.clone())?;
        let mut pages = PageManager::new(info.kv_pages, info.page_size);
        if recurrent {
            pages = pages.with_state_rows(cfg.max_recurrent_contexts);
        }
        let kv = Arc::new(Mutex::new(pages));
        let max_forward_tokens = cfg.max_forward_tokens.max(1);
        let hooks = Hooks::default();
        planner::start(
            inbox.clone(),
            exec,
            kv.clone(),
            cfg,
            stats.clone(),
            hooks.clone(),
        )?;
        Ok(Scheduler {
            tx: Arc::new(Sender {
                inbox,
                executor: Mutex::new(Some(executor)),
            }),
            kv,
            model: Arc::new(info),
            stats,
            max_forward_tokens,
            hooks,
        })
    }

    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The page manager. Held only briefly: the planner takes it for
    /// every batch.
    pub fn kv(&self) -> MutexGuard<'_, PageManager> {
        lock(&self.kv)
    }

    /// Runs `hook` after each group of replies: the passes one step
    /// answered (on the planner thread), or those refused together. A
    /// front end whose replies defer work that costs per call (waking a
    /// task) does it there once per group. A hook must not add hooks.
    pub fn after_replies(&self, hook: AfterReplies) {
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// Queues a pass; `reply` gets its outputs. Bad requests are refused
    /// here, before anything changes.
    pub fn submit(&self, req: PassRequest, reply: Reply) -> Result<(), String> {
        let pass = self.prepare(req, reply)?;
        self.send(vec![pass])
    }

    /// Checks a pass and claims its context, without queueing it yet: a
    /// caller submitting several passes at once (an inferlet's branches)
    /// sends them together with [`Scheduler::send`], so they are planned
    /// into the same batch.
    pub fn prepare(&self, mut req: PassRequest, reply: Reply) -> Result<Prepared, String> {
        let (start_len, mask) = {
            let mut kv = self.kv();
            let len = kv.tokens(req.ctx).map_err(|e| e.to_string())?.len();
            check_request(&req, self.model.vocab)?;
            let limits = mask::MaskLimits {
                refusal: self.model.mask_refusal.as_deref(),
                max_forward_tokens: self.max_forward_tokens,
            };
            let mask = match req.mask.take() {
                Some(rows) => mask::pack(&rows, req.tokens.len(), len, &limits)?,
                None => None,
            };
            kv.set_busy(req.ctx, true).map_err(|e| e.to_string())?;
            (len, mask)
        };
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        Ok(Prepared(planner::Job::new(req, start_len, mask, reply)))
    }

    /// Queues prepared passes, in order. If the scheduler has stopped,
    /// each pass is answered with that error.
    pub fn send(&self, passes: Vec<Prepared>) -> Result<(), String> {
        if passes.is_empty() {
            return Ok(());
        }
        let jobs = passes.into_iter().map(|p| p.0).collect();
        self.tx.inbox.send(Msg::Jobs(jobs)).map_err(|msg| {
            let Msg::Jobs(jobs) = msg else { unreachable!() };
            let stopped = "the scheduler has stopped".to_string();
            for job in jobs {
                self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                let _ = self.kv().set_busy(job.req.ctx, false);
                (job.reply)(Err(stopped.clone()));
            }
            run_hooks(&self.hooks);
            stopped
        })
    }
}

/// A checked pass whose context is claimed, waiting to be sent.
pub struct Prepared(planner::Job);

fn lock(kv: &Mutex<PageManager>) -> MutexGuard<'_, PageManager> {
    // The manager checks before it changes anything, so a panic elsewhere
    // while the lock was held cannot have left it half changed.
    kv.lock().unwrap_or_else(|p| p.into_inner())
}

/// Refuses what the scheduler or driver cannot run, with the reason (the
/// mask is checked by `mask::pack`).
fn check_request(req: &PassRequest, vocab: usize) -> Result<(), String> {
    let n = req.tokens.len();
    if n == 0 {
        return Err("a forward pass needs at least one input token".into());
    }
    if let Some(&bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!(
            "token id {bad} is out of range: the vocabulary has {vocab} tokens"
        ));
    }
    if let Some((i, _)) = req.outputs.iter().find(|(i, _)| *i as usize >= n) {
        return Err(format!(
            "output requested for input {i}, but the pass has {n} tokens"
        ));
    }
    if let Some(pos) = &req.positions {
        if pos.len() != n {
            return Err(format!(
                "{} positions given for {n} input tokens: give one per token",
                pos.len()
            ));
        }
    }
    Ok(())
}
