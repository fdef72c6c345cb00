//! The delta rule a chunk of tokens at a time, in the WY (UT-transform)
//! representation that flash-linear-attention's chunked gated delta rule
//! uses. For a chunk of `n` tokens with start state `S₀`, cumulative log
//! decays `G` (`γ_t = e^{G_t}`) and corrections `u_t = β_t (v_t − (α_t S_{t−1})ᵀ k_t)`:
//!
//! ```text
//! (I + A) U = diag(β) V − diag(βγ) K S₀,   A[t,s] = β_t (k_t·k_s) e^{G_t−G_s}  (s < t)
//! U   = T (βV) − T (βγK) S₀,               T = (I + A)⁻¹
//! o_t = γ_t S₀ᵀ q_t + Σ_{s≤t} e^{G_t−G_s} (q_t·k_s) u_s
//! S_n = γ_n S₀ + Σ_s e^{G_n−G_s} k_s u_sᵀ
//! ```
//!
//! `T` is unit lower triangular and comes from forward substitution
//! (`n³/6` multiply-adds); everything else is a matrix product on the SIMD
//! kernel. Heads run in parallel; each keeps its state transposed
//! (`[dv][dk]`, the kernel's right-operand layout) for the whole sequence.

use std::ops::Range;

use rayon::prelude::*;

use super::{Inputs, Shape};
use crate::dense::{cumulative, decay_matrix, mul_t_into, transpose, transpose_into};

pub fn run(shape: &Shape, inputs: &Inputs, state: &mut [f32], out: &mut [f32], chunk: usize) {
    let (dv, value_dim) = (shape.dv, shape.value_dim());
    let heads: Vec<Vec<f32>> = state
        .par_chunks_mut(shape.dk * dv)
        .enumerate()
        .map(|(h, s)| head(shape, inputs, h, s, chunk.max(1)))
        .collect();
    for (h, o) in heads.iter().enumerate() {
        for (row, src) in out.chunks_exact_mut(value_dim).zip(o.chunks_exact(dv)) {
            row[h * dv..(h + 1) * dv].copy_from_slice(src);
        }
    }
}

/// Value head `h` over the whole sequence chunk: returns its outputs
/// `[len][dv]` and leaves its final state in `state` (`[dk][dv]`).
fn head(shape: &Shape, inputs: &Inputs, h: usize, state: &mut [f32], chunk: usize) -> Vec<f32> {
    let (dk, dv, len) = (shape.dk, shape.dv, inputs.len(shape));
    let mut st = transpose(state, dk, dv);
    let mut out = vec![0f32; len * dv];
    let mut c = Chunk::default();
    for c0 in (0..len).step_by(chunk) {
        let n = chunk.min(len - c0);
        c.gather(shape, inputs, h, c0..c0 + n);
        c.advance(&mut st, &mut out[c0 * dv..(c0 + n) * dv]);
    }
    transpose_into(&st, dv, dk, &mut c.buf.update);
    state.copy_from_slice(&c.buf.update);
    out
}

/// One head's tokens of one chunk, gathered contiguous; reused from chunk
/// to chunk with its buffers.
#[derive(Default)]
struct Chunk {
    n: usize,
    dk: usize,
    dv: usize,
    /// `[K ; Q]`: `[2n][dk]`.
    kq: Vec<f32>,
    /// `[n][dv]`.
    v: Vec<f32>,
    beta: Vec<f32>,
    /// Cumulative log decay through each token.
    cum: Vec<f32>,
    /// `e^{G_t−G_s}` for `s ≤ t`, zero above: `[n][n]`.
    decay: Vec<f32>,
    buf: Buffers,
}

/// The intermediate products of a chunk.
#[derive(Default)]
struct Buffers {
    scores: Vec<f32>,
    k_t: Vec<f32>,
    t: Vec<f32>,
    rhs: Vec<f32>,
    tw: Vec<f32>,
    left: Vec<f32>,
    by_state: Vec<f32>,
    u: Vec<f32>,
    u_t: Vec<f32>,
    intra: Vec<f32>,
    update: Vec<f32>,
}

impl Chunk {
    fn gather(&mut self, shape: &Shape, inputs: &Inputs, h: usize, tokens: Range<usize>) {
        let (dk, dv, width) = (shape.dk, shape.dv, shape.width());
        let kh = shape.key_head(h);
        let (q_at, k_at, v_at) = (
            kh * dk,
            shape.key_dim() + kh * dk,
            2 * shape.key_dim() + h * dv,
        );
        let n = tokens.len();
        (self.n, self.dk, self.dv) = (n, dk, dv);
        self.kq.resize(2 * n * dk, 0.0);
        self.v.clear();
        self.beta.clear();
        let mut g = Vec::with_capacity(n);
        for (i, t) in tokens.enumerate() {
            let row = &inputs.qkv[t * width..(t + 1) * width];
            self.kq[i * dk..(i + 1) * dk].copy_from_slice(&row[k_at..k_at + dk]);
            self.kq[(n + i) * dk..(n + i + 1) * dk].copy_from_slice(&row[q_at..q_at + dk]);
            self.v.extend_from_slice(&row[v_at..v_at + dv]);
            let (beta, log_decay) = inputs.gates[t * shape.value_heads + h];
            self.beta.push(beta);
            g.push(log_decay);
        }
        self.cum = cumulative(g.iter().copied());
        self.decay = decay_matrix(&g);
    }

    /// Writes the chunk's outputs (`[n][dv]`) and moves the transposed
    /// state `st` (`[dv][dk]`) to the chunk's end.
    fn advance(&mut self, st: &mut [f32], out: &mut [f32]) {
        let (n, dk, dv) = (self.n, self.dk, self.dv);
        let k = &self.kq[..n * dk];
        let b = &mut self.buf;
        // [K ; Q] Kᵀ in one product, decayed: A's and the outputs' scores.
        mul_t_into(&self.kq, 2 * n, dk, k, n, &mut b.scores);
        for half in b.scores.chunks_exact_mut(n * n) {
            half.iter_mut().zip(&self.decay).for_each(|(x, d)| *x *= d);
        }
        transpose_into(k, n, dk, &mut b.k_t);
        self.transform();
        self.weighted_rhs();
        let b = &mut self.buf;
        // [T(βV) | T(βγK)]: `n × (dv + dk)`.
        mul_t_into(&b.t, n, n, &b.rhs, dv + dk, &mut b.tw);
        // [T(βγK) ; γQ] · S₀ in one product: `2n × dv`.
        b.left.clear();
        for row in b.tw.chunks_exact(dv + dk) {
            b.left.extend_from_slice(&row[dv..]);
        }
        let q = &self.kq[n * dk..];
        for (row, c) in q.chunks_exact(dk).zip(&self.cum) {
            let gamma = c.exp();
            b.left.extend(row.iter().map(|x| x * gamma));
        }
        mul_t_into(&b.left, 2 * n, dk, st, dv, &mut b.by_state);
        let (w_s, q_s) = b.by_state.split_at(n * dv);
        // U = T(βV) − T(βγK) S₀, transposed for the products that follow.
        b.u.clear();
        for (row, ws) in b.tw.chunks_exact(dv + dk).zip(w_s.chunks_exact(dv)) {
            b.u.extend(row[..dv].iter().zip(ws).map(|(a, b)| a - b));
        }
        transpose_into(&b.u, n, dv, &mut b.u_t);
        // Outputs: the start state's part plus the chunk's own tokens.
        mul_t_into(&b.scores[n * n..], n, n, &b.u_t, dv, &mut b.intra);
        for ((o, a), c) in out.iter_mut().zip(q_s).zip(&b.intra) {
            *o = a + c;
        }
        self.move_state(st);
    }

    /// `T = (I + A)⁻¹` by forward substitution, `[n][n]` unit lower
    /// triangular: row `t` is `e_t − Σ_{s<t} A[t,s] T[s]`. The scores'
    /// first half holds `(k_t·k_s) e^{G_t−G_s}`; only its strict lower
    /// triangle is read.
    fn transform(&mut self) {
        let n = self.n;
        let (a, t) = (&self.buf.scores[..n * n], &mut self.buf.t);
        t.clear();
        t.resize(n * n, 0.0);
        for i in 0..n {
            let (done, rest) = t.split_at_mut(i * n);
            let row = &mut rest[..n];
            row[i] = 1.0;
            for s in 0..i {
                let coef = self.beta[i] * a[i * n + s];
                if coef != 0.0 {
                    // Row s of T is zero right of column s.
                    let ts = &done[s * n..s * n + s + 1];
                    row[..=s]
                        .iter_mut()
                        .zip(ts)
                        .for_each(|(r, x)| *r -= coef * x);
                }
            }
        }
    }

    /// The right operands of `T(βV)` and `T(βγK)`, stacked and transposed:
    /// `[(dv + dk)][n]`.
    fn weighted_rhs(&mut self) {
        let (n, b) = (self.n, &mut self.buf);
        transpose_into(&self.v, n, self.dv, &mut b.rhs);
        for row in b.rhs.chunks_exact_mut(n) {
            row.iter_mut().zip(&self.beta).for_each(|(x, b)| *x *= b);
        }
        let bg: Vec<f32> = self
            .beta
            .iter()
            .zip(&self.cum)
            .map(|(b, c)| b * c.exp())
            .collect();
        for row in b.k_t.chunks_exact(n) {
            b.rhs.extend(row.iter().zip(&bg).map(|(x, w)| x * w));
        }
    }

    /// `Sᵀ ← γ_n Sᵀ + Uᵀ K'` with `K'_s = e^{G_n−G_s} k_s`.
    fn move_state(&mut self, st: &mut [f32]) {
        let (n, dk, dv, b) = (self.n, self.dk, self.dv, &mut self.buf);
        let last = self.cum[n - 1];
        let w: Vec<f32> = self.cum.iter().map(|c| (last - c).exp()).collect();
        for row in b.k_t.chunks_exact_mut(n) {
            row.iter_mut().zip(&w).for_each(|(x, w)| *x *= w);
        }
        mul_t_into(&b.u_t, dv, n, &b.k_t, dk, &mut b.update);
        let gamma = last.exp();
        st.iter_mut()
            .zip(&b.update)
            .for_each(|(s, u)| *s = *s * gamma + u);
    }
}
