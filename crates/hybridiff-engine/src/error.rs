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
    /// A value a request may choose (steps, size, guidance) that this job cannot run with;
    /// displayed for the command line, see [`Refusal`].
    #[error("{}", .0.flags)]
    Refused(Refusal),
    /// The job was cancelled by its caller (see [`crate::Runner::denoise`]).
    #[error("the job was cancelled")]
    Cancelled,
    /// A file that could not be read or written.
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// What a single image request chooses: `generate`'s flags, or the fields of a service's
/// request (OpenAI's images API). Every check of a value that differs between requests
/// names one of these, so that the same check can answer a command-line user and an API
/// client each in their own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    /// `--steps`, `num_inference_steps`.
    Steps,
    /// `--height`/`--width`, `size` (`"WIDTHxHEIGHT"`).
    Size,
    /// `--guidance`, `guidance_scale`.
    Guidance,
}

impl Field {
    /// The command-line flag.
    pub fn flag(self) -> &'static str {
        match self {
            Field::Steps => "--steps",
            Field::Size => "--height/--width",
            Field::Guidance => "--guidance",
        }
    }

    /// The request field of the images API (`param` of its errors).
    pub fn param(self) -> &'static str {
        match self {
            Field::Steps => "num_inference_steps",
            Field::Size => "size",
            Field::Guidance => "guidance_scale",
        }
    }
}

/// A request value the job refuses, said twice: to the one who runs the command (naming
/// flags, and the flags of the run's own setup that could change instead) and to a
/// service's client, who can change only the request's own fields (naming the API field
/// and the service's setup as a given).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub field: Field,
    /// For the command line, e.g. `--steps 1: hybrid needs at least 2 steps ...`.
    pub flags: String,
    /// For an API client, e.g. `` `num_inference_steps` 1: this service's strategy (hybrid) needs at least 2 steps ``.
    pub request: String,
}

impl Error {
    /// [`Error::Refused`] with both wordings.
    pub fn refused(field: Field, flags: impl Into<String>, request: impl Into<String>) -> Self {
        Error::Refused(Refusal {
            field,
            flags: flags.into(),
            request: request.into(),
        })
    }

    /// The message for a service's client: a refusal's API wording, else the message.
    pub fn for_request(&self) -> String {
        match self {
            Error::Refused(r) => r.request.clone(),
            e => e.to_string(),
        }
    }

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
