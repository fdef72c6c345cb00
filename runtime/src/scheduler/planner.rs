//! The planner thread: owns the queue of passes, plans each batch from its
//! head (FIFO, so no pass starves), sends it to the executor and, when the
//! result comes back, turns logits into outputs, commits the tokens to
//! their contexts and answers finished passes.
//!
//! A pass runs in at most one batch at a time (a long prompt's next chunk
//! is planned once the previous one ran), so staged batches never depend
//! on each other's results. Pages are allocated at planning time; the
//! executor runs batches in planning order, so a page freed and reused
//! later is never written before an earlier batch has read it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pie_driver::{AttnMask, ForwardBatch};
use rayon::prelude::*;

use super::executor::{BatchId, Done, ExecBatch};
use super::ids::IdMap;
use super::inbox::{Inbox, Wake};
use super::{lock, outputs, PageManager, PassOutput, PassRequest, PassResult, Reply};
use super::{KvError, OutputKind, SchedulerConfig, Stats};
use crate::engine::RowOutput;
use crate::error::PieError;

/// How long a pass that cannot get KV pages waits, with nothing else
/// running, for contexts to be released before it fails.
const EXHAUSTION_WAIT: Duration = Duration::from_millis(500);
/// How often such a pass looks again.
const EXHAUSTION_POLL: Duration = Duration::from_millis(5);

/// Logits values (rows × vocabulary) above which a batch's outputs are
/// computed on the thread pool.
const PARALLEL_OUTPUTS: usize = 1 << 18;

/// Bounds of the wait for answered passes to come back (`gathering`).
const GATHER_MIN: Duration = Duration::from_micros(50);
const GATHER_MAX: Duration = Duration::from_millis(2);

pub(super) enum Msg {
    Jobs(Vec<Job>),
    Done(Done),
    /// The last scheduler handle is gone: finish what is queued, then stop.
    Shutdown,
}

type JobId = u64;

/// A queued pass and how far it got.
pub(super) struct Job {
    pub req: PassRequest,
    /// Tokens of `req.tokens` already run.
    done: usize,
    /// The context's length when the pass started.
    start_len: usize,
    /// The pass's custom attention mask (never split across batches).
    mask: Option<AttnMask>,
    outputs: Vec<Option<PassOutput>>,
    pub reply: Reply,
    in_flight: bool,
}

impl Job {
    pub fn new(req: PassRequest, start_len: usize, mask: Option<AttnMask>, reply: Reply) -> Self {
        Job {
            outputs: vec![None; req.outputs.len()],
            req,
            done: 0,
            start_len,
            mask,
            reply,
            in_flight: false,
        }
    }
}

/// One pass's share of a batch.
struct Chunk {
    job: JobId,
    take: usize,
    /// A shared page was copied for it (see `fail`).
    copied: bool,
}

struct InFlight {
    chunks: Vec<Chunk>,
    /// `(job, output index)` of each logits row that comes back.
    rows: Vec<(JobId, usize)>,
    plan_time: Duration,
}

struct Planner {
    jobs: IdMap<Job>,
    /// Every job, in arrival order.
    order: VecDeque<JobId>,
    /// Jobs not in flight.
    waiting: usize,
    next_job: JobId,
    next_batch: BatchId,
    in_flight: IdMap<InFlight>,
    /// Since when the head pass has been waiting for KV pages with nothing
    /// else running.
    blocked_since: Option<Instant>,
    /// Passes the last batch answered, and until when to wait for them to
    /// come back (see `gathering`).
    expected: usize,
    gather_until: Option<Instant>,
    shutting_down: bool,
    kv: Arc<Mutex<PageManager>>,
    exec: mpsc::Sender<ExecBatch>,
    cfg: SchedulerConfig,
    stats: Arc<Stats>,
    hooks: super::Hooks,
}

pub(super) fn start(
    inbox: Arc<Inbox>,
    exec: mpsc::Sender<ExecBatch>,
    kv: Arc<Mutex<PageManager>>,
    cfg: SchedulerConfig,
    stats: Arc<Stats>,
    hooks: super::Hooks,
) -> Result<(), PieError> {
    let planner = Planner {
        jobs: IdMap::default(),
        order: VecDeque::new(),
        waiting: 0,
        next_job: 0,
        next_batch: 0,
        in_flight: IdMap::default(),
        blocked_since: None,
        expected: 0,
        gather_until: None,
        shutting_down: false,
        kv,
        exec,
        cfg,
        stats,
        hooks,
    };
    std::thread::Builder::new()
        .name("pie-planner".into())
        .spawn(move || planner.run(&inbox))
        .map(|_| ())
        .map_err(|e| PieError::Input(format!("cannot start the planner thread: {e}")))
}

impl Planner {
    fn run(mut self, inbox: &Inbox) {
        self.serve(inbox);
        // Passes that arrived after the last one was answered: the
        // scheduler is stopping, tell their inferlets.
        for msg in inbox.close() {
            self.handle(msg);
        }
        let stopped = self
            .order
            .iter()
            .map(|&id| (id, Err("the scheduler has stopped".to_string())))
            .collect();
        self.finish(stopped);
    }

    fn serve(&mut self, inbox: &Inbox) {
        let mut stalled = false;
        loop {
            let gathering = self.gathering();
            let msgs = if stalled || !self.can_dispatch() || gathering.is_some() {
                if self.shutting_down && self.jobs.is_empty() {
                    return; // dropping `exec` stops the executor
                }
                // A pass waiting for pages with nothing running can only
                // be helped by a release, which sends no message: poll.
                let timeout = match (gathering, stalled && self.in_flight.is_empty()) {
                    (Some(left), _) => Some(left),
                    (None, true) => Some(EXHAUSTION_POLL),
                    (None, false) => None,
                };
                inbox.wait(self.wake_for(stalled, gathering.is_some()), timeout)
            } else {
                inbox.drain()
            };
            for m in msgs {
                self.handle(m);
            }
            stalled = false;
            if self.can_dispatch() && self.gathering().is_none() {
                stalled = !self.dispatch();
            }
        }
    }

    /// What new messages can change while the planner cannot plan: while
    /// gathering, the passes still expected; while batches in flight fill
    /// the pipeline or the head waits for pages, only a result; otherwise
    /// (nothing waiting) any pass.
    fn wake_for(&self, stalled: bool, gathering: bool) -> Wake {
        if gathering {
            Wake::Passes(self.expected.saturating_sub(self.waiting))
        } else if stalled || self.in_flight.len() > self.cfg.speculation_depth {
            Wake::ResultsOnly
        } else {
            Wake::Passes(1)
        }
    }

    /// Room for another batch in flight and a pass to put in it.
    fn can_dispatch(&self) -> bool {
        self.in_flight.len() <= self.cfg.speculation_depth && self.waiting > 0
    }

    /// Time left to wait for the passes a batch just answered to come back.
    /// Inferlets submit their next pass only once they see a result; a
    /// batch planned the moment the first one returns would leave the rest
    /// for the next batch, and a decode cohort would fragment. So after a
    /// batch answers `n` passes, planning waits (briefly, relative to the
    /// step time) until `n` passes are waiting.
    fn gathering(&self) -> Option<Duration> {
        let until = self.gather_until?;
        if self.waiting >= self.expected {
            return None;
        }
        until.checked_duration_since(Instant::now())
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Jobs(jobs) => {
                for job in jobs {
                    let id = self.next_job;
                    self.next_job += 1;
                    self.jobs.insert(id, job);
                    self.order.push_back(id);
                    self.waiting += 1;
                }
            }
            Msg::Done(done) => self.complete(done),
            Msg::Shutdown => self.shutting_down = true,
        }
    }

    /// Plans a batch from the head of the queue and sends it; false when
    /// nothing could be planned or answered.
    fn dispatch(&mut self) -> bool {
        let started = Instant::now();
        let kv = self.kv.clone();
        let mut kv = lock(&kv);
        let mut plan = BatchPlan::default();
        let mut failed = Vec::new();
        let mut budget = self.cfg.max_forward_tokens.max(1);
        for &id in &self.order {
            if plan.chunks.len() >= self.cfg.max_forward_requests.max(1) || budget == 0 {
                break;
            }
            let job = &self.jobs[&id];
            if job.in_flight {
                continue;
            }
            let left = job.req.tokens.len() - job.done;
            // A masked pass runs whole (its rows may look ahead): it waits
            // for a batch with room, at the latest the next one, where it
            // is at the head (it fits `max_forward_tokens`, see `prepare`).
            if job.mask.is_some() && left > budget {
                break;
            }
            let take = left.min(budget);
            match kv.prepare_write(job.req.ctx, take) {
                Ok(write) => {
                    budget -= take;
                    plan.add(id, job, take, write);
                }
                Err(e) if !waits_for_space(&e) => failed.push((id, Err(e.to_string()))),
                Err(e) => {
                    // Later passes wait behind the head (FIFO); the head
                    // fails only when nothing else runs to free pages and a
                    // grace period for releases has passed.
                    let alone = plan.chunks.is_empty() && self.in_flight.is_empty();
                    let since = *self.blocked_since.get_or_insert_with(Instant::now);
                    if alone && since.elapsed() >= EXHAUSTION_WAIT {
                        failed.push((id, Err(e.to_string())));
                        continue;
                    }
                    break;
                }
            }
        }
        let state_copies = match plan.chunks.is_empty() {
            true => Vec::new(),
            false => kv.take_state_copies(),
        };
        let progressed = !plan.chunks.is_empty() || !failed.is_empty();
        let replies = self.retire(&mut kv, failed);
        drop(kv);
        if progressed {
            self.blocked_since = None;
            self.gather_until = None;
        }
        self.answer(replies);
        if !plan.chunks.is_empty() {
            self.send(plan, state_copies, started);
        }
        progressed
    }

    fn send(&mut self, plan: BatchPlan, state_copies: Vec<(u32, u32)>, started: Instant) {
        let id = self.next_batch;
        self.next_batch += 1;
        for c in &plan.chunks {
            self.jobs.get_mut(&c.job).expect("queued").in_flight = true;
        }
        self.waiting -= plan.chunks.len();
        self.stats
            .record_batch(plan.batch.num_tokens(), plan.chunks.len());
        // Zero output rows is not a shape every model handles: ask for one
        // row and drop it.
        let mut ask: Vec<usize> = plan.rows.iter().map(|r| r.0).collect();
        let mut greedy: Vec<bool> = plan.rows.iter().map(|r| r.2).collect();
        if ask.is_empty() {
            ask.push(0);
            greedy.push(true);
        }
        let batch = ExecBatch {
            id,
            batch: plan.batch,
            rows: ask,
            greedy,
            state_copies,
            page_copies: plan.page_copies,
        };
        self.in_flight.insert(
            id,
            InFlight {
                chunks: plan.chunks,
                rows: plan.rows.into_iter().map(|r| r.1).collect(),
                plan_time: started.elapsed(),
            },
        );
        if let Err(e) = self.exec.send(batch) {
            // The executor is gone (it panicked): fail the batch.
            let done = Done {
                id: e.0.id,
                result: Err(PieError::Input("the executor thread has stopped".into())),
                driver_time: Duration::ZERO,
            };
            self.complete(done);
        }
    }

    /// Applies a batch's result: outputs, committed tokens, answers.
    fn complete(&mut self, done: Done) {
        let started = Instant::now();
        let Some(flight) = self.in_flight.remove(&done.id) else {
            return;
        };
        self.waiting += flight.chunks.len();
        let outputs = done.result.map(|rows| self.outputs(&flight, rows));
        // One hold of the page manager for the whole answer: inferlets'
        // `submit` calls contend for it.
        let kv = self.kv.clone();
        let mut kv = lock(&kv);
        let finished = match outputs {
            Ok(()) => self.advance(&mut kv, &flight),
            Err(e) => self.fail(&mut kv, &flight, &e),
        };
        let answered = finished.len();
        let replies = self.retire(&mut kv, finished);
        drop(kv);
        self.answer(replies);
        self.expected = self.waiting + answered;
        let window = (done.driver_time / 8).clamp(GATHER_MIN, GATHER_MAX);
        self.gather_until = Some(Instant::now() + window);
        let step = flight.plan_time + started.elapsed() + done.driver_time;
        self.stats.record_step(step, done.driver_time);
    }

    /// Turns a batch's logits rows into the outputs of their passes.
    fn outputs(&mut self, flight: &InFlight, rows: Vec<RowOutput>) {
        // What each logits row becomes, and at which position.
        let wanted: Vec<(&OutputKind, usize)> = flight
            .rows
            .iter()
            .map(|&(id, out)| {
                let job = &self.jobs[&id];
                let (index, kind) = &job.req.outputs[out];
                (kind, job.start_len + *index as usize)
            })
            .collect();
        let compute = |(row, &(kind, pos)): (&RowOutput, &(&OutputKind, usize))| match row {
            RowOutput::Greedy { token, logprob } => PassOutput::Token {
                token: *token,
                logprob: *logprob,
            },
            RowOutput::Logits(logits) => outputs::compute(logits, kind, pos),
        };
        // Each logits row is a pass over the vocabulary (sampling, its
        // log-probability): many rows of a large vocabulary go wide.
        let values: usize = rows
            .iter()
            .map(|r| match r {
                RowOutput::Logits(l) => l.len(),
                RowOutput::Greedy { .. } => 0,
            })
            .sum();
        let computed: Vec<PassOutput> = match values >= PARALLEL_OUTPUTS {
            true => rows
                .par_iter()
                .zip(wanted.par_iter())
                .map(compute)
                .collect(),
            false => rows.iter().zip(&wanted).map(compute).collect(),
        };
        for (&(id, out), output) in flight.rows.iter().zip(computed) {
            self.jobs.get_mut(&id).expect("in flight").outputs[out] = Some(output);
        }
    }

    /// Commits a batch's tokens to their contexts; returns the passes it
    /// finished.
    fn advance(&mut self, kv: &mut PageManager, flight: &InFlight) -> Vec<(JobId, PassResult)> {
        let mut finished = Vec::new();
        for c in &flight.chunks {
            let job = self.jobs.get_mut(&c.job).expect("in flight");
            kv.commit(job.req.ctx, &job.req.tokens[job.done..job.done + c.take]);
            job.done += c.take;
            job.in_flight = false;
            if job.done == job.req.tokens.len() {
                let outs = job.outputs.iter_mut().map(|o| o.take().expect("row ran"));
                finished.push((c.job, Ok(outs.collect())));
            }
        }
        finished
    }

    /// Fails every pass of a batch the driver refused. The context goes
    /// back to its length before the pass; where a page was being copied
    /// the copy may be half made, so it goes back to that page's start.
    fn fail(
        &mut self,
        kv: &mut PageManager,
        flight: &InFlight,
        err: &PieError,
    ) -> Vec<(JobId, PassResult)> {
        let page_size = kv.page_size();
        flight
            .chunks
            .iter()
            .map(|c| {
                let job = self.jobs.get_mut(&c.job).expect("in flight");
                job.in_flight = false;
                let to = match c.copied {
                    true => job.start_len / page_size * page_size,
                    false => job.start_len,
                };
                let cut = kv.rollback(job.req.ctx, to);
                job.done = 0; // rolled back here, not again in `finish`
                let mut msg = format!("forward pass failed: {err}");
                if cut != job.start_len {
                    msg += &format!(" (the context was cut back to {cut} tokens)");
                }
                (c.job, Err(msg))
            })
            .collect()
    }

    /// Answers finished and failed jobs and removes them from the queue.
    fn finish(&mut self, done: Vec<(JobId, PassResult)>) {
        let kv = self.kv.clone();
        let replies = self.retire(&mut lock(&kv), done);
        self.answer(replies);
    }

    /// Removes finished and failed jobs from the queue and releases their
    /// contexts (under the page manager's lock); returns their replies.
    fn retire(
        &mut self,
        kv: &mut PageManager,
        done: Vec<(JobId, PassResult)>,
    ) -> Vec<(Reply, PassResult)> {
        if done.is_empty() {
            return Vec::new();
        }
        let mut replies = Vec::with_capacity(done.len());
        for (id, result) in done {
            let job = self.jobs.remove(&id).expect("queued");
            if !job.in_flight {
                self.waiting -= 1;
            }
            if result.is_err() {
                // Chunks of a long prompt that already ran are undone (a
                // recurrent context is emptied: its state cannot rewind).
                if job.done > 0 {
                    kv.rollback(job.req.ctx, job.start_len);
                }
                self.stats.failed_passes.fetch_add(1, Ordering::Relaxed);
            }
            let _ = kv.set_busy(job.req.ctx, false);
            replies.push((job.reply, result));
        }
        self.order.retain(|id| self.jobs.contains_key(id));
        replies
    }

    /// Calls the replies, outside the page manager's lock (they may call
    /// back into the scheduler), then the after-replies hooks.
    fn answer(&self, replies: Vec<(Reply, PassResult)>) {
        if replies.is_empty() {
            return;
        }
        let n = replies.len() as u64;
        self.stats.passes.fetch_add(n, Ordering::Relaxed);
        self.stats.queue_depth.fetch_sub(n, Ordering::Relaxed);
        for (reply, result) in replies {
            reply(result);
        }
        super::run_hooks(&self.hooks);
    }
}

/// Exhaustion, which other passes finishing or contexts being released can
/// cure; any other error fails the pass at once.
fn waits_for_space(e: &KvError) -> bool {
    matches!(
        e,
        KvError::Exhausted { .. } | KvError::StateExhausted { .. }
    )
}

/// A batch being planned.
#[derive(Default)]
struct BatchPlan {
    batch: ForwardBatch,
    chunks: Vec<Chunk>,
    /// `(batch row, (job, output index), greedy)` of every output computed
    /// by it; greedy rows come back reduced to their token.
    rows: Vec<(usize, (JobId, usize), bool)>,
    page_copies: Vec<(u32, u32)>,
}

impl BatchPlan {
    fn add(&mut self, id: JobId, job: &Job, take: usize, write: super::pages::WritePlan) {
        let start = self.batch.num_tokens();
        let range = job.done..job.done + take;
        for (k, (index, kind)) in job.req.outputs.iter().enumerate() {
            let index = *index as usize;
            if range.contains(&index) {
                let greedy = matches!(kind, OutputKind::Sample(s) if s.temperature <= 0.0);
                self.rows.push((start + index - job.done, (id, k), greedy));
            }
        }
        self.batch.push(
            &job.req.tokens[range.clone()],
            write.first_pos,
            write.pages,
            write.state,
        );
        if let Some(mask) = &job.mask {
            self.batch.seqs.last_mut().expect("pushed").mask = Some(mask.clone());
        }
        if let Some(positions) = &job.req.positions {
            let end = self.batch.positions.len();
            self.batch.positions[end - take..].copy_from_slice(&positions[range]);
        }
        self.chunks.push(Chunk {
            job: id,
            take,
            copied: !write.copies.is_empty(),
        });
        self.page_copies.extend(write.copies);
    }
}
