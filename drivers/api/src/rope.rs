//! Rotary-embedding frequency schedules of the Hugging Face rope types
//! (default, linear, llama3, YaRN, LongRoPE): pure arithmetic shared by
//! every driver, which then rotates on its own hardware.

use crate::ir::{RopeAttrs, RopeScaling};
use crate::{DriverError, Result};

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
    pub fn at(&self, seq_len: u32) -> &[f64] {
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
