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
//! (`ForwardBatch::fed_tokens`: `graphs.rs` copies them over the staged
//! tokens) and copies them into page-locked host memory without waiting,
//! so the engine can queue that pass before it reads them.

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, LaunchConfig, PinnedHostSlice, PushKernelArg};
use pie_driver::{DriverError, ForwardBatch, PendingIds, Result};

use crate::{cuda_err, int, CudaAct, CudaDriver};

const GREEDY_THREADS: u32 = 256;
/// Logits per block of the first pass: a large vocabulary is read by many
/// blocks at once (one block per row waits on memory latency).
const GREEDY_SLICE: usize = 2048;

/// Buffers greedy sampling keeps between calls.
#[derive(Default)]
pub(crate) struct GreedyBuffers {
    /// 0, 1, 2, ...: the row indices of a request for a whole batch.
    identity: Option<CudaSlice<i32>>,
    /// The ids of the last `argmax_start` (its first `rows` values).
    fed: Option<(CudaSlice<u32>, usize)>,
    /// Page-locked host buffers the ids of `argmax_start` come back to,
    /// returned here once read (one per step in flight).
    host: Arc<Mutex<Vec<HostIds>>>,
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
        let Some(out) = self.launch_greedy(x, rows)? else {
            return Ok(PendingIds::ready(Vec::new()));
        };
        let mut buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        let pool = buffers.host.clone();
        let mut host = self.host_ids(&pool, n)?;
        self.stream
            .memcpy_dtoh(&out.slice(0..n), &mut host.ids)
            .map_err(cuda_err("copying token ids to the host"))?;
        host.copied
            .record(&self.stream)
            .map_err(cuda_err("recording the token ids' copy"))?;
        buffers.fed = Some((out, n));
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

    /// Row i's token := id i of the last `argmax_start`, over the staged
    /// tokens at `tokens` (a device address), queued on the stream.
    pub(crate) fn feed_staged_tokens(&self, tokens: u64, batch: &ForwardBatch) -> Result<()> {
        let buffers = self.greedy_buffers.lock().expect("greedy buffers lock");
        let ids = fed_ids(&buffers, batch)?;
        let rows = batch.num_tokens();
        let from = crate::graphs::address(ids);
        // SAFETY: both ranges hold `rows` 4-byte values on this stream's
        // device; the copy is ordered after the kernels that wrote `ids`.
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
        let ids = fed_ids(&buffers, batch)?;
        let rows = batch.num_tokens();
        let tokens = self
            .stream
            .clone_dtoh(&ids.slice(0..rows))
            .map_err(cuda_err("copying token ids to the host"))?;
        Ok(batch.with_tokens_fed(tokens))
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
        let mut out = unsafe { self.stream.alloc::<u32>(2 * n) }
            .map_err(cuda_err("allocating GPU memory"))?;
        let width = int(x.width, "width")?;
        let slices = x.width.div_ceil(GREEDY_SLICE).clamp(1, 128);
        let mut parts = self.uninit(n * slices * 3)?;
        let launch = |grid_y: usize| LaunchConfig {
            grid_dim: (n as u32, grid_y as u32, 1),
            block_dim: (GREEDY_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_greedy_partial"));
        b.arg(&mut parts).arg(&x.data).arg(idx).arg(&width);
        unsafe { b.launch(launch(slices)) }.map_err(cuda_err("pie_greedy_partial"))?;
        let slices = slices as i32;
        let (mut ids, mut logprobs) = out.split_at_mut(n);
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_greedy_finish"));
        b.arg(&mut ids).arg(&mut logprobs).arg(&parts).arg(&slices);
        unsafe { b.launch(launch(1)) }.map_err(cuda_err("pie_greedy_finish"))?;
        Ok(Some(out))
    }

    /// The device buffer 0, 1, .., n - 1 (grown to a power of two).
    fn identity_rows<'b>(
        &self,
        buffers: &'b mut GreedyBuffers,
        n: usize,
    ) -> Result<&'b CudaSlice<i32>> {
        if buffers.identity.as_ref().is_none_or(|b| b.len() < n) {
            let len = n.next_power_of_two().max(256);
            let values: Vec<i32> = (0..len as i32).collect();
            buffers.identity = Some(self.upload(&values)?);
        }
        Ok(buffers.identity.as_ref().expect("set above"))
    }
}

/// The ids of the last `argmax_start`, if they cover `batch` row for row.
fn fed_ids<'b>(buffers: &'b GreedyBuffers, batch: &ForwardBatch) -> Result<&'b CudaSlice<u32>> {
    batch.check_fed(buffers.fed.as_ref().map(|(_, n)| *n))?;
    Ok(&buffers.fed.as_ref().expect("checked above").0)
}
