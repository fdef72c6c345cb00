//! Causal paged attention over a ragged batch: each sequence's new keys and
//! values go into its pages first, then every query attends over its
//! sequence's cached positions. An op sharing an earlier layer's cache
//! (`kv_from`) writes nothing: that layer already cached this step's tokens.

use pie_driver::ir::AttentionAttrs;
use pie_driver::{DriverError, ForwardBatch, Result};
use rayon::prelude::*;

use crate::kv::KvCache;
use crate::tensor::Act;

pub fn paged_attention(
    q: &Act,
    k: Option<&Act>,
    v: Option<&Act>,
    sinks: Option<&[f32]>,
    kv: &mut KvCache,
    batch: &ForwardBatch,
    a: &AttentionAttrs,
) -> Result<Act> {
    let slot = a.cache_slot;
    let shape = kv.slots.get(slot).map(|s| s.shape.clone()).ok_or_else(|| {
        DriverError::Invalid(format!(
            "attention uses KV slot {slot}, the cache has {}",
            kv.slots.len()
        ))
    })?;
    if (shape.kv_heads, shape.head_dim, shape.v_head_dim) != (a.kv_heads, a.head_dim, a.v_head_dim)
    {
        return Err(DriverError::Invalid(format!(
            "KV slot {slot} was allocated for another shape"
        )));
    }
    for seq in &batch.seqs {
        kv.check_pages(seq)?;
        let (Some(k), Some(v)) = (k, v) else { continue };
        for t in 0..seq.len {
            let row = seq.start + t;
            let token_slot = kv.slot_of(seq, seq.first_pos + t);
            kv.write(slot, token_slot, k.row(row), v.row(row));
        }
    }

    let mut out = Act::zeros(q.rows, a.heads * a.v_head_dim);
    let group = a.heads / a.kv_heads;
    let kv: &KvCache = kv;
    let row_seq: Vec<usize> = batch
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| std::iter::repeat_n(si, s.len))
        .collect();
    // One task per (token, KV head): the query heads of a GQA group read
    // each cached key and value once, and their output columns are
    // adjacent, so tasks own disjoint chunks of `out`.
    out.data
        .par_chunks_mut(group * a.v_head_dim)
        .enumerate()
        .for_each(|(task, out_group)| {
            let (row, kvh) = (task / a.kv_heads, task % a.kv_heads);
            let seq = &batch.seqs[row_seq[row]];
            let pos = seq.first_pos + (row - seq.start);
            let first = match a.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let heads = kvh * group..(kvh + 1) * group;
            let q_rows = &q.row(row)[heads.start * a.head_dim..heads.end * a.head_dim];
            let span = Span {
                kv,
                slot,
                seq,
                positions: first..pos + 1,
                kv_head: kvh,
            };
            let mut probs = span.scores(q_rows, a);
            // A sink is a learned logit that takes probability mass but
            // contributes no value (GPT-OSS).
            softmax_columns(&mut probs, group, |h| sinks.map(|s| s[kvh * group + h]));
            span.weighted_values(&probs, out_group, a.v_head_dim);
        });
    Ok(out)
}

/// How many positions ahead attention prefetches the KV cache.
const PREFETCH_POSITIONS: usize = 8;

/// The cached positions one task attends over, for one KV head.
struct Span<'a> {
    kv: &'a KvCache,
    slot: usize,
    seq: &'a pie_driver::SeqChunk,
    positions: std::ops::Range<usize>,
    kv_head: usize,
}

impl Span<'_> {
    /// Scaled (and soft-capped) scores, `[positions, heads of q_rows]`.
    fn scores(&self, q_rows: &[f32], a: &AttentionAttrs) -> Vec<f32> {
        let heads = q_rows.len() / a.head_dim;
        let mut scores = vec![0f32; heads * self.positions.len()];
        let mut kbuf = vec![0f32; a.head_dim];
        for (j, s) in self.positions.clone().zip(scores.chunks_exact_mut(heads)) {
            // Cached keys are read once per step, from memory: start the
            // loads a few positions early (values too, for the second pass).
            if j + PREFETCH_POSITIONS < self.positions.end {
                let ahead = self.kv.slot_of(self.seq, j + PREFETCH_POSITIONS);
                self.kv.prefetch(self.slot, ahead, self.kv_head);
            }
            let token_slot = self.kv.slot_of(self.seq, j);
            let key = self.kv.key(self.slot, token_slot, self.kv_head, &mut kbuf);
            pie_kernels::vector::dot_rows(q_rows, key, s);
            for dot in s.iter_mut() {
                *dot *= a.scale;
                if let Some(cap) = a.softcap {
                    *dot = (*dot / cap).tanh() * cap;
                }
            }
        }
        scores
    }

    /// `out[h] = Σ_t probs[t][h] · value[t]` for each head's `v_dim` columns.
    fn weighted_values(&self, probs: &[f32], out: &mut [f32], v_dim: usize) {
        let heads = out.len() / v_dim;
        let mut vbuf = vec![0f32; v_dim];
        for (j, p) in self.positions.clone().zip(probs.chunks_exact(heads)) {
            let token_slot = self.kv.slot_of(self.seq, j);
            let val = self
                .kv
                .value(self.slot, token_slot, self.kv_head, &mut vbuf);
            pie_kernels::vector::axpy_rows(p, val, out);
        }
    }
}

/// Softmax of each column of `scores` (`[positions, heads]`) in place; a
/// head's sink logit takes its share of the mass.
fn softmax_columns(scores: &mut [f32], heads: usize, sink: impl Fn(usize) -> Option<f32>) {
    for h in 0..heads {
        let max = scores
            .iter()
            .skip(h)
            .step_by(heads)
            .copied()
            .chain(sink(h))
            .fold(f32::NEG_INFINITY, f32::max);
        let mut denom = sink(h).map(|s| (s - max).exp()).unwrap_or(0.0);
        for s in scores.iter_mut().skip(h).step_by(heads) {
            *s = (*s - max).exp();
            denom += *s;
        }
        let inv = 1.0 / denom;
        scores
            .iter_mut()
            .skip(h)
            .step_by(heads)
            .for_each(|s| *s *= inv);
    }
}
