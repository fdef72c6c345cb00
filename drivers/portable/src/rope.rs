//! Rotary position embeddings with the Hugging Face frequency schemes.

use pie_driver::ir::{RopeAttrs, RopeScaling, RopeStyle};
use pie_driver::{DriverError, Result};

use crate::tensor::Act;

/// Inverse frequencies for each rotated pair, after scaling.
pub fn inv_freqs(a: &RopeAttrs) -> Result<Vec<f64>> {
    let half = a.rotary_dim / 2;
    let base: Vec<f64> = (0..half)
        .map(|j| 1.0 / a.theta.powf((2 * j) as f64 / a.rotary_dim as f64))
        .collect();
    Ok(match &a.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => {
            // Long wavelengths are slowed by `factor`, short ones kept, and
            // the band between interpolated smoothly (Llama 3.1).
            let low_wavelen = original_max_position / low_freq_factor;
            let high_wavelen = original_max_position / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max_position / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        other => {
            return Err(DriverError::Invalid(format!(
                "rope scaling {} is not implemented by the portable driver yet",
                match other {
                    RopeScaling::Yarn { .. } => "`yarn`",
                    _ => "`longrope`",
                }
            )))
        }
    })
}

pub fn apply(x: &Act, positions: &[u32], a: &RopeAttrs) -> Result<Act> {
    if positions.len() != x.rows {
        return Err(DriverError::Invalid(format!(
            "rope: {} positions for {} tokens",
            positions.len(),
            x.rows
        )));
    }
    let freqs = inv_freqs(a)?;
    let half = a.rotary_dim / 2;
    let mut out = x.clone();
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for (row, &pos) in out.data.chunks_mut(x.width).zip(positions) {
        for (j, f) in freqs.iter().enumerate() {
            let angle = pos as f64 * f;
            cos[j] = angle.cos() as f32;
            sin[j] = angle.sin() as f32;
        }
        for head in row.chunks_mut(a.head_dim) {
            rotate(head, &cos, &sin, a.style);
        }
    }
    Ok(out)
}

fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    for j in 0..half {
        let (i0, i1) = match style {
            RopeStyle::Half => (j, j + half),
            RopeStyle::Interleaved => (2 * j, 2 * j + 1),
        };
        let (x0, x1) = (head[i0], head[i1]);
        head[i0] = x0 * cos[j] - x1 * sin[j];
        head[i1] = x1 * cos[j] + x0 * sin[j];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(scaling: RopeScaling) -> RopeAttrs {
        RopeAttrs {
            heads: 1,
            head_dim: 4,
            rotary_dim: 4,
            theta: 10000.0,
            scaling,
            style: RopeStyle::Half,
        }
    }

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let x = Act {
            data: vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0],
            rows: 2,
            width: 4,
        };
        let out = apply(&x, &[0, 7], &attrs(RopeScaling::None)).unwrap();
        assert_eq!(&out.data[..4], &x.data[..4]);
        let n0: f32 = x.data[4..].iter().map(|v| v * v).sum();
        let n1: f32 = out.data[4..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn llama3_keeps_high_and_slows_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 32.0,
        };
        let base = inv_freqs(&attrs(RopeScaling::None)).unwrap();
        let scaled = inv_freqs(&attrs(s)).unwrap();
        assert_eq!(scaled[0], base[0]); // wavelength 2π < 8: kept
        assert!((scaled[1] - base[1] / 8.0).abs() < 1e-12); // wavelength 628 > 32: slowed
    }
}
