//! Reductions over a row of logits or scores shared by the drivers' host
//! paths and the runtime's sampling.

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

/// The indices of the `k` largest scores in ascending index order (all of
/// them when there are no more than `k`); equal scores prefer the lower
/// index (as the MoE router's top-k, and `torch.topk` on CPU in practice).
/// The sparse-attention indexer's choice of keys, on both drivers.
pub fn top_k_indices(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    if k < idx.len() {
        let better = |a: &u32, b: &u32| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        };
        if k == 0 {
            return Vec::new();
        }
        idx.select_nth_unstable_by(k - 1, better);
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_indices_keep_the_largest_and_prefer_earlier_ties() {
        let scores = [0.5, 2.0, -1.0, 2.0, 0.5, 3.0];
        assert_eq!(top_k_indices(&scores, 3), vec![1, 3, 5]);
        assert_eq!(top_k_indices(&scores, 2), vec![1, 5]);
        assert_eq!(top_k_indices(&scores, 4), vec![0, 1, 3, 5]);
        assert_eq!(top_k_indices(&scores, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(top_k_indices(&scores, 9), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(top_k_indices(&scores, 0), Vec::<u32>::new());
        assert_eq!(top_k_indices(&[f32::NEG_INFINITY, 0.0], 1), vec![1]);
    }

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
