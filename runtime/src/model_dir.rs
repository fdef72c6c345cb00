//! A Hugging Face model directory's `config.json` and
//! `generation_config.json`: the model's hyperparameters and its
//! generation defaults. Weights, tokenizer and chat template have their own
//! modules.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::LoadError;

pub struct ModelFiles {
    pub dir: PathBuf,
    /// `config.json`; a JSON object with a string `model_type`.
    pub config: Value,
    /// `generation_config.json`, when the directory has one.
    pub generation_config: Option<Value>,
}

/// Reads and parses a JSON file; errors name the file and give the line and
/// column of a syntax error.
pub fn read_json(path: &Path) -> Result<Value, LoadError> {
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
    /// Reads `dir/config.json` (required) and `dir/generation_config.json`
    /// (optional).
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        if !dir.exists() {
            return Err(LoadError::file(dir, "no such directory"));
        }
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
        match config.get("model_type") {
            Some(Value::String(_)) => {}
            None => {
                return Err(LoadError::file(
                    &config_path,
                    "missing key `model_type` (a string such as \"llama\")",
                ))
            }
            Some(other) => {
                return Err(LoadError::file(
                    &config_path,
                    format!("`model_type` must be a string such as \"llama\", found {other}"),
                ))
            }
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

    /// Token ids that end generation: `eos_token_id` (an int or a list)
    /// from generation_config.json, which transformers' `generate` uses,
    /// else from config.json. Entries that are not token ids are skipped;
    /// duplicates are dropped.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let from = |v: &Value| -> Option<Vec<u32>> {
            let ids = match v.get("eos_token_id")? {
                Value::Array(a) => a.iter().filter_map(token_id).collect(),
                one => vec![token_id(one)?],
            };
            Some(ids)
        };
        let mut ids = self
            .generation_config
            .as_ref()
            .and_then(from)
            .or_else(|| from(&self.config))
            .unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        ids
    }
}

fn token_id(v: &Value) -> Option<u32> {
    u32::try_from(v.as_u64()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn open_err(dir: &Path) -> String {
        ModelFiles::open(dir).err().expect("rejected").to_string()
    }

    #[test]
    fn reads_config_and_generation_config() {
        let dir = dir_with(&[
            (
                "config.json",
                r#"{"model_type": "llama", "eos_token_id": 2}"#,
            ),
            (
                "generation_config.json",
                r#"{"eos_token_id": [128001, 128009, 128001]}"#,
            ),
        ]);
        let files = ModelFiles::open(dir.path()).unwrap();
        assert_eq!(files.model_type(), "llama");
        assert_eq!(files.stop_token_ids(), [128001, 128009]);
    }

    #[test]
    fn stop_ids_fall_back_to_config() {
        let dir = dir_with(&[
            (
                "config.json",
                r#"{"model_type": "llama", "eos_token_id": 2}"#,
            ),
            ("generation_config.json", r#"{"eos_token_id": null}"#),
        ]);
        assert_eq!(ModelFiles::open(dir.path()).unwrap().stop_token_ids(), [2]);
        let dir = dir_with(&[(
            "config.json",
            r#"{"model_type": "llama", "eos_token_id": [-1, 7]}"#,
        )]);
        assert_eq!(ModelFiles::open(dir.path()).unwrap().stop_token_ids(), [7]);
        let dir = dir_with(&[("config.json", r#"{"model_type": "llama"}"#)]);
        assert!(ModelFiles::open(dir.path())
            .unwrap()
            .stop_token_ids()
            .is_empty());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = dir_with(&[]);
        let config = dir.path().join("config.json").display().to_string();
        assert_eq!(
            open_err(dir.path()),
            format!("{config}: missing: a model directory needs config.json")
        );
        assert!(open_err(&dir.path().join("nope")).ends_with("nope: no such directory"));

        std::fs::write(
            dir.path().join("config.json"),
            "{\n  \"model_type\": \"llama\",\n}",
        )
        .unwrap();
        let err = open_err(dir.path());
        assert!(
            err.starts_with(&format!("{config}: invalid JSON at line 3, column 1: ")),
            "{err}"
        );

        std::fs::write(dir.path().join("config.json"), r#"{"hidden_size": 8}"#).unwrap();
        assert_eq!(
            open_err(dir.path()),
            format!("{config}: missing key `model_type` (a string such as \"llama\")")
        );
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": 3}"#).unwrap();
        assert!(open_err(dir.path())
            .ends_with("`model_type` must be a string such as \"llama\", found 3"));
        std::fs::write(dir.path().join("config.json"), "[]").unwrap();
        assert!(open_err(dir.path()).ends_with("config.json: expected a JSON object"));

        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "qwen2"}"#).unwrap();
        std::fs::write(dir.path().join("generation_config.json"), "{").unwrap();
        let err = open_err(dir.path());
        assert!(
            err.contains("generation_config.json: invalid JSON at line 1"),
            "{err}"
        );
    }
}
