//! Small dense-matrix helpers shared by the chunked scans (Gated DeltaNet,
//! Mamba2): a product on the SIMD matmul kernel, a transpose, and the
//! lower-triangular decay factors a chunk needs.

use pie_kernels::{matmul, WeightMatrix};

/// `x · wᵀ` with `x` `[m, k]` and `w` `[n, k]`, row-major: the kernel's dot
/// form, so callers pass the right operand with its rows along `k`.
pub fn mul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    matmul(x, m, k, WeightMatrix::F32(w), n, &mut out);
    out
}

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    debug_assert_eq!(src.len(), rows * cols);
    let mut out = vec![0f32; src.len()];
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

/// Running sums of the per-token log decays of one chunk: `cum[t]` is the
/// log of the decay from the chunk's start through token `t`.
pub fn cumulative(log_decays: impl IntoIterator<Item = f32>) -> Vec<f32> {
    let mut acc = 0f32;
    log_decays
        .into_iter()
        .map(|g| {
            acc += g;
            acc
        })
        .collect()
}

/// Scales `m` (`[n, n]`) in place by the decay from token `s` to token `t`,
/// `exp(cum[t] - cum[s])`, on and below the diagonal (strictly below when
/// `strict`), and zeroes the rest. Only `s ≤ t` is ever exponentiated:
/// above the diagonal the difference is positive and could overflow.
pub fn causal_decay(m: &mut [f32], cum: &[f32], strict: bool) {
    let n = cum.len();
    for (t, row) in m.chunks_exact_mut(n).enumerate() {
        let end = if strict { t } else { t + 1 };
        for (s, v) in row.iter_mut().enumerate() {
            *v = if s < end {
                *v * (cum[t] - cum[s]).exp()
            } else {
                0.0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_t_is_x_times_w_transposed() {
        // [[1, 2], [3, 4]] · [[5, 6], [7, 8]]ᵀ
        let out = mul_t(&[1., 2., 3., 4.], 2, 2, &[5., 6., 7., 8.], 2);
        assert_eq!(out, vec![17., 23., 39., 53.]);
        assert_eq!(
            transpose(&[1., 2., 3., 4., 5., 6.], 2, 3),
            vec![1., 4., 2., 5., 3., 6.]
        );
    }

    #[test]
    fn causal_decay_keeps_the_lower_triangle() {
        let cum = cumulative([-1.0, -2.0]);
        assert_eq!(cum, vec![-1.0, -3.0]);
        let mut m = vec![1.0; 4];
        causal_decay(&mut m, &cum, false);
        assert_eq!(m[1], 0.0);
        assert!((m[2] - (-2f32).exp()).abs() < 1e-7);
        assert_eq!([m[0], m[3]], [1.0, 1.0]);
        causal_decay(&mut m, &cum, true);
        assert_eq!(m, vec![0.0, 0.0, (-2f32).exp() * (-2f32).exp(), 0.0]);
    }
}
