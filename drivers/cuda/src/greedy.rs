//! Greedy sampling on the GPU: the argmax of each requested row of logits
//! and its log-probability (`kernels/cuda/attention.cu`, `pie_greedy_*`).
//!
//! It runs after every decode step, so its host side is kept to two
//! launches and one copy back: the row indices of a whole batch (0, 1, ..,
//! n - 1, the usual request) come from a device buffer kept for that, and
//! ids and log-probabilities share one buffer (a copy to pageable host
//! memory returns only when the stream has reached it: two copies cost two
//! round trips).
//!
//! `argmax_start` leaves the ids on the device for the next decode pass
//! (`ForwardBatch::fed_tokens`) and copies them into page-locked host
//! memory without waiting, so the engine can queue that pass before it
//! reads them.
//!
//! A fed decode pass replayed from a CUDA graph does better still: its
//! graph reads its tokens from a fixed buffer (the *tail*) and ends with
//! the argmax of every row into that same buffer (`graphs.rs`), so the
//! next `argmax_start` over its logits launches nothing — it only copies
//! the ids back — and the pass after it reads them where they are. That
//! takes two launches and a device-to-device copy per step off the
//! stream (`PIE_CUDA_GRAPH_ARGMAX=0` turns it off, for A/B runs).

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, LaunchConfig, PinnedHostSlice};
use pie_driver::{DriverError, ForwardBatch, PendingIds, Result};

use crate::{cuda_err, graphs, int, CudaAct, CudaDriver};

const GREEDY_THREADS: u32 = 256;
/// Logits per block of the first pass: a large vocabulary is read by many
/// blocks at once (one block per row waits on memory latency).
const GREEDY_SLICE: usize = 2048;

/// Buffers greedy sampling keeps between calls.
#[derive(Default)]
pub(crate) struct GreedyBuffers {
    /// 0, 1, .., MAX_ROWS - 1: the row indices of a request for a whole
    /// batch. Allocated once: fed decode graphs hold its address.
    identity: Option<CudaSlice<i32>>,
    /// The same for requests of more than `MAX_ROWS` rows (never part of
    /// a graph), grown as needed.
    wide_identity: Option<CudaSlice<i32>>,
    /// Where the ids of the last `argmax_start` are.
    fed: Option<Fed>,
    /// The tail buffer: ids (first `MAX_ROWS` values), then their
    /// log-probabilities (f32 bits), written by the argmax at the end of
    /// a fed decode graph. Allocated once: graphs hold its address.
    tail: Option<CudaSlice<u32>>,
    /// Set by a fed staged pass that ended with the argmax into the tail:
    /// the address of its logits and its rows (cleared by the next pass).
    tail_ready: Option<(u64, usize)>,
    /// `argmax_start` calls the tail answered (for tests).
    pub(crate) tail_reads: u64,
    /// Page-locked host buffers the ids of `argmax_start` come back to,
    /// returned here once read (one per step in flight).
    host: Arc<Mutex<Vec<HostIds>>>,
}

/// Where the ids of the last `argmax_start` are on the device.
enum Fed {
    /// The first `n` values of a buffer the greedy kernels wrote.
    Launched(CudaSlice<u32>, usize),
    /// The first `n` values of the tail buffer.
    Tail(usize),
}

impl Fed {
    fn rows(&self) -> usize {
        match self {
            Fed::Launched(_, n) | Fed::Tail(n) => *n,
        }
    }
}

/// A page-locked host buffer and the event recorded after the copy into it
/// (its own: `PinnedHostSlice` records one only when the context tracks
/// events for several streams, and this driver has one stream).
struct HostIds {
    ids: PinnedHostSlice<u32>,
    copied: CudaEvent,
}

impl Drop for HostIds {
    /// Waits for the copy before the memory is freed (a step whose ids
    /// are never waited for: an error ended the generation).
    fn drop(&mut self) {
        let _ = self.copied.synchronize();
    }
}

impl CudaDriver {
    /// The argmax of each of `rows` of `x` and its log-probability.
    pub(crate) fn greedy(&self, x: &CudaAct, rows: &[usize]) -> Result<Vec<(u32, f32)>> {
        let n = rows.len();
        let Some(out) = self.launch_greedy(x, rows)? else {
            return Ok(Vec::new());
        };
        let back = self
            .stream
            .clone_dtoh(&out)
            .map_err(cuda_err("copying token ids to the host"))?;
        Ok((0..n)
            .map(|i| (back[i], f32::from_bits(back[n + i])))
            .collect())
    }

    /// The argmax of each of `rows` of `x`, on its way to the host; the
    /// ids stay on the device for a next pass with `fed_tokens`.
    pub(crate) fn greedy_start(&self, x: &CudaAct, rows: &[usize]) -> Result<PendingIds> {
        let n = rows.len();
        let mut buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        let from_tail = !rows.is_empty()
            && n <= x.rows
            && buffers.tail_ready == Some((graphs::address(&x.data), x.rows))
            && rows.iter().enumerate().all(|(i, &r)| i == r);
        let fed = if from_tail {
            buffers.tail_reads += 1;
            Fed::Tail(n)
        } else {
            drop(buffers);
            let Some(out) = self.launch_greedy(x, rows)? else {
                return Ok(PendingIds::ready(Vec::new()));
            };
            buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
            Fed::Launched(out, n)
        };
        let pool = buffers.host.clone();
        let mut host = self.host_ids(&pool, n)?;
        let ids = match &fed {
            Fed::Launched(out, _) => out.slice(0..n),
            Fed::Tail(_) => tail(&buffers)?.slice(0..n),
        };
        self.stream
            .memcpy_dtoh(&ids, &mut host.ids)
            .map_err(cuda_err("copying token ids to the host"))?;
        host.copied
            .record(&self.stream)
            .map_err(cuda_err("recording the token ids' copy"))?;
        buffers.fed = Some(fed);
        Ok(PendingIds::later(move || {
            host.copied
                .synchronize()
                .map_err(cuda_err("waiting for the token ids"))?;
            let ids = host
                .ids
                .as_slice()
                .map_err(cuda_err("reading the token ids"))?
                .to_vec();
            pool.lock().expect("host buffer pool lock").push(host);
            Ok(ids)
        }))
    }

    /// A host buffer of exactly `n` ids from `pool`, or a new one.
    fn host_ids(&self, pool: &Mutex<Vec<HostIds>>, n: usize) -> Result<HostIds> {
        let mut pool = pool.lock().expect("host buffer pool lock");
        if let Some(i) = pool.iter().position(|h| h.ids.len() == n) {
            return Ok(pool.swap_remove(i));
        }
        // Flags 0, not write-combined: the host reads this memory.
        let ids = unsafe { self.ctx.alloc_pinned_with_flags::<u32>(n, 0) }
            .map_err(cuda_err("allocating page-locked host memory"))?;
        let copied = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(cuda_err("creating an event"))?;
        Ok(HostIds { ids, copied })
    }

    /// Row i's token := id i of the last `argmax_start`, written at
    /// `tokens` (a device address: the staged tokens, or the tail), queued
    /// on the stream; nothing to do where the ids already are there.
    pub(crate) fn feed_staged_tokens(&self, tokens: u64, batch: &ForwardBatch) -> Result<()> {
        let buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        let from = fed_address(&buffers, batch)?;
        if from == tokens {
            return Ok(());
        }
        let rows = batch.num_tokens();
        // SAFETY: both ranges hold `rows` 4-byte values on this stream's
        // device; the copy is ordered after the kernels that wrote them.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                tokens,
                from,
                rows * 4,
                self.stream.cu_stream(),
            )
        }
        .map_err(cuda_err("feeding the chosen tokens to the next step"))
    }

    /// `batch` with its fed tokens read back to the host (a pass that is
    /// not staged uploads its own tokens).
    pub(crate) fn with_fed_tokens(&self, batch: &ForwardBatch) -> Result<ForwardBatch> {
        let buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        batch.check_fed(buffers.fed.as_ref().map(Fed::rows))?;
        let rows = batch.num_tokens();
        let ids = match buffers.fed.as_ref().expect("checked above") {
            Fed::Launched(out, _) => out.slice(0..rows),
            Fed::Tail(_) => tail(&buffers)?.slice(0..rows),
        };
        let tokens = self
            .stream
            .clone_dtoh(&ids)
            .map_err(cuda_err("copying token ids to the host"))?;
        Ok(batch.with_tokens_fed(tokens))
    }

    /// The tail buffer's device address (allocated, zeroed, on first use;
    /// the identity rows of `bucket` made ready too, since a graph being
    /// recorded cannot upload them).
    pub(crate) fn tail_address(&self, bucket: usize) -> Result<u64> {
        let mut buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        self.identity_rows(&mut buffers, bucket)?;
        if buffers.tail.is_none() {
            let buffer = self
                .stream
                .alloc_zeros::<u32>(2 * graphs::MAX_ROWS)
                .map_err(cuda_err("allocating the greedy tail buffer"))?;
            buffers.tail = Some(buffer);
        }
        Ok(graphs::address(tail(&buffers)?))
    }

    /// Forgets the tail's ids as the answer to the next `argmax_start`
    /// (a new pass is about to run).
    pub(crate) fn clear_tail_ready(&self) {
        self.greedy_buffers
            .lock()
            .expect("greedy buffers lock")
            .tail_ready = None;
    }

    /// The argmax of every row of `x` (a fed staged pass's logits, all of
    /// its bucket's rows) into the tail buffer; `rows` of them are real.
    /// Part of the pass: recorded with it into its graph.
    pub(crate) fn argmax_into_tail(&self, x: &CudaAct, rows: usize) -> Result<()> {
        if x.rows > graphs::MAX_ROWS {
            return Err(DriverError::Invalid(format!(
                "an argmax into the tail of {} rows (at most {})",
                x.rows,
                graphs::MAX_ROWS
            )));
        }
        let mut buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        let idx = graphs::address(self.identity_rows(&mut buffers, x.rows)?);
        let tail = graphs::address(tail(&buffers)?);
        let logprobs = tail + (graphs::MAX_ROWS * 4) as u64;
        self.launch_greedy_kernels(x, idx, x.rows, tail, logprobs)?;
        buffers.tail_ready = Some((graphs::address(&x.data), rows));
        Ok(())
    }

    /// Marks `x` (the logits handed out by a replay of a fed graph) as
    /// argmaxed into the tail, `rows` of them real.
    pub(crate) fn set_tail_ready(&self, x: &CudaAct, rows: usize) {
        let mut buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        buffers.tail_ready = Some((graphs::address(&x.data), rows));
    }

    /// How many `argmax_start` calls the ids an argmax at the end of a
    /// decode graph answered (no launch of their own).
    pub fn graph_argmaxes(&self) -> u64 {
        self.greedy_buffers
            .lock()
            .expect("greedy buffers lock")
            .tail_reads
    }

    /// Launches the greedy kernels over `rows` of `x`: a device buffer of
    /// the ids (first `rows.len()` values), then their log-probabilities
    /// (f32 bits); None for no rows.
    fn launch_greedy(&self, x: &CudaAct, rows: &[usize]) -> Result<Option<CudaSlice<u32>>> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(DriverError::Invalid(format!(
                "row {bad} requested from an activation of {} rows",
                x.rows
            )));
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let n = rows.len();
        let mut buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        let uploaded;
        let idx = if rows.iter().enumerate().all(|(i, &r)| i == r) {
            self.identity_rows(&mut buffers, n)?
        } else {
            let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
            uploaded = self.upload(&idx)?;
            &uploaded
        };
        let idx = graphs::address(idx);
        let out = unsafe { self.stream.alloc::<u32>(2 * n) }
            .map_err(cuda_err("allocating GPU memory"))?;
        let ids = graphs::address(&out);
        self.launch_greedy_kernels(x, idx, n, ids, ids + (n * 4) as u64)?;
        Ok(Some(out))
    }

    /// The two greedy kernels over the `n` rows of `x` listed at `idx`
    /// (device addresses here on): ids to `ids`, log-probabilities (f32)
    /// to `logprobs`.
    fn launch_greedy_kernels(
        &self,
        x: &CudaAct,
        idx: u64,
        n: usize,
        ids: u64,
        logprobs: u64,
    ) -> Result<()> {
        let width = int(x.width, "width")?;
        let slices = x.width.div_ceil(GREEDY_SLICE).clamp(1, 128);
        let parts = self.uninit(n * slices * 3)?;
        let launch = |grid_y: usize| LaunchConfig {
            grid_dim: (n as u32, grid_y as u32, 1),
            block_dim: (GREEDY_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // Both launched to overlap the kernel before (launch.rs): the
        // first starts while the logits are being written.
        // SAFETY: the arguments match the kernels' signatures; `parts`
        // holds n · slices parts, `ids` and `logprobs` n values each.
        unsafe {
            self.launch("pie_greedy_partial")
                .buf(&parts)
                .buf(&x.data)
                .arg(&idx)
                .arg(&width)
                .launch(launch(slices))?;
            let slices = slices as i32;
            self.launch("pie_greedy_finish")
                .arg(&ids)
                .arg(&logprobs)
                .buf(&parts)
                .arg(&slices)
                .launch(launch(1))
        }
    }

    /// A device buffer starting 0, 1, .., n - 1. Up to `MAX_ROWS` rows it
    /// is the one allocated once (recorded graphs keep its address);
    /// beyond, one grown to a power of two.
    fn identity_rows<'b>(
        &self,
        buffers: &'b mut GreedyBuffers,
        n: usize,
    ) -> Result<&'b CudaSlice<i32>> {
        let (slot, len) = if n <= graphs::MAX_ROWS {
            (&mut buffers.identity, graphs::MAX_ROWS)
        } else {
            (&mut buffers.wide_identity, n.next_power_of_two())
        };
        if slot.as_ref().is_none_or(|b| b.len() < n) {
            let values: Vec<i32> = (0..len as i32).collect();
            *slot = Some(self.upload(&values)?);
        }
        Ok(slot.as_ref().expect("set above"))
    }
}

/// The device address of the ids of the last `argmax_start`, if they
/// cover `batch` row for row.
fn fed_address(buffers: &GreedyBuffers, batch: &ForwardBatch) -> Result<u64> {
    batch.check_fed(buffers.fed.as_ref().map(Fed::rows))?;
    match buffers.fed.as_ref().expect("checked above") {
        Fed::Launched(out, _) => Ok(graphs::address(out)),
        Fed::Tail(_) => Ok(graphs::address(tail(buffers)?)),
    }
}

/// The tail buffer (allocated by the pass that wrote it).
fn tail(buffers: &GreedyBuffers) -> Result<&CudaSlice<u32>> {
    buffers
        .tail
        .as_ref()
        .ok_or_else(|| DriverError::Invalid("the greedy tail buffer was never allocated".into()))
}
