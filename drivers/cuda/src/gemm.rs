//! Matrix products `out = x · Wᵀ` (x `[m, k]` f32, W `[n, k]`): the own
//! bf16 GEMV (`kernels/cuda/gemv.cu`) for decode-shaped inputs of at most
//! 4 rows, cuBLAS (`cublasGemmEx`, f32 accumulation) for the rest, or the
//! cuBLASLt algorithm measured fastest for a decode-sized shape
//! (`gemm_tuning.rs`). cuBLAS reads bf16 weights with bf16 inputs, so x is
//! cast once per input and the cast shared by every product of it
//! ([`GemmInput`]).

use std::cell::OnceCell;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pie_driver::{DriverError, Result};

use crate::gemm_tuning::{GemmOperands, GemmShape};
use crate::{blocks, cuda_err, int, Bf16Matrix, CudaAct, CudaDriver, CudaWeight};

/// Rows the own GEMV takes (`PIE_GEMV_MAX_ROWS`) and features per block
/// (`PIE_GEMV_FEATS`).
pub(crate) const GEMV_MAX_ROWS: usize = 4;
pub(crate) const GEMV_FEATS: usize = 4;

/// The input of one or more products, with its bf16 copy made on first use.
pub(crate) struct GemmInput<'a> {
    pub x: &'a CudaAct,
    bf16: OnceCell<CudaSlice<u16>>,
}

impl<'a> GemmInput<'a> {
    pub fn new(x: &'a CudaAct) -> Self {
        GemmInput {
            x,
            bf16: OnceCell::new(),
        }
    }

    fn bf16(&self, d: &CudaDriver) -> Result<&CudaSlice<u16>> {
        if let Some(b) = self.x.bf16.as_ref().or(self.bf16.get()) {
            return Ok(b);
        }
        let cast = d.to_bf16(self.x)?;
        Ok(self.bf16.get_or_init(|| cast))
    }
}

impl CudaDriver {
    /// `out = x · Wᵀ`, out `[m, n]`.
    pub(crate) fn gemm(&self, x: &CudaAct, w: &CudaWeight, n: usize) -> Result<CudaAct> {
        let mut out = self.act(x.rows, n)?;
        self.gemm_into(&GemmInput::new(x), w, &mut out, false)?;
        Ok(out)
    }

    /// `out = x · Wᵀ`, or `out += x · Wᵀ` with `accumulate` (a residual
    /// add folded into the product).
    pub(crate) fn gemm_into(
        &self,
        input: &GemmInput<'_>,
        w: &CudaWeight,
        out: &mut CudaAct,
        accumulate: bool,
    ) -> Result<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let x = input.x;
        let (m, k, n) = (x.rows, x.width, out.width);
        if out.rows != m {
            return Err(DriverError::Invalid(format!(
                "GEMM of {m} rows into an output of {} rows",
                out.rows
            )));
        }
        for (v, what) in [(m, "rows"), (n, "features"), (k, "width")] {
            int(v, what)?;
        }
        if accumulate {
            out.bf16 = None; // stale once the product is added in
        }
        let shape = GemmShape {
            m,
            n,
            k,
            accumulate,
        };
        match w {
            CudaWeight::F32(wd) => {
                let (a, _ga) = wd.device_ptr(&self.stream);
                let (b, _gb) = x.data.device_ptr(&self.stream);
                let (c, _gc) = out.data.device_ptr_mut(&self.stream);
                self.gemm_ex(shape, GemmOperands { w: a, x: b, out: c }, false)
            }
            CudaWeight::Experts(_) => Err(DriverError::Invalid(
                "expert weights are used one expert at a time".into(),
            )),
            CudaWeight::Bf16(wd) if self.gemv_fits(m, k) => self.gemv_bf16(x, wd, out, accumulate),
            CudaWeight::Bf16(wd) => {
                let xb = input.bf16(self)?;
                let (b, _gb) = xb.device_ptr(&self.stream);
                let (c, _gc) = out.data.device_ptr_mut(&self.stream);
                let ops = GemmOperands {
                    w: wd.ptr,
                    x: b,
                    out: c,
                };
                match self.gemm_plan(shape, ops)? {
                    Some(plan) => self.run_plan(&plan, ops, accumulate),
                    None => self.gemm_ex(shape, ops, true),
                }
            }
        }
    }

    /// `cublasGemmEx` on f32 or (`bf16`) bf16 operands, f32 output; the
    /// shape's sizes were checked to fit an i32.
    pub(crate) fn gemm_ex(&self, shape: GemmShape, ops: GemmOperands, bf16: bool) -> Result<()> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
        };
        let (mi, ni, ki) = (shape.m as i32, shape.n as i32, shape.k as i32);
        let dtype = if bf16 {
            cudaDataType::CUDA_R_16BF
        } else {
            cudaDataType::CUDA_R_32F
        };
        let (alpha, beta) = (1.0f32, if shape.accumulate { 1.0f32 } else { 0.0 });
        // Row-major out[m, n] = x[m, k] · W[n, k]ᵀ is column-major
        // outᵀ[n, m] = W[k, n]ᵀ · xᵀ[k, m].
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                &alpha as *const f32 as *const _,
                ops.w as *const _,
                dtype,
                ki,
                ops.x as *const _,
                dtype,
                ki,
                &beta as *const f32 as *const _,
                ops.out as *mut _,
                cudaDataType::CUDA_R_32F,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            let GemmShape { m, n, k, .. } = shape;
            DriverError::Invalid(format!("cuBLAS GEMM [{m}, {k}] x [{n}, {k}]ᵀ: {e}"))
        })
    }

    /// Whether `[m, k]` inputs take the own decode kernel (`gemv.cu`).
    pub(crate) fn gemv_fits(&self, m: usize, k: usize) -> bool {
        self.gemv && m <= GEMV_MAX_ROWS && k.is_multiple_of(8)
    }

    /// `out (+)= x · Wᵀ` for a few rows of x and a bf16 W `[n, k]`.
    fn gemv_bf16(
        &self,
        x: &CudaAct,
        w: &Bf16Matrix,
        out: &mut CudaAct,
        accumulate: bool,
    ) -> Result<()> {
        let (m, k) = (int(x.rows, "rows")?, int(x.width, "width")?);
        let n = out.width;
        let ni = int(n, "features")?;
        let kernel = self.gemv_kernel(
            match accumulate {
                true => "pie_gemv_add_bf16",
                false => "pie_gemv_bf16",
            },
            x.width,
            x.rows,
        );
        let mut b = self.launch(kernel);
        b.buf(&out.data)
            .buf(&x.data)
            .arg(&w.ptr)
            .arg(&m)
            .arg(&ni)
            .arg(&k);
        unsafe { b.launch(gemv_grid(n.div_ceil(GEMV_FEATS))) }?;
        Ok(())
    }

    pub(crate) fn to_bf16(&self, x: &CudaAct) -> Result<CudaSlice<u16>> {
        let n = x.rows * x.width;
        // Every element is written: no memset.
        let mut out = unsafe { self.stream.alloc::<u16>(n.max(1)) }
            .map_err(cuda_err("allocating GPU memory"))?;
        let ni = int(n, "elements")?;
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_cast_bf16"));
        b.arg(&mut out).arg(&x.data).arg(&ni);
        unsafe { b.launch(blocks(n)) }.map_err(cuda_err("pie_cast_bf16"))?;
        Ok(out)
    }
}

/// One block of 128 threads per `GEMV_FEATS` output features.
pub(crate) fn gemv_grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}
