//! A pre-norm block's MLP half at batch 1 in one launch
//! (`Driver::add_norm_mlp`, `pie_mlp_fold_bf16_m1` in
//! `kernels/cuda/fused.cu`): the residual add, the norm, gate/up with the
//! GLU and the down projection added into the residual, where the
//! unfused path takes two launches (the GLU GEMV with the add and norm
//! folded in, then the down GEMV adding into the residual).
//!
//! Each block computes 16 GLU features and adds their share of the down
//! projection into every output with atomics, so the result's last bits
//! vary from run to run. The blocks wait for each other once (every block
//! must have read the residual before any adds into it), so a launch may
//! have no more blocks than the GPU runs at once.
//!
//! Off by default: measured on an H200 (Qwen3-0.6B, batch 1), the first
//! form (down matrix read as stored, launched without overlap) took
//! 0.990 ms a step against 0.832 for the two launches. Two changes made
//! since have not run on a GPU yet: the kernels now overlap the kernel
//! before them (programmatic dependent launch), and the default form
//! reads a transposed copy of each down matrix, made on its first use
//! (`pie_transpose_bf16`; the matrix's size again in GPU memory), where a
//! block's weights are one contiguous range it copies to shared memory
//! while the gate/up rows load (the stored form reads 32 scattered bytes
//! per row). `PIE_CUDA_MLP_FOLD=1` turns the transposed form on,
//! `PIE_CUDA_MLP_FOLD=rows` the stored one (`bench/gpu/qwen3_decode_ab.sh`
//! runs the A/B).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use cudarc::driver::sys::{CUdevice_attribute, CUstreamCaptureStatus};
use cudarc::driver::{CudaContext, CudaSlice, LaunchConfig};
use pie_driver::ir::{GluAttrs, LinearAttrs};
use pie_driver::{PreNorm, Result};

use crate::device::Kernels;
use crate::gemm::gemv_grid;
use crate::{cuda_err, graphs, int, weight_or_null, Bf16Matrix, CudaAct, CudaDriver, CudaWeight};

/// GLU features per block (`PIE_MLP_FEATS`).
const FEATS: usize = 16;
/// The widest row one launch normalizes: one chunk of 8 features for
/// each of a block's 128 threads.
const MAX_WIDTH: usize = 128 * 8;
/// Threads per block (`PIE_GEMV_THREADS`).
const THREADS: u32 = 128;

/// What the fold keeps between calls.
pub(crate) struct MlpFold {
    /// `PIE_CUDA_MLP_FOLD=1` or `rows`: on (off by default: two
    /// launches).
    pub(crate) on: bool,
    /// Whether the kernel reads transposed down matrices
    /// (`PIE_CUDA_MLP_FOLD=rows`: as stored).
    transposed: AtomicBool,
    /// The transposed copy of each down matrix, by its address.
    copies: Mutex<HashMap<u64, CudaSlice<u16>>>,
    /// The most blocks one launch may have (all resident at once, or the
    /// blocks waiting for the others never end), of the stored form and
    /// of the transposed one.
    max_blocks: [usize; 2],
    /// The blocks' arrival counter, one per grid size (a counter only
    /// grows; each launch waits for the next multiple of its grid size).
    arrivals: Mutex<HashMap<usize, CudaSlice<u64>>>,
    /// Launches so far (for tests).
    launches: AtomicU64,
}

impl MlpFold {
    pub(crate) fn new(ctx: &CudaContext, kernels: &Kernels) -> Result<Self> {
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("reading the multiprocessor count"))?;
        let setting = std::env::var("PIE_CUDA_MLP_FOLD").unwrap_or_default();
        // What each compiled kernel fits per SM (its registers and shared
        // memory), not what its launch bounds ask for.
        let resident = |transposed: bool| -> Result<usize> {
            let per_sm = kernels
                .get(kernel_name(transposed))
                .occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)
                .map_err(cuda_err("reading the MLP fold's occupancy"))?;
            Ok(sms.max(0) as usize * per_sm as usize)
        };
        Ok(MlpFold {
            on: setting == "1" || setting == "rows",
            transposed: AtomicBool::new(setting != "rows"),
            copies: Mutex::new(HashMap::new()),
            max_blocks: [resident(false)?, resident(true)?],
            arrivals: Mutex::new(HashMap::new()),
            launches: AtomicU64::new(0),
        })
    }
}

/// The kernel of the form that reads the down matrix transposed, or as
/// stored.
fn kernel_name(transposed: bool) -> &'static str {
    if transposed {
        "pie_mlp_fold_t_bf16_m1"
    } else {
        "pie_mlp_fold_bf16_m1"
    }
}

/// A bias-free bf16 matrix of `[rows, cols]`, or None.
fn plain_matrix<'w>(
    (w, bias, a): (&'w CudaWeight, Option<&CudaWeight>, &LinearAttrs),
    rows: usize,
    cols: usize,
) -> Option<&'w Bf16Matrix> {
    match (w, bias) {
        (CudaWeight::Bf16(m), None) if a.out_features == rows && a.in_features == cols => Some(m),
        _ => None,
    }
}

impl CudaDriver {
    /// `x + y + down(glu(gate(h), up(h)))` with `h = rms_norm(x + y)`, in
    /// `y`'s memory, in one launch; `Err(y)` where the kernel does not
    /// apply (more than one row, f32 weights, biases, other shapes).
    #[allow(clippy::too_many_arguments)] // the ops' own operands, one each
    pub(crate) fn fused_add_norm_mlp(
        &self,
        x: &CudaAct,
        mut y: CudaAct,
        norm: PreNorm<'_, Self>,
        gate: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        up: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        glu: &GluAttrs,
        down: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
    ) -> Result<std::result::Result<CudaAct, CudaAct>> {
        let (k, n) = (x.width, glu.width);
        let transposed = self.mlp_fold.transposed.load(Ordering::Relaxed);
        let shapes = x.rows == 1
            && y.rows == 1
            && y.width == k
            && k <= MAX_WIDTH
            && k.is_multiple_of(8)
            && n.is_multiple_of(FEATS)
            && norm.1.width == k
            && norm.1.group == k
            && n / FEATS <= self.mlp_fold.max_blocks[usize::from(transposed)];
        let weights = (
            plain_matrix(gate, n, k),
            plain_matrix(up, n, k),
            plain_matrix(down, k, n),
        );
        let (Some(wg), Some(wu), Some(wd)) = weights else {
            return Ok(Err(y));
        };
        if !(self.fuse && self.mlp_fold.on && shapes) {
            return Ok(Err(y));
        }
        let blocks = n / FEATS;
        // What a first call makes (a counter, a transposed copy) cannot be
        // made while a graph is being recorded: two launches there (never
        // in practice: the first pass of every decode bucket runs eagerly).
        let recording = self
            .stream
            .capture_status()
            .map_err(cuda_err("reading the stream's capture status"))?
            != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let mut counters = self
            .mlp_fold
            .arrivals
            .lock()
            .expect("arrival counters lock");
        let arrivals = match counters.entry(blocks) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(_) if recording => return Ok(Err(y)),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                self.stream
                    .alloc_zeros::<u64>(1)
                    .map_err(cuda_err("allocating the MLP fold's counter"))?,
            ),
        };
        let kernel = kernel_name(transposed);
        let wd = if transposed {
            let Some(copy) = self.transposed_copy(wd, k, n, recording)? else {
                return Ok(Err(y));
            };
            copy
        } else {
            wd.ptr
        };
        let ((g, has_g), nm) = (weight_or_null(norm.0), norm.1);
        let (ni, ki) = (int(n, "features")?, int(k, "width")?);
        let (func, limit) = (glu.func.kernel_code(), glu.limit.unwrap_or(0.0));
        // y is accumulated into: its bf16 copy would go stale.
        y.bf16 = None;
        let cfg = gemv_grid(blocks);
        // SAFETY: the arguments match `pie_mlp_fold_bf16_m1`; the shapes
        // were checked above (one row of k ≤ 1024 features, n % 16 == 0,
        // [n, k] gate/up and [k, n] down matrices).
        unsafe {
            self.launch(kernel)
                .buf(&y.data)
                .buf(&x.data)
                .arg(&g)
                .arg(&has_g)
                .arg(&nm.eps)
                .arg(&nm.offset)
                .arg(&wg.ptr)
                .arg(&wu.ptr)
                .arg(&wd)
                .arg(&ni)
                .arg(&ki)
                .arg(&func)
                .arg(&limit)
                .buf(arrivals)
                .launch(cfg)?;
        }
        self.mlp_fold.launches.fetch_add(1, Ordering::Relaxed);
        Ok(Ok(y))
    }

    /// The device address of `w` ([rows, cols]) transposed, made on the
    /// first call for `w`; None while a graph is being `recording` and
    /// there is no copy yet.
    fn transposed_copy(
        &self,
        w: &Bf16Matrix,
        rows: usize,
        cols: usize,
        recording: bool,
    ) -> Result<Option<u64>> {
        let mut copies = self.mlp_fold.copies.lock().expect("transposed copies lock");
        if let Some(copy) = copies.get(&w.ptr) {
            return Ok(Some(graphs::address(copy)));
        }
        if recording {
            return Ok(None);
        }
        let copy = unsafe { self.stream.alloc::<u16>(rows * cols) }.map_err(cuda_err(
            "allocating a transposed down matrix (out of memory?)",
        ))?;
        let (r, c) = (int(rows, "rows")?, int(cols, "columns")?);
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `copy` holds rows · cols values, `w` as many.
        unsafe {
            self.launch("pie_transpose_bf16")
                .buf(&copy)
                .arg(&w.ptr)
                .arg(&r)
                .arg(&c)
                .launch(cfg)?;
        }
        // The fold copies its tile before it waits for the kernel before
        // it (PDL): the copy must be complete before the first fold starts.
        self.stream
            .synchronize()
            .map_err(cuda_err("transposing a down matrix"))?;
        let address = graphs::address(&copy);
        copies.insert(w.ptr, copy);
        Ok(Some(address))
    }

    /// How many MLP halves ran as one launch (recorded ones count once).
    pub fn mlp_folds(&self) -> u64 {
        self.mlp_fold.launches.load(Ordering::Relaxed)
    }

    /// Whether the one-launch MLP reads a transposed copy of each down
    /// matrix (the default) or the matrix as stored (for tests and A/B
    /// runs; `PIE_CUDA_MLP_FOLD=rows` at start).
    pub fn set_mlp_fold_transposed(&self, transposed: bool) {
        self.mlp_fold
            .transposed
            .store(transposed, Ordering::Relaxed);
    }

    /// This driver with the one-launch MLP on or off (off by default,
    /// unless `PIE_CUDA_MLP_FOLD=1` or `rows`).
    pub fn with_mlp_fold(mut self, on: bool) -> Self {
        self.mlp_fold.on = on;
        self
    }
}
