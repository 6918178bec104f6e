//! Flow-matching Euler, after diffusers' `FlowMatchEulerDiscreteScheduler` (SD3): a
//! static `shift`, or the resolution-dependent shift of `use_dynamic_shifting` (mu from the
//! image's token count, as diffusers' SD3 pipeline computes it), and Karras sigmas.

use candle_core::{bail, DType, Tensor};

use crate::common::{check_num_steps, karras_flag, karras_sigmas, reject_true};
use crate::numerics::{mul, np_linspace};
use crate::{Error, Result, Scheduler, SchedulerConfig};

/// diffusers' `FlowMatchEulerDiscreteScheduler` (deterministic: no `stochastic_sampling`).
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    timesteps: Vec<f64>,
    /// float32 as in diffusers; `sigmas_f64` is the same values widened.
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
}

/// diffusers' `calculate_shift` (SD3/Flux pipelines): mu grows linearly with the image's
/// token count, from `base_shift` at `base_image_seq_len` to `max_shift` at
/// `max_image_seq_len`.
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: f64,
    max_seq_len: f64,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len - base_seq_len);
    let b = base_shift - m * base_seq_len;
    image_seq_len as f64 * m + b
}

/// How the dynamic shift maps a sigma (`time_shift_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeShift {
    /// `e^mu / (e^mu + (1/t - 1))`.
    Exponential,
    /// `mu / (mu + (1/t - 1))`.
    Linear,
}

impl FlowMatchEulerDiscreteScheduler {
    /// Builds the scheduler from `cfg` and sets `num_steps` inference timesteps (a config
    /// with `use_dynamic_shifting` needs [`Self::new_with`]).
    pub fn new(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        Self::new_with(cfg, num_steps, None)
    }

    /// Builds the scheduler; `image_seq_len` (the image's token count, `(h / p) * (w / p)`
    /// in latent pixels and patch size p) sets mu when the config asks for dynamic
    /// shifting, as diffusers' SD3 pipeline does.
    pub fn new_with(
        cfg: &SchedulerConfig,
        num_steps: usize,
        image_seq_len: Option<usize>,
    ) -> Result<Self> {
        let n_train = cfg.num_train_timesteps()?;
        check_num_steps(cfg, num_steps, n_train)?;
        let shift = cfg.finite_f64_or("shift", 1.0)?;
        // Real models use 1 to 6; far outside, sigmas collapse to 0 or 1 and the steps
        // divide by their differences.
        if !(1e-3..=1e3).contains(&shift) {
            return Err(cfg.unsupported("shift", "the timestep shift must be between 1e-3 and 1e3"));
        }
        let karras = karras_flag(cfg)?;
        for key in ["invert_sigmas", "stochastic_sampling"] {
            reject_true(cfg, key, false)?;
        }
        // diffusers tests the value's truthiness, so 0 also means "off".
        if cfg.opt_f64("shift_terminal")?.is_some_and(|v| v != 0.0) {
            return Err(cfg.unsupported("shift_terminal", "terminal stretching is not implemented"));
        }
        let dynamic = cfg.bool_or("use_dynamic_shifting", false)?;
        let time_shift = match cfg.str_or("time_shift_type", "exponential")? {
            "exponential" => TimeShift::Exponential,
            "linear" => TimeShift::Linear,
            _ => {
                return Err(
                    cfg.unsupported("time_shift_type", "diffusers takes exponential or linear")
                )
            }
        };
        let mu = if dynamic {
            let Some(seq_len) = image_seq_len else {
                return Err(Error::Option {
                    option: "use_dynamic_shifting".into(),
                    message: format!(
                        "{}: dynamic shifting needs the image's size (its token count)",
                        cfg.path().display()
                    ),
                });
            };
            let base_seq = cfg.finite_f64_or("base_image_seq_len", 256.0)?;
            let max_seq = cfg.finite_f64_or("max_image_seq_len", 4096.0)?;
            if base_seq == max_seq {
                return Err(cfg.unsupported(
                    "max_image_seq_len",
                    "must differ from base_image_seq_len (mu divides by their difference)",
                ));
            }
            let mu = calculate_shift(
                seq_len,
                base_seq,
                max_seq,
                cfg.finite_f64_or("base_shift", 0.5)?,
                cfg.finite_f64_or("max_shift", 1.15)?,
            );
            // Beyond these the shifted sigmas collapse to 0 or 1 in float32.
            let ok = match time_shift {
                TimeShift::Exponential => mu.abs() <= 20.0,
                TimeShift::Linear => mu > 1e-6 && mu <= 1e6,
            };
            if !ok {
                return Err(cfg.unsupported(
                    "max_shift",
                    &format!(
                        "the dynamic shift mu = {mu} for an image of {seq_len} tokens is out of \
                         range (base_shift, max_shift, base_image_seq_len, max_image_seq_len)"
                    ),
                ));
            }
            Some(mu)
        } else {
            None
        };

        // The training table's ends, shifted once in float32 by `__init__` (not under
        // dynamic shifting); `set_timesteps` then spaces between them and shifts again in
        // float64.
        let shift_f32 = shift as f32;
        let shift_m1_f32 = (shift - 1.0) as f32;
        let train_sigma = |t: f32| {
            let s = t / n_train as f32;
            if dynamic {
                s
            } else {
                shift_f32 * s / (1.0 + shift_m1_f32 * s)
            }
        };
        let sigma_max = train_sigma(n_train as f32) as f64;
        let sigma_min = train_sigma(1.0) as f64;
        let n_train_f = n_train as f64;

        let mut sigmas: Vec<f64> =
            np_linspace(sigma_max * n_train_f, sigma_min * n_train_f, num_steps)
                .into_iter()
                .map(|t| {
                    let s = t / n_train_f;
                    match mu {
                        None => shift * s / (1.0 + (shift - 1.0) * s),
                        Some(mu) => {
                            let x = 1.0 / s - 1.0;
                            match time_shift {
                                TimeShift::Exponential => mu.exp() / (mu.exp() + x),
                                TimeShift::Linear => mu / (mu + x),
                            }
                        }
                    }
                })
                .collect();
        if karras {
            sigmas = karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], num_steps);
        }
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
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
        _noise: Option<&Tensor>,
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
