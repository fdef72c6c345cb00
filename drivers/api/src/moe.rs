//! Mixture-of-experts routing: how a token's router logits become its
//! experts and their weights, for every routing variant the spec language
//! names. Pure arithmetic shared by the drivers (which run the experts).

use crate::ir::{ActivationFn, CompositeAttrs};
use crate::{DriverError, Result};

/// How router logits become expert choices and weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Softmax over all experts, then the top k (Mixtral, Qwen-MoE).
    SoftmaxTopk,
    /// Top k logits, then a softmax over those k (GPT-OSS).
    TopkSoftmax,
    /// PhiMoE's SparseMixer at inference: for each pick, the best
    /// remaining expert, weighted by a softmax over the experts whose
    /// logits are within a relative `2 · jitter` of it.
    Sparsemixer { jitter: f32 },
    /// Softmax over all experts; only the `topk_groups` groups with the
    /// highest single score compete for the top k (DeepSeek-V2's
    /// group-limited greedy; one group = plain greedy top-k).
    SoftmaxGroupTopk { groups: usize, topk_groups: usize },
    /// Sigmoid scores; experts chosen by score + bias within the best
    /// groups (DeepSeek-V3, Nemotron-H), weighted by the plain scores.
    SigmoidGroupTopk { groups: usize, topk_groups: usize },
}

/// A `moe` op's attributes, checked once per call.
pub struct MoeParams {
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    pub intermediate: usize,
    pub routing: Routing,
    pub norm_topk: bool,
    pub act: ActivationFn,
    pub limit: Option<f32>,
    pub routed_scale: f32,
    pub shared_intermediate: usize,
}

impl MoeParams {
    pub fn from_attrs(a: &CompositeAttrs) -> Result<Self> {
        let invalid = |m: String| DriverError::Invalid(format!("moe: {m}"));
        let required = |key: &str| {
            a.usize(key)
                .map_err(invalid)?
                .ok_or_else(|| invalid(format!("attribute `{key}` is missing")))
        };
        let routing = match a.name("routing").unwrap_or("softmax_topk") {
            "softmax_topk" => Routing::SoftmaxTopk,
            "topk_softmax" => Routing::TopkSoftmax,
            "sparsemixer" => Routing::Sparsemixer {
                jitter: a.float("jitter").map_err(invalid)?.unwrap_or(0.01) as f32,
            },
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

/// Each token's chosen experts and weights from router logits
/// (`[tokens, experts]`), `routed_scale` applied.
pub fn route(logits: &[f32], p: &MoeParams, router_bias: Option<&[f32]>) -> Vec<Vec<(usize, f32)>> {
    logits
        .chunks_exact(p.experts)
        .map(|l| {
            let mut chosen = choose(l, p, router_bias);
            chosen.iter_mut().for_each(|(_, s)| *s *= p.routed_scale);
            chosen
        })
        .collect()
}

/// The tokens routed to each expert, with their weights.
pub fn tokens_per_expert(
    choices: &[Vec<(usize, f32)>],
    experts: usize,
) -> Vec<(Vec<usize>, Vec<f32>)> {
    let mut out = vec![(Vec::new(), Vec::new()); experts];
    for (t, c) in choices.iter().enumerate() {
        for &(e, s) in c {
            out[e].0.push(t);
            out[e].1.push(s);
        }
    }
    out
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
        Routing::Sparsemixer { jitter } => sparsemixer(l, p.top_k, jitter),
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

/// SparseMixer (inference): pick the best expert, weight it by a softmax
/// over the experts close to it (relative gap ≤ 2·jitter), mask it out and
/// repeat, `top_k` times.
fn sparsemixer(scores: &[f32], top_k: usize, jitter: f32) -> Vec<(usize, f32)> {
    let mut masked = scores.to_vec();
    let mut chosen = Vec::with_capacity(top_k);
    for _ in 0..top_k {
        let best = self::top_k(&masked, 1)[0];
        let max = masked[best];
        let gated: Vec<f32> = masked
            .iter()
            .zip(scores)
            .map(|(&m, &s)| {
                let factor = s.abs().max(max);
                if (max - s) / factor > 2.0 * jitter {
                    f32::NEG_INFINITY
                } else {
                    m
                }
            })
            .collect();
        chosen.push((best, softmax(&gated)[best]));
        masked[best] = f32::NEG_INFINITY;
    }
    chosen
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
