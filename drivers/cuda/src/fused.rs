//! Fused kernels for the op patterns codegen groups (`codegen/src/fusion.rs`,
//! `kernels/cuda/fused.cu`). Each returns None where its kernel does not
//! apply (f32 weights, biases, more than a few rows for the GEMV ones,
//! shapes the kernel does not cover), and the driver then runs the ops one
//! by one. With `linear_add` (in `lib.rs`: the down projection
//! accumulates into the residual) and attention's folded combine, Qwen3's
//! decode takes 9 launches per layer instead of 19.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use pie_driver::ir::*;
use pie_driver::{DriverError, ForwardBatch, NormRopePart, PreNorm, Result};

use crate::gemm::{gemv_grid, GEMV_FEATS};
use crate::grouped_attention::{contiguous_heads, QkNormRope};
use crate::{cuda_err, graphs, int, weight_or_null, Bf16Matrix, CudaAct, CudaDriver, CudaWeight};

/// A bf16 matrix without a bias, or None.
fn plain_bf16<'w>(w: &'w CudaWeight, bias: Option<&CudaWeight>) -> Option<&'w Bf16Matrix> {
    match (w, bias) {
        (CudaWeight::Bf16(w), None) => Some(w),
        _ => None,
    }
}

impl CudaDriver {
    fn fusing_gemv(&self, x: &CudaAct, attrs: &[&LinearAttrs]) -> bool {
        self.fuse
            && self.gemv_fits(x.rows, x.width)
            && attrs.iter().all(|a| a.in_features == x.width)
    }

    /// Two or three bias-free bf16 products of one input in one launch;
    /// with `norm`, of the input's RMS norm (`pie_gemv3_norm_bf16`).
    pub(crate) fn fused_linear_many(
        &self,
        x: &CudaAct,
        norm: Option<PreNorm<'_, Self>>,
        weights: &[&CudaWeight],
        biases: &[Option<&CudaWeight>],
        attrs: &[&LinearAttrs],
    ) -> Result<Option<Vec<CudaAct>>> {
        let norm_fits = norm.is_none_or(|(_, n)| whole_row_norm(x, n));
        if !(2..=3).contains(&weights.len()) || !self.fusing_gemv(x, attrs) || !norm_fits {
            return Ok(None);
        }
        let Some(ws) = weights
            .iter()
            .zip(biases)
            .map(|(w, b)| plain_bf16(w, *b))
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let outs = attrs
            .iter()
            .map(|a| self.act(x.rows, a.out_features))
            .collect::<Result<Vec<_>>>()?;
        // A third product of width 0 when there are two: it gets no blocks.
        let ns = attrs
            .iter()
            .map(|a| int(a.out_features, "features"))
            .chain(std::iter::once(Ok(0)))
            .take(3)
            .collect::<Result<Vec<i32>>>()?;
        let (m, k) = (int(x.rows, "rows")?, int(x.width, "width")?);
        let blocks: usize = attrs
            .iter()
            .map(|a| a.out_features.div_ceil(GEMV_FEATS))
            .sum();
        let addr = |i: usize| {
            outs.get(i)
                .map_or(0, |o: &CudaAct| graphs::address(&o.data))
        };
        let (o0, o1, o2) = (addr(0), addr(1), addr(2));
        let w = |i: usize| ws.get(i).map_or(0, |w| w.ptr);
        let (w0, w1, w2) = (w(0), w(1), w(2));
        let kernel = self.gemv_kernel(
            match norm {
                Some(_) => "pie_gemv3_norm_bf16",
                None => "pie_gemv3_bf16",
            },
            x.width,
            x.rows,
        );
        let mut b = self.launch(kernel);
        b.arg(&o0).arg(&w0).arg(&ns[0]);
        b.arg(&o1).arg(&w1).arg(&ns[1]);
        b.arg(&o2).arg(&w2).arg(&ns[2]);
        b.buf(&x.data);
        let norm_args = norm.map(|(w, n)| (weight_or_null(w), n));
        if let Some(((g, has_g), n)) = &norm_args {
            b.arg(g).arg(has_g).arg(&n.eps).arg(&n.offset);
        }
        b.arg(&m).arg(&k);
        // The outputs are passed as raw addresses (absent ones as 0): the
        // kernel picks its product by block index.
        unsafe { b.launch(gemv_grid(blocks)) }?;
        Ok(Some(outs))
    }

    /// `glu(x·Wgᵀ, x·Wuᵀ)` in one launch for bias-free bf16 weights.
    pub(crate) fn fused_gated_linear(
        &self,
        x: &CudaAct,
        gate: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        up: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        a: &GluAttrs,
    ) -> Result<Option<CudaAct>> {
        Ok(self.glu_gemv(x, None, gate, up, a)?.map(|(_, out)| out))
    }

    /// `(x + y, glu(n · Wgᵀ, n · Wuᵀ))` with `n = rms_norm(x + y)` in one
    /// launch (`pie_gemv_glu_norm_bf16`).
    #[allow(clippy::too_many_arguments)] // the ops' own operands, one each
    pub(crate) fn fused_add_norm_gated_linear(
        &self,
        x: &CudaAct,
        y: &CudaAct,
        norm: PreNorm<'_, Self>,
        gate: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        up: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        a: &GluAttrs,
    ) -> Result<Option<(CudaAct, CudaAct)>> {
        let same_shape = x.rows == y.rows && x.width == y.width;
        if !same_shape || !whole_row_norm(x, norm.1) {
            return Ok(None);
        }
        let fused = self.glu_gemv(x, Some((y, norm)), gate, up, a)?;
        Ok(fused.and_then(|(sum, out)| Some((sum?, out))))
    }

    /// The GLU GEMV launch: of `x`, or with `added` = (y, norm) of
    /// `rms_norm(x + y)`, then also returning `x + y`. None where the
    /// weights or shapes do not fit the kernels.
    fn glu_gemv(
        &self,
        x: &CudaAct,
        added: Option<(&CudaAct, PreNorm<'_, Self>)>,
        gate: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        up: (&CudaWeight, Option<&CudaWeight>, &LinearAttrs),
        a: &GluAttrs,
    ) -> Result<Option<(Option<CudaAct>, CudaAct)>> {
        let n = gate.2.out_features;
        if up.2.out_features != n || a.width != n || !self.fusing_gemv(x, &[gate.2, up.2]) {
            return Ok(None);
        }
        let (Some(wg), Some(wu)) = (plain_bf16(gate.0, gate.1), plain_bf16(up.0, up.1)) else {
            return Ok(None);
        };
        let out = self.act(x.rows, n)?;
        let (m, ni, k) = (
            int(x.rows, "rows")?,
            int(n, "features")?,
            int(x.width, "width")?,
        );
        let (func, limit) = (a.func.kernel_code(), a.limit.unwrap_or(0.0));
        let kernel = self.glu_kernel(
            match added {
                Some(_) => "pie_gemv_glu_norm_bf16",
                None => "pie_gemv_glu_bf16",
            },
            x.width,
            x.rows,
            a.func,
            a.limit,
        );
        let sum = added.map(|_| self.act(x.rows, x.width)).transpose()?;
        let mut b = self.launch(kernel);
        b.buf(&out.data);
        let norm_args = added.map(|(y, (w, norm))| (y, weight_or_null(w), norm));
        match (&sum, &norm_args) {
            (Some(sum), Some((y, (g, has_g), norm))) => {
                b.buf(&sum.data)
                    .buf(&x.data)
                    .buf(&y.data)
                    .arg(&1i32)
                    .arg(g)
                    .arg(has_g)
                    .arg(&norm.eps)
                    .arg(&norm.offset);
            }
            _ => {
                b.buf(&x.data);
            }
        }
        b.arg(&wg.ptr)
            .arg(&wu.ptr)
            .arg(&m)
            .arg(&ni)
            .arg(&k)
            .arg(&func)
            .arg(&limit);
        unsafe { b.launch(gemv_grid(n.div_ceil(GEMV_FEATS))) }?;
        Ok(Some((sum, out)))
    }

    /// `(x + y, rms_norm(x + y))` in one launch.
    pub(crate) fn fused_add_rms_norm(
        &self,
        x: &CudaAct,
        y: &CudaAct,
        w: Option<&CudaWeight>,
        norm: &RmsNormAttrs,
    ) -> Result<Option<(CudaAct, CudaAct)>> {
        let shapes_fit = x.rows == y.rows && x.width == y.width && x.width == norm.width;
        if !self.fuse || !shapes_fit || norm.group == 0 || !norm.width.is_multiple_of(norm.group) {
            return Ok(None);
        }
        let (weight, has) = weight_or_null(w);
        let mut sum = self.act(x.rows, x.width)?;
        let (mut out, shadow) = self.act_with_bf16_copy(x.rows, x.width)?;
        let groups = x.rows * (x.width / norm.group);
        let g = int(norm.group, "group")?;
        let (kernel, cfg) = norm_launch(
            ["pie_add_rms_norm", "pie_add_rms_norm4"],
            groups,
            norm.group,
        );
        let mut b = self.stream.launch_builder(self.kernels.get(kernel));
        b.arg(&mut sum.data)
            .arg(&mut out.data)
            .arg(&shadow)
            .arg(&x.data)
            .arg(&y.data)
            .arg(&weight)
            .arg(&has)
            .arg(&g)
            .arg(&norm.eps)
            .arg(&norm.offset);
        unsafe { b.launch(cfg) }.map_err(cuda_err(kernel))?;
        Ok(Some((sum, out)))
    }

    /// `rope(rms_norm(x))` with per-head norms, one block per head.
    pub(crate) fn fused_rms_norm_rope(
        &self,
        x: &CudaAct,
        w: Option<&CudaWeight>,
        norm: &RmsNormAttrs,
        batch: &ForwardBatch,
        rope: &RopeAttrs,
    ) -> Result<Option<CudaAct>> {
        if !self.fuse || !per_head_norm_rope(x, norm, rope, batch) {
            return Ok(None);
        }
        if rope.rotary_dim > rope.head_dim || !rope.rotary_dim.is_multiple_of(2) {
            return Err(DriverError::Invalid(format!(
                "rope of {} features in heads of {}",
                rope.rotary_dim, rope.head_dim
            )));
        }
        let inputs = self.rope_inputs(batch, rope)?;
        let (weight, has) = weight_or_null(w);
        let out = self.act(x.rows, x.width)?;
        let (heads, hd, rd) = (
            rope.heads as i32,
            rope.head_dim as i32,
            rope.rotary_dim as i32,
        );
        let interleaved = i32::from(rope.style == RopeStyle::Interleaved);
        let mut b = self.launch("pie_rms_norm_rope");
        b.buf(&out.data)
            .buf(&x.data)
            .arg(&weight)
            .arg(&has)
            .arg(&norm.eps)
            .arg(&norm.offset);
        inputs.push(&mut b);
        b.arg(&heads).arg(&hd).arg(&rd).arg(&interleaved);
        let cfg = norm_grid(x.rows * rope.heads, rope.head_dim);
        unsafe { b.launch(cfg) }?;
        Ok(Some(out))
    }

    /// Two per-head norm + ropes (queries, keys) with the same rope in one
    /// launch.
    pub(crate) fn fused_rms_norm_rope2(
        &self,
        a: NormRopePart<'_, Self>,
        b: NormRopePart<'_, Self>,
        batch: &ForwardBatch,
    ) -> Result<Option<(CudaAct, CudaAct)>> {
        let fits = |(x, _, norm, rope): NormRopePart<'_, Self>| {
            per_head_norm_rope(x, norm, rope, batch)
                && rope.rotary_dim <= rope.head_dim
                && rope.rotary_dim.is_multiple_of(2)
        };
        let (ra, rb) = (a.3, b.3);
        if !self.fuse || !fits(a) || !fits(b) || !same_rope(ra, rb) || a.0.rows != b.0.rows {
            return Ok(None);
        }
        let inputs = self.rope_inputs(batch, ra)?;
        let (wa, has_a) = weight_or_null(a.1);
        let (wb, has_b) = weight_or_null(b.1);
        let out_a = self.act(a.0.rows, a.0.width)?;
        let out_b = self.act(b.0.rows, b.0.width)?;
        let rows = int(a.0.rows, "rows")?;
        let (heads_a, heads_b) = (ra.heads as i32, rb.heads as i32);
        let (hd, rd) = (ra.head_dim as i32, ra.rotary_dim as i32);
        let interleaved = i32::from(ra.style == RopeStyle::Interleaved);
        let mut l = self.launch("pie_rms_norm_rope2");
        l.buf(&out_a.data)
            .buf(&a.0.data)
            .arg(&wa)
            .arg(&has_a)
            .arg(&a.2.eps)
            .arg(&a.2.offset)
            .arg(&heads_a);
        l.buf(&out_b.data)
            .buf(&b.0.data)
            .arg(&wb)
            .arg(&has_b)
            .arg(&b.2.eps)
            .arg(&b.2.offset)
            .arg(&heads_b);
        l.arg(&rows);
        inputs.push(&mut l);
        l.arg(&hd).arg(&rd).arg(&interleaved);
        let cfg = norm_grid(a.0.rows * (ra.heads + rb.heads), ra.head_dim);
        unsafe { l.launch(cfg) }?;
        Ok(Some((out_a, out_b)))
    }
}

impl CudaDriver {
    /// The q/k norms and rope the folded decode attention can apply itself
    /// (`PieQkNormRope`, grouped_attention.cu), or None where that launch
    /// would not take them: not a decode step of one token per sequence
    /// folding its keys into the cache, head dims other than 128 (fully
    /// rotated, halves split), or different ropes for q and k.
    pub(crate) fn attention_norm_rope(
        &self,
        q: NormRopePart<'_, Self>,
        k: NormRopePart<'_, Self>,
        batch: &ForwardBatch,
        a: &AttentionAttrs,
    ) -> Result<Option<QkNormRope>> {
        // The rope turns the attention's whole (128-dim) heads.
        let fits = |(x, _, norm, rope): NormRopePart<'_, Self>, heads: usize| {
            per_head_norm_rope(x, norm, rope, batch)
                && rope.heads == heads
                && rope.head_dim == a.head_dim
                && rope.rotary_dim == a.head_dim
                && rope.style != RopeStyle::Interleaved
        };
        let decode = batch.seqs.iter().all(|s| s.len == 1 && s.mask.is_none());
        let folds = contiguous_heads(a)
            && a.kv_from.is_none()
            && q.0.rows == k.0.rows
            && self.gqa_fits(a)
            && self.gqa_folds(q.0.rows, a);
        let takes = self.fuse
            && self.attention_norm_rope
            && decode
            && folds
            && same_rope(q.3, k.3)
            && fits(q, a.heads)
            && fits(k, a.kv_heads);
        if !takes {
            return Ok(None);
        }
        let ((q_w, _), (k_w, _)) = (weight_or_null(q.1), weight_or_null(k.1));
        Ok(Some(QkNormRope {
            on: 1,
            q_w,
            k_w,
            q_eps: q.2.eps,
            k_eps: k.2.eps,
            q_offset: q.2.offset,
            k_offset: k.2.offset,
            rope: self.rope_inputs(batch, q.3)?,
        }))
    }
}

/// Whether two ropes are the same but for their head counts (queries and
/// keys rotated in one launch).
fn same_rope(a: &RopeAttrs, b: &RopeAttrs) -> bool {
    RopeAttrs {
        heads: b.heads,
        ..a.clone()
    } == *b
}

/// Widest input the GEMVs take a norm into. Each block re-reads the whole
/// input row (and with the fold also the norm weight, and the residual
/// for the add): cheap next to a small layer's launch latency, but at
/// Qwen3-8B's 4096 features that L2 traffic slowed batch 1 from 5.64 to
/// 7.03 ms/step (H200), while 0.6B's 1024 went from 1.39 to 1.23 ms.
const NORM_FOLD_MAX_WIDTH: usize = 2048;

/// Whether the GEMV kernels with a norm folded in take this norm: over
/// each whole row of `x`, at most [`NORM_FOLD_MAX_WIDTH`] wide.
fn whole_row_norm(x: &CudaAct, norm: &RmsNormAttrs) -> bool {
    norm.width == x.width && norm.group == x.width && x.width <= NORM_FOLD_MAX_WIDTH
}

/// Whether the norm is per head of the rope's heads, over the batch's
/// rows, in heads the fused kernels stage (≤ 512 features).
fn per_head_norm_rope(
    x: &CudaAct,
    norm: &RmsNormAttrs,
    rope: &RopeAttrs,
    batch: &ForwardBatch,
) -> bool {
    norm.group == rope.head_dim
        && norm.width == rope.heads * rope.head_dim
        && x.width == norm.width
        && batch.positions.len() == x.rows
        && rope.head_dim <= 512
}

/// One block per group, a power of two of 32..256 threads.
pub(crate) fn norm_grid(groups: usize, group: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (groups.max(1) as u32, 1, 1),
        block_dim: (group.next_power_of_two().clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Features a thread of the register-held norms keeps at most
/// (`PIE_NORM_CHUNKS` float4s, `kernels/cuda/norm_rope.cu`).
const NORM4_PER_THREAD: usize = 16;

/// Features each thread of the register-held norms takes where the row
/// allows (up to 1024 threads): one float4, so every load of the row is in
/// flight at once. H100, Qwen3-8B (rows of 4096, 2026-12-05): 5.88 ms/step
/// at batch 1 and 7.98 at batch 64, against 5.996 and 8.02–8.21 with 16
/// features a thread and 5.90 / 7.89–8.04 with 8. `PIE_CUDA_NORM_PER_THREAD`
/// = 8 or 16 for A/B runs.
const NORM_FEATURES_PER_THREAD: usize = 4;

fn norm_features_per_thread() -> usize {
    static CHOSEN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        std::env::var("PIE_CUDA_NORM_PER_THREAD")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|v| [4, 8, 16].contains(v))
            .unwrap_or(NORM_FEATURES_PER_THREAD)
    })
}

/// Which of a norm's two kernels `[strided, registers]` runs, and its
/// launch: the register-held one (`pie_rms_norm4`, `pie_add_rms_norm4`)
/// with enough threads that each holds 4 features (at most 16, past 4096
/// features), or the strided
/// one where the group does not fit it; one block per group either way.
pub(crate) fn norm_launch(
    [strided, registers]: [&'static str; 2],
    groups: usize,
    group: usize,
) -> (&'static str, LaunchConfig) {
    if !group.is_multiple_of(4) || group > NORM4_PER_THREAD * 1024 {
        return (strided, norm_grid(groups, group));
    }
    let threads = group
        .div_ceil(norm_features_per_thread())
        .next_power_of_two()
        .clamp(32, 1024);
    let cfg = LaunchConfig {
        grid_dim: (groups.max(1) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    (registers, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every register-held launch covers its row with at most
    /// `PIE_NORM_CHUNKS` (4) float4s a thread, from 32 to 1024 threads.
    #[test]
    fn register_norms_cover_their_rows() {
        const KERNELS: [&str; 2] = ["strided", "registers"];
        for group in [4, 96, 1024, 4096, 4100, 5120, 8192, 16384] {
            let (kernel, cfg) = norm_launch(KERNELS, 3, group);
            let threads = cfg.block_dim.0 as usize;
            assert_eq!(kernel, "registers", "{group}");
            assert_eq!(cfg.grid_dim.0, 3);
            assert!((32..=1024).contains(&threads), "{group}: {threads}");
            assert!(threads * NORM4_PER_THREAD >= group, "{group}: {threads}");
        }
        assert_eq!(norm_launch(KERNELS, 1, 4096).1.block_dim.0, 1024);
        assert_eq!(norm_launch(KERNELS, 1, 1024).1.block_dim.0, 256);
        // Past what 1024 threads hold, or groups not of whole float4s.
        assert_eq!(norm_launch(KERNELS, 1, 16388).0, "strided");
        assert_eq!(norm_launch(KERNELS, 1, 1026).0, "strided");
    }
}
