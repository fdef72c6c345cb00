//! The CUDA driver: f32 activations on the GPU, weights in their file dtype
//! (f32, bf16; f16 widened), GEMMs through cuBLAS (`cublasGemmEx`, f32
//! accumulation), and NVRTC-compiled kernels from `kernels/cuda/` for the
//! other ops, including paged attention with an online softmax.
//!
//! The CUDA libraries are opened at run time, so this crate builds, and
//! `CudaDriver::new` fails with a clear message, on machines without CUDA.
//! Composite ops: `moe.rs` (host routing, per-expert GEMMs), `gdn.rs` and
//! `mamba2.rs` (recurrent kernels over per-sequence state rows), `mla.rs`
//! (latent cache, absorbed projections).

mod composite;
mod device;
mod fused;
mod gdn;
mod gemm;
mod gemm_tuning;
mod graphs;
mod greedy;
mod grouped_attention;
mod joined;
pub mod kernel_build;
mod kv;
mod launch;
mod mamba2;
mod mla;
mod mlp_fold;
mod moe;
mod rows;
mod specialized;
mod step_timing;
mod tensor;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use pie_driver::ir::*;
use pie_driver::{
    DType, Driver, DriverError, ForwardBatch, KvDType, KvLayout, NormRopePart, PreNorm, Result,
    TensorView, WeightPart, WeightRole,
};

use grouped_attention::QkNormRope;
pub use kv::CudaKv;
use kv::KvSlotBuffers;
pub use tensor::{Bf16Matrix, CudaAct, CudaWeight};

use device::Kernels;
use gemm::GemmInput;

/// A GPU with its stream, cuBLAS handle and compiled kernels.
pub struct CudaDriver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    gpu: String,
    /// Rope inputs of the batch being run, uploaded once for every layer.
    rope_tables: Mutex<Option<RopeTables>>,
    /// Frequency tables of each distinct rope op, uploaded once.
    rope_freqs: Mutex<Vec<RopeFreqs>>,
    /// cuBLAS's workspace (cuBLASLt's too), ours so that GEMMs allocate
    /// nothing (a GEMM recorded in a CUDA graph must not).
    blas_workspace: CudaSlice<u8>,
    /// Measured cuBLASLt algorithms for decode-sized GEMMs (`gemm_tuning.rs`).
    gemm_tuning: gemm_tuning::GemmTuning,
    /// Decode passes recorded as CUDA graphs (see `graphs.rs`).
    graphs: Mutex<graphs::GraphCache>,
    /// The device buffer staged passes read their batch inputs from.
    staging: Mutex<Option<CudaSlice<i32>>>,
    /// Set while a staged pass runs: where its ops find their inputs.
    staged: Mutex<Option<graphs::StagedInputs>>,
    /// Whether the model has run a composite op (its passes are not
    /// recorded) and whether any pass ran yet (so that is known).
    composite_seen: AtomicBool,
    passes_run: AtomicBool,
    /// Attention launches that applied their q/k norms and rope themselves
    /// (`norm_rope_attention`), for tests.
    norm_rope_folds: AtomicU64,
    /// Whether decode attention may apply the q/k norms and rope itself
    /// (`PIE_CUDA_ATTENTION_NORM_ROPE=0`: a launch of its own; for A/B runs).
    attention_norm_rope: bool,
    /// Whether attention shapes that fit use the grouped kernels
    /// (`PIE_CUDA_GQA=0`: `pie_attention` always).
    gqa: bool,
    /// Blocks per (row, KV head) of the grouped attention.
    gqa_split: grouped_attention::GqaSplit,
    /// Whether bf16 GEMMs of at most 4 rows use `pie_gemv_bf16`
    /// (`PIE_CUDA_GEMV=0`: cuBLAS for every shape).
    gemv: bool,
    /// Whether the GEMVs launch specialized forms where they exist: those
    /// `pie build --config` baked for the model's widths, and single-row
    /// ones for one row (`PIE_CUDA_SPECIALIZED=0`: the generic kernels
    /// always; for A/B runs).
    specialized: bool,
    /// One zeroed counter per (row, kv head) pair for the one-launch
    /// grouped attention (its blocks count themselves done, the last one
    /// combines and resets the counter).
    attention_counters: CudaSlice<u32>,
    /// Whether the kernels `launch::overlaps` names may start while the
    /// kernel before them runs (the image carries their waits, pdl.cu;
    /// `PIE_CUDA_PDL=0`: never).
    pdl: bool,
    /// Whether norms, GLUs and attention write bf16 copies for cuBLAS
    /// (`PIE_CUDA_BF16_COPIES=0`: a cast before each GEMM; for A/B runs).
    bf16_copies: bool,
    /// Whether any weight matrix is bf16 (cuBLAS reads bf16 inputs for
    /// those: norms, GLUs and attention then also write a bf16 copy of
    /// their outputs for GEMMs of more than 4 rows).
    bf16_matrices: AtomicBool,
    /// Whether fused ops run their fused kernels (`PIE_CUDA_FUSE=0`: one
    /// kernel per op, as the trait's defaults do; for A/B runs).
    fuse: bool,
    /// Whether fused calls over weights loaded together run one GEMM for
    /// all of them past the GEMV's rows (`joined.rs`; `PIE_CUDA_JOIN=0`:
    /// one GEMM per weight; for A/B runs).
    join: bool,
    /// Whether decode batches may take their tokens from the last greedy
    /// step on the device (`PIE_CUDA_FEED=0`: the engine reads every
    /// step's ids before it queues the next; for A/B runs).
    feed_tokens: bool,
    /// Whether fed decode graphs read their tokens from the greedy tail
    /// buffer and end with the argmax into it (`greedy.rs`;
    /// `PIE_CUDA_GRAPH_ARGMAX=0`: a copy of the ids before the graph and
    /// the argmax launched after it; for A/B runs).
    graph_argmax: bool,
    /// The one-launch MLP half at batch 1 (`mlp_fold.rs`).
    mlp_fold: mlp_fold::MlpFold,
    /// Buffers greedy sampling reuses and the ids it feeds (`greedy.rs`).
    greedy_buffers: Mutex<greedy::GreedyBuffers>,
    /// Device address tables of expert weights (grouped MoE kernels),
    /// keyed by the first expert's address and the offset into each.
    expert_tables: moe::ExpertTables,
}

/// Positions and sequence lengths of one batch on the device.
struct RopeTables {
    positions: Vec<u32>,
    seq_lens: Vec<i32>,
    positions_d: CudaSlice<i32>,
    seq_lens_d: CudaSlice<i32>,
}

/// Device addresses (and constants) a rope kernel reads: positions and
/// sequence lengths of the batch's rows, short and long inverse
/// frequencies, the LongRoPE switch length (-1: none) and cos/sin scale.
#[derive(Default)]
struct RopeInputs {
    positions: u64,
    seq_lens: u64,
    short: u64,
    long: u64,
    long_from: i32,
    scale: f64,
}

impl RopeInputs {
    /// Pushes them in the order every rope kernel takes them.
    fn push<'a>(&'a self, b: &mut launch::Launch<'a>) {
        b.arg(&self.positions)
            .arg(&self.seq_lens)
            .arg(&self.short)
            .arg(&self.long)
            .arg(&self.long_from)
            .arg(&self.scale);
    }
}

/// Device addresses of the tables an attention op reads: uploaded by the
/// KV cache for this batch, or staged for a recorded decode pass.
struct AttentionTables {
    new_slots: u64,
    table: u64,
    table_offsets: u64,
    positions: u64,
    /// Mask words, per-row offsets and key counts, when a chunk of the
    /// batch has a custom mask (staged decode batches never do).
    masks: Option<(u64, u64, u64)>,
}

impl AttentionTables {
    fn of(t: &kv::DeviceTables) -> Self {
        AttentionTables {
            new_slots: graphs::address(&t.new_slots),
            table: graphs::address(&t.table),
            table_offsets: graphs::address(&t.table_offsets),
            positions: graphs::address(&t.positions),
            masks: t.masks.as_ref().map(|m| {
                (
                    graphs::address(&m.words),
                    graphs::address(&m.offsets),
                    graphs::address(&m.key_counts),
                )
            }),
        }
    }

    fn staged(s: &graphs::StagedInputs) -> Self {
        AttentionTables {
            new_slots: s.new_slots(),
            table: s.table(),
            table_offsets: s.table_offsets(),
            positions: s.cache_positions(),
            masks: None,
        }
    }
}

/// One rope op's frequencies on the device: key, short and long inverse
/// frequencies, LongRoPE switch length (-1: none), cos/sin scale.
type RopeFreqs = (String, CudaSlice<f64>, CudaSlice<f64>, i32, f64);

/// The GEMM workspace: 32 MiB, as for Hopper GEMMs.
pub(crate) const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Gives cuBLAS a workspace of its own.
fn blas_workspace(stream: &Arc<CudaStream>, blas: &CudaBlas) -> Result<CudaSlice<u8>> {
    const BYTES: usize = BLAS_WORKSPACE_BYTES;
    let workspace = stream
        .alloc_zeros::<u8>(BYTES)
        .map_err(cuda_err("allocating the cuBLAS workspace"))?;
    let ptr = graphs::address(&workspace);
    let status =
        unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, BYTES) };
    if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(DriverError::Invalid(format!(
            "cuBLAS: setting the workspace: {status:?}"
        )));
    }
    Ok(workspace)
}

/// An optional f32 weight as a kernel argument: its address and 1, or a
/// null address and 0 (the kernel then reads none).
pub(crate) fn weight_or_null(w: Option<&CudaWeight>) -> (u64, i32) {
    match w.and_then(CudaWeight::f32) {
        Some(w) => (graphs::address(w), 1),
        None => (0, 0),
    }
}

pub(crate) fn cuda_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> DriverError + '_ {
    move |e| DriverError::Invalid(format!("CUDA: {what}: {e}"))
}

pub(crate) fn blocks(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n.max(1) as u32)
}

pub(crate) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        DriverError::Invalid(format!(
            "{what} = {v} exceeds the CUDA kernels' 32-bit range"
        ))
    })
}

impl CudaDriver {
    /// The first GPU, or an error saying what is missing (no driver, no
    /// GPU, no NVRTC).
    pub fn new() -> Result<Self> {
        let (ctx, stream, gpu) = device::open(0)?;
        let kernels = device::build_kernels(&ctx)?;
        device::require_cublas()?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| DriverError::Invalid(format!("CUDA: creating the cuBLAS handle: {e}")))?;
        let workspace = blas_workspace(&stream, &blas)?;
        let mlp_fold = mlp_fold::MlpFold::new(&ctx, &kernels)?;
        let attention_counters = stream
            .alloc_zeros::<u32>(grouped_attention::FOLD_PAIRS)
            .map_err(cuda_err("allocating the attention counters"))?;
        CudaDriver {
            ctx,
            stream,
            blas,
            kernels,
            gpu,
            rope_tables: Mutex::new(None),
            rope_freqs: Mutex::new(Vec::new()),
            blas_workspace: workspace,
            gemm_tuning: gemm_tuning::GemmTuning::from_env()?,
            graphs: Mutex::new(graphs::GraphCache::new()),
            staging: Mutex::new(None),
            staged: Mutex::new(None),
            composite_seen: AtomicBool::new(false),
            passes_run: AtomicBool::new(false),
            norm_rope_folds: AtomicU64::new(0),
            attention_norm_rope: std::env::var("PIE_CUDA_ATTENTION_NORM_ROPE")
                .map_or(true, |v| v != "0"),
            gqa: std::env::var("PIE_CUDA_GQA").map_or(true, |v| v != "0"),
            gqa_split: grouped_attention::GqaSplit::from_env(),
            gemv: std::env::var("PIE_CUDA_GEMV").map_or(true, |v| v != "0"),
            specialized: std::env::var("PIE_CUDA_SPECIALIZED").map_or(true, |v| v != "0"),
            fuse: std::env::var("PIE_CUDA_FUSE").map_or(true, |v| v != "0"),
            join: std::env::var("PIE_CUDA_JOIN").map_or(true, |v| v != "0"),
            bf16_matrices: AtomicBool::new(false),
            attention_counters,
            bf16_copies: std::env::var("PIE_CUDA_BF16_COPIES").map_or(true, |v| v != "0"),
            pdl: false,
            feed_tokens: std::env::var("PIE_CUDA_FEED").map_or(true, |v| v != "0"),
            graph_argmax: std::env::var("PIE_CUDA_GRAPH_ARGMAX").map_or(true, |v| v != "0"),
            mlp_fold,
            greedy_buffers: Default::default(),
            expert_tables: Default::default(),
        }
        .with_pdl_probed()
    }

    /// Turns overlapping launches on where the loaded kernels carry their
    /// waits (unless `PIE_CUDA_PDL=0`).
    fn with_pdl_probed(mut self) -> Result<Self> {
        let wanted = std::env::var("PIE_CUDA_PDL").map_or(true, |v| v != "0");
        self.pdl = wanted && launch::image_has_pdl(&self)?;
        Ok(self)
    }

    /// This driver with CUDA graphs for decode on or off (on by default,
    /// unless `PIE_CUDA_GRAPHS=0`).
    pub fn with_graphs(self, on: bool) -> Self {
        self.graphs.lock().expect("graph cache lock").off = !on;
        self
    }

    /// This driver with the argmax inside fed decode graphs on or off
    /// (on by default, unless `PIE_CUDA_GRAPH_ARGMAX=0`).
    pub fn with_graph_argmax(mut self, on: bool) -> Self {
        self.graph_argmax = on;
        self
    }

    /// This driver with the own bf16 decode kernel on or off (off: cuBLAS
    /// for every GEMM shape).
    pub fn with_gemv(mut self, on: bool) -> Self {
        self.gemv = on;
        self
    }

    /// This driver with the fused kernels on or off (off: one kernel per
    /// op where codegen fused ops, as `PIE_CUDA_FUSE=0` does).
    pub fn with_fusion(mut self, on: bool) -> Self {
        self.fuse = on;
        self
    }

    /// This driver with the grouped attention kernels on or off (off:
    /// `pie_attention` for every shape).
    pub fn with_grouped_attention(mut self, on: bool) -> Self {
        self.gqa = on;
        self
    }

    /// How many attention launches applied their q/k norms and rope
    /// themselves (recorded ones count once).
    pub fn norm_rope_folds(&self) -> u64 {
        self.norm_rope_folds.load(Ordering::Relaxed)
    }

    /// How many decode passes were replayed from a recorded graph.
    pub fn graph_replays(&self) -> u64 {
        self.graphs.lock().expect("graph cache lock").replays
    }

    /// The GPU's name, as the driver reports it.
    pub fn gpu_name(&self) -> &str {
        &self.gpu
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronizing"))
    }

    /// Uninitialized device memory for an output every element of which a
    /// kernel writes (no memset).
    fn uninit(&self, n: usize) -> Result<CudaSlice<f32>> {
        unsafe { self.stream.alloc::<f32>(n.max(1)) }
            .map_err(cuda_err("allocating GPU memory (out of memory?)"))
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(cuda_err("allocating GPU memory (out of memory?)"))
    }

    pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(cuda_err("copying to the GPU"))
    }

    pub(crate) fn act_zeros(&self, rows: usize, width: usize) -> Result<CudaAct> {
        Ok(CudaAct::new(self.zeros(rows * width)?, rows, width))
    }

    /// `x += bias` per row (no-op without a bias).
    pub(crate) fn add_bias_to(&self, x: &mut CudaAct, bias: Option<&CudaWeight>) -> Result<()> {
        let Some(bias) = bias.and_then(CudaWeight::f32) else {
            return Ok(());
        };
        x.bf16 = None; // stale once the bias is in
        let (r, w) = (int(x.rows, "rows")?, int(x.width, "width")?);
        let mut b = self.stream.launch_builder(self.kernels.get("pie_add_bias"));
        b.arg(&mut x.data).arg(bias).arg(&r).arg(&w);
        unsafe { b.launch(blocks(x.rows * x.width)) }.map_err(cuda_err("pie_add_bias"))?;
        Ok(())
    }

    /// `out[rows[i]] += scales[i] · y[i]`.
    pub(crate) fn scatter_add(
        &self,
        out: &mut CudaAct,
        y: &CudaAct,
        rows: &[usize],
        scales: &[f32],
    ) -> Result<()> {
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let (idx, sc) = (self.upload(&idx)?, self.upload(scales)?);
        let (n, w) = (int(rows.len(), "rows")?, int(y.width, "width")?);
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_scatter_add"));
        b.arg(&mut out.data)
            .arg(&y.data)
            .arg(&idx)
            .arg(&sc)
            .arg(&n)
            .arg(&w);
        unsafe { b.launch(blocks(rows.len() * y.width)) }.map_err(cuda_err("pie_scatter_add"))?;
        Ok(())
    }

    /// Consecutive parts of every group of `group` features.
    pub(crate) fn split_act(
        &self,
        x: &CudaAct,
        sizes: &[usize],
        group: usize,
    ) -> Result<Vec<CudaAct>> {
        use pie_driver::Driver;
        self.split(
            x,
            &SplitAttrs {
                sizes: sizes.to_vec(),
                group,
            },
        )
    }

    pub(crate) fn act(&self, rows: usize, width: usize) -> Result<CudaAct> {
        Ok(CudaAct::new(self.uninit(rows * width)?, rows, width))
    }

    /// out = x ⊙ y elementwise with kernel `name`.
    fn zip(&self, name: &str, x: &CudaAct, y: &CudaAct) -> Result<CudaAct> {
        if x.rows != y.rows || x.width != y.width {
            return Err(DriverError::Invalid(format!(
                "elementwise op on [{}, {}] and [{}, {}]",
                x.rows, x.width, y.rows, y.width
            )));
        }
        let n = x.rows * x.width;
        let mut out = self.act(x.rows, x.width)?;
        let ni = int(n, "elements")?;
        let mut b = self.stream.launch_builder(self.kernels.get(name));
        b.arg(&mut out.data).arg(&x.data).arg(&y.data).arg(&ni);
        unsafe { b.launch(blocks(n)) }.map_err(cuda_err(name))?;
        Ok(out)
    }

    /// The batch's rope inputs, uploaded on the first rope op of a forward
    /// pass and reused by the others (same positions, same sequences).
    fn rope_tables_for<'g>(
        &self,
        guard: &'g mut Option<RopeTables>,
        batch: &ForwardBatch,
    ) -> Result<&'g mut RopeTables> {
        let mut seq_lens = vec![0i32; batch.positions.len()];
        for seq in &batch.seqs {
            let end = (seq.start + seq.len).min(seq_lens.len());
            seq_lens[seq.start.min(end)..end].fill(seq.kv_len() as i32);
        }
        let fresh = guard
            .as_ref()
            .is_none_or(|t| t.positions != batch.positions || t.seq_lens != seq_lens);
        if fresh {
            let positions: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
            *guard = Some(RopeTables {
                positions_d: self.upload(&positions)?,
                seq_lens_d: self.upload(&seq_lens)?,
                positions: batch.positions.clone(),
                seq_lens,
            });
        }
        Ok(guard.as_mut().expect("set above"))
    }

    /// The frequency tables of rope op `a`, uploaded on its first use.
    fn rope_freqs_for<'f>(
        &self,
        freqs: &'f mut Vec<RopeFreqs>,
        a: &RopeAttrs,
    ) -> Result<&'f RopeFreqs> {
        let key = format!("{:?}/{}/{:?}", a.theta, a.rotary_dim, a.scaling);
        if let Some(i) = freqs.iter().position(|f| f.0 == key) {
            return Ok(&freqs[i]);
        }
        let table = pie_driver::rope::frequencies(a)?;
        let (long_from, long) = match &table.long {
            Some((from, long)) => (*from as i32, long.clone()),
            None => (-1, table.inv_freqs.clone()),
        };
        freqs.push((
            key,
            self.upload(&table.inv_freqs)?,
            self.upload(&long)?,
            long_from,
            table.scale,
        ));
        Ok(freqs.last().expect("pushed above"))
    }

    /// A bf16 matrix was loaded: GEMM inputs may want bf16 copies.
    pub(crate) fn note_bf16_matrices(&self) {
        self.bf16_matrices.store(true, Ordering::Relaxed);
    }

    /// A new `[rows, width]` output of a kernel that can also write it
    /// rounded to bf16, with the address of that copy (0: none). The copy
    /// is made where a cuBLAS GEMM will read the output: bf16 weights, more
    /// rows than the GEMV takes, fused kernels on.
    pub(crate) fn act_with_bf16_copy(&self, rows: usize, width: usize) -> Result<(CudaAct, u64)> {
        let mut out = self.act(rows, width)?;
        let wanted = self.fuse
            && self.bf16_copies
            && rows > gemm::GEMV_MAX_ROWS
            && self.bf16_matrices.load(Ordering::Relaxed);
        if wanted {
            // Every element is written by the producing kernel: no memset.
            let copy = unsafe { self.stream.alloc::<u16>(rows * width) }
                .map_err(cuda_err("allocating GPU memory (out of memory?)"))?;
            out.bf16 = Some(copy);
        }
        let address = out.bf16.as_ref().map_or(0, graphs::address);
        Ok((out, address))
    }

    /// `linear` of an input whose bf16 cast other products may share.
    fn linear_from(
        &self,
        input: &GemmInput<'_>,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        a: &LinearAttrs,
    ) -> Result<CudaAct> {
        if input.x.width != a.in_features {
            return Err(DriverError::Invalid(format!(
                "`linear` expected an input of width {}, got {}",
                a.in_features, input.x.width
            )));
        }
        let mut out = self.act(input.x.rows, a.out_features)?;
        self.gemm_into(input, w, &mut out, false)?;
        self.add_bias_to(&mut out, bias)?;
        Ok(out)
    }

    /// What a rope kernel reads for this batch: the staged tables inside
    /// a recorded decode pass, else this batch's (uploaded once per pass).
    fn rope_inputs(&self, batch: &ForwardBatch, a: &RopeAttrs) -> Result<RopeInputs> {
        let mut freqs = self.rope_freqs.lock().expect("rope freqs lock");
        let (_, short, long, long_from, scale) = self.rope_freqs_for(&mut freqs, a)?;
        let (short, long, long_from, scale) = (
            graphs::address(short),
            graphs::address(long),
            *long_from,
            *scale,
        );
        let mut guard = self.rope_tables.lock().expect("rope table lock");
        let (positions, seq_lens) = match *self.staged.lock().expect("staged lock") {
            Some(staged) => (staged.rope_positions(), staged.seq_lens()),
            None => {
                let tables = self.rope_tables_for(&mut guard, batch)?;
                (
                    graphs::address(&tables.positions_d),
                    graphs::address(&tables.seq_lens_d),
                )
            }
        };
        Ok(RopeInputs {
            positions,
            seq_lens,
            short,
            long,
            long_from,
            scale,
        })
    }

    pub(crate) fn gather(&self, x: &CudaAct, rows: &[usize]) -> Result<CudaAct> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(DriverError::Invalid(format!(
                "row {bad} requested from an activation of {} rows",
                x.rows
            )));
        }
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let idx = self.upload(&idx)?;
        let mut out = self.act(rows.len(), x.width)?;
        let (nr, w) = (int(rows.len(), "rows")?, int(x.width, "width")?);
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_gather_rows"));
        b.arg(&mut out.data).arg(&x.data).arg(&idx).arg(&nr).arg(&w);
        unsafe { b.launch(blocks(rows.len() * x.width)) }.map_err(cuda_err("pie_gather_rows"))?;
        Ok(out)
    }

    /// `out[i] = f(x[i], param)` with kernel `name`.
    pub(crate) fn map<T: cudarc::driver::DeviceRepr>(
        &self,
        x: &CudaAct,
        name: &str,
        param: T,
    ) -> Result<CudaAct> {
        let n = x.rows * x.width;
        let mut out = self.act(x.rows, x.width)?;
        let ni = int(n, "elements")?;
        let mut b = self.stream.launch_builder(self.kernels.get(name));
        b.arg(&mut out.data).arg(&x.data).arg(&param).arg(&ni);
        unsafe { b.launch(blocks(n)) }.map_err(cuda_err(name))?;
        Ok(out)
    }
}

impl CudaDriver {
    /// The attention op; `norm_rope`: q and k are raw projections whose
    /// per-head norms and rope the folded decode launch applies itself
    /// (the caller checked [`CudaDriver::attention_norm_rope`]).
    #[allow(clippy::too_many_arguments)] // the op's operands, one each
    fn attention_with(
        &self,
        q: &CudaAct,
        k: Option<&CudaAct>,
        v: Option<&CudaAct>,
        sinks: Option<&CudaWeight>,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
        a: &AttentionAttrs,
        norm_rope: Option<&QkNormRope>,
    ) -> Result<CudaAct> {
        if a.v_head_dim > 512 || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
            return Err(DriverError::Invalid(format!(
                "attention with {} heads over {} kv heads, v_head_dim {} (at most 512) is not supported by the cuda driver",
                a.heads, a.kv_heads, a.v_head_dim
            )));
        }
        let bf16 = kv.is_bf16();
        let staged = *self.staged.lock().expect("staged lock");
        let (tables, slot) = match staged {
            Some(staged) => (
                AttentionTables::staged(&staged),
                kv.slot_buffers(a.cache_slot, a)?,
            ),
            None => {
                let (tables, slot) = kv.prepare(batch, a.cache_slot, a, |v| self.upload(v))?;
                (AttentionTables::of(tables), slot)
            }
        };
        let (kw, vw) = (a.kv_heads * a.head_dim, a.kv_heads * a.v_head_dim);
        let (rows, kwi, vwi) = (
            int(q.rows, "rows")?,
            int(kw, "k width")?,
            int(vw, "v width")?,
        );
        // An op reading another layer's cache (`kv_from`) writes nothing:
        // that layer cached this step's keys and values already.
        if bf16 && !self.gqa_fits(a) {
            return Err(DriverError::Invalid(format!(
                "a bf16 KV cache on the cuda driver needs grouped attention (at most 8 query heads per \
                 KV head and head dims <= 128); this layer has {} heads over {} (use kv_cache_dtype auto)",
                a.heads, a.kv_heads
            )));
        }
        // Decode (one new token per sequence, so no row reads another
        // row's new key): the folded attention launch writes the keys and
        // values itself, one launch less per layer.
        let grouped = tables.masks.is_none() && self.gqa_fits(a);
        let one_token_each = batch.seqs.iter().all(|s| s.len == 1);
        let new_kv = match (k, v) {
            (Some(k), Some(v)) if grouped && one_token_each && self.gqa_folds(q.rows, a) => {
                Some((k, v))
            }
            _ => None,
        };
        if let (Some(k), Some(v), None) = (k, v, new_kv) {
            let write = if bf16 {
                "pie_kv_write_bf16"
            } else {
                "pie_kv_write"
            };
            let mut b = self.stream.launch_builder(self.kernels.get(write));
            b.arg(&mut slot.k)
                .arg(&mut slot.v)
                .arg(&k.data)
                .arg(&v.data)
                .arg(&tables.new_slots)
                .arg(&rows)
                .arg(&kwi)
                .arg(&vwi);
            unsafe { b.launch(blocks(q.rows * (kw + vw))) }.map_err(cuda_err(write))?;
        }
        // Masked batches take the per-head kernel's masked form.
        if grouped {
            if norm_rope.is_some() && new_kv.is_none() {
                return Err(DriverError::Invalid(
                    "attention: q/k norms handed to a launch that does not fold them".into(),
                ));
            }
            return self.gqa_attention(q, a, &tables, slot, sinks, bf16, new_kv, norm_rope);
        }
        if bf16 {
            return Err(DriverError::Invalid(
                "a bf16 KV cache on the cuda driver does not take custom attention masks yet (use kv_cache_dtype auto)".into(),
            ));
        }
        let (table, offsets, positions) = (&tables.table, &tables.table_offsets, &tables.positions);
        let dummy;
        let (sinks_d, has_sinks) = match sinks.and_then(CudaWeight::f32) {
            Some(s) => (s, 1i32),
            None => {
                dummy = self.zeros(1)?;
                (&dummy, 0i32)
            }
        };
        let mut out = self.act(q.rows, a.heads * a.v_head_dim)?;
        let cfg = LaunchConfig {
            grid_dim: ((q.rows * a.heads).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (a.head_dim * 4) as u32,
        };
        let (heads, kvh, hd, vhd) = (
            a.heads as i32,
            a.kv_heads as i32,
            a.head_dim as i32,
            a.v_head_dim as i32,
        );
        let v_stride = kvh * vhd;
        let window = a.window.map_or(0, |w| w as i32);
        let softcap = a.softcap.unwrap_or(0.0);
        // Batches without custom masks take the causal kernel, which
        // compiles without any mask handling.
        let kernel = match tables.masks {
            Some(_) => "pie_attention_masked",
            None => "pie_attention",
        };
        let mut b = self.stream.launch_builder(self.kernels.get(kernel));
        b.arg(&mut out.data)
            .arg(&q.data)
            .arg(&slot.k)
            .arg(&slot.v)
            .arg(positions)
            .arg(table)
            .arg(offsets)
            .arg(sinks_d)
            .arg(&has_sinks)
            .arg(&heads)
            .arg(&kvh)
            .arg(&hd)
            .arg(&vhd)
            .arg(&v_stride)
            .arg(&a.scale)
            .arg(&window)
            .arg(&softcap);
        if let Some((words, offsets, key_counts)) = &tables.masks {
            b.arg(words).arg(offsets).arg(key_counts);
        }
        unsafe { b.launch(cfg) }.map_err(cuda_err(kernel))?;
        Ok(out)
    }
}

impl Driver for CudaDriver {
    type Weight = CudaWeight;
    type Act = CudaAct;
    type Kv = CudaKv;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn run_pass(
        &self,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
        pass: &mut graphs::Pass<'_>,
    ) -> Result<CudaAct> {
        self.decode_pass(kv, batch, pass)
    }

    fn supports(&self, op: OpKind) -> bool {
        // Every op of the spec language, composite ones included.
        OpKind::ALL.contains(&op)
    }

    fn describe(&self) -> String {
        format!("cuda ({})", self.gpu)
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self.ctx.mem_get_info().ok()
    }

    fn load_weights_together(&self, parts: &[WeightPart<'_>]) -> Result<Vec<CudaWeight>> {
        match self.upload_together(parts)? {
            Some(weights) => Ok(weights),
            None => pie_driver::load_each(self, parts),
        }
    }

    fn load_weight(
        &self,
        name: &str,
        view: &TensorView<'_>,
        expected: &[usize],
        role: WeightRole,
    ) -> Result<CudaWeight> {
        if view.shape != expected {
            return Err(DriverError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: view.shape.to_vec(),
            });
        }
        if let WeightRole::Experts(layout) = role {
            return pie_driver::experts::split(name, view, layout)?
                .iter()
                .enumerate()
                .map(|(e, t)| {
                    let role = if t.shape.len() == 1 {
                        WeightRole::Vector
                    } else {
                        WeightRole::Matrix
                    };
                    self.load_weight(&format!("{name} (expert {e})"), &t.view(), &t.shape, role)
                })
                .collect::<Result<Vec<_>>>()
                .map(CudaWeight::Experts);
        }
        let elems: usize = expected.iter().product();
        let size = view.dtype.size().unwrap_or(0);
        if !matches!(view.dtype, DType::F32 | DType::BF16 | DType::F16)
            || elems * size != view.data.len()
        {
            return Err(DriverError::DType {
                name: name.to_string(),
                found: view.dtype,
                driver: "cuda",
                supported: "f32, bf16, f16 (GGUF block formats: use the portable driver)",
            });
        }
        let u16s = || -> Vec<u16> {
            view.data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let f32s: Vec<f32> = match (view.dtype, role) {
            (DType::BF16, WeightRole::Matrix) if expected.len() == 2 => {
                self.note_bf16_matrices();
                return Ok(CudaWeight::Bf16(Bf16Matrix::new(self.upload(&u16s())?)));
            }
            (DType::F32, _) => view
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            (DType::BF16, _) => u16s()
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect(),
            _ => u16s()
                .into_iter()
                .map(|b| half::f16::from_bits(b).to_f32())
                .collect(),
        };
        Ok(CudaWeight::F32(self.upload(&f32s).map_err(|e| {
            DriverError::Invalid(format!("tensor `{name}` ({} MB): {e}", (elems * 4) >> 20))
        })?))
    }

    fn new_kv(&self, layout: &KvLayout) -> Result<CudaKv> {
        match layout.dtype {
            KvDType::Auto | KvDType::F32 => {}
            KvDType::Bf16 => grouped_attention::check_bf16_cache(layout)?,
            other => {
                return Err(DriverError::Invalid(format!(
                "kv_cache_dtype {} is not implemented by the cuda driver (use auto, f32 or bf16)",
                other.name()
            )))
            }
        }
        CudaKv::new(layout, |n| self.zeros(n))
    }

    fn embedding(
        &self,
        table: &CudaWeight,
        batch: &ForwardBatch,
        a: &EmbeddingAttrs,
    ) -> Result<CudaAct> {
        if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= a.vocab) {
            return Err(DriverError::Invalid(format!(
                "token id {bad} is out of range: the model's vocabulary has {} tokens (ids 0..={})",
                a.vocab,
                a.vocab - 1
            )));
        }
        let n = batch.tokens.len();
        let uploaded;
        let ids = match *self.staged.lock().expect("staged lock") {
            Some(staged) => staged.tokens(),
            None => {
                uploaded = self.upload(&batch.tokens)?;
                graphs::address(&uploaded)
            }
        };
        let mut out = self.act(n, a.hidden)?;
        let (ni, hi) = (int(n, "tokens")?, int(a.hidden, "hidden")?);
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_embedding"));
        let dtype: i32;
        b.arg(&mut out.data);
        match table {
            CudaWeight::F32(t) => {
                dtype = 0;
                b.arg(t);
            }
            CudaWeight::Bf16(t) => {
                dtype = 1;
                b.arg(&t.ptr);
            }
            CudaWeight::Experts(_) => {
                return Err(DriverError::Invalid(
                    "an expert weight is not an embedding table".into(),
                ))
            }
        }
        b.arg(&dtype).arg(&ids).arg(&ni).arg(&hi);
        unsafe { b.launch(blocks(n * a.hidden)) }.map_err(cuda_err("pie_embedding"))?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaAct,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        a: &LinearAttrs,
    ) -> Result<CudaAct> {
        self.linear_from(&GemmInput::new(x), w, bias, a)
    }

    fn rms_norm(&self, x: &CudaAct, w: Option<&CudaWeight>, a: &RmsNormAttrs) -> Result<CudaAct> {
        if x.width != a.width || a.group == 0 || !a.width.is_multiple_of(a.group) {
            return Err(DriverError::Invalid(format!(
                "`rms_norm` of width {} (groups of {}) on an input of width {}",
                a.width, a.group, x.width
            )));
        }
        let (mut out, shadow) = self.act_with_bf16_copy(x.rows, x.width)?;
        let (weight, has) = weight_or_null(w);
        let groups = x.rows * (x.width / a.group);
        let g = int(a.group, "group")?;
        let (kernel, cfg) = fused::norm_launch(["pie_rms_norm", "pie_rms_norm4"], groups, a.group);
        let mut b = self.stream.launch_builder(self.kernels.get(kernel));
        b.arg(&mut out.data)
            .arg(&shadow)
            .arg(&x.data)
            .arg(&weight)
            .arg(&has)
            .arg(&g)
            .arg(&a.eps)
            .arg(&a.offset);
        unsafe { b.launch(cfg) }.map_err(cuda_err(kernel))?;
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &CudaAct,
        w: Option<&CudaWeight>,
        b: Option<&CudaWeight>,
        a: &LayerNormAttrs,
    ) -> Result<CudaAct> {
        if x.width != a.width {
            return Err(DriverError::Invalid(format!(
                "`layer_norm` expected an input of width {}, got {}",
                a.width, x.width
            )));
        }
        let mut out = self.act(x.rows, x.width)?;
        let dummy = self.zeros(1)?;
        let (w, has_w) = match w.and_then(CudaWeight::f32) {
            Some(w) => (w, 1i32),
            None => (&dummy, 0),
        };
        let (b, has_b) = match b.and_then(CudaWeight::f32) {
            Some(b) => (b, 1i32),
            None => (&dummy, 0),
        };
        let width = int(x.width, "width")?;
        let cfg = LaunchConfig {
            grid_dim: (x.rows.max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 256 * 4,
        };
        let mut l = self
            .stream
            .launch_builder(self.kernels.get("pie_layer_norm"));
        l.arg(&mut out.data)
            .arg(&x.data)
            .arg(w)
            .arg(b)
            .arg(&has_w)
            .arg(&has_b)
            .arg(&width)
            .arg(&a.eps);
        unsafe { l.launch(cfg) }.map_err(cuda_err("pie_layer_norm"))?;
        Ok(out)
    }

    fn rope(&self, x: &CudaAct, batch: &ForwardBatch, a: &RopeAttrs) -> Result<CudaAct> {
        if x.width != a.heads * a.head_dim || batch.positions.len() != x.rows {
            return Err(DriverError::Invalid(format!(
                "`rope` on [{}, {}] with {} heads of {} and {} positions",
                x.rows,
                x.width,
                a.heads,
                a.head_dim,
                batch.positions.len()
            )));
        }
        // Every feature is rotated when rotary_dim == head_dim: the kernel
        // writes a fresh output; else it rotates a copy in place.
        let whole = a.rotary_dim == a.head_dim;
        let out = match whole {
            true => self.act(x.rows, x.width)?,
            false => {
                let copy = self
                    .stream
                    .clone_dtod(&x.data)
                    .map_err(cuda_err("copying an activation"))?;
                CudaAct::new(copy, x.rows, x.width)
            }
        };
        let src = graphs::address(if whole { &x.data } else { &out.data });
        let inputs = self.rope_inputs(batch, a)?;
        let rows = int(x.rows, "rows")?;
        let (heads, hd, rd) = (a.heads as i32, a.head_dim as i32, a.rotary_dim as i32);
        let interleaved = i32::from(a.style == RopeStyle::Interleaved);
        let n = x.rows * a.heads * (a.rotary_dim / 2);
        let mut b = self.launch("pie_rope");
        b.buf(&out.data).arg(&src);
        inputs.push(&mut b);
        b.arg(&rows).arg(&heads).arg(&hd).arg(&rd).arg(&interleaved);
        unsafe { b.launch(blocks(n)) }?;
        Ok(out)
    }

    fn attention(
        &self,
        q: &CudaAct,
        k: Option<&CudaAct>,
        v: Option<&CudaAct>,
        sinks: Option<&CudaWeight>,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
        a: &AttentionAttrs,
    ) -> Result<CudaAct> {
        self.attention_with(q, k, v, sinks, kv, batch, a, None)
    }

    fn norm_rope_attention(
        &self,
        q: NormRopePart<'_, Self>,
        k: NormRopePart<'_, Self>,
        v: &CudaAct,
        sinks: Option<&CudaWeight>,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
        a: &AttentionAttrs,
    ) -> Result<CudaAct> {
        match self.attention_norm_rope(q, k, batch, a)? {
            Some(nr) => {
                self.norm_rope_folds.fetch_add(1, Ordering::Relaxed);
                self.attention_with(q.0, Some(k.0), Some(v), sinks, kv, batch, a, Some(&nr))
            }
            None => pie_driver::unfused::norm_rope_attention(self, q, k, v, sinks, kv, batch, a),
        }
    }

    fn add(&self, x: &CudaAct, y: &CudaAct, _a: &ElementwiseAttrs) -> Result<CudaAct> {
        self.zip("pie_add", x, y)
    }

    fn mul(&self, x: &CudaAct, y: &CudaAct, _a: &ElementwiseAttrs) -> Result<CudaAct> {
        self.zip("pie_mul", x, y)
    }

    fn scale(&self, x: &CudaAct, w: Option<&CudaWeight>, a: &ScaleAttrs) -> Result<CudaAct> {
        match w {
            Some(w) => self.scale_by_weight(x, w, a.factor),
            None => self.map(x, "pie_scale", a.factor),
        }
    }

    fn concat(&self, parts: &[&CudaAct], a: &ConcatAttrs) -> Result<CudaAct> {
        self.concat_rows(parts, a)
    }

    fn mix(&self, x: &CudaAct, coefs: &CudaAct, a: &MixAttrs) -> Result<CudaAct> {
        self.mix_streams(x, coefs, a)
    }

    fn rms(&self, x: &CudaAct, a: &RmsAttrs) -> Result<CudaAct> {
        self.rms_of_groups(x, a)
    }

    fn gaussian_topk(&self, x: &CudaAct, a: &GaussianTopkAttrs) -> Result<CudaAct> {
        self.gaussian_topk_rows(x, a)
    }

    fn glu(&self, gate: &CudaAct, up: &CudaAct, a: &GluAttrs) -> Result<CudaAct> {
        if gate.rows != up.rows || gate.width != up.width {
            return Err(DriverError::Invalid(
                "glu: gate and up differ in shape".into(),
            ));
        }
        let n = gate.rows * gate.width;
        let (mut out, shadow) = self.act_with_bf16_copy(gate.rows, gate.width)?;
        let (f, limit, ni) = (
            a.func.kernel_code(),
            a.limit.unwrap_or(0.0),
            int(n, "elements")?,
        );
        let mut b = self.stream.launch_builder(self.kernels.get("pie_glu"));
        b.arg(&mut out.data)
            .arg(&shadow)
            .arg(&gate.data)
            .arg(&up.data)
            .arg(&f)
            .arg(&limit)
            .arg(&ni);
        unsafe { b.launch(blocks(n)) }.map_err(cuda_err("pie_glu"))?;
        Ok(out)
    }

    fn activation(&self, x: &CudaAct, a: &ActivationAttrs) -> Result<CudaAct> {
        self.map(x, "pie_activation", a.func.kernel_code())
    }

    fn softcap(&self, x: &CudaAct, a: &SoftcapAttrs) -> Result<CudaAct> {
        self.map(x, "pie_softcap", a.cap)
    }

    fn split(&self, x: &CudaAct, a: &SplitAttrs) -> Result<Vec<CudaAct>> {
        if a.group == 0
            || !x.width.is_multiple_of(a.group)
            || a.sizes.iter().sum::<usize>() != a.group
        {
            return Err(DriverError::Invalid(format!(
                "split of width {} by {:?} per {}",
                x.width, a.sizes, a.group
            )));
        }
        let groups = x.width / a.group;
        let mut offset = 0;
        let mut parts = Vec::with_capacity(a.sizes.len());
        for &size in &a.sizes {
            let mut out = self.act(x.rows, groups * size)?;
            let (r, w, g, o, s) = (
                x.rows as i32,
                x.width as i32,
                a.group as i32,
                offset as i32,
                size as i32,
            );
            let mut b = self
                .stream
                .launch_builder(self.kernels.get("pie_split_part"));
            b.arg(&mut out.data)
                .arg(&x.data)
                .arg(&r)
                .arg(&w)
                .arg(&g)
                .arg(&o)
                .arg(&s);
            unsafe { b.launch(blocks(x.rows * groups * size)) }
                .map_err(cuda_err("pie_split_part"))?;
            parts.push(out);
            offset += size;
        }
        Ok(parts)
    }

    fn composite(
        &self,
        op: OpKind,
        inputs: &[&CudaAct],
        weights: &[Option<&CudaWeight>],
        a: &CompositeAttrs,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
    ) -> Result<CudaAct> {
        self.composite_seen.store(true, Ordering::Relaxed);
        batch.refuse_masks(op)?;
        match (op, inputs) {
            (OpKind::Moe, [x]) => self.moe(x, weights, a),
            (OpKind::GatedDeltaNet, [x]) => self.gated_delta_net(x, weights, a, kv, batch),
            (OpKind::Mamba2, [x]) => self.mamba2(x, weights, a, kv, batch),
            (OpKind::MlaAttention, [x]) => self.mla(x, weights, a, kv, batch),
            _ => Err(DriverError::Unsupported {
                op,
                driver: self.name(),
            }),
        }
    }

    fn copy_page(&self, kv: &mut CudaKv, from: u32, to: u32) -> Result<()> {
        kv.copy_page(from as usize, to as usize, &self.stream)
    }

    fn copy_state(&self, kv: &mut CudaKv, from: u32, to: u32) -> Result<()> {
        kv.copy_state(from as usize, to as usize, &self.stream)
    }

    fn linear_many(
        &self,
        x: &CudaAct,
        weights: &[&CudaWeight],
        biases: &[Option<&CudaWeight>],
        attrs: &[&LinearAttrs],
    ) -> Result<Vec<CudaAct>> {
        if let Some(outs) = self.fused_linear_many(x, None, weights, biases, attrs)? {
            return Ok(outs);
        }
        if let Some(outs) = self.joined_linear_many(x, weights, biases, attrs)? {
            return Ok(outs);
        }
        // One bf16 cast of x for every product (cuBLAS path).
        let input = GemmInput::new(x);
        weights
            .iter()
            .zip(biases)
            .zip(attrs)
            .map(|((w, b), a)| self.linear_from(&input, w, *b, a))
            .collect()
    }

    fn norm_linear_many(
        &self,
        x: &CudaAct,
        norm: PreNorm<'_, Self>,
        weights: &[&CudaWeight],
        biases: &[Option<&CudaWeight>],
        attrs: &[&LinearAttrs],
    ) -> Result<Vec<CudaAct>> {
        match self.fused_linear_many(x, Some(norm), weights, biases, attrs)? {
            Some(outs) => Ok(outs),
            None => pie_driver::unfused::norm_linear_many(self, x, norm, weights, biases, attrs),
        }
    }

    fn add_norm_gated_linear(
        &self,
        x: &CudaAct,
        y: &CudaAct,
        add: &ElementwiseAttrs,
        norm: PreNorm<'_, Self>,
        gate: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        up: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        a: &GluAttrs,
    ) -> Result<(CudaAct, CudaAct)> {
        match self.fused_add_norm_gated_linear(x, y, norm, gate, up, a)? {
            Some(pair) => Ok(pair),
            None => pie_driver::unfused::add_norm_gated_linear(self, x, y, add, norm, gate, up, a),
        }
    }

    fn add_norm_mlp(
        &self,
        x: &CudaAct,
        y: CudaAct,
        add: &ElementwiseAttrs,
        norm: PreNorm<'_, Self>,
        gate: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        up: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        glu: &GluAttrs,
        down: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        add_down: &ElementwiseAttrs,
    ) -> Result<CudaAct> {
        match self.fused_add_norm_mlp(x, y, norm, gate, up, glu, down)? {
            Ok(out) => Ok(out),
            Err(y) => pie_driver::unfused::add_norm_mlp(
                self, x, y, add, norm, gate, up, glu, down, add_down,
            ),
        }
    }

    fn gated_linear(
        &self,
        x: &CudaAct,
        gate: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        up: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        a: &GluAttrs,
    ) -> Result<CudaAct> {
        if let Some(out) = self.fused_gated_linear(x, gate, up, a)? {
            return Ok(out);
        }
        if let Some(out) = self.joined_gated_linear(x, gate, up, a)? {
            return Ok(out);
        }
        let input = GemmInput::new(x);
        let g = self.linear_from(&input, gate.0, gate.1, gate.2)?;
        let u = self.linear_from(&input, up.0, up.1, up.2)?;
        self.glu(&g, &u, a)
    }

    fn linear_add(
        &self,
        x: &CudaAct,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        a: &LinearAttrs,
        residual: CudaAct,
        add: &ElementwiseAttrs,
    ) -> Result<CudaAct> {
        let fits = residual.rows == x.rows && residual.width == a.out_features;
        if !self.fuse || !fits || x.width != a.in_features {
            return pie_driver::unfused::linear_add(self, x, w, bias, a, residual, add);
        }
        // The product accumulates into the residual's memory.
        let mut out = residual;
        self.gemm_into(&GemmInput::new(x), w, &mut out, true)?;
        self.add_bias_to(&mut out, bias)?;
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        x: &CudaAct,
        y: &CudaAct,
        add: &ElementwiseAttrs,
        w: Option<&CudaWeight>,
        norm: &RmsNormAttrs,
    ) -> Result<(CudaAct, CudaAct)> {
        match self.fused_add_rms_norm(x, y, w, norm)? {
            Some(pair) => Ok(pair),
            None => pie_driver::unfused::add_rms_norm(self, x, y, add, w, norm),
        }
    }

    fn rms_norm_rope2(
        &self,
        a: NormRopePart<'_, Self>,
        b: NormRopePart<'_, Self>,
        batch: &ForwardBatch,
    ) -> Result<(CudaAct, CudaAct)> {
        match self.fused_rms_norm_rope2(a, b, batch)? {
            Some(pair) => Ok(pair),
            None => pie_driver::unfused::rms_norm_rope2(self, a, b, batch),
        }
    }

    fn rms_norm_rope(
        &self,
        x: &CudaAct,
        w: Option<&CudaWeight>,
        norm: &RmsNormAttrs,
        batch: &ForwardBatch,
        rope: &RopeAttrs,
    ) -> Result<CudaAct> {
        match self.fused_rms_norm_rope(x, w, norm, batch, rope)? {
            Some(out) => Ok(out),
            None => pie_driver::unfused::rms_norm_rope(self, x, w, norm, batch, rope),
        }
    }

    fn select_rows(&self, x: &CudaAct, rows: &[usize]) -> Result<CudaAct> {
        self.gather(x, rows)
    }

    fn greedy_rows(&self, x: &CudaAct, rows: &[usize]) -> Result<Vec<(u32, f32)>> {
        self.greedy(x, rows)
    }

    fn argmax_rows(&self, x: &CudaAct, rows: &[usize]) -> Result<Vec<u32>> {
        // The same reduction; the log-probability is one more pass over
        // the row and four bytes back per row.
        Ok(self
            .greedy_rows(x, rows)?
            .into_iter()
            .map(|(token, _)| token)
            .collect())
    }

    fn argmax_start(&self, x: &CudaAct, rows: &[usize]) -> Result<pie_driver::PendingIds> {
        self.greedy_start(x, rows)
    }

    fn feeds_tokens(&self) -> bool {
        self.feed_tokens
    }

    fn read_rows(&self, x: &CudaAct, rows: &[usize]) -> Result<Vec<f32>> {
        let picked = self.gather(x, rows)?;
        let mut host = self
            .stream
            .clone_dtoh(&picked.data)
            .map_err(cuda_err("copying logits to the host"))?;
        host.truncate(rows.len() * x.width);
        Ok(host)
    }
}
