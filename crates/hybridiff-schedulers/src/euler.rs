//! Deterministic Euler (no churn), after diffusers' `EulerDiscreteScheduler`.

use candle_core::{bail, DType, Tensor};

use crate::common::{check_num_steps, reject_true, PredictionType, SdParams, TimestepSpacing};
use crate::numerics::{div, mul, np_arange, np_interp_index, np_linspace};
use crate::{Result, Scheduler, SchedulerConfig};

/// diffusers' `EulerDiscreteScheduler` with `s_churn = 0`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    /// float32 as in diffusers; `sigmas_f64` is the same values widened.
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    init_noise_sigma: f32,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler from `cfg` and sets `num_steps` inference timesteps.
    pub fn new(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let sd = SdParams::from_config(cfg, "linspace")?;
        let n_train = sd.num_train_timesteps;
        check_num_steps(cfg, num_steps, n_train)?;
        for key in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            reject_true(cfg, key, false)?;
        }
        if cfg.str_or("interpolation_type", "linear")? != "linear" {
            return Err(cfg.unsupported("interpolation_type", "implemented: linear"));
        }
        match cfg.str_or("timestep_type", "discrete")? {
            "discrete" => {}
            // Continuous timesteps only change anything for v-prediction.
            "continuous" if sd.prediction_type == PredictionType::Epsilon => {}
            _ => {
                return Err(cfg.unsupported(
                    "timestep_type",
                    "implemented: discrete (continuous only with epsilon prediction)",
                ))
            }
        }
        let final_sigma = sd.final_sigma(cfg)?;

        let n = num_steps;
        // diffusers keeps these timesteps in float32.
        let timesteps: Vec<f32> = match sd.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f32 + sd.steps_offset as f32)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / n as f64;
                np_arange(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as f32 - 1.0)
                    .collect()
            }
        };
        let train_sigmas: Vec<f64> = sd.train_sigmas().iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| np_interp_index(t as f64, &train_sigmas) as f32)
            .collect();
        sigmas.push(final_sigma);

        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match sd.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
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
                "Euler step index {step_index} out of range for {} steps",
                self.sigmas.len() - 1
            )
        }
        Ok(self.sigmas[step_index])
    }
}

impl Scheduler for EulerDiscreteScheduler {
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

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        let out_dtype = sample.dtype();
        // diffusers upcasts the sample for this step; the output goes back to the
        // sample's dtype here (diffusers returns the model output's dtype).
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        // No churn, so sigma_hat == sigma.
        let sigma_hat = sigma;
        let pred_original_sample = match self.prediction_type {
            PredictionType::Epsilon => (&sample - mul(&model_output, sigma_hat)?)?,
            PredictionType::VPrediction => {
                let var = sigma * sigma + 1.0;
                (mul(&model_output, -sigma / var.sqrt())? + div(&sample, var)?)?
            }
        };
        let derivative = div(&(&sample - pred_original_sample)?, sigma_hat)?;
        let dt = self.sigmas[step_index + 1] - sigma_hat;
        (sample + mul(&derivative, dt)?)?.to_dtype(out_dtype)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }
}
