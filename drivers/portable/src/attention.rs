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
    // One task per sequence and token: rows of `out` are disjoint.
    let mut rows: Vec<(usize, &mut [f32])> = out
        .data
        .chunks_mut(a.heads * a.v_head_dim)
        .enumerate()
        .collect();
    let row_seq: Vec<usize> = batch
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| std::iter::repeat_n(si, s.len))
        .collect();
    rows.par_iter_mut().for_each(|(row, out_row)| {
        let seq = &batch.seqs[row_seq[*row]];
        let pos = seq.first_pos + (*row - seq.start);
        let first = match a.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        let mut scores = vec![0f32; pos + 1 - first];
        let mut kbuf = vec![0f32; a.head_dim];
        let mut vbuf = vec![0f32; a.v_head_dim];
        for h in 0..a.heads {
            let kvh = h / group;
            let qh = &q.row(*row)[h * a.head_dim..(h + 1) * a.head_dim];
            for (j, s) in (first..=pos).zip(scores.iter_mut()) {
                let key = kv.key(slot, kv.slot_of(seq, j), kvh, &mut kbuf);
                let mut dot = qh.iter().zip(key).map(|(x, y)| x * y).sum::<f32>() * a.scale;
                if let Some(cap) = a.softcap {
                    dot = (dot / cap).tanh() * cap;
                }
                *s = dot;
            }
            // A sink is a learned logit that takes probability mass but
            // contributes no value (GPT-OSS).
            let sink = sinks.map(|s| s[h]);
            let max = scores
                .iter()
                .copied()
                .chain(sink)
                .fold(f32::NEG_INFINITY, f32::max);
            let mut denom = sink.map(|s| (s - max).exp()).unwrap_or(0.0);
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                denom += *s;
            }
            let oh = &mut out_row[h * a.v_head_dim..(h + 1) * a.v_head_dim];
            for (j, p) in (first..=pos).zip(&scores) {
                let val = kv.value(slot, kv.slot_of(seq, j), kvh, &mut vbuf);
                let w = p / denom;
                oh.iter_mut().zip(val).for_each(|(o, x)| *o += w * x);
            }
        }
    });
    Ok(out)
}
