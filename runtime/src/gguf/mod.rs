//! Models in a single GGUF file: container parsing, metadata → config,
//! tensor names and layouts, and the embedded tokenizer and chat template.

pub mod config;
pub mod file;
pub mod names;
pub mod tokenizer;

pub use file::{GgufFile, MetaValue};
pub use names::GgufSource;
