//! `pie spec ...`: work with architecture specs without loading weights.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use pie_driver_portable::PortableDriver;
use pie_runtime::registry;

#[derive(Subcommand)]
pub enum SpecCommand {
    /// Parse and validate a spec file; print diagnostics with file:line:col.
    Check {
        /// Path of a spec file (`specs/qwen3.toml`).
        file: PathBuf,
    },
    /// Print the IR of a spec lowered against a Hugging Face config.json.
    Show {
        /// A compiled-in architecture name (`qwen3`) or a spec file path.
        arch: String,
        /// The model's config.json.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the Rust module codegen generates for a spec.
    Codegen {
        /// A compiled-in architecture name or a spec file path.
        arch: String,
    },
    /// List the architectures compiled into this binary.
    List,
}

pub fn run(cmd: SpecCommand) -> Result<(), String> {
    match cmd {
        SpecCommand::Check { file } => {
            let spec = pie_archspec::load(&file).map_err(|d| d.to_string())?;
            println!(
                "{}: ok: `{}` ({} parameters, {} layer block(s), serves model_type {})",
                file.display(),
                spec.name,
                spec.params.len(),
                spec.layers.len(),
                spec.hf_model_types.join(", ")
            );
            Ok(())
        }
        SpecCommand::Show { arch, config } => {
            let spec = resolve_spec(&arch)?;
            let text = std::fs::read_to_string(&config)
                .map_err(|e| format!("{}: {e}", config.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                format!(
                    "{}: invalid JSON at line {}, column {}: {e}",
                    config.display(),
                    e.line(),
                    e.column()
                )
            })?;
            let model = pie_archspec::lower(&spec, &json, &config.display().to_string())
                .map_err(|e| e.to_string())?;
            print!("{model}");
            Ok(())
        }
        SpecCommand::Codegen { arch } => {
            let spec = resolve_spec(&arch)?;
            print!("{}", pie_codegen::generate_source(&spec));
            Ok(())
        }
        SpecCommand::List => {
            for a in registry::architectures::<PortableDriver>() {
                println!(
                    "{:<12} {:<28} model_type: {}",
                    a.name,
                    a.spec_path,
                    a.hf_model_types.join(", ")
                );
            }
            Ok(())
        }
    }
}

/// A spec by compiled-in name, or from a file.
fn resolve_spec(arch: &str) -> Result<pie_archspec::Spec, String> {
    if let Some(a) = registry::find_by_name::<PortableDriver>(arch) {
        return pie_archspec::parse(a.spec_path, a.spec_text).map_err(|d| d.to_string());
    }
    let path = Path::new(arch);
    if path.exists() {
        return pie_archspec::load(path).map_err(|d| d.to_string());
    }
    let known: Vec<&str> = registry::architectures::<PortableDriver>()
        .iter()
        .map(|a| a.name)
        .collect();
    Err(format!(
        "unknown architecture `{arch}` (compiled in: {}; or give a spec file path)",
        known.join(", ")
    ))
}
