//! Diffusers-faithful noise schedulers, configured from a diffusers
//! `scheduler_config.json`: DDIM, Euler (with Karras sigmas), Euler Ancestral,
//! DPM-Solver++ 2M (with Karras sigmas, and its SDE variant), UniPC, LCM and
//! flow-matching Euler (static or dynamic shift, Karras sigmas).
//!
//! Schedules are computed with the same float32/float64 roundings as diffusers
//! (which mixes torch float32 tensors and numpy float64 arrays), so timesteps
//! and sigmas match its values to float32 precision.
//!
//! Stochastic samplers (Euler Ancestral, DPM-Solver++ 2M SDE, LCM) take each step's
//! noise as an argument ([`Scheduler::step`]): a scheduler is a pure function of its
//! inputs, and where the noise comes from is the caller's business (the engine draws it
//! from the seed and the step alone, so every rank and strategy sees the same noise).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::Tensor;

mod common;
mod config;
mod ddim;
mod dpm;
mod euler;
mod euler_ancestral;
mod flow;
mod lcm;
mod numerics;
mod unipc;

pub use config::{Objective, SchedulerConfig};
pub use ddim::DDIMScheduler;
pub use dpm::DPMSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use flow::FlowMatchEulerDiscreteScheduler;
pub use lcm::LCMScheduler;
pub use unipc::UniPCMultistepScheduler;

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
    /// A scheduler name that [`SchedulerKind::from_str`] does not know.
    #[error(
        "unknown scheduler {name:?}{}: expected one of {}",
        suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default(),
        SchedulerKind::names().join(", ")
    )]
    UnknownKind {
        name: String,
        /// The nearest accepted name, when one is close.
        suggestion: Option<&'static str>,
    },
    /// A run setting outside the config file (a command-line flag or request field) that
    /// this sampler cannot take, or a step count it cannot run.
    #[error("{option}: {message}")]
    Option {
        /// The flag, request field or config key, as the user wrote it.
        option: String,
        message: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The implemented samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// diffusers' `DDIMScheduler` (eta = 0).
    Ddim,
    /// diffusers' `EulerDiscreteScheduler` (no churn), with Karras sigmas where asked.
    Euler,
    /// diffusers' `EulerAncestralDiscreteScheduler` ("Euler a"): stochastic.
    EulerAncestral,
    /// diffusers' `DPMSolverMultistepScheduler` as DPM-Solver++ 2M (`algorithm_type:
    /// dpmsolver++`), with Karras sigmas where asked ("DPM++ 2M Karras").
    DpmPp2M,
    /// diffusers' `DPMSolverMultistepScheduler` as DPM-Solver++ 2M SDE (`algorithm_type:
    /// sde-dpmsolver++`): stochastic.
    DpmPp2MSde,
    /// diffusers' `UniPCMultistepScheduler` (UniPC, bh2, order 2 by default).
    UniPc,
    /// diffusers' `LCMScheduler` (latent consistency models, LCM-LoRA): stochastic
    /// between its few steps.
    Lcm,
    /// diffusers' `FlowMatchEulerDiscreteScheduler` (SD3): static or dynamic shift.
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
    pub const ALL: [SchedulerKind; 8] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2M,
        Self::DpmPp2MSde,
        Self::UniPc,
        Self::Lcm,
        Self::FlowEuler,
    ];

    /// The name used by [`FromStr`] and [`fmt::Display`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2M => "dpmpp-2m",
            Self::DpmPp2MSde => "dpmpp-2m-sde",
            Self::UniPc => "unipc",
            Self::Lcm => "lcm",
            Self::FlowEuler => "flow-euler",
        }
    }

    /// The diffusers class that implements this sampler (`_class_name`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmPp2M | Self::DpmPp2MSde => "DPMSolverMultistepScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Lcm => "LCMScheduler",
            Self::FlowEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    /// The training objective this sampler steps (one line per kind: a new kind adds its
    /// family here and is paired with models by it). UniPC refuses `use_flow_sigmas`, so
    /// it is a diffusion sampler only.
    pub fn family(self) -> Family {
        match self {
            Self::Ddim
            | Self::Euler
            | Self::EulerAncestral
            | Self::DpmPp2M
            | Self::DpmPp2MSde
            | Self::UniPc
            | Self::Lcm => Family::Diffusion,
            Self::FlowEuler => Family::FlowMatching,
        }
    }

    /// Whether diffusers' class has `use_karras_sigmas` (so `--karras` applies).
    pub fn supports_karras(self) -> bool {
        matches!(
            self,
            Self::Euler | Self::DpmPp2M | Self::DpmPp2MSde | Self::UniPc | Self::FlowEuler
        )
    }

    /// Whether some of its steps draw fresh noise (see [`Scheduler::needs_noise`]).
    pub fn is_stochastic(self) -> bool {
        matches!(self, Self::EulerAncestral | Self::DpmPp2MSde | Self::Lcm)
    }

    /// Every name `--scheduler` accepts: ours ([`SchedulerKind::as_str`]), then diffusers'
    /// class names.
    pub fn names() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Self::ALL.iter().map(|k| k.as_str()).collect();
        for k in Self::ALL {
            if !names.contains(&k.class_name()) {
                names.push(k.class_name());
            }
        }
        names
    }

    /// The kind a diffusers class name stands for with `cfg`: `DPMSolverMultistepScheduler`
    /// is the SDE variant when the config's `algorithm_type` is `sde-dpmsolver++`, as in
    /// diffusers; `None` for classes not implemented here.
    pub fn from_class(class: &str, cfg: &SchedulerConfig) -> Result<Option<SchedulerKind>> {
        Ok(match class {
            "DPMSolverMultistepScheduler" => {
                Some(match cfg.str_or("algorithm_type", "dpmsolver++")? {
                    "sde-dpmsolver++" => Self::DpmPp2MSde,
                    _ => Self::DpmPp2M,
                })
            }
            _ => Self::ALL.into_iter().find(|k| k.class_name() == class),
        })
    }

    /// Parses a `--scheduler` value (ours or a diffusers class name) against the model's
    /// scheduler config, which picks the algorithm of `DPMSolverMultistepScheduler`.
    pub fn resolve(name: &str, cfg: &SchedulerConfig) -> Result<SchedulerKind> {
        match Self::from_class(name, cfg)? {
            Some(kind) => Ok(kind),
            None => name.parse(),
        }
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Our names and diffusers' class names; `DPMSolverMultistepScheduler` is the ODE
    /// solver here (see [`SchedulerKind::resolve`] for the config's choice).
    fn from_str(s: &str) -> Result<Self> {
        if let Some(k) = Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s || k.class_name() == s)
        {
            return Ok(k);
        }
        Err(Error::UnknownKind {
            name: s.to_string(),
            suggestion: nearest(s, &Self::names()),
        })
    }
}

/// The accepted name closest to `s` in edit distance (case-insensitive), when close enough
/// to be a typo of it.
fn nearest(s: &str, names: &[&'static str]) -> Option<&'static str> {
    let lower = s.to_ascii_lowercase();
    let (name, d) = names
        .iter()
        .map(|n| (*n, edit_distance(&lower, &n.to_ascii_lowercase())))
        .min_by_key(|(_, d)| *d)?;
    (d <= 2.max(name.len() / 4)).then_some(name)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(cur + 1).min(row[j] + 1);
            prev = cur;
        }
    }
    row[b.len()]
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
    /// Whether step `step_index` draws fresh noise: then [`Scheduler::step`] must be given
    /// a standard-normal tensor of the sample's shape (diffusers draws it with
    /// `randn_tensor` inside `step`, or takes DPM-Solver's `variance_noise`).
    fn needs_noise(&self, _step_index: usize) -> bool {
        false
    }
    /// One step; step_index is i in 0..num_steps (schedulers keep their own multistep
    /// history, restarted at step 0). `noise` is step i's noise where
    /// [`Scheduler::needs_noise`] says so, else ignored; a stochastic step without it is an
    /// error.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
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

/// Settings of one run that are not in `scheduler_config.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScheduleOptions {
    /// `--karras`: Karras sigmas (`use_karras_sigmas: true`) whatever the config says;
    /// refused for samplers whose diffusers class has no such option.
    pub karras: bool,
    /// The image's token count, `(latent h / patch) * (latent w / patch)`: flow schedulers
    /// whose config sets `use_dynamic_shifting` shift by the `mu` that diffusers' SD3
    /// pipeline computes from it (`calculate_shift`); needed only then.
    pub image_seq_len: Option<usize>,
}

/// Builds a `kind` sampler from `cfg` with `num_steps` inference steps; every
/// config key the sampler reads is checked here.
pub fn build(
    cfg: &SchedulerConfig,
    kind: SchedulerKind,
    num_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    build_with(cfg, kind, num_steps, &ScheduleOptions::default())
}

/// [`build`] with the run's [`ScheduleOptions`].
///
/// # Errors
/// Besides the config's: `--karras` for a sampler without Karras sigmas ([`Error::Option`]),
/// a flow config with `use_dynamic_shifting` and no `image_seq_len`.
pub fn build_with(
    cfg: &SchedulerConfig,
    kind: SchedulerKind,
    num_steps: usize,
    opts: &ScheduleOptions,
) -> Result<Box<dyn Scheduler>> {
    let karras_cfg;
    let cfg = if opts.karras {
        if !kind.supports_karras() {
            return Err(Error::Option {
                option: "--karras".into(),
                message: format!(
                    "{kind} has no Karras sigmas (diffusers' {} has no use_karras_sigmas); \
                     Karras sigmas go with {}",
                    kind.class_name(),
                    SchedulerKind::ALL
                        .into_iter()
                        .filter(|k| k.supports_karras())
                        .map(SchedulerKind::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        karras_cfg = cfg.with_value("use_karras_sigmas", serde_json::Value::Bool(true));
        &karras_cfg
    } else {
        cfg
    };
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DDIMScheduler::new(cfg, num_steps)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(cfg, num_steps)?),
        SchedulerKind::EulerAncestral => {
            Box::new(EulerAncestralDiscreteScheduler::new(cfg, num_steps)?)
        }
        SchedulerKind::DpmPp2M => Box::new(DPMSolverMultistepScheduler::new(cfg, num_steps)?),
        SchedulerKind::DpmPp2MSde => {
            Box::new(DPMSolverMultistepScheduler::new_sde(cfg, num_steps)?)
        }
        SchedulerKind::UniPc => Box::new(UniPCMultistepScheduler::new(cfg, num_steps)?),
        SchedulerKind::Lcm => Box::new(LCMScheduler::new(cfg, num_steps)?),
        SchedulerKind::FlowEuler => Box::new(FlowMatchEulerDiscreteScheduler::new_with(
            cfg,
            num_steps,
            opts.image_seq_len,
        )?),
    })
}

/// The noise a stochastic step was given, checked against the sample: a missing or
/// misshapen tensor is an error, never a panic.
pub(crate) fn step_noise<'a>(
    noise: Option<&'a Tensor>,
    sample: &Tensor,
    who: &str,
    step_index: usize,
) -> candle_core::Result<&'a Tensor> {
    match noise {
        Some(n) if n.dims() == sample.dims() => Ok(n),
        Some(n) => candle_core::bail!(
            "{who} step {step_index}: noise of shape {:?} for a sample of shape {:?}",
            n.dims(),
            sample.dims()
        ),
        None => candle_core::bail!(
            "{who} step {step_index} draws fresh noise: the caller must pass it (a stochastic sampler)"
        ),
    }
}
