//! GGUF block-quantized weight formats and their row decoders.
//!
//! A row of `k` weights is `k / block_elems` consecutive blocks. Rows are
//! decoded one at a time into an f32 scratch row inside the matmul, so a
//! quantized model is never widened as a whole. Layouts follow ggml's
//! `block_*` structs (little-endian, f16 scales).

use half::f16;

/// Quantized block formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantKind {
    /// Weights per block.
    pub fn block_elems(self) -> usize {
        match self {
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q5_0 => 22,
            QuantKind::Q5_1 => 24,
            QuantKind::Q8_0 => 34,
            QuantKind::Q4K => 144,
            QuantKind::Q5K => 176,
            QuantKind::Q6K => 210,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "q4_0",
            QuantKind::Q4_1 => "q4_1",
            QuantKind::Q5_0 => "q5_0",
            QuantKind::Q5_1 => "q5_1",
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4K => "q4_k",
            QuantKind::Q5K => "q5_k",
            QuantKind::Q6K => "q6_k",
        }
    }

    /// Bytes of a row of `k` weights, or None when `k` is not a whole
    /// number of blocks.
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        k.is_multiple_of(self.block_elems())
            .then(|| k / self.block_elems() * self.block_bytes())
    }

    /// Decodes a row (`row.len() == row_bytes(dst.len())`) into `dst`.
    pub fn dequantize_row(self, row: &[u8], dst: &mut [f32]) {
        let (be, bb) = (self.block_elems(), self.block_bytes());
        for (block, out) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
            match self {
                QuantKind::Q4_0 => q4_0(block, out),
                QuantKind::Q4_1 => q4_1(block, out),
                QuantKind::Q5_0 => q5_0(block, out),
                QuantKind::Q5_1 => q5_1(block, out),
                QuantKind::Q8_0 => q8_0(block, out),
                QuantKind::Q4K => q4_k(block, out),
                QuantKind::Q5K => q5_k(block, out),
                QuantKind::Q6K => q6_k(block, out),
            }
        }
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// 32 weights: scale d, 16 bytes of 4-bit values offset by 8. Low nibbles
/// hold weights 0..16, high nibbles 16..32.
fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Like Q4_0 with a minimum instead of the fixed offset: w = q·d + m.
fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = (q & 0x0f) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// 5-bit values: low 4 bits as in Q4_0, fifth bits packed in a u32.
fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        out[j] = (lo as i32 - 16) as f32 * d;
        out[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        out[j] = lo as f32 * d + m;
        out[j + 16] = hi as f32 * d + m;
    }
}

fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) in a K-quant super-block.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        let sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and min.
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (s0, m0) = scale_min_k4(2 * chunk, scales);
        let (s1, m1) = scale_min_k4(2 * chunk + 1, scales);
        let base = chunk * 64;
        for l in 0..32 {
            out[base + l] = d * s0 * (q[l] & 0x0f) as f32 - dmin * m0;
            out[base + 32 + l] = d * s1 * (q[l] >> 4) as f32 - dmin * m1;
        }
    }
}

fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (s0, m0) = scale_min_k4(2 * chunk, scales);
        let (s1, m1) = scale_min_k4(2 * chunk + 1, scales);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let base = chunk * 64;
        for l in 0..32 {
            let hi0 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi1 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[base + l] = d * s0 * ((q[l] & 0x0f) + hi0) as f32 - dmin * m0;
            out[base + 32 + l] = d * s1 * ((q[l] >> 4) + hi1) as f32 - dmin * m1;
        }
    }
}

/// 256 weights: 4 low bits in `ql`, 2 high bits in `qh`, 16 signed 8-bit
/// sub-block scales, one f16 super-scale at the end.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = half(b, 208);
    for half_block in 0..2 {
        let ql = &ql_all[half_block * 64..];
        let qh = &qh_all[half_block * 32..];
        let sc = &sc_all[half_block * 8..];
        let y = &mut out[half_block * 128..half_block * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Output features per rayon task in [`matmul_quant`].
const QUANT_ROWS_PER_TASK: usize = 16;
/// From this many activation rows on, weight bands are decoded to f32 once
/// and multiplied with the tiled f32 kernel; below, rows are dotted straight
/// from their blocks.
const DECODE_BAND_MIN_ROWS: usize = 5;

/// Rows of a quantized matrix, in whatever layout: what the shared matmul
/// driver needs from them.
pub(crate) trait QuantRows: Sync {
    fn dequantize_row(&self, j: usize, dst: &mut [f32]);
    fn row_dot(&self, j: usize, x: &fused::Prepared) -> f32;
    /// Dots of rows `j0..j0 + out.len()` with `x`; layouts that share
    /// activation loads between rows override it.
    fn row_dots(&self, j0: usize, x: &fused::Prepared, out: &mut [f32]) {
        for (j, o) in (j0..).zip(out.iter_mut()) {
            *o = self.row_dot(j, x);
        }
    }
}

/// Rows stored as GGUF blocks, back to back.
struct RawRows<'a> {
    kind: QuantKind,
    data: &'a [u8],
    row_bytes: usize,
}

impl QuantRows for RawRows<'_> {
    fn dequantize_row(&self, j: usize, dst: &mut [f32]) {
        self.kind.dequantize_row(
            &self.data[j * self.row_bytes..(j + 1) * self.row_bytes],
            dst,
        );
    }
    fn row_dot(&self, j: usize, x: &fused::Prepared) -> f32 {
        fused::row_dot(
            self.kind,
            &self.data[j * self.row_bytes..(j + 1) * self.row_bytes],
            x,
        )
    }
}

/// `out[i*n + j] = Σ_t x[i*k + t] · W[j][t]` for a block-quantized `W`
/// (`n` rows of `kind.row_bytes(k)` bytes). The model stays quantized in
/// memory: at decode sizes each block is expanded in registers and dotted
/// with the activations (Q4_0/Q4_1/Q8_0 against a 16-bit copy of them, see
/// [`fused::Prepared`]; other formats in f32); for prefill a band of rows is
/// decoded once to f32 and shared by every activation row.
pub fn matmul_quant(
    x: &[f32],
    m: usize,
    k: usize,
    kind: QuantKind,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) {
    let row_bytes = kind.row_bytes(k).expect("rows hold whole blocks");
    assert_eq!(w.len(), n * row_bytes, "matmul_quant: w has the wrong size");
    matmul_rows(
        x,
        m,
        k,
        &RawRows {
            kind,
            data: w,
            row_bytes,
        },
        n,
        out,
    );
}

thread_local! {
    /// A prefill band's weight rows decoded to f32, kept per thread.
    static DECODED_BAND: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The matmul over any row layout: fused row dots at decode sizes, decoded
/// bands and the tiled f32 kernel for prefill.
pub(crate) fn matmul_rows(
    x: &[f32],
    m: usize,
    k: usize,
    rows: &impl QuantRows,
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(x.len(), m * k, "matmul_quant: x has the wrong size");
    assert_eq!(out.len(), m * n, "matmul_quant: out has the wrong size");
    if m == 0 || n == 0 {
        return;
    }
    if m >= DECODE_BAND_MIN_ROWS {
        const BAND: usize = 64;
        return column_bands(n, BAND, m, out, |j0, j1| {
            let mut band = vec![0f32; m * (j1 - j0)];
            // Reused per thread: a fresh band of this size (up to a few MB)
            // is an mmap, page faults and an munmap per band. Taken out
            // rather than borrowed: the matmul below may run another band
            // on this thread while it waits for its own tasks.
            let mut decoded = DECODED_BAND.take();
            decoded.resize((j1 - j0) * k, 0.0);
            for (j, dst) in (j0..j1).zip(decoded.chunks_exact_mut(k)) {
                rows.dequantize_row(j, dst);
            }
            crate::matmul::matmul(
                x,
                m,
                k,
                crate::WeightMatrix::F32(&decoded),
                j1 - j0,
                &mut band,
            );
            DECODED_BAND.set(decoded);
            band
        });
    }
    let prepared: Vec<fused::Prepared> = (0..m)
        .map(|i| fused::Prepared::new(&x[i * k..(i + 1) * k]))
        .collect();
    if m == 1 {
        // One activation row (decode): each task writes its columns in place.
        use rayon::prelude::*;
        return out
            .par_chunks_mut(QUANT_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(t, cols)| rows.row_dots(t * QUANT_ROWS_PER_TASK, &prepared[0], cols));
    }
    column_bands(n, QUANT_ROWS_PER_TASK, m, out, |j0, j1| {
        let width = j1 - j0;
        let mut band = vec![0f32; m * width];
        for (xp, cols) in prepared.iter().zip(band.chunks_exact_mut(width)) {
            rows.row_dots(j0, xp, cols);
        }
        band
    });
}

/// Computes output columns `[j0, j1)` in parallel bands of `band` columns:
/// `f(j0, j1)` returns that band as `[m, j1 - j0]`, which is copied into
/// `out` (`[m, n]`).
pub(crate) fn column_bands(
    n: usize,
    band: usize,
    m: usize,
    out: &mut [f32],
    f: impl Fn(usize, usize) -> Vec<f32> + Sync,
) {
    use rayon::prelude::*;
    let bands: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(band))
        .into_par_iter()
        .map(|b| {
            let j0 = b * band;
            (j0, f(j0, (j0 + band).min(n)))
        })
        .collect();
    for (j0, values) in bands {
        let width = values.len() / m;
        for i in 0..m {
            out[i * n + j0..i * n + j0 + width]
                .copy_from_slice(&values[i * width..(i + 1) * width]);
        }
    }
}

/// Dot products of one quantized weight row with one f32 activation row.
pub(crate) mod fused {
    use super::QuantKind;

    /// One activation row, prepared once per matmul for every weight row.
    ///
    /// Besides the f32 values it holds a 16-bit copy with one scale per 32
    /// values (|error| ≤ scale/2, about 1.5e-5 of the block's largest value),
    /// so small-block dots run as exact integer multiply-adds
    /// (`vpmaddwd`); llama.cpp rounds activations to 8 bits instead, which
    /// visibly changes greedy output. Per-block sums feed the offset term
    /// (`min · Σx`) of Q4_0/Q4_1 exactly.
    pub struct Prepared<'a> {
        pub x: &'a [f32],
        pub q: Vec<i16>,
        pub scales: Vec<f32>,
        pub sums: Vec<f32>,
    }

    /// Prepared scales and sums run to a multiple of this many blocks
    /// (zeros after the last), so kernels load eight blocks' worth at once.
    const SCALE_PAD: usize = 8;

    impl<'a> Prepared<'a> {
        pub fn new(x: &'a [f32]) -> Self {
            let blocks = x.len().div_ceil(32);
            let padded = blocks.next_multiple_of(SCALE_PAD);
            let mut p = Prepared {
                x,
                q: vec![0i16; x.len()],
                scales: vec![0f32; padded],
                sums: vec![0f32; padded],
            };
            #[cfg(target_arch = "x86_64")]
            {
                if avx2::available() && x.len().is_multiple_of(32) {
                    // SAFETY: AVX2 was detected; `q` holds `x.len()` values
                    // and `scales`/`sums` one entry per 32.
                    unsafe { avx2::prepare(&mut p) };
                    return p;
                }
            }
            for (b, (xs, qs)) in x.chunks(32).zip(p.q.chunks_mut(32)).enumerate() {
                let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if max > 0.0 { max / 32767.0 } else { 1.0 };
                for (o, v) in qs.iter_mut().zip(xs) {
                    *o = (v / scale).round_ties_even() as i16;
                }
                p.scales[b] = scale;
                p.sums[b] = xs.iter().sum();
            }
            p
        }
    }

    pub fn row_dot(kind: QuantKind, row: &[u8], x: &Prepared) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                // SAFETY: AVX2, FMA and F16C were detected at run time; block
                // lengths are checked by `row_bytes` in the caller.
                match kind {
                    QuantKind::Q4_0 | QuantKind::Q4_1 => return unsafe { avx2::q4(kind, row, x) },
                    QuantKind::Q8_0 => return unsafe { avx2::q8_0(row, x) },
                    _ => {}
                }
            }
        }
        portable(kind, row, x.x)
    }

    /// Any format: decode a block to the stack, then dot.
    pub fn portable(kind: QuantKind, row: &[u8], x: &[f32]) -> f32 {
        let (be, bb) = (kind.block_elems(), kind.block_bytes());
        let mut buf = [0f32; 256];
        let mut total = 0f32;
        for (block, xs) in row.chunks_exact(bb).zip(x.chunks_exact(be)) {
            kind.dequantize_row(block, &mut buf[..be]);
            total += crate::matmul::dot(&buf[..be], xs);
        }
        total
    }

    #[cfg(target_arch = "x86_64")]
    pub(crate) mod avx2 {
        use std::arch::x86_64::*;
        use std::sync::OnceLock;

        use super::{Prepared, QuantKind};

        pub fn available() -> bool {
            static HAS: OnceLock<bool> = OnceLock::new();
            *HAS.get_or_init(|| {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            })
        }

        /// The f16 at `b[at..at + 2]`, converted in-register (F16C); an
        /// out-of-line software conversion here cost a sixth of decode time.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) unsafe fn scale(b: &[u8], at: usize) -> f32 {
            let bits = u16::from_le_bytes([b[at], b[at + 1]]) as i32;
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) unsafe fn hsum(v: __m256) -> f32 {
            let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
        }

        /// [`Prepared::new`] for whole blocks of 32: per block the largest
        /// magnitude sets the scale, values are rounded to the nearest
        /// 16-bit step (ties to even, as the portable loop does).
        ///
        /// # Safety
        /// AVX2; `p.x.len()` a multiple of 32, `p.q` as long, `p.scales` and
        /// `p.sums` one entry per block.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn prepare(p: &mut Prepared) {
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            for (b, (xs, qs)) in
                p.x.chunks_exact(32)
                    .zip(p.q.chunks_exact_mut(32))
                    .enumerate()
            {
                let v: [__m256; 4] =
                    std::array::from_fn(|i| _mm256_loadu_ps(xs.as_ptr().add(8 * i)));
                let m01 = _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs));
                let m23 = _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs));
                let max = hmax(_mm256_max_ps(m01, m23));
                let scale = if max > 0.0 { max / 32767.0 } else { 1.0 };
                let sv = _mm256_set1_ps(scale);
                let q: [__m256i; 4] = std::array::from_fn(|i| {
                    let r = _mm256_round_ps(
                        _mm256_div_ps(v[i], sv),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                    );
                    _mm256_cvtps_epi32(r)
                });
                // packs works per 128-bit lane: restore the order after.
                let lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8);
                let hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xd8);
                _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, lo);
                _mm256_storeu_si256(qs.as_mut_ptr().add(16) as *mut __m256i, hi);
                p.scales[b] = scale;
                let sum = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
                p.sums[b] = hsum(sum);
            }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn hmax(v: __m256) -> f32 {
            let m4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)))
        }

        /// Q4_0 (`(q - 8)·d`) and Q4_1 (`q·d + m`): per block,
        /// `d·Σ q·x + offset·Σ x`, with `Σ q·x` an exact integer dot of the
        /// nibbles and the 16-bit activations.
        ///
        /// # Safety
        /// AVX2+FMA+F16C; `x.len() == 32 · blocks`, `sums` has one entry a block.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q4(kind: QuantKind, row: &[u8], x: &Prepared) -> f32 {
            let (bb, qs_at) = if kind == QuantKind::Q4_0 {
                (18, 2)
            } else {
                (20, 4)
            };
            let mask = _mm_set1_epi8(0x0f);
            let xq = x.q.as_ptr();
            // Independent accumulators: one shared chain would make the loop
            // wait on FMA latency instead of issuing every cycle.
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut offsets = [0f32; 4];
            for (b, block) in row.chunks_exact(bb).enumerate() {
                let lane = b & 3;
                let d = scale(block, 0);
                let offset = if kind == QuantKind::Q4_0 {
                    -8.0 * d
                } else {
                    scale(block, 2)
                };
                let q = _mm_loadu_si128(block.as_ptr().add(qs_at) as *const __m128i);
                let lo = _mm256_cvtepu8_epi16(_mm_and_si128(q, mask));
                let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), mask));
                let x0 = _mm256_loadu_si256(xq.add(b * 32) as *const __m256i);
                let x1 = _mm256_loadu_si256(xq.add(b * 32 + 16) as *const __m256i);
                let dots = _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
                let ds = _mm256_set1_ps(d * x.scales[b]);
                acc[lane] = _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(dots), acc[lane]);
                offsets[lane] += offset * x.sums[b];
            }
            let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            hsum(total) + (offsets[0] + offsets[1]) + (offsets[2] + offsets[3])
        }

        /// Q8_0: signed bytes times the block scale, as 16-bit integer dots.
        ///
        /// # Safety
        /// AVX2+FMA+F16C; `x` holds 32 values a block.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q8_0(row: &[u8], x: &Prepared) -> f32 {
            let xq = x.q.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 4];
            for (b, block) in row.chunks_exact(34).enumerate() {
                let d = scale(block, 0);
                let qp = block.as_ptr().add(2);
                let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(qp as *const __m128i));
                let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(qp.add(16) as *const __m128i));
                let x0 = _mm256_loadu_si256(xq.add(b * 32) as *const __m256i);
                let x1 = _mm256_loadu_si256(xq.add(b * 32 + 16) as *const __m256i);
                let dots = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                let ds = _mm256_set1_ps(d * x.scales[b]);
                acc[b & 3] = _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(dots), acc[b & 3]);
            }
            hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ))
        }
    }
}

/// Decodes rows `ids` of a quantized `[vocab, k]` table into `out`.
pub fn gather_rows_quant(kind: QuantKind, table: &[u8], k: usize, ids: &[u32], out: &mut [f32]) {
    let row_bytes = kind.row_bytes(k).expect("rows hold whole blocks");
    for (dst, &id) in out.chunks_mut(k).zip(ids) {
        let at = id as usize * row_bytes;
        kind.dequantize_row(&table[at..at + row_bytes], dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 activation prep rounds exactly like the portable loop, and
    /// pads scales and sums with zeros to a multiple of eight blocks.
    #[test]
    fn prepared_activations_match_the_portable_loop() {
        let x: Vec<f32> = (0..18 * 32)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 + if i % 64 == 0 { 7.0 } else { 0.0 })
            .collect();
        let p = fused::Prepared::new(&x);
        assert_eq!((p.scales.len(), p.sums.len()), (24, 24));
        assert!(p.scales[18..]
            .iter()
            .chain(&p.sums[18..])
            .all(|&v| v == 0.0));
        for (b, xs) in x.chunks(32).enumerate() {
            let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 32767.0;
            assert_eq!(p.scales[b], scale, "block {b}");
            for (i, v) in xs.iter().enumerate() {
                assert_eq!(p.q[b * 32 + i], (v / scale).round_ties_even() as i16);
            }
            let sum: f32 = xs.iter().sum();
            assert!((p.sums[b] - sum).abs() <= 1e-5 * (1.0 + sum.abs()));
        }
    }

    /// Q8_0 rows of known values: the quantized matmul equals a plain one
    /// over the decoded weights.
    #[test]
    fn quant_matmul_matches_decoded() {
        let (m, k, n) = (3, 64, 5);
        let mut w = Vec::new();
        for j in 0..n {
            for blk in 0..2 {
                w.extend_from_slice(&half::f16::from_f32(0.01 * (j + 1) as f32).to_le_bytes());
                w.extend((0..32).map(|t| ((t - 16 + blk + j as i32) as i8) as u8));
            }
        }
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut out = vec![0f32; m * n];
        matmul_quant(&x, m, k, QuantKind::Q8_0, &w, n, &mut out);
        let mut row = vec![0f32; k];
        for j in 0..n {
            QuantKind::Q8_0.dequantize_row(&w[j * 68..(j + 1) * 68], &mut row);
            for i in 0..m {
                let want: f32 = (0..k).map(|t| x[i * k + t] * row[t]).sum();
                assert!(
                    (out[i * n + j] - want).abs() < 1e-4,
                    "{} vs {want}",
                    out[i * n + j]
                );
            }
        }
        let mut g = vec![0f32; k];
        gather_rows_quant(QuantKind::Q8_0, &w, k, &[2], &mut g);
        QuantKind::Q8_0.dequantize_row(&w[2 * 68..3 * 68], &mut row);
        assert_eq!(g, row);
    }

    /// Random blocks with finite scales at the given f16 byte offsets.
    fn random_row(kind: QuantKind, blocks: usize, seed: u64) -> Vec<u8> {
        let halves: &[usize] = match kind {
            QuantKind::Q4_0 | QuantKind::Q5_0 | QuantKind::Q8_0 => &[0],
            QuantKind::Q6K => &[208],
            _ => &[0, 2],
        };
        let mut s = seed | 1;
        let mut bytes: Vec<u8> = (0..blocks * kind.block_bytes())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        for b in 0..blocks {
            for &h in halves {
                let v = half::f16::from_f32(0.01 + (b % 5) as f32 * 0.003).to_le_bytes();
                let at = b * kind.block_bytes() + h;
                bytes[at..at + 2].copy_from_slice(&v);
            }
        }
        bytes
    }

    /// Every path (fused AVX2 dots, block-decode fallback, decoded bands
    /// with the tiled kernel) equals decode-then-dot in f64.
    #[test]
    fn every_path_matches_decoded_weights() {
        let kinds = [
            QuantKind::Q4_0,
            QuantKind::Q4_1,
            QuantKind::Q5_0,
            QuantKind::Q5_1,
            QuantKind::Q8_0,
            QuantKind::Q4K,
            QuantKind::Q5K,
            QuantKind::Q6K,
        ];
        for kind in kinds {
            let (k, n) = (512, 37);
            let row_bytes = kind.row_bytes(k).unwrap();
            let w: Vec<u8> = (0..n)
                .flat_map(|j| random_row(kind, k / kind.block_elems(), j as u64 + 7))
                .collect();
            let mut decoded = vec![0f32; n * k];
            for j in 0..n {
                kind.dequantize_row(
                    &w[j * row_bytes..(j + 1) * row_bytes],
                    &mut decoded[j * k..(j + 1) * k],
                );
            }
            for m in [1, 3, 8] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let mut out = vec![0f32; m * n];
                matmul_quant(&x, m, k, kind, &w, n, &mut out);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| x[i * k + t] as f64 * decoded[j * k + t] as f64)
                            .sum();
                        let scale: f64 = (0..k)
                            .map(|t| (x[i * k + t] as f64 * decoded[j * k + t] as f64).abs())
                            .sum();
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * scale + 1e-6,
                            "{kind:?} m={m} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
