//! A small client for the server: plain HTTP/1.1 (one connection per
//! request), SSE streams, and the inferlet WebSocket protocol. Used by the
//! tests; handy for tools.

use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use futures_util::{SinkExt, StreamExt};

/// Talks to one server (`host:port`).
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    token: Option<String>,
}

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("response is not JSON ({e}): {}", self.text()))
    }
}

impl Client {
    /// `addr` as `host:port`.
    pub fn new(addr: impl Into<String>) -> Self {
        Client {
            addr: addr.into(),
            token: None,
        }
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<Incoming>, String> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.addr)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))
    }

    /// Any request, read whole.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<HttpResponse, String> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{path}: reading the body: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(HttpResponse {
            status,
            content_type,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Result<HttpResponse, String> {
        self.request("GET", path, Vec::new()).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<HttpResponse, String> {
        self.request("POST", path, body.to_string().into_bytes())
            .await
    }

    /// Posts a streaming request; the stream yields each event's data.
    pub async fn post_sse(&self, path: &str, body: &Value) -> Result<SseStream, String> {
        let resp = self
            .send("POST", path, body.to_string().into_bytes())
            .await?;
        Ok(SseStream {
            status: resp.status().as_u16(),
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// Runs a chat completion with the whole response; returns the reply.
    pub async fn chat(&self, model: &str, prompt: &str, extra: Value) -> Result<Value, String> {
        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
        });
        merge(&mut body, extra);
        let resp = self.post_json("/v1/chat/completions", &body).await?;
        if resp.status != 200 {
            return Err(format!("status {}: {}", resp.status, resp.text()));
        }
        resp.json()
    }

    /// Opens the inferlet WebSocket.
    pub async fn websocket(&self) -> Result<WsClient, String> {
        let url = format!("ws://{}/v1/inferlets/ws", self.addr);
        let mut req = url.into_client_request().map_err(|e| e.to_string())?;
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}").parse().map_err(|_| "bad token")?;
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        Ok(WsClient { ws })
    }
}

/// Adds the keys of `extra` (an object) to `body`.
pub fn merge(body: &mut Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
}

/// The events of a server-sent-event response.
pub struct SseStream {
    pub status: u16,
    body: Incoming,
    buf: Vec<u8>,
}

impl SseStream {
    /// The next event's `data`, or none at the end of the body.
    pub async fn next_data(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(end) = find(&self.buf, b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(event).map_err(|e| format!("event not UTF-8: {e}"))?;
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                None => {
                    return match self.buf.iter().all(u8::is_ascii_whitespace) {
                        true => Ok(None),
                        false => Err(format!(
                            "stream ended inside an event: {}",
                            String::from_utf8_lossy(&self.buf)
                        )),
                    }
                }
                Some(Err(e)) => return Err(format!("reading the stream: {e}")),
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        self.buf.extend_from_slice(d);
                    }
                }
            }
        }
    }

    /// Every event's data up to the end of the stream.
    pub async fn collect(mut self) -> Result<Vec<String>, String> {
        let mut all = Vec::new();
        while let Some(d) = self.next_data().await? {
            all.push(d);
        }
        Ok(all)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The text of a completion stream: the concatenated deltas, the finish
/// reason, and whether it ended with `[DONE]`.
pub fn stream_text(events: &[String]) -> Result<(String, Option<String>, bool), String> {
    let mut text = String::new();
    let mut finish = None;
    let mut done = false;
    for e in events {
        if e == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(e).map_err(|err| format!("{err}: {e}"))?;
        if v.get("error").is_some() {
            return Err(format!("error in stream: {e}"));
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
                text += t;
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    Ok((text, finish, done))
}

/// Each choice's concatenated text and finish reason in a stream, by
/// index.
pub fn stream_choices(events: &[String]) -> Result<Vec<(String, Option<String>)>, String> {
    let mut choices: Vec<(String, Option<String>)> = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).map_err(|err| format!("{err}: {e}"))?;
        if v.get("error").is_some() {
            return Err(format!("error in stream: {e}"));
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().ok_or("a choice without index")? as usize;
            if choices.len() <= i {
                choices.resize(i + 1, (String::new(), None));
            }
            if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
                choices[i].0 += t;
            }
            if let Some(f) = c["finish_reason"].as_str() {
                choices[i].1 = Some(f.to_string());
            }
        }
    }
    Ok(choices)
}

/// The inferlet WebSocket, from the client side.
pub struct WsClient {
    ws: WebSocketStream<TcpStream>,
}

/// What an inferlet said before it exited.
#[derive(Debug, Clone, PartialEq)]
pub struct InferletRun {
    pub messages: Vec<String>,
    pub logs: Vec<String>,
    pub status: Result<(), String>,
}

impl WsClient {
    pub async fn send_json(&mut self, v: &Value) -> Result<(), String> {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .map_err(|e| format!("WebSocket send: {e}"))
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .map_err(|e| format!("WebSocket send: {e}"))
    }

    /// The next JSON message (within `timeout`).
    pub async fn recv(&mut self, timeout: Duration) -> Result<Value, String> {
        loop {
            let msg = tokio::time::timeout(timeout, self.ws.next())
                .await
                .map_err(|_| format!("no WebSocket message within {timeout:?}"))?;
            match msg {
                None => return Err("the WebSocket closed".into()),
                Some(Err(e)) => return Err(format!("WebSocket: {e}")),
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str()).map_err(|e| format!("{e}: {t}"))
                }
                Some(Ok(Message::Close(_))) => return Err("the WebSocket closed".into()),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Uploads a component as a binary frame; returns its program id, or
    /// the server's error message.
    pub async fn upload(&mut self, wasm: Vec<u8>) -> Result<String, String> {
        self.send_binary(wasm).await?;
        let v = self.recv(Duration::from_secs(120)).await?;
        match v["type"].as_str() {
            Some("uploaded") => Ok(v["program"].as_str().unwrap_or_default().to_string()),
            _ => Err(v["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(v.to_string())),
        }
    }

    /// Launches an uploaded program; returns the instance number.
    pub async fn launch(&mut self, program: &str, args: &[&str]) -> Result<u64, String> {
        self.send_json(
            &json!({"type": "launch", "id": "launch", "program": program, "args": args}),
        )
        .await?;
        let v = self.recv(Duration::from_secs(30)).await?;
        match v["type"].as_str() {
            Some("launched") => v["instance"].as_u64().ok_or(v.to_string()),
            _ => Err(v["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(v.to_string())),
        }
    }

    /// Collects an instance's messages and logs until it exits.
    pub async fn wait(&mut self, instance: u64, timeout: Duration) -> Result<InferletRun, String> {
        let mut run = InferletRun {
            messages: Vec::new(),
            logs: Vec::new(),
            status: Ok(()),
        };
        loop {
            let v = self.recv(timeout).await?;
            if v["instance"].as_u64() != Some(instance) {
                continue;
            }
            match v["type"].as_str() {
                Some("message") => run
                    .messages
                    .push(v["message"].as_str().unwrap_or("").into()),
                Some("log") => run.logs.push(v["message"].as_str().unwrap_or("").into()),
                Some("exit") => {
                    if v["ok"] != json!(true) {
                        run.status = Err(v["error"].as_str().unwrap_or("").to_string());
                    }
                    return Ok(run);
                }
                _ => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
