//! Turning one logits row into the output a pass asked for.

use super::{OutputKind, PassOutput};
use crate::sampling::{self, Rng};

/// The output for the token at absolute position `pos`. A sampler's draw
/// depends on its seed and the position only, so a pass gives the same
/// token however it was batched.
pub fn compute(logits: &[f32], kind: &OutputKind, pos: usize) -> PassOutput {
    match kind {
        OutputKind::Sample(s) => {
            let mut rng = Rng::new(s.seed ^ (pos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let token = sampling::sample(logits, s, &mut rng);
            PassOutput::Token {
                token,
                logprob: sampling::logprob(logits, token),
            }
        }
        OutputKind::Distribution(k) => {
            PassOutput::Distribution(sampling::top_k_distribution(logits, *k as usize))
        }
        OutputKind::Logits => PassOutput::Logits(logits.to_vec()),
    }
}
