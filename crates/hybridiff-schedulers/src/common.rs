//! The discrete-time (DDPM-style) training schedule shared by DDIM, Euler, Euler
//! Ancestral, DPM-Solver, UniPC and LCM, the config keys they all read, and the pieces of
//! `set_timesteps` they share (spacings, Karras sigmas, sigma-to-timestep interpolation).

use crate::numerics::{np_arange, torch_cumprod_f32, torch_linspace_f32};
use crate::{Error, Result, SchedulerConfig};

/// A scheduler class's defaults for the training-schedule keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SdDefaults {
    pub timestep_spacing: &'static str,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
}

impl SdDefaults {
    /// The defaults of most diffusers classes (`DDPMScheduler`'s), with the class's spacing.
    pub const fn ddpm(timestep_spacing: &'static str) -> Self {
        Self {
            timestep_spacing,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear",
        }
    }
}

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
    pub fn from_config(cfg: &SchedulerConfig, default_spacing: &'static str) -> Result<Self> {
        Self::from_config_with(cfg, SdDefaults::ddpm(default_spacing))
    }

    /// Reads the shared keys with the class's own `defaults`.
    pub fn from_config_with(cfg: &SchedulerConfig, defaults: SdDefaults) -> Result<Self> {
        let default_spacing = defaults.timestep_spacing;
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
        let betas = betas(cfg, num_train_timesteps, &defaults)?;
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
fn betas(cfg: &SchedulerConfig, n: usize, defaults: &SdDefaults) -> Result<Vec<f32>> {
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
    let beta_start = cfg.finite_f64_or("beta_start", defaults.beta_start)?;
    let beta_end = cfg.finite_f64_or("beta_end", defaults.beta_end)?;
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
    match cfg.str_or("beta_schedule", defaults.beta_schedule)? {
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

/// Refuses configs that switch on more than one of the sigma schedules, as diffusers'
/// `__init__` does ("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`,
/// `config.use_karras_sigmas` can be used"), then those this crate does not implement;
/// returns whether Karras sigmas are on.
pub(crate) fn karras_flag(cfg: &SchedulerConfig) -> Result<bool> {
    let keys = [
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
    ];
    let mut on = Vec::new();
    for key in keys {
        if cfg.bool_or(key, false)? {
            on.push(key);
        }
    }
    if on.len() > 1 {
        return Err(cfg.unsupported_value(
            on[1],
            "true".into(),
            &format!(
                "diffusers refuses {} together: only one of use_karras_sigmas, \
                 use_exponential_sigmas, use_beta_sigmas can be used",
                on.join(" and ")
            ),
        ));
    }
    reject_true(cfg, "use_exponential_sigmas", false)?;
    reject_true(cfg, "use_beta_sigmas", false)?;
    Ok(on == ["use_karras_sigmas"])
}

/// `np.arange(start, 0, -n_train / n).round() - 1`: the timesteps of `trailing` spacing.
/// numpy's float stride gives one value more for some `n` (61, 103, 121, ... of 1000):
/// diffusers then runs a step more than asked, to timestep -1. Callers take the first
/// `n` (the final sigma is unchanged), so `n` steps are `n` model evaluations.
pub(crate) fn trailing_timesteps(start: f64, n_train: usize, n: usize) -> Vec<f64> {
    np_arange(start, 0.0, -(n_train as f64 / n as f64))
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// diffusers' `_convert_to_karras`: `n` sigmas from `sigma_max` down to `sigma_min`,
/// evenly spaced in `sigma^(1/7)` (Karras et al. 2022, eq. 5, rho = 7), in float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    crate::numerics::np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep whose log-sigma
/// `sigma` interpolates, against `log_sigmas` (float32, increasing with the timestep).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // numpy: the argmax of the cumulative count of log_sigmas <= log_sigma, i.e. the last
    // such index (0 when there is none), clipped so that a higher neighbour exists.
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let mut low_idx = 0;
    let mut seen = 0;
    for (j, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            seen += 1;
            if seen == count {
                low_idx = j;
                break;
            }
        }
    }
    let low_idx = low_idx.min(log_sigmas.len().saturating_sub(2));
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The log of float32 training sigmas, in float32 (numpy's `np.log` of a float32 array).
pub(crate) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}

/// Refuses a solver order above the step count: the run would never reach that order
/// (diffusers lowers it silently).
pub(crate) fn check_order_fits(who: &str, order: usize, steps: usize) -> Result<()> {
    if order > steps {
        return Err(Error::Option {
            option: format!("--steps {steps}"),
            message: format!(
                "{who} of solver_order {order} (the scheduler config's) needs at least {order} \
                 steps; give more steps, or set solver_order to {steps} or less"
            ),
        });
    }
    Ok(())
}
