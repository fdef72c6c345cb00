//! The `runtime` interface: arguments, identity, messages with the client,
//! logging.

use super::bindings::runtime::{Host, Level};
use super::state::InstanceState;
use super::Event;

impl Host for InstanceState {
    async fn get_arguments(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self.args.clone())
    }

    async fn instance_id(&mut self) -> wasmtime::Result<String> {
        Ok(self.id.to_string())
    }

    async fn send(&mut self, message: String) -> wasmtime::Result<()> {
        self.emit(Event::Message(message));
        Ok(())
    }

    async fn receive(&mut self) -> wasmtime::Result<Option<String>> {
        self.flush();
        Ok(self.inbox.recv().await)
    }

    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.emit(Event::Log {
            level,
            text: message,
        });
        Ok(())
    }
}
