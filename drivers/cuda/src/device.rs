//! Finding the GPU and building the kernels: the CUDA libraries are loaded
//! at run time (cudarc `dynamic-loading`), so every build runs on machines
//! without CUDA and says what is missing instead of failing to start.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use pie_driver::{DriverError, Result};

/// Kernel sources, compiled together into one module.
pub const KERNEL_SOURCES: [(&str, &str); 9] = [
    ("pdl.cu", include_str!("../../../kernels/cuda/pdl.cu")),
    ("gemv.cu", include_str!("../../../kernels/cuda/gemv.cu")),
    (
        "elementwise.cu",
        include_str!("../../../kernels/cuda/elementwise.cu"),
    ),
    (
        "norm_rope.cu",
        include_str!("../../../kernels/cuda/norm_rope.cu"),
    ),
    // After norm_rope.cu: its folds apply the q/k norms and rope.
    (
        "grouped_attention.cu",
        include_str!("../../../kernels/cuda/grouped_attention.cu"),
    ),
    (
        "attention.cu",
        include_str!("../../../kernels/cuda/attention.cu"),
    ),
    (
        "recurrent.cu",
        include_str!("../../../kernels/cuda/recurrent.cu"),
    ),
    ("moe.cu", include_str!("../../../kernels/cuda/moe.cu")),
    ("fused.cu", include_str!("../../../kernels/cuda/fused.cu")),
];

/// Every kernel the driver launches.
pub const KERNELS: [&str; 100] = [
    "pie_gqa_attention_partial_bf16",
    "pie_kv_write_bf16",
    "pie_rms",
    "pie_gaussian_topk",
    "pie_concat_part",
    "pie_mix",
    "pie_scale_weighted",
    "pie_gqa_attention_partial",
    "pie_gqa_attention_combine",
    "pie_gemv_bf16",
    "pie_gemv_bf16_m1",
    "pie_gemv_add_bf16_m1",
    "pie_gemv3_bf16_m1",
    "pie_gemv3_norm_bf16_m1",
    "pie_gemv_glu_bf16_m1",
    "pie_gemv_glu_norm_bf16_m1",
    "pie_add",
    "pie_mul",
    "pie_scale",
    "pie_softcap",
    "pie_activation",
    "pie_glu",
    "pie_add_bias",
    "pie_split_part",
    "pie_gather_rows",
    "pie_cast_bf16",
    "pie_embedding",
    "pie_widen",
    "pie_rms_norm",
    "pie_layer_norm",
    "pie_rope",
    "pie_kv_write",
    "pie_attention",
    "pie_attention_masked",
    "pie_greedy_partial",
    "pie_greedy_finish",
    "pie_rms_norm4",
    "pie_add_rms_norm4",
    "pie_scatter_add",
    "pie_causal_conv",
    "pie_gated_delta_rule",
    "pie_gated_rms_norm",
    "pie_mamba2_scan",
    "pie_gate_group_norm",
    "pie_mla_query",
    "pie_mla_value",
    "pie_mla_index_scores",
    "pie_concat_cols",
    "pie_unfuse_qkvz",
    "pie_noop_check",
    "pie_fill",
    "pie_moe_gate_up_f32",
    "pie_moe_gate_up_bf16",
    "pie_moe_down_f32",
    "pie_moe_down_bf16",
    "pie_moe_combine",
    "pie_gemv3_bf16",
    "pie_gemv3_norm_bf16",
    "pie_gemv_glu_bf16",
    "pie_gemv_glu_norm_bf16",
    "pie_mlp_fold_bf16_m1",
    "pie_mlp_fold_t_bf16_m1",
    "pie_transpose_bf16",
    "pie_add_rms_norm",
    "pie_rms_norm_rope",
    "pie_gemv_add_bf16",
    "pie_gqa_attention_partial_c128",
    "pie_gqa_attention_partial_bf16_c128",
    "pie_gqa_attention_fold",
    "pie_gqa_attention_fold_bf16",
    "pie_gqa_attention_fold_c128",
    "pie_gqa_attention_fold_bf16_c128",
    "pie_rms_norm_rope2",
    "pie_split_joined",
    "pie_glu_joined",
    "pie_pdl_probe",
    "pie_gqa_attention_fold_g2",
    "pie_gqa_attention_fold_c128_g2",
    "pie_gqa_attention_fold_bf16_g2",
    "pie_gqa_attention_fold_bf16_c128_g2",
    "pie_gqa_attention_fold_g4",
    "pie_gqa_attention_fold_c128_g4",
    "pie_gqa_attention_fold_bf16_g4",
    "pie_gqa_attention_fold_bf16_c128_g4",
    "pie_gqa_attention_fold_g8",
    "pie_gqa_attention_fold_c128_g8",
    "pie_gqa_attention_fold_bf16_g8",
    "pie_gqa_attention_fold_bf16_c128_g8",
    "pie_gqa_attention_partial_g2",
    "pie_gqa_attention_partial_c128_g2",
    "pie_gqa_attention_partial_bf16_g2",
    "pie_gqa_attention_partial_bf16_c128_g2",
    "pie_gqa_attention_partial_g4",
    "pie_gqa_attention_partial_c128_g4",
    "pie_gqa_attention_partial_bf16_g4",
    "pie_gqa_attention_partial_bf16_c128_g4",
    "pie_gqa_attention_partial_g8",
    "pie_gqa_attention_partial_c128_g8",
    "pie_gqa_attention_partial_bf16_g8",
    "pie_gqa_attention_partial_bf16_c128_g8",
];

/// Whether a shared library can be opened, without cudarc's panic when it
/// cannot.
fn library_present(probe: impl FnOnce() + std::panic::UnwindSafe) -> bool {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(probe).is_ok();
    std::panic::set_hook(hook);
    ok
}

fn cuda_error(what: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Invalid(format!("CUDA: {what}: {e}"))
}

/// The context and default stream of GPU `ordinal`, or an error naming what
/// is missing.
pub fn open(ordinal: usize) -> Result<(Arc<CudaContext>, Arc<CudaStream>, String)> {
    if !library_present(|| unsafe {
        cudarc::driver::sys::culib();
    }) {
        return Err(DriverError::Invalid(
            "no CUDA driver found (libcuda.so could not be loaded): the cuda driver needs an NVIDIA GPU \
             with its driver installed; use the portable driver on this machine"
                .into(),
        ));
    }
    let ctx =
        CudaContext::new(ordinal).map_err(|e| cuda_error(&format!("opening GPU {ordinal}"), e))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    // One stream for everything, so slices need no cross-stream events
    // (which would also get in the way of graph capture); not the legacy
    // default stream, which cannot be captured.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx
        .new_stream()
        .map_err(|e| cuda_error("creating a stream", e))?;
    Ok((ctx, stream, name))
}

/// cuBLAS must be loadable (it runs the GEMMs).
pub fn require_cublas() -> Result<()> {
    if library_present(|| unsafe {
        cudarc::cublas::sys::culib();
    }) {
        Ok(())
    } else {
        Err(DriverError::Invalid(
            "cuBLAS (libcublas.so) could not be loaded: install the CUDA toolkit's cuBLAS, or the \
             `nvidia-cublas` Python wheel, and add its lib directory to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// The kernel sources as one translation unit.
pub fn kernel_source() -> String {
    KERNEL_SOURCES
        .iter()
        .map(|(name, text)| format!("// ---- {name}\n{text}\n"))
        .collect::<String>()
        + EXTRA_KERNELS
}

/// The kernels: the cubin `pie build` embedded for this GPU (or its PTX),
/// else compiled now with the NVRTC found on this machine.
pub fn build_kernels(ctx: &Arc<CudaContext>) -> Result<Kernels> {
    if let Some(image) = embedded::image_for(ctx)? {
        let module = ctx
            .load_module(image)
            .map_err(|e| cuda_error("loading the embedded kernels", e))?;
        return Kernels::load(module, true);
    }
    compile_now(ctx)
}

fn compile_now(ctx: &Arc<CudaContext>) -> Result<Kernels> {
    if !library_present(|| unsafe {
        cudarc::nvrtc::sys::culib();
    }) {
        return Err(DriverError::Invalid(
            "NVRTC (libnvrtc.so) could not be loaded: install the CUDA toolkit's NVRTC, or the \
             `nvidia-cuda-nvrtc` Python wheel and add its lib directory to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    // Hopper and later: compiled for compute_90, so the kernels carry
    // their programmatic-dependent-launch waits (pdl.cu).
    let (major, _) = ctx
        .compute_capability()
        .map_err(|e| cuda_error("reading the compute capability", e))?;
    let ptx = compile_ptx_with_opts(
        kernel_source(),
        CompileOptions {
            name: Some("pie_kernels.cu".into()),
            arch: (major >= 9).then_some("compute_90"),
            ..Default::default()
        },
    )
    .map_err(|e| cuda_error("compiling the kernels with NVRTC", e))?;
    let module = ctx
        .load_module(ptx)
        .map_err(|e| cuda_error("loading the kernel module", e))?;
    Kernels::load(module, false)
}

/// Small kernels used by the driver itself.
const EXTRA_KERNELS: &str = r#"
extern "C" __global__ void pie_noop_check(int* out) { if (threadIdx.x == 0) out[0] = 42; }
extern "C" __global__ void pie_fill(float* out, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = v;
}
"#;

/// Entry points `pie build --config` specialized for one model's shapes
/// (codegen/src/cuda_kernels.rs), embedded with the images that hold them.
mod specialized {
    include!(concat!(env!("OUT_DIR"), "/specialized.rs"));
}

pub struct Kernels {
    _module: Arc<CudaModule>,
    functions: Vec<(&'static str, CudaFunction)>,
}

impl Kernels {
    /// The generic kernels, and the specialized ones where the module is
    /// the embedded image that holds them.
    fn load(module: Arc<CudaModule>, with_specialized: bool) -> Result<Self> {
        let extra: &[&'static str] = if with_specialized {
            specialized::SPECIALIZED
        } else {
            &[]
        };
        let functions = KERNELS
            .iter()
            .chain(extra)
            .map(|&name| {
                module
                    .load_function(name)
                    .map(|f| (name, f))
                    .map_err(|e| cuda_error(&format!("kernel `{name}`"), e))
            })
            .collect::<Result<_>>()?;
        Ok(Kernels {
            _module: module,
            functions,
        })
    }

    /// The loaded entry point named `name`, if any (a specialized kernel
    /// exists only for the shapes `pie build --config` baked in).
    pub fn find(&self, name: &str) -> Option<&'static str> {
        self.functions
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, _)| *n)
    }

    pub fn get(&self, name: &str) -> &CudaFunction {
        &self
            .functions
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("kernel `{name}` is listed in KERNELS"))
            .1
    }
}

/// Kernel images `pie build` compiled ahead of time (embedded by build.rs
/// when `PIE_CUDA_KERNELS` names their directory).
mod embedded {
    use std::sync::Arc;

    use cudarc::driver::CudaContext;
    use cudarc::nvrtc::Ptx;
    use pie_driver::Result;

    #[cfg(pie_embedded_kernels)]
    const CUBINS: [(i32, &[u8]); 3] = [
        (80, include_bytes!(concat!(env!("OUT_DIR"), "/sm_80.cubin"))),
        (89, include_bytes!(concat!(env!("OUT_DIR"), "/sm_89.cubin"))),
        (90, include_bytes!(concat!(env!("OUT_DIR"), "/sm_90.cubin"))),
    ];
    #[cfg(pie_embedded_kernels)]
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/compute_80.ptx"));

    /// The cubin for this GPU's architecture: an exact match, or the newest
    /// of the same major version not above it (SASS runs on later minors);
    /// else the PTX, which the driver compiles.
    #[cfg(pie_embedded_kernels)]
    pub fn image_for(ctx: &Arc<CudaContext>) -> Result<Option<Ptx>> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| super::cuda_error("reading the compute capability", e))?;
        let cc = major * 10 + minor;
        let cubin = CUBINS
            .iter()
            .filter(|(arch, _)| arch / 10 == major && *arch <= cc)
            .max_by_key(|(arch, _)| *arch);
        Ok(Some(match cubin {
            Some((_, bytes)) => Ptx::from_binary(bytes.to_vec()),
            None => Ptx::from_src(PTX),
        }))
    }

    #[cfg(not(pie_embedded_kernels))]
    pub fn image_for(_ctx: &Arc<CudaContext>) -> Result<Option<Ptx>> {
        Ok(None)
    }
}
