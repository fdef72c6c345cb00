//! Random bf16 weights of exactly a config's shapes, for benchmarks: `pie
//! bench --config` measures speed without downloading a checkpoint.

use std::collections::HashMap;

use pie_driver::ir::Model;
use pie_driver::{DType, TensorView, WeightSource};

use crate::PieError;

/// Every weight of a lowered model as seeded random bf16 values: matrices
/// uniform in ±1/√in (activations stay in a sane range through the
/// layers), vectors (norm weights, biases) uniform in ±0.02. Only speed is
/// measured with them.
pub struct RandomWeights {
    tensors: HashMap<String, (Vec<usize>, Vec<u8>)>,
}

impl RandomWeights {
    pub fn for_model(model: &Model, seed: u64) -> Result<Self, PieError> {
        let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
        for node in model.nodes() {
            for w in &node.weights {
                let Some(name) = &w.name else { continue };
                if shapes.iter().any(|(n, _)| n == name) {
                    continue; // tied weights
                }
                let shape = w.shape.clone().ok_or_else(|| {
                    PieError::Input(format!(
                        "random weights need every weight's shape; `{name}` ({} op) leaves it to the file",
                        node.kind()
                    ))
                })?;
                if w.experts.is_some() {
                    return Err(PieError::Input(format!(
                        "random weights for expert tensors (`{name}`) are not implemented"
                    )));
                }
                shapes.push((name.clone(), shape));
            }
        }
        let tensors = std::thread::scope(|scope| {
            let handles: Vec<_> = shapes
                .into_iter()
                .enumerate()
                .map(|(i, (name, shape))| {
                    scope.spawn(move || {
                        let data = random_bf16(&shape, seed.wrapping_add(i as u64 * 0x9e37_79b9));
                        (name, (shape, data))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("weight generation does not panic"))
                .collect()
        });
        Ok(RandomWeights { tensors })
    }
}

fn random_bf16(shape: &[usize], seed: u64) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let (center, spread) = match shape {
        [_] => (0.0f32, 0.02f32),
        [.., cols] => (0.0, 1.0 / (*cols as f32).sqrt()),
        [] => (0.0, 0.0),
    };
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(n * 2);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        out.extend_from_slice(&half::bf16::from_f32(center + spread * u).to_le_bytes());
    }
    out
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, String> {
        let (shape, data) = self
            .tensors
            .get(name)
            .ok_or_else(|| format!("random weights: no tensor `{name}`"))?;
        Ok(TensorView {
            dtype: DType::BF16,
            shape,
            data,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
