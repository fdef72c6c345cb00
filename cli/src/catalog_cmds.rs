//! `pie model list|pull`: the models Pie knows by name.

use clap::Subcommand;
use pie_runtime::catalog;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Show known models and whether each is in the local cache.
    List,
    /// Fetch a known model into the cache (done automatically on first use).
    Pull {
        /// A known model name, e.g. `smollm2`.
        name: String,
    },
}

pub fn run(cmd: ModelCommand) -> Result<(), String> {
    match cmd {
        ModelCommand::List => {
            println!("{:<10} {:<8} {:<9} description", "name", "cached", "size");
            for m in catalog::MODELS {
                let cached = if m.is_cached() { "yes" } else { "no" };
                println!(
                    "{:<10} {:<8} {:<9} {}",
                    m.name,
                    cached,
                    format!("{} MB", m.bytes / 1_000_000),
                    m.description
                );
            }
            println!("cache: {}", catalog::cache_dir().display());
            Ok(())
        }
        ModelCommand::Pull { name } => {
            let known = catalog::find(&name).ok_or_else(|| {
                format!(
                    "unknown model `{name}` (known: {})",
                    catalog::MODELS
                        .iter()
                        .map(|m| m.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            let path = known
                .fetch(&|msg| eprintln!("{msg}"))
                .map_err(|e| e.to_string())?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
