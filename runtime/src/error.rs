//! The runtime's user-facing errors. Each names the file, key, tensor or op
//! involved; the CLI prints them as one message and exits non-zero.

use pie_driver::DriverError;

#[derive(Debug, thiserror::Error)]
pub enum PieError {
    #[error(transparent)]
    Load(#[from] crate::LoadError),
    #[error("{0}")]
    Spec(#[from] pie_archspec::Diagnostics),
    #[error("{0}")]
    Bind(#[from] pie_archspec::BindError),
    #[error("{0}")]
    Driver(#[from] DriverError),
    #[error("{config}: model_type `{model_type}` is not supported (supported: {known})")]
    UnsupportedModelType {
        config: String,
        model_type: String,
        known: String,
    },
    #[error("architecture `{arch}` uses op `{op}` ({origin}), which the `{driver}` driver does not support yet")]
    UnsupportedOp {
        op: &'static str,
        driver: &'static str,
        arch: String,
        origin: String,
    },
    #[error("{0}")]
    Input(String),
}
