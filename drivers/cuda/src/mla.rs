//! Multi-head latent attention on the GPU with the latent KV cache: only
//! the normalized latent and the shared rope key are cached per token; the
//! key up-projection is absorbed into the query (`pie_mla_query`), the
//! paged attention kernel runs as one-KV-head attention over the latents
//! (values = each latent row's first kv_lora values), and the value
//! up-projection is applied to the attention output (`pie_mla_value`).
//! With DeepSeek sparse attention (GLM-MoE-DSA) the attention walks each
//! row's picked keys instead (`mla/indexer.rs`).

mod indexer;

pub(crate) use indexer::IndexPicks;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use pie_driver::ir::{AttentionAttrs, CompositeAttrs, RmsNormAttrs, RopeAttrs};
use pie_driver::{Driver, DriverError, ForwardBatch, Result};

use crate::composite::OpArgs;
use crate::{cuda_err, CudaAct, CudaDriver, CudaKv, CudaWeight};

// Weight slots, in the op schema's order.
const Q: usize = 0;
const Q_A: usize = 1;
const Q_A_NORM: usize = 2;
const Q_B: usize = 3;
const KV_A: usize = 4;
const KV_A_NORM: usize = 5;
const KV_B: usize = 6;
const O: usize = 7;

impl CudaDriver {
    pub(crate) fn mla(
        &self,
        x: &CudaAct,
        w: &[Option<&CudaWeight>],
        attrs: &CompositeAttrs,
        kv: &mut CudaKv,
        batch: &ForwardBatch,
    ) -> Result<CudaAct> {
        if kv.is_bf16() {
            return Err(pie_driver::DriverError::Invalid(
                "kv_cache_dtype bf16 is not supported for MLA layers by the cuda driver yet (use auto)"
                    .into(),
            ));
        }
        let op = OpArgs {
            op: "mla_attention",
            attrs,
            weights: w,
        };
        let (hidden, heads, kv_lora) = (
            op.usize("hidden")?,
            op.usize("heads")?,
            op.usize("kv_lora_rank")?,
        );
        let (nope, rope, v) = (
            op.usize("qk_nope_head_dim")?,
            op.usize("qk_rope_head_dim")?,
            op.usize("v_head_dim")?,
        );
        let (eps, scale) = (op.f32("eps", None)?, op.f32("scale", None)?);
        let rope_attrs = attrs
            .rope
            .clone()
            .ok_or_else(|| op.invalid("the rope was not resolved at lowering"))?;
        if kv_lora > 512 || kv_lora + rope > 2048 {
            return Err(op.invalid(format!(
                "kv_lora_rank {kv_lora} (at most 512) is not supported by the cuda driver"
            )));
        }
        let qk = nope + rope;
        let width = kv_lora + rope;

        // Queries (through the low-rank path when there is one), roped part.
        // `q_resid`: the normalized low-rank query, which the indexer reads.
        let (q, q_resid) = match op.optional(Q) {
            Some(q) => (self.gemm(x, q, heads * qk)?, None),
            None => {
                let rank = op.usize("q_lora_rank")?;
                let qa = self.gemm(x, op.weight(Q_A, "q_a")?, rank)?;
                let qa = self.rms_norm(
                    &qa,
                    Some(op.weight(Q_A_NORM, "q_a_norm")?),
                    &norm(rank, eps),
                )?;
                (
                    self.gemm(&qa, op.weight(Q_B, "q_b")?, heads * qk)?,
                    Some(qa),
                )
            }
        };
        let q_rot = self
            .split_act(&q, &[nope, rope], qk)?
            .pop()
            .expect("two parts");
        let q_rot = self.rope(&q_rot, batch, &rope_attrs)?;

        // This token's cache row: normalized latent, then the roped key.
        let ckv = self.gemm(x, op.weight(KV_A, "kv_a")?, width)?;
        let mut parts = self.split_act(&ckv, &[kv_lora, rope], width)?.into_iter();
        let (lat, kpe) = (
            parts.next().expect("two parts"),
            parts.next().expect("two parts"),
        );
        let lat = self.rms_norm(
            &lat,
            Some(op.weight(KV_A_NORM, "kv_a_norm")?),
            &norm(kv_lora, eps),
        )?;
        let kpe = self.rope(
            &kpe,
            batch,
            &RopeAttrs {
                heads: 1,
                ..rope_attrs.clone()
            },
        )?;
        let latent = self.concat(&lat, &kpe)?;

        let picks = self.mla_index(&op, x, q_resid.as_ref(), kv, batch, &rope_attrs)?;
        let cache = AttentionAttrs {
            heads,
            kv_heads: 1,
            head_dim: width,
            v_head_dim: 0,
            scale,
            window: None,
            softcap: None,
            cache_slot: op.usize("cache_slot")?,
            kv_from: None,
        };
        let (tables, slot) = kv.prepare(batch, cache.cache_slot, &cache, |d| self.upload(d))?;
        let (rows, kw, vw) = (x.rows as i32, width as i32, 0i32);
        let mut b = self.stream.launch_builder(self.kernels.get("pie_kv_write"));
        b.arg(&mut slot.k)
            .arg(&mut slot.v)
            .arg(&latent.data)
            .arg(&latent.data)
            .arg(&tables.new_slots)
            .arg(&rows)
            .arg(&kw)
            .arg(&vw);
        unsafe { b.launch(crate::blocks(x.rows * width)) }.map_err(cuda_err("pie_kv_write"))?;

        let kv_b = op.weight(KV_B, "kv_b")?;
        let (hi, ni, ri, vi, li) = (
            heads as i32,
            nope as i32,
            rope as i32,
            v as i32,
            kv_lora as i32,
        );
        let per_row_head = LaunchConfig {
            grid_dim: ((x.rows * heads).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut q_full = self.act(x.rows, heads * width)?;
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_mla_query"));
        b.arg(&mut q_full.data).arg(&q.data).arg(&q_rot.data);
        let dtype = push_weight(&mut b, kv_b)?;
        b.arg(&dtype).arg(&hi).arg(&ni).arg(&ri).arg(&vi).arg(&li);
        unsafe { b.launch(per_row_head) }.map_err(cuda_err("pie_mla_query"))?;

        // One-KV-head attention over the latents (or each row's picked
        // latents); values are the latents.
        let (positions, table, table_offsets) = match picks.as_ref().and_then(|p| p.tables.as_ref())
        {
            Some(t) => (&t.last, &t.table, &t.offsets),
            None => (&tables.positions, &tables.table, &tables.table_offsets),
        };
        let mut o_lat = self.act(x.rows, heads * kv_lora)?;
        let (one, wd, none, zero_f, has_sinks) = (1i32, width as i32, 0i32, 0.0f32, 0i32);
        let dummy = self.act_zeros(1, 1)?;
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_attention"));
        b.arg(&mut o_lat.data)
            .arg(&q_full.data)
            .arg(&slot.k)
            .arg(&slot.k)
            .arg(positions)
            .arg(table)
            .arg(table_offsets)
            .arg(&dummy.data)
            .arg(&has_sinks)
            .arg(&hi)
            .arg(&one)
            .arg(&wd)
            .arg(&li)
            .arg(&wd)
            .arg(&scale)
            .arg(&none)
            .arg(&zero_f);
        let cfg = LaunchConfig {
            grid_dim: ((x.rows * heads).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (width * 4) as u32,
        };
        unsafe { b.launch(cfg) }.map_err(cuda_err("pie_attention (MLA)"))?;

        let mut out = self.act(x.rows, heads * v)?;
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_mla_value"));
        b.arg(&mut out.data).arg(&o_lat.data);
        let dtype = push_weight(&mut b, kv_b)?;
        b.arg(&dtype).arg(&hi).arg(&ni).arg(&vi).arg(&li);
        unsafe { b.launch(per_row_head) }.map_err(cuda_err("pie_mla_value"))?;
        self.gemm(&out, op.weight(O, "o")?, hidden)
    }

    /// `[a, b]` row by row.
    fn concat(&self, a: &CudaAct, b: &CudaAct) -> Result<CudaAct> {
        let mut out = self.act(a.rows, a.width + b.width)?;
        let (r, wa, wb) = (a.rows as i32, a.width as i32, b.width as i32);
        let mut l = self
            .stream
            .launch_builder(self.kernels.get("pie_concat_cols"));
        l.arg(&mut out.data)
            .arg(&a.data)
            .arg(&b.data)
            .arg(&r)
            .arg(&wa)
            .arg(&wb);
        unsafe { l.launch(crate::blocks(a.rows * (a.width + b.width))) }
            .map_err(cuda_err("pie_concat_cols"))?;
        Ok(out)
    }
}

fn norm(width: usize, eps: f32) -> RmsNormAttrs {
    RmsNormAttrs {
        width,
        group: width,
        eps,
        offset: 0.0,
    }
}

/// Pushes a weight's device pointer; returns its dtype code (0 f32, 1 bf16).
fn push_weight<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, w: &'a CudaWeight) -> Result<i32> {
    match w {
        CudaWeight::F32(s) => {
            b.arg(s);
            Ok(0)
        }
        CudaWeight::Bf16(s) => {
            b.arg(&s.ptr);
            Ok(1)
        }
        CudaWeight::Experts(_) => Err(DriverError::Invalid(
            "mla_attention: kv_b cannot be an expert weight".into(),
        )),
    }
}
