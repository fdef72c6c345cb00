//! The HTTP server (axum): OpenAI-compatible completions with SSE
//! streaming, a WebSocket protocol for inferlets, `/metrics` and bearer
//! auth, all on one [`Scheduler`].
//!
//! | route | what |
//! |---|---|
//! | `GET /health` | `{"status":"ok"}`, never behind auth |
//! | `GET /metrics` | Prometheus text ([`metrics`]) |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the served model |
//! | `POST /v1/chat/completions`, `POST /v1/completions` | [`handlers`], generation in [`generate`] |
//! | `GET /v1/inferlets/ws` | [`ws`] |

pub mod auth;
pub mod client;
pub mod config;
pub mod detokenize;
pub mod error;
pub mod generate;
pub mod handlers;
pub mod metrics;
pub mod openai;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::inferlet::{InferletRuntime, Limits};
use crate::scheduler::Scheduler;
use error::ApiError;
use metrics::Metrics;

/// How the server behaves (the `[server]` table, resolved).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The id clients name in `model`.
    pub model_id: String,
    pub auth_token: Option<String>,
    pub max_prompt_tokens: usize,
    pub inferlet_limits: Limits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "model".into(),
            auth_token: None,
            max_prompt_tokens: 8192,
            inferlet_limits: Limits::default(),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub sched: Scheduler,
    pub inferlets: Arc<InferletRuntime>,
    pub programs: Arc<ws::Programs>,
    pub metrics: Arc<Metrics>,
    pub opts: Arc<ServerOptions>,
}

impl AppState {
    pub fn new(sched: Scheduler, opts: ServerOptions) -> Result<Self, String> {
        let inferlets = InferletRuntime::new(sched.clone())?;
        Ok(AppState {
            sched,
            inferlets: Arc::new(inferlets),
            programs: Default::default(),
            metrics: Default::default(),
            opts: Arc::new(opts),
        })
    }
}

/// Every route, with auth and request counting.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{model}", get(handlers::model))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/inferlets/ws", get(ws::upgrade))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found(
        "unknown_route",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

/// Counts responses by route and status for `/metrics`.
async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    state.metrics.record_request(&route, resp.status().as_u16());
    resp
}

/// Serves on `listener` until `shutdown` completes; requests in flight
/// finish first.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server: {e}"))
}

/// A server running on a task of the current tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl RunningServer {
    /// Binds `addr` (port 0: any free port) and starts serving.
    pub async fn start(sched: Scheduler, opts: ServerOptions, addr: &str) -> Result<Self, String> {
        let state = AppState::new(sched, opts)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        Ok(RunningServer {
            addr,
            state,
            stop: Some(stop),
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets requests in flight finish, and waits.
    pub async fn shutdown(mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| format!("server task: {e}"))?
    }
}
