//! Qwen2 and Qwen3 from GGUF files: the tiny parity fixtures (safetensors
//! with transformers references) written as GGUF the way llama.cpp's
//! converter writes these architectures — GGUF names and metadata, Q/K rows
//! *not* permuted (unlike llama), Qwen2's Q/K/V biases and Qwen3's
//! `attn_q_norm`/`attn_k_norm` as tensors of their own — must reproduce the
//! reference logits and greedy tokens in f32. With every matrix as Q8_0
//! blocks, logits and greedy tokens must match the f32 run over the weights
//! those blocks decode to (the kernels' own error: 16-bit activations), and
//! stay within 5 % of the reference's largest logit (the weights' rounding:
//! these random tiny models have small logit margins, so 8-bit weights
//! alone move them by 3–4 %).

use std::path::{Path, PathBuf};

use pie_driver::KvDType;
use pie_driver_portable::PortableDriver;
use pie_runtime::sampling::Sampler;
use pie_runtime::{Engine, LoadOptions};

mod common;
mod gguf_writer;

use common::{fixture, fixture_dir, Prompt};
use gguf_writer::{gguf_bytes, gguf_name, q8_0_round_trip, Encoding, Meta, Tensor};

/// How the fixture's matrices (2-D, rows of whole 32-value blocks) go into
/// the file.
#[derive(Clone, Copy)]
enum Matrices {
    F32,
    Q8_0,
    /// f32 holding exactly the values of the Q8_0 blocks.
    Q8_0Decoded,
}

/// Every tensor of the fixture's safetensors shards, under GGUF names.
fn tensors(dir: &Path, matrices: Matrices) -> Vec<Tensor> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    let mut out = Vec::new();
    for shard in shards {
        let bytes = std::fs::read(&shard).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let shape = view.shape().to_vec();
            let mut data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let mut encoding = Encoding::F32;
            if shape.len() == 2 && shape[1].is_multiple_of(32) {
                match matrices {
                    Matrices::F32 => {}
                    Matrices::Q8_0 => encoding = Encoding::Q8_0,
                    Matrices::Q8_0Decoded => data = q8_0_round_trip(&data),
                }
            }
            out.push(Tensor {
                name: gguf_name(&name),
                data,
                shape,
                encoding,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The fixture as a GGUF image of `arch` (`qwen2` or `qwen3`).
fn fixture_gguf(arch: &str, matrices: Matrices) -> Vec<u8> {
    let dir = fixture_dir(arch);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| Meta::U32(cfg[k].as_u64().unwrap() as u32);
    let heads = cfg["num_attention_heads"].as_u64().unwrap();
    let head_dim = cfg["head_dim"]
        .as_u64()
        .unwrap_or(cfg["hidden_size"].as_u64().unwrap() / heads);
    let key = |k: &str| format!("{arch}.{k}");
    let meta = vec![
        ("general.architecture".to_string(), Meta::Str(arch.into())),
        (key("block_count"), u("num_hidden_layers")),
        (key("embedding_length"), u("hidden_size")),
        (key("feed_forward_length"), u("intermediate_size")),
        (key("attention.head_count"), u("num_attention_heads")),
        (key("attention.head_count_kv"), u("num_key_value_heads")),
        (key("attention.key_length"), Meta::U32(head_dim as u32)),
        (key("attention.value_length"), Meta::U32(head_dim as u32)),
        (key("vocab_size"), u("vocab_size")),
        (
            key("rope.freq_base"),
            Meta::F32(cfg["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Meta::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
    ];
    let meta: Vec<(&str, Meta)> = meta.into_iter().map(|(k, v)| (&*k.leak(), v)).collect();
    gguf_bytes(&meta, &tensors(&dir, matrices))
}

/// The fixture as GGUF, with an f32 KV cache: these tests compare weight
/// formats, so cache rounding (f16 under `auto` for Q8_0) stays out.
fn load(arch: &str, matrices: Matrices, dir: &Path) -> Engine<PortableDriver> {
    load_with(arch, matrices, dir, KvDType::F32)
}

fn load_with(arch: &str, matrices: Matrices, dir: &Path, kv: KvDType) -> Engine<PortableDriver> {
    let path = dir.join(format!("{arch}.gguf"));
    std::fs::write(&path, fixture_gguf(arch, matrices)).unwrap();
    let opts = LoadOptions {
        kv_cache_dtype: kv,
        ..LoadOptions::default()
    };
    Engine::load(&path, PortableDriver::new(), &opts, None).unwrap()
}

/// Logits of every prompt position.
fn logits(engine: &mut Engine<PortableDriver>, prompts: &[Prompt]) -> Vec<Vec<Vec<f32>>> {
    prompts
        .iter()
        .map(|p| {
            engine
                .prompt_logits(std::slice::from_ref(&p.ids))
                .unwrap()
                .remove(0)
        })
        .collect()
}

fn greedy(engine: &mut Engine<PortableDriver>, prompts: &[Prompt]) -> Vec<Vec<u32>> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    engine.generate(&ids, 10, &Sampler::greedy()).unwrap()
}

/// Asserts max |got − want| ≤ `tolerance` × max |want|.
fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tolerance: f32) {
    let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max|diff| {diff:.3e}, max|ref| {scale:.3e}");
    assert!(
        diff <= tolerance * scale,
        "{what}: max|diff| {diff} vs max|ref| {scale}"
    );
}

/// f32 GGUF against the transformers reference: logits of every position
/// and 10 greedy tokens.
fn check_f32(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = load(arch, Matrices::F32, dir.path());
    let (_, prompts) = fixture(arch);
    for (i, (got, p)) in logits(&mut engine, &prompts)
        .iter()
        .zip(&prompts)
        .enumerate()
    {
        assert_close(&format!("{arch} prompt {i}"), got, &p.logits, 1e-3);
    }
    for (i, (ours, p)) in greedy(&mut engine, &prompts)
        .iter()
        .zip(&prompts)
        .enumerate()
    {
        assert_eq!(ours, &p.greedy, "{arch} prompt {i}: greedy tokens");
    }
}

/// Q8_0 GGUF against the f32 run over its decoded weights (1e-3), and
/// against the transformers reference (5e-2).
fn check_q8_0(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut quant = load(arch, Matrices::Q8_0, dir.path());
    let mut decoded = load(arch, Matrices::Q8_0Decoded, dir.path());
    let (_, prompts) = fixture(arch);
    let want = logits(&mut decoded, &prompts);
    for (i, (got, p)) in logits(&mut quant, &prompts)
        .iter()
        .zip(&prompts)
        .enumerate()
    {
        assert_close(
            &format!("{arch} Q8_0 prompt {i} vs decoded"),
            got,
            &want[i],
            1e-3,
        );
        assert_close(
            &format!("{arch} Q8_0 prompt {i} vs transformers"),
            got,
            &p.logits,
            5e-2,
        );
    }
    // Prompts of under five tokens take the fused decode kernels instead of
    // decoded weight bands.
    let short: Vec<Prompt> = prompts
        .iter()
        .map(|p| Prompt {
            ids: p.ids[..3].to_vec(),
            logits: Vec::new(),
            greedy: Vec::new(),
            cache_consistent: p.cache_consistent,
        })
        .collect();
    let want = logits(&mut decoded, &short);
    for (i, got) in logits(&mut quant, &short).iter().enumerate() {
        assert_close(
            &format!("{arch} Q8_0 3-token prompt {i} vs decoded"),
            got,
            &want[i],
            1e-3,
        );
    }
    assert_eq!(
        greedy(&mut quant, &prompts),
        greedy(&mut decoded, &prompts),
        "{arch}: Q8_0 greedy tokens"
    );
}

#[test]
fn qwen2_gguf_matches_transformers() {
    check_f32("qwen2");
}

#[test]
fn qwen3_gguf_matches_transformers() {
    check_f32("qwen3");
}

#[test]
fn qwen2_gguf_q8_0_matches_its_decoded_weights() {
    check_q8_0("qwen2");
}

#[test]
fn qwen3_gguf_q8_0_matches_its_decoded_weights() {
    check_q8_0("qwen3");
}

/// `auto` caches f16 for a block-quantized checkpoint and f32 for an f32
/// one; the f16 cache stays close to the f32 one and greedy agrees.
#[test]
fn auto_kv_cache_follows_the_checkpoint_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let f32_model = load_with("qwen3", Matrices::F32, dir.path(), KvDType::Auto);
    assert_eq!(f32_model.kv_cache_dtype(), KvDType::F32);
    let mut auto = load_with("qwen3", Matrices::Q8_0, dir.path(), KvDType::Auto);
    assert_eq!(auto.kv_cache_dtype(), KvDType::F16);
    let mut exact = load("qwen3", Matrices::Q8_0, dir.path());
    let (_, prompts) = fixture("qwen3");
    let want = logits(&mut exact, &prompts);
    for (i, got) in logits(&mut auto, &prompts).iter().enumerate() {
        assert_close(
            &format!("qwen3 Q8_0 f16 cache prompt {i}"),
            got,
            &want[i],
            3e-3,
        );
    }
    assert_eq!(greedy(&mut auto, &prompts), greedy(&mut exact, &prompts));
}
