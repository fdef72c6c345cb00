use half::bf16;
use pie_kernels::matmul::{matmul_with, Path, WeightMatrix};
use std::time::Instant;
fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .take(4)
        .map(|s| s.parse().unwrap())
        .collect();
    let (m, k, n, threads) = (a[0], a[1], a[2], a[3]);
    let portable = std::env::args().nth(5).is_some();
    let path = if portable {
        Path::Portable
    } else {
        Path::detect()
    };
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32((i % 5) as f32 * 0.1))
        .collect();
    let mut out = vec![0f32; m * n];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let flops = 2.0 * (m * k * n) as f64;
    let reps = ((2e10 / flops) as usize).clamp(3, 100000);
    pool.install(|| {
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            matmul_with(path, &x, m, k, WeightMatrix::Bf16(&w), n, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "m={m} k={k} n={n} t={threads} {:?}: {:.1} GFLOP/s ({} reps)",
            path,
            flops / best / 1e9,
            reps
        );
    });
}
