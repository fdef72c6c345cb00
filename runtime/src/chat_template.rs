//! Chat templates (Jinja, from `tokenizer_config.json` or
//! `chat_template.jinja`) rendered with minijinja the way transformers does:
//! `trim_blocks` + `lstrip_blocks`, Python string methods, `raise_exception`.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::model_dir::read_json;
use crate::LoadError;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    source: String,
    origin: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The directory's template, or None when it has none.
    pub fn load(dir: &Path) -> Result<Option<Self>, LoadError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (source, origin) = if jinja_path.exists() {
            let text = std::fs::read_to_string(&jinja_path)
                .map_err(|e| LoadError::file(&jinja_path, e.to_string()))?;
            (text, jinja_path.display().to_string())
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(t) => (
                    template_text(t).ok_or_else(|| {
                        LoadError::file(
                            &config_path,
                            "`chat_template` must be a string or a list of {name, template}",
                        )
                    })?,
                    format!("{} (chat_template)", config_path.display()),
                ),
            }
        };
        let token = |key: &str| -> String {
            match config.as_ref().and_then(|c| c.get(key)) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(obj) => obj
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                None => String::new(),
            }
        };
        let template = ChatTemplate {
            source,
            origin,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        };
        // Compile once now so a broken template fails at load.
        template.env()?;
        Ok(Some(template))
    }

    /// A template from its source text; `origin` names it in messages.
    pub fn from_source(
        source: String,
        origin: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, LoadError> {
        let template = ChatTemplate {
            source,
            origin,
            bos_token,
            eos_token,
        };
        template.env()?;
        Ok(template)
    }

    fn env(&self) -> Result<Environment<'_>, LoadError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date" lines; a fixed epoch keeps
            // rendering reproducible.
            let _ = fmt;
            "01 Jan 2026".to_string()
        });
        env.add_template("chat", &self.source)
            .map_err(|e| self.error(e))?;
        Ok(env)
    }

    fn error(&self, e: Error) -> LoadError {
        let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
        LoadError::Other(format!(
            "{}{line}: chat template error: {}",
            self.origin,
            e.detail().unwrap_or(&e.to_string())
        ))
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, LoadError> {
        let env = self.env()?;
        let template = env.get_template("chat").map_err(|e| self.error(e))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| self.error(e))
    }
}

fn template_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => {
            let named = |name: &str| {
                items
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
            };
            named("default")
                .or_else(|| items.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> (tempfile::TempDir, ChatTemplate) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({ "chat_template": text, "bos_token": "<s>", "eos_token": {"content": "</s>"} });
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        (dir, t)
    }

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "system".into(),
                content: " Be brief. ".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ]
    }

    #[test]
    fn chatml_with_python_methods() {
        let (_d, t) = template(
            "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        );
        let out = t.render(&msgs(), true).unwrap();
        assert_eq!(out, "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let (_d, t) = template("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}");
        let err = t.render(&msgs(), true).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
        assert!(err.contains("tokenizer_config.json"), "{err}");
    }

    #[test]
    fn broken_template_fails_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({ "chat_template": "{% for m in messages %}" });
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let err = ChatTemplate::load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("chat template error"), "{err}");
    }
}
