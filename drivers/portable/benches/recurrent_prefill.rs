//! Prefill time of the recurrent scans, token-by-token form against the
//! chunked one, at real layer sizes: Gated DeltaNet as in Qwen3.5-9B (16
//! key heads, 32 value heads, head dim 128) and Mamba2 as in
//! Nemotron-H-8B (128 heads of 64, state 128, 8 groups). Inputs are random
//! but shaped like the ops' (unit q/k, β in (0, 1), negative log decays).
//! Only the scan is timed: the projections around it do not change.
//!
//! `cargo bench -p pie-driver-portable --bench recurrent_prefill`; set
//! `PIE_BENCH_JSON=PATH` to write the results as JSON, `PIE_BENCH_TOKENS=512,2048`
//! for other lengths, `PIE_BENCH_OPS=gdn` or `mamba2` for one op only,
//! `RAYON_NUM_THREADS` for the worker count.

use std::time::Instant;

use pie_driver_portable::{delta_rule, ssd, ChunkedScan};
use serde_json::json;

/// Chunk sizes of the chunked form to time.
const CHUNKS: [usize; 2] = [32, 64];

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

/// Median wall time of `reps` runs of `f`, in milliseconds.
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

/// Times one scan in every form: the recurrent one, then each chunk size.
fn forms(tokens: usize, mut run: impl FnMut(ChunkedScan)) -> serde_json::Value {
    let reps = if tokens <= 256 { 5 } else { 3 };
    let recurrent = time_ms(reps, || run(ChunkedScan::RECURRENT));
    let chunked: Vec<_> = CHUNKS
        .iter()
        .map(|&chunk| {
            let ms = time_ms(reps, || {
                run(ChunkedScan {
                    min_tokens: 1,
                    chunk,
                })
            });
            json!({ "chunk": chunk, "ms": round(ms), "speedup": round(recurrent / ms) })
        })
        .collect();
    eprintln!("  {tokens:5} tokens: recurrent {recurrent:9.2} ms, chunked {chunked:?}");
    json!({ "tokens": tokens, "recurrent_ms": round(recurrent), "chunked": chunked })
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn gated_delta_net(tokens: usize) -> serde_json::Value {
    let shape = delta_rule::Shape {
        key_heads: 16,
        value_heads: 32,
        dk: 128,
        dv: 128,
    };
    let mut rng = Rng(1);
    let mut qkv = rng.vec(tokens * shape.width());
    for row in qkv.chunks_exact_mut(shape.width()) {
        for head in row[..2 * shape.key_dim()].chunks_exact_mut(shape.dk) {
            let inv = 1.0 / head.iter().map(|v| v * v).sum::<f32>().sqrt();
            head.iter_mut().for_each(|v| *v *= inv);
        }
    }
    let gates: Vec<(f32, f32)> = (0..tokens * shape.value_heads)
        .map(|_| (0.5 + 0.5 * rng.uniform(), 0.5 * rng.uniform() - 0.5))
        .collect();
    let inputs = delta_rule::Inputs {
        qkv: &qkv,
        gates: &gates,
    };
    let mut out = vec![0f32; tokens * shape.value_dim()];
    forms(tokens, |scan| {
        let mut state = vec![0f32; shape.state_len()];
        delta_rule::run(&shape, &inputs, &mut state, &mut out, scan);
    })
}

fn mamba2(tokens: usize) -> serde_json::Value {
    let shape = ssd::Shape {
        heads: 128,
        head_dim: 64,
        state: 128,
        groups: 8,
    };
    let mut rng = Rng(2);
    let xbc = rng.vec(tokens * shape.width());
    let dt: Vec<f32> = (0..tokens * shape.heads)
        .map(|_| 0.05 * (1.0 + rng.uniform()))
        .collect();
    let a: Vec<f32> = (0..shape.heads).map(|h| -1.0 - h as f32 / 8.0).collect();
    let skip = rng.vec(shape.heads);
    let inputs = ssd::Inputs {
        xbc: &xbc,
        dt: &dt,
        a: &a,
        skip: &skip,
    };
    let mut out = vec![0f32; tokens * shape.inner()];
    forms(tokens, |scan| {
        let mut state = vec![0f32; shape.state_len()];
        ssd::run(&shape, &inputs, &mut state, &mut out, scan);
    })
}

fn main() {
    let tokens: Vec<usize> = std::env::var("PIE_BENCH_TOKENS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![8, 16, 32, 64, 512, 1024, 2048]);
    let ops = std::env::var("PIE_BENCH_OPS").unwrap_or_else(|_| "gdn,mamba2".into());
    let mut gdn = Vec::new();
    if ops.contains("gdn") {
        eprintln!("gated delta rule (Qwen3.5-9B: 16/32 heads, dk = dv = 128)");
        gdn = tokens.iter().map(|&t| gated_delta_net(t)).collect();
    }
    let mut mamba = Vec::new();
    if ops.contains("mamba2") {
        eprintln!("Mamba2 SSD (Nemotron-H-8B: 128 heads of 64, state 128, 8 groups)");
        mamba = tokens.iter().map(|&t| mamba2(t)).collect();
    }
    let report = json!({
        "benchmark": "recurrent scan prefill (drivers/portable/benches/recurrent_prefill.rs)",
        "command": "PIE_BENCH_JSON=PATH cargo bench -p pie-driver-portable --bench recurrent_prefill",
        "threads": rayon::current_num_threads(),
        "timing": "median wall time of 3 runs (5 at 256 tokens or fewer), from a zero state, one sequence",
        "gated_delta_net": { "shape": "key_heads 16, value_heads 32, dk 128, dv 128", "runs": gdn },
        "mamba2_ssd": { "shape": "heads 128, head_dim 64, state 128, groups 8", "runs": mamba },
    });
    if let Ok(path) = std::env::var("PIE_BENCH_JSON") {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap() + "\n")
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}
