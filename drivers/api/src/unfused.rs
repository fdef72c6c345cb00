//! The fused `Driver` calls as the ops they stand for, one by one: the
//! trait's defaults, and what a driver with fused kernels falls back to
//! where its kernel does not apply.

use crate::ir::*;
use crate::{Driver, ForwardBatch, NormRopePart, PreNorm, Result};

/// `residual + linear(x)`.
pub fn linear_add<D: Driver + ?Sized>(
    d: &D,
    x: &D::Act,
    w: &D::Weight,
    bias: Option<&D::Weight>,
    a: &LinearAttrs,
    residual: D::Act,
    add: &ElementwiseAttrs,
) -> Result<D::Act> {
    let y = d.linear(x, w, bias, a)?;
    d.add(&residual, &y, add)
}

/// `linear_many(rms_norm(x))`.
pub fn norm_linear_many<D: Driver + ?Sized>(
    d: &D,
    x: &D::Act,
    norm: PreNorm<'_, D>,
    weights: &[&D::Weight],
    biases: &[Option<&D::Weight>],
    attrs: &[&LinearAttrs],
) -> Result<Vec<D::Act>> {
    let h = d.rms_norm(x, norm.0, norm.1)?;
    d.linear_many(&h, weights, biases, attrs)
}

/// `(x + y, gated_linear(rms_norm(x + y)))`.
#[allow(clippy::too_many_arguments)] // the ops' own operands, one each
pub fn add_norm_gated_linear<D: Driver + ?Sized>(
    d: &D,
    x: &D::Act,
    y: &D::Act,
    add: &ElementwiseAttrs,
    norm: PreNorm<'_, D>,
    gate: (&D::Weight, Option<&D::Weight>, &LinearAttrs),
    up: (&D::Weight, Option<&D::Weight>, &LinearAttrs),
    a: &GluAttrs,
) -> Result<(D::Act, D::Act)> {
    let (sum, h) = d.add_rms_norm(x, y, add, norm.0, norm.1)?;
    Ok((sum, d.gated_linear(&h, gate, up, a)?))
}

/// `s + down(gated_linear(rms_norm(s)))` with `s = x + y`: the calls
/// [`Driver::add_norm_mlp`] stands for.
#[allow(clippy::too_many_arguments)] // the ops' own operands, one each
pub fn add_norm_mlp<D: Driver + ?Sized>(
    d: &D,
    x: &D::Act,
    y: D::Act,
    add: &ElementwiseAttrs,
    norm: PreNorm<'_, D>,
    gate: (&D::Weight, Option<&D::Weight>, &LinearAttrs),
    up: (&D::Weight, Option<&D::Weight>, &LinearAttrs),
    glu: &GluAttrs,
    down: (&D::Weight, Option<&D::Weight>, &LinearAttrs),
    add_down: &ElementwiseAttrs,
) -> Result<D::Act> {
    let (sum, m) = d.add_norm_gated_linear(x, &y, add, norm, gate, up, glu)?;
    drop(y);
    d.linear_add(&m, down.0, down.1, down.2, sum, add_down)
}

/// `(x + y, rms_norm(x + y))`.
pub fn add_rms_norm<D: Driver + ?Sized>(
    d: &D,
    x: &D::Act,
    y: &D::Act,
    add: &ElementwiseAttrs,
    w: Option<&D::Weight>,
    norm: &RmsNormAttrs,
) -> Result<(D::Act, D::Act)> {
    let sum = d.add(x, y, add)?;
    let normed = d.rms_norm(&sum, w, norm)?;
    Ok((sum, normed))
}

/// `rope(rms_norm(x))`.
pub fn rms_norm_rope<D: Driver + ?Sized>(
    d: &D,
    x: &D::Act,
    w: Option<&D::Weight>,
    norm: &RmsNormAttrs,
    batch: &ForwardBatch,
    rope: &RopeAttrs,
) -> Result<D::Act> {
    let normed = d.rms_norm(x, w, norm)?;
    d.rope(&normed, batch, rope)
}

/// Two [`Driver::rms_norm_rope`] calls.
/// `attention(rope(rms_norm(q)), rope(rms_norm(k)), v)`, op by op.
#[allow(clippy::too_many_arguments)] // the ops' own operands, one each
pub fn norm_rope_attention<D: Driver + ?Sized>(
    d: &D,
    q: NormRopePart<'_, D>,
    k: NormRopePart<'_, D>,
    v: &D::Act,
    sinks: Option<&D::Weight>,
    kv: &mut D::Kv,
    batch: &ForwardBatch,
    a: &AttentionAttrs,
) -> Result<D::Act> {
    let (q, k) = d.rms_norm_rope2(q, k, batch)?;
    d.attention(&q, Some(&k), Some(v), sinks, kv, batch, a)
}

pub fn rms_norm_rope2<D: Driver + ?Sized>(
    d: &D,
    a: NormRopePart<'_, D>,
    b: NormRopePart<'_, D>,
    batch: &ForwardBatch,
) -> Result<(D::Act, D::Act)> {
    let a = d.rms_norm_rope(a.0, a.1, a.2, batch, a.3)?;
    let b = d.rms_norm_rope(b.0, b.1, b.2, batch, b.3)?;
    Ok((a, b))
}
