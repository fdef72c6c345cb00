//! The selective scan token by token: exact, and what decode runs.

use super::{Inputs, Shape};

pub fn run(shape: &Shape, inputs: &Inputs, state: &mut [f32], out: &mut [f32]) {
    let rows = inputs.xbc.chunks_exact(shape.width());
    let dts = inputs.dt.chunks_exact(shape.heads);
    for ((xbc, dt), out) in rows.zip(dts).zip(out.chunks_exact_mut(shape.inner())) {
        step(shape, inputs, xbc, dt, state, out);
    }
}

/// One token for every head; `state` is `[heads][head_dim][state]`.
fn step(
    shape: &Shape,
    inputs: &Inputs,
    xbc: &[f32],
    dt: &[f32],
    state: &mut [f32],
    out: &mut [f32],
) {
    let (p_dim, n_dim) = (shape.head_dim, shape.state);
    let heads = state
        .chunks_exact_mut(p_dim * n_dim)
        .zip(out.chunks_exact_mut(p_dim));
    for (h, (sh, oh)) in heads.enumerate() {
        let (x_at, b_at, c_at) = shape.offsets(h);
        let b = &xbc[b_at..b_at + n_dim];
        let c = &xbc[c_at..c_at + n_dim];
        let xh = &xbc[x_at..x_at + p_dim];
        let decay = (dt[h] * inputs.a[h]).exp();
        for ((&xp, srow), o) in xh.iter().zip(sh.chunks_exact_mut(n_dim)).zip(oh.iter_mut()) {
            let mut acc = 0f32;
            for ((s, &bn), &cn) in srow.iter_mut().zip(b).zip(c) {
                *s = *s * decay + dt[h] * bn * xp;
                acc += *s * cn;
            }
            *o = acc + inputs.skip[h] * xp;
        }
    }
}
