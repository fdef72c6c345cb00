//! GGUF models end to end: the tiny llama parity fixture written as a GGUF
//! file the way llama.cpp's converter writes it (Q/K rows permuted, GGUF
//! names, metadata instead of config.json) must give the transformers
//! reference logits; corrupt files give located errors, never panics.

use std::path::Path;

use pie_driver_portable::PortableDriver;
use pie_runtime::{Engine, LoadOptions};

mod gguf_writer;

use gguf_writer::{gguf_bytes, gguf_name, Encoding, Meta, Tensor};

/// llama.cpp's converter layout for Q/K: within each head, Hugging Face row
/// `t·(head_dim/2) + j` becomes row `2j + t`.
fn permute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..half {
                let (hf, gg) = (h * hd + t * half + j, h * hd + 2 * j + t);
                out[gg * cols..(gg + 1) * cols].copy_from_slice(&data[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama")
}

/// The llama fixture as a GGUF image.
fn llama_fixture_gguf() -> Vec<u8> {
    let dir = fixture_dir();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (heads, kv_heads) = (
        cfg["num_attention_heads"].as_u64().unwrap() as usize,
        cfg["num_key_value_heads"].as_u64().unwrap() as usize,
    );
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let shape = view.shape().to_vec();
        let gguf_name = gguf_name(&name);
        let data = if name.ends_with("q_proj.weight") {
            permute_rows(&data, shape[0], shape[1], heads)
        } else if name.ends_with("k_proj.weight") {
            permute_rows(&data, shape[0], shape[1], kv_heads)
        } else {
            data
        };
        tensors.push(Tensor {
            name: gguf_name,
            shape,
            data,
            encoding: Encoding::F32,
        });
    }
    let u = |k: &str| Meta::U32(cfg[k].as_u64().unwrap() as u32);
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", u("num_hidden_layers")),
        ("llama.embedding_length", u("hidden_size")),
        ("llama.feed_forward_length", u("intermediate_size")),
        ("llama.attention.head_count", u("num_attention_heads")),
        ("llama.attention.head_count_kv", u("num_key_value_heads")),
        ("llama.vocab_size", u("vocab_size")),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
    ];
    gguf_bytes(&meta, &tensors)
}

#[test]
fn llama_fixture_as_gguf_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, llama_fixture_gguf()).unwrap();
    let mut engine =
        Engine::load(&path, PortableDriver::new(), &LoadOptions::default(), None).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap(),
    )
    .unwrap();
    for p in reference["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(p["logits"].clone()).unwrap();
        let got = engine
            .prompt_logits(std::slice::from_ref(&ids))
            .unwrap()
            .remove(0);
        let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-3 * scale, "max|diff| {diff} vs max|ref| {scale}");
    }
}

fn load_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    match Engine::load(&path, PortableDriver::new(), &LoadOptions::default(), None) {
        Ok(_) => panic!("corrupt file accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_files_name_the_offset_or_key() {
    let good = llama_fixture_gguf();
    let mut wrong_magic = good.clone();
    wrong_magic[0] = b'X';
    assert!(load_error(&wrong_magic).contains("offset 0: not a GGUF file"));

    let mut version = good.clone();
    version[4] = 9;
    assert!(load_error(&version).contains("GGUF version 9 is not supported"));

    let mut huge_count = good.clone();
    huge_count[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = load_error(&huge_count);
    assert!(
        e.contains("metadata_kv_count") && e.contains("cannot fit"),
        "{e}"
    );

    let e = load_error(&good[..good.len() / 2]);
    assert!(
        e.contains("lies outside the file") || e.contains("truncated"),
        "{e}"
    );

    let e = load_error(&good[..40]);
    assert!(
        e.contains("offset") && (e.contains("truncated") || e.contains("cannot fit")),
        "{e}"
    );

    // An unknown tensor type: patch the first tensor's type field.
    let first = find(&good, b"blk.")
        .or_else(|| find(&good, b"token_embd"))
        .unwrap();
    let name_len = u64::from_le_bytes(good[first - 8..first].try_into().unwrap()) as usize;
    let n_dims = u32::from_le_bytes(
        good[first + name_len..first + name_len + 4]
            .try_into()
            .unwrap(),
    ) as usize;
    let type_at = first + name_len + 4 + 8 * n_dims;
    let mut bad_type = good.clone();
    bad_type[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = load_error(&bad_type);
    assert!(e.contains("unsupported type 77"), "{e}");

    let mut far = good.clone();
    far[type_at + 4..type_at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(load_error(&far).contains("lies outside the file"));

    let mut unaligned = good.clone();
    unaligned[type_at + 4..type_at + 12].copy_from_slice(&3u64.to_le_bytes());
    assert!(load_error(&unaligned).contains("is not aligned"));

    let mut other_arch = good.clone();
    let at =
        find(&other_arch, b"general.architecture").unwrap() + "general.architecture".len() + 4 + 8;
    other_arch[at..at + 5].copy_from_slice(b"lamma");
    let e = load_error(&other_arch);
    assert!(
        e.contains("general.architecture `lamma` is not supported"),
        "{e}"
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn mutated_files_never_panic() {
    let good = llama_fixture_gguf();
    let header_end = find(&good, b"output.weight")
        .unwrap_or(2000)
        .min(good.len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut seed = 12345u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    for _ in 0..150 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % header_end;
            bytes[at] = next() as u8;
        }
        if next() % 5 == 0 {
            bytes.truncate((next() as usize) % bytes.len());
        }
        std::fs::write(&path, &bytes).unwrap();
        let _ = Engine::load(&path, PortableDriver::new(), &LoadOptions::default(), None);
    }
}

/// The fuzzing corpus (`fuzz/corpus/gguf_header`) replays here on every test
/// run: seeds must parse, and nothing in the corpus may panic.
#[test]
fn fuzz_corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf_header");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let parsed = pie_runtime::gguf::file::parse(&bytes);
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seed_")
        {
            seeds += 1;
            assert!(parsed.is_ok(), "{}: {:?}", path.display(), parsed.err());
        }
    }
    assert!(seeds >= 3, "the seeds are in the corpus");
}
