//! Mixture of experts: route each token to its top-k experts, run every
//! expert once over the tokens routed to it (one matmul per expert and
//! projection, not one per token), and sum the weighted outputs; shared
//! experts run densely over every token.

use pie_driver::ir::CompositeAttrs;
use pie_driver::moe::{self, MoeParams};
use pie_driver::{DriverError, Result};

use crate::elementwise::{activation_fn, clamped_swiglu};
use crate::tensor::{Act, Weight};

/// The weights of a `moe` op, in the op schema's order.
struct MoeWeights<'a> {
    router: &'a Weight,
    router_bias: Option<&'a [f32]>,
    gate: Option<&'a Weight>,
    up: Option<&'a Weight>,
    gate_up: Option<&'a Weight>,
    down: &'a Weight,
    gate_bias: Option<&'a Weight>,
    up_bias: Option<&'a Weight>,
    gate_up_bias: Option<&'a Weight>,
    down_bias: Option<&'a Weight>,
    shared_gate: Option<&'a Weight>,
    shared_up: Option<&'a Weight>,
    shared_down: Option<&'a Weight>,
    shared_router: Option<&'a Weight>,
}

impl<'a> MoeWeights<'a> {
    fn new(w: &[Option<&'a Weight>]) -> Result<Self> {
        let [router, router_bias, gate, up, gate_up, down, gate_bias, up_bias, gate_up_bias, down_bias, shared_gate, shared_up, shared_down, shared_router] =
            w
        else {
            return Err(DriverError::Invalid(format!(
                "moe: expected 14 weight slots, got {}",
                w.len()
            )));
        };
        let missing = |k: &str| DriverError::Invalid(format!("moe: weight `{k}` is missing"));
        if up.is_none() && gate_up.is_none() {
            return Err(missing("up` or `gate_up"));
        }
        Ok(MoeWeights {
            router: router.ok_or_else(|| missing("router"))?,
            router_bias: router_bias.map(Weight::vector),
            gate: *gate,
            up: *up,
            gate_up: *gate_up,
            down: down.ok_or_else(|| missing("down"))?,
            gate_bias: *gate_bias,
            up_bias: *up_bias,
            gate_up_bias: *gate_up_bias,
            down_bias: *down_bias,
            shared_gate: *shared_gate,
            shared_up: *shared_up,
            shared_down: *shared_down,
            shared_router: *shared_router,
        })
    }
}

pub fn moe(x: &Act, weights: &[Option<&Weight>], attrs: &CompositeAttrs) -> Result<Act> {
    let p = MoeParams::from_attrs(attrs)?;
    let w = MoeWeights::new(weights)?;
    x.expect_width(p.hidden, "moe")?;
    let choices = route(x, &p, &w);

    let mut out = Act::zeros(x.rows, p.hidden);
    for e in 0..p.experts {
        // The tokens routed to expert `e`, with their routing weights.
        let (rows, scales): (Vec<usize>, Vec<f32>) = choices
            .iter()
            .enumerate()
            .flat_map(|(t, c)| {
                c.iter()
                    .filter(|(ce, _)| *ce == e)
                    .map(move |(_, s)| (t, *s))
            })
            .unzip();
        if rows.is_empty() {
            continue;
        }
        let xs = gather_rows(x, &rows);
        let y = expert_mlp(&xs, &p, &w, e);
        for ((&t, s), row) in rows.iter().zip(&scales).zip(y.data.chunks_exact(p.hidden)) {
            let dst = &mut out.data[t * p.hidden..(t + 1) * p.hidden];
            dst.iter_mut().zip(row).for_each(|(d, v)| *d += s * v);
        }
    }
    if let (Some(up), Some(down)) = (w.shared_up, w.shared_down) {
        shared_experts(x, &p, w.shared_gate, up, down, w.shared_router, &mut out);
    }
    Ok(out)
}

/// Each token's chosen experts and their weights.
fn route(x: &Act, p: &MoeParams, w: &MoeWeights) -> Vec<Vec<(usize, f32)>> {
    let mut logits = vec![0f32; x.rows * p.experts];
    w.router
        .matmul(&x.data, x.rows, p.hidden, p.experts, &mut logits);
    moe::route(&logits, p, w.router_bias)
}

/// `down(act(gate(x)) · up(x))` of expert `e` (`down(act(up(x)))` for
/// experts without a gate), biases included.
fn expert_mlp(x: &Act, p: &MoeParams, w: &MoeWeights, e: usize) -> Act {
    let (h, i) = (p.hidden, p.intermediate);
    let hidden = match (w.gate_up, w.gate, w.up) {
        (Some(gu), _, _) => {
            let mut both = project(x, gu.expert(e), 2 * i);
            add_bias(&mut both, w.gate_up_bias.map(|b| b.expert(e).vector()));
            let (g, u): (Vec<&[f32]>, Vec<&[f32]>) =
                both.data.chunks_exact(2 * i).map(|r| r.split_at(i)).unzip();
            glu_rows(g.into_iter().zip(u), i, p)
        }
        (None, Some(gate), Some(up)) => {
            let mut g = project(x, gate.expert(e), i);
            add_bias(&mut g, w.gate_bias.map(|b| b.expert(e).vector()));
            let mut u = project(x, up.expert(e), i);
            add_bias(&mut u, w.up_bias.map(|b| b.expert(e).vector()));
            glu_rows(g.data.chunks_exact(i).zip(u.data.chunks_exact(i)), i, p)
        }
        (None, None, Some(up)) => {
            let mut u = project(x, up.expert(e), i);
            add_bias(&mut u, w.up_bias.map(|b| b.expert(e).vector()));
            let f = activation_fn(p.act);
            u.data.iter_mut().for_each(|v| *v = f(*v));
            u
        }
        _ => unreachable!("MoeWeights::new requires `up` or `gate_up`"),
    };
    let mut y = project(&hidden, w.down.expert(e), h);
    add_bias(&mut y, w.down_bias.map(|b| b.expert(e).vector()));
    y
}

/// Shared experts: one dense MLP over every token, optionally scaled by a
/// per-token sigmoid gate (Qwen2-MoE), added to `out`.
fn shared_experts(
    x: &Act,
    p: &MoeParams,
    gate: Option<&Weight>,
    up: &Weight,
    down: &Weight,
    router: Option<&Weight>,
    out: &mut Act,
) {
    let i = p.shared_intermediate;
    let u = project(x, up, i);
    let hidden = match gate {
        Some(gate) => {
            let g = project(x, gate, i);
            glu_rows(g.data.chunks_exact(i).zip(u.data.chunks_exact(i)), i, p)
        }
        None => {
            let f = activation_fn(p.act);
            let mut u = u;
            u.data.iter_mut().for_each(|v| *v = f(*v));
            u
        }
    };
    let y = project(&hidden, down, p.hidden);
    let gates = router.map(|r| project(x, r, 1));
    for (t, (dst, row)) in out
        .data
        .chunks_exact_mut(p.hidden)
        .zip(y.data.chunks_exact(p.hidden))
        .enumerate()
    {
        let s = gates
            .as_ref()
            .map_or(1.0, |g| 1.0 / (1.0 + (-g.data[t]).exp()));
        dst.iter_mut().zip(row).for_each(|(d, v)| *d += s * v);
    }
}

fn glu_rows<'r>(
    rows: impl Iterator<Item = (&'r [f32], &'r [f32])>,
    width: usize,
    p: &MoeParams,
) -> Act {
    let f = activation_fn(p.act);
    let data: Vec<f32> = rows
        .flat_map(|(g, u)| {
            g.iter().zip(u).map(move |(&g, &u)| match p.limit {
                Some(limit) => clamped_swiglu(g, u, limit),
                None => f(g) * u,
            })
        })
        .collect();
    Act {
        rows: data.len() / width.max(1),
        data,
        width,
    }
}

fn project(x: &Act, w: &Weight, features: usize) -> Act {
    let mut out = Act::zeros(x.rows, features);
    w.matmul(&x.data, x.rows, x.width, features, &mut out.data);
    out
}

fn add_bias(x: &mut Act, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        crate::elementwise::add_bias(x, b);
    }
}

fn gather_rows(x: &Act, rows: &[usize]) -> Act {
    let mut data = Vec::with_capacity(rows.len() * x.width);
    for &r in rows {
        data.extend_from_slice(x.row(r));
    }
    Act {
        data,
        rows: rows.len(),
        width: x.width,
    }
}
