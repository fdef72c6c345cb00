use super::*;
use proptest::prelude::*;

/// f64 reference on the exactly widened weights, plus Σ|x||w| per output:
/// f32 accumulation error scales with that sum, not with the result, so a
/// tolerance relative to the result would fail on cancellation.
fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut a) = (0f64, 0f64);
            for t in 0..k {
                let p = x[i * k + t] as f64 * w[j * k + t] as f64;
                s += p;
                a += p.abs();
            }
            out.push((s, a));
        }
    }
    out
}

/// Worst-case bound for a length-`k` f32 dot product is ≈ k·u·Σ|x||w|
/// (u = ε/2); allow twice that plus the 8-lane reduction.
fn tolerance(k: usize, abs_sum: f64) -> f64 {
    (k as f64 + 8.0) * f32::EPSILON as f64 * abs_sum
}

/// Deterministic values in [-1, 1) with a few exact zeros and wide
/// magnitudes, from a seed proptest can shrink.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            match s % 17 {
                0 => 0.0,
                1 => u * 64.0,
                _ => u,
            }
        })
        .collect()
}

struct Weights {
    f32: Vec<f32>,
    bf16: Vec<bf16>,
    f16: Vec<f16>,
}

impl Weights {
    fn new(len: usize, seed: u64) -> Self {
        let f32 = values(len, seed);
        let bf16 = f32.iter().map(|&v| bf16::from_f32(v)).collect();
        let f16 = f32.iter().map(|&v| f16::from_f32(v)).collect();
        Weights { f32, bf16, f16 }
    }

    /// Each dtype's matrix with its exact f32 value, for the reference.
    fn cases(&self) -> [(&'static str, WeightMatrix<'_>, Vec<f32>); 3] {
        [
            ("f32", WeightMatrix::F32(&self.f32), self.f32.clone()),
            (
                "bf16",
                WeightMatrix::Bf16(&self.bf16),
                self.bf16.iter().map(|v| v.to_f32()).collect(),
            ),
            (
                "f16",
                WeightMatrix::F16(&self.f16),
                self.f16.iter().map(|v| v.to_f32()).collect(),
            ),
        ]
    }
}

fn check_against_reference(m: usize, k: usize, n: usize, seed: u64) -> Result<(), TestCaseError> {
    let x = values(m * k, seed);
    let w = Weights::new(n * k, seed ^ 0x5555);
    for (name, matrix, exact) in w.cases() {
        let want = reference(&x, m, k, &exact, n);
        for path in Path::supported() {
            let mut out = vec![f32::NAN; m * n];
            matmul_with(path, &x, m, k, matrix, n, &mut out);
            for (idx, (o, &(r, a))) in out.iter().zip(&want).enumerate() {
                prop_assert!(
                    (*o as f64 - r).abs() <= tolerance(k, a),
                    "{name} {path:?} m={m} k={k} n={n} at ({}, {}): {o} vs {r} (Σ|xw| = {a})",
                    idx / n,
                    idx % n
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn matches_reference_for_every_dtype_and_path(
        m in 1usize..20, k in 1usize..300, n in 1usize..70, seed in any::<u64>()
    ) {
        check_against_reference(m, k, n, seed)?;
    }

    #[test]
    fn simd_and_portable_paths_agree(
        m in 1usize..20, k in 1usize..300, n in 1usize..70, seed in any::<u64>()
    ) {
        let paths = Path::supported();
        prop_assume!(paths.len() > 1);
        let x = values(m * k, seed);
        let w = Weights::new(n * k, seed ^ 0xaaaa);
        for (name, matrix, exact) in w.cases() {
            let want = reference(&x, m, k, &exact, n);
            let mut fast = vec![0f32; m * n];
            let mut slow = vec![0f32; m * n];
            matmul_with(paths[0], &x, m, k, matrix, n, &mut fast);
            matmul_with(Path::Portable, &x, m, k, matrix, n, &mut slow);
            for ((f, s), &(_, a)) in fast.iter().zip(&slow).zip(&want) {
                prop_assert!(
                    (f - s).abs() as f64 <= 2.0 * tolerance(k, a),
                    "{name} m={m} k={k} n={n}: {f} vs {s}"
                );
            }
        }
    }

    #[test]
    fn dot_matches_reference(len in 0usize..200, seed in any::<u64>()) {
        let a = values(len, seed);
        let b = values(len, seed ^ 7);
        let want = reference(&a, 1, len, &b, 1)[0];
        prop_assert!((dot(&a, &b) as f64 - want.0).abs() <= tolerance(len, want.1));
    }
}

/// Shapes large enough to take the threaded, k-blocked (k > 512) and
/// batch-split branches that the proptest ranges do not reach.
#[test]
fn large_shapes_match_reference() {
    let shapes = [
        (1, 1000, 333),
        (3, 777, 130),
        (37, 1000, 333),
        (9, 1100, 7),
        (300, 260, 20),
        (600, 70, 50),
    ];
    for (m, k, n) in shapes {
        check_against_reference(m, k, n, (m * k * n) as u64).unwrap();
    }
}

#[test]
fn degenerate_shapes() {
    for path in Path::supported() {
        let mut out: Vec<f32> = vec![];
        matmul_with(path, &[], 0, 4, WeightMatrix::F32(&[0.0; 8]), 2, &mut out);
        matmul_with(path, &[1.0; 4], 1, 4, WeightMatrix::F32(&[]), 0, &mut out);
        let mut out = vec![f32::NAN; 6];
        matmul_with(path, &[], 2, 0, WeightMatrix::Bf16(&[]), 3, &mut out);
        assert_eq!(out, [0.0; 6], "k = 0 is an empty sum");
    }
}

#[test]
#[should_panic(expected = "matmul: w has 5 elements, expected 2×3")]
fn wrong_weight_length_panics() {
    matmul(
        &[0.0; 3],
        1,
        3,
        WeightMatrix::F32(&[0.0; 5]),
        2,
        &mut [0.0; 2],
    );
}

#[test]
fn f16_widening_is_exact_for_every_value() {
    let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    for path in Path::supported() {
        let mut got = vec![0f32; all.len()];
        widen(path, &all, &mut got);
        for (h, g) in all.iter().zip(&got) {
            let want = h.to_f32();
            assert!(
                want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                "{path:?} {:#06x}: {g} vs {want}",
                h.to_bits()
            );
        }
    }
}

#[test]
fn bf16_widening_is_exact_for_every_value() {
    let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    for path in Path::supported() {
        let mut got = vec![0f32; all.len()];
        widen(path, &all, &mut got);
        for (h, g) in all.iter().zip(&got) {
            let want = h.to_f32();
            assert!(
                want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                "{path:?} {:#06x}: {g} vs {want}",
                h.to_bits()
            );
        }
    }
}

#[test]
fn gather_widens_selected_rows() {
    let k = 11; // not a multiple of 8: exercises the SIMD tail
    let w = Weights::new(5 * k, 3);
    let ids = [4u32, 0, 4, 2];
    for path in Path::supported() {
        for (name, table, exact) in w.cases() {
            let mut out = vec![f32::NAN; ids.len() * k];
            gather_rows_with(path, table, k, &ids, &mut out);
            for (row, &id) in out.chunks(k).zip(&ids) {
                let id = id as usize;
                assert_eq!(row, &exact[id * k..(id + 1) * k], "{name} {path:?}");
            }
        }
    }
}

#[test]
#[should_panic(expected = "gather_rows: id 3 is outside the table of 3 rows")]
fn gather_rejects_out_of_range_ids() {
    gather_rows(WeightMatrix::F32(&[0.0; 6]), 2, &[3], &mut [0.0; 2]);
}

/// Throughput on Llama-1B-sized projections. Run with
/// `cargo test -p pie-kernels --release -- --ignored --nocapture`.
///
/// Several copies of the weights rotate so batch 1 reads DRAM as a real
/// forward pass does (one copy would fit the 32 MiB L3 and flatter it).
#[test]
#[ignore]
fn bench_matmul() {
    use std::time::{Duration, Instant};
    let (k, n) = (2048, 8192);
    let copies = 4;
    let weights: Vec<Weights> = (0..copies).map(|s| Weights::new(n * k, s as u64)).collect();
    let pools = [1, 2].map(|t| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    });
    for (dtype, bytes) in [("bf16", 2), ("f16", 2), ("f32", 4)] {
        for m in [1usize, 4, 128] {
            let x = values(m * k, 9);
            let mut out = vec![0f32; m * n];
            for path in Path::supported() {
                if path == Path::Portable && dtype != "bf16" {
                    continue;
                }
                for (threads, pool) in [1, 2].iter().zip(&pools) {
                    let mut best = Duration::MAX;
                    let reps = if m == 128 { 3 } else { 12 };
                    pool.install(|| {
                        for rep in 0..reps {
                            let w = &weights[rep % copies];
                            let matrix = match dtype {
                                "bf16" => WeightMatrix::Bf16(&w.bf16),
                                "f16" => WeightMatrix::F16(&w.f16),
                                _ => WeightMatrix::F32(&w.f32),
                            };
                            let t = Instant::now();
                            matmul_with(path, &x, m, k, matrix, n, &mut out);
                            best = best.min(t.elapsed());
                        }
                    });
                    let s = best.as_secs_f64();
                    println!(
                        "{dtype:>4} {path:<8?} m={m:<3} k={k} n={n} threads={threads}: \
                         {:7.2} ms  {:6.1} GFLOP/s  {:5.1} GB/s of weights",
                        s * 1e3,
                        2.0 * (m * k * n) as f64 / s / 1e9,
                        (n * k * bytes) as f64 / s / 1e9,
                    );
                }
            }
        }
    }
}
