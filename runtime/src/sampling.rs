//! Token selection from logits. Samplers are plain data so a future device
//! loop can run them inside the forward pass.

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampler {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// Drops tokens less likely than `min_p` times the most likely one;
    /// 0 = off.
    pub min_p: f32,
    pub seed: u64,
}

impl Sampler {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    pub fn greedy() -> Self {
        Sampler {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }
}

/// Deterministic per-sampler random numbers (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The index of the largest logit; the first one on ties, like `torch.argmax`.
pub use pie_driver::argmax;

pub fn sample(logits: &[f32], s: &Sampler, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    // With top-k, a partial sort keeps the k best first; the candidates
    // are then sorted, so the filters below see them best first.
    let mut idx = match s.top_k {
        0 => (0..logits.len()).collect(),
        k => top_indices(logits, k),
    };
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx
        .iter()
        .map(|&i| ((logits[i] - max) / s.temperature).exp())
        .collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.min_p > 0.0 {
        // probs[0] is the largest: the candidates are sorted.
        let floor = s.min_p * probs[0];
        let n = probs.iter().take_while(|&&p| p >= floor).count().max(1);
        probs.truncate(n);
        idx.truncate(n);
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().take_while(|&&p| {
            let inside = acc < s.top_p;
            acc += p;
            inside
        });
        let n = keep.count().max(1);
        probs.truncate(n);
        idx.truncate(n);
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let r = rng.next_f32();
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(&idx) {
        acc += p;
        if r < acc {
            return i as u32;
        }
    }
    *idx.last().expect("at least one candidate") as u32
}

/// `log_softmax(logits)[token]`.
pub fn logprob(logits: &[f32], token: u32) -> f32 {
    logits[token as usize] - log_sum_exp(logits)
}

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
fn fast_exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    // ln 2 split in two (Cody-Waite) so `r` stays exact for large `n`.
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The `k` most likely tokens with their softmax probabilities, most
/// likely first.
pub fn top_k_distribution(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(logits);
    let mut idx = top_indices(logits, k);
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i as u32, (logits[i] - lse).exp()))
        .collect()
}

/// The indices of the `k` largest logits, in no order (a partial sort:
/// linear in the vocabulary).
fn top_indices(logits: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
        });
    }
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_log_sum_exp_matches_the_scalar_form() {
        let mut rng = Rng::new(3);
        let logits: Vec<f32> = (0..151_937)
            .map(|_| (rng.next_f32() - 0.5) * 40.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exact = max as f64
            + logits
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln();
        let fast = log_sum_exp(&logits) as f64;
        assert!((fast - exact).abs() < 1e-4, "{fast} vs {exact}");
        for x in [0.0f32, -1e-3, -0.5, -1.0, -10.0, -80.0] {
            let rel = (fast_exp(x) as f64 / (x as f64).exp() - 1.0).abs();
            assert!(rel < 1e-6, "exp({x}): rel {rel}");
        }
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, -1.0]), 1);
    }

    fn draws(logits: &[f32], s: &Sampler, seed: u64) -> Vec<u32> {
        let mut rng = Rng::new(seed);
        (0..20).map(|_| sample(logits, s, &mut rng)).collect()
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_deterministic() {
        let logits = [0.1, 2.0, 0.5, 1.9];
        let top1 = Sampler {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        };
        assert!(draws(&logits, &top1, 1).iter().all(|&t| t == 1));
        let free = Sampler {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        };
        let a = draws(&logits, &free, 7);
        assert_eq!(a, draws(&logits, &free, 7));
        assert!(a.iter().any(|&t| t != 1), "temperature 1 explores");
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [5.0, 4.9, 0.0, 0.0];
        let s = Sampler {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: 0,
        };
        let d = draws(&logits, &s, 9);
        assert!(d.iter().all(|&t| t < 2));
        assert!(d.contains(&0) && d.contains(&1));
    }

    /// Log-probabilities: `log_softmax(logits)[token]`.
    #[test]
    fn logprob_is_log_softmax() {
        let lp = logprob(&[0.0, (3.0f32).ln()], 1);
        assert!((lp - 0.75f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn top_k_distribution_is_sorted_softmax() {
        let d = top_k_distribution(&[0.0, (3.0f32).ln(), -100.0], 2);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 0]);
        assert!((d[0].1 - 0.75).abs() < 1e-6 && (d[1].1 - 0.25).abs() < 1e-6);
    }

    #[test]
    fn top_p_keeps_the_smallest_covering_set() {
        let logits = [10.0, 9.9, -10.0, -10.0];
        let s = Sampler {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            seed: 0,
        };
        assert!(draws(&logits, &s, 3).iter().all(|&t| t < 2));
    }
}
