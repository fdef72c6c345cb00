//! The executor thread: owns the engine (which never crosses threads), and
//! runs the batches the planner sends, in order: first the copies the batch
//! depends on (recurrent state rows of forks, copied-on-write pages), then
//! the forward pass. Each result goes back to the planner's inbox.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pie_driver::{Driver, ForwardBatch};

use super::inbox::Inbox;
use super::planner::Msg;
use super::{ModelInfo, SchedulerConfig};
use crate::engine::{Engine, RowOutput};
use crate::error::PieError;

pub(super) type BatchId = u64;

/// A planned batch.
pub(super) struct ExecBatch {
    pub id: BatchId,
    pub batch: ForwardBatch,
    /// Token rows whose outputs come back, in this order.
    pub rows: Vec<usize>,
    /// Per row: only its greedy token and log-probability are wanted
    /// (reduced by the driver, on the device where there is one).
    pub greedy: Vec<bool>,
    /// `(from, to)` recurrent state rows to copy first.
    pub state_copies: Vec<(u32, u32)>,
    /// `(from, to)` KV pages to copy first.
    pub page_copies: Vec<(u32, u32)>,
}

/// A batch's result.
pub(super) struct Done {
    pub id: BatchId,
    /// Each requested row: its logits, or its greedy token.
    pub result: Result<Vec<RowOutput>, PieError>,
    pub driver_time: Duration,
}

/// Loads the engine on a new thread and allocates its KV cache; returns the
/// model's facts, the executor's inbox, whether the model keeps recurrent
/// state, and the thread (it ends, dropping the engine, once the inbox
/// closes).
pub(super) fn start<D, F>(
    name: String,
    load: F,
    cfg: &SchedulerConfig,
    results: Arc<Inbox>,
) -> Result<(ModelInfo, mpsc::Sender<ExecBatch>, bool, JoinHandle<()>), PieError>
where
    D: Driver + 'static,
    F: FnOnce() -> Result<Engine<D>, PieError> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<ExecBatch>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let cfg = cfg.clone();
    let thread = std::thread::Builder::new()
        .name("pie-executor".into())
        .spawn(move || {
            let started = load().and_then(|mut engine| {
                let recurrent = engine.has_recurrent_state();
                let state_rows = if recurrent {
                    cfg.max_recurrent_contexts
                } else {
                    1
                };
                let pages = kv_pages(&engine, &cfg, state_rows)?;
                engine.allocate_kv(pages, state_rows)?;
                Ok((model_info(&mut engine, name, pages), recurrent, engine))
            });
            match started {
                Ok((info, recurrent, engine)) => {
                    let _ = ready_tx.send(Ok((info, recurrent)));
                    run(engine, rx, results);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| PieError::Input(format!("cannot start the executor thread: {e}")))?;
    let (info, recurrent) = ready_rx
        .recv()
        .map_err(|_| PieError::Input("the executor thread died while loading".into()))??;
    Ok((info, tx, recurrent, thread))
}

/// The configured page count, or (0) what the device memory holds.
fn kv_pages<D: Driver + 'static>(
    engine: &Engine<D>,
    cfg: &SchedulerConfig,
    state_rows: usize,
) -> Result<usize, PieError> {
    if cfg.kv_pages > 0 {
        return Ok(cfg.kv_pages);
    }
    let util = cfg.gpu_mem_utilization;
    if !(util > 0.0 && util <= 1.0) {
        return Err(PieError::Input(format!(
            "gpu_mem_utilization {util}: give a fraction in (0, 1]"
        )));
    }
    let sized = engine.kv_pages_for_memory(
        util,
        cfg.max_forward_tokens,
        cfg.max_forward_requests,
        state_rows,
    );
    match sized {
        None => Ok(1024),
        Some(0) => Err(PieError::Input(format!(
            "no room for a KV cache in {:.0}% of the GPU's memory after the weights and \
             activations: raise gpu_mem_utilization, lower max_forward_tokens, or use a smaller model",
            util * 100.0
        ))),
        Some(pages) => Ok(pages),
    }
}

fn model_info<D: Driver + 'static>(
    engine: &mut Engine<D>,
    name: String,
    kv_pages: usize,
) -> ModelInfo {
    ModelInfo {
        name,
        arch: engine.arch.to_string(),
        vocab: engine.ir.vocab,
        page_size: engine.page_size(),
        kv_pages,
        tokenizer: engine.tokenizer.take(),
        chat_template: engine.chat_template.take(),
        stop_ids: engine.stop_ids.clone(),
        mask_refusal: engine.mask_refusal(),
    }
}

/// Runs batches until the planner hangs up.
fn run<D: Driver + 'static>(
    mut engine: Engine<D>,
    batches: mpsc::Receiver<ExecBatch>,
    results: Arc<Inbox>,
) {
    for b in batches {
        let started = Instant::now();
        let result = execute(&mut engine, &b);
        let done = Done {
            id: b.id,
            result,
            driver_time: started.elapsed(),
        };
        if results.send(Msg::Done(done)).is_err() {
            return;
        }
    }
}

fn execute<D: Driver + 'static>(
    engine: &mut Engine<D>,
    b: &ExecBatch,
) -> Result<Vec<RowOutput>, PieError> {
    for &(from, to) in &b.state_copies {
        engine.copy_state(from, to)?;
    }
    for &(from, to) in &b.page_copies {
        engine.copy_page(from, to)?;
    }
    engine.forward_outputs(&b.batch, &b.rows, &b.greedy)
}
