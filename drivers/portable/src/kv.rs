//! Paged KV storage: for each attention op, `num_pages` pages of
//! `page_size` token slots, each slot holding every KV head's key and value.

use pie_driver::{DriverError, KvLayout, KvSlotShape, Result, SeqChunk};

#[derive(Debug)]
pub struct KvSlot {
    pub shape: KvSlotShape,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvSlot {
    fn k_width(&self) -> usize {
        self.shape.kv_heads * self.shape.head_dim
    }
    fn v_width(&self) -> usize {
        self.shape.kv_heads * self.shape.v_head_dim
    }
}

#[derive(Debug)]
pub struct KvCache {
    pub page_size: usize,
    pub num_pages: usize,
    pub slots: Vec<KvSlot>,
}

impl KvCache {
    pub fn new(layout: &KvLayout) -> Result<Self> {
        if layout.page_size == 0 {
            return Err(DriverError::Invalid(
                "kv page size must be at least 1".into(),
            ));
        }
        let tokens = layout.page_size.checked_mul(layout.num_pages);
        let slots = layout
            .slots
            .iter()
            .map(|shape| {
                let alloc = |width: usize| -> Result<Vec<f32>> {
                    let n = tokens
                        .and_then(|t| t.checked_mul(width))
                        .ok_or_else(|| DriverError::Invalid("kv cache size overflows".into()))?;
                    Ok(vec![0.0; n])
                };
                Ok(KvSlot {
                    k: alloc(shape.kv_heads * shape.head_dim)?,
                    v: alloc(shape.kv_heads * shape.v_head_dim)?,
                    shape: shape.clone(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            page_size: layout.page_size,
            num_pages: layout.num_pages,
            slots,
        })
    }

    /// Token slot index of position `pos` of a sequence.
    pub fn slot_of(&self, seq: &SeqChunk, pos: usize) -> usize {
        seq.pages[pos / self.page_size] as usize * self.page_size + pos % self.page_size
    }

    /// Checks that a sequence's pages exist and cover its positions.
    pub fn check_pages(&self, seq: &SeqChunk) -> Result<()> {
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
        Ok(())
    }

    /// Writes one token's key and value rows into `slot`'s storage.
    pub fn write(&mut self, slot: usize, token_slot: usize, k: &[f32], v: &[f32]) {
        let s = &mut self.slots[slot];
        let (kw, vw) = (s.k_width(), s.v_width());
        s.k[token_slot * kw..(token_slot + 1) * kw].copy_from_slice(k);
        s.v[token_slot * vw..(token_slot + 1) * vw].copy_from_slice(v);
    }

    pub fn key(&self, slot: usize, token_slot: usize, kv_head: usize) -> &[f32] {
        let s = &self.slots[slot];
        let d = s.shape.head_dim;
        let start = token_slot * s.k_width() + kv_head * d;
        &s.k[start..start + d]
    }

    pub fn value(&self, slot: usize, token_slot: usize, kv_head: usize) -> &[f32] {
        let s = &self.slots[slot];
        let d = s.shape.v_head_dim;
        let start = token_slot * s.v_width() + kv_head * d;
        &s.v[start..start + d]
    }
}
