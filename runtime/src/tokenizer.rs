//! `tokenizer.json` through the `tokenizers` crate.

use std::path::Path;

use crate::model_dir::read_json;
use crate::LoadError;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl Tokenizer {
    /// The directory's tokenizer, or None when it has no `tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Option<Self>, LoadError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        // Validate as JSON first for a located error message.
        read_json(&path)?;
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| LoadError::file(&path, format!("not a valid tokenizer: {e}")))?;
        Ok(Some(Tokenizer {
            inner,
            path: path.display().to_string(),
        }))
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's
    /// post-processor adds what the model expects around a plain prompt
    /// (such as BOS); chat templates render those tokens themselves, so
    /// rendered chats are encoded without.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, LoadError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| LoadError::Other(format!("{}: cannot encode: {e}", self.path)))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, LoadError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| LoadError::Other(format!("{}: cannot decode: {e}", self.path)))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
