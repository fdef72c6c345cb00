//! Matrices stored together and multiplied as one. A fused call's q/k/v or
//! gate/up weights are loaded into one allocation
//! (`Driver::load_weights_together`); past the GEMV's few rows, one cuBLAS
//! GEMM over the joined `[n0 + n1 (+ n2), k]` matrix replaces two or three
//! narrower ones, which at decode batch sizes read their weights at a
//! fraction of the bandwidth (the k and v projections most: few columns,
//! few tiles). One light kernel then splits the product (q/k/v) or applies
//! the GLU to it (gate/up).

use std::sync::Arc;

use cudarc::driver::PushKernelArg;
use pie_driver::ir::{GluAttrs, LinearAttrs};
use pie_driver::{DType, Result, WeightPart};

use crate::gemm::GemmInput;
use crate::tensor::Bf16Matrix;
use crate::{blocks, cuda_err, graphs, int, CudaAct, CudaDriver, CudaWeight};

impl CudaDriver {
    /// `parts` in one allocation, in order, when all are bf16 matrices of
    /// one width with the shapes expected; None otherwise (then each is
    /// loaded on its own, which reports any mismatch).
    pub(crate) fn upload_together(
        &self,
        parts: &[WeightPart<'_>],
    ) -> Result<Option<Vec<CudaWeight>>> {
        let width = parts.first().and_then(|p| p.expected.get(1)).copied();
        let fits = |p: &WeightPart<'_>| {
            p.view.dtype == DType::BF16
                && p.expected.len() == 2
                && p.view.shape == p.expected
                && Some(p.expected[1]) == width
                && p.view.data.len() == 2 * p.expected[0] * p.expected[1]
        };
        if parts.len() < 2 || !parts.iter().all(fits) {
            return Ok(None);
        }
        let total: usize = parts.iter().map(|p| p.view.data.len() / 2).sum();
        let mut bits = Vec::with_capacity(total);
        for p in parts {
            bits.extend(
                p.view
                    .data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]])),
            );
        }
        let store = Arc::new(self.upload(&bits)?);
        self.note_bf16_matrices();
        let mut offset = 0;
        Ok(Some(
            parts
                .iter()
                .map(|p| {
                    let len = p.view.data.len() / 2;
                    let m = Bf16Matrix::part(store.clone(), offset, len);
                    offset += len;
                    CudaWeight::Bf16(m)
                })
                .collect(),
        ))
    }

    /// The products of `x` with `weights` stored together, as one GEMM
    /// and a split; None unless the weights are consecutive bf16 parts of
    /// one allocation, without biases, and the batch is past the GEMV.
    pub(crate) fn joined_linear_many(
        &self,
        x: &CudaAct,
        weights: &[&CudaWeight],
        biases: &[Option<&CudaWeight>],
        attrs: &[&LinearAttrs],
    ) -> Result<Option<Vec<CudaAct>>> {
        if weights.len() > 3 || biases.iter().any(Option::is_some) {
            return Ok(None);
        }
        let Some(joined) = self.joined_product(x, weights, attrs)? else {
            return Ok(None);
        };
        let outs = attrs
            .iter()
            .map(|a| self.act(x.rows, a.out_features))
            .collect::<Result<Vec<_>>>()?;
        let width = |i: usize| {
            attrs
                .get(i)
                .map_or(Ok(0), |a| int(a.out_features, "features"))
        };
        let (n0, n1, n2) = (width(0)?, width(1)?, width(2)?);
        let address = |i: usize| outs.get(i).map_or(0, |o| graphs::address(&o.data));
        let (o0, o1, o2) = (address(0), address(1), address(2));
        let rows = int(x.rows, "rows")?;
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_split_joined"));
        b.arg(&o0)
            .arg(&o1)
            .arg(&o2)
            .arg(&joined.data)
            .arg(&rows)
            .arg(&n0)
            .arg(&n1)
            .arg(&n2);
        unsafe { b.launch(blocks(joined.rows * joined.width)) }
            .map_err(cuda_err("pie_split_joined"))?;
        Ok(Some(outs))
    }

    /// `glu(x·Wgᵀ, x·Wuᵀ)` as one GEMM over gate and up stored together
    /// and one GLU launch; None where [`Self::joined_linear_many`] would be.
    pub(crate) fn joined_gated_linear(
        &self,
        x: &CudaAct,
        gate: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        up: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        a: &GluAttrs,
    ) -> Result<Option<CudaAct>> {
        let n = gate.2.out_features;
        if gate.1.is_some() || up.1.is_some() || up.2.out_features != n || a.width != n {
            return Ok(None);
        }
        let Some(gu) = self.joined_product(x, &[gate.0, up.0], &[gate.2, up.2])? else {
            return Ok(None);
        };
        let (mut out, shadow) = self.act_with_bf16_copy(x.rows, n)?;
        let (f, limit) = (a.func.kernel_code(), a.limit.unwrap_or(0.0));
        let (rows, ni) = (int(x.rows, "rows")?, int(n, "features")?);
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_glu_joined"));
        b.arg(&mut out.data)
            .arg(&shadow)
            .arg(&gu.data)
            .arg(&f)
            .arg(&limit)
            .arg(&rows)
            .arg(&ni);
        unsafe { b.launch(blocks(x.rows * n)) }.map_err(cuda_err("pie_glu_joined"))?;
        Ok(Some(out))
    }

    /// `x · [W0; W1; ..]ᵀ`, `[rows, Σ n]`, when the weights are consecutive
    /// parts of one allocation and the rows take the cuBLAS path.
    fn joined_product(
        &self,
        x: &CudaAct,
        weights: &[&CudaWeight],
        attrs: &[&LinearAttrs],
    ) -> Result<Option<CudaAct>> {
        if !(self.fuse && self.join)
            || self.gemv_fits(x.rows, x.width)
            || attrs.iter().any(|a| a.in_features != x.width)
        {
            return Ok(None);
        }
        let matrices = weights
            .iter()
            .map(|w| match w {
                CudaWeight::Bf16(m) => Some(m),
                _ => None,
            })
            .collect::<Option<Vec<_>>>();
        let Some(span) = matrices.and_then(|m| Bf16Matrix::span(&m)) else {
            return Ok(None);
        };
        let n: usize = attrs.iter().map(|a| a.out_features).sum();
        if span.len() != n * x.width {
            return Ok(None);
        }
        let mut out = self.act(x.rows, n)?;
        self.gemm_into(&GemmInput::new(x), &CudaWeight::Bf16(span), &mut out, false)?;
        Ok(Some(out))
    }
}
