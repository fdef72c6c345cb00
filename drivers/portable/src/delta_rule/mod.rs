//! The gated delta rule of Gated DeltaNet over one sequence chunk, in two
//! forms with the same inputs, state and outputs:
//!
//! - [`recurrent`]: token by token, the state read and written per token —
//!   decode and short chunks;
//! - [`chunked`]: a chunk of tokens at a time in matrix products, the state
//!   touched once per chunk — prefill.
//!
//! Per value head the state `S` (`dk × dv`) decays by `exp(g)`, then takes
//! the correction `k (β (v − Sᵀk))ᵀ`; the token's output is `Sᵀq`.

pub mod chunked;
pub mod recurrent;
#[cfg(test)]
mod tests;

use crate::recurrent::ChunkedScan;

/// Head counts and sizes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub key_heads: usize,
    pub value_heads: usize,
    pub dk: usize,
    pub dv: usize,
}

impl Shape {
    pub fn key_dim(&self) -> usize {
        self.key_heads * self.dk
    }
    pub fn value_dim(&self) -> usize {
        self.value_heads * self.dv
    }
    /// Width of one token's `qkv` row.
    pub fn width(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
    /// Floats of state per sequence: `[value_heads][dk][dv]`.
    pub fn state_len(&self) -> usize {
        self.value_heads * self.dk * self.dv
    }
    /// The key head value head `h` reads q and k from.
    fn key_head(&self, h: usize) -> usize {
        h / (self.value_heads / self.key_heads)
    }
}

/// One sequence chunk's inputs, `len` tokens.
pub struct Inputs<'a> {
    /// Per token `[q | k | v]`: q and k per key head, L2-normalized (q also
    /// scaled by `1/√dk`), v per value head; `[len][shape.width()]`.
    pub qkv: &'a [f32],
    /// Per token and value head `(β, g)`: the update's weight and the log
    /// of the state's decay; `[len][value_heads]`.
    pub gates: &'a [(f32, f32)],
}

impl Inputs<'_> {
    pub fn len(&self, shape: &Shape) -> usize {
        self.qkv.len() / shape.width()
    }
}

/// Runs the chunk in the form `scan` picks for its length. `state` is
/// `[value_heads][dk][dv]` and continues; `out` is `[len][value_dim]`.
pub fn run(shape: &Shape, inputs: &Inputs, state: &mut [f32], out: &mut [f32], scan: ChunkedScan) {
    if scan.applies(inputs.len(shape)) {
        chunked::run(shape, inputs, state, out, scan.chunk);
    } else {
        recurrent::run(shape, inputs, state, out);
    }
}
