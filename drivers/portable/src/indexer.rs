//! DeepSeek sparse attention's indexer (GLM-MoE-DSA): a small scorer that
//! picks, for every query, the `index_topk` cached tokens its MLA layer
//! attends to.
//!
//! A layer with indexer weights caches one key per token (`index_head_dim`
//! values, in its own KV slot `index_slot`):
//! `k = LayerNorm(x · W_kᵀ)` (eps 1e-6, with bias), its first
//! `qk_rope_head_dim` values rotated by the MLA layer's rope, pair
//! convention included (transformers 5.17 rotates GLM-MoE-DSA's indexer
//! with the same adjacent-pair helper as its attention; earlier versions
//! used rotate-half there, and the parity fixture tells them apart). A
//! query has `index_heads` heads of the same width from the low-rank query
//! `q_resid = rms_norm(x · W_q_aᵀ)`: `q = q_resid · W_qᵀ`, roped alike.
//! Query `s` scores every visible key `t`:
//!
//! `score[s, t] = Σ_h w[s, h] · relu(q[s, h] · k[t] / √index_head_dim)`,
//! `w = x · W_wᵀ / √index_heads`,
//!
//! and attends to its `index_topk` best (transformers'
//! `GlmMoeDsaIndexer`). A query that sees no more keys than that attends
//! to all of them, as dense attention would. Equal scores prefer the
//! earlier position (torch's `topk` documents no order for ties).
//!
//! A layer that declares `index_topk` without indexer weights (`indexer_types
//! [i] == 'shared'`) reuses the picks of the last layer that has them, made
//! earlier in the same pass; they wait in the KV cache ([`KvCache::picks`]).

use std::sync::Arc;

use pie_driver::ir::RopeAttrs;
use pie_driver::math::top_k_indices;
use pie_driver::{ForwardBatch, Result};
use rayon::prelude::*;

use crate::elementwise::layer_norm;
use crate::kv::KvCache;
use crate::recurrent::{project, Attrs};
use crate::rope;
use crate::tensor::{Act, Weight};

// Weight slots of `mla_attention`, in the op schema's order.
const INDEXER_WQ: usize = 8;
const INDEXER_WK: usize = 9;
const INDEXER_K_NORM: usize = 10;
const INDEXER_K_NORM_BIAS: usize = 11;
const INDEXER_WEIGHTS: usize = 12;

/// transformers' `nn.LayerNorm(index_head_dim, eps=1e-6)`.
const K_NORM_EPS: f32 = 1e-6;

/// The keys each query of one pass attends to.
#[derive(Debug)]
pub struct Picks {
    /// The pass's token positions, to check that a sharing layer reuses
    /// picks of the same pass.
    positions: Vec<u32>,
    /// Per batch row: the chosen positions in ascending order, or None
    /// when the query sees at most `index_topk` keys and takes them all.
    rows: Vec<Option<Vec<u32>>>,
}

impl Picks {
    /// The positions row `row` attends to: its picks, or `0 ..= pos`.
    pub fn keys(&self, row: usize, pos: usize) -> Vec<usize> {
        match &self.rows[row] {
            Some(p) => p.iter().map(|&t| t as usize).collect(),
            None => (0..=pos).collect(),
        }
    }
}

/// The pass's picks for this layer: None for MLA without an indexer (every
/// key is attended). `q_resid` is the normalized low-rank query.
pub fn select(
    at: &Attrs,
    x: &Act,
    q_resid: Option<&Act>,
    weights: &[Option<&Weight>],
    kv: &mut KvCache,
    batch: &ForwardBatch,
    rope_attrs: &RopeAttrs,
) -> Result<Option<Arc<Picks>>> {
    let Some(slot) = at.opt_usize("index_slot")? else {
        return Ok(None);
    };
    if weights.get(INDEXER_WK).copied().flatten().is_none() {
        // A sharing layer: the picks an earlier layer made in this pass.
        let picks = kv.picks(slot).ok_or_else(|| {
            at.invalid(format!(
                "no sparse-indexer picks of slot {slot} in this pass"
            ))
        })?;
        if picks.positions != batch.positions {
            return Err(at.invalid(format!(
                "the sparse-indexer picks of slot {slot} belong to another pass"
            )));
        }
        return Ok(Some(picks));
    }
    let topk = at.usize("index_topk")?;
    let heads = at.usize("index_heads")?;
    let dim = at.usize("index_head_dim")?;
    let rope_dim = at.usize("qk_rope_head_dim")?;
    let q_resid =
        q_resid.ok_or_else(|| at.invalid("the sparse indexer needs the low-rank query path"))?;
    // The indexer's rope: the MLA rope (frequencies and pair convention) on
    // the first `rope_dim` values of each head.
    let rope_of = |heads: usize| RopeAttrs {
        heads,
        head_dim: dim,
        rotary_dim: rope_dim,
        ..rope_attrs.clone()
    };

    let keys = {
        let k = project(x, at.weight(weights, INDEXER_WK, "indexer_wk")?, dim);
        let norm = at.weight(weights, INDEXER_K_NORM, "indexer_k_norm")?;
        let bias = at.weight(weights, INDEXER_K_NORM_BIAS, "indexer_k_norm_bias")?;
        let k = layer_norm(&k, Some(norm.vector()), Some(bias.vector()), K_NORM_EPS);
        rope::apply(&k, &batch.positions, &rope_of(1))?
    };
    for seq in &batch.seqs {
        kv.check_pages(seq)?;
        for t in 0..seq.len {
            let token_slot = kv.slot_of(seq, seq.first_pos + t);
            kv.write(slot, token_slot, keys.row(seq.start + t), &[]);
        }
    }

    let row_seq = batch.row_seqs();
    let sparse = |row: usize| batch.positions[row] as usize >= topk;
    let rows: Vec<Option<Vec<u32>>> = if (0..x.rows).any(sparse) {
        let q = project(
            q_resid,
            at.weight(weights, INDEXER_WQ, "indexer_wq")?,
            heads * dim,
        );
        let q = rope::apply(&q, &batch.positions, &rope_of(heads))?;
        let mut w = project(
            x,
            at.weight(weights, INDEXER_WEIGHTS, "indexer_weights")?,
            heads,
        );
        let w_scale = (heads as f32).powf(-0.5);
        w.data.iter_mut().for_each(|v| *v *= w_scale);
        let scale = (dim as f32).powf(-0.5);
        let kv: &KvCache = kv;
        (0..x.rows)
            .into_par_iter()
            .map(|row| {
                if !sparse(row) {
                    return None;
                }
                let seq = &batch.seqs[row_seq[row]];
                let pos = batch.positions[row] as usize;
                let mut buf = vec![0f32; dim];
                let mut dots = vec![0f32; heads];
                let scores: Vec<f32> = (0..=pos)
                    .map(|t| {
                        kv.key(slot, kv.slot_of(seq, t), 0, &mut buf)
                            .dot_rows(q.row(row), &mut dots);
                        dots.iter()
                            .zip(w.row(row))
                            .map(|(d, w)| w * (d * scale).max(0.0))
                            .sum()
                    })
                    .collect();
                Some(top_k_indices(&scores, topk))
            })
            .collect()
    } else {
        vec![None; x.rows]
    };
    let picks = Arc::new(Picks {
        positions: batch.positions.clone(),
        rows,
    });
    kv.set_picks(slot, picks.clone());
    Ok(Some(picks))
}
