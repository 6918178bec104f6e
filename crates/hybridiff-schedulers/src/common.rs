//! The discrete-time (DDPM-style) training schedule shared by DDIM, Euler and
//! DPM-Solver, and the config keys they all read.

use crate::numerics::{torch_cumprod_f32, torch_linspace_f32};
use crate::{Error, Result, SchedulerConfig};

/// What the denoiser predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PredictionType {
    /// The added noise.
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x_0`.
    VPrediction,
}

/// How inference timesteps are spread over the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
    /// Evenly spread over `[0, num_train_timesteps - 1]`.
    Linspace,
    /// Multiples of `num_train_timesteps / n` counted from 0, plus `steps_offset`.
    Leading,
    /// Counted back from `num_train_timesteps`, minus one.
    Trailing,
}

/// The keys every discrete-time scheduler reads, with its own defaults.
pub(crate) struct SdParams {
    pub num_train_timesteps: usize,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// `alphas_cumprod` as diffusers holds it: a float32 tensor.
    pub alphas_cumprod: Vec<f32>,
}

impl SdParams {
    /// Reads the shared keys; `default_spacing` is the scheduler class's own default.
    pub fn from_config(cfg: &SchedulerConfig, default_spacing: &str) -> Result<Self> {
        let num_train_timesteps = cfg.num_train_timesteps()?;
        let prediction_type = match cfg.str_or("prediction_type", "epsilon")? {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            _ => {
                return Err(cfg.unsupported("prediction_type", "implemented: epsilon, v_prediction"))
            }
        };
        let timestep_spacing = match cfg.str_or("timestep_spacing", default_spacing)? {
            "linspace" => TimestepSpacing::Linspace,
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            _ => {
                return Err(cfg.unsupported(
                    "timestep_spacing",
                    "implemented: leading, linspace, trailing",
                ))
            }
        };
        let steps_offset = cfg.usize_or("steps_offset", 0)?;
        if cfg.bool_or("rescale_betas_zero_snr", false)? {
            return Err(cfg.unsupported(
                "rescale_betas_zero_snr",
                "zero-SNR rescaling is not implemented",
            ));
        }
        let betas = betas(cfg, num_train_timesteps)?;
        // Each beta is a noise variance added per step: outside [0, 1) the alphas turn
        // zero or negative and every sigma after is NaN or infinite.
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(b.is_finite() && (0.0..1.0).contains(*b)))
        {
            let key = if cfg.opt_f64_list("trained_betas")?.is_some() {
                "trained_betas"
            } else {
                "beta_end"
            };
            return Err(Error::InvalidValue {
                path: cfg.path().to_path_buf(),
                key: key.into(),
                value: format!("a schedule whose beta {i} is {b}"),
                expected: "betas in [0, 1): beta_start and beta_end between 0 and 1",
            });
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = torch_cumprod_f32(&alphas);
        // Betas that are each valid can still multiply to 0 in f32 (e.g. beta_start 0.5):
        // every sigma after that point is infinite and the latents become NaN.
        if let Some(i) = alphas_cumprod.iter().position(|&a| a.is_nan() || a <= 0.0) {
            return Err(Error::InvalidValue {
                path: cfg.path().to_path_buf(),
                key: "beta_start".into(),
                value: format!(
                    "a schedule whose alphas_cumprod underflow to 0 at timestep {i} of {num_train_timesteps}"
                ),
                expected: "smaller betas (diffusers' SD schedules keep alphas_cumprod above 1e-3)",
            });
        }
        Ok(Self {
            num_train_timesteps,
            prediction_type,
            timestep_spacing,
            steps_offset,
            alphas_cumprod,
        })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, in float32 as torch computes it.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// The sigma diffusers appends after the last step for `final_sigmas_type`.
    pub fn final_sigma(&self, cfg: &SchedulerConfig) -> Result<f32> {
        match cfg.str_or("final_sigmas_type", "zero")? {
            "zero" => Ok(0.0),
            "sigma_min" => Ok(self.train_sigmas()[0]),
            _ => Err(cfg.unsupported("final_sigmas_type", "implemented: zero, sigma_min")),
        }
    }
}

/// The training betas in float32, as diffusers' `__init__` builds them.
fn betas(cfg: &SchedulerConfig, n: usize) -> Result<Vec<f32>> {
    if let Some(trained) = cfg.opt_f64_list("trained_betas")? {
        if trained.len() != n {
            return Err(Error::InvalidValue {
                path: cfg.path().to_path_buf(),
                key: "trained_betas".into(),
                value: format!("a list of {} values", trained.len()),
                expected: "one beta per training timestep (num_train_timesteps)",
            });
        }
        return Ok(trained.iter().map(|&b| b as f32).collect());
    }
    let beta_start = cfg.finite_f64_or("beta_start", 0.0001)?;
    let beta_end = cfg.finite_f64_or("beta_end", 0.02)?;
    for (key, v) in [("beta_start", beta_start), ("beta_end", beta_end)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::InvalidValue {
                path: cfg.path().to_path_buf(),
                key: key.into(),
                value: v.to_string(),
                expected: "a noise variance in [0, 1)",
            });
        }
    }
    match cfg.str_or("beta_schedule", "linear")? {
        "linear" => Ok(torch_linspace_f32(beta_start, beta_end, n)),
        "scaled_linear" => Ok(torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect()),
        "squaredcos_cap_v2" => Ok(glide_cosine_betas(n)),
        _ => Err(cfg.unsupported(
            "beta_schedule",
            "implemented: linear, scaled_linear, squaredcos_cap_v2",
        )),
    }
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform: float64 maths,
/// stored as float32.
fn glide_cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Checks the requested number of inference steps against the training schedule.
pub(crate) fn check_num_steps(cfg: &SchedulerConfig, steps: usize, train: usize) -> Result<()> {
    if steps == 0 || steps > train {
        return Err(Error::NumSteps {
            path: cfg.path().to_path_buf(),
            steps,
            num_train_timesteps: train,
        });
    }
    Ok(())
}

/// Rejects a boolean option that is switched on but not implemented.
pub(crate) fn reject_true(cfg: &SchedulerConfig, key: &str, default: bool) -> Result<()> {
    if cfg.bool_or(key, default)? {
        return Err(cfg.unsupported(key, "this option is not implemented"));
    }
    Ok(())
}
