//! Measured cuBLASLt algorithms for the decode-sized GEMMs.
//!
//! `cublasGemmEx` runs cuBLAS's first heuristic guess. For decode shapes (a
//! graph bucket's rows against a whole weight matrix) that guess reads the
//! weights well below the bandwidth: ncu on an H100 (Qwen3-8B batch 64,
//! 2026-12-05) had the four GEMMs of a layer at 1.9–2.6 TB/s of 3.35. So
//! the first time a GEMM of a bucket's row count (a power of two of 8 to
//! 256 rows) runs outside graph capture, the first [`CANDIDATES`]
//! algorithms cuBLASLt proposes for the shape, and `GemmEx` itself, are
//! each timed over a few runs — every run after the L2 cache is flushed,
//! since within a step the weights come from memory — and the fastest is
//! kept for the shape; graphs recorded later hold it. An algorithm must
//! beat `GemmEx` by [`MARGIN`] to be taken, so timing noise cannot make
//! a shape slower. `PIE_CUDA_GEMM_TUNE=0` keeps `GemmEx` for every shape;
//! `PIE_CUDA_GEMM_TUNE=report` prints each shape's timings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};
use cudarc::driver::CudaSlice;
use pie_driver::{DriverError, Result};

use crate::{cuda_err, graphs, CudaDriver};

/// Heuristic algorithms timed per shape.
const CANDIDATES: usize = 12;
/// Timed runs per algorithm (after one untimed run).
const RUNS: usize = 3;
/// The fraction of `GemmEx`'s time an algorithm must beat.
const MARGIN: f32 = 0.97;

/// One GEMM shape: `[m, k] · [n, k]ᵀ` into f32, added into the output
/// (`accumulate`) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub accumulate: bool,
}

impl GemmShape {
    /// Whether the shape is tuned: decode-sized row counts only, so the
    /// shapes (and the time spent timing them) stay few.
    fn tunable(&self) -> bool {
        self.m.is_power_of_two() && (8..=graphs::MAX_ROWS).contains(&self.m)
    }
}

/// The cuBLASLt handle and the algorithm chosen for each shape seen.
pub(crate) struct GemmTuning {
    handle: Option<LtHandle>,
    report: bool,
    /// The fraction of `GemmEx`'s time a cuBLASLt algorithm must beat
    /// ([`MARGIN`]; infinite in tests that must run cuBLASLt).
    margin: f32,
    /// Per shape: the cuBLASLt plan that won, or None (`GemmEx` won).
    plans: Mutex<HashMap<GemmShape, Option<Arc<LtPlan>>>>,
    /// Shapes that run a cuBLASLt plan (for tests).
    taken: AtomicU64,
}

impl GemmTuning {
    /// On unless `PIE_CUDA_GEMM_TUNE=0` or cuBLASLt cannot be loaded.
    pub(crate) fn from_env() -> Result<Self> {
        let mode = std::env::var("PIE_CUDA_GEMM_TUNE").unwrap_or_default();
        Self::new(mode != "0", mode == "report")
    }

    pub(crate) fn new(on: bool, report: bool) -> Result<Self> {
        let handle = if on && unsafe { lt::is_culib_present() } {
            Some(LtHandle::new()?)
        } else {
            None
        };
        Ok(GemmTuning {
            handle,
            report,
            margin: MARGIN,
            plans: Mutex::new(HashMap::new()),
            taken: AtomicU64::new(0),
        })
    }
}

struct LtHandle(lt::cublasLtHandle_t);

// The handle is only used on the driver's stream, through calls cuBLASLt
// documents as thread-safe for distinct descriptors.
unsafe impl Send for LtHandle {}
unsafe impl Sync for LtHandle {}

impl LtHandle {
    fn new() -> Result<Self> {
        let mut h = std::ptr::null_mut();
        lt_ok(unsafe { lt::cublasLtCreate(&mut h) }, "creating the handle")?;
        Ok(LtHandle(h))
    }
}

impl Drop for LtHandle {
    fn drop(&mut self) {
        unsafe { lt::cublasLtDestroy(self.0) };
    }
}

fn lt_ok(status: lt::cublasStatus_t, what: &str) -> Result<()> {
    if status == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(DriverError::Invalid(format!(
            "cuBLASLt: {what}: {status:?}"
        )))
    }
}

/// A shape's descriptors (weights `A` transposed, bf16 inputs, f32
/// output, f32 compute) and the algorithm that won its timing.
pub(crate) struct LtPlan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
    workspace: usize,
    /// The operands' alignments its algorithm was chosen for
    /// ([`GemmOperands::alignments`]): cuBLASLt's candidates may assume
    /// as much of every later call.
    alignments: [u32; 3],
}

// Descriptors are written once, when made, and only read after.
unsafe impl Send for LtPlan {}
unsafe impl Sync for LtPlan {}

impl Drop for LtPlan {
    fn drop(&mut self) {
        unsafe {
            lt::cublasLtMatmulDescDestroy(self.desc);
            for l in [self.a, self.b, self.c]
                .into_iter()
                .filter(|l| !l.is_null())
            {
                lt::cublasLtMatrixLayoutDestroy(l);
            }
        }
    }
}

impl LtPlan {
    /// Descriptors for row-major `out[m, n] = x[m, k] · W[n, k]ᵀ`, which
    /// is column-major `outᵀ[n, m] = W[k, n]ᵀ · xᵀ[k, m]`.
    fn describe(s: GemmShape) -> Result<Self> {
        use lt::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
        let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
        let layout = |t, rows: u64, cols: u64| -> Result<lt::cublasLtMatrixLayout_t> {
            let mut l = std::ptr::null_mut();
            let status =
                unsafe { lt::cublasLtMatrixLayoutCreate(&mut l, t, rows, cols, rows as i64) };
            lt_ok(status, "creating a matrix layout")?;
            Ok(l)
        };
        let mut desc = std::ptr::null_mut();
        let status = unsafe {
            lt::cublasLtMatmulDescCreate(
                &mut desc,
                lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                CUDA_R_32F,
            )
        };
        lt_ok(status, "creating a matmul descriptor")?;
        let mut plan = LtPlan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
            workspace: 0,
            alignments: [256; 3],
        };
        const TRANSPOSE: i32 = 1; // CUBLAS_OP_T
        let status = unsafe {
            lt::cublasLtMatmulDescSetAttribute(
                plan.desc,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &TRANSPOSE as *const i32 as *const _,
                std::mem::size_of::<i32>(),
            )
        };
        lt_ok(status, "transposing A")?;
        plan.a = layout(CUDA_R_16BF, k, n)?;
        plan.b = layout(CUDA_R_16BF, k, m)?;
        plan.c = layout(CUDA_R_32F, n, m)?;
        Ok(plan)
    }

    /// Up to [`CANDIDATES`] algorithms cuBLASLt proposes, best guess first,
    /// each needing at most `workspace` bytes and operands aligned as
    /// this plan's `alignments`.
    fn candidates(
        &self,
        handle: &LtHandle,
        workspace: usize,
    ) -> Result<Vec<lt::cublasLtMatmulHeuristicResult_t>> {
        use lt::cublasLtMatmulPreferenceAttributes_t::{
            CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES as WORKSPACE,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES as A,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES as B,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES as C,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES as D,
        };
        let pref = Preference::new()?;
        pref.set(WORKSPACE, workspace as u64, "limiting the workspace")?;
        let [w, x, out] = self.alignments;
        for (attr, bytes) in [(A, w), (B, x), (C, out), (D, out)] {
            pref.set(attr, bytes, "stating the operands' alignment")?;
        }
        let mut found =
            vec![unsafe { std::mem::zeroed::<lt::cublasLtMatmulHeuristicResult_t>() }; CANDIDATES];
        let mut count = 0;
        let status = unsafe {
            lt::cublasLtMatmulAlgoGetHeuristic(
                handle.0,
                self.desc,
                self.a,
                self.b,
                self.c,
                self.c,
                pref.0,
                CANDIDATES as i32,
                found.as_mut_ptr(),
                &mut count,
            )
        };
        lt_ok(status, "asking for algorithms")?;
        found.truncate(count.max(0) as usize);
        found.retain(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        Ok(found)
    }
}

/// A heuristic search's preferences, destroyed when dropped.
struct Preference(lt::cublasLtMatmulPreference_t);

impl Preference {
    fn new() -> Result<Self> {
        let mut p = std::ptr::null_mut();
        let status = unsafe { lt::cublasLtMatmulPreferenceCreate(&mut p) };
        lt_ok(status, "creating a preference")?;
        Ok(Preference(p))
    }

    fn set<T: Copy>(
        &self,
        attr: lt::cublasLtMatmulPreferenceAttributes_t,
        value: T,
        what: &str,
    ) -> Result<()> {
        let status = unsafe {
            lt::cublasLtMatmulPreferenceSetAttribute(
                self.0,
                attr,
                &value as *const T as *const _,
                std::mem::size_of::<T>(),
            )
        };
        lt_ok(status, what)
    }
}

impl Drop for Preference {
    fn drop(&mut self) {
        unsafe { lt::cublasLtMatmulPreferenceDestroy(self.0) };
    }
}

/// Device addresses of one GEMM's operands: bf16 weights `[n, k]`, bf16
/// inputs `[m, k]`, f32 output `[m, n]`.
#[derive(Clone, Copy)]
pub(crate) struct GemmOperands {
    pub w: u64,
    pub x: u64,
    pub out: u64,
}

impl GemmOperands {
    /// Each address's alignment in bytes (the largest power of two that
    /// divides it, up to 256: what cuBLASLt asks about).
    fn alignments(&self) -> [u32; 3] {
        [self.w, self.x, self.out].map(|a| 1 << a.trailing_zeros().min(8))
    }

    /// Whether a plan chosen for `alignments` may run on these operands.
    fn aligned_for(&self, alignments: [u32; 3]) -> bool {
        self.alignments()
            .iter()
            .zip(alignments)
            .all(|(&have, need)| have >= need)
    }
}

impl CudaDriver {
    /// The cuBLASLt plan `shape` runs with, tuning the shape on its first
    /// call outside graph capture; None: `GemmEx` (tuning off, a shape not
    /// tuned, `GemmEx` fastest, or first seen while recording).
    pub(crate) fn gemm_plan(
        &self,
        shape: GemmShape,
        ops: GemmOperands,
    ) -> Result<Option<Arc<LtPlan>>> {
        let Some(handle) = &self.gemm_tuning.handle else {
            return Ok(None);
        };
        if !shape.tunable() {
            return Ok(None);
        }
        if let Some(plan) = self
            .gemm_tuning
            .plans
            .lock()
            .expect("GEMM plans lock")
            .get(&shape)
        {
            // A later call less aligned than the one tuned takes GemmEx.
            return Ok(plan.clone().filter(|p| ops.aligned_for(p.alignments)));
        }
        let recording = self
            .stream
            .capture_status()
            .map_err(cuda_err("reading the stream's capture status"))?
            != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        if recording {
            return Ok(None);
        }
        // Tuning only speeds GEMMs up: where it fails, the shape keeps GemmEx.
        let plan = match self.tune(handle, shape, ops) {
            Ok(plan) => plan.map(Arc::new),
            Err(e) => {
                eprintln!(
                    "warning: GEMM tuning failed, GemmEx kept for [{}, {}] x [{}, {}]ᵀ: {e}",
                    shape.m, shape.k, shape.n, shape.k
                );
                None
            }
        };
        if plan.is_some() {
            self.gemm_tuning.taken.fetch_add(1, Ordering::Relaxed);
        }
        let mut plans = self.gemm_tuning.plans.lock().expect("GEMM plans lock");
        Ok(plans.entry(shape).or_insert(plan).clone())
    }

    /// `out (+)= x · Wᵀ` through `plan`.
    pub(crate) fn run_plan(
        &self,
        plan: &LtPlan,
        ops: GemmOperands,
        accumulate: bool,
    ) -> Result<()> {
        let handle = self
            .gemm_tuning
            .handle
            .as_ref()
            .expect("a plan implies a handle");
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let status = unsafe {
            lt::cublasLtMatmul(
                handle.0,
                plan.desc,
                &alpha as *const f32 as *const _,
                ops.w as *const _,
                plan.a,
                ops.x as *const _,
                plan.b,
                &beta as *const f32 as *const _,
                ops.out as *const _,
                plan.c,
                ops.out as *mut _,
                plan.c,
                &plan.algo,
                graphs::address(&self.blas_workspace) as *mut _,
                plan.workspace,
                self.stream.cu_stream() as lt::cudaStream_t,
            )
        };
        lt_ok(status, "matmul")
    }

    /// Shapes that run a measured cuBLASLt algorithm instead of `GemmEx`.
    pub fn tuned_gemms(&self) -> u64 {
        self.gemm_tuning.taken.load(Ordering::Relaxed)
    }

    /// This driver with GEMM tuning on or off (on unless
    /// `PIE_CUDA_GEMM_TUNE=0`).
    pub fn with_gemm_tuning(mut self, on: bool) -> Result<Self> {
        self.gemm_tuning = GemmTuning::new(on, self.gemm_tuning.report)?;
        Ok(self)
    }

    /// This driver with GEMM tuning on, taking cuBLASLt's fastest
    /// candidate for every tuned shape even where `GemmEx` is faster (for
    /// tests of the cuBLASLt path).
    pub fn with_gemm_tuning_preferring_lt(self) -> Result<Self> {
        let mut d = self.with_gemm_tuning(true)?;
        d.gemm_tuning.margin = f32::INFINITY;
        Ok(d)
    }

    /// Times `GemmEx` and cuBLASLt's candidates on `shape` (into a scratch
    /// output: the inputs are only read) and returns the plan of the
    /// fastest candidate if it beats `GemmEx` by the margin. Scratch
    /// memory that cannot be had leaves the shape to `GemmEx`.
    fn tune(
        &self,
        handle: &LtHandle,
        shape: GemmShape,
        ops: GemmOperands,
    ) -> Result<Option<LtPlan>> {
        let (Ok(scratch), Ok(mut flush)) = (
            self.stream.alloc_zeros::<f32>(shape.m * shape.n),
            self.stream.alloc_zeros::<u8>(self.l2_flush_bytes()),
        ) else {
            return Ok(None);
        };
        let trial = GemmOperands {
            out: graphs::address(&scratch),
            ..ops
        };
        let gemm_ex = self.time_runs(&mut flush, || self.gemm_ex(shape, trial, true))?;
        let mut plan = LtPlan::describe(shape)?;
        plan.alignments = ops.alignments();
        let mut best: Option<(f32, usize, lt::cublasLtMatmulHeuristicResult_t)> = None;
        let candidates = plan.candidates(handle, crate::BLAS_WORKSPACE_BYTES)?;
        for (i, c) in candidates.iter().enumerate() {
            (plan.algo, plan.workspace) = (c.algo, c.workspaceSize);
            // An algorithm that fails to run is passed over.
            let Ok(t) =
                self.time_runs(&mut flush, || self.run_plan(&plan, trial, shape.accumulate))
            else {
                continue;
            };
            if best.as_ref().is_none_or(|(b, _, _)| t < *b) {
                best = Some((t, i, *c));
            }
        }
        self.stream
            .synchronize()
            .map_err(cuda_err("timing GEMM algorithms"))?;
        let won = best.filter(|(t, _, _)| *t < gemm_ex * self.gemm_tuning.margin);
        if self.gemm_tuning.report {
            let s = shape;
            let lt = best.map_or("none ran".into(), |(t, i, _)| {
                format!("{:.1} us (candidate {i})", t * 1e3)
            });
            eprintln!(
                "gemm tune [{}, {}] x [{}, {}]ᵀ{}: GemmEx {:.1} us, best of {} cuBLASLt {lt} -> {}",
                s.m,
                s.k,
                s.n,
                s.k,
                if s.accumulate { " (+=)" } else { "" },
                gemm_ex * 1e3,
                candidates.len(),
                if won.is_some() { "cuBLASLt" } else { "GemmEx" }
            );
        }
        Ok(won.map(|(_, _, c)| {
            (plan.algo, plan.workspace) = (c.algo, c.workspaceSize);
            plan
        }))
    }

    /// Milliseconds per run of `run`, over [`RUNS`] runs timed by events,
    /// each after the L2 cache is overwritten; one untimed run first.
    fn time_runs(&self, flush: &mut CudaSlice<u8>, run: impl Fn() -> Result<()>) -> Result<f32> {
        run()?;
        let mut total = 0.0;
        for _ in 0..RUNS {
            self.stream
                .memset_zeros(flush)
                .map_err(cuda_err("flushing L2"))?;
            let event = || {
                self.stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(cuda_err("recording a timing event"))
            };
            let start = event()?;
            run()?;
            let end = event()?;
            end.synchronize()
                .map_err(cuda_err("timing GEMM algorithms"))?;
            total += start
                .elapsed_ms(&end)
                .map_err(cuda_err("timing GEMM algorithms"))?;
        }
        Ok(total / RUNS as f32)
    }

    /// Twice the GPU's L2 cache, what a flush overwrites.
    fn l2_flush_bytes(&self) -> usize {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE;
        let l2 = self
            .ctx
            .attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .unwrap_or(0);
        2 * (l2.max(0) as usize).max(50 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_run_only_on_operands_aligned_as_tuned() {
        let ops = GemmOperands {
            w: 0x7f00_0000_0000,
            x: 0x7f00_0000_0010,
            out: 0x7f00_0000_0104,
        };
        assert_eq!(ops.alignments(), [256, 16, 4]);
        assert!(ops.aligned_for([256, 16, 4]));
        assert!(ops.aligned_for([16, 16, 4]));
        assert!(!ops.aligned_for([256, 256, 4]));
        assert!(!ops.aligned_for([256, 16, 16]));
    }

    #[test]
    fn only_bucket_sized_row_counts_are_tuned() {
        let shape = |m| GemmShape {
            m,
            n: 4096,
            k: 4096,
            accumulate: false,
        };
        for m in [8, 16, 64, 256] {
            assert!(shape(m).tunable(), "{m}");
        }
        // The GEMV's rows, prompt lengths between buckets, past the buckets.
        for m in [1, 4, 24, 100, 512] {
            assert!(!shape(m).tunable(), "{m}");
        }
    }
}
