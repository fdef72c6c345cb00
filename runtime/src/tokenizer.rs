//! `tokenizer.json` through the `tokenizers` crate, with the few settings of
//! `tokenizer_config.json` that change which ids a prompt encodes to.
//!
//! # Special tokens around a plain prompt
//!
//! `encode(text, true)` follows what a transformers fast tokenizer does:
//!
//! 1. The `post_processor` of `tokenizer.json` runs (it usually adds BOS).
//! 2. If `tokenizer_config.json` sets `add_bos_token` to a boolean, and its
//!    `bos_token` is in the vocabulary, the flag wins over the
//!    post-processor, the way transformers rebuilds the post-processor from
//!    that flag (Llama, Gemma, Mistral and DeepSeek tokenizers): `true` puts
//!    BOS in front unless the post-processor already did; `false` removes a
//!    BOS the post-processor added. A BOS written in the text itself is text
//!    and always stays.
//! 3. `add_eos_token` / `eos_token` work the same way at the end.
//!
//! Without those keys (Llama 3, Qwen), the post-processor alone decides.
//! `encode(text, false)` adds nothing, as for a rendered chat template,
//! which writes its own special tokens.
//!
//! Truncation and padding saved in `tokenizer.json` are switched off, as
//! transformers does for a call without `truncation=`/`padding=`: a long
//! prompt is never cut silently.

use std::path::Path;

use serde_json::Value;

use crate::model_dir::read_json;
use crate::LoadError;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The file (or other origin) the tokenizer came from, for messages.
    label: String,
    bos: SpecialFlag,
    eos: SpecialFlag,
}

/// `add_bos_token`/`add_eos_token` from `tokenizer_config.json`, resolved to
/// a token id. `add: None` leaves the post-processor's choice alone.
#[derive(Debug, Clone, Copy, Default)]
struct SpecialFlag {
    id: Option<u32>,
    add: Option<bool>,
}

impl Tokenizer {
    /// The directory's tokenizer, or None when it has no `tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Option<Self>, LoadError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| LoadError::file(&path, format!("cannot read: {e}")))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| {
            // A syntax error reads better from serde_json directly.
            match serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                Err(json) => LoadError::file(
                    &path,
                    format!(
                        "invalid JSON at line {}, column {}: {json}",
                        json.line(),
                        json.column()
                    ),
                ),
                Ok(_) => LoadError::file(&path, format!("not a valid tokenizer: {e}")),
            }
        })?;
        let mut tokenizer = Tokenizer::from_inner(inner, path.display().to_string());

        let config_path = dir.join("tokenizer_config.json");
        if config_path.exists() {
            let config = read_json(&config_path)?;
            tokenizer.bos = tokenizer.flag(&config, &config_path, "bos_token", "add_bos_token")?;
            tokenizer.eos = tokenizer.flag(&config, &config_path, "eos_token", "add_eos_token")?;
        }
        Ok(Some(tokenizer))
    }

    /// Wraps a tokenizer built elsewhere (e.g. from GGUF metadata); `label`
    /// names its origin in messages. Its post-processor alone decides the
    /// special tokens of a plain prompt.
    pub fn from_inner(mut inner: tokenizers::Tokenizer, label: String) -> Self {
        inner
            .with_truncation(None)
            .expect("disabling truncation cannot fail");
        inner.with_padding(None);
        Tokenizer {
            inner,
            label,
            bos: SpecialFlag::default(),
            eos: SpecialFlag::default(),
        }
    }

    /// Reads `add_key` (a boolean) and the id of the token named by
    /// `token_key`. A flag whose token is not in the vocabulary is ignored,
    /// as there is nothing to add.
    fn flag(
        &self,
        config: &Value,
        path: &Path,
        token_key: &str,
        add_key: &str,
    ) -> Result<SpecialFlag, LoadError> {
        let add = match config.get(add_key) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(LoadError::file(
                    path,
                    format!("`{add_key}` must be true or false, found {other}"),
                ))
            }
        };
        let id = special_token(config, token_key).and_then(|t| self.inner.token_to_id(&t));
        Ok(SpecialFlag { id, add })
    }

    /// Token ids of `text`; with `add_special_tokens`, the BOS/EOS a plain
    /// prompt gets (see the module docs for the rule).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, LoadError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(format!("cannot encode: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if !add_special_tokens {
            return Ok(ids);
        }
        // The mask marks tokens the post-processor added, not special tokens
        // that were typed in the text.
        let mut added = enc.get_special_tokens_mask().to_vec();
        if let (Some(bos), Some(add)) = (self.bos.id, self.bos.add) {
            let has = ids.first() == Some(&bos) && added.first() == Some(&1);
            if add && !has {
                ids.insert(0, bos);
                added.insert(0, 1);
            } else if !add && has {
                ids.remove(0);
                added.remove(0);
            }
        }
        if let (Some(eos), Some(add)) = (self.eos.id, self.eos.add) {
            let has = ids.last() == Some(&eos) && added.last() == Some(&1);
            if add && !has {
                ids.push(eos);
            } else if !add && has {
                ids.pop();
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; with `skip_special_tokens`, special tokens (BOS, EOS,
    /// chat markers) are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, LoadError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("cannot decode {ids:?}: {e}")))
    }

    /// The id of `token` (a vocabulary entry or an added token), if any.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of token `id`, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id named by `tokenizer_config.json`, when it is in the
    /// vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.id
    }

    fn error(&self, message: String) -> LoadError {
        LoadError::File {
            path: self.label.clone(),
            message,
        }
    }
}

/// A special token's text from `tokenizer_config.json`: written as a string,
/// or as an AddedToken object whose text is `content`. None when absent or
/// null.
pub(crate) fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;

    /// Loaded once and shared by request threads in a server.
    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }

    const WORDS: [&str; 6] = ["<unk>", "<s>", "</s>", "hello", "world", "!"];

    /// Builds a WordLevel tokenizer in code and saves it as `tokenizer.json`;
    /// with `bos_template`, its post-processor puts `<s>` in front.
    fn save_tokenizer(dir: &Path, bos_template: bool) {
        let vocab = WORDS
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut tok = tokenizers::Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(Whitespace {}));
        if bos_template {
            let template = TemplateProcessing::builder()
                .try_single("<s> $A")
                .unwrap()
                .special_tokens(vec![("<s>", 1)])
                .build()
                .unwrap();
            tok.with_post_processor(Some(template));
        }
        tok.add_special_tokens(&[
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
        ]);
        tok.save(dir.join("tokenizer.json"), false).unwrap();
    }

    fn write_config(dir: &Path, config: Value) {
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    }

    fn load(dir: &Path) -> Tokenizer {
        Tokenizer::load(dir)
            .unwrap()
            .expect("tokenizer.json written")
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        save_tokenizer(dir.path(), true);
        let tok = load(dir.path());
        assert_eq!(tok.vocab_size(), WORDS.len());
        assert_eq!(tok.token_id("world"), Some(4));
        assert_eq!(tok.token_id("nope"), None);
        assert_eq!(tok.id_to_token(5).as_deref(), Some("!"));

        let ids = tok.encode("hello world !", true).unwrap();
        assert_eq!(ids, [1, 3, 4, 5]);
        assert_eq!(tok.encode("hello world !", false).unwrap(), [3, 4, 5]);
        assert_eq!(tok.encode("hello mars", false).unwrap(), [3, 0]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello world !");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<s> hello world !");
    }

    #[test]
    fn no_tokenizer_json_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Tokenizer::load(dir.path()).unwrap().is_none());
    }

    #[test]
    fn add_bos_token_false_removes_only_the_post_processors_bos() {
        let dir = tempfile::tempdir().unwrap();
        save_tokenizer(dir.path(), true);
        write_config(
            dir.path(),
            serde_json::json!({"bos_token": {"content": "<s>", "lstrip": false}, "add_bos_token": false}),
        );
        let tok = load(dir.path());
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.encode("hello", true).unwrap(), [3]);
        // A BOS typed in the text is text.
        assert_eq!(tok.encode("<s> hello", true).unwrap(), [1, 3]);
    }

    #[test]
    fn add_bos_token_true_adds_what_the_post_processor_lacks() {
        let dir = tempfile::tempdir().unwrap();
        save_tokenizer(dir.path(), false);
        let tok = load(dir.path());
        assert_eq!(
            tok.encode("hello", true).unwrap(),
            [3],
            "no config: as saved"
        );

        write_config(
            dir.path(),
            serde_json::json!({"bos_token": "<s>", "add_bos_token": true,
                               "eos_token": "</s>", "add_eos_token": true}),
        );
        let tok = load(dir.path());
        assert_eq!(tok.encode("hello", true).unwrap(), [1, 3, 2]);
        assert_eq!(tok.encode("<s> hello", true).unwrap(), [1, 1, 3, 2]);
        assert_eq!(tok.encode("hello", false).unwrap(), [3]);

        // With the post-processor already adding BOS, nothing is doubled.
        save_tokenizer(dir.path(), true);
        let tok = load(dir.path());
        assert_eq!(tok.encode("hello", true).unwrap(), [1, 3, 2]);
    }

    #[test]
    fn flags_without_a_known_token_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        save_tokenizer(dir.path(), false);
        write_config(
            dir.path(),
            serde_json::json!({"bos_token": null, "add_bos_token": true, "eos_token": "<eos>", "add_eos_token": true}),
        );
        assert_eq!(load(dir.path()).encode("hello", true).unwrap(), [3]);
    }

    #[test]
    fn bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let err = |dir: &Path| Tokenizer::load(dir).err().expect("rejected").to_string();

        std::fs::write(&path, "{\n \"model\": ").unwrap();
        let e = err(dir.path());
        assert!(
            e.starts_with(&format!("{}: invalid JSON at line 2", path.display())),
            "{e}"
        );
        std::fs::write(&path, r#"{"model": {"type": "Nope"}}"#).unwrap();
        let e = err(dir.path());
        assert!(
            e.starts_with(&format!("{}: not a valid tokenizer: ", path.display())),
            "{e}"
        );

        save_tokenizer(dir.path(), true);
        write_config(dir.path(), serde_json::json!({"add_bos_token": "yes"}));
        let e = err(dir.path());
        assert!(
            e.contains(
                "tokenizer_config.json: `add_bos_token` must be true or false, found \"yes\""
            ),
            "{e}"
        );
    }

    #[test]
    fn saved_truncation_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        save_tokenizer(dir.path(), false);
        let path = dir.path().join("tokenizer.json");
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["truncation"] = serde_json::json!({
            "direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0
        });
        std::fs::write(&path, json.to_string()).unwrap();
        assert_eq!(
            load(dir.path())
                .encode("hello world ! hello", false)
                .unwrap()
                .len(),
            4
        );
    }
}
