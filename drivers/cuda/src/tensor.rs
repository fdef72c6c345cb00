//! Device tensors: f32 activations and weights in their file dtype (bf16
//! matrices stay bf16 for the GEMM; f16 is widened to f32 at load).

use cudarc::driver::CudaSlice;

/// An activation `[rows, width]`, row-major f32 in GPU memory.
pub struct CudaAct {
    pub data: CudaSlice<f32>,
    pub rows: usize,
    pub width: usize,
    /// Set on the logits of a replayed CUDA graph: the graph cannot run
    /// again until this activation (its allocation) is dropped.
    pub lease: Option<std::sync::Arc<()>>,
    /// The same values rounded to bf16, written by the kernel that made
    /// them when a cuBLAS GEMM will read them (saves a cast launch). Any
    /// in-place change of `data` must drop it.
    pub bf16: Option<CudaSlice<u16>>,
}

impl CudaAct {
    pub fn new(data: CudaSlice<f32>, rows: usize, width: usize) -> Self {
        CudaAct {
            data,
            rows,
            width,
            lease: None,
            bf16: None,
        }
    }
}

/// A weight in GPU memory.
pub enum CudaWeight {
    F32(CudaSlice<f32>),
    /// bf16 bits; matrices used by the bf16 GEMM and embedding gathers.
    Bf16(CudaSlice<u16>),
    /// One weight per expert of a `moe` op (`[out, in]`, gate rows first).
    Experts(Vec<CudaWeight>),
}

impl CudaWeight {
    pub fn f32(&self) -> Option<&CudaSlice<f32>> {
        match self {
            CudaWeight::F32(v) => Some(v),
            CudaWeight::Bf16(_) | CudaWeight::Experts(_) => None,
        }
    }

    /// Expert `e` of a `moe` weight.
    pub fn expert(&self, e: usize) -> Option<&CudaWeight> {
        match self {
            CudaWeight::Experts(list) => list.get(e),
            _ => None,
        }
    }
}
