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

use rayon::prelude::*;

use super::{Inputs, Shape};
use crate::dense::{causal_decay, cumulative, mul_t, transpose};

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
    for c0 in (0..len).step_by(chunk) {
        let n = chunk.min(len - c0);
        let c = Chunk::gather(shape, inputs, h, c0..c0 + n);
        c.advance(&mut st, &mut out[c0 * dv..(c0 + n) * dv]);
    }
    state.copy_from_slice(&transpose(&st, dv, dk));
    out
}

/// One head's tokens of one chunk, gathered contiguous.
struct Chunk {
    n: usize,
    dk: usize,
    dv: usize,
    /// `[n][dk]`, `[n][dk]`, `[n][dv]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    /// Cumulative log decay through each token.
    cum: Vec<f32>,
    /// `e^{G_t−G_s}` for `s ≤ t`, zero above: `[n][n]`.
    decay: Vec<f32>,
}

impl Chunk {
    fn gather(shape: &Shape, inputs: &Inputs, h: usize, tokens: std::ops::Range<usize>) -> Chunk {
        let (dk, dv, width) = (shape.dk, shape.dv, shape.width());
        let kh = shape.key_head(h);
        let (q_at, k_at, v_at) = (
            kh * dk,
            shape.key_dim() + kh * dk,
            2 * shape.key_dim() + h * dv,
        );
        let n = tokens.len();
        let mut c = Chunk {
            n,
            dk,
            dv,
            q: Vec::with_capacity(n * dk),
            k: Vec::with_capacity(n * dk),
            v: Vec::with_capacity(n * dv),
            beta: Vec::with_capacity(n),
            cum: Vec::new(),
            decay: Vec::new(),
        };
        for t in tokens.clone() {
            let row = &inputs.qkv[t * width..(t + 1) * width];
            c.q.extend_from_slice(&row[q_at..q_at + dk]);
            c.k.extend_from_slice(&row[k_at..k_at + dk]);
            c.v.extend_from_slice(&row[v_at..v_at + dv]);
            c.beta.push(inputs.gates[t * shape.value_heads + h].0);
        }
        c.cum = cumulative(tokens.map(|t| inputs.gates[t * shape.value_heads + h].1));
        c.decay = vec![1f32; n * n];
        causal_decay(&mut c.decay, &c.cum, false);
        c
    }

    /// Writes the chunk's outputs (`[n][dv]`) and moves the transposed
    /// state `st` (`[dv][dk]`) to the chunk's end.
    fn advance(&self, st: &mut [f32], out: &mut [f32]) {
        let (n, dk, dv) = (self.n, self.dk, self.dv);
        // [K ; Q] Kᵀ in one product, masked and decayed: A's and the
        // outputs' scores.
        let kq = [self.k.as_slice(), &self.q].concat();
        let mut scores = mul_t(&kq, 2 * n, dk, &self.k, n);
        for half in scores.chunks_exact_mut(n * n) {
            half.iter_mut().zip(&self.decay).for_each(|(x, d)| *x *= d);
        }
        let (kk, qk) = scores.split_at(n * n);
        let k_t = transpose(&self.k, n, dk);
        // [T(βV) | T(βγK)]: `n × (dv + dk)`.
        let tw = mul_t(&self.transform(kk), n, n, &self.weighted_rhs(&k_t), dv + dk);
        // [T(βγK) ; γQ] · S₀ in one product: `2n × dv`.
        let mut left = Vec::with_capacity(2 * n * dk);
        for row in tw.chunks_exact(dv + dk) {
            left.extend_from_slice(&row[dv..]);
        }
        for (row, c) in self.q.chunks_exact(dk).zip(&self.cum) {
            let gamma = c.exp();
            left.extend(row.iter().map(|x| x * gamma));
        }
        let by_state = mul_t(&left, 2 * n, dk, st, dv);
        let (w_s, q_s) = by_state.split_at(n * dv);
        // U = T(βV) − T(βγK) S₀, transposed for the products that follow.
        let mut u = Vec::with_capacity(n * dv);
        for (row, ws) in tw.chunks_exact(dv + dk).zip(w_s.chunks_exact(dv)) {
            u.extend(row[..dv].iter().zip(ws).map(|(a, b)| a - b));
        }
        let u_t = transpose(&u, n, dv);
        // Outputs: the start state's part plus the chunk's own tokens.
        let intra = mul_t(qk, n, n, &u_t, dv);
        for ((o, a), b) in out.iter_mut().zip(q_s).zip(&intra) {
            *o = a + b;
        }
        self.move_state(st, &u_t, k_t);
    }

    /// `T = (I + A)⁻¹` by forward substitution, `[n][n]` unit lower
    /// triangular: row `t` is `e_t − Σ_{s<t} A[t,s] T[s]`. `a` holds
    /// `(k_t·k_s) e^{G_t−G_s}`; only its strict lower triangle is read.
    fn transform(&self, a: &[f32]) -> Vec<f32> {
        let n = self.n;
        let mut t = vec![0f32; n * n];
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
        t
    }

    /// The right operands of `T(βV)` and `T(βγK)`, stacked and transposed:
    /// `[(dv + dk)][n]`, from `k_t` (`Kᵀ`).
    fn weighted_rhs(&self, k_t: &[f32]) -> Vec<f32> {
        let n = self.n;
        let bg: Vec<f32> = self
            .beta
            .iter()
            .zip(&self.cum)
            .map(|(b, c)| b * c.exp())
            .collect();
        let mut rhs = transpose(&self.v, n, self.dv);
        for row in rhs.chunks_exact_mut(n) {
            row.iter_mut().zip(&self.beta).for_each(|(x, b)| *x *= b);
        }
        for row in k_t.chunks_exact(n) {
            rhs.extend(row.iter().zip(&bg).map(|(x, w)| x * w));
        }
        rhs
    }

    /// `Sᵀ ← γ_n Sᵀ + Uᵀ K'` with `K'_s = e^{G_n−G_s} k_s`; `k_t` is `Kᵀ`.
    fn move_state(&self, st: &mut [f32], u_t: &[f32], mut k_t: Vec<f32>) {
        let (n, dk, dv) = (self.n, self.dk, self.dv);
        let last = self.cum[n - 1];
        let w: Vec<f32> = self.cum.iter().map(|c| (last - c).exp()).collect();
        for row in k_t.chunks_exact_mut(n) {
            row.iter_mut().zip(&w).for_each(|(x, w)| *x *= w);
        }
        let update = mul_t(u_t, dv, n, &k_t, dk);
        let gamma = last.exp();
        st.iter_mut()
            .zip(&update)
            .for_each(|(s, u)| *s = *s * gamma + u);
    }
}
