//! CUDA graphs for decode passes.
//!
//! A decode batch (one new token per sequence, every row's logits wanted)
//! is padded to a bucket size (1, 2, 4, …, 256 rows) and its inputs —
//! token ids, positions, the KV slot of each new token and the slots each
//! row reads — are written into one device buffer at fixed addresses
//! ([`StagedInputs`]). The ops read those addresses instead of uploading
//! their own copies, so a pass over a bucket launches the same kernels
//! with the same arguments every step: the first pass of a bucket runs
//! eagerly (it warms up lazily built tables), the second is recorded as a
//! CUDA graph, and every later one replays the graph after one host→device
//! copy of the inputs. This removes the per-kernel launch cost that
//! dominates small decode batches (hundreds of launches per step).
//!
//! Not recorded: passes with prompt chunks, row selections, or models with
//! composite ops (their routing or recurrent state is batch-dependent on
//! the host). `PIE_CUDA_GRAPHS=0` turns recording off.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream};
use pie_driver::{DriverError, ForwardBatch, Result, SeqChunk};

use std::sync::atomic::Ordering;

use crate::kv::CudaKv;
use crate::step_timing::StepTiming;
use crate::tensor::CudaAct;
use crate::CudaDriver;

/// Row counts decode batches are padded to.
pub const BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
pub const MAX_ROWS: usize = 256;

/// Offsets (in i32 elements) of each input inside the staging buffer.
mod at {
    use super::MAX_ROWS;
    pub const TOKENS: usize = 0;
    pub const ROPE_POSITIONS: usize = MAX_ROWS;
    pub const SEQ_LENS: usize = 2 * MAX_ROWS;
    pub const NEW_SLOTS: usize = 3 * MAX_ROWS;
    pub const TABLE_OFFSETS: usize = 4 * MAX_ROWS;
    pub const CACHE_POSITIONS: usize = 5 * MAX_ROWS;
    pub const TABLE: usize = 6 * MAX_ROWS;
}

/// The smallest bucket holding `rows`, if any.
pub fn bucket_for(rows: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|&b| b >= rows)
}

/// Whether `batch` is a decode batch a graph can serve.
pub fn is_decode(batch: &ForwardBatch) -> bool {
    batch.outputs.is_none()
        && !batch.seqs.is_empty()
        && batch.seqs.len() <= MAX_ROWS
        && batch
            .seqs
            .iter()
            .enumerate()
            .all(|(i, s)| s.len == 1 && s.start == i && s.mask.is_none())
}

/// `batch` with `bucket - rows` padding sequences of one token at position
/// 0; their keys and values go to the cache's scratch page.
pub fn pad(batch: &ForwardBatch, bucket: usize, scratch_page: u32) -> ForwardBatch {
    let mut padded = batch.clone();
    for row in batch.num_tokens()..bucket {
        padded.tokens.push(0);
        padded.positions.push(0);
        padded.seqs.push(SeqChunk {
            start: row,
            len: 1,
            first_pos: 0,
            pages: vec![scratch_page],
            state: 0,
            mask: None,
        });
    }
    padded
}

/// Where the ops of a staged pass read their batch inputs: addresses
/// inside the staging buffer (passed to kernels as plain pointers), valid
/// while the buffer lives — it is only replaced between passes. A fed
/// pass with the argmax in its graph reads its tokens from the greedy
/// tail buffer instead (`greedy.rs`).
#[derive(Clone, Copy)]
pub struct StagedInputs {
    base: CUdeviceptr,
    tokens: CUdeviceptr,
}

impl StagedInputs {
    pub fn new(buffer: &CudaSlice<i32>) -> Self {
        let base = address(buffer);
        StagedInputs {
            base,
            tokens: base + (at::TOKENS * std::mem::size_of::<i32>()) as u64,
        }
    }
    /// These inputs with the tokens read at `tokens` instead.
    pub fn with_tokens_at(self, tokens: CUdeviceptr) -> Self {
        StagedInputs { tokens, ..self }
    }
    fn at(&self, offset: usize) -> CUdeviceptr {
        self.base + (offset * std::mem::size_of::<i32>()) as u64
    }
    pub fn tokens(&self) -> CUdeviceptr {
        self.tokens
    }
    pub fn rope_positions(&self) -> CUdeviceptr {
        self.at(at::ROPE_POSITIONS)
    }
    pub fn seq_lens(&self) -> CUdeviceptr {
        self.at(at::SEQ_LENS)
    }
    pub fn new_slots(&self) -> CUdeviceptr {
        self.at(at::NEW_SLOTS)
    }
    pub fn table_offsets(&self) -> CUdeviceptr {
        self.at(at::TABLE_OFFSETS)
    }
    pub fn cache_positions(&self) -> CUdeviceptr {
        self.at(at::CACHE_POSITIONS)
    }
    pub fn table(&self) -> CUdeviceptr {
        self.at(at::TABLE)
    }
}

/// The host image of a padded decode batch's inputs, laid out as
/// [`StagedInputs`] reads them.
pub fn stage_image(kv: &CudaKv, padded: &ForwardBatch, real_rows: usize) -> Result<Vec<i32>> {
    let real = ForwardBatch {
        tokens: padded.tokens[..real_rows].to_vec(),
        positions: padded.positions[..real_rows].to_vec(),
        seqs: padded.seqs[..real_rows].to_vec(),
        ..ForwardBatch::default()
    };
    let mut plan = kv.plan(&real)?;
    let scratch_entry = plan.table.len() as i32;
    plan.table.push(kv.scratch_slot() as i32);
    let mut image = vec![0i32; at::TABLE];
    let mut put = |at: usize, values: &[i32]| image[at..at + values.len()].copy_from_slice(values);
    let tokens: Vec<i32> = padded.tokens.iter().map(|&t| t as i32).collect();
    let positions: Vec<i32> = padded.positions.iter().map(|&p| p as i32).collect();
    let seq_lens: Vec<i32> = padded.seqs.iter().map(|s| s.kv_len() as i32).collect();
    put(at::TOKENS, &tokens);
    put(at::ROPE_POSITIONS, &positions);
    put(at::SEQ_LENS, &seq_lens);
    put(at::NEW_SLOTS, &plan.new_slots);
    put(at::TABLE_OFFSETS, &plan.table_offsets);
    put(at::CACHE_POSITIONS, &plan.positions);
    let pad_rows = padded.num_tokens() - real_rows;
    let pad = |v: i32| vec![v; pad_rows];
    put(at::NEW_SLOTS + real_rows, &pad(kv.scratch_slot() as i32));
    put(at::TABLE_OFFSETS + real_rows, &pad(scratch_entry));
    put(at::CACHE_POSITIONS + real_rows, &pad(0));
    image.extend_from_slice(&plan.table);
    Ok(image)
}

/// One recorded decode pass: the graph and where its logits land.
struct Recorded {
    graph: OwnedGraph,
    /// The graph's own allocation holding the logits; handed out after
    /// every replay and freed by whoever drops that activation.
    logits: CUdeviceptr,
    len: usize,
    width: usize,
    /// Held by the activation handed out; a replay waits for it to be
    /// dropped (the graph cannot run while its output is still allocated).
    lease: Arc<()>,
}

/// A graph moved between threads: CUDA allows that as long as calls on
/// it are serialized, which the driver's `Mutex<GraphCache>` does (every
/// graph lives in the cache and is only touched under its lock).
struct OwnedGraph(CudaGraph);

// SAFETY: see `OwnedGraph`: access is serialized by the cache's mutex.
unsafe impl Send for OwnedGraph {}

/// What a decode graph is recorded for: its bucket, and whether its
/// tokens are the last greedy step's ids in the tail buffer, with the
/// argmax of its own rows into that buffer as its last kernels (`fed`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct GraphKey {
    pub bucket: usize,
    pub fed: bool,
}

/// Recorded graphs per bucket, valid for one staging buffer and KV cache.
#[derive(Default)]
pub struct GraphCache {
    recorded: HashMap<GraphKey, Recorded>,
    /// Graphs whose pass ran once eagerly (the next pass records).
    warmed: HashSet<GraphKey>,
    /// Addresses the graphs were recorded against (staging buffer, KV).
    recorded_for: (u64, u64),
    /// Set when recording failed or graphs are off: run eagerly.
    pub off: bool,
    /// Replays so far (for tests and reports).
    pub replays: u64,
    /// Device time per replay (`PIE_CUDA_STEP_TIMING=1`).
    timing: Option<StepTiming>,
}

/// What a staged pass should do for its bucket.
pub enum Step {
    /// Run the ops (first pass of a bucket, or graphs off).
    Eager,
    /// Run the ops under stream capture and keep the graph.
    Record,
    /// Replay the recorded graph.
    Replay,
}

impl GraphCache {
    pub fn new() -> Self {
        GraphCache {
            off: std::env::var("PIE_CUDA_GRAPHS").is_ok_and(|v| v == "0"),
            timing: StepTiming::from_env(),
            ..Default::default()
        }
    }

    /// Drops graphs recorded against other buffers (a new KV cache or a
    /// grown staging buffer).
    pub fn check_addresses(&mut self, staging: u64, kv: u64) {
        if self.recorded_for != (staging, kv) {
            self.recorded.clear();
            self.warmed.clear();
            self.recorded_for = (staging, kv);
        }
    }

    pub fn step(&mut self, key: GraphKey) -> Step {
        match self.recorded.get(&key) {
            _ if self.off => Step::Eager,
            Some(r) if Arc::strong_count(&r.lease) == 1 => Step::Replay,
            // The last replay's logits are still held: run eagerly.
            Some(_) => Step::Eager,
            None if self.warmed.insert(key) => Step::Eager,
            None => Step::Record,
        }
    }

    /// Replays `key`'s graph and returns its logits (first `rows` rows).
    pub fn replay(
        &mut self,
        stream: &Arc<CudaStream>,
        key: GraphKey,
        rows: usize,
    ) -> Result<CudaAct> {
        self.replays += 1;
        let bucket = key.bucket;
        let start = self.timing.as_mut().map(|t| t.start(stream)).transpose()?;
        let r = &self.recorded[&key];
        r.graph
            .0
            .launch()
            .map_err(|e| DriverError::Invalid(format!("CUDA: replaying a decode graph: {e}")))?;
        if let (Some(timing), Some(start)) = (self.timing.as_mut(), start) {
            timing.finish(bucket, start, stream)?;
        }
        // SAFETY: `logits` is the graph's allocation of `len` f32, live
        // from this launch until the returned activation is dropped.
        let data = unsafe { stream.upgrade_device_ptr::<f32>(r.logits, r.len) };
        Ok(CudaAct {
            data,
            rows,
            width: r.width,
            lease: Some(r.lease.clone()),
            bf16: None,
        })
    }

    /// Records `pass` as `key`'s graph. On failure, graphs are turned
    /// off and the error says why (the caller then runs eagerly).
    pub fn record(
        &mut self,
        stream: &Arc<CudaStream>,
        key: GraphKey,
        pass: impl FnOnce() -> Result<CudaAct>,
    ) -> Result<()> {
        let capture_err = |e: cudarc::driver::DriverError| {
            DriverError::Invalid(format!("CUDA graph capture: {e}"))
        };
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(capture_err)?;
        let out = pass();
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        let (out, graph) = match (out, graph) {
            (Ok(out), Ok(Some(graph))) => (out, graph),
            (Err(e), _) => {
                self.off = true;
                return Err(e);
            }
            (_, Err(e)) => {
                self.off = true;
                return Err(capture_err(e));
            }
            (_, Ok(None)) => {
                self.off = true;
                return Err(DriverError::Invalid(
                    "CUDA graph capture recorded nothing".into(),
                ));
            }
        };
        let (len, width) = (out.data.len(), out.width);
        self.recorded.insert(
            key,
            Recorded {
                graph: OwnedGraph(graph),
                logits: out.data.leak(),
                len,
                width,
                lease: Arc::new(()),
            },
        );
        Ok(())
    }
}

/// The staging buffer, grown (never shrunk) to hold `image`, with the
/// image copied in.
pub fn upload_image(
    stream: &Arc<CudaStream>,
    buffer: &mut Option<CudaSlice<i32>>,
    image: &[i32],
) -> Result<()> {
    let err = |e: cudarc::driver::DriverError| {
        DriverError::Invalid(format!("CUDA: staging decode inputs: {e}"))
    };
    if buffer.as_ref().is_none_or(|b| b.len() < image.len()) {
        let len = image.len().next_power_of_two().max(at::TABLE + 4096);
        *buffer = Some(stream.alloc_zeros::<i32>(len).map_err(err)?);
    }
    let buf = buffer.as_mut().expect("allocated above");
    stream
        .memcpy_htod(image, &mut buf.slice_mut(0..image.len()))
        .map_err(err)
}

/// The device address of `buffer`.
pub fn address<T>(buffer: &CudaSlice<T>) -> CUdeviceptr {
    use cudarc::driver::DevicePtr;
    let (ptr, _guard) = buffer.device_ptr(buffer.stream());
    ptr
}

/// A model's forward pass over a batch, as the engine hands it over.
pub type Pass<'p> = pie_driver::Pass<'p, CudaDriver>;

impl CudaDriver {
    /// Runs `pass` over `batch`: decode batches through a recorded graph
    /// (after one eager pass and one recording per bucket), the rest
    /// directly.
    pub(crate) fn decode_pass(
        &self,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
        pass: &mut Pass<'_>,
    ) -> Result<CudaAct> {
        self.clear_tail_ready();
        // The first pass shows whether the model runs composite ops.
        let after_first = self.passes_run.swap(true, Ordering::Relaxed);
        let recordable = after_first
            && !self.composite_seen.load(Ordering::Relaxed)
            && !kv.has_states()
            && is_decode(batch);
        let bucket = bucket_for(batch.num_tokens()).filter(|_| recordable);
        let mut cache = self.graphs.lock().expect("graph cache lock");
        let Some(bucket) = bucket.filter(|_| !cache.off) else {
            if batch.fed_tokens {
                return pass(kv, &self.with_fed_tokens(batch)?);
            }
            return pass(kv, batch);
        };
        let padded = pad(batch, bucket, kv.scratch_page());
        let image = stage_image(kv, &padded, batch.num_tokens())?;
        let mut staged = {
            let mut staging = self.staging.lock().expect("staging lock");
            upload_image(&self.stream, &mut staging, &image)?;
            StagedInputs::new(staging.as_ref().expect("uploaded above"))
        };
        let key = GraphKey {
            bucket,
            fed: batch.fed_tokens && self.graph_argmax,
        };
        if key.fed {
            staged = staged.with_tokens_at(self.tail_address(bucket)?);
        }
        if batch.fed_tokens {
            self.feed_staged_tokens(staged.tokens(), batch)?;
        }
        cache.check_addresses(staged.base, kv.identity());
        *self.staged.lock().expect("staged lock") = Some(staged);
        let result = self.staged_step(&mut cache, kv, &padded, key, batch.num_tokens(), pass);
        *self.staged.lock().expect("staged lock") = None;
        result
    }

    /// One staged pass of `padded` (a bucket's rows): eager, recorded or
    /// replayed; the logits of the first `rows` rows come back. A fed
    /// pass ends with the argmax of its rows into the tail buffer.
    fn staged_step(
        &self,
        cache: &mut GraphCache,
        kv: &mut CudaKv,
        padded: &ForwardBatch,
        key: GraphKey,
        rows: usize,
        pass: &mut Pass<'_>,
    ) -> Result<CudaAct> {
        let first_rows = |mut out: CudaAct| {
            out.rows = rows;
            out
        };
        let mut run = || {
            let out = pass(kv, padded)?;
            if key.fed {
                self.argmax_into_tail(&out, rows)?;
            }
            Ok(out)
        };
        let replay = |cache: &mut GraphCache| {
            let out = cache.replay(&self.stream, key, rows)?;
            if key.fed {
                self.set_tail_ready(&out, rows);
            }
            Ok(out)
        };
        match cache.step(key) {
            Step::Replay => replay(cache),
            Step::Eager => run().map(first_rows),
            Step::Record => match cache.record(&self.stream, key, &mut run) {
                Ok(()) => replay(cache),
                Err(e) => {
                    eprintln!("warning: CUDA graphs off, decode runs op by op: {e}");
                    self.clear_tail_ready();
                    run().map(first_rows)
                }
            },
        }
    }
}
