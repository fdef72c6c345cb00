//! Paged KV storage: for each attention op, `num_pages` pages of
//! `page_size` token slots, each slot holding every KV head's key and value,
//! in the cache dtype chosen at allocation. Narrow dtypes are encoded on
//! write and decoded into a scratch row on read (the CPU has no native
//! arithmetic for them). The cache also carries the one piece of state
//! that ops of a pass share: the sparse-attention indexer's picks, which
//! GLM-MoE-DSA's `shared` layers reuse.

use std::collections::HashMap;
use std::sync::Arc;

use half::{bf16, f16};
use pie_driver::{DriverError, KvDType, KvLayout, KvSlotShape, Result, SeqChunk};

use crate::indexer::Picks;

/// One tensor's (keys' or values') storage for all token slots.
#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    /// Values and one scale per (token slot, head).
    Int8 {
        q: Vec<i8>,
        scales: Vec<f32>,
    },
    /// E4M3 codes and one f32 scale per (token slot, head): each head is
    /// scaled so its largest value maps to 448, E4M3's largest.
    Fp8 {
        q: Vec<u8>,
        scales: Vec<f32>,
    },
}

impl Store {
    fn new(dtype: KvDType, elems: usize, heads: usize, tokens: usize) -> Self {
        match dtype {
            KvDType::Auto | KvDType::F32 => Store::F32(vec![0.0; elems]),
            KvDType::Bf16 => Store::Bf16(vec![bf16::ZERO; elems]),
            KvDType::F16 => Store::F16(vec![f16::ZERO; elems]),
            KvDType::Int8PerTokenHead => Store::Int8 {
                q: vec![0; elems],
                scales: vec![0.0; tokens * heads],
            },
            KvDType::Fp8E4m3 => Store::Fp8 {
                q: vec![0; elems],
                scales: vec![0.0; tokens * heads],
            },
        }
    }

    /// Copies token slots `from..from + n` over `to..to + n`; `width` =
    /// values per token slot, `heads` = scales per token slot.
    fn copy_slots(&mut self, from: usize, to: usize, n: usize, width: usize, heads: usize) {
        let (src, dst) = (from * width..(from + n) * width, to * width);
        let (ssrc, sdst) = (from * heads..(from + n) * heads, to * heads);
        match self {
            Store::F32(v) => v.copy_within(src, dst),
            Store::Bf16(v) => v.copy_within(src, dst),
            Store::F16(v) => v.copy_within(src, dst),
            Store::Int8 { q, scales } => {
                q.copy_within(src, dst);
                scales.copy_within(ssrc, sdst);
            }
            Store::Fp8 { q, scales } => {
                q.copy_within(src, dst);
                scales.copy_within(ssrc, sdst);
            }
        }
    }

    /// Stores `row` (all heads of one token slot, `dim` values a head).
    fn write(&mut self, token_slot: usize, dim: usize, row: &[f32]) {
        if row.is_empty() {
            return; // MLA's latent cache has keys only
        }
        let at = token_slot * row.len();
        match self {
            Store::F32(v) => v[at..at + row.len()].copy_from_slice(row),
            Store::Bf16(v) => v[at..at + row.len()]
                .iter_mut()
                .zip(row)
                .for_each(|(o, x)| *o = bf16::from_f32(*x)),
            Store::F16(v) => v[at..at + row.len()]
                .iter_mut()
                .zip(row)
                .for_each(|(o, x)| *o = f16::from_f32(*x)),
            Store::Int8 { q, scales } => {
                write_scaled(q, scales, at, token_slot, dim, row, 127.0, |v| {
                    v.round() as i8
                })
            }
            Store::Fp8 { q, scales } => {
                write_scaled(q, scales, at, token_slot, dim, row, 448.0, fp8_e4m3::encode)
            }
        }
    }

    /// Prefetches head `head` of token slot `token_slot` (f32 and f16
    /// storage, which attention reads in place; the other dtypes are
    /// decoded into a scratch row anyway).
    fn prefetch(&self, token_slot: usize, head: usize, dim: usize, width: usize) {
        let at = token_slot * width + head * dim;
        match self {
            Store::F32(v) => v.get(at..at + dim).map(pie_kernels::vector::prefetch),
            Store::F16(v) => v.get(at..at + dim).map(pie_kernels::vector::prefetch),
            _ => None,
        };
    }

    /// Head `head` of token slot `token_slot`; `width` = values per token.
    fn read<'a>(
        &'a self,
        token_slot: usize,
        head: usize,
        dim: usize,
        width: usize,
        buf: &'a mut [f32],
    ) -> HeadRow<'a> {
        let at = token_slot * width + head * dim;
        match self {
            Store::F32(v) => HeadRow::F32(&v[at..at + dim]),
            Store::F16(v) => HeadRow::F16(&v[at..at + dim]),
            Store::Bf16(v) => {
                buf.iter_mut()
                    .zip(&v[at..at + dim])
                    .for_each(|(o, x)| *o = x.to_f32());
                HeadRow::F32(buf)
            }
            Store::Int8 { q, scales } => {
                let scale = scales[token_slot * (width / dim) + head];
                buf.iter_mut()
                    .zip(&q[at..at + dim])
                    .for_each(|(o, x)| *o = *x as f32 * scale);
                HeadRow::F32(buf)
            }
            Store::Fp8 { q, scales } => {
                let scale = scales[token_slot * (width / dim) + head];
                buf.iter_mut()
                    .zip(&q[at..at + dim])
                    .for_each(|(o, x)| *o = fp8_e4m3::decode(*x) * scale);
                HeadRow::F32(buf)
            }
        }
    }
}

/// One head's cached key or value as attention reads it: in place for f32
/// and f16 storage, else decoded into a scratch row.
#[derive(Debug, Clone, Copy)]
pub enum HeadRow<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl HeadRow<'_> {
    /// `out[h] = rows[h] · self` (see [`pie_kernels::vector::dot_rows`]).
    pub fn dot_rows(self, rows: &[f32], out: &mut [f32]) {
        match self {
            HeadRow::F32(x) => pie_kernels::vector::dot_rows(rows, x, out),
            HeadRow::F16(x) => pie_kernels::vector::dot_rows_f16(rows, x, out),
        }
    }

    /// `ys[h] += alphas[h] · self` (see [`pie_kernels::vector::axpy_rows`]).
    pub fn axpy_rows(self, alphas: &[f32], ys: &mut [f32]) {
        match self {
            HeadRow::F32(x) => pie_kernels::vector::axpy_rows(alphas, x, ys),
            HeadRow::F16(x) => pie_kernels::vector::axpy_rows_f16(alphas, x, ys),
        }
    }

    pub fn to_vec(self) -> Vec<f32> {
        match self {
            HeadRow::F32(x) => x.to_vec(),
            HeadRow::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// Stores each head of `row` scaled so its largest magnitude maps to
/// `max_code`, with the scale kept per (token slot, head).
#[allow(clippy::too_many_arguments)]
fn write_scaled<T>(
    q: &mut [T],
    scales: &mut [f32],
    at: usize,
    token_slot: usize,
    dim: usize,
    row: &[f32],
    max_code: f32,
    encode: impl Fn(f32) -> T,
) {
    let heads = row.len() / dim;
    for (h, head) in row.chunks(dim).enumerate() {
        let max = head.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = if max > 0.0 { max / max_code } else { 1.0 };
        scales[token_slot * heads + h] = scale;
        q[at + h * dim..at + (h + 1) * dim]
            .iter_mut()
            .zip(head)
            .for_each(|(o, x)| *o = encode(x / scale));
    }
}

#[derive(Debug)]
pub struct KvSlot {
    pub shape: KvSlotShape,
    k: Store,
    v: Store,
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
    /// Per recurrent op: `max_seqs` rows of its per-sequence state (f32).
    states: Vec<Vec<f32>>,
    state_sizes: Vec<usize>,
    max_seqs: usize,
    /// The sparse-attention picks the indexer of each indexer-key slot
    /// made in the latest pass, for the layers that share them.
    picks: HashMap<usize, Arc<Picks>>,
}

impl KvCache {
    pub fn new(layout: &KvLayout) -> Result<Self> {
        if layout.page_size == 0 {
            return Err(DriverError::Invalid(
                "kv page size must be at least 1".into(),
            ));
        }
        let tokens = layout
            .page_size
            .checked_mul(layout.num_pages)
            .ok_or_else(|| DriverError::Invalid("kv cache size overflows".into()))?;
        let slots = layout
            .slots
            .iter()
            .map(|shape| {
                let elems = |dim: usize| {
                    tokens
                        .checked_mul(shape.kv_heads * dim)
                        .ok_or_else(|| DriverError::Invalid("kv cache size overflows".into()))
                };
                Ok(KvSlot {
                    k: Store::new(layout.dtype, elems(shape.head_dim)?, shape.kv_heads, tokens),
                    v: Store::new(
                        layout.dtype,
                        elems(shape.v_head_dim)?,
                        shape.kv_heads,
                        tokens,
                    ),
                    shape: shape.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let states = layout
            .state_slots
            .iter()
            .map(|&floats| {
                floats
                    .checked_mul(layout.max_seqs)
                    .map(|n| vec![0f32; n])
                    .ok_or_else(|| DriverError::Invalid("recurrent state size overflows".into()))
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            page_size: layout.page_size,
            num_pages: layout.num_pages,
            slots,
            states,
            state_sizes: layout.state_slots.clone(),
            max_seqs: layout.max_seqs,
            picks: HashMap::new(),
        })
    }

    /// The recurrent state of recurrent op `slot` for `seq`, zeroed when
    /// the chunk starts the sequence (position 0).
    pub fn state(&mut self, slot: usize, seq: &SeqChunk) -> Result<&mut [f32]> {
        let size = *self.state_sizes.get(slot).ok_or_else(|| {
            DriverError::Invalid(format!(
                "recurrent state slot {slot} requested; the cache has {}",
                self.state_sizes.len()
            ))
        })?;
        let row = seq.state as usize;
        if row >= self.max_seqs {
            return Err(DriverError::Invalid(format!(
                "recurrent state row {row} does not exist (the cache holds state for {} sequences)",
                self.max_seqs
            )));
        }
        let state = &mut self.states[slot][row * size..(row + 1) * size];
        if seq.first_pos == 0 {
            state.fill(0.0);
        }
        Ok(state)
    }

    /// Copies page `from` over page `to` in every attention op's cache.
    pub fn copy_page(&mut self, from: usize, to: usize) -> Result<()> {
        if from >= self.num_pages || to >= self.num_pages {
            return Err(DriverError::Invalid(format!(
                "KV pages {from} -> {to}: the cache has {} pages",
                self.num_pages
            )));
        }
        let n = self.page_size;
        for slot in &mut self.slots {
            let (kw, vw, heads) = (slot.k_width(), slot.v_width(), slot.shape.kv_heads);
            slot.k.copy_slots(from * n, to * n, n, kw, heads);
            slot.v.copy_slots(from * n, to * n, n, vw, heads);
        }
        Ok(())
    }

    /// Copies every recurrent state of sequence row `from` to row `to`
    /// (forking a context).
    pub fn copy_state(&mut self, from: usize, to: usize) -> Result<()> {
        if from >= self.max_seqs || to >= self.max_seqs {
            return Err(DriverError::Invalid(format!(
                "state rows {from} -> {to}: the cache holds {} sequences",
                self.max_seqs
            )));
        }
        for (states, &size) in self.states.iter_mut().zip(&self.state_sizes) {
            states.copy_within(from * size..(from + 1) * size, to * size);
        }
        Ok(())
    }

    /// The picks the indexer of indexer-key slot `slot` made last.
    pub fn picks(&self, slot: usize) -> Option<Arc<Picks>> {
        self.picks.get(&slot).cloned()
    }

    /// Keeps this pass's picks of indexer-key slot `slot` for the layers
    /// that share them.
    pub fn set_picks(&mut self, slot: usize, picks: Arc<Picks>) {
        self.picks.insert(slot, picks);
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
        let (kd, vd) = (s.shape.head_dim, s.shape.v_head_dim);
        s.k.write(token_slot, kd, k);
        s.v.write(token_slot, vd, v);
    }

    /// Head `kv_head`'s key at `token_slot`; `buf` (head_dim long) holds the
    /// decoded values when the cache dtype is neither f32 nor f16.
    pub fn key<'a>(
        &'a self,
        slot: usize,
        token_slot: usize,
        kv_head: usize,
        buf: &'a mut [f32],
    ) -> HeadRow<'a> {
        let s = &self.slots[slot];
        s.k.read(token_slot, kv_head, s.shape.head_dim, s.k_width(), buf)
    }

    /// Starts loading head `kv_head`'s key and value at `token_slot`, for
    /// attention to find them in cache a few positions later.
    pub fn prefetch(&self, slot: usize, token_slot: usize, kv_head: usize) {
        let s = &self.slots[slot];
        s.k.prefetch(token_slot, kv_head, s.shape.head_dim, s.k_width());
        s.v.prefetch(token_slot, kv_head, s.shape.v_head_dim, s.v_width());
    }

    pub fn value<'a>(
        &'a self,
        slot: usize,
        token_slot: usize,
        kv_head: usize,
        buf: &'a mut [f32],
    ) -> HeadRow<'a> {
        let s = &self.slots[slot];
        s.v.read(token_slot, kv_head, s.shape.v_head_dim, s.v_width(), buf)
    }
}

/// OCP FP8 E4M3 (bias 7, no infinities, max ±448, 0x7f/0xff = NaN).
mod fp8_e4m3 {
    pub fn encode(x: f32) -> u8 {
        if x.is_nan() {
            return 0x7f;
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs().min(448.0);
        if a < f32::powi(2.0, -10) {
            return sign; // rounds to zero (half of the smallest subnormal)
        }
        let e = a.log2().floor() as i32;
        let code = if e < -6 {
            // Subnormal: steps of 2^-9.
            (a / f32::powi(2.0, -9)).round() as u32
        } else {
            let m = ((a / f32::powi(2.0, e) - 1.0) * 8.0).round() as u32;
            let (e, m) = if m == 8 { (e + 1, 0) } else { (e, m) };
            (((e + 7) as u32) << 3) | m
        };
        sign | code.min(0x7e) as u8
    }

    pub fn decode(b: u8) -> f32 {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> 3) & 0x0f) as i32;
        let m = (b & 7) as f32;
        if e == 0x0f && b & 7 == 7 {
            return f32::NAN;
        }
        let mag = if e == 0 {
            m / 8.0 * f32::powi(2.0, -6)
        } else {
            (1.0 + m / 8.0) * f32::powi(2.0, e - 7)
        };
        sign * mag
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_every_code_and_rounds_to_nearest() {
            for b in 0u8..=255 {
                if b & 0x7f == 0x7f {
                    assert!(decode(b).is_nan());
                    continue;
                }
                let x = decode(b);
                let back = encode(x);
                // ±0 both decode to 0.
                assert!(
                    back == b || (x == 0.0 && back & 0x7f == 0),
                    "code {b:#x} -> {x} -> {back:#x}"
                );
            }
            assert_eq!(decode(encode(448.0)), 448.0);
            assert_eq!(decode(encode(1e6)), 448.0);
            assert_eq!(decode(encode(1.0)), 1.0);
            assert_eq!(decode(encode(-0.3)), -0.3125 + 0.0); // nearest of 0.28125 / 0.3125
        }
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;

    fn cache() -> KvCache {
        KvCache::new(&KvLayout {
            page_size: 4,
            num_pages: 1,
            slots: vec![],
            dtype: KvDType::Auto,
            state_slots: vec![3, 2],
            max_seqs: 2,
        })
        .unwrap()
    }

    fn chunk(first_pos: usize, state: u32) -> SeqChunk {
        SeqChunk {
            start: 0,
            len: 1,
            first_pos,
            pages: vec![0],
            state,
            mask: None,
        }
    }

    #[test]
    fn state_persists_between_chunks_and_resets_at_position_zero() {
        let mut kv = cache();
        kv.state(0, &chunk(0, 1)).unwrap().fill(2.0);
        assert_eq!(kv.state(0, &chunk(1, 1)).unwrap(), &[2.0; 3]);
        assert_eq!(kv.state(0, &chunk(0, 1)).unwrap(), &[0.0; 3]);
        assert!(kv.state(0, &chunk(0, 2)).is_err(), "row beyond max_seqs");
        assert!(
            kv.state(2, &chunk(0, 0)).is_err(),
            "slot beyond the model's"
        );
    }

    #[test]
    fn fork_copies_every_slot() {
        let mut kv = cache();
        kv.state(0, &chunk(0, 0)).unwrap().fill(1.0);
        kv.state(1, &chunk(0, 0)).unwrap().fill(5.0);
        kv.copy_state(0, 1).unwrap();
        assert_eq!(kv.state(0, &chunk(3, 1)).unwrap(), &[1.0; 3]);
        assert_eq!(kv.state(1, &chunk(3, 1)).unwrap(), &[5.0; 2]);
        assert!(kv.copy_state(0, 2).is_err());
    }
}
