//! The CUDA kernels codegen specializes for a model (`pie build --config`)
//! are snapshot-tested per architecture and config: a change in what gets
//! baked in shows up as a reviewed diff.

use std::path::Path;

use pie_codegen::cuda_kernels::{specialized_kernels, SpecializedKernels};

/// `specs/<arch>.toml` lowered against `tests/configs/<arch>.json` (full-size
/// configs), specialized.
fn specialized(arch: &str) -> SpecializedKernels {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let spec_path = format!("specs/{arch}.toml");
    let text = std::fs::read_to_string(root.join(&spec_path)).unwrap();
    let spec = pie_archspec::parse(&spec_path, &text).unwrap_or_else(|d| panic!("{d}"));
    let config_path = format!("tests/configs/{arch}.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(&config_path)).unwrap()).unwrap();
    let model = pie_archspec::lower(&spec, &config, &config_path).unwrap();
    specialized_kernels(&[&model])
}

#[test]
fn qwen3_kernels() {
    let k = specialized("qwen3");
    // Qwen3-0.6B: hidden 1024, 16 × 128 query features, MLP 3072 (SiLU).
    assert!(k.names.contains(&"pie_gemv3_norm_bf16_k1024".to_string()));
    assert!(k.names.contains(&"pie_gemv_add_bf16_k2048".to_string()));
    assert!(k
        .names
        .contains(&"pie_gemv_glu_norm_bf16_k1024_silu".to_string()));
    insta::assert_snapshot!(k.source);
}

#[test]
fn llama_kernels() {
    insta::assert_snapshot!(specialized("llama").source);
}

#[test]
fn gemma2_bakes_its_tanh_gelu() {
    let k = specialized("gemma2");
    assert!(
        k.names.iter().any(|n| n.ends_with("_gelu_tanh")),
        "{:?}",
        k.names
    );
    insta::assert_snapshot!(k.source);
}

/// GPT-OSS's clamped SwiGLU keeps the generic GLU kernels (the limit is
/// not baked in); its plain GEMVs are still specialized.
#[test]
fn gpt_oss_clamped_glu_is_not_specialized() {
    let k = specialized("gpt_oss");
    assert!(!k.names.iter().any(|n| n.contains("glu")), "{:?}", k.names);
    assert!(k.names.iter().any(|n| n.starts_with("pie_gemv_bf16_k")));
}

/// Every entry point named is defined in the source, once.
#[test]
fn names_match_the_source() {
    for arch in ["qwen3", "llama", "gemma2", "qwen3_5", "nemotron_h"] {
        let k = specialized(arch);
        for name in &k.names {
            assert_eq!(
                k.source.matches(&format!("\n{name}(")).count(),
                1,
                "{arch}: {name}"
            );
        }
    }
}
