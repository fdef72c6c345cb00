//! Mamba2 selective state-space mixer (Nemotron-H, Zamba2, Mamba2): one
//! input projection into a gate, the convolved `x, B, C` and a time step
//! per head; per head a state `[head_dim, state]` decays by `exp(dt · A)`
//! and takes `dt · x ⊗ B` each token; the output `state · C + D · x` is
//! gated by `silu(gate)`, group-RMS-normalized and projected out.
//!
//! This runs the recurrent form token by token — exact, and the reference
//! for the chunked scan a GPU driver uses for prefill.

use pie_driver::ir::CompositeAttrs;
use pie_driver::{ForwardBatch, Result};

use crate::kv::KvCache;
use crate::recurrent::{project, rms_normalize, silu, softplus, Attrs, CausalConv};
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

    let mut y = Act::zeros(x.rows, d.inner());
    let conv_len = d.conv_dim() * (d.kernel - 1);
    for seq in &batch.seqs {
        let state = kv.state(slot, seq)?;
        let (conv_state, ssm) = state.split_at_mut(conv_len);
        let mut xbc = vec![0f32; d.conv_dim()];
        for row in seq.start..seq.start + seq.len {
            let p = proj.row(row);
            let (gate, rest) = p.split_at(d.inner());
            let (xbc_in, dt_raw) = rest.split_at(d.conv_dim());
            conv.step(conv_state, xbc_in, &mut xbc);
            let out = &mut y.data[row * d.inner()..(row + 1) * d.inner()];
            ssm_step(&d, &xbc, dt_raw, dt_bias, a_log, skip, ssm, out);
            // Gate, then RMSNorm per group (norm after gate, as Mamba2).
            out.iter_mut().zip(gate).for_each(|(o, g)| *o *= silu(*g));
            for grp in out.chunks_exact_mut(d.inner() / d.groups) {
                rms_normalize(grp, d.eps);
            }
            out.iter_mut().zip(norm).for_each(|(o, w)| *o *= w);
        }
    }
    Ok(project(
        &y,
        at.weight(weights, OUT_PROJ, "out_proj")?,
        d.hidden,
    ))
}

/// One token of the selective scan for every head; `ssm` is
/// `[heads][head_dim][state]`.
#[allow(clippy::too_many_arguments)]
fn ssm_step(
    d: &Dims,
    xbc: &[f32],
    dt_raw: &[f32],
    dt_bias: &[f32],
    a_log: &[f32],
    skip: &[f32],
    ssm: &mut [f32],
    out: &mut [f32],
) {
    let (xs, bc) = xbc.split_at(d.inner());
    let (b_all, c_all) = bc.split_at(d.groups * d.state);
    let heads_per_group = d.heads / d.groups;
    for h in 0..d.heads {
        let g = h / heads_per_group;
        let b = &b_all[g * d.state..(g + 1) * d.state];
        let c = &c_all[g * d.state..(g + 1) * d.state];
        let dt = softplus(dt_raw[h] + dt_bias[h]).max(d.dt_min);
        let decay = (dt * -a_log[h].exp()).exp();
        let xh = &xs[h * d.head_dim..(h + 1) * d.head_dim];
        let sh = &mut ssm[h * d.head_dim * d.state..(h + 1) * d.head_dim * d.state];
        for (p, (&xp, srow)) in xh.iter().zip(sh.chunks_exact_mut(d.state)).enumerate() {
            let mut acc = 0f32;
            for ((s, &bn), &cn) in srow.iter_mut().zip(b).zip(c) {
                *s = *s * decay + dt * bn * xp;
                acc += *s * cn;
            }
            out[h * d.head_dim + p] = acc + skip[h] * xp;
        }
    }
}
