//! Row-wise and elementwise ops.

use pie_driver::ir::{ActivationFn, GaussianTopkAttrs, RmsNormAttrs};
use pie_driver::{DriverError, Result};
use rayon::prelude::*;

use crate::tensor::Act;

/// Below this many elements an op runs on one thread: splitting costs more.
const PAR_MIN_ELEMS: usize = 1 << 14;

pub fn rms_norm(x: &Act, w: Option<&[f32]>, a: &RmsNormAttrs) -> Act {
    let mut out = x.clone();
    let g = a.group;
    let norm_group = |chunk: &mut [f32]| {
        let ms = chunk.iter().map(|v| v * v).sum::<f32>() / g as f32;
        let inv = 1.0 / (ms + a.eps).sqrt();
        match w {
            Some(w) => chunk
                .iter_mut()
                .zip(w)
                .for_each(|(v, wi)| *v = *v * inv * (a.offset + wi)),
            // Without a weight the norm has no learned scale.
            None => chunk.iter_mut().for_each(|v| *v *= inv),
        }
    };
    if out.data.len() >= PAR_MIN_ELEMS {
        out.data.par_chunks_mut(g).for_each(norm_group);
    } else {
        out.data.chunks_mut(g).for_each(norm_group);
    }
    out
}

/// LayerNorm over each row: mean-centred, divided by the standard
/// deviation, then the optional affine weight and bias.
pub fn layer_norm(x: &Act, w: Option<&[f32]>, b: Option<&[f32]>, eps: f32) -> Act {
    let mut out = x.clone();
    let n = x.width as f32;
    let norm_row = |row: &mut [f32]| {
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (i, v) in row.iter_mut().enumerate() {
            *v = (*v - mean) * inv * w.map_or(1.0, |w| w[i]) + b.map_or(0.0, |b| b[i]);
        }
    };
    if out.data.len() >= PAR_MIN_ELEMS {
        out.data.par_chunks_mut(x.width).for_each(norm_row);
    } else {
        out.data.chunks_mut(x.width).for_each(norm_row);
    }
    out
}

pub fn add_bias(x: &mut Act, bias: &[f32]) {
    for row in x.data.chunks_mut(x.width) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

pub fn zip(x: &Act, y: &Act, width: usize, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Act> {
    if x.width != width || y.width != width || x.rows != y.rows {
        return Err(DriverError::Invalid(format!(
            "elementwise op on [{}, {}] and [{}, {}] (expected width {width})",
            x.rows, x.width, y.rows, y.width
        )));
    }
    let data = if x.data.len() >= PAR_MIN_ELEMS {
        x.data
            .par_iter()
            .zip(&y.data)
            .map(|(a, b)| f(*a, *b))
            .collect()
    } else {
        x.data.iter().zip(&y.data).map(|(a, b)| f(*a, *b)).collect()
    };
    Ok(Act {
        data,
        rows: x.rows,
        width,
    })
}

/// GPT-OSS's clamped SwiGLU: gate clamped above, up clamped both ways,
/// `gate · σ(1.702 · gate) · (up + 1)`.
pub fn clamped_swiglu(gate: f32, up: f32, limit: f32) -> f32 {
    const ALPHA: f32 = 1.702;
    let g = gate.min(limit);
    let u = up.clamp(-limit, limit);
    g / (1.0 + (-ALPHA * g).exp()) * (u + 1.0)
}

pub fn map(x: &Act, f: impl Fn(f32) -> f32 + Sync) -> Act {
    let data = if x.data.len() >= PAR_MIN_ELEMS {
        x.data.par_iter().map(|v| f(*v)).collect()
    } else {
        x.data.iter().map(|v| f(*v)).collect()
    };
    Act {
        data,
        rows: x.rows,
        width: x.width,
    }
}

/// Splits every group of `group` features by `sizes`; output `p` gathers
/// part `p` of each group.
pub fn split(x: &Act, sizes: &[usize], group: usize) -> Vec<Act> {
    let groups = x.width / group;
    let mut parts: Vec<Act> = sizes
        .iter()
        .map(|&s| Act::zeros(x.rows, s * groups))
        .collect();
    for r in 0..x.rows {
        for (g, chunk) in x.row(r).chunks(group).enumerate() {
            let mut start = 0;
            for (p, &size) in parts.iter_mut().zip(sizes) {
                let dst = r * p.width + g * size;
                p.data[dst..dst + size].copy_from_slice(&chunk[start..start + size]);
                start += size;
            }
        }
    }
    parts
}

/// Joins the rows of `parts` feature-wise, in order.
pub fn concat(parts: &[&Act]) -> Act {
    let rows = parts.first().map_or(0, |p| p.rows);
    let width = parts.iter().map(|p| p.width).sum();
    let mut data = Vec::with_capacity(rows * width);
    for r in 0..rows {
        for p in parts {
            data.extend_from_slice(p.row(r));
        }
    }
    Act { data, rows, width }
}

/// `sqrt(mean(x²))` of each group of `group` features.
pub fn rms(x: &Act, group: usize) -> Act {
    let data = x
        .data
        .chunks(group)
        .map(|g| (g.iter().map(|v| v * v).sum::<f32>() / group as f32).sqrt())
        .collect();
    Act {
        data,
        rows: x.rows,
        width: x.width / group,
    }
}

/// `relu(x − mean − z·std)` of each row, with the population std: only
/// the features above the cutoff survive, shifted down by it.
pub fn gaussian_topk(x: &Act, a: &GaussianTopkAttrs) -> Act {
    let mut out = x.clone();
    let n = x.width as f32;
    let cut_row = |row: &mut [f32]| {
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let cutoff = mean + var.sqrt() * a.std_multiplier;
        row.iter_mut().for_each(|v| *v = (*v - cutoff).max(0.0));
    };
    if out.data.len() >= PAR_MIN_ELEMS {
        out.data.par_chunks_mut(x.width).for_each(cut_row);
    } else {
        out.data.chunks_mut(x.width).for_each(cut_row);
    }
    out
}

pub fn activation_fn(f: ActivationFn) -> fn(f32) -> f32 {
    match f {
        ActivationFn::Silu => |v| v / (1.0 + (-v).exp()),
        ActivationFn::Gelu => |v| 0.5 * v * (1.0 + erf(v / std::f32::consts::SQRT_2)),
        ActivationFn::GeluTanh => |v| {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            0.5 * v * (1.0 + (C * (v + 0.044_715 * v * v * v)).tanh())
        },
        ActivationFn::Relu => |v| v.max(0.0),
        ActivationFn::Relu2 => |v| {
            let r = v.max(0.0);
            r * r
        },
        ActivationFn::Sigmoid => |v| 1.0 / (1.0 + (-v).exp()),
        ActivationFn::Tanh => f32::tanh,
    }
}

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit),
/// accurate enough for exact GELU in f32.
fn erf(x: f32) -> f32 {
    let x = x as f64;
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    let erf = 1.0 - r;
    (if x >= 0.0 { erf } else { -erf }) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
        ] {
            assert!((erf(x) - want).abs() < 1e-6, "erf({x})");
        }
    }

    #[test]
    fn gaussian_topk_keeps_what_lies_above_the_cutoff() {
        let x = Act {
            data: vec![1.0, 2.0, 3.0, 4.0],
            rows: 1,
            width: 4,
        };
        // mean 2.5, population std sqrt(1.25); z = 1 cuts at 2.5 + 1.118.
        let a = GaussianTopkAttrs {
            width: 4,
            sparsity: 0.841_344_7,
            std_multiplier: 1.0,
        };
        let out = gaussian_topk(&x, &a);
        let cut = 2.5 + 1.25f32.sqrt();
        assert_eq!(out.data[..3], [0.0, 0.0, 0.0]);
        assert!((out.data[3] - (4.0 - cut)).abs() < 1e-6);
    }

    #[test]
    fn concat_and_rms_per_row() {
        let a = Act {
            data: vec![3.0, 1.0],
            rows: 2,
            width: 1,
        };
        let b = Act {
            data: vec![4.0, 1.0, 1.0, 1.0],
            rows: 2,
            width: 2,
        };
        let joined = concat(&[&a, &b]);
        assert_eq!(joined.data, [3.0, 4.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(rms(&joined, 3).data, [(26.0f32 / 3.0).sqrt(), 1.0]);
    }

    #[test]
    fn rms_norm_groups_and_offset() {
        let x = Act {
            data: vec![1.0, 3.0, 2.0, 2.0],
            rows: 1,
            width: 4,
        };
        let a = RmsNormAttrs {
            width: 4,
            group: 2,
            eps: 0.0,
            offset: 1.0,
        };
        let out = rms_norm(&x, Some(&[0.0, 1.0]), &a);
        let r = (5.0f32).sqrt();
        let want = [1.0 / r, 3.0 / r * 2.0, 1.0, 2.0];
        for (o, w) in out.data.iter().zip(want) {
            assert!((o - w).abs() < 1e-6);
        }
    }
}
