//! Q4_0, Q4_1 and Q8_0 matrices repacked at load for the decode kernel.
//!
//! GGUF interleaves each block's f16 scale (and min) with its quants, so a
//! row-dot converts two scalars per 32 weights and keeps the `min·Σx` term in
//! a scalar chain. Here each row keeps its scales and mins as contiguous f16
//! arrays — converted eight at a time — and the quant bytes of every
//! [`GROUP`] consecutive rows are interleaved block by block (block 0 of rows
//! 0–3, block 1 of rows 0–3, …). The kernel dots the four rows of a group
//! together: each activation block is loaded once for four weight rows, and
//! the weights stream from one sequential run of memory instead of four.
//! Same bytes as the file, different order.

use crate::memory::HugeBuf;
use crate::quant::fused::Prepared;
use crate::quant::{matmul_rows, QuantKind, QuantRows};

/// Rows whose quant bytes are interleaved and dotted together.
const GROUP: usize = 4;

#[derive(Debug)]
pub struct PackedRows {
    kind: QuantKind,
    rows: usize,
    /// Blocks per row.
    nb: usize,
    /// f16 bits, `rows × nb`, then [`PAD`] zeros.
    scales: HugeBuf<u16>,
    /// f16 bits of Q4_1's mins, `rows × nb` then [`PAD`] zeros (empty
    /// otherwise).
    mins: HugeBuf<u16>,
    /// Quant bytes, `rows × nb × quant_bytes`, interleaved by row group.
    qs: HugeBuf<u8>,
}

/// Zero scales after the last row, so the kernel may read eight blocks'
/// scales at any block of any row.
const PAD: usize = 8;

/// Quant bytes per block.
fn quant_bytes(kind: QuantKind) -> usize {
    if kind == QuantKind::Q8_0 {
        32
    } else {
        16
    }
}

/// Index (in blocks) of block `b` of row `j` in the interleaved quant array:
/// a group's rows sit side by side per block; the last group may hold
/// fewer than [`GROUP`] rows.
fn quant_index(rows: usize, nb: usize, j: usize, b: usize) -> usize {
    let first = j / GROUP * GROUP;
    let width = GROUP.min(rows - first);
    first * nb + b * width + (j - first)
}

impl PackedRows {
    /// Repacks `rows` rows of `k` weights; None for formats without a packed
    /// kernel (they run from their GGUF blocks).
    pub fn from_blocks(kind: QuantKind, data: &[u8], rows: usize, k: usize) -> Option<Self> {
        if !matches!(kind, QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q8_0) {
            return None;
        }
        let row_bytes = kind.row_bytes(k)?;
        if data.len() != rows * row_bytes {
            return None;
        }
        let nb = k / 32;
        let qb = quant_bytes(kind);
        let head = kind.block_bytes() - qb;
        let mut scales = HugeBuf::zeroed(rows * nb + PAD);
        let mut mins = HugeBuf::zeroed(if kind == QuantKind::Q4_1 {
            rows * nb + PAD
        } else {
            0
        });
        let mut qs = HugeBuf::zeroed(rows * nb * qb);
        for (i, block) in data.chunks_exact(kind.block_bytes()).enumerate() {
            scales[i] = u16::from_le_bytes([block[0], block[1]]);
            if kind == QuantKind::Q4_1 {
                mins[i] = u16::from_le_bytes([block[2], block[3]]);
            }
            let at = quant_index(rows, nb, i / nb, i % nb) * qb;
            qs[at..at + qb].copy_from_slice(&block[head..]);
        }
        Some(PackedRows {
            kind,
            rows,
            nb,
            scales,
            mins,
            qs,
        })
    }

    /// Quantizes f32 rows (`rows × k`, `k` a multiple of 32) to Q8_0: one
    /// f16 scale per 32 weights, `max|w| / 127`. Used for runtime int8
    /// quantization of float checkpoints.
    pub fn quantize_q8_0(w: &[f32], rows: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(32) || w.len() != rows * k {
            return None;
        }
        let nb = k / 32;
        let mut scales = HugeBuf::zeroed(rows * nb + PAD);
        let mut qs = HugeBuf::zeroed(rows * k);
        for (i, block) in w.chunks_exact(32).enumerate() {
            let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = half::f16::from_f32(max / 127.0);
            let inv = if d.to_f32() > 0.0 {
                1.0 / d.to_f32()
            } else {
                0.0
            };
            scales[i] = d.to_bits();
            let at = quant_index(rows, nb, i / nb, i % nb) * 32;
            for (q, x) in qs[at..at + 32].iter_mut().zip(block) {
                *q = (x * inv).round().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
        Some(PackedRows {
            kind: QuantKind::Q8_0,
            rows,
            nb,
            scales,
            mins: HugeBuf::zeroed(0),
            qs,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `out = x · selfᵀ` (`x`: `m` rows of `k = 32·nb`).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        matmul_rows(x, m, self.nb * 32, self, self.rows, out);
    }

    /// Rows `ids` as f32 (embedding lookup).
    pub fn gather(&self, ids: &[u32], out: &mut [f32]) {
        let k = self.nb * 32;
        for (dst, &id) in out.chunks_mut(k).zip(ids) {
            self.dequantize_row(id as usize, dst);
        }
    }

    /// Block `b` of row `j` in its GGUF form.
    fn block(&self, j: usize, b: usize, buf: &mut [u8; 34]) -> usize {
        let i = j * self.nb + b;
        let qb = quant_bytes(self.kind);
        let mut at = 0;
        buf[..2].copy_from_slice(&self.scales[i].to_le_bytes());
        at += 2;
        if self.kind == QuantKind::Q4_1 {
            buf[2..4].copy_from_slice(&self.mins[i].to_le_bytes());
            at += 2;
        }
        let q = quant_index(self.rows, self.nb, j, b) * qb;
        buf[at..at + qb].copy_from_slice(&self.qs[q..q + qb]);
        at + qb
    }

    /// Dots of rows `j0..j0 + out.len()` (all in one group) with `x`.
    #[cfg(target_arch = "x86_64")]
    fn group_dots_avx2(&self, j0: usize, x: &Prepared, out: &mut [f32]) {
        macro_rules! go {
            ($kind:expr) => {
                // SAFETY: AVX2, FMA and F16C were detected at run time; the
                // arrays hold `nb` blocks for every row, the rows share a group.
                unsafe {
                    match out.len() {
                        4 => avx2::dots::<{ $kind }, 4>(self, j0, x, out),
                        3 => avx2::dots::<{ $kind }, 3>(self, j0, x, out),
                        2 => avx2::dots::<{ $kind }, 2>(self, j0, x, out),
                        _ => avx2::dots::<{ $kind }, 1>(self, j0, x, out),
                    }
                }
            };
        }
        match self.kind {
            QuantKind::Q8_0 => go!(avx2::Q8_0),
            QuantKind::Q4_1 => go!(avx2::Q4_1),
            _ => go!(avx2::Q4_0),
        }
    }
}

impl QuantRows for PackedRows {
    fn dequantize_row(&self, j: usize, dst: &mut [f32]) {
        let mut buf = [0u8; 34];
        for (b, out) in dst.chunks_exact_mut(32).enumerate() {
            let len = self.block(j, b, &mut buf);
            self.kind.dequantize_row(&buf[..len], out);
        }
    }

    fn row_dot(&self, j: usize, x: &Prepared) -> f32 {
        let mut out = [0f32];
        self.row_dots(j, x, &mut out);
        out[0]
    }

    fn row_dots(&self, j0: usize, x: &Prepared, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::quant::fused::avx2::available() {
                let mut j = j0;
                for chunk in out.chunks_mut(GROUP) {
                    // Split where a row group ends, so each call stays in one.
                    let split = (GROUP - j % GROUP).min(chunk.len());
                    let (a, b) = chunk.split_at_mut(split);
                    self.group_dots_avx2(j, x, a);
                    if !b.is_empty() {
                        self.group_dots_avx2(j + split, x, b);
                    }
                    j += chunk.len();
                }
                return;
            }
        }
        let mut row = vec![0f32; self.nb * 32];
        for (j, o) in (j0..).zip(out.iter_mut()) {
            self.dequantize_row(j, &mut row);
            *o = crate::matmul::dot(&row, x.x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{quant_bytes, quant_index, PackedRows, Prepared, GROUP};
    use crate::quant::fused::avx2::hsum;

    /// Bytes ahead of the current block that the kernel prefetches.
    const PREFETCH_AHEAD: usize = 2048;

    // Formats as const parameters, so each gets its own loop without
    // per-block branches.
    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;

    /// Eight f16 values (at `p`) as f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// One block's 32 quants (at `p`) as two vectors of 16-bit lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen<const KIND: u8>(p: *const u8) -> (__m256i, __m256i) {
        if KIND == Q8_0 {
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16) as *const __m128i)),
            )
        } else {
            let mask = _mm_set1_epi8(0x0f);
            let q = _mm_loadu_si128(p as *const __m128i);
            (
                _mm256_cvtepu8_epi16(_mm_and_si128(q, mask)),
                _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), mask)),
            )
        }
    }

    /// Block scales times activation scales for blocks `b..b + 8` of row
    /// `j` into `ds`, and their offset term (`min·Σx`, or `-8·d·Σx` for
    /// Q4_0) added to `offsets`. Past a row's last block the activation
    /// scales and sums are zero padding, so those lanes add nothing.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales<const KIND: u8>(
        w: &PackedRows,
        j: usize,
        b: usize,
        x: &Prepared,
        ds: &mut [f32; 8],
        offsets: &mut __m256,
    ) {
        let base = j * w.nb + b;
        let d8 = f16x8(w.scales.as_ptr().add(base));
        _mm256_storeu_ps(
            ds.as_mut_ptr(),
            _mm256_mul_ps(d8, _mm256_loadu_ps(x.scales.as_ptr().add(b))),
        );
        let sums = _mm256_loadu_ps(x.sums.as_ptr().add(b));
        if KIND == Q4_1 {
            let mins = f16x8(w.mins.as_ptr().add(base));
            *offsets = _mm256_fmadd_ps(mins, sums, *offsets);
        } else if KIND == Q4_0 {
            let mins = _mm256_mul_ps(d8, _mm256_set1_ps(-8.0));
            *offsets = _mm256_fmadd_ps(mins, sums, *offsets);
        }
    }

    /// Rows `j0..j0 + R` (one row group) against one prepared activation
    /// row. Each activation block is loaded once and dotted with the R
    /// weight blocks beside it in memory; scales of eight blocks are
    /// converted at once.
    ///
    /// # Safety
    /// AVX2+FMA+F16C; the rows lie in one group; `out.len() == R`.
    // Block and row indices address several arrays at once.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots<const KIND: u8, const R: usize>(
        w: &PackedRows,
        j0: usize,
        x: &Prepared,
        out: &mut [f32],
    ) {
        debug_assert!(R <= GROUP && j0 % GROUP + R <= GROUP && out.len() == R);
        let nb = w.nb;
        let qb = quant_bytes(w.kind);
        let first = j0 / GROUP * GROUP;
        // Bytes from one block of a row to its next block.
        let stride = GROUP.min(w.rows - first) * qb;
        let qs = w.qs.as_ptr().add(quant_index(w.rows, nb, j0, 0) * qb);
        let xq = x.q.as_ptr();
        let mut acc = [_mm256_setzero_ps(); R];
        let mut offsets = [_mm256_setzero_ps(); R];
        let mut ds = [[0f32; 8]; R];
        let mut b = 0;
        while b < nb {
            let group = (nb - b).min(8);
            for r in 0..R {
                scales::<KIND>(w, j0 + r, b, x, &mut ds[r], &mut offsets[r]);
            }
            for i in 0..group {
                let blk = b + i;
                let x0 = _mm256_loadu_si256(xq.add(blk * 32) as *const __m256i);
                let x1 = _mm256_loadu_si256(xq.add(blk * 32 + 16) as *const __m256i);
                let wp = qs.add(blk * stride);
                // The weights stream from memory once per token: ask for
                // them ahead, so loads find them in cache. (A prefetch past
                // the end of `qs` never faults.)
                for line in (0..R * qb).step_by(64) {
                    _mm_prefetch(wp.add(PREFETCH_AHEAD + line) as *const i8, _MM_HINT_T0);
                }
                for r in 0..R {
                    let (w0, w1) = widen::<KIND>(wp.add(r * qb));
                    let dot =
                        _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_set1_ps(ds[r][i]), _mm256_cvtepi32_ps(dot), acc[r]);
                }
            }
            b += group;
        }
        for r in 0..R {
            out[r] = hsum(acc[r]) + hsum(offsets[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed rows give the same products and rows as the GGUF blocks.
    #[test]
    fn packed_matches_blocks() {
        for kind in [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q8_0] {
            // k = 576 (18 blocks): two full groups of eight and a tail.
            let (k, n) = (576, 21);
            let bb = kind.block_bytes();
            let mut s = 99u64;
            let mut data: Vec<u8> = (0..n * k / 32 * bb)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            for (i, block) in data.chunks_exact_mut(bb).enumerate() {
                block[..2].copy_from_slice(
                    &half::f16::from_f32(0.01 + (i % 7) as f32 * 0.002).to_le_bytes(),
                );
                if kind == QuantKind::Q4_1 {
                    block[2..4].copy_from_slice(
                        &half::f16::from_f32(-0.05 + (i % 3) as f32 * 0.01).to_le_bytes(),
                    );
                }
            }
            let packed = PackedRows::from_blocks(kind, &data, n, k).unwrap();
            let mut a = vec![0f32; k];
            let mut b = vec![0f32; k];
            for j in 0..n {
                packed.dequantize_row(j, &mut a);
                kind.dequantize_row(&data[j * k / 32 * bb..(j + 1) * k / 32 * bb], &mut b);
                assert_eq!(a, b, "{kind:?} row {j}");
            }
            for m in [1, 2, 7] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                    .collect();
                let mut want = vec![0f32; m * n];
                crate::quant::matmul_quant(&x, m, k, kind, &data, n, &mut want);
                let mut got = vec![0f32; m * n];
                packed.matmul(&x, m, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{kind:?} m={m}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
