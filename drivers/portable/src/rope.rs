//! Rotary position embeddings with the Hugging Face frequency schemes.

use pie_driver::ir::{RopeAttrs, RopeScaling, RopeStyle};
use pie_driver::{DriverError, ForwardBatch, Result};

use crate::tensor::Act;

/// The rotation a token gets: inverse frequency per rotated pair, and a
/// scale on cos/sin (YaRN and LongRoPE attention factors).
pub struct Frequencies {
    pub inv_freqs: Vec<f64>,
    pub scale: f64,
    /// LongRoPE: the original context length, and the factors used once a
    /// sequence is longer.
    pub long: Option<(u32, Vec<f64>)>,
}

impl Frequencies {
    /// The frequencies for a token of a sequence that is `seq_len` tokens
    /// long as of this forward pass. LongRoPE switches a whole chunk to the
    /// long factors once its sequence outgrows the original context, as
    /// the reference does per forward pass (keys cached before keep theirs).
    fn at(&self, seq_len: u32) -> &[f64] {
        match &self.long {
            Some((original, long)) if seq_len > *original => long,
            _ => &self.inv_freqs,
        }
    }
}

/// Inverse frequencies for each rotated pair, after scaling.
pub fn frequencies(a: &RopeAttrs) -> Result<Frequencies> {
    let half = a.rotary_dim / 2;
    let dim = a.rotary_dim as f64;
    let base: Vec<f64> = (0..half)
        .map(|j| 1.0 / a.theta.powf((2 * j) as f64 / dim))
        .collect();
    let plain = |inv_freqs| Frequencies {
        inv_freqs,
        scale: 1.0,
        long: None,
    };
    Ok(match &a.scaling {
        RopeScaling::None => plain(base),
        RopeScaling::Linear { factor } => plain(base.iter().map(|f| f / factor).collect()),
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
            plain(
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
                    .collect(),
            )
        }
        RopeScaling::Yarn {
            factor,
            original_max_position,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            truncate,
            attention_factor,
        } => {
            // Dimensions that turn fewer than `beta_slow` times over the
            // original context are interpolated (divided by `factor`), those
            // turning more than `beta_fast` times are kept, with a linear
            // ramp between (YaRN).
            let correction_dim = |rotations: f64| {
                dim * (original_max_position / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * a.theta.ln())
            };
            let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
            if *truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            let inv_freqs = base
                .iter()
                .enumerate()
                .map(|(j, &f)| {
                    // Ramp computed in f32 as the reference does.
                    let ramp =
                        ((j as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp as f64;
                    f / factor * (1.0 - keep) + f * keep
                })
                .collect();
            let mscale_of = |m: f64| {
                if *factor <= 1.0 {
                    1.0
                } else {
                    0.1 * m * factor.ln() + 1.0
                }
            };
            let scale = attention_factor.unwrap_or(if *mscale != 0.0 && *mscale_all_dim != 0.0 {
                mscale_of(*mscale) / mscale_of(*mscale_all_dim)
            } else {
                mscale_of(1.0)
            });
            Frequencies {
                inv_freqs,
                scale,
                long: None,
            }
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position,
            max_position,
            attention_factor,
        } => {
            if short_factor.len() != half || long_factor.len() != half {
                return Err(DriverError::Invalid(format!(
                    "longrope: short_factor and long_factor need {half} values (rotary_dim / 2), got {} and {}",
                    short_factor.len(),
                    long_factor.len()
                )));
            }
            let factor = max_position / original_max_position;
            let scale = attention_factor.unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / original_max_position.ln()).sqrt()
            });
            let scaled = |ext: &[f64]| base.iter().zip(ext).map(|(f, e)| f / e).collect();
            Frequencies {
                inv_freqs: scaled(short_factor),
                scale,
                long: Some((*original_max_position as u32, scaled(long_factor))),
            }
        }
    })
}

/// Rotates every token of a batch; each sequence chunk's length picks
/// LongRoPE's factors.
pub fn apply_in_batch(x: &Act, batch: &ForwardBatch, a: &RopeAttrs) -> Result<Act> {
    let mut seq_lens = vec![0u32; x.rows];
    for seq in &batch.seqs {
        let end = (seq.start + seq.len).min(x.rows);
        seq_lens[seq.start.min(end)..end].fill(seq.kv_len() as u32);
    }
    apply_with_lens(x, &batch.positions, &seq_lens, a)
}

/// Rotates tokens at `positions`, each as if its sequence ended there.
pub fn apply(x: &Act, positions: &[u32], a: &RopeAttrs) -> Result<Act> {
    let lens: Vec<u32> = positions.iter().map(|p| p + 1).collect();
    apply_with_lens(x, positions, &lens, a)
}

fn apply_with_lens(x: &Act, positions: &[u32], seq_lens: &[u32], a: &RopeAttrs) -> Result<Act> {
    if positions.len() != x.rows {
        return Err(DriverError::Invalid(format!(
            "rope: {} positions for {} tokens",
            positions.len(),
            x.rows
        )));
    }
    let freqs = frequencies(a)?;
    let half = a.rotary_dim / 2;
    let mut out = x.clone();
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for ((row, &pos), &len) in out.data.chunks_mut(x.width).zip(positions).zip(seq_lens) {
        for (j, f) in freqs.at(len).iter().enumerate() {
            let angle = pos as f64 * f;
            cos[j] = (angle.cos() * freqs.scale) as f32;
            sin[j] = (angle.sin() * freqs.scale) as f32;
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
        let base = frequencies(&attrs(RopeScaling::None)).unwrap().inv_freqs;
        let scaled = frequencies(&attrs(s)).unwrap().inv_freqs;
        assert_eq!(scaled[0], base[0]); // wavelength 2π < 8: kept
        assert!((scaled[1] - base[1] / 8.0).abs() < 1e-12); // wavelength 628 > 32: slowed
    }

    #[test]
    fn longrope_switches_factors_past_the_original_context() {
        let s = RopeScaling::LongRope {
            short_factor: vec![1.0, 2.0],
            long_factor: vec![4.0, 8.0],
            original_max_position: 16.0,
            max_position: 64.0,
            attention_factor: None,
        };
        let base = frequencies(&attrs(RopeScaling::None)).unwrap().inv_freqs;
        let f = frequencies(&attrs(s)).unwrap();
        assert_eq!(f.at(16), &[base[0], base[1] / 2.0]);
        assert_eq!(f.at(17), &[base[0] / 4.0, base[1] / 8.0]);
        let expected = (1.0 + 4f64.ln() / 16f64.ln()).sqrt();
        assert!((f.scale - expected).abs() < 1e-12);
    }
}
