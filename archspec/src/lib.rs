//! Pie's architecture spec language.
//!
//! A spec (`specs/<arch>.toml`) says *what* an architecture computes. This
//! crate parses it with spans ([`spec`]), validates it without a config
//! ([`validate`]), binds its parameters to a Hugging Face `config.json`
//! ([`bind`]) and lowers it to a concrete graph ([`lower`], [`ir`]).

pub mod bind;
pub mod diagnostic;
mod display;
pub mod expr;
pub mod ir;
pub mod lower;
mod normal;
pub mod ops;
pub mod spec;
pub mod validate;
pub mod value;

use std::path::Path;

pub use bind::BindError;
pub use diagnostic::{Diagnostic, Diagnostics, SourceFile};
pub use spec::Spec;
pub use value::Value;

/// Parses and validates spec text; `path` is used in messages.
pub fn parse(path: &str, text: &str) -> Result<Spec, Diagnostics> {
    spec::parse_spec(SourceFile::new(path, text))
}

/// Reads, parses and validates a spec file.
pub fn load(path: &Path) -> Result<Spec, Diagnostics> {
    let display = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&display, &text),
        Err(e) => Err(Diagnostics(vec![Diagnostic {
            path: display,
            line: 0,
            col: 0,
            message: format!("cannot read spec: {e}"),
            hint: None,
            excerpt: None,
        }])),
    }
}

/// Binds a spec to a parsed `config.json` and lowers it to the IR.
pub fn lower(
    spec: &Spec,
    config: &serde_json::Value,
    config_path: &str,
) -> Result<ir::Model, BindError> {
    lower::lower(spec, config, config_path)
}
