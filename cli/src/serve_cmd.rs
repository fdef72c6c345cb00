//! `pie serve`: the HTTP server (OpenAI-compatible API, inferlet
//! WebSocket, /metrics) on one model, from flags or a `pie.toml`.

use std::path::PathBuf;

use clap::Args;
use pie_driver::KvDType;
use pie_runtime::server::config::{self, ServeConfig};
use pie_runtime::server::{self, AppState, ServerOptions};

use crate::model_cmds::{self, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// A model directory, GGUF file or known model name.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A pie.toml with [model], [model.driver], [model.scheduler] and
    /// [server] tables; flags given beside it override its [server] values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the model runs: `portable` (CPU) or `cuda`.
    #[arg(long, value_parser = ["portable", "cuda"])]
    driver: Option<String>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// Require `Authorization: Bearer TOKEN` on every route but /health.
    #[arg(long)]
    auth_token: Option<String>,
    /// Pages in the KV cache (0: as many as the device memory holds).
    #[arg(long)]
    kv_pages: Option<usize>,
    /// Longest prompt, in tokens.
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
}

pub fn serve(args: ServeArgs) -> Result<(), String> {
    let mut cfg = match &args.config {
        Some(path) => ServeConfig::load(path)?,
        None => ServeConfig {
            model: config::ModelSection {
                path: args.model.clone(),
                ..Default::default()
            },
            ..Default::default()
        },
    };
    if let Some(d) = &args.driver {
        cfg.model.driver.kind = d.clone();
    }
    if let Some(h) = &args.host {
        cfg.server.host = h.clone();
    }
    if let Some(p) = args.port {
        cfg.server.port = p;
    }
    if let Some(t) = &args.auth_token {
        cfg.server.auth_token = Some(t.clone());
    }
    if let Some(n) = args.kv_pages {
        cfg.model.scheduler.kv_pages = n;
    }
    if let Some(n) = args.max_prompt_tokens {
        cfg.server.max_prompt_tokens = n;
    }
    let kv_cache_dtype = KvDType::from_name(&cfg.model.driver.kv_cache_dtype).ok_or_else(|| {
        format!(
            "kv_cache_dtype = \"{}\": unknown (known: {})",
            cfg.model.driver.kv_cache_dtype,
            KvDType::NAMES.join(", ")
        )
    })?;
    let model = ModelArgs {
        model: cfg
            .model
            .path
            .clone()
            .or_else(|| cfg.model.name.clone().map(PathBuf::from)),
        config: None,
        driver: cfg.model.driver.kind.clone(),
        kv_page_size: cfg.model.driver.kv_page_size,
        kv_cache_dtype,
        runtime_quant: None,
    };
    let sched = model_cmds::start_scheduler(&model, cfg.model.scheduler_config())?;
    let opts = ServerOptions {
        model_id: cfg.model_id(),
        auth_token: cfg.server.auth_token.clone(),
        max_prompt_tokens: cfg.server.max_prompt_tokens,
        inferlet_limits: cfg.server.inferlet_limits(),
    };
    let state = AppState::new(sched, opts)?;
    let tokio = tokio::runtime::Runtime::new().map_err(|e| format!("tokio: {e}"))?;
    tokio.block_on(async move {
        let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        // Listening for Ctrl-C before the address is printed: a script that
        // reads the address and interrupts at once gets a clean shutdown.
        let interrupted = interrupt()?;
        println!(
            "pie serve: model `{}` on http://{local} (auth {})",
            cfg.model_id(),
            if cfg.server.auth_token.is_some() {
                "on"
            } else {
                "off"
            }
        );
        server::serve(listener, state, async move {
            interrupted.await;
            eprintln!("pie serve: shutting down");
        })
        .await
    })
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM; the handlers are installed now.
#[cfg(unix)]
fn interrupt() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn interrupt() -> Result<impl std::future::Future<Output = ()>, String> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
