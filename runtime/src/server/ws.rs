//! The inferlet WebSocket protocol (`GET /v1/inferlets/ws`). JSON text
//! messages; every request may carry an `id` that its answer repeats.
//!
//! Client to server:
//! - `{"type":"upload","id":..,"wasm_base64":"..."}`, or a binary frame
//!   holding the component itself: compiles it; answers
//!   `{"type":"uploaded","id":..,"program":"<sha256>"}`.
//! - `{"type":"launch","id":..,"program":"<sha256>","args":[..]}`: starts
//!   an instance; answers `{"type":"launched","id":..,"instance":N}`.
//! - `{"type":"send","id":..,"instance":N,"message":"..."}`: a message to
//!   the instance (its `receive`).
//!
//! Server to client, for each launched instance:
//! `{"type":"message","instance":N,"message":".."}`,
//! `{"type":"log","instance":N,"level":"info","message":".."}`, and last
//! `{"type":"exit","instance":N,"ok":true}` or
//! `{"type":"exit","instance":N,"ok":false,"error":".."}`.
//!
//! A bad request gets `{"type":"error","id":..,"message":".."}` and the
//! socket stays open. Programs are shared by every connection; instances
//! keep running when their socket closes (their `receive` then returns
//! none).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use wasmtime::component::Component;

use super::AppState;
use crate::inferlet::Event;

/// Compiled components by the hex SHA-256 of their bytes.
#[derive(Default)]
pub struct Programs {
    map: Mutex<HashMap<String, Component>>,
}

impl Programs {
    fn get(&self, hash: &str) -> Option<Component> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .cloned()
    }

    fn insert(&self, hash: String, c: Component) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash, c);
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request {
    Upload {
        wasm_base64: String,
    },
    Launch {
        program: String,
        #[serde(default)]
        args: Vec<String>,
    },
    Send {
        instance: u64,
        message: String,
    },
}

pub async fn upgrade(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(256 << 20)
        .on_upgrade(move |socket| session(state, socket))
}

/// One connection: reads requests, answers them, forwards instance events.
async fn session(state: AppState, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        while let Some(v) = out_rx.recv().await {
            if sink
                .send(Message::Text(v.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut inputs: HashMap<u64, mpsc::UnboundedSender<String>> = HashMap::new();
    while let Some(Ok(msg)) = stream.next().await {
        let reply = match msg {
            Message::Text(text) => handle_text(&state, text.as_str(), &out, &mut inputs).await,
            Message::Binary(bytes) => upload(&state, bytes.to_vec(), Value::Null).await,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if out.send(reply).is_err() {
            break;
        }
    }
    // Instances keep their copies of `out`: stop the writer instead of
    // waiting for them.
    drop(inputs);
    writer.abort();
}

fn error(id: &Value, message: impl Into<String>) -> Value {
    json!({"type": "error", "id": id, "message": message.into()})
}

async fn handle_text(
    state: &AppState,
    text: &str,
    out: &mpsc::UnboundedSender<Value>,
    inputs: &mut HashMap<u64, mpsc::UnboundedSender<String>>,
) -> Value {
    let raw: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return error(&Value::Null, format!("malformed JSON message: {e}")),
    };
    let id = raw.get("id").cloned().unwrap_or(Value::Null);
    let req: Request = match serde_json::from_value(raw) {
        Ok(r) => r,
        Err(e) => {
            return error(
                &id,
                format!("invalid request: {e} (types: upload, launch, send)"),
            )
        }
    };
    match req {
        Request::Upload { wasm_base64 } => {
            match base64::engine::general_purpose::STANDARD.decode(wasm_base64.trim()) {
                Ok(bytes) => upload(state, bytes, id).await,
                Err(e) => error(&id, format!("wasm_base64 is not valid base64: {e}")),
            }
        }
        Request::Launch { program, args } => {
            let Some(component) = state.programs.get(&program) else {
                return error(
                    &id,
                    format!("no program {program}: upload it first (its id is the SHA-256 of the component)"),
                );
            };
            let instance =
                state
                    .inferlets
                    .launch(&component, args, state.opts.inferlet_limits.clone());
            state
                .metrics
                .inferlets_launched
                .fetch_add(1, Ordering::Relaxed);
            let n = instance.id;
            inputs.insert(n, instance.input);
            forward_events(n, instance.events, out.clone());
            json!({"type": "launched", "id": id, "instance": n})
        }
        Request::Send { instance, message } => match inputs.get(&instance) {
            Some(tx) if tx.send(message).is_ok() => json!({"type": "sent", "id": id}),
            Some(_) => error(&id, format!("instance {instance} has ended")),
            None => error(
                &id,
                format!("no instance {instance} was launched on this connection"),
            ),
        },
    }
}

/// Compiles a component off the async threads and remembers it.
async fn upload(state: &AppState, bytes: Vec<u8>, id: Value) -> Value {
    let hash = hex(&Sha256::digest(&bytes));
    if state.programs.get(&hash).is_some() {
        return json!({"type": "uploaded", "id": id, "program": hash});
    }
    let rt = state.inferlets.clone();
    let compiled = tokio::task::spawn_blocking(move || rt.compile(&bytes)).await;
    match compiled {
        Ok(Ok(c)) => {
            state.programs.insert(hash.clone(), c);
            json!({"type": "uploaded", "id": id, "program": hash})
        }
        Ok(Err(e)) => error(&id, format!("upload refused: {e}")),
        Err(e) => error(&id, format!("upload failed: {e}")),
    }
}

fn forward_events(
    instance: u64,
    mut events: mpsc::UnboundedReceiver<Event>,
    out: mpsc::UnboundedSender<Value>,
) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let v = match e {
                Event::Message(m) => json!({"type": "message", "instance": instance, "message": m}),
                Event::Log { level, text } => {
                    json!({"type": "log", "instance": instance, "level": level, "message": text})
                }
                Event::Exit(Ok(())) => json!({"type": "exit", "instance": instance, "ok": true}),
                Event::Exit(Err(err)) => {
                    json!({"type": "exit", "instance": instance, "ok": false, "error": err})
                }
            };
            // The socket may be gone: the instance keeps running, unheard.
            let _ = out.send(v);
        }
    });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
