//! Greedy sampling on the GPU: the argmax of each requested row of logits
//! and its log-probability (`kernels/cuda/attention.cu`, `pie_greedy_*`).
//!
//! It runs after every decode step, so its host side is kept to two
//! launches and one copy back: the row indices of a whole batch (0, 1, ..,
//! n - 1, the usual request) come from a device buffer kept for that, and
//! ids and log-probabilities share one buffer. Each copy between pageable
//! host memory and the GPU waits for the whole stream: an upload of the
//! indices after the decode graph left the GPU idle while the host then
//! launched the kernels, and a second copy back cost a second round trip.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pie_driver::{DriverError, Result};

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
}

impl CudaDriver {
    /// The argmax of each of `rows` of `x` and its log-probability.
    pub(crate) fn greedy(&self, x: &CudaAct, rows: &[usize]) -> Result<Vec<(u32, f32)>> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(DriverError::Invalid(format!(
                "row {bad} requested from an activation of {} rows",
                x.rows
            )));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
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
        // ids in [0, n), log-probabilities (f32 bits) in [n, 2n).
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
        let back = self
            .stream
            .clone_dtoh(&out)
            .map_err(cuda_err("copying token ids to the host"))?;
        Ok((0..n)
            .map(|i| (back[i], f32::from_bits(back[n + i])))
            .collect())
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
