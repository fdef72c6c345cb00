//! Gated DeltaNet on the GPU: input projections by cuBLAS, then three
//! kernels (`kernels/cuda/recurrent.cu`) — the causal convolution and the
//! delta-rule recurrence walk each sequence's tokens in order with the
//! state kept in the cache's state rows, and a gated RMSNorm — then the
//! output projection. Recurrent form only (exact; a chunked prefill form
//! is the next step for long prompts).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use pie_driver::ir::CompositeAttrs;
use pie_driver::{DriverError, ForwardBatch, Result};

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

fn get(a: &CompositeAttrs, key: &str) -> Result<usize> {
    a.usize(key)
        .map_err(|m| DriverError::Invalid(format!("gated_delta_net: {m}")))?
        .ok_or_else(|| {
            DriverError::Invalid(format!("gated_delta_net: attribute `{key}` is missing"))
        })
}

fn weight<'w>(w: &[Option<&'w CudaWeight>], i: usize, key: &str) -> Result<&'w CudaWeight> {
    w.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| DriverError::Invalid(format!("gated_delta_net: weight `{key}` is missing")))
}

fn vector<'w>(
    w: &[Option<&'w CudaWeight>],
    i: usize,
    key: &str,
) -> Result<&'w cudarc::driver::CudaSlice<f32>> {
    weight(w, i, key)?.f32().ok_or_else(|| {
        DriverError::Invalid(format!("gated_delta_net: `{key}` must be a float vector"))
    })
}

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
        let (hidden, kh, vh) = (
            get(attrs, "hidden")?,
            get(attrs, "key_heads")?,
            get(attrs, "value_heads")?,
        );
        let (dk, dv, kernel) = (
            get(attrs, "key_head_dim")?,
            get(attrs, "value_head_dim")?,
            get(attrs, "conv_kernel")?,
        );
        let eps = attrs
            .float("eps")
            .map_err(|m| DriverError::Invalid(format!("gated_delta_net: {m}")))?
            .unwrap_or(1e-6) as f32;
        if kh == 0 || vh % kh != 0 || kernel == 0 || kernel > 8 || dv > 1024 {
            return Err(DriverError::Invalid(format!(
                "gated_delta_net: {vh} value heads over {kh} key heads, conv kernel {kernel} (1..=8), value_head_dim {dv} (<= 1024)"
            )));
        }
        let key_dim = kh * dk;
        let conv_dim = 2 * key_dim + vh * dv;
        let slot = get(attrs, "state_slot")?;
        let (mixed, z, b, a) = match w.get(QKVZ).copied().flatten() {
            Some(qkvz) => self.unfuse(x, qkvz, weight(w, BA, "ba")?, kh, dk, vh / kh, dv)?,
            None => (
                self.gemm(x, weight(w, QKV, "qkv")?, conv_dim)?,
                self.gemm(x, weight(w, Z, "z")?, vh * dv)?,
                self.gemm(x, weight(w, B, "b")?, vh)?,
                self.gemm(x, weight(w, A, "a")?, vh)?,
            ),
        };

        let seq = |f: &dyn Fn(&pie_driver::SeqChunk) -> i32| -> Vec<i32> {
            batch.seqs.iter().map(f).collect()
        };
        let starts = self.upload(&seq(&|s| s.start as i32))?;
        let lens = self.upload(&seq(&|s| s.len as i32))?;
        let rows = self.upload(&seq(&|s| s.state as i32))?;
        let fresh = self.upload(&seq(&|s| i32::from(s.first_pos == 0)))?;
        let n_seqs = batch.seqs.len().max(1) as u32;
        let (state, stride) = kv.state(slot, batch)?;
        let conv_len = (conv_dim * (kernel - 1)) as i64;
        let stride = stride as i64;

        let mut conved = self.act(x.rows, conv_dim)?;
        let (channels, k) = (conv_dim as i32, kernel as i32);
        let (has_bias, zero_offset) = (0i32, 0i64);
        let conv_w = vector(w, CONV, "conv")?;
        let mut launch = self
            .stream
            .launch_builder(self.kernels.get("pie_causal_conv"));
        launch
            .arg(&mut conved.data)
            .arg(&mixed.data)
            .arg(&mut *state)
            .arg(conv_w)
            .arg(conv_w)
            .arg(&has_bias)
            .arg(&starts)
            .arg(&lens)
            .arg(&rows)
            .arg(&fresh)
            .arg(&channels)
            .arg(&k)
            .arg(&stride)
            .arg(&zero_offset);
        let cfg = LaunchConfig {
            grid_dim: (conv_dim.div_ceil(128) as u32, n_seqs, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_causal_conv"))?;

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
            .arg(vector(w, DT_BIAS, "dt_bias")?)
            .arg(vector(w, A_LOG, "a_log")?)
            .arg(&mut *state)
            .arg(&starts)
            .arg(&lens)
            .arg(&rows)
            .arg(&fresh)
            .arg(&khi)
            .arg(&vhi)
            .arg(&dki)
            .arg(&dvi)
            .arg(&stride)
            .arg(&conv_len);
        let cfg = LaunchConfig {
            grid_dim: (vh as u32, n_seqs, 1),
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
            .arg(vector(w, NORM, "norm")?)
            .arg(&dvi)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: ((x.rows * vh).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 128 * 4,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_gated_rms_norm"))?;
        self.gemm(&normed, weight(w, OUT_PROJ, "out_proj")?, hidden)
    }
}
