//! The text crate's error type: every variant names the file, folder, key or tensor at
//! fault, so that a user with a broken model folder knows what to fix.

use std::path::PathBuf;

/// Errors from loading tokenizers or text encoders, or from encoding a prompt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A loader error from `hybridiff-models` (weights, configs); it names its file.
    #[error(transparent)]
    Model(#[from] hybridiff_models::Error),
    /// A file or folder that is missing or unreadable.
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
    /// A config or tokenizer file that is not of the expected form.
    #[error("{}: invalid config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// A config key or value that this crate does not implement.
    #[error("{}: unsupported `{key}` = {value}: {hint}", path.display())]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        hint: String,
    },
    /// The `tokenizers` crate failed on a tokenizer folder or text.
    #[error("{}: tokenizer error: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    /// A candle error, with what was being done (and on which folder) when it happened.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
}

/// The text crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Io {
            path: path.into(),
            msg: msg.to_string(),
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.to_string(),
        }
    }

    pub(crate) fn tokenizer(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Tokenizer {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}

/// Attaches context to candle errors.
pub(crate) trait CandleContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| {
            // candle attaches a backtrace when RUST_BACKTRACE is set; users need the message.
            let source = match e {
                candle_core::Error::WithBacktrace { inner, .. } => *inner,
                e => e,
            };
            Error::Candle {
                context: what(),
                source,
            }
        })
    }
}
