//! Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-MoE-DSA):
//! keys and values of all heads come from one compressed latent `c` per
//! token, and the cache holds only `c` (kv_lora values) plus one shared
//! rope key (rope values) — `kv_lora + rope` floats a token instead of
//! `2 · heads · head_dim`.
//!
//! The up-projections are absorbed: a head's nope score `q_nope · (W_k c)`
//! is computed as `(W_kᵀ q_nope) · c`, and its output `W_v Σ p c` — so the
//! per-head keys and values are never materialized, in prefill or decode.
//!
//! With DeepSeek sparse attention (GLM-MoE-DSA) each query attends only to
//! the cached tokens the indexer picks (`indexer.rs`).

use pie_driver::ir::CompositeAttrs;
use pie_driver::{ForwardBatch, Result};
use rayon::prelude::*;

use crate::indexer;
use crate::kv::KvCache;
use crate::recurrent::{project, rms_normalize, Attrs};
use crate::rope;
use crate::tensor::{Act, Weight};

struct Dims {
    hidden: usize,
    heads: usize,
    kv_lora: usize,
    nope: usize,
    rope: usize,
    v: usize,
    eps: f32,
    scale: f32,
}

impl Dims {
    fn qk(&self) -> usize {
        self.nope + self.rope
    }
    fn cache_width(&self) -> usize {
        self.kv_lora + self.rope
    }
}

// Weight slots, in the op schema's order.
const Q: usize = 0;
const Q_A: usize = 1;
const Q_A_NORM: usize = 2;
const Q_B: usize = 3;
const KV_A: usize = 4;
const KV_A_NORM: usize = 5;
const KV_B: usize = 6;
const O: usize = 7;

pub fn mla_attention(
    x: &Act,
    weights: &[Option<&Weight>],
    attrs: &CompositeAttrs,
    kv: &mut KvCache,
    batch: &ForwardBatch,
) -> Result<Act> {
    let at = Attrs {
        op: "mla_attention",
        a: attrs,
    };
    let d = Dims {
        hidden: at.usize("hidden")?,
        heads: at.usize("heads")?,
        kv_lora: at.usize("kv_lora_rank")?,
        nope: at.usize("qk_nope_head_dim")?,
        rope: at.usize("qk_rope_head_dim")?,
        v: at.usize("v_head_dim")?,
        eps: at.f32("eps")?,
        scale: at.f32("scale")?,
    };
    x.expect_width(d.hidden, "mla_attention")?;
    let rope_attrs = attrs
        .rope
        .clone()
        .ok_or_else(|| at.invalid("the rope was not resolved at lowering"))?;
    let slot = at.usize("cache_slot")?;

    let (q, q_resid) = queries(&at, &d, x, weights)?;
    let latent = latents(&at, &d, x, weights, batch, &rope_attrs)?;
    write_cache(kv, slot, batch, &latent, d.cache_width())?;
    let picks = indexer::select(&at, x, q_resid.as_ref(), weights, kv, batch, &rope_attrs)?;

    // The key (first nope rows) and value (next v rows) up-projections of
    // each head, as f32 `[heads][nope + v][kv_lora]`.
    let kv_b = at
        .weight(weights, KV_B, "kv_b")?
        .dense_f32(d.heads * (d.nope + d.v), d.kv_lora);
    let q_rot = {
        let mut rot = Act::zeros(x.rows, d.heads * d.rope);
        for (dst, src) in rot
            .data
            .chunks_exact_mut(d.rope)
            .zip(q.data.chunks_exact(d.qk()))
        {
            dst.copy_from_slice(&src[d.nope..]);
        }
        rope::apply(&rot, &batch.positions, &rope_attrs)?
    };

    let mut out = Act::zeros(x.rows, d.heads * d.v);
    let kv: &KvCache = kv;
    let row_seq = batch.row_seqs();
    out.data
        .par_chunks_mut(d.heads * d.v)
        .enumerate()
        .for_each(|(row, out_row)| {
            let seq = &batch.seqs[row_seq[row]];
            let pos = seq.first_pos + (row - seq.start);
            let keys = match &picks {
                Some(p) => p.keys(row, pos),
                None => (0..=pos).collect(),
            };
            let cached: Vec<Vec<f32>> = keys
                .into_iter()
                .map(|j| {
                    let mut buf = vec![0f32; d.cache_width()];
                    kv.key(slot, kv.slot_of(seq, j), 0, &mut buf).to_vec()
                })
                .collect();
            for h in 0..d.heads {
                let q_nope = &q.row(row)[h * d.qk()..h * d.qk() + d.nope];
                let q_pe = &q_rot.row(row)[h * d.rope..(h + 1) * d.rope];
                let w = &kv_b[h * (d.nope + d.v) * d.kv_lora..(h + 1) * (d.nope + d.v) * d.kv_lora];
                let (w_k, w_v) = w.split_at(d.nope * d.kv_lora);
                let o = attend_head(&d, q_nope, q_pe, w_k, &cached);
                let oh = &mut out_row[h * d.v..(h + 1) * d.v];
                for (dst, wrow) in oh.iter_mut().zip(w_v.chunks_exact(d.kv_lora)) {
                    *dst = wrow.iter().zip(&o).map(|(a, b)| a * b).sum();
                }
            }
        });
    Ok(project(&out, at.weight(weights, O, "o")?, d.hidden))
}

/// One head over its sequence's cached latents: the softmax-weighted sum
/// of latents `Σ p_j c_j` (kv_lora values).
fn attend_head(
    d: &Dims,
    q_nope: &[f32],
    q_pe: &[f32],
    w_k: &[f32],
    cached: &[Vec<f32>],
) -> Vec<f32> {
    // Absorb the key up-projection into the query: W_kᵀ q_nope.
    let mut q_lat = vec![0f32; d.kv_lora];
    for (qn, wrow) in q_nope.iter().zip(w_k.chunks_exact(d.kv_lora)) {
        q_lat.iter_mut().zip(wrow).for_each(|(a, w)| *a += qn * w);
    }
    let scores: Vec<f32> = cached
        .iter()
        .map(|c| {
            let (lat, k_pe) = c.split_at(d.kv_lora);
            let nope: f32 = q_lat.iter().zip(lat).map(|(a, b)| a * b).sum();
            let pe: f32 = q_pe.iter().zip(k_pe).map(|(a, b)| a * b).sum();
            (nope + pe) * d.scale
        })
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let denom: f32 = exp.iter().sum();
    let mut o = vec![0f32; d.kv_lora];
    for (p, c) in exp.iter().zip(cached) {
        let w = p / denom;
        o.iter_mut()
            .zip(&c[..d.kv_lora])
            .for_each(|(a, b)| *a += w * b);
    }
    o
}

/// Queries `[rows, heads · (nope + rope)]`, through the low-rank path
/// (q_a → norm → q_b) when the model has one; then also the normalized
/// low-rank query, which the sparse indexer reads.
fn queries(
    at: &Attrs,
    d: &Dims,
    x: &Act,
    weights: &[Option<&Weight>],
) -> Result<(Act, Option<Act>)> {
    let width = d.heads * d.qk();
    if let Some(q) = weights.get(Q).copied().flatten() {
        return Ok((project(x, q, width), None));
    }
    let rank = at.usize("q_lora_rank")?;
    let mut qa = project(x, at.weight(weights, Q_A, "q_a")?, rank);
    let norm = at.weight(weights, Q_A_NORM, "q_a_norm")?.vector();
    for row in qa.data.chunks_exact_mut(rank) {
        rms_normalize(row, d.eps);
        row.iter_mut().zip(norm).for_each(|(v, w)| *v *= w);
    }
    let q = project(&qa, at.weight(weights, Q_B, "q_b")?, width);
    Ok((q, Some(qa)))
}

/// Each token's cache row: the normalized latent, then its rope key.
fn latents(
    at: &Attrs,
    d: &Dims,
    x: &Act,
    weights: &[Option<&Weight>],
    batch: &ForwardBatch,
    rope_attrs: &pie_driver::ir::RopeAttrs,
) -> Result<Act> {
    let mut ckv = project(x, at.weight(weights, KV_A, "kv_a")?, d.cache_width());
    let norm = at.weight(weights, KV_A_NORM, "kv_a_norm")?.vector();
    let mut k_pe = Act::zeros(x.rows, d.rope);
    for (row, pe) in ckv
        .data
        .chunks_exact_mut(d.cache_width())
        .zip(k_pe.data.chunks_exact_mut(d.rope))
    {
        let (lat, rot) = row.split_at_mut(d.kv_lora);
        rms_normalize(lat, d.eps);
        lat.iter_mut().zip(norm).for_each(|(v, w)| *v *= w);
        pe.copy_from_slice(rot);
    }
    // The rope key is one head shared by all query heads.
    let single = pie_driver::ir::RopeAttrs {
        heads: 1,
        ..rope_attrs.clone()
    };
    let k_pe = rope::apply(&k_pe, &batch.positions, &single)?;
    for (row, pe) in ckv
        .data
        .chunks_exact_mut(d.cache_width())
        .zip(k_pe.data.chunks_exact(d.rope))
    {
        row[d.kv_lora..].copy_from_slice(pe);
    }
    Ok(ckv)
}

fn write_cache(
    kv: &mut KvCache,
    slot: usize,
    batch: &ForwardBatch,
    latent: &Act,
    width: usize,
) -> Result<()> {
    for seq in &batch.seqs {
        kv.check_pages(seq)?;
        for t in 0..seq.len {
            let token_slot = kv.slot_of(seq, seq.first_pos + t);
            let row = &latent.data[(seq.start + t) * width..(seq.start + t + 1) * width];
            kv.write(slot, token_slot, row, &[]);
        }
    }
    Ok(())
}
