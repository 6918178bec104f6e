//! The latent consistency model sampler, after diffusers' `LCMScheduler` (Luo et al.
//! 2023, arXiv 2310.04378, Alg. 3): each step maps the sample to the model's consistency
//! estimate of x_0, then (except after the last step) re-noises it to the next timestep.

use candle_core::{bail, DType, Tensor};

use crate::common::{check_num_steps, reject_true, PredictionType, SdDefaults, SdParams};
use crate::numerics::{div, mul, np_linspace_open};
use crate::{step_noise, Error, Result, Scheduler, SchedulerConfig};

/// diffusers' `LCMScheduler` without thresholding or custom timesteps (strength 1).
#[derive(Debug, Clone)]
pub struct LCMScheduler {
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
    timestep_scaling: f32,
    timesteps_int: Vec<usize>,
    timesteps: Vec<f64>,
}

impl LCMScheduler {
    /// Builds the scheduler from `cfg` (with `LCMScheduler`'s own defaults: the SD
    /// schedule, `original_inference_steps` 50) and sets `num_steps` timesteps.
    ///
    /// # Errors
    /// Besides unsupported keys: more steps than `original_inference_steps` (the schedule
    /// is a subset of the distillation's), which must itself be 1 to `num_train_timesteps`.
    pub fn new(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let sd = SdParams::from_config_with(
            cfg,
            SdDefaults {
                timestep_spacing: "leading",
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: "scaled_linear",
            },
        )?;
        let n_train = sd.num_train_timesteps;
        check_num_steps(cfg, num_steps, n_train)?;
        reject_true(cfg, "thresholding", false)?;
        let original = cfg.usize_or("original_inference_steps", 50)?;
        if original == 0 || original > n_train {
            return Err(cfg.unsupported(
                "original_inference_steps",
                &format!("expected 1 to num_train_timesteps ({n_train})"),
            ));
        }
        if num_steps > original {
            return Err(Error::Option {
                option: format!("--steps {num_steps}"),
                message: format!(
                    "LCM runs at most original_inference_steps = {original} steps (the scheduler \
                     config's): its schedule is a subset of the distillation's {original} timesteps"
                ),
            });
        }
        let clip_sample_range = if cfg.bool_or("clip_sample", false)? {
            Some(cfg.finite_f64_or("clip_sample_range", 1.0)? as f32)
        } else {
            None
        };
        let timestep_scaling = cfg.finite_f64_or("timestep_scaling", 10.0)?;
        if timestep_scaling <= 0.0 {
            return Err(cfg.unsupported("timestep_scaling", "expected a positive number"));
        }
        // `set_alpha_to_one` only matters for a previous timestep below 0, which LCM's
        // schedule never reaches (its last step re-noises nothing).
        cfg.bool_or("set_alpha_to_one", true)?;

        // The distillation's timesteps k-1, 2k-1, ..., original*k - 1, newest first, and
        // `num_steps` of them evenly spread by index.
        let k = n_train / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let timesteps_int: Vec<usize> = np_linspace_open(0.0, original as f64, num_steps)
            .into_iter()
            .map(|x| origin[x.floor() as usize])
            .collect();
        Ok(Self {
            alphas_cumprod: sd.alphas_cumprod,
            prediction_type: sd.prediction_type,
            clip_sample_range,
            timestep_scaling: timestep_scaling as f32,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
        })
    }
}

impl Scheduler for LCMScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Every step but the last re-noises its estimate.
    fn needs_noise(&self, step_index: usize) -> bool {
        step_index + 1 < self.timesteps_int.len()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let n = self.timesteps_int.len();
        let Some(&t) = self.timesteps_int.get(step_index) else {
            bail!("LCM step index {step_index} out of range for {n} steps")
        };
        let last = step_index + 1 == n;
        let noise = if last {
            None
        } else {
            Some(step_noise(noise, sample, "LCM", step_index)?.to_dtype(DType::F32)?)
        };
        // The last step's "previous" timestep is its own (diffusers), unused: no re-noising.
        let prev_t = self.timesteps_int.get(step_index + 1).copied().unwrap_or(t);
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_prev = self.alphas_cumprod[prev_t];
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;

        // The consistency model's boundary condition (c_skip -> 1, c_out -> 0 as t -> 0),
        // sigma_data = 0.5.
        let scaled = t as f32 * self.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();

        let out_dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div(
                &(&sample - mul(&model_output, beta_prod_t.sqrt())?)?,
                alpha_prod_t.sqrt(),
            )?,
            PredictionType::VPrediction => {
                (mul(&sample, alpha_prod_t.sqrt())? - mul(&model_output, beta_prod_t.sqrt())?)?
            }
        };
        let x0 = match self.clip_sample_range {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let denoised = (mul(&x0, c_out)? + mul(&sample, c_skip)?)?;
        let prev = match noise {
            None => denoised,
            Some(noise) => {
                (mul(&denoised, alpha_prod_prev.sqrt())? + mul(&noise, beta_prod_prev.sqrt())?)?
            }
        };
        prev.to_dtype(out_dtype)
    }
}
