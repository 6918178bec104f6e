//! One rank's copy of the sampling state: scheduler, latents and guidance. Every rank
//! steps its own copy with the same predictions, so ranks stay in lockstep without
//! sending latents.

use candle_core::Tensor;
use hybridiff_models::nn::mean_abs;
use hybridiff_schedulers::Scheduler;

use crate::{Job, Result};

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
