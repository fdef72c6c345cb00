//! Mamba2 selective state-space mixer (Nemotron-H, Zamba2, Mamba2): one
//! input projection into a gate, the convolved `x, B, C` and a time step
//! per head; per head a state `[head_dim, state]` decays by `exp(dt · A)`
//! and takes `dt · x ⊗ B` each token; the output `state · C + D · x` is
//! gated by `silu(gate)`, group-RMS-normalized and projected out.
//!
//! The scan itself runs in the form [`ChunkedScan`] picks per sequence
//! chunk (`ssd`): the SSD chunked scan for prefill, token by token for
//! decode.

use pie_driver::ir::CompositeAttrs;
use pie_driver::{ForwardBatch, Result};

use crate::kv::KvCache;
use crate::recurrent::{project, rms_normalize, silu, softplus, Attrs, CausalConv, ChunkedScan};
use crate::ssd::{self, Inputs, Shape};
use crate::tensor::{Act, Weight};

struct Dims {
    hidden: usize,
    heads: usize,
    head_dim: usize,
    state: usize,
    groups: usize,
    kernel: usize,
    eps: f32,
    dt_min: f32,
}

impl Dims {
    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
    fn conv_dim(&self) -> usize {
        self.inner() + 2 * self.groups * self.state
    }
}

// Weight slots, in the op schema's order.
const IN_PROJ: usize = 0;
const CONV: usize = 1;
const CONV_BIAS: usize = 2;
const DT_BIAS: usize = 3;
const A_LOG: usize = 4;
const D: usize = 5;
const NORM: usize = 6;
const OUT_PROJ: usize = 7;

pub fn mamba2(
    x: &Act,
    weights: &[Option<&Weight>],
    attrs: &CompositeAttrs,
    kv: &mut KvCache,
    batch: &ForwardBatch,
    scan: ChunkedScan,
) -> Result<Act> {
    let at = Attrs {
        op: "mamba2",
        a: attrs,
    };
    let d = Dims {
        hidden: at.usize("hidden")?,
        heads: at.usize("heads")?,
        head_dim: at.usize("head_dim")?,
        state: at.usize("state")?,
        groups: at.usize("groups")?,
        kernel: at.usize("conv_kernel")?,
        eps: at.f32("eps")?,
        dt_min: at.opt_f32("dt_min")?.unwrap_or(0.0),
    };
    x.expect_width(d.hidden, "mamba2")?;
    let slot = at.usize("state_slot")?;
    let proj_width = d.inner() + d.conv_dim() + d.heads;
    let proj = project(x, at.weight(weights, IN_PROJ, "in_proj")?, proj_width);
    let conv = CausalConv {
        weight: at.weight(weights, CONV, "conv")?.vector(),
        bias: weights
            .get(CONV_BIAS)
            .copied()
            .flatten()
            .map(Weight::vector),
        channels: d.conv_dim(),
        kernel: d.kernel,
    };
    conv.check("mamba2")?;
    let dt_bias = at.weight(weights, DT_BIAS, "dt_bias")?.vector();
    let a_log = at.weight(weights, A_LOG, "a_log")?.vector();
    let skip = at.weight(weights, D, "d")?.vector();
    let norm = at.weight(weights, NORM, "norm")?.vector();
    if [dt_bias.len(), a_log.len(), skip.len()] != [d.heads; 3] || norm.len() != d.inner() {
        return Err(at.invalid(format!(
            "dt_bias/A_log/D need {} values and norm {}",
            d.heads,
            d.inner()
        )));
    }

    let shape = Shape {
        heads: d.heads,
        head_dim: d.head_dim,
        state: d.state,
        groups: d.groups,
    };
    let a_neg: Vec<f32> = a_log.iter().map(|v| -v.exp()).collect();
    let mut y = Act::zeros(x.rows, d.inner());
    let conv_len = d.conv_dim() * (d.kernel - 1);
    for seq in &batch.seqs {
        let rows = seq.start..seq.start + seq.len;
        let state = kv.state(slot, seq)?;
        let (conv_state, ssm) = state.split_at_mut(conv_len);
        let mut xbc = vec![0f32; rows.len() * d.conv_dim()];
        let mut dt = Vec::with_capacity(rows.len() * d.heads);
        for (row, out) in rows.clone().zip(xbc.chunks_exact_mut(d.conv_dim())) {
            let (xbc_in, dt_raw) = proj.row(row)[d.inner()..].split_at(d.conv_dim());
            conv.step(conv_state, xbc_in, out);
            dt.extend(
                dt_raw
                    .iter()
                    .zip(dt_bias)
                    .map(|(r, b)| softplus(r + b).max(d.dt_min)),
            );
        }
        let inputs = Inputs {
            xbc: &xbc,
            dt: &dt,
            a: &a_neg,
            skip,
        };
        let out = &mut y.data[rows.start * d.inner()..rows.end * d.inner()];
        ssd::run(&shape, &inputs, ssm, out, scan);
    }
    // Gate, then RMSNorm per group (norm after gate, as Mamba2).
    for (out, p) in y
        .data
        .chunks_exact_mut(d.inner())
        .zip(proj.data.chunks_exact(proj_width))
    {
        out.iter_mut()
            .zip(&p[..d.inner()])
            .for_each(|(o, g)| *o *= silu(*g));
        for grp in out.chunks_exact_mut(d.inner() / d.groups) {
            rms_normalize(grp, d.eps);
        }
        out.iter_mut().zip(norm).for_each(|(o, w)| *o *= w);
    }
    Ok(project(
        &y,
        at.weight(weights, OUT_PROJ, "out_proj")?,
        d.hidden,
    ))
}
