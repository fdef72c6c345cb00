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

/// `out[i*n + j] = Σ_t x[i*k + t] · W[j][t]` for a block-quantized `W`
/// (`n` rows of `kind.row_bytes(k)` bytes). Each task decodes one weight row
/// at a time into an f32 scratch row, so the model stays quantized in
/// memory, and reuses the decoded row for every activation row.
pub fn matmul_quant(
    x: &[f32],
    m: usize,
    k: usize,
    kind: QuantKind,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    let row_bytes = kind.row_bytes(k).expect("rows hold whole blocks");
    assert_eq!(x.len(), m * k, "matmul_quant: x has the wrong size");
    assert_eq!(w.len(), n * row_bytes, "matmul_quant: w has the wrong size");
    assert_eq!(out.len(), m * n, "matmul_quant: out has the wrong size");
    if m == 0 || n == 0 {
        return;
    }
    let bands: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(QUANT_ROWS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let j0 = b * QUANT_ROWS_PER_TASK;
            let j1 = (j0 + QUANT_ROWS_PER_TASK).min(n);
            let width = j1 - j0;
            let mut row = vec![0f32; k];
            let mut band = vec![0f32; m * width];
            for j in j0..j1 {
                kind.dequantize_row(&w[j * row_bytes..(j + 1) * row_bytes], &mut row);
                for i in 0..m {
                    band[i * width + (j - j0)] = crate::matmul::dot(&x[i * k..(i + 1) * k], &row);
                }
            }
            (j0, band)
        })
        .collect();
    for (j0, band) in bands {
        let width = band.len() / m;
        for i in 0..m {
            out[i * n + j0..i * n + j0 + width].copy_from_slice(&band[i * width..(i + 1) * width]);
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
}
