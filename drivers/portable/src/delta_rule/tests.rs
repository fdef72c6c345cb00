//! The chunked form against the token-by-token one on random inputs.

use super::*;
use crate::recurrent::sigmoid;
use crate::test_rng::{max_diff, Rng};

/// f32 agreement asked of the two forms, relative to the largest value.
const REL_TOL: f32 = 1e-4;

/// Random inputs shaped like the op's: unit q (scaled) and k, β in (0, 1),
/// log decays in (−2, 0) with some tokens that wipe the state (−40).
fn inputs(shape: &Shape, len: usize, rng: &mut Rng) -> (Vec<f32>, Vec<(f32, f32)>) {
    let mut qkv = rng.vec(len * shape.width());
    for row in qkv.chunks_exact_mut(shape.width()) {
        let scale = 1.0 / (shape.dk as f32).sqrt();
        for (i, head) in row[..2 * shape.key_dim()]
            .chunks_exact_mut(shape.dk)
            .enumerate()
        {
            let norm = head.iter().map(|v| v * v).sum::<f32>().sqrt();
            let s = if i < shape.key_heads { scale } else { 1.0 };
            head.iter_mut().for_each(|v| *v *= s / norm);
        }
    }
    let gates = (0..len * shape.value_heads)
        .map(|i| {
            let g = if i % 97 == 13 {
                -40.0
            } else {
                rng.uniform() - 1.0
            };
            (sigmoid(3.0 * rng.uniform()), g)
        })
        .collect();
    (qkv, gates)
}

/// Runs both forms from the same random start state; asserts outputs and
/// final states agree.
fn compare(shape: Shape, len: usize, chunk: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let (qkv, gates) = inputs(&shape, len, &mut rng);
    let start = rng.vec(shape.state_len());
    let x = Inputs {
        qkv: &qkv,
        gates: &gates,
    };
    let (mut s_rec, mut s_chk) = (start.clone(), start);
    let mut o_rec = vec![0f32; len * shape.value_dim()];
    let mut o_chk = o_rec.clone();
    recurrent::run(&shape, &x, &mut s_rec, &mut o_rec);
    chunked::run(&shape, &x, &mut s_chk, &mut o_chk, chunk);
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
    key_heads: 2,
    value_heads: 4,
    dk: 16,
    dv: 8,
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
        key_heads: 1,
        value_heads: 2,
        dk: 128,
        dv: 128,
    };
    compare(shape, 150, 64, 7);
}

#[test]
fn run_picks_the_form_by_length() {
    // Both dispatch paths continue the same state: a 10-token chunk
    // chunked, then a 1-token step, equals 11 recurrent tokens.
    let mut rng = Rng::new(3);
    let (qkv, gates) = inputs(&SMALL, 11, &mut rng);
    let w = SMALL.width();
    let scan = ChunkedScan {
        min_tokens: 4,
        chunk: 4,
    };
    let (mut s_a, mut s_b) = (vec![0f32; SMALL.state_len()], vec![0f32; SMALL.state_len()]);
    let mut o_a = vec![0f32; 11 * SMALL.value_dim()];
    let mut o_b = o_a.clone();
    let (o_head, o_tail) = o_a.split_at_mut(10 * SMALL.value_dim());
    let part = |r: std::ops::Range<usize>| Inputs {
        qkv: &qkv[r.start * w..r.end * w],
        gates: &gates[r.start * SMALL.value_heads..r.end * SMALL.value_heads],
    };
    run(&SMALL, &part(0..10), &mut s_a, o_head, scan);
    run(&SMALL, &part(10..11), &mut s_a, o_tail, scan);
    recurrent::run(&SMALL, &part(0..11), &mut s_b, &mut o_b);
    let (diff, scale) = max_diff(&o_a, &o_b);
    assert!(diff <= REL_TOL * scale.max(1.0), "{diff:e}");
}
