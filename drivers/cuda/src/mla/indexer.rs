//! DeepSeek sparse attention's indexer (GLM-MoE-DSA) on the GPU: the same
//! selection as the portable driver's `indexer.rs` (which documents the
//! formulas), in three steps:
//!
//! 1. every new token's indexer key (`wk`, LayerNorm, rope) is written to
//!    the layer's indexer-key KV slot;
//! 2. for the rows that see more than `index_topk` keys,
//!    `pie_mla_index_scores` scores every visible key on the device;
//! 3. the scores come to the host, where each row's top-k is chosen
//!    ([`pie_driver::math::top_k_indices`], as on the portable driver) and
//!    turned into a per-row table of the chosen keys' token slots.
//!
//! The MLA attention kernel then walks that table instead of the
//! sequence's: a row with `n` picks reads table entries `0 ..= n - 1`, so
//! sparse rows cost `index_topk` keys, whatever the context. Rows that see
//! no more than `index_topk` keys keep the causal table, and a pass without
//! such rows uploads nothing. The host round trip (step 3) synchronizes
//! the stream once per indexer layer; MLA models never run as recorded
//! CUDA graphs (composite ops), so nothing is captured across it. A
//! device-side top-k is the next step for long contexts: the scores of a
//! long prompt are `rows × keys` floats (copied in chunks of at most
//! [`SCORE_CHUNK`] floats).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pie_driver::ir::{AttentionAttrs, LayerNormAttrs, RopeAttrs};
use pie_driver::math::top_k_indices;
use pie_driver::{Driver, ForwardBatch, Result};

use crate::composite::OpArgs;
use crate::kv::{AttentionPlan, CudaKv};
use crate::{cuda_err, int, CudaAct, CudaDriver};

// Weight slots of `mla_attention`, in the op schema's order.
const INDEXER_WQ: usize = 8;
const INDEXER_WK: usize = 9;
const INDEXER_K_NORM: usize = 10;
const INDEXER_K_NORM_BIAS: usize = 11;
const INDEXER_WEIGHTS: usize = 12;

/// transformers' `nn.LayerNorm(index_head_dim, eps=1e-6)`.
const K_NORM_EPS: f32 = 1e-6;

/// The most score floats brought to the host at once (64 MiB).
pub const SCORE_CHUNK: usize = 16 << 20;

/// The keys each query row of one pass attends to.
pub struct IndexPicks {
    /// The pass's token positions, to check that a sharing layer reuses
    /// picks of the same pass.
    positions: Vec<u32>,
    /// None when every row sees at most `index_topk` keys (causal tables).
    pub tables: Option<PickTables>,
}

/// Per-row key tables in the layout of the attention kernel's causal
/// tables: row `r` reads the token slots `table[offsets[r] ..= offsets[r]
/// + last[r]]`.
pub struct PickTables {
    pub table: CudaSlice<i32>,
    pub offsets: CudaSlice<i32>,
    pub last: CudaSlice<i32>,
}

impl CudaDriver {
    /// The pass's picks for this MLA layer: None without an indexer (every
    /// key attended). `q_resid` is the normalized low-rank query.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mla_index(
        &self,
        op: &OpArgs,
        x: &CudaAct,
        q_resid: Option<&CudaAct>,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
        rope_attrs: &RopeAttrs,
    ) -> Result<Option<Arc<IndexPicks>>> {
        let Some(slot) = op.attrs.usize("index_slot").map_err(|m| op.invalid(m))? else {
            return Ok(None);
        };
        if op.optional(INDEXER_WK).is_none() {
            // A sharing layer: the picks an earlier layer made in this pass.
            let picks = kv.picks(slot).ok_or_else(|| {
                op.invalid(format!(
                    "no sparse-indexer picks of slot {slot} in this pass"
                ))
            })?;
            if picks.positions != batch.positions {
                return Err(op.invalid(format!(
                    "the sparse-indexer picks of slot {slot} belong to another pass"
                )));
            }
            return Ok(Some(picks));
        }
        let topk = op.usize("index_topk")?;
        let dim = op.usize("index_head_dim")?;
        let rope_dim = op.usize("qk_rope_head_dim")?;
        let q_resid = q_resid
            .ok_or_else(|| op.invalid("the sparse indexer needs the low-rank query path"))?;
        // The MLA rope (frequencies and pair convention) on the first
        // `rope_dim` values of each indexer head.
        let rope_of = |heads: usize| RopeAttrs {
            heads,
            head_dim: dim,
            rotary_dim: rope_dim,
            ..rope_attrs.clone()
        };

        // 1. This pass's indexer keys into the indexer-key slot.
        let keys = self.gemm(x, op.weight(INDEXER_WK, "indexer_wk")?, dim)?;
        let keys = self.layer_norm(
            &keys,
            Some(op.weight(INDEXER_K_NORM, "indexer_k_norm")?),
            Some(op.weight(INDEXER_K_NORM_BIAS, "indexer_k_norm_bias")?),
            &LayerNormAttrs {
                width: dim,
                eps: K_NORM_EPS,
            },
        )?;
        let keys = self.rope(&keys, batch, &rope_of(1))?;
        let shape = AttentionAttrs {
            heads: 1,
            kv_heads: 1,
            head_dim: dim,
            v_head_dim: 0,
            scale: 1.0,
            window: None,
            softcap: None,
            cache_slot: slot,
            kv_from: None,
        };
        let (rows, kw, vw) = (int(x.rows, "rows")?, int(dim, "index_head_dim")?, 0i32);
        {
            let (tables, buffers) = kv.prepare(batch, slot, &shape, |d| self.upload(d))?;
            let mut b = self.stream.launch_builder(self.kernels.get("pie_kv_write"));
            b.arg(&mut buffers.k)
                .arg(&mut buffers.v)
                .arg(&keys.data)
                .arg(&keys.data)
                .arg(&tables.new_slots)
                .arg(&rows)
                .arg(&kw)
                .arg(&vw);
            unsafe { b.launch(crate::blocks(x.rows * dim)) }
                .map_err(cuda_err("pie_kv_write (indexer keys)"))?;
        }

        // 2. Scores of the rows that see more than `topk` keys.
        let sparse: Vec<usize> = (0..x.rows)
            .filter(|&r| batch.positions[r] as usize >= topk)
            .collect();
        let tables = match sparse.is_empty() {
            true => None,
            false => Some(self.pick_tables(op, x, q_resid, kv, batch, &shape, &sparse, &rope_of)?),
        };
        let picks = Arc::new(IndexPicks {
            positions: batch.positions.clone(),
            tables,
        });
        kv.set_picks(slot, picks.clone());
        Ok(Some(picks))
    }

    /// Steps 2 and 3 for the rows in `sparse` (those that see more than
    /// `index_topk` keys): their scores, picks and key tables.
    #[allow(clippy::too_many_arguments)]
    fn pick_tables(
        &self,
        op: &OpArgs,
        x: &CudaAct,
        q_resid: &CudaAct,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
        shape: &AttentionAttrs,
        sparse: &[usize],
        rope_of: &dyn Fn(usize) -> RopeAttrs,
    ) -> Result<PickTables> {
        let topk = op.usize("index_topk")?;
        let heads = op.usize("index_heads")?;
        let dim = shape.head_dim;
        if (heads * dim + heads) * 4 > 48 << 10 {
            return Err(op.invalid(format!(
                "{heads} indexer heads of {dim} exceed the cuda indexer kernel's 48 KiB of queries"
            )));
        }
        let q = self.gemm(q_resid, op.weight(INDEXER_WQ, "indexer_wq")?, heads * dim)?;
        let q = self.rope(&q, batch, &rope_of(heads))?;
        let w = self.gemm(x, op.weight(INDEXER_WEIGHTS, "indexer_weights")?, heads)?;
        let keys_of = |r: usize| batch.positions[r] as usize + 1;
        let max_keys = sparse.iter().map(|&r| keys_of(r)).max().unwrap_or(1);
        let mut picks: Vec<Vec<u32>> = Vec::with_capacity(sparse.len());
        for chunk in sparse.chunks((SCORE_CHUNK / max_keys).max(1)) {
            let scores = self.index_scores(kv, shape, batch, &q, &w, chunk, heads, max_keys)?;
            for (&r, row) in chunk.iter().zip(scores.chunks_exact(max_keys)) {
                picks.push(top_k_indices(&row[..keys_of(r)], topk));
            }
        }
        let (table, offsets, last) = picked_tables(kv.plan(batch)?, sparse, &picks)?;
        Ok(PickTables {
            table: self.upload(&table)?,
            offsets: self.upload(&offsets)?,
            last: self.upload(&last)?,
        })
    }

    /// `pie_mla_index_scores` for `rows`, brought to the host: `rows.len()
    /// × max_keys` scores.
    #[allow(clippy::too_many_arguments)]
    fn index_scores(
        &self,
        kv: &mut CudaKv,
        shape: &AttentionAttrs,
        batch: &ForwardBatch,
        q: &CudaAct,
        w: &CudaAct,
        rows: &[usize],
        heads: usize,
        max_keys: usize,
    ) -> Result<Vec<f32>> {
        let dim = shape.head_dim;
        let row_ids: Vec<i32> = rows.iter().map(|&r| int(r, "row")).collect::<Result<_>>()?;
        let row_ids = self.upload(&row_ids)?;
        let out = self.act(rows.len(), max_keys)?;
        let mut out = out.data;
        let (hi, di, mk) = (
            int(heads, "index_heads")?,
            int(dim, "index_head_dim")?,
            int(max_keys, "keys")?,
        );
        let scale = (dim as f32).powf(-0.5);
        let w_scale = (heads as f32).powf(-0.5);
        let (tables, buffers) = kv.prepare(batch, shape.cache_slot, shape, |d| self.upload(d))?;
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_mla_index_scores"));
        b.arg(&mut out)
            .arg(&q.data)
            .arg(&w.data)
            .arg(&buffers.k)
            .arg(&row_ids)
            .arg(&tables.positions)
            .arg(&tables.table)
            .arg(&tables.table_offsets)
            .arg(&hi)
            .arg(&di)
            .arg(&scale)
            .arg(&w_scale)
            .arg(&mk);
        let cfg = LaunchConfig {
            grid_dim: (rows.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: ((heads * dim + heads) * 4) as u32,
        };
        unsafe { b.launch(cfg) }.map_err(cuda_err("pie_mla_index_scores"))?;
        self.stream
            .clone_dtoh(&out)
            .map_err(cuda_err("copying indexer scores to the host"))
    }
}

/// The attention kernel's `(table, offsets, last)` with each row of
/// `sparse` reading only its picks (positions, ascending): their token
/// slots are appended to the causal tables of `plan`, which the other
/// rows keep.
fn picked_tables(
    plan: AttentionPlan,
    sparse: &[usize],
    picks: &[Vec<u32>],
) -> Result<(Vec<i32>, Vec<i32>, Vec<i32>)> {
    let (mut table, mut offsets, mut last) = (plan.table, plan.table_offsets, plan.positions);
    for (&r, chosen) in sparse.iter().zip(picks) {
        let base = offsets[r] as usize;
        let slots: Vec<i32> = chosen.iter().map(|&t| table[base + t as usize]).collect();
        offsets[r] = int(table.len(), "indexer table")?;
        last[r] = int(slots.len(), "picks")? - 1;
        table.extend(slots);
    }
    Ok((table, offsets, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_rows_read_only_their_picks() {
        // Two sequences: rows 0..3 at positions 3..=5 (slots 10..=15),
        // row 3 at position 1 (slots 40, 41).
        let plan = AttentionPlan {
            new_slots: vec![13, 14, 15, 41],
            table: vec![10, 11, 12, 13, 14, 15, 40, 41],
            table_offsets: vec![0, 0, 0, 6],
            positions: vec![3, 4, 5, 1],
        };
        let (table, offsets, last) =
            picked_tables(plan, &[1, 2], &[vec![0, 2, 4], vec![1, 3, 5]]).unwrap();
        assert_eq!(&table[8..], &[10, 12, 14, 11, 13, 15]);
        assert_eq!(offsets, vec![0, 8, 11, 6]);
        assert_eq!(last, vec![3, 2, 2, 1]);
    }
}
