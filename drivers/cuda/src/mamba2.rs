//! Mamba2 mixer on the GPU: the input projection by cuBLAS, split into
//! gate, convolution input and time steps; the causal convolution and the
//! selective scan walk each sequence's tokens with the state in the
//! cache's state rows (`kernels/cuda/recurrent.cu`); then gate, group
//! RMSNorm and the output projection. Recurrent form only.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use pie_driver::ir::CompositeAttrs;
use pie_driver::{DriverError, ForwardBatch, Result};

use crate::{cuda_err, CudaAct, CudaDriver, CudaKv, CudaWeight};

// Weight slots, in the op schema's order.
const IN_PROJ: usize = 0;
const CONV: usize = 1;
const CONV_BIAS: usize = 2;
const DT_BIAS: usize = 3;
const A_LOG: usize = 4;
const D: usize = 5;
const NORM: usize = 6;
const OUT_PROJ: usize = 7;

fn get(a: &CompositeAttrs, key: &str) -> Result<usize> {
    a.usize(key)
        .map_err(|m| DriverError::Invalid(format!("mamba2: {m}")))?
        .ok_or_else(|| DriverError::Invalid(format!("mamba2: attribute `{key}` is missing")))
}

fn weight<'w>(w: &[Option<&'w CudaWeight>], i: usize, key: &str) -> Result<&'w CudaWeight> {
    w.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| DriverError::Invalid(format!("mamba2: weight `{key}` is missing")))
}

fn vector<'w>(
    w: &[Option<&'w CudaWeight>],
    i: usize,
    key: &str,
) -> Result<&'w cudarc::driver::CudaSlice<f32>> {
    weight(w, i, key)?
        .f32()
        .ok_or_else(|| DriverError::Invalid(format!("mamba2: `{key}` must be a float vector")))
}

impl CudaDriver {
    pub(crate) fn mamba2(
        &self,
        x: &CudaAct,
        w: &[Option<&CudaWeight>],
        attrs: &CompositeAttrs,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
    ) -> Result<CudaAct> {
        let (hidden, heads, hd) = (
            get(attrs, "hidden")?,
            get(attrs, "heads")?,
            get(attrs, "head_dim")?,
        );
        let (n_state, groups, kernel) = (
            get(attrs, "state")?,
            get(attrs, "groups")?,
            get(attrs, "conv_kernel")?,
        );
        let float = |key: &str, default: f64| -> Result<f32> {
            Ok(attrs
                .float(key)
                .map_err(|m| DriverError::Invalid(format!("mamba2: {m}")))?
                .unwrap_or(default) as f32)
        };
        let (eps, dt_min) = (float("eps", 1e-5)?, float("dt_min", 0.0)?);
        if groups == 0 || heads % groups != 0 || kernel == 0 || kernel > 8 || hd > 1024 {
            return Err(DriverError::Invalid(format!(
                "mamba2: {heads} heads in {groups} groups, conv kernel {kernel} (1..=8), head_dim {hd} (<= 1024)"
            )));
        }
        let inner = heads * hd;
        let conv_dim = inner + 2 * groups * n_state;
        let slot = get(attrs, "state_slot")?;
        let proj = self.gemm(x, weight(w, IN_PROJ, "in_proj")?, inner + conv_dim + heads)?;
        let mut parts = self
            .split_act(&proj, &[inner, conv_dim, heads], inner + conv_dim + heads)?
            .into_iter();
        let (gate, xbc_in, dt) = (
            parts.next().expect("three parts"),
            parts.next().expect("three parts"),
            parts.next().expect("three parts"),
        );

        let seq = |f: &dyn Fn(&pie_driver::SeqChunk) -> i32| -> Vec<i32> {
            batch.seqs.iter().map(f).collect()
        };
        let starts = self.upload(&seq(&|s| s.start as i32))?;
        let lens = self.upload(&seq(&|s| s.len as i32))?;
        let rows = self.upload(&seq(&|s| s.state as i32))?;
        let fresh = self.upload(&seq(&|s| i32::from(s.first_pos == 0)))?;
        let n_seqs = batch.seqs.len().max(1) as u32;
        let (state, stride) = kv.state(slot, batch)?;
        let stride = stride as i64;
        let conv_len = (conv_dim * (kernel - 1)) as i64;

        let mut xbc = self.act(x.rows, conv_dim)?;
        let conv_w = vector(w, CONV, "conv")?;
        let bias = w
            .get(CONV_BIAS)
            .copied()
            .flatten()
            .and_then(CudaWeight::f32);
        let has_bias = i32::from(bias.is_some());
        let (channels, k, zero) = (conv_dim as i32, kernel as i32, 0i64);
        let mut launch = self
            .stream
            .launch_builder(self.kernels.get("pie_causal_conv"));
        launch
            .arg(&mut xbc.data)
            .arg(&xbc_in.data)
            .arg(&mut *state)
            .arg(conv_w)
            .arg(bias.unwrap_or(conv_w))
            .arg(&has_bias)
            .arg(&starts)
            .arg(&lens)
            .arg(&rows)
            .arg(&fresh)
            .arg(&channels)
            .arg(&k)
            .arg(&stride)
            .arg(&zero);
        let cfg = LaunchConfig {
            grid_dim: (conv_dim.div_ceil(128) as u32, n_seqs, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_causal_conv"))?;

        let mut y = self.act(x.rows, inner)?;
        let (hi, hdi, ni, gi) = (heads as i32, hd as i32, n_state as i32, groups as i32);
        let mut launch = self
            .stream
            .launch_builder(self.kernels.get("pie_mamba2_scan"));
        launch
            .arg(&mut y.data)
            .arg(&xbc.data)
            .arg(&dt.data)
            .arg(vector(w, DT_BIAS, "dt_bias")?)
            .arg(vector(w, A_LOG, "a_log")?)
            .arg(vector(w, D, "d")?)
            .arg(&mut *state)
            .arg(&starts)
            .arg(&lens)
            .arg(&rows)
            .arg(&fresh)
            .arg(&hi)
            .arg(&hdi)
            .arg(&ni)
            .arg(&gi)
            .arg(&dt_min)
            .arg(&stride)
            .arg(&conv_len);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, n_seqs, 1),
            block_dim: (hd as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_mamba2_scan"))?;

        let group = inner / groups;
        let mut normed = self.act(x.rows, inner)?;
        let (group_i, width_i) = (group as i32, inner as i32);
        let mut launch = self
            .stream
            .launch_builder(self.kernels.get("pie_gate_group_norm"));
        launch
            .arg(&mut normed.data)
            .arg(&y.data)
            .arg(&gate.data)
            .arg(vector(w, NORM, "norm")?)
            .arg(&group_i)
            .arg(&width_i)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: ((x.rows * groups).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 128 * 4,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_gate_group_norm"))?;
        self.gemm(&normed, weight(w, OUT_PROJ, "out_proj")?, hidden)
    }
}
