//! A Hugging Face model directory's `config.json` and
//! `generation_config.json`.

use std::path::{Path, PathBuf};

use crate::LoadError;

pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub generation_config: Option<serde_json::Value>,
}

/// Reads and parses a JSON file; errors give the line and column.
pub fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| {
        LoadError::file(
            path,
            format!(
                "invalid JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })
}

impl ModelFiles {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::file(dir, "not a model directory"));
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(LoadError::file(
                &config_path,
                "missing: a model directory needs config.json",
            ));
        }
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(LoadError::file(&config_path, "expected a JSON object"));
        }
        if config.get("model_type").and_then(|v| v.as_str()).is_none() {
            return Err(LoadError::file(
                &config_path,
                "missing key `model_type` (a string such as \"llama\")",
            ));
        }
        let gen_path = dir.join("generation_config.json");
        let generation_config = if gen_path.exists() {
            Some(read_json(&gen_path)?)
        } else {
            None
        };
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            generation_config,
        })
    }

    pub fn model_type(&self) -> &str {
        self.config["model_type"].as_str().unwrap_or_default()
    }

    /// Token ids that end generation: `eos_token_id` (an int or a list) from
    /// generation_config.json, else from config.json.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let from = |v: &serde_json::Value| -> Option<Vec<u32>> {
            match v.get("eos_token_id")? {
                serde_json::Value::Number(n) => Some(vec![n.as_u64()? as u32]),
                serde_json::Value::Array(a) => Some(
                    a.iter()
                        .filter_map(|x| x.as_u64().map(|x| x as u32))
                        .collect(),
                ),
                _ => None,
            }
        };
        self.generation_config
            .as_ref()
            .and_then(from)
            .or_else(|| from(&self.config))
            .unwrap_or_default()
    }
}
