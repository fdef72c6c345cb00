//! Mamba2's selective state-space scan over one sequence chunk, in two
//! forms with the same inputs, state and outputs:
//!
//! - [`recurrent`]: token by token — decode and short chunks;
//! - [`chunked`]: the SSD ("state space duality") form — within a chunk a
//!   masked, decay-weighted attention-like product, between chunks the
//!   state passed once — prefill.
//!
//! Per head the state `S` (`head_dim × state`) decays by `exp(dt·A)` and
//! takes `dt · x ⊗ B` each token; the output is `S·C + D·x`.

pub mod chunked;
pub mod recurrent;
#[cfg(test)]
mod tests;

use crate::recurrent::ChunkedScan;

/// Head counts and sizes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub heads: usize,
    pub head_dim: usize,
    /// State size per head and channel (`N`).
    pub state: usize,
    /// B and C are shared by the heads of a group.
    pub groups: usize,
}

impl Shape {
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Width of one token's `[x | B | C]` row.
    pub fn width(&self) -> usize {
        self.inner() + 2 * self.groups * self.state
    }
    /// Floats of state per sequence: `[heads][head_dim][state]`.
    pub fn state_len(&self) -> usize {
        self.heads * self.head_dim * self.state
    }
    fn group(&self, h: usize) -> usize {
        h / (self.heads / self.groups)
    }
    /// Offsets of head `h`'s x and its group's B and C in a row.
    fn offsets(&self, h: usize) -> (usize, usize, usize) {
        let g = self.group(h);
        let b = self.inner() + g * self.state;
        (h * self.head_dim, b, b + self.groups * self.state)
    }
}

/// One sequence chunk's inputs, `len` tokens.
pub struct Inputs<'a> {
    /// Per token the convolved `[x | B | C]`: `[len][shape.width()]`.
    pub xbc: &'a [f32],
    /// Per token and head the time step (after softplus and floor):
    /// `[len][heads]`.
    pub dt: &'a [f32],
    /// Per head `A = −exp(A_log)`.
    pub a: &'a [f32],
    /// Per head the skip weight `D`.
    pub skip: &'a [f32],
}

impl Inputs<'_> {
    pub fn len(&self, shape: &Shape) -> usize {
        self.xbc.len() / shape.width()
    }
}

/// Runs the chunk in the form `scan` picks for its length. `state`
/// continues; `out` is `[len][inner]`.
pub fn run(shape: &Shape, inputs: &Inputs, state: &mut [f32], out: &mut [f32], scan: ChunkedScan) {
    if scan.applies(inputs.len(shape)) {
        chunked::run(shape, inputs, state, out, scan.chunk);
    } else {
        recurrent::run(shape, inputs, state, out);
    }
}
