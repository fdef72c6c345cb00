//! WASI p2 for inferlets that import it (Python ones, built with
//! componentize-py, import clocks, random, stdio, filesystem and sockets).
//! The context grants nothing that reaches the host: no preopened
//! directories (so the filesystem interfaces find no roots), no network
//! (every socket address is refused and name lookup is off), no
//! environment variables, no arguments (an inferlet reads its own through
//! `runtime.get-arguments`), stdin closed. Clocks and random numbers are the
//! host's. What the inferlet writes to stdout and stderr becomes `Log`
//! events for its client, a line each. Rust inferlets import no WASI and
//! are linked exactly as before.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::state::InstanceState;
use super::Event;

/// The longest line kept from stdout or stderr; the rest is cut.
const MAX_LINE: usize = 16 << 10;

/// A WASI context that gives the inferlet nothing of the host.
pub fn sandbox(events: &mpsc::UnboundedSender<Event>) -> WasiCtx {
    WasiCtxBuilder::new()
        .stdout(LogStream {
            events: events.clone(),
            level: "info",
        })
        .stderr(LogStream {
            events: events.clone(),
            level: "warn",
        })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .build()
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// stdout or stderr of one inferlet: each line becomes a log event.
struct LogStream {
    events: mpsc::UnboundedSender<Event>,
    level: &'static str,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            events: self.events.clone(),
            level: self.level,
            line: Vec::new(),
        })
    }
}

struct LineWriter {
    events: mpsc::UnboundedSender<Event>,
    level: &'static str,
    line: Vec<u8>,
}

impl LineWriter {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        // A client that went away is no error (as with `runtime.log`).
        let _ = self.events.send(Event::Log {
            level: self.level,
            text,
        });
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        for &b in buf {
            match b {
                b'\n' => self.emit(),
                _ if self.line.len() < MAX_LINE => self.line.push(b),
                _ => {}
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Lines are sent as they end; a partial line waits for its end (or
        // for the stream to close), so `print(end="")` pieces stay together.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}
