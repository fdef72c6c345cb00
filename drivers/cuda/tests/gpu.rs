//! The CUDA driver against Hugging Face transformers (the fixtures of
//! `tests/fixtures/`, references computed by transformers) and against the
//! portable driver. The GPU tests are `#[ignore]`d: run them on a machine
//! with an NVIDIA GPU with `cargo test -p pie-driver-cuda --release --
//! --ignored` (or the prebuilt test binary with `--ignored`).

use std::path::{Path, PathBuf};

use pie_driver_cuda::CudaDriver;
use pie_driver_portable::PortableDriver;
use pie_runtime::sampling::Sampler;
use pie_runtime::{Engine, LoadOptions};

/// Architectures whose ops the CUDA driver runs.
const FIXTURES: [&str; 26] = [
    "llama",
    "llama3_rope",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "gemma2",
    "olmo2",
    "olmo3",
    "phi3",
    "mistral3",
    "mixtral",
    "qwen3_moe",
    "gpt_oss",
    "phi3_longrope",
    "qwen3_5",
    "qwen3_5_moe",
    "nemotron_h",
    "deepseek_v2",
    "deepseek_v3",
    "glm_moe_dsa",
    "glm_moe_dsa_sparse",
    "qwen3_next",
    "phimoe",
    "kimi_k2",
    "gemma3n",
];

/// f32 weights: max|diff| ≤ 1e-3 · max|ref| on every position's logits.
const F32_TOL: f32 = 1e-3;
/// bf16 weights (and bf16 GEMM inputs) against the f32 reference.
const BF16_TOL: f32 = 3e-2;

struct Prompt {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    /// transformers' generate() agreed with full forwards (not so for
    /// Phi-3 LongRoPE crossing its original context).
    cache_consistent: bool,
}

fn fixture(name: &str) -> (PathBuf, Vec<Prompt>) {
    // PIE_FIXTURES: where the fixtures are when this test binary runs on
    // another machine than the one that built it.
    let root = std::env::var_os("PIE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"));
    let dir = root.join(name);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let prompts = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Prompt {
            ids: serde_json::from_value(p["ids"].clone()).unwrap(),
            logits: serde_json::from_value(p["logits"].clone()).unwrap(),
            greedy: serde_json::from_value(p["greedy"].clone()).unwrap(),
            cache_consistent: p["cache_consistent"].as_bool().unwrap_or(true),
        })
        .collect();
    (dir, prompts)
}

fn max_error(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> (f32, f32) {
    let (mut diff, mut scale) = (0f32, 0f32);
    for (a, b) in ours.iter().zip(reference) {
        for (x, y) in a.iter().zip(b) {
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    (diff, scale)
}

fn gpu() -> CudaDriver {
    CudaDriver::new().unwrap_or_else(|e| panic!("this test needs a GPU: {e}"))
}

/// An activation `[rows, width]` holding `bytes` (f32 or bf16 values, row
/// by row): uploaded as an embedding table and gathered.
fn activation(
    d: &CudaDriver,
    dtype: pie_driver::DType,
    bytes: &[u8],
    rows: usize,
    width: usize,
) -> pie_driver_cuda::CudaAct {
    use pie_driver::ir::EmbeddingAttrs;
    use pie_driver::{Driver, ForwardBatch, TensorView, WeightRole};
    let view = TensorView {
        dtype,
        shape: &[rows, width],
        data: bytes,
    };
    let table = d
        .load_weight("activation", &view, &[rows, width], WeightRole::Matrix)
        .unwrap();
    let batch = ForwardBatch::new(vec![((0..rows as u32).collect(), 0, vec![])]);
    let attrs = EmbeddingAttrs {
        vocab: rows,
        hidden: width,
    };
    d.embedding(&table, &batch, &attrs).unwrap()
}

/// Without a GPU the driver says what is missing; it never panics.
#[test]
fn cuda_driver_reports_what_is_missing() {
    match CudaDriver::new() {
        Ok(d) => eprintln!("GPU found: {}", d.gpu_name()),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(
                msg.contains("no CUDA driver found")
                    || msg.contains("NVRTC")
                    || msg.contains("CUDA:"),
                "{msg}"
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_parity_with_transformers_and_the_portable_driver() {
    for name in FIXTURES {
        let (dir, prompts) = fixture(name);
        let opts = LoadOptions::default();
        let mut engine =
            Engine::load(&dir, gpu(), &opts, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        engine.stop_ids.clear();
        let inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let logits = engine.prompt_logits(&inputs).unwrap();
        for (i, (ours, p)) in logits.iter().zip(&prompts).enumerate() {
            let (diff, scale) = max_error(ours, &p.logits);
            eprintln!(
                "gpu {name} prompt {i}: max|diff| {diff:.3e}, max|ref| {scale:.3}, ratio {:.3e}",
                diff / scale
            );
            assert!(
                diff <= F32_TOL * scale,
                "{name} prompt {i}: {diff} > {F32_TOL} × {scale}"
            );
        }
        // 10 greedy tokens as transformers generated them, batched and alone.
        let greedy = engine.generate(&inputs, 10, &Sampler::greedy()).unwrap();
        for (i, (ours, p)) in greedy.iter().zip(&prompts).enumerate() {
            if !p.cache_consistent {
                continue;
            }
            assert_eq!(ours, &p.greedy, "{name} prompt {i}: batched greedy");
            let alone = engine
                .generate(std::slice::from_ref(&p.ids), 10, &Sampler::greedy())
                .unwrap();
            assert_eq!(alone[0], p.greedy, "{name} prompt {i}: greedy alone");
        }
        // 32 greedy tokens: the GPU in a mixed batch and alone against the
        // portable driver (itself checked against transformers).
        let mut cpu = Engine::load(&dir, PortableDriver::new(), &opts, None).unwrap();
        cpu.stop_ids.clear();
        let want = cpu.generate(&inputs, 32, &Sampler::greedy()).unwrap();
        let got = engine.generate(&inputs, 32, &Sampler::greedy()).unwrap();
        assert_eq!(got, want, "{name}: 32 greedy tokens in a mixed batch");
        for (p, w) in inputs.iter().zip(&want) {
            let alone = engine
                .generate(std::slice::from_ref(p), 32, &Sampler::greedy())
                .unwrap();
            assert_eq!(&alone[0], w, "{name}: 32 greedy tokens alone");
        }
        eprintln!(
            "gpu {name}: 10 tokens = transformers, 32 tokens = portable (mixed batch and alone)"
        );
    }
}

/// Greedy generation queues step n + 1 on the ids of step n still on the
/// GPU (`fed_tokens`): with a stop token that ends some sequences of a
/// batch while a step is queued, every sequence ends as on the portable
/// driver, through CUDA graphs and op by op.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_queued_greedy_steps_stop_like_the_portable_driver() {
    use pie_driver::Driver;
    let (dir, prompts) = fixture("qwen3");
    let inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let opts = LoadOptions::default();
    let mut cpu = Engine::load(&dir, PortableDriver::new(), &opts, None).unwrap();
    cpu.stop_ids.clear();
    let full = cpu.generate(&inputs, 24, &Sampler::greedy()).unwrap();
    // Every token some sequence makes after its third: most end a
    // sequence while the others go on.
    let mut stops: Vec<u32> = full.iter().flat_map(|s| s[3..].iter().copied()).collect();
    stops.sort_unstable();
    stops.dedup();
    for graphs in [true, false] {
        let mut engine = Engine::load(&dir, gpu().with_graphs(graphs), &opts, None).unwrap();
        assert!(engine.driver.feeds_tokens());
        for &stop in stops.iter().take(6) {
            engine.stop_ids = vec![stop];
            cpu.stop_ids = vec![stop];
            let want = cpu.generate(&inputs, 24, &Sampler::greedy()).unwrap();
            let got = engine.generate(&inputs, 24, &Sampler::greedy()).unwrap();
            assert_eq!(got, want, "stop token {stop}, graphs {graphs}");
        }
    }
    eprintln!(
        "gpu queued greedy steps: {} stop tokens, graphs on and off",
        stops.len().min(6)
    );
}

/// GLM-MoE-DSA's sparse indexer past its top-k (5, under prompts of 12
/// and 7 tokens; layer 1 reuses layer 0's picks): logits, a 3-token
/// chunked prefill and 10 greedy tokens (batched and alone) as
/// transformers, with pages larger and smaller than the prompts.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_glm_moe_dsa_sparse_indexer() {
    let name = "glm_moe_dsa_sparse";
    let (dir, prompts) = fixture(name);
    let inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    for page_size in [32, 4] {
        let opts = LoadOptions {
            page_size,
            ..LoadOptions::default()
        };
        let mut engine = Engine::load(&dir, gpu(), &opts, None).unwrap();
        engine.stop_ids.clear();
        let logits = engine.prompt_logits(&inputs).unwrap();
        for (i, (ours, p)) in logits.iter().zip(&prompts).enumerate() {
            let (diff, scale) = max_error(ours, &p.logits);
            eprintln!(
                "gpu {name} pages of {page_size}, prompt {i}: max|diff| {diff:.3e}, max|ref| {scale:.3}"
            );
            assert!(
                diff <= F32_TOL * scale,
                "prompt {i}: {diff} > {F32_TOL} × {scale}"
            );
        }
        let chunked = engine.prompt_logits_chunked(&prompts[0].ids, 3).unwrap();
        let (diff, scale) = max_error(&chunked, &prompts[0].logits);
        assert!(
            diff <= F32_TOL * scale,
            "chunked prefill: {diff} > {F32_TOL} × {scale}"
        );
        let greedy = engine.generate(&inputs, 10, &Sampler::greedy()).unwrap();
        for (i, (ours, p)) in greedy.iter().zip(&prompts).enumerate() {
            assert_eq!(ours, &p.greedy, "prompt {i}: batched greedy");
            let alone = engine
                .generate(std::slice::from_ref(&p.ids), 10, &Sampler::greedy())
                .unwrap();
            assert_eq!(alone[0], p.greedy, "prompt {i}: greedy alone");
        }
    }
}

/// Decode replayed from CUDA graphs gives the tokens op-by-op decode
/// gives, for batches that fill a bucket and batches padded up to one,
/// and the graphs are really replayed; with the greedy argmax inside the
/// fed graphs (the default) and launched after them.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_graph_decode_matches_op_by_op_decode() {
    for name in [
        "llama",
        "qwen3",
        "gemma2",
        "mistral",
        "phi3_longrope",
        "gemma3n",
    ] {
        let (dir, prompts) = fixture(name);
        let opts = LoadOptions::default();
        let load = |graphs: bool, graph_argmax: bool| {
            let driver = gpu().with_graphs(graphs).with_graph_argmax(graph_argmax);
            let mut e = Engine::load(&dir, driver, &opts, None).unwrap();
            e.stop_ids.clear();
            e
        };
        let mut eager = load(false, true);
        let (mut graphed, mut launched) = (load(true, true), load(true, false));
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        for n in 1..=5 {
            // n prompts: buckets 1, 2, 4, 4, 8 (the last three padded).
            let inputs: Vec<Vec<u32>> = ids.iter().cycle().take(n).cloned().collect();
            let want = eager.generate(&inputs, 24, &Sampler::greedy()).unwrap();
            let got = graphed.generate(&inputs, 24, &Sampler::greedy()).unwrap();
            assert_eq!(got, want, "{name}: {n} sequences");
            let got = launched.generate(&inputs, 24, &Sampler::greedy()).unwrap();
            assert_eq!(got, want, "{name}: {n} sequences, argmax after the graph");
        }
        let replays = graphed.driver.graph_replays();
        assert!(replays >= 5 * 20, "{name}: only {replays} graph replays");
        assert_eq!(eager.driver.graph_replays(), 0);
        // Every step but the first of each generation is fed; all but the
        // first two passes of each bucket replay a fed graph.
        let tails = graphed.driver.graph_argmaxes();
        assert!(
            tails >= 5 * 18,
            "{name}: only {tails} argmaxes inside graphs"
        );
        assert_eq!(launched.driver.graph_argmaxes(), 0);
        assert_eq!(eager.driver.graph_argmaxes(), 0);
        eprintln!("gpu {name}: graph decode = op-by-op decode ({replays} replays, {tails} in-graph argmaxes)");
    }
}

/// The grouped attention kernels (query heads of a group share their
/// key/value reads, keys split across warps) against the per-head kernel,
/// over contexts long enough for every split to see several keys, with
/// sliding windows, soft-capping and sinks among the fixtures.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_grouped_attention_matches_the_per_head_kernel() {
    for name in ["llama", "qwen3", "mistral", "gemma2", "gpt_oss", "phi3"] {
        let (dir, prompts) = fixture(name);
        let opts = LoadOptions::default();
        let load = |grouped: bool| {
            let d = gpu().with_grouped_attention(grouped);
            Engine::load(&dir, d, &opts, None).unwrap()
        };
        let (mut grouped, mut per_head) = (load(true), load(false));
        let vocab = grouped.ir.vocab as u32;
        // A 300-token prompt built from the fixture's ids, and the fixture
        // prompts beside it in one ragged batch.
        let long: Vec<u32> = prompts[0]
            .ids
            .iter()
            .cycle()
            .take(300)
            .map(|&t| t % vocab)
            .collect();
        let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        inputs.push(long);
        let want = per_head.prompt_logits(&inputs).unwrap();
        let got = grouped.prompt_logits(&inputs).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let (diff, scale) = max_error(g, w);
            eprintln!(
                "gpu {name} prompt {i}: grouped vs per-head max|diff| {diff:.3e} of {scale:.3}"
            );
            assert!(diff <= 1e-4 * scale, "{name} prompt {i}: {diff} vs {scale}");
        }
    }
}

/// A bf16 KV cache (`kv_cache_dtype bf16`): logits against transformers
/// within the bf16 tolerance and against the portable driver's bf16 cache
/// (same rounding) closely; decode through graphs works; a model whose
/// cache the grouped kernels cannot read (MLA's 576-wide latent) is refused
/// with a message naming the limit.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_bf16_kv_cache() {
    use pie_driver::KvDType;
    let opts = LoadOptions {
        kv_cache_dtype: KvDType::Bf16,
        ..LoadOptions::default()
    };
    for name in ["llama", "qwen3", "mistral", "gemma2", "gpt_oss", "gemma3n"] {
        let (dir, prompts) = fixture(name);
        let mut gpu_engine = Engine::load(&dir, gpu(), &opts, None).unwrap();
        let mut cpu = Engine::load(&dir, PortableDriver::new(), &opts, None).unwrap();
        let inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let ours = gpu_engine.prompt_logits(&inputs).unwrap();
        let portable = cpu.prompt_logits(&inputs).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let (diff, scale) = max_error(&ours[i], &p.logits);
            let (vs_cpu, _) = max_error(&ours[i], &portable[i]);
            eprintln!(
                "gpu bf16 kv {name} prompt {i}: vs transformers {:.3e}, vs portable bf16 kv {:.3e} (of max|ref|)",
                diff / scale,
                vs_cpu / scale
            );
            assert!(
                diff <= BF16_TOL * scale,
                "{name} prompt {i}: {diff} vs {scale}"
            );
            assert!(
                vs_cpu <= 1e-3 * scale,
                "{name} prompt {i}: {vs_cpu} vs portable"
            );
        }
        gpu_engine.stop_ids.clear();
        cpu.stop_ids.clear();
        let got = gpu_engine
            .generate(&inputs, 16, &Sampler::greedy())
            .unwrap();
        let want = cpu.generate(&inputs, 16, &Sampler::greedy()).unwrap();
        let same: usize = got
            .iter()
            .zip(&want)
            .map(|(g, w)| g.iter().zip(w).take_while(|(a, b)| a == b).count())
            .sum();
        eprintln!(
            "gpu bf16 kv {name}: {same} of {} greedy tokens as the portable bf16 cache",
            16 * inputs.len()
        );
        // gpt_oss's MoE routes on the host: its decode is not recorded.
        if name != "gpt_oss" {
            assert!(
                gpu_engine.driver.graph_replays() > 0,
                "{name}: no graph replays"
            );
        }
    }
    let (dir, _) = fixture("deepseek_v3");
    let err = Engine::load(&dir, gpu(), &opts, None)
        .and_then(|mut e| e.prompt_logits(&[vec![1, 2, 3]]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("kv_cache_dtype bf16"), "deepseek_v3: {err}");
}

/// The own decode kernel (`pie_gemv_bf16`, up to 4 rows) against cuBLAS
/// on the same bf16 weights, for shapes with partial feature blocks.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_gemv_matches_cublas() {
    use pie_driver::ir::LinearAttrs;
    use pie_driver::{DType, Driver, TensorView, WeightRole};
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    };
    let (own, blas) = (gpu(), gpu().with_gemv(false));
    for (m, n, k) in [
        (1, 1024, 1024),
        (2, 3070, 1024),
        (3, 1026, 3072),
        (4, 151, 4096),
    ] {
        let x = random(m * k);
        let w_bits: Vec<u8> = random(n * k)
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let x_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let run = |d: &CudaDriver| -> Vec<f32> {
            let xa = activation(d, DType::F32, &x_bytes, m, k);
            let w = TensorView {
                dtype: DType::BF16,
                shape: &[n, k],
                data: &w_bits,
            };
            let w = d.load_weight("w", &w, &[n, k], WeightRole::Matrix).unwrap();
            let a = LinearAttrs {
                in_features: k,
                out_features: n,
            };
            let out = d.linear(&xa, &w, None, &a).unwrap();
            d.read_rows(&out, &(0..m).collect::<Vec<_>>()).unwrap()
        };
        let (ours, reference) = (run(&own), run(&blas));
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = ours
            .iter()
            .zip(&reference)
            .fold(0f32, |a, (o, r)| a.max((o - r).abs()));
        eprintln!("gemv [{m}, {k}] x [{n}, {k}]: max|diff| {diff:.3e} of max {scale:.3}");
        // cuBLAS rounds x to bf16 first; the own kernel keeps it f32.
        assert!(
            diff <= 1e-2 * scale,
            "[{m}, {k}] x [{n}, {k}]: {diff} vs {scale}"
        );
    }
    // For the record (not a timed assertion): weight-read rate at batch 1
    // on Qwen3-8B's MLP shapes.
    for (n, k) in [(12288, 4096), (4096, 12288)] {
        let bits = vec![0u8; n * k * 2];
        let w = TensorView {
            dtype: DType::BF16,
            shape: &[n, k],
            data: &bits,
        };
        let w = own
            .load_weight("w", &w, &[n, k], WeightRole::Matrix)
            .unwrap();
        let xa = activation(&own, DType::F32, &vec![0u8; k * 4], 1, k);
        let a = LinearAttrs {
            in_features: k,
            out_features: n,
        };
        own.synchronize().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..50 {
            own.linear(&xa, &w, None, &a).unwrap();
        }
        own.synchronize().unwrap();
        let s = start.elapsed().as_secs_f64() / 50.0;
        eprintln!(
            "gemv [1, {k}] x [{n}, {k}]: {:.1} us, {:.0} GB/s of weights",
            s * 1e6,
            (n * k * 2) as f64 / s / 1e9
        );
    }
}

/// Decode-sized GEMMs through the cuBLASLt algorithm that won their
/// timing (`gemm_tuning.rs`; here the fastest candidate is taken even
/// where `GemmEx` is faster) against `GemmEx`: products and products
/// added into a residual agree up to summation order, and the tuned
/// driver ran cuBLASLt.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_tuned_gemms_match_gemm_ex() {
    use pie_driver::ir::{ElementwiseAttrs, LinearAttrs};
    use pie_driver::{DType, Driver, TensorView, WeightRole};
    let plain = gpu().with_gemm_tuning(false).unwrap();
    let tuned = gpu().with_gemm_tuning_preferring_lt().unwrap();
    for (m, n, k) in [(8, 1024, 512), (64, 4096, 1024), (64, 1536, 4096)] {
        let x_bytes = random_bytes(m * k, 1, true);
        let w_bits = random_bytes(n * k, 2, false);
        let r_bytes = random_bytes(m * n, 3, true);
        let run = |d: &CudaDriver, add: bool| -> Vec<f32> {
            let x = activation(d, DType::F32, &x_bytes, m, k);
            let view = TensorView {
                dtype: DType::BF16,
                shape: &[n, k],
                data: &w_bits,
            };
            let w = d
                .load_weight("w", &view, &[n, k], WeightRole::Matrix)
                .unwrap();
            let a = LinearAttrs {
                in_features: k,
                out_features: n,
            };
            let out = if add {
                let residual = activation(d, DType::F32, &r_bytes, m, n);
                d.linear_add(&x, &w, None, &a, residual, &ElementwiseAttrs { width: n })
                    .unwrap()
            } else {
                d.linear(&x, &w, None, &a).unwrap()
            };
            d.read_rows(&out, &(0..m).collect::<Vec<_>>()).unwrap()
        };
        for add in [false, true] {
            let label = format!("tuned GEMM [{m}, {k}] x [{n}, {k}]ᵀ (residual added: {add})");
            let (got, want) = (run(&tuned, add), run(&plain, add));
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            eprintln!("{label}: max|diff| {diff:.3e} of {scale:.3}");
            assert!(diff <= 1e-4 * scale, "{label}: {diff} of {scale}");
        }
    }
    assert_eq!(plain.tuned_gemms(), 0);
    assert_eq!(tuned.tuned_gemms(), 6, "every shape runs cuBLASLt");
}

/// `n` pseudo-random values in [-1, 1] (xorshift from `salt`), as bf16 or
/// f32 little-endian bytes.
fn random_bytes(n: usize, salt: u64, f32s: bool) -> Vec<u8> {
    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ salt;
    (0..n)
        .flat_map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let v = (seed % 2001) as f32 / 1000.0 - 1.0;
            if f32s {
                v.to_le_bytes().to_vec()
            } else {
                half::bf16::from_f32(v).to_le_bytes().to_vec()
            }
        })
        .collect()
}

/// Attributes of products of `k` inputs into each of `widths` features.
fn linear_attrs(k: usize, widths: &[usize]) -> Vec<pie_driver::ir::LinearAttrs> {
    widths
        .iter()
        .map(|&n| pie_driver::ir::LinearAttrs {
            in_features: k,
            out_features: n,
        })
        .collect()
}

/// Asserts `got` within 1e-5 of the largest |want| of `want` (the same
/// sums in another order), printing the difference under `label`.
fn assert_close(label: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
    eprintln!("{label}: max|diff| {diff:.3e} of {scale:.3}");
    assert!(diff <= 1e-5 * scale, "{label}: {diff} of {scale}");
}

/// q/k/v and gate/up loaded together (one allocation) and multiplied as
/// one GEMM past the GEMV's rows must give what each product gives alone.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_joined_weights_multiply_as_one() {
    use pie_driver::ir::{ActivationFn, GluAttrs};
    use pie_driver::{DType, Driver, TensorView, WeightPart, WeightRole};
    use pie_driver_cuda::CudaWeight;
    let random = |n: usize, salt: u64| random_bytes(n, salt, false);
    let d = gpu();
    let k = 256;
    let widths = [512usize, 128, 128];
    // Distinct weights per part (a seed each), so a misplaced split shows.
    let bits: Vec<Vec<u8>> = widths
        .iter()
        .zip(1u64..)
        .map(|(&n, seed)| random(n * k, seed))
        .collect();
    let shapes: Vec<[usize; 2]> = widths.iter().map(|&n| [n, k]).collect();
    let parts: Vec<WeightPart<'_>> = bits
        .iter()
        .zip(&shapes)
        .map(|(b, s)| WeightPart {
            name: "w",
            view: TensorView {
                dtype: DType::BF16,
                shape: s,
                data: b,
            },
            expected: s,
        })
        .collect();
    let joined = d.load_weights_together(&parts).unwrap();
    let alone: Vec<CudaWeight> = parts
        .iter()
        .map(|p| {
            d.load_weight("w", &p.view, p.expected, WeightRole::Matrix)
                .unwrap()
        })
        .collect();
    let side_by_side = |w: &[CudaWeight]| match (&w[0], &w[1], &w[2]) {
        (CudaWeight::Bf16(a), CudaWeight::Bf16(b), CudaWeight::Bf16(c)) => {
            a.followed_by(b) && b.followed_by(c)
        }
        _ => false,
    };
    assert!(
        side_by_side(&joined),
        "loaded together but not side by side"
    );
    assert!(!side_by_side(&alone));
    let attrs = linear_attrs(k, &widths);
    let glu = GluAttrs {
        func: ActivationFn::Silu,
        width: 128,
        limit: None,
    };
    for m in [3usize, 8, 64] {
        let x = activation(&d, DType::BF16, &random(m * k, 100 + m as u64), m, k);
        let rows: Vec<usize> = (0..m).collect();
        let read = |a: &_| d.read_rows(a, &rows).unwrap();
        let close = |what: &str, got: &[f32], want: &[f32]| {
            assert_close(&format!("joined {what} at {m} rows"), got, want)
        };
        let ws: Vec<&CudaWeight> = joined.iter().collect();
        let many = d
            .linear_many(&x, &ws, &[None; 3], &attrs.iter().collect::<Vec<_>>())
            .unwrap();
        for (i, out) in many.iter().enumerate() {
            let one = d.linear(&x, &alone[i], None, &attrs[i]).unwrap();
            close(&format!("product {i}"), &read(out), &read(&one));
        }
        let gate_up = (&joined[1], None, &attrs[1]);
        let up = (&joined[2], None, &attrs[2]);
        let fused = d.gated_linear(&x, gate_up, up, &glu).unwrap();
        let g = d.linear(&x, &alone[1], None, &attrs[1]).unwrap();
        let u = d.linear(&x, &alone[2], None, &attrs[2]).unwrap();
        close(
            "gate/up",
            &read(&fused),
            &read(&d.glu(&g, &u, &glu).unwrap()),
        );
    }
}

/// A layer's norms folded into the GEMVs after them (`norm_linear_many`:
/// input norm and q/k/v; `add_norm_gated_linear`: residual add,
/// post-attention norm and gate/up; `add_norm_mlp`: that and the down
/// projection, one launch at one row) must give what the ops give one by
/// one, at the GEMV's row counts and past them (where the driver runs the
/// ops), with and without a norm weight and with Gemma's offset.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_norms_folded_into_products_match_the_ops() {
    use pie_driver::ir::{ActivationFn, ElementwiseAttrs, GluAttrs, LinearAttrs, RmsNormAttrs};
    use pie_driver::{unfused, DType, Driver, TensorView, WeightRole};
    let random = random_bytes;
    let d = gpu().with_mlp_fold(true);
    let k = 1024;
    let widths = [512usize, 256, 256];
    let matrix = |n: usize, salt: u64| {
        let bits = random(n * k, salt, false);
        let view = TensorView {
            dtype: DType::BF16,
            shape: &[n, k],
            data: &bits,
        };
        d.load_weight("w", &view, &[n, k], WeightRole::Matrix)
            .unwrap()
    };
    let ws: Vec<_> = widths
        .iter()
        .zip(1u64..)
        .map(|(&n, s)| matrix(n, s))
        .collect();
    let attrs = linear_attrs(k, &widths);
    let attr_refs: Vec<&LinearAttrs> = attrs.iter().collect();
    let w_refs: Vec<_> = ws.iter().collect();
    let gain_bits = random(k, 7, true);
    let gain = d
        .load_weight(
            "g",
            &TensorView {
                dtype: DType::F32,
                shape: &[k],
                data: &gain_bits,
            },
            &[k],
            WeightRole::Vector,
        )
        .unwrap();
    let glu = GluAttrs {
        func: ActivationFn::Silu,
        width: 256,
        limit: None,
    };
    // The down projection [k, 256] of the GLU's 256 features.
    let down_bits = random(k * 256, 9, false);
    let down_w = d
        .load_weight(
            "down",
            &TensorView {
                dtype: DType::BF16,
                shape: &[k, 256],
                data: &down_bits,
            },
            &[k, 256],
            WeightRole::Matrix,
        )
        .unwrap();
    let add = ElementwiseAttrs { width: k };
    for (m, offset, weighted) in [
        (1usize, 0.0f32, true),
        (3, 1.0, true),
        (4, 0.0, false),
        (8, 0.0, true),
    ] {
        let norm = RmsNormAttrs {
            width: k,
            group: k,
            eps: 1e-6,
            offset,
        };
        let g = weighted.then_some(&gain);
        let x = activation(&d, DType::F32, &random(m * k, 100 + m as u64, true), m, k);
        let y = activation(&d, DType::F32, &random(m * k, 200 + m as u64, true), m, k);
        let rows: Vec<usize> = (0..m).collect();
        let read = |a: &_| d.read_rows(a, &rows).unwrap();
        let close = |what: &str, got: &[f32], want: &[f32]| {
            assert_close(&format!("folded norm, {what} at {m} rows"), got, want)
        };
        let fused = d
            .norm_linear_many(&x, (g, &norm), &w_refs, &[None; 3], &attr_refs)
            .unwrap();
        let ops =
            unfused::norm_linear_many(&d, &x, (g, &norm), &w_refs, &[None; 3], &attr_refs).unwrap();
        for (i, (a, b)) in fused.iter().zip(&ops).enumerate() {
            close(&format!("product {i}"), &read(a), &read(b));
        }
        let gate = (&ws[1], None, &attrs[1]);
        let up = (&ws[2], None, &attrs[2]);
        let (sum, out) = d
            .add_norm_gated_linear(&x, &y, &add, (g, &norm), gate, up, &glu)
            .unwrap();
        let (sum_ops, out_ops) =
            unfused::add_norm_gated_linear(&d, &x, &y, &add, (g, &norm), gate, up, &glu).unwrap();
        close("residual sum", &read(&sum), &read(&sum_ops));
        close("gate/up", &read(&out), &read(&out_ops));
        // The whole MLP half (one launch at one row) against its two
        // calls; y is moved in, so each side gets its own copy.
        let y_copy = || activation(&d, DType::F32, &random(m * k, 200 + m as u64, true), m, k);
        let down_attrs = linear_attrs(256, &[k]);
        let down = (&down_w, None, &down_attrs[0]);
        let mlp_ops = unfused::add_norm_mlp(
            &d,
            &x,
            y_copy(),
            &add,
            (g, &norm),
            gate,
            up,
            &glu,
            down,
            &add,
        )
        .unwrap();
        // Both forms of the one-launch kernel: down matrix transposed
        // (the default), and as stored.
        for transposed in [true, false] {
            d.set_mlp_fold_transposed(transposed);
            let folds = d.mlp_folds();
            let mlp = d
                .add_norm_mlp(&x, y_copy(), &add, (g, &norm), gate, up, &glu, down, &add)
                .unwrap();
            let folded = d.mlp_folds() - folds;
            assert_eq!(
                folded,
                u64::from(m == 1),
                "MLP folds at {m} rows (transposed: {transposed})"
            );
            close(
                &format!("MLP half (transposed: {transposed})"),
                &read(&mlp),
                &read(&mlp_ops),
            );
        }
        d.set_mlp_fold_transposed(true);
    }
}

/// Greedy sampling over a vocabulary as large as Qwen3's (each row split
/// over many blocks): the first index of the maximum and
/// -log Σ exp(x - max), as computed on the host.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_greedy_rows_over_a_large_vocabulary() {
    use pie_driver::{DType, Driver};
    let d = gpu();
    let (rows, width) = (3usize, 151_936usize);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut values: Vec<f32> = (0..rows * width)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 8001) as f32 / 1000.0 - 4.0
        })
        .collect();
    // Row 0: a tie between two slices (the first wins); row 1: the maximum
    // in the first slice; row 2: every logit equal.
    values[100_000] = 7.5;
    values[140_000] = 7.5;
    values[width + 5] = 9.0;
    values[2 * width..].fill(0.25);
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let logits = activation(&d, DType::F32, &bytes, rows, width);
    let picked = [2usize, 0, 1];
    let got = d.greedy_rows(&logits, &picked).unwrap();
    for (&r, (token, logprob)) in picked.iter().zip(got) {
        let row = &values[r * width..(r + 1) * width];
        let want = pie_driver::argmax(row);
        let want_logprob = row[want as usize] - pie_driver::math::log_sum_exp(row);
        eprintln!("greedy row {r}: {token} ({logprob}) vs {want} ({want_logprob})");
        assert_eq!(token, want, "row {r}");
        assert!(
            (logprob - want_logprob).abs() < 1e-4,
            "row {r}: {logprob} vs {want_logprob}"
        );
    }
    assert_eq!(d.argmax_rows(&logits, &[0]).unwrap(), vec![100_000]);
}

/// A bf16 copy of f32 fixture `name` (configs and every tensor, one
/// safetensors file) in a temporary directory.
fn bf16_copy(name: &str) -> (tempfile::TempDir, Vec<Prompt>) {
    let (dir, prompts) = fixture(name);
    let out = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if file.ends_with(".json") && !file.contains("index") {
            std::fs::copy(&path, out.path().join(&file)).unwrap();
        }
    }
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (tname, view) in st.tensors() {
            let data = view
                .data()
                .chunks_exact(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            tensors.push((tname, view.shape().to_vec(), data));
        }
    }
    write_bf16_safetensors(out.path(), &tensors);
    (out, prompts)
}

/// `model.safetensors` in `dir` holding `(name, shape, bf16 bytes)` tensors.
fn write_bf16_safetensors(dir: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.as_str(),
                TensorView::new(Dtype::BF16, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
}

/// bf16 copies of f32 fixtures: the bf16 GEMM path.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_bf16_weights_against_the_f32_reference() {
    for name in ["llama", "qwen3"] {
        let (dir, prompts) = bf16_copy(name);
        let mut engine = Engine::load(dir.path(), gpu(), &LoadOptions::default(), None).unwrap();
        let logits = engine
            .prompt_logits(std::slice::from_ref(&prompts[0].ids))
            .unwrap();
        let (diff, scale) = max_error(&logits[0], &prompts[0].logits);
        eprintln!(
            "gpu bf16 {name}: max|diff| {diff:.3e}, max|ref| {scale:.3}, ratio {:.3e}",
            diff / scale
        );
        assert!(
            diff <= BF16_TOL * scale,
            "{name}: {diff} > {BF16_TOL} × {scale}"
        );
    }
}

/// The fused kernels (q/k/v and gate/up GEMVs with the GLU, residual add +
/// RMSNorm, q/k norm + rope, the down projection into the residual, bf16
/// copies written for cuBLAS) against one kernel per op on the same bf16
/// weights: the whole prompt in one pass (cuBLAS), then one token per pass
/// (the decode shape the fused GEMVs take), also against transformers.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_fused_kernels_match_one_kernel_per_op() {
    for name in ["llama", "qwen3"] {
        let (dir, prompts) = bf16_copy(name);
        let opts = LoadOptions::default();
        let driver = gpu().with_mlp_fold(true);
        let mut fused = Engine::load(dir.path(), driver, &opts, None).unwrap();
        let mut plain = Engine::load(dir.path(), gpu().with_fusion(false), &opts, None).unwrap();
        let ids = &prompts[0].ids;
        // The whole prompt in one pass: the cuBLAS path, where the fused
        // path's norms, GLU and attention write the GEMMs' bf16 inputs.
        let whole = fused.prompt_logits(std::slice::from_ref(ids)).unwrap();
        let whole_plain = plain.prompt_logits(std::slice::from_ref(ids)).unwrap();
        let (prefill_diff, prefill_scale) = max_error(&whole[0], &whole_plain[0]);
        eprintln!(
            "gpu fused {name} prefill: vs one kernel per op {:.3e}",
            prefill_diff / prefill_scale
        );
        assert!(
            prefill_diff <= 1e-5 * prefill_scale,
            "{name}: fused vs unfused prefill {prefill_diff} > 1e-5 × {prefill_scale}"
        );
        let a = fused.prompt_logits_chunked(ids, 1).unwrap();
        let b = plain.prompt_logits_chunked(ids, 1).unwrap();
        let (diff, scale) = max_error(&a, &b);
        let (ref_diff, ref_scale) = max_error(&a, &prompts[0].logits);
        eprintln!(
            "gpu fused {name}: vs one kernel per op {:.3e}, vs transformers {:.3e} (of max|ref|)",
            diff / scale,
            ref_diff / ref_scale
        );
        assert!(
            diff <= 1e-5 * scale,
            "{name}: fused vs unfused {diff} > 1e-5 × {scale}"
        );
        assert!(
            ref_diff <= BF16_TOL * ref_scale,
            "{name}: fused vs transformers {ref_diff} > {BF16_TOL} × {ref_scale}"
        );
        // One token per pass: every layer's MLP half was one launch (each
        // pass ran every layer's; graph replays count nothing).
        let layers = serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
        )
        .unwrap()["num_hidden_layers"]
            .as_u64()
            .unwrap();
        let folds = fused.driver.mlp_folds();
        assert!(
            folds > 0 && folds % layers == 0,
            "{name}: {folds} MLP halves folded over {layers} layers"
        );
        assert_eq!(plain.driver.mlp_folds(), 0);
    }
}

/// The scheduler on the GPU: chunked prefill, forks (copy on write of a
/// shared page, `copy_page`; recurrent state rows, `copy_state`) and one
/// batch of branches must give the portable driver's logits for each
/// context's whole token sequence.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_scheduler_forks_match_the_portable_driver() {
    use pie_runtime::scheduler::{OutputKind, PassOutput, PassRequest, Scheduler, SchedulerConfig};
    use std::sync::mpsc;

    let opts = LoadOptions {
        page_size: 4,
        ..LoadOptions::default()
    };
    for name in ["qwen3", "qwen3_5"] {
        let (dir, _) = fixture(name);
        // qwen3: the pool sized by gpu_mem_utilization (0.5 here).
        let cfg = SchedulerConfig {
            max_forward_tokens: 5,
            kv_pages: if name == "qwen3" { 0 } else { 64 },
            gpu_mem_utilization: 0.5,
            max_recurrent_contexts: 4,
            ..SchedulerConfig::default()
        };
        let (gpu_dir, gpu_opts) = (dir.clone(), opts.clone());
        let s = Scheduler::start(
            name,
            move || Engine::load(&gpu_dir, gpu(), &gpu_opts, None),
            cfg,
        )
        .unwrap();
        eprintln!("gpu scheduler {name}: {} KV pages", s.model().kv_pages);
        assert!(s.model().kv_pages >= 64, "{name}: {}", s.model().kv_pages);
        let mut cpu = Engine::load(&dir, PortableDriver::new(), &opts, None).unwrap();
        let mut reference = |tokens: &[u32]| -> Vec<f32> {
            cpu.prompt_logits(&[tokens.to_vec()]).unwrap()[0]
                .last()
                .unwrap()
                .clone()
        };
        let run = |passes: Vec<(u64, Vec<u32>)>| -> Vec<Vec<f32>> {
            let (tx, rx) = mpsc::channel();
            let prepared = passes
                .into_iter()
                .enumerate()
                .map(|(i, (ctx, tokens))| {
                    let tx = tx.clone();
                    let req = PassRequest {
                        ctx,
                        outputs: vec![(tokens.len() as u32 - 1, OutputKind::Logits)],
                        tokens,
                        ..PassRequest::default()
                    };
                    s.prepare(req, Box::new(move |r| tx.send((i, r)).unwrap()))
                        .unwrap()
                })
                .collect::<Vec<_>>();
            let n = prepared.len();
            s.send(prepared).unwrap();
            let mut out = vec![Vec::new(); n];
            for _ in 0..n {
                let (i, r) = rx.recv().unwrap();
                match r.unwrap().remove(0) {
                    PassOutput::Logits(l) => out[i] = l,
                    other => panic!("{other:?}"),
                }
            }
            out
        };
        let prompt: Vec<u32> = (0..14).map(|i| (i * 13 + 5) % 200 + 3).collect();
        let a = s.kv().create();
        let got = run(vec![(a, prompt.clone())]).remove(0);
        let (diff, scale) = max_error(&[got], &[reference(&prompt)]);
        assert!(diff <= F32_TOL * scale, "{name} chunked prefill: {diff}");
        let b = s.kv().fork(a).unwrap();
        let c = s.kv().fork(a).unwrap();
        let got = run(vec![(a, vec![7]), (b, vec![8, 9]), (c, vec![10])]);
        // Greedy outputs are reduced on the device (token + log-probability).
        let (tx, rx) = mpsc::channel();
        let req = PassRequest {
            ctx: a,
            tokens: vec![11],
            outputs: vec![(0, OutputKind::Sample(Sampler::greedy()))],
            ..PassRequest::default()
        };
        s.submit(req, Box::new(move |r| tx.send(r).unwrap()))
            .unwrap();
        let mut whole = prompt.clone();
        whole.extend([7, 11]);
        let want = reference(&whole);
        let want_token = pie_driver::argmax(&want);
        let want_logprob = want[want_token as usize] - pie_driver::math::log_sum_exp(&want);
        match rx.recv().unwrap().unwrap().remove(0) {
            PassOutput::Token { token, logprob } => {
                eprintln!("gpu scheduler {name} greedy: {token} ({logprob}) vs {want_token} ({want_logprob})");
                assert_eq!(token, want_token, "{name}: greedy token");
                assert!(
                    (logprob - want_logprob).abs() < 1e-3,
                    "{name}: {logprob} vs {want_logprob}"
                );
            }
            other => panic!("{other:?}"),
        }
        for (logits, tail) in got.iter().zip([vec![7], vec![8, 9], vec![10]]) {
            let mut whole = prompt.clone();
            whole.extend(&tail);
            let (diff, scale) = max_error(std::slice::from_ref(logits), &[reference(&whole)]);
            eprintln!(
                "gpu scheduler {name} branch {tail:?}: ratio {:.3e}",
                diff / scale
            );
            assert!(diff <= F32_TOL * scale, "{name} branch {tail:?}: {diff}");
        }
    }
}

/// A tree of drafts in one masked pass through the scheduler on the GPU
/// (qwen3 fixture): a root, two siblings hidden from each other, a
/// grandchild under the first; each token's logits must equal the portable
/// driver's for its branch run alone. (Not a sliding-window fixture: there
/// the window counts cache positions, hidden siblings included, so a tree
/// differs from its branches once it is longer than the window.)
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_scheduler_tree_mask_matches_each_branch() {
    use pie_runtime::scheduler::{OutputKind, PassOutput, PassRequest, Scheduler, SchedulerConfig};
    use std::sync::mpsc;

    let opts = LoadOptions {
        page_size: 4,
        ..LoadOptions::default()
    };
    for name in ["qwen3"] {
        let (dir, _) = fixture(name);
        let cfg = SchedulerConfig {
            kv_pages: 64,
            ..SchedulerConfig::default()
        };
        let (gpu_dir, gpu_opts) = (dir.clone(), opts.clone());
        let s = Scheduler::start(
            name,
            move || Engine::load(&gpu_dir, gpu(), &gpu_opts, None),
            cfg,
        )
        .unwrap();
        let run = |req: PassRequest| -> Vec<Vec<f32>> {
            let (tx, rx) = mpsc::channel();
            s.submit(req, Box::new(move |r| tx.send(r).unwrap()))
                .unwrap();
            rx.recv()
                .unwrap()
                .unwrap()
                .into_iter()
                .map(|o| match o {
                    PassOutput::Logits(l) => l,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let prompt: Vec<u32> = (0..9).map(|i| (i * 13 + 5) % 200 + 3).collect();
        let a = s.kv().create();
        run(PassRequest {
            ctx: a,
            tokens: prompt.clone(),
            ..PassRequest::default()
        });
        let l = prompt.len();
        // Keys: the 9 prompt tokens, then root (9), siblings (10, 11) and
        // the first sibling's child (12).
        let visible: [&[usize]; 4] = [&[9], &[9, 10], &[9, 11], &[9, 10, 12]];
        let mask = visible
            .iter()
            .map(|own| (0..l + 4).map(|j| j < l || own.contains(&j)).collect())
            .collect();
        let p = l as u32;
        let got = run(PassRequest {
            ctx: a,
            tokens: vec![31, 32, 33, 34],
            positions: Some(vec![p, p + 1, p + 1, p + 2]),
            mask: Some(mask),
            outputs: (0..4).map(|i| (i, OutputKind::Logits)).collect(),
        });
        let mut cpu = Engine::load(&dir, PortableDriver::new(), &opts, None).unwrap();
        let branch1 = [prompt.clone(), vec![31, 32, 34]].concat();
        let branch2 = [prompt.clone(), vec![31, 33]].concat();
        let refs = cpu.prompt_logits(&[branch1, branch2]).unwrap();
        let want = [
            &refs[0][l],
            &refs[0][l + 1],
            &refs[1][l + 1],
            &refs[0][l + 2],
        ];
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let (diff, scale) = max_error(std::slice::from_ref(g), std::slice::from_ref(w));
            eprintln!("gpu tree mask {name} token {i}: ratio {:.3e}", diff / scale);
            assert!(diff <= F32_TOL * scale, "{name} token {i}: {diff}");
        }
    }
}

/// Custom attention masks on the GPU (`pie_attention_masked`) against the
/// portable driver, op by op: two sequences over three steps (a causal
/// prefix longer than one 128-key tile, then masked chunks beside causal
/// ones). The masks cover tree siblings hidden from each other, rows that
/// look ahead within their chunk, a row whose whole first tile is hidden,
/// and one that sees nothing inside its window (zeros on both drivers);
/// run plain, and with a window, a soft-cap and sinks.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_masked_attention_matches_the_portable_driver() {
    let cuda = gpu();
    for (window, softcap, sinks) in [(None, None, false), (Some(64), Some(20.0), true)] {
        let got = masked_attention_steps(&cuda, window, softcap, sinks);
        let want = masked_attention_steps(&PortableDriver::new(), window, softcap, sinks);
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            let (diff, scale) = max_error(std::slice::from_ref(g), std::slice::from_ref(w));
            eprintln!("masked attention (window {window:?}) step {step}: max diff {diff:.3e}, scale {scale:.3}");
            assert!(diff <= 1e-4 * scale.max(1.0), "step {step}: {diff}");
        }
    }
}

/// The steps of the test above run on the portable driver alone (no GPU
/// needed), so the harness itself is checked here: outputs are finite, and
/// the row that sees nothing inside its window comes out as zeros.
#[test]
fn masked_attention_steps_run_on_the_portable_driver() {
    let width = 4 * 64;
    for window in [None, Some(64)] {
        let outs = masked_attention_steps(&PortableDriver::new(), window, Some(20.0), true);
        assert_eq!(
            outs.iter().map(Vec::len).collect::<Vec<_>>(),
            [170 * width, 8 * width, 3 * width]
        );
        assert!(outs.iter().flatten().all(|x| x.is_finite()));
        let blind = &outs[2][..width];
        assert_eq!(
            blind.iter().all(|&x| x == 0.0),
            window.is_some(),
            "{window:?}"
        );
    }
}

/// Runs the steps of `gpu_masked_attention_matches_the_portable_driver` on
/// `d`; returns each step's attention output, row after row.
fn masked_attention_steps<D: pie_driver::Driver>(
    d: &D,
    window: Option<usize>,
    softcap: Option<f32>,
    sinks: bool,
) -> Vec<Vec<f32>> {
    use pie_driver::ir::{AttentionAttrs, EmbeddingAttrs};
    use pie_driver::{
        AttnMask, DType, ForwardBatch, KvDType, KvLayout, KvSlotShape, TensorView, WeightRole,
    };

    let (heads, kv_heads, dim) = (4, 2, 64);
    let a = AttentionAttrs {
        heads,
        kv_heads,
        head_dim: dim,
        v_head_dim: dim,
        scale: 0.125,
        window,
        softcap,
        cache_slot: 0,
        kv_from: None,
    };
    let layout = KvLayout {
        page_size: 4,
        num_pages: 64,
        slots: vec![KvSlotShape {
            kv_heads,
            head_dim: dim,
            v_head_dim: dim,
        }],
        dtype: KvDType::Auto,
        state_slots: vec![],
        max_seqs: 1,
    };
    let mut kv = d.new_kv(&layout).unwrap();
    let pages: [Vec<u32>; 2] = [(0..48).collect(), (48..64).collect()];
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 2.0)
            .collect()
    };
    let weight = |data: &[f32], shape: &[usize], role| {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = TensorView {
            dtype: DType::F32,
            shape,
            data: &bytes,
        };
        d.load_weight("test", &view, shape, role).unwrap()
    };
    let sink_w = sinks.then(|| weight(&[0.5, -1.0, 2.0, 0.0], &[heads], WeightRole::Vector));
    // Sequence 0: 150 cached tokens, then a tree of 5 (130 = root; 131 and
    // 132 siblings; 133 under 131; 134 looks ahead at 133 and sees only
    // keys from 130 on), then 2 tokens where row 0 sees only key 3 (outside
    // any window) and row 1 is causal. Sequence 1 stays causal.
    let steps: [[(usize, usize); 2]; 3] = [
        [(0, 150), (0, 20)],
        [(150, 5), (20, 3)],
        [(155, 2), (23, 1)],
    ];
    let tree: Vec<Vec<bool>> = [
        &[150, 151][..],
        &[150, 151],
        &[150, 152],
        &[150, 151, 153],
        &[150, 153, 154],
    ]
    .iter()
    .enumerate()
    .map(|(t, own)| {
        (0..155)
            .map(|j| (j < 150 && (t < 4 || j >= 130)) || own.contains(&j))
            .collect()
    })
    .collect();
    let last: Vec<Vec<bool>> = vec![(0..157).map(|j| j == 3).collect(), vec![true; 157]];
    let mut outs = Vec::new();
    for (step, chunks) in steps.iter().enumerate() {
        let mut batch = ForwardBatch::default();
        for (s, &(first, len)) in chunks.iter().enumerate() {
            batch.push(&vec![0; len], first, pages[s].clone(), 0);
        }
        let n = batch.num_tokens();
        batch.tokens = (0..n as u32).collect();
        match step {
            1 => batch.seqs[0].mask = Some(AttnMask::from_rows(&tree, 155).unwrap()),
            2 => batch.seqs[0].mask = Some(AttnMask::from_rows(&last, 157).unwrap()),
            _ => {}
        }
        let act = |width: usize, seed: usize| {
            let table = weight(&values(n * width, seed), &[n, width], WeightRole::Matrix);
            d.embedding(
                &table,
                &batch,
                &EmbeddingAttrs {
                    vocab: n,
                    hidden: width,
                },
            )
            .unwrap()
        };
        let q = act(heads * dim, step * 3);
        let k = act(kv_heads * dim, step * 3 + 1);
        let v = act(kv_heads * dim, step * 3 + 2);
        let out = d
            .attention(&q, Some(&k), Some(&v), sink_w.as_ref(), &mut kv, &batch, &a)
            .unwrap();
        let rows: Vec<usize> = (0..n).collect();
        outs.push(d.read_rows(&out, &rows).unwrap());
    }
    outs
}

/// A two-layer Qwen3 with random bf16 weights and head dims of 128 (the
/// fixtures' are smaller): the shape whose q/k norms and rope the folded
/// decode attention applies itself.
fn qwen3_head_dim_128() -> tempfile::TempDir {
    let (hidden, heads, kv_heads, hd, inter, vocab, layers) = (256, 4, 2, 128, 512, 160, 2);
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "model_type": "qwen3", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hd, "vocab_size": vocab, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true, "max_position_embeddings": 4096
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut salt = 0u64;
    let mut add = |name: String, shape: Vec<usize>, centre: f32, spread: f32| {
        salt += 1;
        let n: usize = shape.iter().product();
        let data = random_bytes(n, salt, true)
            .chunks_exact(4)
            .flat_map(|c| {
                let v = f32::from_le_bytes(c.try_into().unwrap());
                half::bf16::from_f32(centre + spread * v).to_le_bytes()
            })
            .collect();
        tensors.push((name, shape, data));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![vocab, hidden],
        0.0,
        1.0,
    );
    add("model.norm.weight".into(), vec![hidden], 1.0, 0.1);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, n) in [
            ("q", heads * hd),
            ("k", kv_heads * hd),
            ("v", kv_heads * hd),
        ] {
            add(
                format!("{p}.self_attn.{name}_proj.weight"),
                vec![n, hidden],
                0.0,
                0.08,
            );
        }
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, heads * hd],
            0.0,
            0.05,
        );
        add(format!("{p}.self_attn.q_norm.weight"), vec![hd], 1.0, 0.2);
        add(format!("{p}.self_attn.k_norm.weight"), vec![hd], 1.0, 0.2);
        add(
            format!("{p}.input_layernorm.weight"),
            vec![hidden],
            1.0,
            0.1,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            1.0,
            0.1,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
            0.0,
            0.08,
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![inter, hidden],
            0.0,
            0.08,
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
            0.0,
            0.05,
        );
    }
    write_bf16_safetensors(dir.path(), &tensors);
    dir
}

/// The q/k norms and rope applied inside the folded decode attention
/// (`norm_rope_attention`) against one kernel per op: logits of one token
/// per pass (eager, then replayed graphs) over 200 positions, with f32 and
/// bf16 KV caches, and greedy tokens of batched generation.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_norm_rope_folded_into_attention_matches_the_ops() {
    use pie_driver::KvDType;
    let dir = qwen3_head_dim_128();
    let prompt: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 160).collect();
    for dtype in [KvDType::Auto, KvDType::Bf16] {
        let opts = LoadOptions {
            kv_cache_dtype: dtype,
            ..LoadOptions::default()
        };
        let driver = gpu().with_mlp_fold(true);
        let mut fused = Engine::load(dir.path(), driver, &opts, None).unwrap();
        let mut plain = Engine::load(dir.path(), gpu().with_fusion(false), &opts, None).unwrap();
        let a = fused.prompt_logits_chunked(&prompt, 1).unwrap();
        let b = plain.prompt_logits_chunked(&prompt, 1).unwrap();
        let (diff, scale) = max_error(&a, &b);
        eprintln!(
            "gpu norm+rope in attention ({dtype:?} cache): vs one kernel per op {:.3e} of max|logit| {scale:.3}",
            diff / scale
        );
        // f32 activations both ways; the norms' sums run in another order.
        assert!(diff <= 1e-4 * scale, "{dtype:?}: {diff} > 1e-4 × {scale}");
        let prompts = vec![
            prompt[..7].to_vec(),
            prompt[50..81].to_vec(),
            prompt[100..103].to_vec(),
        ];
        let greedy = Sampler::greedy();
        let got = fused.generate(&prompts, 24, &greedy).unwrap();
        let want = plain.generate(&prompts, 24, &greedy).unwrap();
        assert_eq!(got, want, "{dtype:?}: greedy tokens");
        assert!(fused.driver.graph_replays() > 0, "no decode graph replayed");
        assert!(
            fused.driver.norm_rope_folds() > 0,
            "the fold never took the norms"
        );
        assert_eq!(plain.driver.norm_rope_folds(), 0);
    }
}
