//! Sampler parameters (plain data: the runtime samples).

use crate::bindings::pie::inferlet::forward::Sampler as WitSampler;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    pub seed: u64,
}

impl Sampler {
    pub fn greedy() -> Self {
        Sampler {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }

    pub fn temperature(t: f32) -> Self {
        Sampler {
            temperature: t,
            ..Self::greedy()
        }
    }

    pub fn top_k(self, k: u32) -> Self {
        Sampler { top_k: k, ..self }
    }
    pub fn top_p(self, p: f32) -> Self {
        Sampler { top_p: p, ..self }
    }
    pub fn min_p(self, p: f32) -> Self {
        Sampler { min_p: p, ..self }
    }
    pub fn seed(self, seed: u64) -> Self {
        Sampler { seed, ..self }
    }

    pub(crate) fn wit(&self) -> WitSampler {
        WitSampler {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
        }
    }
}
