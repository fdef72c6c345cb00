//! `pie serve --config pie.toml`: what to serve and how. Every table refuses
//! keys it does not know, so a typo is an error naming the key, not a
//! setting silently ignored.
//!
//! ```toml
//! [model]
//! path = "models/llama"        # a model directory or GGUF file, or:
//! name = "smollm2"             # a known model (with `path`: the id clients use)
//!
//! [model.driver]
//! kind = "portable"            # or "cuda"
//! kv_page_size = 32
//! kv_cache_dtype = "auto"
//! gpu_mem_utilization = 0.9    # with kv_pages = 0: KV cache sized to fit
//!
//! [model.scheduler]
//! max_forward_tokens = 10240
//! max_forward_requests = 512
//! kv_pages = 1024              # 0: as many as gpu_mem_utilization allows
//! speculation_depth = 1
//!
//! [server]
//! host = "127.0.0.1"
//! port = 8080
//! auth_token = "secret"
//! max_prompt_tokens = 8192
//! inferlet_time_limit_s = 600
//! inferlet_memory_mib = 512
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::inferlet::Limits;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub server: ServerSection,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory or a GGUF file.
    pub path: Option<PathBuf>,
    /// A known model name (fetched into the cache) when `path` is absent;
    /// with `path`, the model id clients ask for.
    pub name: Option<String>,
    #[serde(default)]
    pub driver: DriverSection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DriverSection {
    /// `portable` (CPU) or `cuda`.
    pub kind: String,
    pub kv_page_size: usize,
    /// auto, bf16, f16, int8_per_token_head, fp8_e4m3.
    pub kv_cache_dtype: String,
    /// Fraction of the device's memory weights, activations and KV cache
    /// may use together, when `[model.scheduler] kv_pages` is 0.
    pub gpu_mem_utilization: f64,
}

impl Default for DriverSection {
    fn default() -> Self {
        DriverSection {
            kind: "portable".into(),
            kv_page_size: 32,
            kv_cache_dtype: "auto".into(),
            gpu_mem_utilization: 0.90,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSection {
    pub max_forward_tokens: usize,
    pub max_forward_requests: usize,
    pub kv_pages: usize,
    /// Batches staged while one runs (0: plan only when the driver is idle).
    pub speculation_depth: usize,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            max_forward_tokens: 10240,
            max_forward_requests: 512,
            kv_pages: 1024,
            speculation_depth: 1,
        }
    }
}

impl ModelSection {
    pub fn scheduler_config(&self) -> crate::scheduler::SchedulerConfig {
        let s = &self.scheduler;
        crate::scheduler::SchedulerConfig {
            max_forward_tokens: s.max_forward_tokens,
            max_forward_requests: s.max_forward_requests,
            kv_pages: s.kv_pages,
            gpu_mem_utilization: self.driver.gpu_mem_utilization,
            speculation_depth: s.speculation_depth,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    /// When set, every endpoint but `/health` needs
    /// `Authorization: Bearer TOKEN`.
    pub auth_token: Option<String>,
    /// Longest prompt (in tokens) a completion request may have.
    pub max_prompt_tokens: usize,
    /// Seconds an inferlet may run, waiting included.
    pub inferlet_time_limit_s: f64,
    /// MiB of linear memory an inferlet may use.
    pub inferlet_memory_mib: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            host: "127.0.0.1".into(),
            port: 8080,
            auth_token: None,
            max_prompt_tokens: 8192,
            inferlet_time_limit_s: 600.0,
            inferlet_memory_mib: 512,
        }
    }
}

impl ServerSection {
    pub fn inferlet_limits(&self) -> Limits {
        Limits {
            time: Duration::from_secs_f64(self.inferlet_time_limit_s),
            memory: self.inferlet_memory_mib << 20,
        }
    }
}

impl ServeConfig {
    /// Parses and checks a config file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let cfg: ServeConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message();
            match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    format!("{origin}:{line}:{col}: {msg}")
                }
                None => format!("{origin}: {msg}"),
            }
        })?;
        cfg.check().map_err(|e| format!("{origin}: {e}"))?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn check(&self) -> Result<(), String> {
        if self.model.path.is_none() && self.model.name.is_none() {
            return Err(
                "[model] needs `path` (a model directory or GGUF file) or `name` (a known model)"
                    .into(),
            );
        }
        let kind = self.model.driver.kind.as_str();
        if !matches!(kind, "portable" | "cuda") {
            return Err(format!(
                "[model.driver] kind = \"{kind}\": expected \"portable\" or \"cuda\""
            ));
        }
        if self.model.driver.kv_page_size == 0 {
            return Err("[model.driver] kv_page_size must be at least 1".into());
        }
        let s = &self.model.scheduler;
        let g = self.model.driver.gpu_mem_utilization;
        if !(g > 0.0 && g <= 1.0) {
            return Err(format!(
                "[model.driver] gpu_mem_utilization = {g}: give a fraction in (0, 1]"
            ));
        }
        for (key, v) in [
            ("max_forward_tokens", s.max_forward_tokens),
            ("max_forward_requests", s.max_forward_requests),
        ] {
            if v == 0 {
                return Err(format!("[model.scheduler] {key} must be at least 1"));
            }
        }
        let t = self.server.inferlet_time_limit_s;
        if !(t > 0.0 && t.is_finite()) {
            return Err(format!(
                "[server] inferlet_time_limit_s = {t}: give a positive number of seconds"
            ));
        }
        if self.server.max_prompt_tokens == 0 {
            return Err("[server] max_prompt_tokens must be at least 1".into());
        }
        Ok(())
    }

    /// The model id clients name: `[model] name`, else the file name of
    /// the path.
    pub fn model_id(&self) -> String {
        model_id(self.model.name.as_deref(), self.model.path.as_deref())
    }
}

/// `name` if given, else the last component of `path` without a GGUF
/// extension.
pub fn model_id(name: Option<&str>, path: Option<&Path>) -> String {
    if let Some(n) = name {
        return n.to_string();
    }
    let Some(p) = path else {
        return "model".into();
    };
    let stem = match p.extension().and_then(|e| e.to_str()) {
        Some("gguf") => p.file_stem(),
        _ => p.file_name(),
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let cfg = ServeConfig::parse(
            r#"
[model]
path = "tests/fixtures/llama"
[model.driver]
kind = "cuda"
kv_page_size = 16
kv_cache_dtype = "bf16"
gpu_mem_utilization = 0.5
[model.scheduler]
max_forward_tokens = 4096
max_forward_requests = 64
kv_pages = 2048
speculation_depth = 2
[server]
host = "0.0.0.0"
port = 9000
auth_token = "t"
max_prompt_tokens = 100
inferlet_time_limit_s = 5
inferlet_memory_mib = 64
"#,
            "pie.toml",
        )
        .unwrap();
        assert_eq!(cfg.model.driver.kind, "cuda");
        assert_eq!(cfg.model.scheduler.speculation_depth, 2);
        let sc = cfg.model.scheduler_config();
        assert_eq!((sc.kv_pages, sc.speculation_depth), (2048, 2));
        assert_eq!(sc.gpu_mem_utilization, 0.5);
        assert_eq!(cfg.server.port, 9000);
        assert_eq!(cfg.server.inferlet_limits().memory, 64 << 20);
        assert_eq!(cfg.model_id(), "llama");
    }

    #[test]
    fn defaults_fill_missing_tables() {
        let cfg = ServeConfig::parse("[model]\nname = \"smollm2\"\n", "pie.toml").unwrap();
        assert_eq!(cfg.model.scheduler.max_forward_tokens, 10240);
        assert_eq!(cfg.model.scheduler.max_forward_requests, 512);
        assert_eq!(cfg.model.scheduler.speculation_depth, 1);
        assert_eq!(cfg.server.host, "127.0.0.1");
        assert_eq!(cfg.model_id(), "smollm2");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = ServeConfig::parse(
            "[model]\npath = \"x\"\n[model.scheduler]\nmax_forward_tokenz = 5\n",
            "pie.toml",
        )
        .unwrap_err();
        assert!(err.contains("max_forward_tokenz"), "{err}");
        assert!(err.starts_with("pie.toml:4:"), "{err}");
        let err = ServeConfig::parse("[model]\npath = \"x\"\n[serverr]\n", "pie.toml").unwrap_err();
        assert!(err.contains("serverr"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        let err = ServeConfig::parse(
            "[model]\npath = \"x\"\n[model.driver]\nkind = \"tpu\"\n",
            "pie.toml",
        )
        .unwrap_err();
        assert!(err.contains("tpu"), "{err}");
        let err = ServeConfig::parse("[server]\nport = 1\n", "pie.toml").unwrap_err();
        assert!(err.contains("model"), "{err}");
    }
}
