//! The chunked scan against the token-by-token one on random inputs.

use super::*;
use crate::recurrent::softplus;
use crate::test_rng::{max_diff, Rng};

/// f32 agreement asked of the two forms, relative to the largest value.
const REL_TOL: f32 = 1e-4;

struct Case {
    xbc: Vec<f32>,
    dt: Vec<f32>,
    a: Vec<f32>,
    skip: Vec<f32>,
}

impl Case {
    /// Random inputs shaped like the op's: dt a softplus (some tokens with
    /// a long step that wipes the state), A in (−8, −1/8).
    fn new(shape: &Shape, len: usize, rng: &mut Rng) -> Case {
        Case {
            xbc: rng.vec(len * shape.width()),
            dt: (0..len * shape.heads)
                .map(|i| {
                    if i % 89 == 5 {
                        30.0
                    } else {
                        softplus(2.0 * rng.uniform())
                    }
                })
                .collect(),
            a: (0..shape.heads)
                .map(|_| -(3.0 * rng.uniform()).exp2() * 0.7)
                .collect(),
            skip: rng.vec(shape.heads),
        }
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            xbc: &self.xbc,
            dt: &self.dt,
            a: &self.a,
            skip: &self.skip,
        }
    }
}

/// Runs both forms from the same random start state; asserts outputs and
/// final states agree.
fn compare(shape: Shape, len: usize, chunk: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let case = Case::new(&shape, len, &mut rng);
    let start = rng.vec(shape.state_len());
    let (mut s_rec, mut s_chk) = (start.clone(), start);
    let mut o_rec = vec![0f32; len * shape.inner()];
    let mut o_chk = o_rec.clone();
    recurrent::run(&shape, &case.inputs(), &mut s_rec, &mut o_rec);
    chunked::run(&shape, &case.inputs(), &mut s_chk, &mut o_chk, chunk);
    for (what, a, b) in [("outputs", &o_chk, &o_rec), ("state", &s_chk, &s_rec)] {
        let (diff, scale) = max_diff(a, b);
        eprintln!("len {len} chunk {chunk}: {what} max|diff| {diff:.2e}, max {scale:.2}");
        assert!(
            diff <= REL_TOL * scale.max(1.0),
            "{shape:?} len {len} chunk {chunk}: {what} differ by {diff:e} (max {scale})"
        );
    }
}

const SMALL: Shape = Shape {
    heads: 4,
    head_dim: 8,
    state: 16,
    groups: 2,
};

#[test]
fn chunked_matches_recurrent_around_the_chunk_size() {
    for (i, len) in [1, 2, 63, 64, 65, 128, 200].into_iter().enumerate() {
        compare(SMALL, len, 64, i as u64);
    }
}

#[test]
fn chunked_matches_recurrent_with_tiny_chunks() {
    for len in 1..14 {
        for chunk in [1, 3, 4] {
            compare(SMALL, len, chunk, 100 + len as u64);
        }
    }
}

#[test]
fn chunked_matches_recurrent_at_full_head_size() {
    let shape = Shape {
        heads: 4,
        head_dim: 64,
        state: 128,
        groups: 1,
    };
    compare(shape, 150, 64, 7);
}
