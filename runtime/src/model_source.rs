//! Everything a model brings besides the architecture: its config, weights,
//! tokenizer, chat template and stop tokens — from a Hugging Face directory
//! or from a single GGUF file.

use std::path::{Path, PathBuf};

use pie_driver::WeightSource;

use crate::chat_template::ChatTemplate;
use crate::gguf::{self, GgufFile, MetaValue};
use crate::model_dir::ModelFiles;
use crate::safetensors_source::SafetensorsSource;
use crate::tokenizer::Tokenizer;
use crate::LoadError;

pub struct ModelSource {
    pub config: serde_json::Value,
    /// Where the config came from, for messages.
    pub config_label: String,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
}

impl ModelSource {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        if path.is_file() {
            return Self::open_gguf(path);
        }
        if path.is_dir() && !path.join("config.json").exists() {
            if let Some(gguf) = single_gguf(path)? {
                return Self::open_gguf(&gguf);
            }
        }
        Self::open_hf_dir(path)
    }

    fn open_hf_dir(dir: &Path) -> Result<Self, LoadError> {
        let files = ModelFiles::open(dir)?;
        Ok(ModelSource {
            config_label: dir.join("config.json").display().to_string(),
            weights: Box::new(SafetensorsSource::open(dir)?),
            tokenizer: Tokenizer::load(dir)?,
            chat_template: ChatTemplate::load(dir)?,
            stop_ids: files.stop_token_ids(),
            config: files.config,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self, LoadError> {
        let mut file = GgufFile::open(path)?;
        let config = gguf::config::to_hf_config(&file)?;
        let arch = gguf::config::architecture(&file)?.to_string();
        let label = path.display().to_string();
        let tokenizer =
            gguf::tokenizer::build(&file)?.map(|t| Tokenizer::from_inner(t, label.clone()));
        let token_text = |key: &str| -> String {
            let id = file.get(key).and_then(MetaValue::as_u64);
            let tokens = file
                .get("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array);
            match (id, tokens) {
                (Some(id), Some(t)) => t
                    .get(id as usize)
                    .and_then(MetaValue::as_str)
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            }
        };
        let chat_template = match file
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
        {
            Some(src) => Some(ChatTemplate::from_source(
                src.to_string(),
                format!("{label} (tokenizer.chat_template)"),
                token_text("tokenizer.ggml.bos_token_id"),
                token_text("tokenizer.ggml.eos_token_id"),
            )?),
            None => None,
        };
        let stop_ids = file
            .get("tokenizer.ggml.eos_token_id")
            .and_then(MetaValue::as_u64)
            .map(|id| vec![id as u32])
            .unwrap_or_default();
        // The vocabulary arrays (~100k strings) served the tokenizer and the
        // chat template; weights never read them. Freed before the weights
        // load, so their heap pages are returned rather than kept resident
        // at the peak.
        file.metadata
            .retain(|(key, v)| !(key.starts_with("tokenizer.ggml.") && v.as_array().is_some()));
        crate::heap::trim();
        let heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
        let kv_heads = config["num_key_value_heads"].as_u64().unwrap_or(0) as usize;
        Ok(ModelSource {
            config,
            config_label: format!("{label} (metadata)"),
            weights: Box::new(gguf::GgufSource::new(file, &arch, heads, kv_heads)?),
            tokenizer,
            chat_template,
            stop_ids,
        })
    }
}

/// The one `.gguf` file in `dir`, if there is exactly one.
fn single_gguf(dir: &Path) -> Result<Option<PathBuf>, LoadError> {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::file(dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.into_iter().next()),
        n => Err(LoadError::file(
            dir,
            format!("{n} .gguf files and no config.json: pass the file to use"),
        )),
    }
}
