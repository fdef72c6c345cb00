//! Mixture of experts: route each token to its top-k experts, run every
//! expert once over the tokens routed to it (one matmul per expert and
//! projection, not one per token), and sum the weighted outputs; shared
//! experts run densely over every token.

use pie_driver::ir::{ActivationFn, CompositeAttrs};
use pie_driver::{DriverError, Result};

use crate::elementwise::{activation_fn, clamped_swiglu};
use crate::tensor::{Act, Weight};

/// How router logits become expert choices and weights.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Routing {
    /// Softmax over all experts, then the top k (Mixtral, Qwen-MoE).
    SoftmaxTopk,
    /// Top k logits, then a softmax over those k (GPT-OSS).
    TopkSoftmax,
    /// Softmax over all experts; only the `topk_groups` groups with the
    /// highest single score compete for the top k (DeepSeek-V2's
    /// group-limited greedy; one group = plain greedy top-k).
    SoftmaxGroupTopk { groups: usize, topk_groups: usize },
    /// Sigmoid scores; experts chosen by score + bias within the best
    /// groups (DeepSeek-V3, Nemotron-H), weighted by the plain scores.
    SigmoidGroupTopk { groups: usize, topk_groups: usize },
}

/// A `moe` op's attributes, checked once per call.
struct MoeParams {
    hidden: usize,
    experts: usize,
    top_k: usize,
    intermediate: usize,
    routing: Routing,
    norm_topk: bool,
    act: ActivationFn,
    limit: Option<f32>,
    routed_scale: f32,
    shared_intermediate: usize,
}

impl MoeParams {
    fn from_attrs(a: &CompositeAttrs) -> Result<Self> {
        let invalid = |m: String| DriverError::Invalid(format!("moe: {m}"));
        let required = |key: &str| {
            a.usize(key)
                .map_err(invalid)?
                .ok_or_else(|| invalid(format!("attribute `{key}` is missing")))
        };
        let routing = match a.name("routing").unwrap_or("softmax_topk") {
            "softmax_topk" => Routing::SoftmaxTopk,
            "topk_softmax" => Routing::TopkSoftmax,
            "softmax_group_topk" => Routing::SoftmaxGroupTopk {
                groups: a.usize("groups").map_err(invalid)?.unwrap_or(1).max(1),
                topk_groups: a.usize("topk_groups").map_err(invalid)?.unwrap_or(1).max(1),
            },
            "sigmoid_group_topk" => Routing::SigmoidGroupTopk {
                groups: a.usize("groups").map_err(invalid)?.unwrap_or(1).max(1),
                topk_groups: a.usize("topk_groups").map_err(invalid)?.unwrap_or(1).max(1),
            },
            other => return Err(invalid(format!("unknown routing `{other}`"))),
        };
        let act = ActivationFn::from_spec_name(a.name("act").unwrap_or("silu"))
            .ok_or_else(|| invalid("unknown activation".into()))?;
        let p = MoeParams {
            hidden: required("hidden")?,
            experts: required("experts")?,
            top_k: required("top_k")?,
            intermediate: required("intermediate")?,
            routing,
            norm_topk: a.flag("norm_topk").map_err(invalid)?,
            act,
            limit: a.float("limit").map_err(invalid)?.map(|l| l as f32),
            routed_scale: a.float("routed_scale").map_err(invalid)?.unwrap_or(1.0) as f32,
            shared_intermediate: a
                .usize("shared_intermediate")
                .map_err(invalid)?
                .unwrap_or(0),
        };
        if p.top_k == 0 || p.top_k > p.experts {
            return Err(invalid(format!(
                "top_k {} must be in 1..={} (the expert count)",
                p.top_k, p.experts
            )));
        }
        if let Routing::SigmoidGroupTopk {
            groups,
            topk_groups,
        }
        | Routing::SoftmaxGroupTopk {
            groups,
            topk_groups,
        } = p.routing
        {
            if !p.experts.is_multiple_of(groups) || topk_groups > groups {
                return Err(invalid(format!(
                    "{} experts cannot form {groups} groups with {topk_groups} chosen",
                    p.experts
                )));
            }
        }
        Ok(p)
    }
}

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
    logits
        .chunks_exact(p.experts)
        .map(|l| {
            let mut chosen = choose(l, p, w.router_bias);
            chosen.iter_mut().for_each(|(_, s)| *s *= p.routed_scale);
            chosen
        })
        .collect()
}

/// One token's experts and weights (before `routed_scale`).
fn choose(l: &[f32], p: &MoeParams, router_bias: Option<&[f32]>) -> Vec<(usize, f32)> {
    match p.routing {
        Routing::SoftmaxTopk => {
            let l = with_bias(l, router_bias);
            let probs = softmax(&l);
            let mut chosen: Vec<(usize, f32)> = top_k(&probs, p.top_k)
                .into_iter()
                .map(|e| (e, probs[e]))
                .collect();
            if p.norm_topk {
                normalize(&mut chosen);
            }
            chosen
        }
        Routing::TopkSoftmax => {
            let l = with_bias(l, router_bias);
            let idx = top_k(&l, p.top_k);
            let probs = softmax(&idx.iter().map(|&e| l[e]).collect::<Vec<_>>());
            idx.into_iter().zip(probs).collect()
        }
        Routing::SigmoidGroupTopk {
            groups,
            topk_groups,
        } => {
            let scores: Vec<f32> = l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            // The bias steers the choice only (load balancing); the
            // weights are the plain scores.
            let choice = with_bias(&scores, router_bias);
            let per_group = p.experts / groups;
            let group_score: Vec<f32> = choice
                .chunks_exact(per_group)
                .map(|g| top_k(g, 2.min(per_group)).iter().map(|&i| g[i]).sum())
                .collect();
            let keep = top_k(&group_score, topk_groups);
            let masked: Vec<f32> = choice
                .iter()
                .enumerate()
                .map(|(e, &v)| {
                    if keep.contains(&(e / per_group)) {
                        v
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let mut chosen: Vec<(usize, f32)> = top_k(&masked, p.top_k)
                .into_iter()
                .map(|e| (e, scores[e]))
                .collect();
            if p.norm_topk {
                let sum: f32 = chosen.iter().map(|(_, s)| s).sum::<f32>() + 1e-20;
                chosen.iter_mut().for_each(|(_, s)| *s /= sum);
            }
            chosen
        }
        Routing::SoftmaxGroupTopk {
            groups,
            topk_groups,
        } => {
            let probs = softmax(&with_bias(l, router_bias));
            let per_group = p.experts / groups;
            let group_max: Vec<f32> = probs
                .chunks_exact(per_group)
                .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                .collect();
            let keep = top_k(&group_max, topk_groups);
            let masked: Vec<f32> = probs
                .iter()
                .enumerate()
                .map(|(e, &v)| {
                    if keep.contains(&(e / per_group)) {
                        v
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut chosen: Vec<(usize, f32)> = top_k(&masked, p.top_k)
                .into_iter()
                .map(|e| (e, masked[e]))
                .collect();
            if p.norm_topk {
                normalize(&mut chosen);
            }
            chosen
        }
    }
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

fn with_bias(v: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    match bias {
        Some(b) => v.iter().zip(b).map(|(x, b)| x + b).collect(),
        None => v.to_vec(),
    }
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

fn normalize(chosen: &mut [(usize, f32)]) {
    let sum: f32 = chosen.iter().map(|(_, s)| s).sum();
    chosen.iter_mut().for_each(|(_, s)| *s /= sum);
}

/// Indices of the `k` largest values, largest first (lower index wins ties,
/// as `torch.topk` does on CPU).
fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_largest_first() {
        assert_eq!(top_k(&[0.1, 0.7, 0.3, 0.7], 3), vec![1, 3, 2]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[2] > p[1] && p[1] > p[0]);
    }
}
