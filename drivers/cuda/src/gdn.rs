//! Gated DeltaNet on the GPU: input projections by cuBLAS, then three
//! kernels (`kernels/cuda/recurrent.cu`) — the causal convolution and the
//! delta-rule recurrence walk each sequence's tokens in order with the
//! state kept in the cache's state rows, and a gated RMSNorm — then the
//! output projection. Recurrent form only (exact; a chunked prefill form
//! is the next step for long prompts).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use pie_driver::ir::CompositeAttrs;
use pie_driver::{ForwardBatch, Result};

use crate::composite::OpArgs;
use crate::{cuda_err, CudaAct, CudaDriver, CudaKv, CudaWeight};

// Weight slots, in the op schema's order.
const QKV: usize = 0;
const Z: usize = 1;
const B: usize = 2;
const A: usize = 3;
const QKVZ: usize = 4;
const BA: usize = 5;
const CONV: usize = 6;
const DT_BIAS: usize = 7;
const A_LOG: usize = 8;
const NORM: usize = 9;
const OUT_PROJ: usize = 10;

impl CudaDriver {
    /// Qwen3-Next's fused `qkvz` / `ba` projections, regrouped as the
    /// separate ones (`pie_unfuse_qkvz`).
    #[allow(clippy::too_many_arguments)]
    fn unfuse(
        &self,
        x: &CudaAct,
        qkvz: &CudaWeight,
        ba: &CudaWeight,
        kh: usize,
        dk: usize,
        r: usize,
        dv: usize,
    ) -> Result<(CudaAct, CudaAct, CudaAct, CudaAct)> {
        let group = 2 * dk + 2 * r * dv;
        let fused = self.gemm(x, qkvz, kh * group)?;
        let ba = self.gemm(x, ba, 2 * kh * r)?;
        let (vh, rows) = (kh * r, x.rows);
        let mut mixed = self.act(rows, 2 * kh * dk + vh * dv)?;
        let mut z = self.act(rows, vh * dv)?;
        let mut b = self.act(rows, vh)?;
        let mut a = self.act(rows, vh)?;
        let (ri, khi, dki, rr, dvi) = (rows as i32, kh as i32, dk as i32, r as i32, dv as i32);
        let mut l = self
            .stream
            .launch_builder(self.kernels.get("pie_unfuse_qkvz"));
        l.arg(&mut mixed.data)
            .arg(&mut z.data)
            .arg(&mut b.data)
            .arg(&mut a.data)
            .arg(&fused.data)
            .arg(&ba.data)
            .arg(&ri)
            .arg(&khi)
            .arg(&dki)
            .arg(&rr)
            .arg(&dvi);
        unsafe { l.launch(crate::blocks(rows * kh * group)) }
            .map_err(cuda_err("pie_unfuse_qkvz"))?;
        Ok((mixed, z, b, a))
    }

    pub(crate) fn gated_delta_net(
        &self,
        x: &CudaAct,
        w: &[Option<&CudaWeight>],
        attrs: &CompositeAttrs,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
    ) -> Result<CudaAct> {
        let op = OpArgs {
            op: "gated_delta_net",
            attrs,
            weights: w,
        };
        let (hidden, kh, vh) = (
            op.usize("hidden")?,
            op.usize("key_heads")?,
            op.usize("value_heads")?,
        );
        let (dk, dv, kernel) = (
            op.usize("key_head_dim")?,
            op.usize("value_head_dim")?,
            op.usize("conv_kernel")?,
        );
        let eps = op.f32("eps", Some(1e-6))?;
        if kh == 0 || vh % kh != 0 || kernel == 0 || kernel > 8 || dv > 1024 {
            return Err(op.invalid(format!(
                "{vh} value heads over {kh} key heads, conv kernel {kernel} (1..=8), value_head_dim {dv} (<= 1024)"
            )));
        }
        let key_dim = kh * dk;
        let conv_dim = 2 * key_dim + vh * dv;
        let slot = op.usize("state_slot")?;
        let (mixed, z, b, a) = match op.optional(QKVZ) {
            Some(qkvz) => self.unfuse(x, qkvz, op.weight(BA, "ba")?, kh, dk, vh / kh, dv)?,
            None => (
                self.gemm(x, op.weight(QKV, "qkv")?, conv_dim)?,
                self.gemm(x, op.weight(Z, "z")?, vh * dv)?,
                self.gemm(x, op.weight(B, "b")?, vh)?,
                self.gemm(x, op.weight(A, "a")?, vh)?,
            ),
        };

        let seqs = self.seq_tables(batch)?;
        let (state, stride) = kv.state(slot, batch)?;
        let conv_len = (conv_dim * (kernel - 1)) as i64;
        let stride = stride as i64;
        let conved = self.causal_conv(
            &mixed,
            op.vector(CONV, "conv")?,
            None,
            kernel,
            state,
            stride,
            &seqs,
        )?;

        let mut core = self.act(x.rows, vh * dv)?;
        let (khi, vhi, dki, dvi) = (kh as i32, vh as i32, dk as i32, dv as i32);
        let mut launch = self
            .stream
            .launch_builder(self.kernels.get("pie_gated_delta_rule"));
        launch
            .arg(&mut core.data)
            .arg(&conved.data)
            .arg(&b.data)
            .arg(&a.data)
            .arg(op.vector(DT_BIAS, "dt_bias")?)
            .arg(op.vector(A_LOG, "a_log")?)
            .arg(&mut *state)
            .arg(&seqs.starts)
            .arg(&seqs.lens)
            .arg(&seqs.rows)
            .arg(&seqs.fresh)
            .arg(&khi)
            .arg(&vhi)
            .arg(&dki)
            .arg(&dvi)
            .arg(&stride)
            .arg(&conv_len);
        let cfg = LaunchConfig {
            grid_dim: (vh as u32, seqs.count, 1),
            block_dim: (dv as u32, 1, 1),
            shared_mem_bytes: ((2 * dk + 4) * 4) as u32,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_gated_delta_rule"))?;

        let mut normed = self.act(x.rows, vh * dv)?;
        let mut launch = self
            .stream
            .launch_builder(self.kernels.get("pie_gated_rms_norm"));
        launch
            .arg(&mut normed.data)
            .arg(&core.data)
            .arg(&z.data)
            .arg(op.vector(NORM, "norm")?)
            .arg(&dvi)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: ((x.rows * vh).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 128 * 4,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_gated_rms_norm"))?;
        self.gemm(&normed, op.weight(OUT_PROJ, "out_proj")?, hidden)
    }
}
