//! The models crate's error type: every variant names the file, key or tensor at fault.

use std::path::PathBuf;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read.
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
    /// A config file is not valid JSON of the expected form.
    #[error("{}: invalid config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// A config key or value that this engine does not implement.
    #[error("{}: unsupported `{key}` = {value}: {hint}", path.display())]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        hint: String,
    },
    /// Weights that are missing, mis-shaped or unreadable.
    #[error("{0}")]
    Weights(String),
    /// An input tensor of the wrong shape or content.
    #[error("{0}")]
    Input(String),
    /// An error from candle while computing.
    #[error(transparent)]
    Candle(candle_core::Error),
}

/// The models crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        Error::Io {
            path: path.into(),
            msg: err.to_string(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        // candle attaches a backtrace when RUST_BACKTRACE is set; users need the message.
        match e {
            candle_core::Error::WithBacktrace { inner, .. } => Error::Candle(*inner),
            e => Error::Candle(e),
        }
    }
}
