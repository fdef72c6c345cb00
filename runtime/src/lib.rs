//! Pie's runtime: loading Hugging Face model directories, tokenizers and
//! chat templates, and running generated models on a driver.

pub mod catalog;
pub mod chat_template;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod heap;
pub mod inferlet;
mod load_error;
pub mod model_dir;
pub mod model_source;
pub mod random_weights;
pub mod registry;
pub mod safetensors_source;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;

pub use engine::{Engine, LoadOptions, RowOutput};
pub use error::PieError;
pub use load_error::LoadError;
