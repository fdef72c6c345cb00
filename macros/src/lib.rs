//! `pie_macros::arch!("../specs/qwen3.toml")` expands, at compile time, into
//! the module `pie-codegen` generates for that spec. The path is relative to
//! the invoking crate's `Cargo.toml`. Spec errors become compile errors that
//! carry the spec's own `file:line:col` diagnostics.

use proc_macro::TokenStream;
use syn::{parse_macro_input, LitStr};

#[proc_macro]
pub fn arch(input: TokenStream) -> TokenStream {
    let lit = parse_macro_input!(input as LitStr);
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let path = std::path::Path::new(&manifest_dir).join(lit.value());
    let path = path.canonicalize().unwrap_or(path);
    // Messages name the spec as `specs/<arch>.toml`, not this machine's path.
    let shown: std::path::PathBuf = path
        .iter()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            let msg = format!("cannot read spec {}: {e}", path.display());
            return syn::Error::new(lit.span(), msg).to_compile_error().into();
        }
    };
    let spec = match pie_archspec::parse(&shown.display().to_string(), &text) {
        Ok(spec) => spec,
        Err(diagnostics) => {
            let msg = format!("invalid architecture spec:\n{diagnostics}");
            return syn::Error::new(lit.span(), msg).to_compile_error().into();
        }
    };
    let abs = path.display().to_string();
    pie_codegen::generate(&spec, Some(&abs)).into()
}
