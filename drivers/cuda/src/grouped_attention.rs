//! Attention with the query heads of a group sharing their key/value
//! reads, split over the keys (`kernels/cuda/grouped_attention.cu`): the
//! kernel the driver uses whenever the shape fits, `pie_attention` else.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use pie_driver::ir::AttentionAttrs;
use pie_driver::{DriverError, KvLayout, Result};

use crate::graphs::MAX_ROWS;
use crate::launch::Launch;
use crate::{
    cuda_err, int, AttentionTables, CudaAct, CudaDriver, CudaWeight, KvSlotBuffers, RopeInputs,
};

/// Largest query-head group, head and value dimension the kernel takes.
const MAX_GROUP: usize = 8;
const MAX_DIM: usize = 128;
/// Warps per block of the partial pass (`PIE_GQA_WARPS`).
const WARPS: usize = 4;
/// Enough warps for every SM of a large GPU a few times over
/// (`PIE_CUDA_GQA_TARGET` overrides it, for A/B runs).
const TARGET_BLOCKS: usize = 264;
/// (row, kv head) pairs the one-launch (folded) form takes: one counter
/// each, allocated with the driver.
pub(crate) const FOLD_PAIRS: usize = 4096;
/// Rows up to which attention folds its combine into the partial pass
/// (`PIE_CUDA_GQA_FOLD_ROWS` overrides it, for A/B runs). Measured (H100,
/// Qwen3-8B batch 64, 2026-12-05): 8.20 ms/step folded (the kernels
/// compiled per group, the rope and KV write folded in too) against 8.46
/// for the per-group partial pass and its combine, 9.15 for the general
/// one. Past 64 rows it has not been measured.
const FOLD_MAX_ROWS: usize = 64;
/// At most 8 × 4 = 32 splits (`PIE_CUDA_GQA_BLOCKS` overrides it, up to
/// 16: the combine takes 64 splits). Measured (H200, Qwen3-0.6B batch 1,
/// 128 + 128 tokens, keys prefetched to L2 before the wait): device time
/// per step 0.917 ms at 2, 0.840 at 4, 0.798 at 8, 0.813 at 16: each warp
/// walks its keys in dependent steps, and more splits make that walk
/// shorter until the combine's longer pass outweighs it.
const MAX_BLOCKS_PER_HEAD: usize = 8;

/// How many blocks attention splits each (row, KV head) over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GqaSplit {
    target_blocks: usize,
    max_blocks_per_head: usize,
    /// Rows up to which the combine folds into the partial pass.
    fold_max_rows: usize,
    /// Whether the unfolded partial pass takes the kernels compiled per
    /// group (`PIE_CUDA_GQA_PARTIAL_G=0` turns it off, for A/B runs).
    /// H100, Qwen3-8B batch 64 unfolded: 8.46 ms/step against 9.15 for the
    /// general kernel (194 registers, two waves of blocks).
    partial_by_group: bool,
}

impl GqaSplit {
    /// The defaults, or `PIE_CUDA_GQA_TARGET` / `PIE_CUDA_GQA_BLOCKS`.
    pub(crate) fn from_env() -> Self {
        let read = |name: &str, default: usize, max: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(default, |v| v.clamp(1, max))
        };
        GqaSplit {
            target_blocks: read("PIE_CUDA_GQA_TARGET", TARGET_BLOCKS, 1 << 16),
            max_blocks_per_head: read("PIE_CUDA_GQA_BLOCKS", MAX_BLOCKS_PER_HEAD, 16),
            fold_max_rows: read("PIE_CUDA_GQA_FOLD_ROWS", FOLD_MAX_ROWS, MAX_ROWS),
            partial_by_group: std::env::var("PIE_CUDA_GQA_PARTIAL_G").map_or(true, |v| v != "0"),
        }
    }

    /// Blocks per (row, KV head) pair for `pairs` of them: a function of
    /// the batch shape only, so a recorded graph stays right as contexts
    /// grow.
    fn blocks_per_pair(&self, pairs: usize) -> usize {
        self.target_blocks
            .div_ceil(pairs.max(1))
            .clamp(1, self.max_blocks_per_head)
    }
}

/// The partial pass (`fold` false) or the folded one-launch kernel
/// (decode) for a cache of bf16 or f32, head dims of 128 (`contiguous`)
/// or not, and `group` query heads per KV head: compiled for exactly that
/// group where it is 2, 4 or 8 (fewer registers: 126 instead of 194 at 4,
/// so twice the warps fit an SM), else the general one.
fn gqa_kernel(fold: bool, bf16: bool, contiguous: bool, group: usize) -> &'static str {
    const KERNELS: [[[&str; 4]; 4]; 2] = [
        [
            [
                "pie_gqa_attention_partial",
                "pie_gqa_attention_partial_g2",
                "pie_gqa_attention_partial_g4",
                "pie_gqa_attention_partial_g8",
            ],
            [
                "pie_gqa_attention_partial_c128",
                "pie_gqa_attention_partial_c128_g2",
                "pie_gqa_attention_partial_c128_g4",
                "pie_gqa_attention_partial_c128_g8",
            ],
            [
                "pie_gqa_attention_partial_bf16",
                "pie_gqa_attention_partial_bf16_g2",
                "pie_gqa_attention_partial_bf16_g4",
                "pie_gqa_attention_partial_bf16_g8",
            ],
            [
                "pie_gqa_attention_partial_bf16_c128",
                "pie_gqa_attention_partial_bf16_c128_g2",
                "pie_gqa_attention_partial_bf16_c128_g4",
                "pie_gqa_attention_partial_bf16_c128_g8",
            ],
        ],
        [
            [
                "pie_gqa_attention_fold",
                "pie_gqa_attention_fold_g2",
                "pie_gqa_attention_fold_g4",
                "pie_gqa_attention_fold_g8",
            ],
            [
                "pie_gqa_attention_fold_c128",
                "pie_gqa_attention_fold_c128_g2",
                "pie_gqa_attention_fold_c128_g4",
                "pie_gqa_attention_fold_c128_g8",
            ],
            [
                "pie_gqa_attention_fold_bf16",
                "pie_gqa_attention_fold_bf16_g2",
                "pie_gqa_attention_fold_bf16_g4",
                "pie_gqa_attention_fold_bf16_g8",
            ],
            [
                "pie_gqa_attention_fold_bf16_c128",
                "pie_gqa_attention_fold_bf16_c128_g2",
                "pie_gqa_attention_fold_bf16_c128_g4",
                "pie_gqa_attention_fold_bf16_c128_g8",
            ],
        ],
    ];
    let specialized = match group {
        2 => 1,
        4 => 2,
        8 => 3,
        _ => 0,
    };
    KERNELS[usize::from(fold)][usize::from(bf16) * 2 + usize::from(contiguous)][specialized]
}

/// Whether `a`'s heads take the `_c128` kernels: head dims of 128, where
/// each lane reads 4 consecutive dims per row (one 16-byte f32 or 8-byte
/// bf16 load) instead of 4 strided ones.
pub(crate) fn contiguous_heads(a: &AttentionAttrs) -> bool {
    a.head_dim == MAX_DIM && a.v_head_dim == MAX_DIM
}

/// A bf16 KV cache is read only by the grouped kernels: every attention
/// cache must have head dims they take (and even widths, two bf16 per f32
/// element of the buffers).
pub(crate) fn check_bf16_cache(layout: &KvLayout) -> Result<()> {
    for s in &layout.slots {
        if s.head_dim > MAX_DIM || s.v_head_dim > MAX_DIM || (s.kv_heads * s.head_dim) % 2 != 0 {
            return Err(DriverError::Invalid(format!(
                "kv_cache_dtype bf16 on the cuda driver takes head dims up to {MAX_DIM}; this model \
                 caches {} values per head (use kv_cache_dtype auto)",
                s.head_dim.max(s.v_head_dim)
            )));
        }
    }
    Ok(())
}

/// The q/k norms and rope a folded decode launch applies to raw
/// projections (`PieQkNormRope`, grouped_attention.cu); `on` = 0: none.
#[derive(Default)]
pub(crate) struct QkNormRope {
    pub on: i32,
    /// Norm weights (offset + w scales), 0: none.
    pub q_w: u64,
    pub k_w: u64,
    pub q_eps: f32,
    pub k_eps: f32,
    pub q_offset: f32,
    pub k_offset: f32,
    pub rope: RopeInputs,
}

impl QkNormRope {
    /// Pushes them in the order the folded kernels take them, last.
    fn push<'a>(&'a self, b: &mut Launch<'a>) {
        b.arg(&self.on)
            .arg(&self.q_w)
            .arg(&self.k_w)
            .arg(&self.q_eps)
            .arg(&self.k_eps)
            .arg(&self.q_offset)
            .arg(&self.k_offset);
        self.rope.push(b);
    }
}

impl CudaDriver {
    /// Whether attention `a` runs on the grouped kernel.
    pub(crate) fn gqa_fits(&self, a: &AttentionAttrs) -> bool {
        self.gqa
            && a.kv_heads > 0
            && a.heads.is_multiple_of(a.kv_heads)
            && a.heads / a.kv_heads <= MAX_GROUP
            && a.head_dim <= MAX_DIM
            && a.v_head_dim <= MAX_DIM
    }

    /// Whether the attention of `rows` rows runs as one launch (its
    /// combine folded into the partial pass).
    pub(crate) fn gqa_folds(&self, rows: usize, a: &AttentionAttrs) -> bool {
        self.fuse && rows <= self.gqa_split.fold_max_rows && rows * a.kv_heads <= FOLD_PAIRS
    }

    /// Grouped attention of `q` (rows × heads × head_dim) over the cache.
    /// `new_kv`: this step's keys and values, for the folded launch to
    /// write into the cache itself (the caller checked
    /// [`CudaDriver::gqa_folds`] and that no row reads another row's new
    /// key); None: the cache holds them already.
    #[allow(clippy::too_many_arguments)] // the op's operands and its tables
    pub(crate) fn gqa_attention(
        &self,
        q: &CudaAct,
        a: &AttentionAttrs,
        tables: &AttentionTables,
        slot: &KvSlotBuffers,
        sinks: Option<&CudaWeight>,
        kv_bf16: bool,
        new_kv: Option<(&CudaAct, &CudaAct)>,
        norm_rope: Option<&QkNormRope>,
    ) -> Result<CudaAct> {
        let group = a.heads / a.kv_heads;
        let pairs = q.rows * a.kv_heads;
        let blocks_per_pair = self.gqa_split.blocks_per_pair(pairs);
        let splits = blocks_per_pair * WARPS;
        let partials = pairs * splits * group;
        let part_ml = self.uninit(partials * 2)?;
        let part_acc = self.uninit(partials * a.v_head_dim)?;
        let (heads, kvh) = (int(a.heads, "heads")?, int(a.kv_heads, "kv heads")?);
        let (hd, vhd) = (
            int(a.head_dim, "head dim")?,
            int(a.v_head_dim, "v head dim")?,
        );
        let v_stride = kvh * vhd;
        let window = a.window.map_or(0, |w| w as i32);
        let softcap = a.softcap.unwrap_or(0.0);
        let cfg = LaunchConfig {
            grid_dim: (
                int(pairs, "rows × kv heads")? as u32,
                blocks_per_pair as u32,
                1,
            ),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let contiguous = contiguous_heads(a);
        // Small grids (decode) combine in the same launch.
        let fold = self.gqa_folds(q.rows, a);
        let no_norm_rope = QkNormRope::default();
        let norm_rope = match norm_rope {
            Some(nr) if !fold || !contiguous => {
                return Err(DriverError::Invalid(format!(
                "grouped attention: q/k norms (on: {}) handed to a launch that does not fold them",
                nr.on
            )))
            }
            Some(nr) => nr,
            None => &no_norm_rope,
        };
        if new_kv.is_some() && !fold {
            return Err(DriverError::Invalid(
                "grouped attention: new keys handed to an unfolded launch".into(),
            ));
        }
        let by_group = fold || self.gqa_split.partial_by_group;
        let partial = gqa_kernel(fold, kv_bf16, contiguous, if by_group { group } else { 0 });
        let (mut out, shadow) = self.act_with_bf16_copy(q.rows, a.heads * a.v_head_dim)?;
        let (sinks_ptr, has_sinks) = crate::weight_or_null(sinks);
        let mut b = self.launch(partial);
        b.buf(&part_ml)
            .buf(&part_acc)
            .buf(&q.data)
            .buf(&slot.k)
            .buf(&slot.v)
            .arg(&tables.positions)
            .arg(&tables.table)
            .arg(&tables.table_offsets)
            .arg(&heads)
            .arg(&kvh)
            .arg(&hd)
            .arg(&vhd)
            .arg(&v_stride)
            .arg(&a.scale)
            .arg(&window)
            .arg(&softcap);
        let (k_new, v_new) = new_kv.map_or((0, 0), |(k, v)| {
            (
                crate::graphs::address(&k.data),
                crate::graphs::address(&v.data),
            )
        });
        if fold {
            b.buf(&out.data)
                .arg(&shadow)
                .arg(&sinks_ptr)
                .arg(&has_sinks)
                .buf(&self.attention_counters)
                .arg(&k_new)
                .arg(&v_new)
                .arg(&tables.new_slots);
            norm_rope.push(&mut b);
        }
        unsafe { b.launch(cfg) }?;
        if fold {
            return Ok(out);
        }
        let splits_i = int(splits, "splits")?;
        let cfg = LaunchConfig {
            grid_dim: (int(q.rows * a.heads, "rows × heads")? as u32, 1, 1),
            block_dim: (MAX_DIM as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_gqa_attention_combine"));
        b.arg(&mut out.data)
            .arg(&shadow)
            .arg(&part_ml)
            .arg(&part_acc)
            .arg(&sinks_ptr)
            .arg(&has_sinks)
            .arg(&heads)
            .arg(&kvh)
            .arg(&vhd)
            .arg(&splits_i);
        unsafe { b.launch(cfg) }.map_err(cuda_err("pie_gqa_attention_combine"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::gqa_kernel;

    /// Every partial and folded kernel the driver may pick is loaded with
    /// the module (`device::KERNELS`) and defined in the sources, and
    /// groups of 2, 4 and 8 get their own.
    #[test]
    fn gqa_kernels_exist_and_specialize_common_groups() {
        let source = crate::device::kernel_source();
        let flags = [false, true];
        for (fold, bf16, contiguous) in flags
            .iter()
            .flat_map(|&f| flags.iter().flat_map(move |&b| flags.map(|c| (f, b, c))))
        {
            for group in 1..=8 {
                let name = gqa_kernel(fold, bf16, contiguous, group);
                assert_eq!(name.contains("_fold"), fold, "{name}");
                assert!(
                    crate::device::KERNELS.contains(&name),
                    "{name} is not loaded"
                );
                assert!(
                    source.contains(&format!("({name},")),
                    "{name} is not defined"
                );
                let specialized = name.ends_with(&format!("_g{group}"));
                assert_eq!(
                    specialized,
                    [2, 4, 8].contains(&group),
                    "{name} for group {group}"
                );
                assert_eq!(name.contains("_bf16"), bf16, "{name}");
                assert_eq!(name.contains("_c128"), contiguous, "{name}");
            }
        }
    }
}
