//! DPM-Solver++ 2M (multistep, second order, midpoint), after diffusers'
//! `DPMSolverMultistepScheduler`: the ODE solver (`algorithm_type: dpmsolver++`, Lu et al.
//! 2022, arXiv 2211.01095, Alg. 2) and its SDE variant (`sde-dpmsolver++`, same paper,
//! section 5), with Karras sigmas (`use_karras_sigmas`) where asked.

use candle_core::{bail, DType, Tensor};

use crate::common::{
    check_num_steps, karras_flag, karras_sigmas, log_sigmas, reject_true, sigma_to_t,
    trailing_timesteps, PredictionType, SdParams, TimestepSpacing,
};
use crate::numerics::{div, mul, np_interp_index, np_linspace};
use crate::{step_noise, Result, Scheduler, SchedulerConfig};

/// diffusers' `DPMSolverMultistepScheduler` restricted to `algorithm_type`
/// `dpmsolver++` or `sde-dpmsolver++`, `solver_order = 2`, `solver_type = "midpoint"`.
#[derive(Debug, Clone)]
pub struct DPMSolverMultistepScheduler {
    prediction_type: PredictionType,
    /// `sde-dpmsolver++`: every step adds fresh noise.
    sde: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    timesteps: Vec<f64>,
    /// float32 as in diffusers; `sigmas_f64` is the same values widened.
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    /// The data predictions of the previous and the current step.
    prev_x0: Option<Tensor>,
    /// How many steps have run, capped at the solver order.
    lower_order_nums: usize,
}

/// The spacing's integer timesteps as DPM-Solver and UniPC space them (`n + 1` points of
/// which the last is dropped, for linspace and leading), below `last_timestep`; trailing
/// spacing may hold one value too many (see [`trailing_timesteps`]).
pub(crate) fn multistep_timesteps(sd: &SdParams, last_timestep: usize, n: usize) -> Vec<i64> {
    match sd.timestep_spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + sd.steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            trailing_timesteps(last_timestep as f64, sd.num_train_timesteps, n)
                .into_iter()
                .map(|t| t as i64)
                .collect()
        }
    }
}

impl DPMSolverMultistepScheduler {
    /// DPM-Solver++ 2M (the ODE solver) from `cfg`, with `num_steps` inference timesteps;
    /// the config's `algorithm_type` may be `dpmsolver++` (or diffusers' alias `deis`)
    /// or `sde-dpmsolver++`, which this ignores (naming the kind picks the algorithm).
    pub fn new(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        Self::build(cfg, num_steps, false)
    }

    /// DPM-Solver++ 2M SDE (`algorithm_type: sde-dpmsolver++`) from `cfg`.
    pub fn new_sde(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        Self::build(cfg, num_steps, true)
    }

    fn build(cfg: &SchedulerConfig, num_steps: usize, sde: bool) -> Result<Self> {
        let sd = SdParams::from_config(cfg, "linspace")?;
        let n_train = sd.num_train_timesteps;
        check_num_steps(cfg, num_steps, n_train)?;
        if cfg.usize_or("solver_order", 2)? != 2 {
            return Err(cfg.unsupported("solver_order", "implemented: 2"));
        }
        // diffusers itself maps "deis" to dpmsolver++; the kind picks ODE or SDE.
        if !matches!(
            cfg.str_or("algorithm_type", "dpmsolver++")?,
            "dpmsolver++" | "deis" | "sde-dpmsolver++"
        ) {
            return Err(cfg.unsupported(
                "algorithm_type",
                "implemented: dpmsolver++ (dpmpp-2m), sde-dpmsolver++ (dpmpp-2m-sde)",
            ));
        }
        // diffusers maps the UniPC/DEIS solver names onto midpoint.
        if !matches!(
            cfg.str_or("solver_type", "midpoint")?,
            "midpoint" | "logrho" | "bh1" | "bh2"
        ) {
            return Err(cfg.unsupported("solver_type", "implemented: midpoint"));
        }
        let karras = karras_flag(cfg)?;
        for key in [
            "thresholding",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ] {
            reject_true(cfg, key, false)?;
        }
        if let Some(v) = cfg.opt_str("variance_type")? {
            if v == "learned" || v == "learned_range" {
                return Err(cfg.unsupported("variance_type", "learned variance is not implemented"));
            }
        }
        let final_sigma = sd.final_sigma(cfg)?;
        let lambda_min_clipped = cfg.f64_or("lambda_min_clipped", f64::NEG_INFINITY)?;

        let n = num_steps;
        let train_sigmas_f32 = sd.train_sigmas();
        let (timesteps, mut sigmas): (Vec<i64>, Vec<f32>) = if karras {
            // The whole training range, as diffusers' Karras branch takes it (the spacing
            // and lambda_min_clipped do not apply).
            let lo = train_sigmas_f32[0] as f64;
            let hi = train_sigmas_f32[n_train - 1] as f64;
            let k = karras_sigmas(lo, hi, n);
            let logs = log_sigmas(&train_sigmas_f32);
            // diffusers leaves the cosine schedule's fractional timesteps unrounded, then
            // casts them to int64 (truncation).
            let cosine = cfg.str_or("beta_schedule", "linear")? == "squaredcos_cap_v2";
            let t = k
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    if cosine {
                        t as i64
                    } else {
                        t.round_ties_even() as i64
                    }
                })
                .collect();
            (t, k.iter().map(|&s| s as f32).collect())
        } else {
            // Timesteps whose log-SNR falls below `lambda_min_clipped` are cut off the top.
            let lambda_min = lambda_min_clipped as f32;
            let clipped_idx = sd
                .alphas_cumprod
                .iter()
                .rev()
                .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
                .position(|l| l >= lambda_min)
                .unwrap_or(n_train);
            let last_timestep = n_train - clipped_idx;
            let mut timesteps = multistep_timesteps(&sd, last_timestep, n);
            timesteps.truncate(n);
            // Trailing spacing strides by num_train_timesteps / n from the clipped
            // top, so clipping can leave fewer steps than asked for.
            if timesteps.len() != n {
                return Err(cfg.unsupported(
                    "lambda_min_clipped",
                    &format!(
                        "with this spacing it leaves {} of the {n} requested steps",
                        timesteps.len()
                    ),
                ));
            }
            let train_sigmas: Vec<f64> = train_sigmas_f32.iter().map(|&s| s as f64).collect();
            let sigmas = timesteps
                .iter()
                .map(|&t| np_interp_index(t as f64, &train_sigmas) as f32)
                .collect();
            (timesteps, sigmas)
        };
        sigmas.push(final_sigma);

        Ok(Self {
            prediction_type: sd.prediction_type,
            sde,
            lower_order_final: cfg.bool_or("lower_order_final", true)?,
            euler_at_final: cfg.bool_or("euler_at_final", false)?,
            final_sigma_zero: final_sigma == 0.0,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas_f64: sigmas.iter().map(|&s| s as f64).collect(),
            sigmas,
            prev_x0: None,
            lower_order_nums: 0,
        })
    }
}

/// `(alpha_t, sigma_t)` of the VP process for a Karras-style sigma, in float32.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The half log-SNR `log(alpha) - log(sigma)` (infinite at sigma = 0).
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The SDE variant draws noise at every step (diffusers draws it even where a zero
    /// final sigma makes its coefficient 0).
    fn needs_noise(&self, step_index: usize) -> bool {
        self.sde && step_index < self.timesteps.len()
    }

    /// Calling with `step_index == 0` starts a new run and drops the history.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let num_steps = self.timesteps.len();
        if step_index >= num_steps {
            bail!("DPM-Solver step index {step_index} out of range for {num_steps} steps")
        }
        let noise = if self.sde {
            Some(step_noise(noise, sample, "DPM-Solver++ SDE", step_index)?.to_dtype(DType::F32)?)
        } else {
            None
        };
        if step_index == 0 {
            self.prev_x0 = None;
            self.lower_order_nums = 0;
        }
        let out_dtype = sample.dtype();
        // diffusers upcasts the sample for the update; the output goes back to the
        // sample's dtype here (diffusers returns the model output's dtype).
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;

        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step_index]);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div(&(&sample - mul(&model_output, sigma_s0)?)?, alpha_s0)?,
            PredictionType::VPrediction => {
                (mul(&sample, alpha_s0)? - mul(&model_output, sigma_s0)?)?
            }
        };

        // Few-step runs are unstable at second order near the end; a zero final
        // sigma also needs a first-order last step.
        let last = step_index == num_steps - 1;
        let lower_order_final = last
            && (self.euler_at_final
                || (self.lower_order_final && num_steps < 15)
                || self.final_sigma_zero);

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;

        // D1 = (x0 - x0_prev) / r0 where a second-order step is taken.
        let d1 = match &self.prev_x0 {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step_index - 1]);
                let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let r0 = h_0 / h;
                Some(mul(&(&x0 - m1)?, 1.0 / r0)?)
            }
            _ => None,
        };
        let prev = match &noise {
            None => {
                let coef = alpha_t * ((-h).exp() - 1.0);
                let first = (mul(&sample, sigma_t / sigma_s0)? - mul(&x0, coef)?)?;
                match &d1 {
                    Some(d1) => (first - mul(d1, 0.5 * coef)?)?,
                    None => first,
                }
            }
            Some(noise) => {
                let e2h = (-2.0 * h).exp();
                let coef = alpha_t * (1.0 - e2h);
                let first = (mul(&sample, sigma_t / sigma_s0 * (-h).exp())? + mul(&x0, coef)?)?;
                let det = match &d1 {
                    Some(d1) => (first + mul(d1, 0.5 * coef)?)?,
                    None => first,
                };
                (det + mul(noise, sigma_t * (1.0 - e2h).sqrt())?)?
            }
        };
        self.prev_x0 = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        prev.to_dtype(out_dtype)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }
}
