//! Deterministic DDIM (eta = 0), after diffusers' `DDIMScheduler`.

use candle_core::{bail, Tensor};

use crate::common::{check_num_steps, reject_true, PredictionType, SdParams, TimestepSpacing};
use crate::numerics::{div, mul, np_linspace};
use crate::{Result, Scheduler, SchedulerConfig};

/// diffusers' `DDIMScheduler` with `eta = 0`.
#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
    /// diffusers steps back by this fixed stride whatever the spacing.
    prev_stride: i64,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
}

impl DDIMScheduler {
    /// Builds the scheduler from `cfg` and sets `num_steps` inference timesteps.
    pub fn new(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let sd = SdParams::from_config(cfg, "leading")?;
        let n_train = sd.num_train_timesteps;
        check_num_steps(cfg, num_steps, n_train)?;
        reject_true(cfg, "thresholding", false)?;
        // diffusers' default is to clip; clamping is cheap, so honour it rather
        // than refuse configs (e.g. Euler ones) that lack the key.
        let clip_sample_range = if cfg.bool_or("clip_sample", true)? {
            Some(cfg.finite_f64_or("clip_sample_range", 1.0)? as f32)
        } else {
            None
        };
        let final_alpha_cumprod = if cfg.bool_or("set_alpha_to_one", true)? {
            1.0
        } else {
            sd.alphas_cumprod[0]
        };

        let n = num_steps;
        let timesteps_int: Vec<i64> = match sd.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + sd.steps_offset) as i64)
                    .collect()
            }
            // numpy's float stride may add a timestep -1 (see `trailing_timesteps`).
            TimestepSpacing::Trailing => {
                crate::common::trailing_timesteps(n_train as f64, n_train, n)
                    .into_iter()
                    .take(n)
                    .map(|t| t as i64)
                    .collect()
            }
        };
        // `steps_offset` can push a leading timestep past the table, where
        // diffusers would fail with an index error mid-run.
        if let Some(&t) = timesteps_int
            .iter()
            .find(|&&t| t < 0 || t >= n_train as i64)
        {
            return Err(crate::Error::TimestepOutOfRange {
                path: cfg.path().to_path_buf(),
                steps: n,
                timestep: t,
                num_train_timesteps: n_train,
            });
        }
        Ok(Self {
            alphas_cumprod: sd.alphas_cumprod,
            final_alpha_cumprod,
            prediction_type: sd.prediction_type,
            clip_sample_range,
            prev_stride: (n_train / n) as i64,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
        })
    }

    /// The float32 cumulative product of alphas over the training timesteps.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

impl Scheduler for DDIMScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let Some(&t) = self.timesteps_int.get(step_index) else {
            bail!(
                "DDIM step index {step_index} out of range for {} steps",
                self.timesteps_int.len()
            )
        };
        let model_output = model_output.to_dtype(sample.dtype())?;
        let prev_t = t - self.prev_stride;
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;

        let (pred_original_sample, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div(
                    &(sample - mul(&model_output, beta_prod_t.sqrt())?)?,
                    alpha_prod_t.sqrt(),
                )?;
                (x0, model_output)
            }
            PredictionType::VPrediction => {
                let x0 =
                    (mul(sample, alpha_prod_t.sqrt())? - mul(&model_output, beta_prod_t.sqrt())?)?;
                let eps =
                    (mul(&model_output, alpha_prod_t.sqrt())? + mul(sample, beta_prod_t.sqrt())?)?;
                (x0, eps)
            }
        };
        let pred_original_sample = match self.clip_sample_range {
            Some(r) => pred_original_sample.clamp(-r, r)?,
            None => pred_original_sample,
        };
        // With eta = 0 the variance term vanishes from the direction coefficient.
        let direction = mul(&pred_epsilon, (1.0 - alpha_prod_t_prev).sqrt())?;
        mul(&pred_original_sample, alpha_prod_t_prev.sqrt())? + direction
    }
}
