//! The generated Rust for each spec is snapshot-tested: a change in codegen
//! or a spec shows up as a reviewed diff.

use std::path::Path;

fn generated(arch: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let path = format!("specs/{arch}.toml");
    let text = std::fs::read_to_string(root.join(&path)).unwrap();
    let spec = pie_archspec::parse(&path, &text).unwrap_or_else(|d| panic!("{d}"));
    pie_codegen::generate_source(&spec)
}

#[test]
fn generated_llama() {
    insta::assert_snapshot!(generated("llama"));
}

#[test]
fn generated_qwen3() {
    insta::assert_snapshot!(generated("qwen3"));
}

#[test]
fn generated_qwen3_5() {
    insta::assert_snapshot!(generated("qwen3_5"));
}

#[test]
fn generated_nemotron_h() {
    insta::assert_snapshot!(generated("nemotron_h"));
}
