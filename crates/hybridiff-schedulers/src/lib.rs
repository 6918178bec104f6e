//! Diffusers-faithful noise schedulers: DDIM, Euler, DPM-Solver++ 2M and
//! flow-matching Euler, configured from a diffusers `scheduler_config.json`.
//!
//! Schedules are computed with the same float32/float64 roundings as diffusers
//! (which mixes torch float32 tensors and numpy float64 arrays), so timesteps
//! and sigmas match its values to float32 precision.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::Tensor;

mod common;
mod config;
mod ddim;
mod dpm;
mod euler;
mod flow;
mod numerics;

pub use config::{Objective, SchedulerConfig};
pub use ddim::DDIMScheduler;
pub use dpm::DPMSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use flow::FlowMatchEulerDiscreteScheduler;

/// Errors from reading a scheduler config or building a scheduler.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read scheduler config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON.
    #[error("cannot parse scheduler config {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A key holds a value of the wrong type or shape.
    #[error("scheduler config {path}: invalid value for `{key}`: {value} (expected {expected})")]
    InvalidValue {
        path: PathBuf,
        key: String,
        value: String,
        expected: &'static str,
    },
    /// A key holds a value that diffusers accepts but this crate does not implement.
    #[error("scheduler config {path}: unsupported value for `{key}`: {value} ({reason})")]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },
    /// The number of inference steps is zero or exceeds the training schedule.
    #[error(
        "cannot run {steps} inference steps with scheduler config {path}: \
         need 1..={num_train_timesteps} (num_train_timesteps)"
    )]
    NumSteps {
        path: PathBuf,
        steps: usize,
        num_train_timesteps: usize,
    },
    /// The spacing and `steps_offset` put a timestep outside the training schedule.
    #[error(
        "scheduler config {path}: with {steps} steps the timestep {timestep} falls outside \
         0..{num_train_timesteps} (check `steps_offset` and `timestep_spacing`)"
    )]
    TimestepOutOfRange {
        path: PathBuf,
        steps: usize,
        timestep: i64,
        num_train_timesteps: usize,
    },
    /// A scheduler kind name that [`SchedulerKind::from_str`] does not know.
    #[error("unknown scheduler kind {0:?}: expected one of ddim, euler, dpmpp-2m, flow-euler")]
    UnknownKind(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The implemented samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// diffusers' `DDIMScheduler` (eta = 0).
    Ddim,
    /// diffusers' `EulerDiscreteScheduler`.
    Euler,
    /// diffusers' `DPMSolverMultistepScheduler` as DPM-Solver++ 2M.
    DpmPp2M,
    /// diffusers' `FlowMatchEulerDiscreteScheduler`.
    FlowEuler,
}

/// The training objective a sampler integrates, which must be the model's: a diffusion
/// model predicts the added noise (`epsilon`) or `v` (`v_prediction`), and DDIM, Euler and
/// DPM-Solver read either from the config's `prediction_type`; a flow-matching model (SD3,
/// rectified flow) predicts a velocity, which only the flow-matching samplers step. A sampler
/// of the other family runs without error and ruins the image, so it is refused
/// ([`SchedulerConfig::objective`] says what a model was trained for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Denoising diffusion with an `epsilon`, `v_prediction` or `sample` prediction.
    Diffusion,
    /// Flow matching: the model predicts the velocity from noise to data.
    FlowMatching,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Diffusion => "diffusion (epsilon / v-prediction)",
            Self::FlowMatching => "flow matching",
        })
    }
}

impl SchedulerKind {
    /// Every sampler, in the order `--help` lists them.
    pub const ALL: [SchedulerKind; 4] = [Self::Ddim, Self::Euler, Self::DpmPp2M, Self::FlowEuler];

    /// The training objective this sampler steps (one line per kind: a new kind adds its
    /// family here and is paired with models by it).
    pub fn family(self) -> Family {
        match self {
            Self::Ddim | Self::Euler | Self::DpmPp2M => Family::Diffusion,
            Self::FlowEuler => Family::FlowMatching,
        }
    }

    /// The name used by [`FromStr`] and [`fmt::Display`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::DpmPp2M => "dpmpp-2m",
            Self::FlowEuler => "flow-euler",
        }
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddim" => Ok(Self::Ddim),
            "euler" => Ok(Self::Euler),
            "dpmpp-2m" => Ok(Self::DpmPp2M),
            "flow-euler" => Ok(Self::FlowEuler),
            _ => Err(Error::UnknownKind(s.to_string())),
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sampler with its inference schedule already set.
pub trait Scheduler: Send {
    /// The inference timesteps, as diffusers' `scheduler.timesteps` after `set_timesteps`.
    fn timesteps(&self) -> &[f64];
    /// The factor that scales unit-variance initial noise (1 unless overridden).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the denoiser input at step `step_index` (the identity unless overridden).
    fn scale_model_input(
        &self,
        sample: &Tensor,
        _step_index: usize,
    ) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    /// One step; step_index is i in 0..num_steps (schedulers keep their own multistep history).
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor>;
    /// The timestep value to feed the denoiser at step i (what diffusers passes as `t`).
    fn timestep(&self, step_index: usize) -> f64 {
        self.timesteps()[step_index]
    }
    /// The noise levels, one more than the steps (the last is the final level), where the sampler has them.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
}

/// Builds a `kind` sampler from `cfg` with `num_steps` inference steps; every
/// config key the sampler reads is checked here.
pub fn build(
    cfg: &SchedulerConfig,
    kind: SchedulerKind,
    num_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DDIMScheduler::new(cfg, num_steps)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(cfg, num_steps)?),
        SchedulerKind::DpmPp2M => Box::new(DPMSolverMultistepScheduler::new(cfg, num_steps)?),
        SchedulerKind::FlowEuler => Box::new(FlowMatchEulerDiscreteScheduler::new(cfg, num_steps)?),
    })
}
