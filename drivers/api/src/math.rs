//! Reductions over a logits row shared by the drivers' host paths and the
//! runtime's sampling.

/// `ln Σ exp(l)`, stable (shifted by the maximum). One pass of a
/// polynomial `exp` over lanes of 8 partial sums, which the compiler
/// vectorizes: a 150k-entry vocabulary takes tens of microseconds, where
/// the scalar `f32::exp` took most of a millisecond per sampled token.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = max_value(logits);
    if !max.is_finite() {
        return max;
    }
    let mut lanes = [0f32; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (acc, &l) in lanes.iter_mut().zip(c) {
            *acc += fast_exp(l - max);
        }
    }
    let sum: f32 = lanes.iter().sum::<f32>() + tail.iter().map(|&l| fast_exp(l - max)).sum::<f32>();
    max + sum.ln()
}

fn max_value(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    tail.iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `exp(x)` for `x <= 0` within a few ulp: `x = n ln2 + r` with |r| <= ln2/2,
/// a degree-6 polynomial for `exp(r)`, and `2^n` built in the exponent
/// bits. Branch-free so loops over it vectorize.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    // Round to nearest by the 1.5 * 2^23 trick: `f32::round` is a libm
    // call on baseline x86-64 and would keep the loop scalar.
    // The sum's low mantissa bits then hold `n` as an integer, which
    // builds `2^n` below without a float-to-int conversion.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    // ln 2 split in two (Cody-Waite) so `r` stays exact for large `n`.
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let exponent = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127);
    p * f32::from_bits(exponent << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_of_a_large_vocabulary_is_fast() {
        let row: Vec<f32> = (0..151_936)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
            .collect();
        let started = std::time::Instant::now();
        let mut acc = 0.0;
        for _ in 0..20 {
            acc += log_sum_exp(std::hint::black_box(&row));
        }
        let per_call = started.elapsed() / 20;
        eprintln!("log_sum_exp over 151,936 logits: {per_call:?} ({acc})");
    }

    #[test]
    fn fast_exp_is_accurate_to_a_few_ulp() {
        for x in [0.0f32, -1e-3, -0.5, -1.0, -10.0, -80.0] {
            let rel = (fast_exp(x) as f64 / (x as f64).exp() - 1.0).abs();
            assert!(rel < 1e-6, "exp({x}): rel {rel}");
        }
    }
}
