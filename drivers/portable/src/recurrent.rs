//! Pieces shared by the recurrent ops (Gated DeltaNet, Mamba2): typed
//! attribute access, the short causal convolution with its carried state,
//! and the scalar functions they use.

use pie_driver::ir::CompositeAttrs;
use pie_driver::{DriverError, Result};

use crate::tensor::{Act, Weight};

/// Reads a composite op's attributes with errors naming the op.
pub struct Attrs<'a> {
    pub op: &'static str,
    pub a: &'a CompositeAttrs,
}

impl Attrs<'_> {
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.a
            .usize(key)
            .map_err(|m| self.invalid(m))?
            .ok_or_else(|| self.invalid(format!("attribute `{key}` is missing")))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.a.usize(key).map_err(|m| self.invalid(m))
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?
            .ok_or_else(|| self.invalid(format!("attribute `{key}` is missing")))
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        Ok(self
            .a
            .float(key)
            .map_err(|m| self.invalid(m))?
            .map(|v| v as f32))
    }

    pub fn invalid(&self, m: impl std::fmt::Display) -> DriverError {
        DriverError::Invalid(format!("{}: {m}", self.op))
    }

    /// Weight `index` of the op's schema-ordered weight list.
    pub fn weight<'w>(
        &self,
        weights: &[Option<&'w Weight>],
        index: usize,
        key: &str,
    ) -> Result<&'w Weight> {
        weights
            .get(index)
            .copied()
            .flatten()
            .ok_or_else(|| self.invalid(format!("weight `{key}` is missing")))
    }
}

/// Which form a recurrent op (Gated DeltaNet, Mamba2) runs a sequence
/// chunk of a batch in: chunks of at least `min_tokens` tokens (prefill)
/// take the chunked form, `chunk` tokens per block of matrix products;
/// shorter ones (decode) step token by token. Both forms continue the same
/// state, so the choice is free per sequence and per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkedScan {
    pub min_tokens: usize,
    pub chunk: usize,
}

impl ChunkedScan {
    /// Gated DeltaNet: the chunked form wins from about 32 tokens at
    /// Qwen3.5-9B's sizes on 2 cores (1.1× at 32, 0.75× at 16; see
    /// `benches/recurrent_prefill.rs`).
    pub const DELTA_RULE: ChunkedScan = ChunkedScan {
        min_tokens: 32,
        chunk: 64,
    };
    /// Mamba2: the SSD form already wins at 8 tokens at Nemotron-H-8B's
    /// sizes (2.9× on one core), its token-by-token scan being slow.
    pub const SSD: ChunkedScan = ChunkedScan {
        min_tokens: 8,
        chunk: 64,
    };
    /// Never chunked: the token-by-token reference.
    pub const RECURRENT: ChunkedScan = ChunkedScan {
        min_tokens: usize::MAX,
        chunk: 64,
    };

    pub fn applies(&self, tokens: usize) -> bool {
        self.chunk > 0 && tokens >= self.min_tokens.max(1)
    }
}

/// A depthwise causal convolution over time whose last `kernel - 1` inputs
/// are carried in the sequence's state between forward calls.
pub struct CausalConv<'a> {
    /// `[channels, kernel]` (the checkpoint's `[channels, 1, kernel]`).
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub channels: usize,
    pub kernel: usize,
}

impl CausalConv<'_> {
    pub fn check(&self, op: &str) -> Result<()> {
        if self.weight.len() != self.channels * self.kernel
            || self.bias.is_some_and(|b| b.len() != self.channels)
        {
            return Err(DriverError::Invalid(format!(
                "{op}: conv weight has {} values, expected {} channels × kernel {}",
                self.weight.len(),
                self.channels,
                self.kernel
            )));
        }
        Ok(())
    }

    /// Convolves one token's `input` (then SiLU) into `out`, and shifts it
    /// into `state` (`[kernel - 1][channels]`, oldest first).
    pub fn step(&self, state: &mut [f32], input: &[f32], out: &mut [f32]) {
        let (c, k) = (self.channels, self.kernel);
        for ch in 0..c {
            let w = &self.weight[ch * k..(ch + 1) * k];
            let mut acc = self.bias.map_or(0.0, |b| b[ch]);
            for (j, wj) in w[..k - 1].iter().enumerate() {
                acc += wj * state[j * c + ch];
            }
            acc += w[k - 1] * input[ch];
            out[ch] = silu(acc);
        }
        if k > 1 {
            state.copy_within(c.., 0);
            state[(k - 2) * c..].copy_from_slice(input);
        }
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(1 + eˣ)`, linear above 20 as torch's softplus.
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `x · W` for a whole activation: `[rows, features]`.
pub fn project(x: &Act, w: &Weight, features: usize) -> Act {
    let mut out = Act::zeros(x.rows, features);
    w.matmul(&x.data, x.rows, x.width, features, &mut out.data);
    out
}

/// RMS-normalizes `x` in place (no weight).
pub fn rms_normalize(x: &mut [f32], eps: f32) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_step_matches_a_zero_padded_convolution() {
        // One channel, kernel 3: out[t] = silu(w0 x[t-2] + w1 x[t-1] + w2 x[t]).
        let conv = CausalConv {
            weight: &[0.5, -1.0, 2.0],
            bias: None,
            channels: 1,
            kernel: 3,
        };
        let xs = [1.0, 2.0, 3.0, 4.0];
        let mut state = vec![0.0; 2];
        for (t, &x) in xs.iter().enumerate() {
            let mut out = [0.0];
            conv.step(&mut state, &[x], &mut out);
            let at = |i: isize| if i < 0 { 0.0 } else { xs[i as usize] };
            let t = t as isize;
            let want = silu(0.5 * at(t - 2) - at(t - 1) + 2.0 * at(t));
            assert!((out[0] - want).abs() < 1e-6, "t={t}");
        }
    }
}
