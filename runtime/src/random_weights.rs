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
                match w.experts {
                    // One tensor per expert, in the canonical [out, in]
                    // layout (random values need no transposition).
                    Some(layout)
                        if name.contains("{e}") && !layout.transposed && !layout.interleaved =>
                    {
                        for e in 0..layout.count {
                            shapes.push((name.replace("{e}", &e.to_string()), shape.clone()));
                        }
                    }
                    Some(layout) => {
                        let mut stacked = vec![layout.count];
                        let mut one = shape.clone();
                        if layout.transposed && one.len() == 2 {
                            one.swap(0, 1);
                        }
                        stacked.extend(one);
                        shapes.push((name.clone(), stacked));
                    }
                    None => shapes.push((name.clone(), shape)),
                }
            }
        }
        // Generated on every core, each thread taking every n-th tensor.
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        let shapes = &shapes;
        let tensors = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    scope.spawn(move || {
                        shapes
                            .iter()
                            .enumerate()
                            .skip(t)
                            .step_by(threads)
                            .map(|(i, (name, shape))| {
                                let data =
                                    random_bf16(shape, seed.wrapping_add(i as u64 * 0x9e37_79b9));
                                (name.clone(), (shape.clone(), data))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("weight generation does not panic"))
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
