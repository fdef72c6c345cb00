//! Paged attention over a ragged batch: each sequence's new keys and
//! values go into its pages first, then every query attends over its
//! sequence's cached positions: causally (up to its own position), or, for
//! a chunk with a custom mask, over the keys its mask row allows among all
//! of the sequence's positions, its chunk's later tokens included. An op
//! sharing an earlier layer's cache (`kv_from`) writes nothing: that layer
//! already cached this step's tokens.

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
    batch.check_masks()?;
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
    let row_seq = batch.row_seqs();
    // One task per (token, KV head): the query heads of a GQA group read
    // each cached key and value once, and their output columns are
    // adjacent, so tasks own disjoint chunks of `out`.
    out.data
        .par_chunks_mut(group * a.v_head_dim)
        .enumerate()
        .for_each(|(task, out_group)| {
            let (row, kvh) = (task / a.kv_heads, task % a.kv_heads);
            let seq = &batch.seqs[row_seq[row]];
            let t = row - seq.start;
            let pos = seq.first_pos + t;
            let first = match a.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            // A masked row may see later tokens of its chunk; the window
            // still counts back from the token's own position.
            let last = match &seq.mask {
                Some(_) => seq.kv_len() - 1,
                None => pos,
            };
            let heads = kvh * group..(kvh + 1) * group;
            let q_rows = &q.row(row)[heads.start * a.head_dim..heads.end * a.head_dim];
            let span = Span {
                kv,
                slot,
                seq,
                positions: first..last + 1,
                kv_head: kvh,
                mask_row: seq.mask.as_ref().map(|m| (m, t)),
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
    /// The row's custom mask (and the row within its chunk), if any.
    mask_row: Option<(&'a pie_driver::AttnMask, usize)>,
}

impl Span<'_> {
    fn visible(&self, j: usize) -> bool {
        self.mask_row.is_none_or(|(m, t)| m.allows(t, j))
    }

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
            if !self.visible(j) {
                s.fill(f32::NEG_INFINITY);
                continue;
            }
            let token_slot = self.kv.slot_of(self.seq, j);
            let key = self.kv.key(self.slot, token_slot, self.kv_head, &mut kbuf);
            key.dot_rows(q_rows, s);
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
            if !self.visible(j) {
                continue;
            }
            let token_slot = self.kv.slot_of(self.seq, j);
            let val = self
                .kv
                .value(self.slot, token_slot, self.kv_head, &mut vbuf);
            val.axpy_rows(p, out);
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
        if max == f32::NEG_INFINITY {
            // A mask left nothing in the window: this head outputs zeros.
            scores
                .iter_mut()
                .skip(h)
                .step_by(heads)
                .for_each(|s| *s = 0.0);
            continue;
        }
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
#[cfg(test)]
mod tests {
    use super::*;
    use pie_driver::{AttnMask, KvDType, KvLayout, KvSlotShape};

    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const DIM: usize = 8;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn act(rows: usize, width: usize, seed: u64) -> Act {
        Act {
            data: values(rows * width, seed),
            rows,
            width,
        }
    }

    fn attrs(window: Option<usize>, softcap: Option<f32>) -> AttentionAttrs {
        AttentionAttrs {
            heads: HEADS,
            kv_heads: KV_HEADS,
            head_dim: DIM,
            v_head_dim: DIM,
            scale: 0.35,
            window,
            softcap,
            cache_slot: 0,
            kv_from: None,
        }
    }

    /// Straightforward masked softmax attention of one query row over a
    /// sequence's keys and values (all rows, in position order).
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        visible: impl Fn(usize) -> bool,
        a: &AttentionAttrs,
        sinks: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; HEADS * DIM];
        for h in 0..HEADS {
            let kvh = h / (HEADS / KV_HEADS);
            let qh = &q[h * DIM..(h + 1) * DIM];
            let scores: Vec<Option<f32>> = (0..keys.len())
                .map(|j| {
                    visible(j).then(|| {
                        let k = &keys[j][kvh * DIM..(kvh + 1) * DIM];
                        let s = qh.iter().zip(k).map(|(x, y)| x * y).sum::<f32>() * a.scale;
                        a.softcap.map_or(s, |c| (s / c).tanh() * c)
                    })
                })
                .collect();
            let sink = sinks.map(|s| s[h]);
            let max = scores
                .iter()
                .flatten()
                .copied()
                .chain(sink)
                .fold(f32::MIN, f32::max);
            let denom: f32 = scores
                .iter()
                .flatten()
                .chain(&sink)
                .map(|s| (s - max).exp())
                .sum();
            for (j, s) in scores.iter().enumerate() {
                if let Some(s) = s {
                    let w = (s - max).exp() / denom;
                    for d in 0..DIM {
                        out[h * DIM + d] += w * vals[j][kvh * DIM + d];
                    }
                }
            }
        }
        out
    }

    /// Two steps on two sequences: a causal prefix, then sequence 0 gets a
    /// masked chunk (a tree: siblings hidden from each other, and a row
    /// that looks ahead within its chunk) beside sequence 1's causal one.
    fn check_against_reference(window: Option<usize>, softcap: Option<f32>, sinks: Option<&[f32]>) {
        let a = attrs(window, softcap);
        let layout = KvLayout {
            page_size: 4,
            num_pages: 8,
            slots: vec![KvSlotShape {
                kv_heads: KV_HEADS,
                head_dim: DIM,
                v_head_dim: DIM,
            }],
            dtype: KvDType::Auto,
            state_slots: vec![],
            max_seqs: 1,
        };
        let mut kv = KvCache::new(&layout).unwrap();
        let pages = [vec![0, 1, 2], vec![3, 4]];
        let kw = KV_HEADS * DIM;
        let mut keys: [Vec<Vec<f32>>; 2] = Default::default();
        let mut vals: [Vec<Vec<f32>>; 2] = Default::default();
        // (first_pos, len) per sequence per step.
        let steps = [[(0, 5), (0, 3)], [(5, 4), (3, 2)]];
        // Step 2, sequence 0: keys 0..9; tokens 5 (root), 6 and 7
        // (siblings under 5), 8 (child of 6); row 0 also sees token 6.
        let tree: Vec<Vec<bool>> = [&[5, 6][..], &[5, 6], &[5, 7], &[5, 6, 8]]
            .iter()
            .map(|own| (0..9).map(|j| j < 5 || own.contains(&j)).collect())
            .collect();
        for (step, chunks) in steps.iter().enumerate() {
            let mut batch = ForwardBatch::default();
            for (s, &(first, len)) in chunks.iter().enumerate() {
                batch.push(&vec![0; len], first, pages[s].clone(), 0);
            }
            if step == 1 {
                batch.seqs[0].mask = Some(AttnMask::from_rows(&tree, 9).unwrap());
            }
            let n = batch.num_tokens();
            let seed = step as u64 * 10;
            let (q, k, v) = (
                act(n, HEADS * DIM, seed),
                act(n, kw, seed + 1),
                act(n, kw, seed + 2),
            );
            for (s, seq) in batch.seqs.iter().enumerate() {
                for r in seq.start..seq.start + seq.len {
                    keys[s].push(k.row(r).to_vec());
                    vals[s].push(v.row(r).to_vec());
                }
            }
            let out = paged_attention(&q, Some(&k), Some(&v), sinks, &mut kv, &batch, &a).unwrap();
            for (s, seq) in batch.seqs.iter().enumerate() {
                for t in 0..seq.len {
                    let pos = seq.first_pos + t;
                    let from = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let visible = |j: usize| {
                        j >= from
                            && match &seq.mask {
                                Some(m) => m.allows(t, j),
                                None => j <= pos,
                            }
                    };
                    let row = seq.start + t;
                    let want = reference(q.row(row), &keys[s], &vals[s], visible, &a, sinks);
                    for (x, y) in out.row(row).iter().zip(&want) {
                        assert!(
                            (x - y).abs() < 1e-5,
                            "step {step} seq {s} token {t}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn masked_attention_matches_a_masked_softmax_reference() {
        check_against_reference(None, None, None);
    }

    #[test]
    fn masks_combine_with_windows_softcaps_and_sinks() {
        check_against_reference(Some(4), Some(1.5), Some(&[0.3, -0.2, 0.0, 1.0]));
    }

    #[test]
    fn a_mask_of_the_wrong_shape_is_refused() {
        let layout = KvLayout {
            page_size: 4,
            num_pages: 2,
            slots: vec![KvSlotShape {
                kv_heads: KV_HEADS,
                head_dim: DIM,
                v_head_dim: DIM,
            }],
            dtype: KvDType::Auto,
            state_slots: vec![],
            max_seqs: 1,
        };
        let mut kv = KvCache::new(&layout).unwrap();
        let mut batch = ForwardBatch::default();
        batch.push(&[0, 0], 0, vec![0], 0);
        batch.seqs[0].mask = Some(AttnMask::from_rows(&[vec![true; 3], vec![true; 3]], 3).unwrap());
        let (q, k) = (act(2, HEADS * DIM, 1), act(2, KV_HEADS * DIM, 2));
        let err = paged_attention(
            &q,
            Some(&k),
            Some(&k),
            None,
            &mut kv,
            &batch,
            &attrs(None, None),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("mask is 2×3, the chunk needs 2×2"),
            "{err}"
        );
    }
}
