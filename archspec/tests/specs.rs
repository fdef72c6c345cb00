//! Every spec in `specs/` parses, validates and lowers against its example
//! config in `tests/configs/`; the lowered IR is snapshot-tested.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn specs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo().join("specs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    out.sort();
    out
}

/// Lowers `specs/<arch>.toml` against `tests/configs/<config>.json`.
fn lower(arch: &str, config: &str) -> pie_archspec::ir::Model {
    let spec_path = format!("specs/{arch}.toml");
    let text = std::fs::read_to_string(repo().join(&spec_path)).unwrap();
    let spec = pie_archspec::parse(&spec_path, &text).unwrap_or_else(|d| panic!("{d}"));
    let config_path = format!("tests/configs/{config}.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(&config_path)).unwrap()).unwrap();
    pie_archspec::lower(&spec, &config, &config_path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_spec_parses_and_has_an_example_config() {
    for path in specs() {
        let arch = path.file_stem().unwrap().to_str().unwrap();
        let model = lower(arch, arch);
        assert_eq!(model.arch, arch, "spec name matches its file name");
        assert!(!model.layers.is_empty());
    }
}

macro_rules! ir_snapshot {
    ($test:ident, $arch:literal, $config:literal) => {
        #[test]
        fn $test() {
            insta::assert_snapshot!(lower($arch, $config).to_string());
        }
    };
}

ir_snapshot!(ir_llama, "llama", "llama");
ir_snapshot!(ir_mistral, "mistral", "mistral");
ir_snapshot!(ir_qwen2, "qwen2", "qwen2");
ir_snapshot!(ir_qwen3, "qwen3", "qwen3");
ir_snapshot!(ir_gemma3, "gemma3", "gemma3");
ir_snapshot!(ir_gemma3n, "gemma3n", "gemma3n");
ir_snapshot!(ir_qwen3_moe, "qwen3_moe", "qwen3_moe");
ir_snapshot!(ir_qwen3_5, "qwen3_5", "qwen3_5");
ir_snapshot!(ir_deepseek_v3, "deepseek_v3", "deepseek_v3");
ir_snapshot!(ir_nemotron_h, "nemotron_h", "nemotron_h");
ir_snapshot!(ir_mixtral, "mixtral", "mixtral");
ir_snapshot!(ir_gpt_oss, "gpt_oss", "gpt_oss");
ir_snapshot!(ir_phi3_longrope, "phi3", "phi3");
ir_snapshot!(ir_qwen3_next, "qwen3_next", "qwen3_next");
ir_snapshot!(ir_glm_moe_dsa, "glm_moe_dsa", "glm_moe_dsa");
