//! Small dense-matrix helpers shared by the chunked scans (Gated DeltaNet,
//! Mamba2): a product on the SIMD matmul kernel, a transpose, and the
//! lower-triangular decay factors a chunk needs.

use pie_kernels::{matmul, WeightMatrix};

/// `x · wᵀ` with `x` `[m, k]` and `w` `[n, k]`, row-major: the kernel's dot
/// form, so callers pass the right operand with its rows along `k`.
pub fn mul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = Vec::new();
    mul_t_into(x, m, k, w, n, &mut out);
    out
}

/// [`mul_t`] into a buffer that is reused from call to call: allocating the
/// chunk-sized temporaries afresh each time costs page faults.
pub fn mul_t_into(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut Vec<f32>) {
    // The kernel overwrites every element; resizing only fills new ones.
    out.resize(m * n, 0.0);
    matmul(x, m, k, WeightMatrix::F32(w), n, out);
}

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::new();
    transpose_into(src, rows, cols, &mut out);
    out
}

/// [`transpose`] into a reused buffer.
pub fn transpose_into(src: &[f32], rows: usize, cols: usize, out: &mut Vec<f32>) {
    debug_assert_eq!(src.len(), rows * cols);
    out.resize(src.len(), 0.0);
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
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

/// The decays between the tokens of a chunk, `[n, n]`: `e^{G_t − G_s}` for
/// `s ≤ t` (the product of the per-token decays after `s` through `t`),
/// zero above the diagonal. Built row by row from the previous row times
/// one `exp`, so a chunk costs `n` exponentials instead of `n²`; products
/// that fall below `f32::MIN_POSITIVE` become zero (a decay that small
/// erases the term either way, and denormals are slow).
pub fn decay_matrix(log_decays: &[f32]) -> Vec<f32> {
    let n = log_decays.len();
    let mut m = vec![0f32; n * n];
    for (t, &g) in log_decays.iter().enumerate() {
        let step = g.exp();
        let (prev, row) = m.split_at_mut(t * n);
        if t > 0 {
            let prev = &prev[(t - 1) * n..(t - 1) * n + t];
            for (v, p) in row[..t].iter_mut().zip(prev) {
                let x = p * step;
                *v = if x < f32::MIN_POSITIVE { 0.0 } else { x };
            }
        }
        row[t] = 1.0;
    }
    m
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
    fn decay_matrix_is_the_lower_triangle_of_cumulative_differences() {
        let g = [-1.0, -2.0, -0.5];
        let cum = cumulative(g);
        assert_eq!(cum, vec![-1.0, -3.0, -3.5]);
        let m = decay_matrix(&g);
        for t in 0..3 {
            for s in 0..3 {
                let want = if s <= t { (cum[t] - cum[s]).exp() } else { 0.0 };
                assert!((m[t * 3 + s] - want).abs() < 1e-6, "{t},{s}");
            }
        }
        assert_eq!(decay_matrix(&[-60.0; 3])[6], 0.0, "underflow is zero");
    }
}
