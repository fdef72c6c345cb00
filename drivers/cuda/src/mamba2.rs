//! Mamba2 mixer on the GPU: the input projection by cuBLAS, split into
//! gate, convolution input and time steps; the causal convolution and the
//! selective scan walk each sequence's tokens with the state in the
//! cache's state rows (`kernels/cuda/recurrent.cu`); then gate, group
//! RMSNorm and the output projection. Recurrent form only.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use pie_driver::ir::CompositeAttrs;
use pie_driver::{ForwardBatch, Result};

use crate::composite::OpArgs;
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

impl CudaDriver {
    pub(crate) fn mamba2(
        &self,
        x: &CudaAct,
        w: &[Option<&CudaWeight>],
        attrs: &CompositeAttrs,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
    ) -> Result<CudaAct> {
        let op = OpArgs {
            op: "mamba2",
            attrs,
            weights: w,
        };
        let (hidden, heads, hd) = (
            op.usize("hidden")?,
            op.usize("heads")?,
            op.usize("head_dim")?,
        );
        let (n_state, groups, kernel) = (
            op.usize("state")?,
            op.usize("groups")?,
            op.usize("conv_kernel")?,
        );
        let (eps, dt_min) = (op.f32("eps", Some(1e-5))?, op.f32("dt_min", Some(0.0))?);
        if groups == 0 || heads % groups != 0 || kernel == 0 || kernel > 8 || hd > 1024 {
            return Err(op.invalid(format!(
                "{heads} heads in {groups} groups, conv kernel {kernel} (1..=8), head_dim {hd} (<= 1024)"
            )));
        }
        let inner = heads * hd;
        let conv_dim = inner + 2 * groups * n_state;
        let slot = op.usize("state_slot")?;
        let proj = self.gemm(x, op.weight(IN_PROJ, "in_proj")?, inner + conv_dim + heads)?;
        let mut parts = self
            .split_act(&proj, &[inner, conv_dim, heads], inner + conv_dim + heads)?
            .into_iter();
        let (gate, xbc_in, dt) = (
            parts.next().expect("three parts"),
            parts.next().expect("three parts"),
            parts.next().expect("three parts"),
        );

        let seqs = self.seq_tables(batch)?;
        let (state, stride) = kv.state(slot, batch)?;
        let stride = stride as i64;
        let conv_len = (conv_dim * (kernel - 1)) as i64;
        let bias = op.optional(CONV_BIAS).and_then(CudaWeight::f32);
        let conv_w = op.vector(CONV, "conv")?;
        let xbc = self.causal_conv(&xbc_in, conv_w, bias, kernel, state, stride, &seqs)?;

        let mut y = self.act(x.rows, inner)?;
        let (hi, hdi, ni, gi) = (heads as i32, hd as i32, n_state as i32, groups as i32);
        let mut launch = self
            .stream
            .launch_builder(self.kernels.get("pie_mamba2_scan"));
        launch
            .arg(&mut y.data)
            .arg(&xbc.data)
            .arg(&dt.data)
            .arg(op.vector(DT_BIAS, "dt_bias")?)
            .arg(op.vector(A_LOG, "a_log")?)
            .arg(op.vector(D, "d")?)
            .arg(&mut *state)
            .arg(&seqs.starts)
            .arg(&seqs.lens)
            .arg(&seqs.rows)
            .arg(&seqs.fresh)
            .arg(&hi)
            .arg(&hdi)
            .arg(&ni)
            .arg(&gi)
            .arg(&dt_min)
            .arg(&stride)
            .arg(&conv_len);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, seqs.count, 1),
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
            .arg(op.vector(NORM, "norm")?)
            .arg(&group_i)
            .arg(&width_i)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: ((x.rows * groups).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 128 * 4,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_gate_group_norm"))?;
        self.gemm(&normed, op.weight(OUT_PROJ, "out_proj")?, hidden)
    }
}
