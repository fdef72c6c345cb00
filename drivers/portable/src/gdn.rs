//! Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention): a short causal
//! convolution over the q/k/v projections, then per value head a matrix
//! state `S` (key_dim × value_dim) that decays by `exp(g)` and takes a
//! delta-rule update each token; the output is `Sᵀq`, RMS-normalized and
//! gated by `silu(z)`.
//!
//! The delta rule itself runs in the form [`ChunkedScan`] picks per
//! sequence chunk (`delta_rule`): chunked for prefill, token by token for
//! decode.

use pie_driver::ir::CompositeAttrs;
use pie_driver::{ForwardBatch, Result};

use crate::delta_rule::{self, Inputs, Shape};
use crate::kv::KvCache;
use crate::recurrent::{
    project, rms_normalize, sigmoid, silu, softplus, Attrs, CausalConv, ChunkedScan,
};
use crate::tensor::{Act, Weight};

struct Dims {
    hidden: usize,
    key_heads: usize,
    value_heads: usize,
    dk: usize,
    dv: usize,
    kernel: usize,
    eps: f32,
}

impl Dims {
    fn key_dim(&self) -> usize {
        self.key_heads * self.dk
    }
    fn value_dim(&self) -> usize {
        self.value_heads * self.dv
    }
    fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
    fn shape(&self) -> Shape {
        Shape {
            key_heads: self.key_heads,
            value_heads: self.value_heads,
            dk: self.dk,
            dv: self.dv,
        }
    }
}

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

pub fn gated_delta_net(
    x: &Act,
    weights: &[Option<&Weight>],
    attrs: &CompositeAttrs,
    kv: &mut KvCache,
    batch: &ForwardBatch,
    scan: ChunkedScan,
) -> Result<Act> {
    let at = Attrs {
        op: "gated_delta_net",
        a: attrs,
    };
    let d = Dims {
        hidden: at.usize("hidden")?,
        key_heads: at.usize("key_heads")?,
        value_heads: at.usize("value_heads")?,
        dk: at.usize("key_head_dim")?,
        dv: at.usize("value_head_dim")?,
        kernel: at.usize("conv_kernel")?,
        eps: at.f32("eps")?,
    };
    x.expect_width(d.hidden, "gated_delta_net")?;
    if d.key_heads == 0 || !d.value_heads.is_multiple_of(d.key_heads) || d.kernel == 0 {
        return Err(at.invalid(format!(
            "value_heads {} must be a multiple of key_heads {}, conv_kernel at least 1",
            d.value_heads, d.key_heads
        )));
    }
    let slot = at.usize("state_slot")?;
    let Projections { mixed, z, b, a } = match weights.get(QKVZ).copied().flatten() {
        Some(qkvz) => fused_projections(&at, &d, x, qkvz, weights)?,
        None => Projections {
            mixed: project(x, at.weight(weights, QKV, "qkv")?, d.conv_dim()),
            z: project(x, at.weight(weights, Z, "z")?, d.value_dim()),
            b: project(x, at.weight(weights, B, "b")?, d.value_heads),
            a: project(x, at.weight(weights, A, "a")?, d.value_heads),
        },
    };
    let conv = CausalConv {
        weight: at.weight(weights, CONV, "conv")?.vector(),
        bias: None,
        channels: d.conv_dim(),
        kernel: d.kernel,
    };
    conv.check("gated_delta_net")?;
    let dt_bias = at.weight(weights, DT_BIAS, "dt_bias")?.vector();
    let a_log = at.weight(weights, A_LOG, "a_log")?.vector();
    let norm = at.weight(weights, NORM, "norm")?.vector();
    if dt_bias.len() != d.value_heads || a_log.len() != d.value_heads || norm.len() != d.dv {
        return Err(at.invalid(format!(
            "dt_bias/A_log need {} values and norm {}; found {}, {}, {}",
            d.value_heads,
            d.dv,
            dt_bias.len(),
            a_log.len(),
            norm.len()
        )));
    }

    let mut core = Act::zeros(x.rows, d.value_dim());
    let conv_len = d.conv_dim() * (d.kernel - 1);
    let shape = d.shape();
    for seq in &batch.seqs {
        let rows = seq.start..seq.start + seq.len;
        let state = kv.state(slot, seq)?;
        let (conv_state, delta_state) = state.split_at_mut(conv_len);
        let qkv = convolve(&d, &conv, conv_state, &mixed, rows.clone());
        let gates: Vec<(f32, f32)> = rows
            .clone()
            .flat_map(|row| {
                let (b, a) = (b.row(row), a.row(row));
                (0..d.value_heads).map(move |h| {
                    let g = -a_log[h].exp() * softplus(a[h] + dt_bias[h]);
                    (sigmoid(b[h]), g)
                })
            })
            .collect();
        let inputs = Inputs {
            qkv: &qkv,
            gates: &gates,
        };
        let out = &mut core.data[rows.start * d.value_dim()..rows.end * d.value_dim()];
        delta_rule::run(&shape, &inputs, delta_state, out, scan);
    }

    // Per value head: RMSNorm (weight, no offset), then the silu(z) gate.
    for (o, zr) in core
        .data
        .chunks_exact_mut(d.dv)
        .zip(z.data.chunks_exact(d.dv))
    {
        rms_normalize(o, d.eps);
        o.iter_mut()
            .zip(norm)
            .zip(zr)
            .for_each(|((v, w), g)| *v *= w * silu(*g));
    }
    Ok(project(
        &core,
        at.weight(weights, OUT_PROJ, "out_proj")?,
        d.hidden,
    ))
}

/// The input projections: `mixed` = q (all key heads), k, v (all value
/// heads) as the convolution expects; `z`, `b`, `a` per value head.
struct Projections {
    mixed: Act,
    z: Act,
    b: Act,
    a: Act,
}

/// Qwen3-Next's fused projections, grouped per key head — `qkvz` as
/// `[q, k, v (r heads), z (r heads)]` and `ba` as `[b (r), a (r)]` for each
/// key head, r = value_heads / key_heads — regrouped into [`Projections`].
fn fused_projections(
    at: &Attrs,
    d: &Dims,
    x: &Act,
    qkvz: &Weight,
    weights: &[Option<&Weight>],
) -> Result<Projections> {
    let r = d.value_heads / d.key_heads;
    let group = 2 * d.dk + 2 * r * d.dv;
    let fused = project(x, qkvz, d.key_heads * group);
    let ba = project(x, at.weight(weights, BA, "ba")?, 2 * d.value_heads);
    let mut p = Projections {
        mixed: Act::zeros(x.rows, d.conv_dim()),
        z: Act::zeros(x.rows, d.value_dim()),
        b: Act::zeros(x.rows, d.value_heads),
        a: Act::zeros(x.rows, d.value_heads),
    };
    let (kd, rv) = (d.dk, r * d.dv);
    for row in 0..x.rows {
        let src = fused.row(row);
        let mixed = &mut p.mixed.data[row * d.conv_dim()..(row + 1) * d.conv_dim()];
        let z = &mut p.z.data[row * d.value_dim()..(row + 1) * d.value_dim()];
        for h in 0..d.key_heads {
            let g = &src[h * group..(h + 1) * group];
            mixed[h * kd..(h + 1) * kd].copy_from_slice(&g[..kd]);
            let k_at = d.key_dim() + h * kd;
            mixed[k_at..k_at + kd].copy_from_slice(&g[kd..2 * kd]);
            let v_at = 2 * d.key_dim() + h * rv;
            mixed[v_at..v_at + rv].copy_from_slice(&g[2 * kd..2 * kd + rv]);
            z[h * rv..(h + 1) * rv].copy_from_slice(&g[2 * kd + rv..]);
            let bag = &ba.row(row)[h * 2 * r..(h + 1) * 2 * r];
            p.b.data[row * d.value_heads + h * r..][..r].copy_from_slice(&bag[..r]);
            p.a.data[row * d.value_heads + h * r..][..r].copy_from_slice(&bag[r..]);
        }
    }
    Ok(p)
}

/// The causal convolution of `rows` (continuing `conv_state`), with q and k
/// L2-normalized per key head and q scaled by `1/√dk`: the delta rule's
/// `[len][conv_dim]` input.
fn convolve(
    d: &Dims,
    conv: &CausalConv,
    conv_state: &mut [f32],
    mixed: &Act,
    rows: std::ops::Range<usize>,
) -> Vec<f32> {
    let mut qkv = vec![0f32; rows.len() * d.conv_dim()];
    let q_scale = 1.0 / (d.dk as f32).sqrt();
    for (row, out) in rows.zip(qkv.chunks_exact_mut(d.conv_dim())) {
        conv.step(conv_state, mixed.row(row), out);
        let heads = out[..2 * d.key_dim()].chunks_exact_mut(d.dk);
        for (i, head) in heads.enumerate() {
            let scale = if i < d.key_heads { q_scale } else { 1.0 };
            let inv = 1.0 / (head.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
            head.iter_mut().for_each(|v| *v *= inv * scale);
        }
    }
    qkv
}
