//! One rank's copy of the sampling state: scheduler, latents and guidance. Every rank
//! steps its own copy with the same predictions, so ranks stay in lockstep without
//! sending latents.

use candle_core::Tensor;
use hybridiff_models::nn::mean_abs;
use hybridiff_schedulers::{Scheduler, SchedulerConfig, SchedulerKind};

use crate::{Error, Job, Result};

/// Steps a `kind` sampler of `steps` steps with a stand-in model (one latent value, a
/// prediction of `0.1 x` each step) and returns the first step that gives NaN or inf, if
/// any: a schedule that divides by zero (two timesteps that round to one, a timestep past the
/// training schedule: diffusers' DPM-Solver at 999 of 1000 steps) ruins any model's run, so
/// it is refused before compute rather than blamed on the weights at step 2. Costs a few
/// scalar ops per step.
fn first_non_finite_step(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    steps: usize,
) -> Result<Option<usize>> {
    let mut s = hybridiff_schedulers::build(config, kind, steps)?;
    let dev = candle_core::Device::Cpu;
    let mut x =
        (Tensor::ones((1, 1, 1, 1), candle_core::DType::F32, &dev)? * s.init_noise_sigma())?;
    for i in 0..steps {
        let input = s.scale_model_input(&x, i)?;
        let eps = (input * 0.1)?;
        x = s.step(&eps, i, &x)?;
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        if !v.iter().all(|v| v.is_finite()) || !s.timestep(i).is_finite() {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Whether a `kind` schedule of `steps` steps can run: it builds, and steps a stand-in model
/// without NaN.
fn schedule_runs(config: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> bool {
    matches!(first_non_finite_step(config, kind, steps), Ok(None))
}

/// Checks, before any compute, that `config` gives a `kind` schedule of `steps` steps
/// that a well-behaved model can run: the errors of [`hybridiff_schedulers::build`] about the
/// step count (too many steps, a timestep past the training schedule) and schedules that
/// give NaN by themselves are worded for `--steps` and say the most steps that work.
/// Config errors (a bad key) are returned as they are: they name the key.
pub fn check_schedule(config: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Result<()> {
    // The most steps a config could give (past it, the error says so), for the search below.
    let mut top = steps.saturating_sub(1);
    let problem = match first_non_finite_step(config, kind, steps) {
        Ok(None) => return Ok(()),
        Ok(Some(i)) => format!(
            "the {kind} sampler's schedule for {steps} steps gives NaN or inf at step {} of {steps} whatever the model (timestep {})",
            i + 1,
            hybridiff_schedulers::build(config, kind, steps)?.timestep(i)
        ),
        Err(Error::Scheduler(e @ hybridiff_schedulers::Error::NumSteps { .. })) => {
            if let hybridiff_schedulers::Error::NumSteps {
                num_train_timesteps,
                ..
            } = e
            {
                top = top.min(num_train_timesteps);
            }
            e.to_string()
        }
        Err(Error::Scheduler(e @ hybridiff_schedulers::Error::TimestepOutOfRange { .. })) => {
            e.to_string()
        }
        Err(e) => return Err(e),
    };
    // The most steps at or below `top` that run: usually the first tried; the search stops
    // after about 200000 simulated steps (well under a second).
    let mut budget = 200_000usize;
    let most = (top.saturating_sub(255).max(1)..=top).rev().find(|&n| {
        budget = budget.saturating_sub(n);
        n > 0 && budget > 0 && schedule_runs(config, kind, n)
    });
    let (fix, request_fix) = match most {
        Some(n) => (
            format!("at most {n} steps work: use --steps {n} or fewer"),
            format!("at most {n} steps work"),
        ),
        None => (
            "use fewer --steps".to_string(),
            "use fewer steps".to_string(),
        ),
    };
    Err(Error::refused(
        crate::Field::Steps,
        format!(
            "--steps {steps}: too many for the {kind} sampler with this model's scheduler config: {problem}; {fix}"
        ),
        format!(
            "`num_inference_steps` {steps}: too many for this model's scheduler ({kind}); {request_fix}"
        ),
    ))
}

/// A rank's sampling state.
pub struct Sampler {
    scheduler: Box<dyn Scheduler>,
    /// The current latents, `[1, C, h, w]`.
    pub latents: Tensor,
    guidance: f64,
}

/// `mean|eps_c - eps_u| / (mean|eps_u| + 1e-12)`: the branches' relative discrepancy.
pub fn rel_mae(eps_u: &Tensor, eps_c: &Tensor) -> Result<f64> {
    Ok(mean_abs(&(eps_c - eps_u)?)? / (mean_abs(eps_u)? + 1e-12))
}

impl Sampler {
    /// Sets up the scheduler and the starting latents (scaled by `init_noise_sigma`).
    pub fn new(job: &Job) -> Result<Self> {
        let scheduler =
            hybridiff_schedulers::build(job.scheduler_config, job.scheduler, job.steps)?;
        let latents = (&job.inputs.latents * scheduler.init_noise_sigma())?;
        Ok(Self {
            scheduler,
            latents,
            guidance: job.guidance,
        })
    }

    /// The denoiser's timestep at step `i`.
    pub fn timestep(&self, i: usize) -> f64 {
        self.scheduler.timestep(i)
    }

    /// The denoiser's input at step `i`.
    pub fn model_input(&self, i: usize) -> Result<Tensor> {
        Ok(self.scheduler.scale_model_input(&self.latents, i)?)
    }

    /// Applies guidance (`eps_u + w (eps_c - eps_u)`, diffusers' order) and steps.
    pub fn step_guided(&mut self, i: usize, eps_u: &Tensor, eps_c: &Tensor) -> Result<()> {
        let eps = (eps_u + ((eps_c - eps_u)? * self.guidance)?)?;
        self.step(i, &eps)
    }

    /// Steps with an already-guided prediction.
    pub fn step(&mut self, i: usize, eps: &Tensor) -> Result<()> {
        let eps = eps.to_dtype(self.latents.dtype())?;
        self.latents = self.scheduler.step(&eps, i, &self.latents)?;
        Ok(())
    }
}
