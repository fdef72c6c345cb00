//! Short-row primitives for attention: dot products and `y += a·x` over a
//! head's 64–256 values, where a matmul's tiling and dispatch would cost
//! more than the arithmetic. The `_rows` forms take every query head of a
//! GQA group at once, so one call (and one load of the key or value) serves
//! them all. The `_f16` forms read the key or value from an f16 KV cache
//! directly (F16C converts eight lanes per instruction), so attention never
//! copies a decoded row.

use half::f16;

/// `Σ a[i]·b[i]`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::fused::avx2::available() {
            // SAFETY: AVX2 and FMA were detected; lengths are equal.
            return unsafe { avx2::dot(a, b) };
        }
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y[i] += alpha · x[i]`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::fused::avx2::available() {
            // SAFETY: AVX2 and FMA were detected; lengths are equal.
            return unsafe { avx2::axpy(alpha, x, y) };
        }
    }
    y.iter_mut().zip(x).for_each(|(o, v)| *o += alpha * v);
}

/// Asks the CPU to bring `x` into cache ahead of use (a hint; no-op off
/// x86-64).
#[inline]
pub fn prefetch<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(x);
        let base = x.as_ptr() as *const i8;
        for line in (0..bytes).step_by(64) {
            // SAFETY: `line` is inside `x`; a prefetch never faults.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch(base.add(line), _MM_HINT_T0);
            }
        }
    }
}

/// `out[h] = rows[h] · x` for the `out.len()` rows of `rows` (each `x.len()` long).
pub fn dot_rows(rows: &[f32], x: &[f32], out: &mut [f32]) {
    assert_eq!(rows.len(), x.len() * out.len(), "dot_rows: shapes differ");
    if x.is_empty() {
        return out.fill(0.0);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::fused::avx2::available() {
            // SAFETY: AVX2 and FMA were detected; shapes were checked.
            return unsafe { avx2::dot_rows(rows, x, out) };
        }
    }
    for (o, r) in out.iter_mut().zip(rows.chunks_exact(x.len())) {
        *o = dot(r, x);
    }
}

/// `ys[h] += alphas[h] · x` for the `alphas.len()` rows of `ys`.
pub fn axpy_rows(alphas: &[f32], x: &[f32], ys: &mut [f32]) {
    assert_eq!(ys.len(), x.len() * alphas.len(), "axpy_rows: shapes differ");
    if x.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::fused::avx2::available() {
            // SAFETY: AVX2 and FMA were detected; shapes were checked.
            return unsafe { avx2::axpy_rows(alphas, x, ys) };
        }
    }
    for (&a, y) in alphas.iter().zip(ys.chunks_exact_mut(x.len())) {
        axpy(a, x, y);
    }
}

/// [`dot_rows`] with `x` stored as f16.
pub fn dot_rows_f16(rows: &[f32], x: &[f16], out: &mut [f32]) {
    assert_eq!(
        rows.len(),
        x.len() * out.len(),
        "dot_rows_f16: shapes differ"
    );
    if x.is_empty() {
        return out.fill(0.0);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::fused::avx2::available() {
            // SAFETY: AVX2, FMA and F16C were detected; shapes were checked.
            return unsafe { avx2::dot_rows_f16(rows, x, out) };
        }
    }
    for (o, r) in out.iter_mut().zip(rows.chunks_exact(x.len())) {
        *o = r.iter().zip(x).map(|(a, b)| a * b.to_f32()).sum();
    }
}

/// [`axpy_rows`] with `x` stored as f16.
pub fn axpy_rows_f16(alphas: &[f32], x: &[f16], ys: &mut [f32]) {
    assert_eq!(
        ys.len(),
        x.len() * alphas.len(),
        "axpy_rows_f16: shapes differ"
    );
    if x.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::quant::fused::avx2::available() {
            // SAFETY: AVX2, FMA and F16C were detected; shapes were checked.
            return unsafe { avx2::axpy_rows_f16(alphas, x, ys) };
        }
    }
    for (&a, y) in alphas.iter().zip(ys.chunks_exact_mut(x.len())) {
        y.iter_mut().zip(x).for_each(|(o, v)| *o += a * v.to_f32());
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::quant::fused::avx2::hsum;

    /// # Safety
    /// AVX2+FMA; `rows.len() == x.len() · out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(rows: &[f32], x: &[f32], out: &mut [f32]) {
        for (o, r) in out.iter_mut().zip(rows.chunks_exact(x.len())) {
            *o = dot(r, x);
        }
    }

    /// # Safety
    /// AVX2+FMA; `ys.len() == x.len() · alphas.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_rows(alphas: &[f32], x: &[f32], ys: &mut [f32]) {
        for (&a, y) in alphas.iter().zip(ys.chunks_exact_mut(x.len())) {
            axpy(a, x, y);
        }
    }

    /// Eight f16 at `p` as f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16x8(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// # Safety
    /// AVX2+FMA+F16C; `rows.len() == x.len() · out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_f16(rows: &[f32], x: &[half::f16], out: &mut [f32]) {
        let d = x.len();
        let n = d / 8 * 8;
        for (o, r) in out.iter_mut().zip(rows.chunks_exact(d)) {
            let mut acc = _mm256_setzero_ps();
            for i in (0..n).step_by(8) {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(r.as_ptr().add(i)),
                    load_f16x8(x.as_ptr().add(i)),
                    acc,
                );
            }
            let tail: f32 = r[n..]
                .iter()
                .zip(&x[n..])
                .map(|(a, b)| a * b.to_f32())
                .sum();
            *o = hsum(acc) + tail;
        }
    }

    /// # Safety
    /// AVX2+FMA+F16C; `ys.len() == x.len() · alphas.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_rows_f16(alphas: &[f32], x: &[half::f16], ys: &mut [f32]) {
        let d = x.len();
        let n = d / 8 * 8;
        // Convert each 8-lane piece of x once for every row of the group.
        for i in (0..n).step_by(8) {
            let xv = load_f16x8(x.as_ptr().add(i));
            for (h, &a) in alphas.iter().enumerate() {
                let yp = ys.as_mut_ptr().add(h * d + i);
                _mm256_storeu_ps(
                    yp,
                    _mm256_fmadd_ps(_mm256_set1_ps(a), xv, _mm256_loadu_ps(yp)),
                );
            }
        }
        for (&a, y) in alphas.iter().zip(ys.chunks_exact_mut(d)) {
            y[n..]
                .iter_mut()
                .zip(&x[n..])
                .for_each(|(o, v)| *o += a * v.to_f32());
        }
    }

    /// # Safety
    /// AVX2+FMA; `a.len() == b.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len() / 16 * 16;
        // Two accumulators: one chain would wait on FMA latency.
        let mut acc = [_mm256_setzero_ps(); 2];
        for i in (0..n).step_by(16) {
            for (h, slot) in acc.iter_mut().enumerate() {
                let at = i + 8 * h;
                *slot = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(at)),
                    _mm256_loadu_ps(b.as_ptr().add(at)),
                    *slot,
                );
            }
        }
        let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
        hsum(_mm256_add_ps(acc[0], acc[1])) + tail
    }

    /// # Safety
    /// AVX2+FMA; `x.len() == y.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len() / 8 * 8;
        let a = _mm256_set1_ps(alpha);
        for i in (0..n).step_by(8) {
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                yp,
                _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp)),
            );
        }
        y[n..]
            .iter_mut()
            .zip(&x[n..])
            .for_each(|(o, v)| *o += alpha * v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_axpy_match_scalar_loops() {
        for n in [0, 1, 7, 8, 16, 23, 64, 130] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (dot(&a, &b) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "n={n}"
            );
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() <= 1e-6, "n={n} i={i}");
            }
            // Three rows at once give the single-row answers.
            let rows: Vec<f32> = [a.clone(), b.clone(), a.clone()].concat();
            let mut out = [0f32; 3];
            dot_rows(&rows, &b, &mut out);
            assert_eq!(out, [dot(&a, &b), dot(&b, &b), dot(&a, &b)]);
            let mut ys = rows.clone();
            axpy_rows(&[1.0, -2.0, 0.25], &a, &mut ys);
            let mut want = rows.clone();
            for (alpha, y) in [1.0, -2.0, 0.25]
                .iter()
                .zip(want.chunks_exact_mut(n.max(1)))
            {
                axpy(*alpha, &a, &mut y[..n]);
            }
            assert_eq!(ys, want);
        }
    }

    #[test]
    fn f16_forms_match_the_f32_forms_on_the_same_values() {
        for n in [0, 1, 7, 8, 16, 23, 64, 130] {
            let x16: Vec<f16> = (0..n)
                .map(|i| f16::from_f32((i as f32 * 0.29).sin()))
                .collect();
            let x: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
            let rows: Vec<f32> = (0..3 * n).map(|i| (i as f32 * 0.13).cos()).collect();
            let (mut got, mut want) = ([0f32; 3], [0f32; 3]);
            dot_rows_f16(&rows, &x16, &mut got);
            dot_rows(&rows, &x, &mut want);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "n={n}: {g} vs {w}");
            }
            let alphas = [0.5, -1.25, 2.0];
            let (mut ys16, mut ys) = (rows.clone(), rows.clone());
            axpy_rows_f16(&alphas, &x16, &mut ys16);
            axpy_rows(&alphas, &x, &mut ys);
            for (g, w) in ys16.iter().zip(&ys) {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "n={n}: {g} vs {w}");
            }
        }
    }
}
