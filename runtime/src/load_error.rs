//! Errors reading model files. Every message names the file and the key or
//! tensor involved.

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl LoadError {
    pub fn file(path: &std::path::Path, message: impl Into<String>) -> Self {
        LoadError::File {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}
