//! Short-row primitives for attention: dot products and `y += a·x` over a
//! head's 64–256 values, where a matmul's tiling and dispatch would cost
//! more than the arithmetic. The `_rows` forms take every query head of a
//! GQA group at once, so one call (and one load of the key or value) serves
//! them all.

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
pub fn prefetch(x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..x.len()).step_by(16) {
        // SAFETY: `line` is inside `x`; a prefetch never faults.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch(x.as_ptr().add(line) as *const i8, _MM_HINT_T0);
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
}
