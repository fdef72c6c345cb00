//! The Rust SDK for Pie inferlets: programs that run inside the server next
//! to the model and drive generation themselves.
//!
//! ```ignore
//! async fn main() -> Result<(), String> {
//!     let model = inferlet::Model::get();
//!     let mut ctx = inferlet::Context::new(&model);
//!     ctx.system("You are terse.");
//!     ctx.user("What is the capital of France?");
//!     let text = ctx.generate(inferlet::Sampler::greedy()).max_tokens(64).collect_text().await?;
//!     inferlet::send(&text);
//!     Ok(())
//! }
//! inferlet::main!(main);
//! ```
//!
//! Passes are submitted without waiting; several futures awaited together
//! ([`join_all`]) put their passes in the same driver batch.

pub mod bindings {
    wit_bindgen::generate!({
        world: "inferlet",
        path: "../../runtime/wit",
        pub_export_macro: true,
        export_macro_name: "export_inferlet",
        default_bindings_module: "inferlet::bindings",
    });
}

mod context;
mod executor;
mod forward;
mod generate;
mod model;
mod sampler;

pub use bindings::pie::inferlet::forward::Output;
pub use context::Context;
pub use executor::{block_on, join_all};
pub use forward::{tree_mask, OutputKind, Pass};
pub use generate::{Generate, Generated};
pub use model::Model;
pub use sampler::Sampler;

use bindings::pie::inferlet::runtime;
pub use runtime::Level;

/// The arguments the client launched the inferlet with.
pub fn args() -> Vec<String> {
    runtime::get_arguments()
}

/// Sends a message to the client.
pub fn send(message: &str) {
    runtime::send(message)
}

/// The client's next message; none once the client is gone.
pub fn receive() -> Option<String> {
    runtime::receive()
}

pub fn log(level: Level, message: &str) {
    runtime::log(level, message)
}

pub fn instance_id() -> String {
    runtime::instance_id()
}

/// Shared key-value store of the server.
pub mod store {
    pub use crate::bindings::pie::inferlet::store::{delete, get, list_keys, set};
}

/// The value after `--name` in `args`, if any.
pub fn arg_value(args: &[String], name: &str) -> Option<String> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).cloned()
}

/// Sends a panic's message to the client as an error log before the
/// inferlet traps (a wasm32-unknown-unknown panic prints nowhere).
#[doc(hidden)]
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        runtime::log(Level::Error, &format!("inferlet panicked: {info}"));
    }));
}

/// Exports `body` (an `async fn() -> Result<(), String>`) as the
/// inferlet's entry point.
#[macro_export]
macro_rules! main {
    ($body:path) => {
        struct __PieInferlet;
        impl $crate::bindings::Guest for __PieInferlet {
            fn run() -> ::core::result::Result<(), ::std::string::String> {
                $crate::install_panic_hook();
                $crate::block_on($body())
            }
        }
        $crate::bindings::export_inferlet!(__PieInferlet with_types_in $crate::bindings);
    };
}
