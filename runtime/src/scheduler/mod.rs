//! Continuous batching: forward passes submitted by every inferlet (and
//! every branch of one) wait in one FIFO queue; each step takes passes from
//! its head into one driver batch bounded by `max_forward_tokens` and
//! `max_forward_requests`. A long prompt is split across steps (chunked
//! prefill) and the head of the queue always makes progress, so no pass
//! starves. The engine lives on its own thread: forward passes are
//! CPU-bound and must not block the async tasks running inferlets.

pub mod outputs;
pub mod pages;
pub mod stats;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pie_driver::{Driver, ForwardBatch};

use crate::chat_template::ChatTemplate;
use crate::engine::Engine;
use crate::error::PieError;
use crate::sampling::Sampler;
use crate::tokenizer::Tokenizer;
pub use pages::{ContextId, KvError, PageManager};
pub use stats::Stats;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most tokens in one driver batch.
    pub max_forward_tokens: usize,
    /// Most passes (sequences) in one driver batch.
    pub max_forward_requests: usize,
    /// Pages in the KV cache, shared by every context.
    pub kv_pages: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_forward_tokens: 10240,
            max_forward_requests: 512,
            kv_pages: 1024,
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
    /// Must continue the context's positions; the driver has no other
    /// placement yet.
    pub positions: Option<Vec<u32>>,
    /// Must be causal; the driver has no custom masks yet.
    pub mask: Option<Vec<Vec<bool>>>,
    /// `(index into tokens, what to return)`.
    pub outputs: Vec<(u32, OutputKind)>,
}

/// Called once with a pass's result, on the scheduler thread.
pub type Reply = Box<dyn FnOnce(PassResult) + Send>;

/// The model-level facts front ends need without touching the engine.
pub struct ModelInfo {
    pub name: String,
    pub arch: String,
    pub vocab: usize,
    pub page_size: usize,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
}

/// A queued pass and how far it got.
struct Job {
    req: PassRequest,
    /// Tokens of `req.tokens` already run.
    done: usize,
    /// The context's length when the pass started.
    start_len: usize,
    /// The length the context goes back to if the pass fails.
    rollback_to: usize,
    outputs: Vec<Option<PassOutput>>,
    reply: Reply,
}

/// Handle to the scheduler thread; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Job>,
    kv: Arc<Mutex<PageManager>>,
    model: Arc<ModelInfo>,
    stats: Arc<Stats>,
}

impl Scheduler {
    /// Starts the scheduler thread, which loads the engine with `load` (so
    /// the engine never crosses threads) and allocates the KV cache.
    pub fn start<D, F>(name: &str, load: F, cfg: SchedulerConfig) -> Result<Self, PieError>
    where
        D: Driver + 'static,
        F: FnOnce() -> Result<Engine<D>, PieError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(Stats::default());
        let counters = stats.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let name = name.to_string();
        std::thread::Builder::new()
            .name("pie-scheduler".into())
            .spawn(move || {
                let started = load().and_then(|mut engine| {
                    if engine.has_recurrent_state() {
                        return Err(PieError::Input(format!(
                            "the scheduler does not run models with recurrent layers ({}) yet",
                            engine.arch
                        )));
                    }
                    engine.allocate_kv(cfg.kv_pages, 1)?;
                    Ok((model_info(&mut engine, name), engine))
                });
                match started {
                    Ok((info, engine)) => {
                        let kv =
                            Arc::new(Mutex::new(PageManager::new(cfg.kv_pages, info.page_size)));
                        let _ = ready_tx.send(Ok((info, kv.clone())));
                        run_loop(engine, rx, kv, &cfg, &counters);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| PieError::Input(format!("cannot start the scheduler thread: {e}")))?;
        let (info, kv) = ready_rx
            .recv()
            .map_err(|_| PieError::Input("the scheduler thread died while loading".into()))??;
        Ok(Scheduler {
            tx,
            kv,
            model: Arc::new(info),
            stats,
        })
    }

    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The page manager. Held only briefly: the scheduler takes it for
    /// every step.
    pub fn kv(&self) -> MutexGuard<'_, PageManager> {
        // A panic while holding the lock cannot leave the manager half
        // changed (it checks before it changes), so poison is ignored.
        self.kv.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a pass; `reply` gets its outputs. Bad requests are refused
    /// here, before anything changes.
    pub fn submit(&self, req: PassRequest, reply: Reply) -> Result<(), String> {
        let start_len = {
            let mut kv = self.kv();
            let len = kv.tokens(req.ctx).map_err(|e| e.to_string())?.len();
            check_request(&req, len, self.model.vocab)?;
            kv.set_busy(req.ctx, true).map_err(|e| e.to_string())?;
            len
        };
        let job = Job {
            outputs: vec![None; req.outputs.len()],
            req,
            done: 0,
            start_len,
            rollback_to: start_len,
            reply,
        };
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        self.tx.send(job).map_err(|e| {
            let job = e.0;
            self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
            let _ = self.kv().set_busy(job.req.ctx, false);
            "the scheduler has stopped".to_string()
        })
    }
}

fn model_info<D: Driver + 'static>(engine: &mut Engine<D>, name: String) -> ModelInfo {
    ModelInfo {
        name,
        arch: engine.arch.to_string(),
        vocab: engine.ir.vocab,
        page_size: engine.page_size(),
        tokenizer: engine.tokenizer.take(),
        chat_template: engine.chat_template.take(),
        stop_ids: engine.stop_ids.clone(),
    }
}

/// Refuses what the scheduler or driver cannot run, with the reason.
fn check_request(req: &PassRequest, ctx_len: usize, vocab: usize) -> Result<(), String> {
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
        let expected: Vec<u32> = (ctx_len..ctx_len + n).map(|p| p as u32).collect();
        if *pos != expected {
            return Err(format!(
                "positions must continue the context ({ctx_len}..{}): this driver has no other placement",
                ctx_len + n
            ));
        }
    }
    if let Some(mask) = &req.mask {
        let causal = mask.len() == n
            && mask
                .iter()
                .enumerate()
                .all(|(i, row)| row.len() == ctx_len + i + 1 && row.iter().all(|&b| b));
        if !causal {
            return Err(
                "custom attention masks are not supported by this driver yet; only the causal mask (rows of ctx_len + i + 1 `true`) is accepted"
                    .into(),
            );
        }
    }
    Ok(())
}

fn run_loop<D: Driver + 'static>(
    mut engine: Engine<D>,
    rx: mpsc::Receiver<Job>,
    kv: Arc<Mutex<PageManager>>,
    cfg: &SchedulerConfig,
    stats: &Stats,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => return, // every handle is gone
            }
        }
        queue.extend(rx.try_iter());
        step(&mut engine, &mut queue, &kv, cfg, stats);
    }
}

/// One sequence's share of a batch.
struct Chunk {
    /// Index of the job in the queue.
    job: usize,
    /// New tokens of the job run in this chunk.
    take: usize,
    /// Already-committed tokens run again (copy on write of a page).
    replay: usize,
}

fn lock(kv: &Mutex<PageManager>) -> MutexGuard<'_, PageManager> {
    // The manager checks before it changes anything, so a panic elsewhere
    // while the lock was held cannot have left it half changed.
    kv.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one batch from the head of the queue and answers finished passes.
/// The page manager is not locked while the driver runs, so inferlets can
/// fork and trim other contexts meanwhile (busy contexts refuse changes).
fn step<D: Driver + 'static>(
    engine: &mut Engine<D>,
    queue: &mut VecDeque<Job>,
    kv: &Mutex<PageManager>,
    cfg: &SchedulerConfig,
    stats: &Stats,
) {
    let started = Instant::now();
    let mut in_driver = Duration::ZERO;
    let (batch, chunks, mut finished) = plan_batch(&mut lock(kv), queue, cfg);
    if !chunks.is_empty() {
        stats.record_batch(batch.num_tokens(), chunks.len());
        let rows = output_rows(&batch, &chunks, queue);
        // Zero output rows is not a shape every model handles: ask for
        // one row and drop it.
        let ask: Vec<usize> = match rows.is_empty() {
            true => vec![0],
            false => rows.iter().map(|r| r.0).collect(),
        };
        let driver_started = Instant::now();
        let result = engine.forward_rows(&batch, &ask);
        in_driver = driver_started.elapsed();
        match result {
            Ok(logits) => {
                store_outputs(queue, &rows, &logits, engine.ir.vocab);
                finished.extend(advance(&mut lock(kv), queue, &chunks));
            }
            Err(e) => finished.extend(fail_chunks(queue, &chunks, lock(kv).page_size(), &e)),
        }
    }
    let failed = finished.iter().filter(|f| f.1.is_err()).count();
    stats
        .passes
        .fetch_add(finished.len() as u64, Ordering::Relaxed);
    stats
        .failed_passes
        .fetch_add(failed as u64, Ordering::Relaxed);
    stats
        .queue_depth
        .fetch_sub(finished.len() as u64, Ordering::Relaxed);
    finish(&mut lock(kv), queue, finished);
    stats.record_step(started.elapsed(), in_driver);
}

fn store_outputs(
    queue: &mut VecDeque<Job>,
    rows: &[(usize, usize, usize)],
    logits: &[f32],
    vocab: usize,
) {
    for (k, &(_, job, out)) in rows.iter().enumerate() {
        let row = &logits[k * vocab..(k + 1) * vocab];
        let j = &mut queue[job];
        let pos = j.start_len + j.req.outputs[out].0 as usize;
        j.outputs[out] = Some(outputs::compute(row, &j.req.outputs[out].1, pos));
    }
}

/// Commits the tokens each chunk ran; returns the jobs now complete.
fn advance(
    kv: &mut PageManager,
    queue: &mut VecDeque<Job>,
    chunks: &[Chunk],
) -> Vec<(usize, PassResult)> {
    let mut done = Vec::new();
    for c in chunks {
        let j = &mut queue[c.job];
        kv.commit(j.req.ctx, &j.req.tokens[j.done..j.done + c.take]);
        j.done += c.take;
        if j.done == j.req.tokens.len() {
            let outs = j
                .outputs
                .iter_mut()
                .map(|o| o.take().expect("every output row ran"));
            done.push((c.job, Ok(outs.collect())));
        }
    }
    done
}

/// Fails every chunk of a batch the driver refused. A chunk that replayed
/// a copied page may have left that page half written: its context goes
/// back to the page boundary before it, and the message says so.
fn fail_chunks(
    queue: &mut VecDeque<Job>,
    chunks: &[Chunk],
    page_size: usize,
    err: &PieError,
) -> Vec<(usize, PassResult)> {
    chunks
        .iter()
        .map(|c| {
            let j = &mut queue[c.job];
            let mut msg = format!("forward pass failed: {err}");
            if c.replay > 0 {
                j.rollback_to = j.start_len / page_size * page_size;
                msg += &format!(" (the context was cut back to {} tokens)", j.rollback_to);
            }
            (c.job, Err(msg))
        })
        .collect()
}

/// Takes chunks from the head of the queue while the budget lasts. A job
/// whose pages cannot be had fails if it is first (nothing else could free
/// pages by running), and waits for the next step otherwise.
fn plan_batch(
    kv: &mut PageManager,
    queue: &VecDeque<Job>,
    cfg: &SchedulerConfig,
) -> (ForwardBatch, Vec<Chunk>, Vec<(usize, PassResult)>) {
    let mut budget = cfg.max_forward_tokens.max(1);
    let mut parts = Vec::new();
    let mut chunks = Vec::new();
    let mut failed = Vec::new();
    for (i, job) in queue.iter().enumerate() {
        if chunks.len() >= cfg.max_forward_requests.max(1) || budget == 0 {
            break;
        }
        let replay = kv.replay_len(job.req.ctx).unwrap_or(0);
        let take = (job.req.tokens.len() - job.done).min(budget.saturating_sub(replay));
        if take == 0 {
            break;
        }
        match kv.prepare_write(job.req.ctx, take) {
            Ok(plan) => {
                budget -= plan.replay.len() + take;
                let mut tokens = plan.replay.clone();
                tokens.extend_from_slice(&job.req.tokens[job.done..job.done + take]);
                chunks.push(Chunk {
                    job: i,
                    take,
                    replay: plan.replay.len(),
                });
                parts.push((tokens, plan.first_pos, plan.pages));
            }
            Err(e) if chunks.is_empty() => failed.push((i, Err(e.to_string()))),
            Err(_) => break,
        }
    }
    (ForwardBatch::new(parts), chunks, failed)
}

/// `(batch row, job index, output index)` of every requested output whose
/// token runs in this batch.
fn output_rows(
    batch: &ForwardBatch,
    chunks: &[Chunk],
    queue: &VecDeque<Job>,
) -> Vec<(usize, usize, usize)> {
    let mut rows = Vec::new();
    for (c, seq) in chunks.iter().zip(&batch.seqs) {
        let job = &queue[c.job];
        for (k, (index, _)) in job.req.outputs.iter().enumerate() {
            let index = *index as usize;
            if (job.done..job.done + c.take).contains(&index) {
                rows.push((seq.start + c.replay + index - job.done, c.job, k));
            }
        }
    }
    rows
}

/// Answers finished and failed jobs and removes them from the queue. A
/// failed pass leaves its context as it was before the pass.
fn finish(kv: &mut PageManager, queue: &mut VecDeque<Job>, mut done: Vec<(usize, PassResult)>) {
    done.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (i, result) in done {
        let job = queue.remove(i).expect("index from this step");
        if result.is_err() {
            kv.rollback(job.req.ctx, job.rollback_to);
        }
        let _ = kv.set_busy(job.req.ctx, false);
        (job.reply)(result);
    }
}
