//! Device tensors: f32 activations and weights in their file dtype (bf16
//! matrices stay bf16 for the GEMM; f16 is widened to f32 at load).

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::graphs;

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
    Bf16(Bf16Matrix),
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

/// A bf16 matrix `[out, in]` (bf16 bits): its own allocation, or a range of
/// one it shares with the matrices loaded together with it
/// (`Driver::load_weights_together`), which a fused call can then read as
/// one taller matrix.
pub struct Bf16Matrix {
    store: Arc<CudaSlice<u16>>,
    offset: usize,
    len: usize,
    /// The device address of the first element (kernel parameter).
    pub ptr: u64,
}

impl Bf16Matrix {
    pub fn new(data: CudaSlice<u16>) -> Self {
        let len = data.len();
        Self::part(Arc::new(data), 0, len)
    }

    /// Elements `[offset, offset + len)` of `store`.
    pub fn part(store: Arc<CudaSlice<u16>>, offset: usize, len: usize) -> Self {
        assert!(offset + len <= store.len(), "matrix outside its allocation");
        let ptr = graphs::address(&*store) + 2 * offset as u64;
        Bf16Matrix {
            store,
            offset,
            len,
            ptr,
        }
    }

    /// Elements (rows × columns).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `next` starts where this matrix ends, in the same allocation.
    pub fn followed_by(&self, next: &Bf16Matrix) -> bool {
        Arc::ptr_eq(&self.store, &next.store) && self.offset + self.len == next.offset
    }

    /// The matrices as one, when each follows the one before.
    pub fn span(parts: &[&Bf16Matrix]) -> Option<Bf16Matrix> {
        let first = parts.first()?;
        if !parts.windows(2).all(|w| w[0].followed_by(w[1])) {
            return None;
        }
        let len = parts.iter().map(|m| m.len).sum();
        Some(Bf16Matrix::part(first.store.clone(), first.offset, len))
    }
}
