//! The delta rule token by token: exact, and what decode runs.

use rayon::prelude::*;

use super::{Inputs, Shape};

/// States at least this large (floats, all heads) are updated in parallel
/// over heads; smaller ones cost less than waking the pool.
const PARALLEL_STATE: usize = 1 << 15;

pub fn run(shape: &Shape, inputs: &Inputs, state: &mut [f32], out: &mut [f32]) {
    let rows = inputs.qkv.chunks_exact(shape.width());
    let gates = inputs.gates.chunks_exact(shape.value_heads);
    for ((qkv, gates), out) in rows.zip(gates).zip(out.chunks_exact_mut(shape.value_dim())) {
        step(shape, qkv, gates, state, out);
    }
}

/// One token for every value head.
fn step(shape: &Shape, qkv: &[f32], gates: &[(f32, f32)], state: &mut [f32], out: &mut [f32]) {
    let (q_all, rest) = qkv.split_at(shape.key_dim());
    let (k_all, v_all) = rest.split_at(shape.key_dim());
    let (dk, dv) = (shape.dk, shape.dv);
    let head = |h: usize, s: &mut [f32], o: &mut [f32]| {
        let kh = shape.key_head(h);
        let q = &q_all[kh * dk..(kh + 1) * dk];
        let k = &k_all[kh * dk..(kh + 1) * dk];
        let v = &v_all[h * dv..(h + 1) * dv];
        head_step(s, q, k, v, gates[h], o);
    };
    let per_head = dk * dv;
    if shape.state_len() >= PARALLEL_STATE {
        state
            .par_chunks_mut(per_head)
            .zip(out.par_chunks_mut(dv))
            .enumerate()
            .for_each(|(h, (s, o))| head(h, s, o));
    } else {
        state
            .chunks_mut(per_head)
            .zip(out.chunks_mut(dv))
            .enumerate()
            .for_each(|(h, (s, o))| head(h, s, o));
    }
}

/// One token of one head: `s` is `[dk][dv]`.
fn head_step(s: &mut [f32], q: &[f32], k: &[f32], v: &[f32], (beta, g): (f32, f32), o: &mut [f32]) {
    let dv = v.len();
    let decay = g.exp();
    s.iter_mut().for_each(|x| *x *= decay);
    // What the state already predicts for this key, then the beta-weighted
    // correction towards v.
    let mut delta = vec![0f32; dv];
    for (&ki, srow) in k.iter().zip(s.chunks_exact(dv)) {
        delta.iter_mut().zip(srow).for_each(|(m, x)| *m += x * ki);
    }
    delta
        .iter_mut()
        .zip(v)
        .for_each(|(m, v)| *m = (v - *m) * beta);
    o.fill(0.0);
    for ((&ki, &qi), srow) in k.iter().zip(q).zip(s.chunks_exact_mut(dv)) {
        srow.iter_mut()
            .zip(&delta)
            .for_each(|(x, dl)| *x += ki * dl);
        o.iter_mut()
            .zip(srow.iter())
            .for_each(|(y, x)| *y += x * qi);
    }
}
