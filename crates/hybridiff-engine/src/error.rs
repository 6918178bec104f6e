//! The engine's error type. Messages name the file, flag or tensor at fault.

use std::path::PathBuf;

/// Errors from a denoising job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] hybridiff_models::Error),
    #[error(transparent)]
    Scheduler(#[from] hybridiff_schedulers::Error),
    #[error(transparent)]
    Comm(#[from] hybridiff_comm::Error),
    #[error(transparent)]
    Text(#[from] hybridiff_text::Error),
    #[error(transparent)]
    Candle(candle_core::Error),
    /// An input file or tensor that is not what the job needs.
    #[error("{0}")]
    Input(String),
    /// Options that do not fit together (world size, strategy, steps...).
    #[error("{0}")]
    Options(String),
    /// Values that became NaN or infinite during the run.
    #[error("{0}")]
    Numerics(String),
    /// A job whose estimated memory exceeds what the machine has (see `memory`).
    #[error("{0}")]
    Memory(String),
    /// A file that could not be read or written.
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Error::Io {
            path: path.into(),
            msg: e.to_string(),
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
