//! Deterministic Euler (no churn), after diffusers' `EulerDiscreteScheduler`, with
//! Karras sigmas (`use_karras_sigmas`) where the config or `--karras` asks.

use candle_core::{bail, DType, Tensor};

use crate::common::{
    check_num_steps, karras_flag, karras_sigmas, log_sigmas, sigma_to_t, trailing_timesteps,
    PredictionType, SdParams, TimestepSpacing,
};
use crate::numerics::{div, mul, np_interp_index, np_linspace};
use crate::{Result, Scheduler, SchedulerConfig};

/// The spacing's timesteps as diffusers' Euler-family `set_timesteps` makes them (float32),
/// before Karras sigmas replace them; `trailing` may hold one value too many (see
/// [`trailing_timesteps`]).
pub(crate) fn spaced_timesteps(sd: &SdParams, n: usize) -> Vec<f32> {
    let n_train = sd.num_train_timesteps;
    match sd.timestep_spacing {
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
        TimestepSpacing::Trailing => trailing_timesteps(n_train as f64, n_train, n)
            .into_iter()
            .map(|t| t as f32)
            .collect(),
    }
}

/// diffusers' `init_noise_sigma` of the Euler family: the largest sigma, or the std of
/// `x_T` itself (`sqrt(sigma^2 + 1)`) under `leading` spacing.
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    }
}

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
        let karras = karras_flag(cfg)?;
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
        // Euler's own bounds of the Karras ramp (DPM-Solver has no such keys).
        let sigma_min = cfg.opt_f64("sigma_min")?;
        let sigma_max = cfg.opt_f64("sigma_max")?;
        for (key, v) in [("sigma_min", sigma_min), ("sigma_max", sigma_max)] {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err(cfg.unsupported(key, "expected a positive finite sigma"));
            }
        }

        let n = num_steps;
        let spaced = spaced_timesteps(&sd, n);
        let train_sigmas: Vec<f64> = sd.train_sigmas().iter().map(|&s| s as f64).collect();
        let interp: Vec<f64> = spaced
            .iter()
            .map(|&t| np_interp_index(t as f64, &train_sigmas))
            .collect();
        let (timesteps, mut sigmas): (Vec<f32>, Vec<f32>) = if karras {
            // The ramp spans the spaced schedule's sigmas (all of them: diffusers reads
            // them before any trailing surplus is dropped), unless the config bounds it.
            let lo = sigma_min.unwrap_or(interp[interp.len() - 1]);
            let hi = sigma_max.unwrap_or(interp[0]);
            if lo > hi {
                return Err(cfg.unsupported(
                    "sigma_min",
                    &format!("the Karras ramp needs sigma_min < sigma_max ({hi})"),
                ));
            }
            let k = karras_sigmas(lo, hi, n);
            let logs = log_sigmas(&sd.train_sigmas());
            let t = k.iter().map(|&s| sigma_to_t(s, &logs) as f32).collect();
            (t, k.iter().map(|&s| s as f32).collect())
        } else {
            (
                spaced[..n].to_vec(),
                interp[..n].iter().map(|&s| s as f32).collect(),
            )
        };
        sigmas.push(final_sigma);
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
        _noise: Option<&Tensor>,
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
