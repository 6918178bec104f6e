//! Euler Ancestral ("Euler a"), after diffusers' `EulerAncestralDiscreteScheduler`: an
//! Euler step down to `sigma_down`, then fresh noise of std `sigma_up` (Karras et al. 2022,
//! the ancestral sampler of k-diffusion), so that the marginal at the next level is right.

use candle_core::{bail, DType, Tensor};

use crate::common::{check_num_steps, PredictionType, SdParams};
use crate::euler::{euler_init_noise_sigma, spaced_timesteps};
use crate::numerics::{div, mul, np_interp_index};
use crate::{step_noise, Result, Scheduler, SchedulerConfig};

/// diffusers' `EulerAncestralDiscreteScheduler`. Its config has no Karras or
/// `final_sigmas_type` keys (diffusers ignores them for this class): the last sigma is 0.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    /// float32 as in diffusers; `sigmas_f64` is the same values widened.
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    init_noise_sigma: f32,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler from `cfg` and sets `num_steps` inference timesteps.
    pub fn new(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let sd = SdParams::from_config(cfg, "linspace")?;
        check_num_steps(cfg, num_steps, sd.num_train_timesteps)?;
        let n = num_steps;
        // Trailing spacing may give one timestep too many (see `trailing_timesteps`).
        let timesteps: Vec<f32> = spaced_timesteps(&sd, n)[..n].to_vec();
        let train_sigmas: Vec<f64> = sd.train_sigmas().iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| np_interp_index(t as f64, &train_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let init_noise_sigma = euler_init_noise_sigma(&sigmas, sd.timestep_spacing);
        Ok(Self {
            prediction_type: sd.prediction_type,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas_f64: sigmas.iter().map(|&s| s as f64).collect(),
            sigmas,
            init_noise_sigma,
        })
    }

    fn sigma(&self, step_index: usize) -> candle_core::Result<f32> {
        if step_index + 1 >= self.sigmas.len() {
            bail!(
                "Euler Ancestral step index {step_index} out of range for {} steps",
                self.sigmas.len() - 1
            )
        }
        Ok(self.sigmas[step_index])
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        div(sample, (sigma * sigma + 1.0).sqrt())
    }

    /// Every step draws noise, the last one too (diffusers draws it and scales it by
    /// `sigma_up = 0`), so that a generator's later draws line up with diffusers'.
    fn needs_noise(&self, step_index: usize) -> bool {
        step_index + 1 < self.sigmas.len()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        let noise = step_noise(noise, sample, "Euler Ancestral", step_index)?;
        let out_dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let pred_original_sample = match self.prediction_type {
            PredictionType::Epsilon => (&sample - mul(&model_output, sigma)?)?,
            PredictionType::VPrediction => {
                let var = sigma * sigma + 1.0;
                (mul(&model_output, -sigma / var.sqrt())? + div(&sample, var)?)?
            }
        };
        let sigma_from = sigma;
        let sigma_to = self.sigmas[step_index + 1];
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        // Never the square root of a rounding error below 0 (NaN in diffusers when a step
        // falls by more than 4 orders of magnitude).
        let sigma_down = (to2 - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = div(&(&sample - pred_original_sample)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev = (&sample + mul(&derivative, dt)?)?;
        let noise = noise.to_dtype(DType::F32)?;
        (prev + mul(&noise, sigma_up)?)?.to_dtype(out_dtype)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }
}
