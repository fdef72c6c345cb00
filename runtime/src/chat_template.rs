//! Chat templates: the Jinja program that turns a conversation into the
//! prompt text a chat model was trained on.
//!
//! The template comes from `chat_template.jinja` or from `chat_template` in
//! `tokenizer_config.json` (the file wins, as in transformers). It renders
//! with minijinja configured the way transformers configures Jinja2, since
//! any difference changes the prompt text the model sees:
//! `trim_blocks` and `lstrip_blocks`, `{% break %}`/`{% continue %}`, Python
//! string and dict methods (`.strip()`, `.items()`, ...), the globals
//! `raise_exception(msg)` and `strftime_now(format)`, a `tojson` filter with
//! Python's output, the special tokens of `tokenizer_config.json` as
//! variables, and `tools`/`documents` defined as none.

mod pyjson;
mod strftime;

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::model_dir::read_json;
use crate::tokenizer::special_token;
use crate::LoadError;

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template text as written in its file.
    source: String,
    /// Where the template came from, for messages.
    origin: String,
    /// `(name, text)` of the special tokens the template can refer to
    /// (`bos_token`, `eos_token`, ...).
    special_tokens: Vec<(&'static str, String)>,
}

/// The special-token variables transformers passes to templates (its
/// `special_tokens_map`).
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Name of the template inside the environment.
const NAME: &str = "chat_template";

impl ChatTemplate {
    /// The directory's template, or None when it has none. A template that
    /// does not compile is an error here rather than at the first chat.
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
                .map_err(|e| LoadError::file(&jinja_path, format!("cannot read: {e}")))?;
            (text, jinja_path.display().to_string())
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(Json::Null) => return Ok(None),
                Some(t) => (
                    template_text(t).map_err(|m| LoadError::file(&config_path, m))?,
                    format!("{} (chat_template)", config_path.display()),
                ),
            }
        };
        let special_tokens = match &config {
            Some(c) => SPECIAL_TOKEN_KEYS
                .iter()
                .filter_map(|&k| Some((k, special_token(c, k)?)))
                .collect(),
            None => Vec::new(),
        };
        Self::compile(source, origin, special_tokens).map(Some)
    }

    /// A template from its source text; `origin` names it in messages. An
    /// empty `bos_token`/`eos_token` means the model has none (the variable
    /// is left undefined).
    pub fn from_source(
        source: String,
        origin: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, LoadError> {
        let special_tokens = [("bos_token", bos_token), ("eos_token", eos_token)]
            .into_iter()
            .filter(|(_, t)| !t.is_empty())
            .collect();
        Self::compile(source, origin, special_tokens)
    }

    fn compile(
        source: String,
        origin: String,
        special_tokens: Vec<(&'static str, String)>,
    ) -> Result<Self, LoadError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
        });
        env.add_function("strftime_now", |format: String| {
            strftime::strftime_now(&format)
        });
        env.add_filter("tojson", pyjson::tojson);
        let rewritten = rewrite_generation_tags(&source);
        let compiled = env.add_template_owned(NAME, rewritten.clone());
        let template = ChatTemplate {
            env,
            source,
            origin,
            special_tokens,
        };
        match compiled {
            Ok(()) => Ok(template),
            Err(e) => Err(template.error(e, &rewritten)),
        }
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ending
    /// with the header of the assistant turn the model is to write.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, LoadError> {
        let template = self
            .env
            .get_template(NAME)
            .expect("compiled at construction");
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        ctx.extend(
            self.special_tokens
                .iter()
                .map(|(k, v)| (*k, Value::from(v.as_str()))),
        );
        let ctx: Value = ctx.into_iter().collect();
        template
            .render(ctx)
            .map_err(|e| self.error(e, template.source()))
    }

    /// Where the template came from (a file, or a key of one).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The template text as written in its file.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text of the special token `name` (`bos_token`, `eos_token`, ...),
    /// as the template sees it.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A message naming the template's origin and line, and the template
    /// text where it failed.
    fn error(&self, e: Error, source: &str) -> LoadError {
        let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
        let at = e
            .range()
            .and_then(|r| source.get(r))
            .map(|s| {
                let s = s.trim();
                match s.char_indices().nth(60) {
                    Some((cut, _)) => format!(" (at `{}…`)", &s[..cut]),
                    None => format!(" (at `{s}`)"),
                }
            })
            .unwrap_or_default();
        let raised = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<Raised>());
        let message = match raised {
            Some(Raised(msg)) => {
                format!("the chat template{line} rejected the conversation: {msg}")
            }
            None => {
                let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
                format!("chat template error{line}: {}{detail}{at}", e.kind())
            }
        };
        LoadError::Other(format!("{}: {message}", self.origin))
    }
}

/// The error `raise_exception(msg)` carries, so its message is shown as the
/// template's own words rather than as a template bug.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// The template text of a `chat_template` value: a string, or a list of
/// `{name, template}` of which transformers uses the one named "default".
fn template_text(v: &Json) -> Result<String, String> {
    const SHAPE: &str = "`chat_template` must be a string or a list of {\"name\", \"template\"}";
    match v {
        Json::String(s) => Ok(s.clone()),
        Json::Array(items) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(Json::as_str);
                let text = item.get("template").and_then(Json::as_str);
                match (name, text) {
                    (Some("default"), Some(text)) => return Ok(text.to_string()),
                    (Some(name), Some(_)) => names.push(format!("`{name}`")),
                    _ => return Err(SHAPE.to_string()),
                }
            }
            Err(format!(
                "`chat_template` has no template named \"default\" (it has {})",
                names.join(", ")
            ))
        }
        _ => Err(SHAPE.to_string()),
    }
}

/// transformers' `{% generation %}…{% endgeneration %}` marks assistant text
/// for training masks and renders its body unchanged. minijinja has no such
/// tag, so it becomes `{% if true %}…{% endif %}`, which keeps the body and
/// the whitespace control of the original tags (and so every line number).
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let (before, tag) = rest.split_at(open);
        out.push_str(before);
        let body = &tag[2..];
        let marker = body.len() - body.trim_start_matches(['-', '+']).len();
        let inner = body[marker..].trim_start();
        let keyword_at = 2 + body.len() - inner.len();
        let replaced = [("endgeneration", "endif"), ("generation", "if true")]
            .into_iter()
            .find(|(kw, _)| {
                inner.strip_prefix(kw).is_some_and(|after| {
                    let after = after.trim_start().trim_start_matches(['-', '+']);
                    after.starts_with("%}")
                })
            });
        match replaced {
            Some((kw, with)) => {
                out.push_str(&tag[..keyword_at]);
                out.push_str(with);
                rest = &tag[keyword_at + kw.len()..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}\n<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n";

    /// Loaded once and shared by request threads in a server.
    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    fn dir_with_config(config: Json) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        dir
    }

    fn template(text: &str) -> (tempfile::TempDir, ChatTemplate) {
        let dir = dir_with_config(serde_json::json!({
            "chat_template": text,
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "lstrip": false},
            "pad_token": null,
        }));
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        (dir, t)
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn msgs() -> Vec<ChatMessage> {
        vec![msg("system", " Be brief. "), msg("user", "Hi")]
    }

    #[test]
    fn chatml_with_trim_blocks_and_python_methods() {
        let (_d, t) = template(CHATML);
        assert_eq!(
            t.render(&msgs(), true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&msgs()[1..], false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn special_tokens_and_none_variables() {
        let (_d, t) = template(
            "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ tools is none }}|{{ documents is none }}",
        );
        assert_eq!(t.render(&[], false).unwrap(), "<s>|</s>|False|True|True");
        assert_eq!(t.special_token("eos_token"), Some("</s>"));
        assert!(t
            .origin()
            .ends_with("tokenizer_config.json (chat_template)"));
    }

    #[test]
    fn loop_controls_namespace_and_tojson() {
        let (_d, t) = template(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m|tojson }}{% endfor %}{{ ns.n }}",
        );
        assert_eq!(
            t.render(&[msg("user", "a<b> & \"c\""), msg("assistant", "x")], false)
                .unwrap(),
            r#"{"role": "user", "content": "a<b> & \"c\""}1"#
        );
    }

    #[test]
    fn raise_exception_is_an_error_naming_file_and_line() {
        let (_d, t) = template(
            "{% for m in messages %}\n{% if m.role == 'system' %}\n{{ raise_exception('System role not supported') }}\n{% endif %}\n{% endfor %}",
        );
        let err = t.render(&msgs(), true).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "tokenizer_config.json (chat_template): the chat template line 3 rejected the conversation: System role not supported"
            ),
            "{err}"
        );
        assert_eq!(t.render(&msgs()[1..], true).unwrap(), "");
    }

    #[test]
    fn render_errors_show_line_and_text() {
        let (_d, t) = template("line one\n{{ messages[0].content.nosuchmethod() }}");
        let err = t.render(&msgs(), true).unwrap_err().to_string();
        assert!(
            err.contains("(chat_template): chat template error line 2: unknown method"),
            "{err}"
        );
        assert!(err.contains("(at `"), "{err}");
    }

    #[test]
    fn broken_template_fails_at_load() {
        let dir =
            dir_with_config(serde_json::json!({ "chat_template": "hi\n{% for m in messages %}" }));
        let err = ChatTemplate::load(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(
                "tokenizer_config.json (chat_template): chat template error line 2: syntax error"
            ),
            "{err}"
        );
    }

    #[test]
    fn jinja_file_wins_and_named_templates() {
        let dir = dir_with_config(serde_json::json!({
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}default"},
            ],
            "bos_token": "<s>",
        }));
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "<s>default");

        // A trailing newline is dropped, as Jinja2 does.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ bos_token }}file\n",
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "<s>file");
        assert!(t.origin().ends_with("chat_template.jinja"));

        let dir = dir_with_config(serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "rag", "template": "y"}],
        }));
        let err = ChatTemplate::load(dir.path()).err().unwrap().to_string();
        assert!(
            err.ends_with("has no template named \"default\" (it has `tool_use`, `rag`)"),
            "{err}"
        );
        let dir = dir_with_config(serde_json::json!({ "chat_template": 3 }));
        let err = ChatTemplate::load(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("`chat_template` must be a string or a list"),
            "{err}"
        );

        let dir = dir_with_config(serde_json::json!({ "chat_template": null }));
        assert!(ChatTemplate::load(dir.path()).unwrap().is_none());
        assert!(ChatTemplate::load(tempfile::tempdir().unwrap().path())
            .unwrap()
            .is_none());
    }

    #[test]
    fn strftime_now_renders_today() {
        let (_d, t) = template("{{ strftime_now('%Y-%m-%d') }}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let out = t.render(&[], false).unwrap();
        let near = [now - 5, now, now + 5].map(|s| strftime::strftime("%Y-%m-%d", s));
        assert!(near.contains(&out), "{out} vs {near:?}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let (_d, t) = template(
            "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%}\n[{{ m.content }}]\n{%- endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
        );
        assert_eq!(
            t.render(&[msg("user", "q"), msg("assistant", "a")], false)
                .unwrap(),
            "q[a]"
        );
        assert_eq!(
            rewrite_generation_tags(
                "{%generation%}{% endgeneration -%}{% if x %}{% generations %}"
            ),
            "{%if true%}{% endif -%}{% if x %}{% generations %}"
        );
    }

    #[test]
    fn from_source_with_tokens() {
        let t = ChatTemplate::from_source(
            "{{ bos_token }}{{ eos_token is defined }}".into(),
            "model.gguf (tokenizer.chat_template)".into(),
            "<|begin|>".into(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "<|begin|>False",
            "booleans print as in Python"
        );
        let err = ChatTemplate::from_source(
            "{% if %}".into(),
            "m.gguf".into(),
            String::new(),
            String::new(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.starts_with("m.gguf: chat template error line 1: syntax error"),
            "{err}"
        );
    }
}
