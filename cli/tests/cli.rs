//! The `pie` command end to end: its output contract and its errors on bad
//! input (exit code ≠ 0, one message naming the file/key/tensor, no panic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};

fn pie(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pie"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a clean failure: non-zero exit, one `error:` message containing
/// `needle`, and no panic or backtrace.
fn fails_with(args: &[&str], needle: &str) {
    let (ok, _, err) = pie(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

const HIDDEN: usize = 16;
const VOCAB: usize = 40;

fn config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "tie_word_embeddings": true
    })
}

/// Weights of a tiny random llama, deterministic.
fn weights() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut seed = 1u32;
    let mut rand = move |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let mut w = BTreeMap::new();
    let mut add = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product();
        w.insert(name.to_string(), (shape, rand(n)));
    };
    add("model.embed_tokens.weight", vec![VOCAB, HIDDEN]);
    add("model.norm.weight", vec![HIDDEN]);
    let p = "model.layers.0";
    add(&format!("{p}.input_layernorm.weight"), vec![HIDDEN]);
    add(
        &format!("{p}.post_attention_layernorm.weight"),
        vec![HIDDEN],
    );
    add(
        &format!("{p}.self_attn.q_proj.weight"),
        vec![HIDDEN, HIDDEN],
    );
    add(&format!("{p}.self_attn.k_proj.weight"), vec![8, HIDDEN]);
    add(&format!("{p}.self_attn.v_proj.weight"), vec![8, HIDDEN]);
    add(
        &format!("{p}.self_attn.o_proj.weight"),
        vec![HIDDEN, HIDDEN],
    );
    add(&format!("{p}.mlp.gate_proj.weight"), vec![32, HIDDEN]);
    add(&format!("{p}.mlp.up_proj.weight"), vec![32, HIDDEN]);
    add(&format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, 32]);
    w
}

fn write_model(
    dir: &Path,
    config: &serde_json::Value,
    weights: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
    let bytes: BTreeMap<&String, (Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(k, (s, v))| {
            (
                k,
                (s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            )
        })
        .collect();
    let views: Vec<(&String, TensorView)> = bytes
        .iter()
        .map(|(k, (s, b))| (*k, TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
}

fn model_dir(
    mutate: impl FnOnce(&mut serde_json::Value, &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, mut w) = (config(), weights());
    mutate(&mut c, &mut w);
    write_model(dir.path(), &c, &w);
    let path = dir.path().to_path_buf();
    (dir, path)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn logits_json_contract() {
    let (_d, dir) = model_dir(|_, _| {});
    let (ok, out, err) = pie(&["logits", "--model", s(&dir), "--ids", "1,17,25", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ids"], serde_json::json!([1, 17, 25]));
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.as_array().unwrap().len() == VOCAB));
}

#[test]
fn generate_json_contract_and_determinism() {
    let (_d, dir) = model_dir(|_, _| {});
    let args = [
        "generate",
        "--model",
        s(&dir),
        "--ids",
        "1,2,3",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--json",
    ];
    let (ok, out, err) = pie(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids = v["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 5);
    assert!(v.get("text").is_none(), "no tokenizer, no text");
    assert_eq!(pie(&args).1, out, "greedy is deterministic");
}

#[test]
fn missing_weight_names_the_tensor() {
    let (_d, dir) = model_dir(|_, w| {
        w.remove("model.layers.0.mlp.up_proj.weight");
    });
    fails_with(
        &["logits", "--model", s(&dir), "--ids", "1"],
        "tensor `model.layers.0.mlp.up_proj.weight` not found",
    );
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let (_d, dir) = model_dir(|_, w| {
        w.insert(
            "model.layers.0.mlp.up_proj.weight".into(),
            (vec![31, HIDDEN], vec![0.0; 31 * HIDDEN]),
        );
    });
    fails_with(
        &["logits", "--model", s(&dir), "--ids", "1"],
        "tensor `model.layers.0.mlp.up_proj.weight`: expected shape [32, 16], found [31, 16]",
    );
}

#[test]
fn unsupported_model_type() {
    let (_d, dir) = model_dir(|c, _| c["model_type"] = "gpt_neo".into());
    fails_with(
        &["logits", "--model", s(&dir), "--ids", "1"],
        "model_type `gpt_neo` is not supported (supported: ",
    );
}

#[test]
fn corrupt_safetensors_header() {
    let (_d, dir) = model_dir(|_, _| {});
    std::fs::write(
        dir.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    )
    .unwrap();
    fails_with(
        &["logits", "--model", s(&dir), "--ids", "1"],
        "model.safetensors",
    );
}

#[test]
fn ids_out_of_vocab_range() {
    let (_d, dir) = model_dir(|_, _| {});
    fails_with(
        &["logits", "--model", s(&dir), "--ids", "1,40"],
        "token id 40 is out of range",
    );
}

#[test]
fn missing_config_and_bad_json() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        &["logits", "--model", s(dir.path()), "--ids", "1"],
        "config.json",
    );
    std::fs::write(dir.path().join("config.json"), "{ \"model_type\": ").unwrap();
    fails_with(
        &["logits", "--model", s(dir.path()), "--ids", "1"],
        "config.json",
    );
}

#[test]
fn missing_config_key_is_named() {
    let (_d, dir) = model_dir(|c, _| {
        c.as_object_mut().unwrap().remove("intermediate_size");
    });
    fails_with(
        &["logits", "--model", s(&dir), "--ids", "1"],
        "missing key `intermediate_size`",
    );
}

#[test]
fn prompt_without_tokenizer() {
    let (_d, dir) = model_dir(|_, _| {});
    fails_with(
        &["generate", "--model", s(&dir), "--prompt", "hi"],
        "no tokenizer.json",
    );
}

#[test]
fn spec_check_reports_location() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("specs/llama.toml"))
        .unwrap()
        .replacen("\"glu\"", "\"gluu\"", 1);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text).unwrap();
    fails_with(&["spec", "check", s(&bad)], "bad.toml:");
    fails_with(
        &["spec", "check", s(&bad)],
        "unknown op \"gluu\" (did you mean `glu`?)",
    );
    let (ok, out, _) = pie(&["spec", "check", s(&root.join("specs/llama.toml"))]);
    assert!(ok && out.contains("ok"), "{out}");
}

#[test]
fn spec_show_prints_the_ir() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let (ok, out, err) = pie(&[
        "spec",
        "show",
        "qwen3",
        "--config",
        s(&root.join("tests/configs/qwen3.json")),
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with("arch qwen3"), "{out}");
    assert!(out.contains("layers 0..=27: decoder"), "{out}");
}

/// `pie build --config` checks its configs before compiling anything.
#[test]
fn build_config_errors_name_the_problem() {
    let build_fails = |flavor: &str, config: &Path, needle: &str| {
        let args = [
            "build",
            "--arch",
            "qwen3",
            "--flavor",
            flavor,
            "--config",
            s(config),
        ];
        fails_with(&args, needle)
    };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("config.json");
    std::fs::write(&bad, "{ not json").unwrap();
    build_fails(
        "portable",
        &bad,
        "--config specializes CUDA kernels; flavor `portable` has none",
    );
    build_fails("cuda12.8", &bad, "config.json: not JSON");
    build_fails("cuda12.8", &dir.path().join("absent.json"), "absent.json");
    std::fs::write(&bad, r#"{"model_type": "qwen3", "hidden_size": 64}"#).unwrap();
    build_fails("cuda12.8", dir.path(), "does not fit architecture `qwen3`");
}
