//! Flow-matching Euler, after diffusers' `FlowMatchEulerDiscreteScheduler`.

use candle_core::{bail, DType, Tensor};

use crate::common::{check_num_steps, reject_true};
use crate::numerics::{mul, np_linspace};
use crate::{Result, Scheduler, SchedulerConfig};

/// diffusers' `FlowMatchEulerDiscreteScheduler` with a static `shift`.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    timesteps: Vec<f64>,
    /// float32 as in diffusers; `sigmas_f64` is the same values widened.
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
}

impl FlowMatchEulerDiscreteScheduler {
    /// Builds the scheduler from `cfg` and sets `num_steps` inference timesteps.
    pub fn new(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let n_train = cfg.num_train_timesteps()?;
        check_num_steps(cfg, num_steps, n_train)?;
        let shift = cfg.finite_f64_or("shift", 1.0)?;
        // Real models use 1 to 6; far outside, sigmas collapse to 0 or 1 and the steps
        // divide by their differences.
        if !(1e-3..=1e3).contains(&shift) {
            return Err(cfg.unsupported("shift", "the timestep shift must be between 1e-3 and 1e3"));
        }
        for key in [
            "use_dynamic_shifting",
            "invert_sigmas",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "stochastic_sampling",
        ] {
            reject_true(cfg, key, false)?;
        }
        // diffusers tests the value's truthiness, so 0 also means "off".
        if cfg.opt_f64("shift_terminal")?.is_some_and(|v| v != 0.0) {
            return Err(cfg.unsupported("shift_terminal", "terminal stretching is not implemented"));
        }

        // The training table's ends, shifted once in float32 by `__init__`;
        // `set_timesteps` then spaces between them and shifts again in float64.
        let shift_f32 = shift as f32;
        let shift_m1_f32 = (shift - 1.0) as f32;
        let shifted_train = |t: f32| {
            let s = t / n_train as f32;
            shift_f32 * s / (1.0 + shift_m1_f32 * s)
        };
        let sigma_max = shifted_train(n_train as f32) as f64;
        let sigma_min = shifted_train(1.0) as f64;
        let n_train_f = n_train as f64;

        let sigmas: Vec<f32> = np_linspace(sigma_max * n_train_f, sigma_min * n_train_f, num_steps)
            .into_iter()
            .map(|t| {
                let s = t / n_train_f;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps: Vec<f64> = sigmas
            .iter()
            .map(|&s| (s * n_train as f32) as f64)
            .collect();
        let mut sigmas = sigmas;
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas_f64: sigmas.iter().map(|&s| s as f64).collect(),
            sigmas,
        })
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if step_index + 1 >= self.sigmas.len() {
            bail!(
                "flow-matching Euler step index {step_index} out of range for {} steps",
                self.sigmas.len() - 1
            )
        }
        let out_dtype = sample.dtype();
        // diffusers upcasts the sample for this step; the output goes back to the
        // sample's dtype here (diffusers returns the model output's dtype).
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let dt = self.sigmas[step_index + 1] - self.sigmas[step_index];
        (sample + mul(&model_output, dt)?)?.to_dtype(out_dtype)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }
}
