//! `out = x · Wᵀ` with W row-major `[n, k]` (Hugging Face's linear layout),
//! f32 activations and f32/bf16/f16 weights widened on the fly.
//!
//! Work is split over output features so every thread streams its own slice
//! of W once: at batch 1 the kernel is a bandwidth-bound GEMV, and for larger
//! batches each weight row is widened once and reused for every x row.

use half::{bf16, f16};
use rayon::prelude::*;

/// A row-major weight matrix `[n, k]`.
#[derive(Clone, Copy, Debug)]
pub enum WeightMatrix<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl WeightMatrix<'_> {
    fn len(&self) -> usize {
        match self {
            WeightMatrix::F32(w) => w.len(),
            WeightMatrix::Bf16(w) => w.len(),
            WeightMatrix::F16(w) => w.len(),
        }
    }

    /// Widens row `j` (of length `k`) into `dst`.
    fn row_to_f32(&self, j: usize, k: usize, dst: &mut [f32]) {
        let range = j * k..(j + 1) * k;
        match self {
            WeightMatrix::F32(w) => dst.copy_from_slice(&w[range]),
            WeightMatrix::Bf16(w) => widen::bf16_to_f32(&w[range], dst),
            WeightMatrix::F16(w) => widen::f16_to_f32(&w[range], dst),
        }
    }
}

/// Output features per rayon task: big enough to amortize scheduling, small
/// enough that two threads share even narrow matrices.
const ROWS_PER_TASK: usize = 16;

/// `out[i*n + j] = Σ_t x[i*k + t] · w[j*k + t]`.
pub fn matmul(x: &[f32], m: usize, k: usize, w: WeightMatrix<'_>, n: usize, out: &mut [f32]) {
    assert_eq!(
        x.len(),
        m * k,
        "matmul: x has {} elements, expected {m}×{k}",
        x.len()
    );
    assert_eq!(
        w.len(),
        n * k,
        "matmul: w has {} elements, expected {n}×{k}",
        w.len()
    );
    assert_eq!(
        out.len(),
        m * n,
        "matmul: out has {} elements, expected {m}×{n}",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    // Each task computes a block of output columns for all rows; results go
    // to a task-local buffer and are scattered after, since output columns
    // of one row are not contiguous across tasks.
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let j0 = b * ROWS_PER_TASK;
            let j1 = (j0 + ROWS_PER_TASK).min(n);
            let mut row = vec![0f32; k];
            let mut block = vec![0f32; m * (j1 - j0)];
            for j in j0..j1 {
                let wrow: &[f32] = match w {
                    WeightMatrix::F32(wf) => &wf[j * k..(j + 1) * k],
                    _ => {
                        w.row_to_f32(j, k, &mut row);
                        &row
                    }
                };
                for i in 0..m {
                    block[i * (j1 - j0) + (j - j0)] = dot(&x[i * k..(i + 1) * k], wrow);
                }
            }
            (j0, block)
        })
        .collect();
    for (j0, block) in blocks {
        let width = block.len() / m;
        for i in 0..m {
            out[i * n + j0..i * n + j0 + width].copy_from_slice(&block[i * width..(i + 1) * width]);
        }
    }
}

/// Copies rows `ids` of `table` (`[vocab, k]`) into `out` as f32.
pub fn gather_rows(table: WeightMatrix<'_>, k: usize, ids: &[u32], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        ids.len() * k,
        "gather_rows: out has the wrong size"
    );
    for (dst, &id) in out.chunks_mut(k).zip(ids) {
        table.row_to_f32(id as usize, k, dst);
    }
}

/// Dot product, with AVX2+FMA when the CPU has it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available() {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { simd::dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Eight independent accumulators so the compiler can vectorize and the
/// adds pipeline.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for t in chunks * 8..a.len() {
        sum += a[t] * b[t];
    }
    sum
}

mod widen {
    use half::{bf16, f16};

    pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
        // bf16 is the high half of an f32: a shift is the whole conversion.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }

    pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        // `half` uses F16C when the target enables it, else a table-free
        // bit conversion.
        src.convert_to_f32_slice(dst);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `a` and `b` have equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut t = 0;
        while t + 32 <= n {
            for (l, acc) in acc.iter_mut().enumerate() {
                let off = t + l * 8;
                *acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(off)),
                    _mm256_loadu_ps(pb.add(off)),
                    *acc,
                );
            }
            t += 32;
        }
        while t + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(t)),
                _mm256_loadu_ps(pb.add(t)),
                acc[0],
            );
            t += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let hi = _mm256_extractf128_ps(sum, 1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(sum), hi);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        let mut total = _mm_cvtss_f32(s1);
        while t < n {
            total += a[t] * b[t];
            t += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    proptest! {
        #[test]
        fn matches_naive_for_every_dtype(m in 1usize..9, k in 1usize..300, n in 1usize..70, seed in 0u64..1000) {
            let x = values(m * k, seed);
            let wf = values(n * k, seed + 1);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let cases = [
                (WeightMatrix::F32(&wf), wf.clone()),
                (WeightMatrix::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect()),
                (WeightMatrix::F16(&wh), wh.iter().map(|v| v.to_f32()).collect()),
            ];
            for (w, exact) in cases {
                let want = naive(&x, m, k, &exact, n);
                let mut out = vec![0f32; m * n];
                matmul(&x, m, k, w, n, &mut out);
                for (o, r) in out.iter().zip(&want) {
                    prop_assert!((*o as f64 - r).abs() <= 1e-5 * k as f64, "{o} vs {r}");
                }
            }
        }

        #[test]
        fn simd_and_portable_dot_agree(len in 0usize..200, seed in 0u64..1000) {
            let a = values(len, seed);
            let b = values(len, seed + 7);
            let d = dot(&a, &b) as f64;
            let p = dot_portable(&a, &b) as f64;
            prop_assert!((d - p).abs() <= 1e-5 * (len as f64 + 1.0));
        }
    }

    #[test]
    fn empty_shapes() {
        let mut out = vec![];
        matmul(&[], 0, 4, WeightMatrix::F32(&[0.0; 8]), 2, &mut out);
        let mut out = vec![];
        matmul(&[1.0; 4], 1, 4, WeightMatrix::F32(&[]), 0, &mut out);
    }

    #[test]
    fn gather_converts_rows() {
        let table: Vec<bf16> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let mut out = vec![0f32; 4];
        gather_rows(WeightMatrix::Bf16(&table), 2, &[1, 0], &mut out);
        assert_eq!(out, [3.0, 4.0, 1.0, 2.0]);
    }
}
