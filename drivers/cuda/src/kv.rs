//! Paged KV storage in GPU memory (f32), one key and one value buffer per
//! attention op, and the per-batch index tables the kernels read (and the
//! sparse-attention indexer's picks, which GLM-MoE-DSA's `shared` layers
//! reuse within a pass).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use pie_driver::ir::AttentionAttrs;
use pie_driver::{DriverError, ForwardBatch, KvLayout, KvSlotShape, Result, SeqChunk};

use crate::mla::IndexPicks;

pub struct KvSlotBuffers {
    pub shape: KvSlotShape,
    pub k: CudaSlice<f32>,
    pub v: CudaSlice<f32>,
}

pub struct CudaKv {
    page_size: usize,
    num_pages: usize,
    /// Keys and values stored as bf16 (two per f32 element of the
    /// buffers, which then hold half as many f32) instead of f32.
    bf16: bool,
    slots: Vec<KvSlotBuffers>,
    /// The current batch's index tables on the device, built by the first
    /// attention op of a forward pass and reused by the others.
    tables: Option<DeviceTables>,
    /// Per recurrent op: `max_seqs` rows of its per-sequence state.
    states: Vec<CudaSlice<f32>>,
    state_sizes: Vec<usize>,
    max_seqs: usize,
    /// The sparse-attention picks the indexer of each indexer-key slot
    /// made in the latest pass, for the layers that share them.
    picks: HashMap<usize, Arc<IndexPicks>>,
}

pub struct DeviceTables {
    /// The batch's sequence chunks (what the tables depend on).
    key: Vec<SeqChunk>,
    pub new_slots: CudaSlice<i32>,
    pub table: CudaSlice<i32>,
    pub table_offsets: CudaSlice<i32>,
    pub positions: CudaSlice<i32>,
    /// Present when a chunk of the batch has a custom mask.
    pub masks: Option<MaskTables>,
}

/// The masks of a batch on the device (see `pie_attention_masked`).
pub struct MaskTables {
    /// Every masked chunk's mask words, chunk after chunk; the bits of
    /// `AttnMask::words` stored as i32 (the kernel reads them unsigned).
    pub words: CudaSlice<i32>,
    /// Per row: where its mask row starts in `words`, or -1 (causal).
    pub offsets: CudaSlice<i32>,
    /// Per row: how many key positions its mask row covers.
    pub key_counts: CudaSlice<i32>,
}

/// Where a batch's tokens go and what each query row reads.
pub struct AttentionPlan {
    /// Token slot of each new token (row).
    pub new_slots: Vec<i32>,
    /// Token slots of every position of every sequence, sequence after sequence.
    pub table: Vec<i32>,
    /// Per row: where its sequence starts in `table`.
    pub table_offsets: Vec<i32>,
    /// Per row: its position.
    pub positions: Vec<i32>,
}

/// Host side of [`MaskTables`].
struct MaskPlan {
    words: Vec<i32>,
    offsets: Vec<i32>,
    key_counts: Vec<i32>,
}

impl MaskPlan {
    fn new(batch: &ForwardBatch) -> Result<Self> {
        batch.check_masks()?;
        let rows = batch.num_tokens();
        let mut plan = MaskPlan {
            words: Vec::new(),
            offsets: vec![-1; rows],
            key_counts: vec![0; rows],
        };
        for seq in &batch.seqs {
            let Some(mask) = &seq.mask else { continue };
            let base = plan.words.len();
            let per_row = mask.words_per_row();
            plan.words.extend(mask.words().iter().map(|&w| w as i32));
            for t in 0..seq.len {
                plan.offsets[seq.start + t] = int(base + t * per_row, "mask words")?;
                plan.key_counts[seq.start + t] = int(mask.keys(), "mask keys")?;
            }
        }
        Ok(plan)
    }
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        DriverError::Invalid(format!("{what} = {v} exceeds the kernels' 32-bit range"))
    })
}

impl CudaKv {
    pub fn new(
        layout: &KvLayout,
        mut zeros: impl FnMut(usize) -> Result<CudaSlice<f32>>,
    ) -> Result<Self> {
        if layout.page_size == 0 {
            return Err(DriverError::Invalid(
                "kv page size must be at least 1".into(),
            ));
        }
        // One page more than asked: the scratch page padding rows of a
        // recorded decode pass write to.
        let tokens = layout
            .page_size
            .checked_mul(layout.num_pages + 1)
            .ok_or_else(|| DriverError::Invalid("kv cache size overflows".into()))?;
        let bf16 = layout.dtype == pie_driver::KvDType::Bf16;
        let floats = |n: usize| if bf16 { n.div_ceil(2) } else { n };
        let slots = layout
            .slots
            .iter()
            .map(|shape| {
                Ok(KvSlotBuffers {
                    k: zeros(floats(tokens * shape.kv_heads * shape.head_dim))?,
                    v: zeros(floats(tokens * shape.kv_heads * shape.v_head_dim))?,
                    shape: shape.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let states = layout
            .state_slots
            .iter()
            .map(|&size| zeros(size * layout.max_seqs))
            .collect::<Result<_>>()?;
        Ok(CudaKv {
            page_size: layout.page_size,
            num_pages: layout.num_pages,
            bf16,
            slots,
            tables: None,
            states,
            state_sizes: layout.state_slots.clone(),
            max_seqs: layout.max_seqs,
            picks: HashMap::new(),
        })
    }

    /// The batch's device tables (uploaded when the batch changed) and the
    /// buffers of KV slot `slot`.
    pub fn prepare(
        &mut self,
        batch: &ForwardBatch,
        slot: usize,
        a: &AttentionAttrs,
        upload: impl Fn(&[i32]) -> Result<CudaSlice<i32>>,
    ) -> Result<(&DeviceTables, &mut KvSlotBuffers)> {
        // Every attention op of a forward pass asks; only the first builds.
        if self.tables.as_ref().is_none_or(|t| t.key != batch.seqs) {
            let plan = self.plan(batch)?;
            let masks = match batch.has_masks() {
                true => {
                    let m = MaskPlan::new(batch)?;
                    Some(MaskTables {
                        words: upload(&m.words)?,
                        offsets: upload(&m.offsets)?,
                        key_counts: upload(&m.key_counts)?,
                    })
                }
                false => None,
            };
            self.tables = Some(DeviceTables {
                key: batch.seqs.clone(),
                new_slots: upload(&plan.new_slots)?,
                table: upload(&plan.table)?,
                table_offsets: upload(&plan.table_offsets)?,
                positions: upload(&plan.positions)?,
                masks,
            });
        }
        let buffers = Self::slot_in(&mut self.slots, slot, a)?;
        Ok((self.tables.as_ref().expect("set above"), buffers))
    }

    /// The picks the indexer of indexer-key slot `slot` made last.
    pub fn picks(&self, slot: usize) -> Option<Arc<IndexPicks>> {
        self.picks.get(&slot).cloned()
    }

    /// Keeps this pass's picks of indexer-key slot `slot` for the layers
    /// that share them.
    pub fn set_picks(&mut self, slot: usize, picks: Arc<IndexPicks>) {
        self.picks.insert(slot, picks);
    }

    /// The buffers of KV slot `slot` (checked against `a`'s shape).
    pub fn slot_buffers(&mut self, slot: usize, a: &AttentionAttrs) -> Result<&mut KvSlotBuffers> {
        Self::slot_in(&mut self.slots, slot, a)
    }

    /// The token slot padding rows write to (in the page after the last).
    pub fn scratch_slot(&self) -> usize {
        self.num_pages * self.page_size
    }

    /// The page index of the scratch page.
    pub fn scratch_page(&self) -> u32 {
        self.num_pages as u32
    }

    /// Identifies this cache's buffers (a recorded graph holds their
    /// addresses, so it is valid for these buffers only).
    pub fn identity(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.num_pages.hash(&mut h);
        for s in &self.slots {
            crate::graphs::address(&s.k).hash(&mut h);
            crate::graphs::address(&s.v).hash(&mut h);
        }
        for state in &self.states {
            crate::graphs::address(state).hash(&mut h);
        }
        h.finish()
    }

    /// Whether keys and values are stored as bf16.
    pub fn is_bf16(&self) -> bool {
        self.bf16
    }

    /// Whether the cache holds per-sequence recurrent state.
    pub fn has_states(&self) -> bool {
        !self.states.is_empty()
    }

    fn slot_in<'s>(
        slots: &'s mut [KvSlotBuffers],
        slot: usize,
        a: &AttentionAttrs,
    ) -> Result<&'s mut KvSlotBuffers> {
        let count = slots.len();
        let s = slots.get_mut(slot).ok_or_else(|| {
            DriverError::Invalid(format!(
                "attention uses KV slot {slot}, the cache has {count}"
            ))
        })?;
        if (s.shape.kv_heads, s.shape.head_dim, s.shape.v_head_dim)
            != (a.kv_heads, a.head_dim, a.v_head_dim)
        {
            return Err(DriverError::Invalid(format!(
                "KV slot {slot} was allocated for another shape"
            )));
        }
        Ok(s)
    }

    /// Recurrent op `slot`'s state buffer (`max_seqs` rows) and its row
    /// size, after checking the batch's state rows exist.
    pub fn state(
        &mut self,
        slot: usize,
        batch: &ForwardBatch,
    ) -> Result<(&mut CudaSlice<f32>, usize)> {
        let size = *self.state_sizes.get(slot).ok_or_else(|| {
            DriverError::Invalid(format!(
                "recurrent state slot {slot} requested; the cache has {}",
                self.state_sizes.len()
            ))
        })?;
        if let Some(seq) = batch
            .seqs
            .iter()
            .find(|s| s.state as usize >= self.max_seqs)
        {
            return Err(DriverError::Invalid(format!(
                "recurrent state row {} does not exist (the cache holds state for {} sequences)",
                seq.state, self.max_seqs
            )));
        }
        Ok((&mut self.states[slot], size))
    }

    /// Copies every recurrent state of row `from` to row `to` (fork).
    /// Copies page `from` over page `to` in every attention op's cache.
    pub fn copy_page(
        &mut self,
        from: usize,
        to: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        if from >= self.num_pages || to >= self.num_pages {
            return Err(DriverError::Invalid(format!(
                "KV pages {from} -> {to}: the cache has {} pages",
                self.num_pages
            )));
        }
        let n = self.page_size;
        // Per token, in f32 elements of the buffers (bf16 widths are even).
        let per = if self.bf16 { 2 } else { 1 };
        for slot in &mut self.slots {
            let kw = slot.shape.kv_heads * slot.shape.head_dim / per;
            let vw = slot.shape.kv_heads * slot.shape.v_head_dim / per;
            copy_range(stream, &mut slot.k, from * n * kw, to * n * kw, n * kw)?;
            copy_range(stream, &mut slot.v, from * n * vw, to * n * vw, n * vw)?;
        }
        Ok(())
    }

    pub fn copy_state(
        &mut self,
        from: usize,
        to: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        if from >= self.max_seqs || to >= self.max_seqs {
            return Err(DriverError::Invalid(format!(
                "state rows {from} -> {to}: the cache holds {} sequences",
                self.max_seqs
            )));
        }
        for (buf, &size) in self.states.iter_mut().zip(&self.state_sizes) {
            let row = stream
                .clone_dtod(&buf.slice(from * size..(from + 1) * size))
                .map_err(|e| DriverError::Invalid(format!("CUDA: copying state: {e}")))?;
            stream
                .memcpy_dtod(&row, &mut buf.slice_mut(to * size..(to + 1) * size))
                .map_err(|e| DriverError::Invalid(format!("CUDA: copying state: {e}")))?;
        }
        Ok(())
    }

    /// Checks every sequence's pages and lays out the index tables.
    pub fn plan(&self, batch: &ForwardBatch) -> Result<AttentionPlan> {
        let mut plan = AttentionPlan {
            new_slots: vec![0; batch.num_tokens()],
            table: Vec::new(),
            table_offsets: vec![0; batch.num_tokens()],
            positions: vec![0; batch.num_tokens()],
        };
        for seq in &batch.seqs {
            let need = seq.kv_len().div_ceil(self.page_size);
            if seq.pages.len() < need {
                return Err(DriverError::Invalid(format!(
                    "sequence of {} tokens needs {need} KV pages of {}, got {}",
                    seq.kv_len(),
                    self.page_size,
                    seq.pages.len()
                )));
            }
            if let Some(bad) = seq.pages.iter().find(|&&p| p as usize >= self.num_pages) {
                return Err(DriverError::Invalid(format!(
                    "KV page {bad} does not exist (the cache has {} pages)",
                    self.num_pages
                )));
            }
            let slot_of = |pos: usize| {
                (seq.pages[pos / self.page_size] as usize * self.page_size + pos % self.page_size)
                    as i32
            };
            let offset = plan.table.len() as i32;
            plan.table.extend((0..seq.kv_len()).map(slot_of));
            for t in 0..seq.len {
                let row = seq.start + t;
                plan.new_slots[row] = slot_of(seq.first_pos + t);
                plan.table_offsets[row] = offset;
                plan.positions[row] = (seq.first_pos + t) as i32;
            }
        }
        Ok(plan)
    }
}

/// Copies `len` floats of `buf` at `from` over those at `to` (the ranges
/// are distinct pages or rows, never overlapping).
fn copy_range(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    buf: &mut CudaSlice<f32>,
    from: usize,
    to: usize,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let src = stream
        .clone_dtod(&buf.slice(from..from + len))
        .map_err(|e| DriverError::Invalid(format!("CUDA: copying KV: {e}")))?;
    stream
        .memcpy_dtod(&src, &mut buf.slice_mut(to..to + len))
        .map_err(|e| DriverError::Invalid(format!("CUDA: copying KV: {e}")))
}
