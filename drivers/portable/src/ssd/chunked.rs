//! The SSD chunked scan (Mamba2's state space duality). For a chunk of `n`
//! tokens with start state `S₀` (`[head_dim][state]`) and cumulative log
//! decays `L_t = Σ_{s≤t} dt_s A`:
//!
//! ```text
//! y_t = e^{L_t} S₀ C_t + Σ_{s≤t} e^{L_t−L_s} dt_s (C_t·B_s) x_s + D x_t
//! S_n = e^{L_n} S₀ + Σ_s e^{L_n−L_s} dt_s x_s B_sᵀ
//! ```
//!
//! `C Bᵀ` is computed once per group and chunk; the rest are per-head
//! matrix products on the SIMD kernel. Chunks run in order (the state
//! passes from one to the next), heads in parallel within a chunk.

use std::ops::Range;

use rayon::prelude::*;

use super::{Inputs, Shape};
use crate::dense::{cumulative, decay_matrix, mul_t, transpose};

pub fn run(shape: &Shape, inputs: &Inputs, state: &mut [f32], out: &mut [f32], chunk: usize) {
    let (p_dim, inner, len) = (shape.head_dim, shape.inner(), inputs.len(shape));
    for c0 in (0..len).step_by(chunk.max(1)) {
        let tokens = c0..(c0 + chunk.max(1)).min(len);
        let groups: Vec<GroupChunk> = (0..shape.groups)
            .into_par_iter()
            .map(|g| GroupChunk::gather(shape, inputs, g, tokens.clone()))
            .collect();
        let heads: Vec<Vec<f32>> = state
            .par_chunks_mut(p_dim * shape.state)
            .enumerate()
            .map(|(h, s)| head(shape, inputs, &groups[shape.group(h)], h, tokens.clone(), s))
            .collect();
        let rows = out[c0 * inner..tokens.end * inner].chunks_exact_mut(inner);
        for (t, row) in rows.enumerate() {
            for (h, o) in heads.iter().enumerate() {
                row[h * p_dim..(h + 1) * p_dim].copy_from_slice(&o[t * p_dim..(t + 1) * p_dim]);
            }
        }
    }
}

/// What the heads of one group share within a chunk.
struct GroupChunk {
    /// `[n][state]`.
    c: Vec<f32>,
    /// B transposed: `[state][n]`.
    b_t: Vec<f32>,
    /// `C Bᵀ`: `[n][n]`.
    cb: Vec<f32>,
}

impl GroupChunk {
    fn gather(shape: &Shape, inputs: &Inputs, g: usize, tokens: Range<usize>) -> GroupChunk {
        let (n_dim, n) = (shape.state, tokens.len());
        let (_, b_at, c_at) = shape.offsets(g * (shape.heads / shape.groups));
        let mut b = Vec::with_capacity(n * n_dim);
        let mut c = Vec::with_capacity(n * n_dim);
        for t in tokens {
            let row = &inputs.xbc[t * shape.width()..(t + 1) * shape.width()];
            b.extend_from_slice(&row[b_at..b_at + n_dim]);
            c.extend_from_slice(&row[c_at..c_at + n_dim]);
        }
        GroupChunk {
            cb: mul_t(&c, n, n_dim, &b, n),
            b_t: transpose(&b, n, n_dim),
            c,
        }
    }
}

/// Head `h` over one chunk: returns its outputs `[n][head_dim]` and moves
/// its state `s` (`[head_dim][state]`) to the chunk's end.
fn head(
    shape: &Shape,
    inputs: &Inputs,
    grp: &GroupChunk,
    h: usize,
    tokens: Range<usize>,
    s: &mut [f32],
) -> Vec<f32> {
    let (p_dim, n_dim, n) = (shape.head_dim, shape.state, tokens.len());
    let (x_at, _, _) = shape.offsets(h);
    let mut x = Vec::with_capacity(n * p_dim);
    let mut dt = Vec::with_capacity(n);
    for t in tokens {
        x.extend_from_slice(&inputs.xbc[t * shape.width() + x_at..][..p_dim]);
        dt.push(inputs.dt[t * shape.heads + h]);
    }
    let log_decays: Vec<f32> = dt.iter().map(|d| d * inputs.a[h]).collect();
    let cum = cumulative(log_decays.iter().copied());
    let x_t = transpose(&x, n, p_dim);

    // Within the chunk: (C Bᵀ ∘ decay ∘ dt_s) x.
    let mut m = decay_matrix(&log_decays);
    for (row, cb) in m.chunks_exact_mut(n).zip(grp.cb.chunks_exact(n)) {
        for ((v, c), d) in row.iter_mut().zip(cb).zip(&dt) {
            *v *= c * d;
        }
    }
    let intra = mul_t(&m, n, n, &x_t, p_dim);
    // From the start state: e^{L_t} S₀ C_t.
    let inter = mul_t(&grp.c, n, n_dim, s, p_dim);
    let mut out = Vec::with_capacity(n * p_dim);
    for t in 0..n {
        let gamma = cum[t].exp();
        let rows = intra[t * p_dim..].iter().zip(&inter[t * p_dim..]);
        let xs = &x[t * p_dim..(t + 1) * p_dim];
        out.extend(
            rows.zip(xs)
                .map(|((a, b), xv)| a + gamma * b + inputs.skip[h] * xv),
        );
    }

    // The state at the chunk's end.
    let last = cum[n - 1];
    let mut xw_t = x_t;
    for row in xw_t.chunks_exact_mut(n) {
        for ((v, c), d) in row.iter_mut().zip(&cum).zip(&dt) {
            *v *= (last - c).exp() * d;
        }
    }
    let update = mul_t(&xw_t, p_dim, n, &grp.b_t, n_dim);
    let gamma = last.exp();
    s.iter_mut()
        .zip(&update)
        .for_each(|(v, u)| *v = *v * gamma + u);
    out
}
