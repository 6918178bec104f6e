//! UniPC, after diffusers' `UniPCMultistepScheduler` (Zhao et al. 2023, arXiv
//! 2302.04867): a multistep predictor (UniP) whose result the next step's model output
//! corrects (UniC), with the B(h) variants bh1 and bh2, on data (`predict_x0`) or noise
//! predictions, with Karras sigmas where asked.

use candle_core::{bail, DType, Tensor};

use crate::common::{
    check_num_steps, check_order_fits, karras_flag, karras_sigmas, log_sigmas, reject_true,
    sigma_to_t, PredictionType, SdParams,
};
use crate::dpm::{alpha_sigma, lambda, multistep_timesteps};
use crate::numerics::{div, mul, np_interp_index};
use crate::{Error, Result, Scheduler, SchedulerConfig};

/// Highest `solver_order` implemented (the UniPC paper uses up to 3).
const MAX_ORDER: usize = 3;

/// diffusers' `UniPCMultistepScheduler` without `solver_p`, thresholding or flow sigmas.
#[derive(Debug, Clone)]
pub struct UniPCMultistepScheduler {
    prediction_type: PredictionType,
    predict_x0: bool,
    /// `bh2`: B(h) = e^h - 1; `bh1`: B(h) = h.
    bh2: bool,
    order: usize,
    lower_order_final: bool,
    /// Steps whose result is not corrected by the next step (`disable_corrector`).
    disable_corrector: Vec<usize>,
    timesteps: Vec<f64>,
    /// float32 as in diffusers; `sigmas_f64` is the same values widened.
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    /// The converted model outputs of the last `order` steps, oldest first.
    model_outputs: Vec<Tensor>,
    /// The sample the last predictor started from, for the next corrector.
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
}

impl UniPCMultistepScheduler {
    /// Builds the scheduler from `cfg` and sets `num_steps` inference timesteps.
    ///
    /// # Errors
    /// Besides unsupported keys: a `solver_order` above `num_steps` (the run would never
    /// reach it), and the combinations where diffusers' last step is NaN or fails
    /// (a zero final sigma with `predict_x0: false` or with `lower_order_final: false`).
    pub fn new(cfg: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let sd = SdParams::from_config(cfg, "linspace")?;
        let n_train = sd.num_train_timesteps;
        check_num_steps(cfg, num_steps, n_train)?;
        let order = cfg.usize_or("solver_order", 2)?;
        if !(1..=MAX_ORDER).contains(&order) {
            return Err(cfg.unsupported("solver_order", "implemented: 1, 2, 3"));
        }
        check_order_fits("UniPC", order, num_steps)?;
        let bh2 = match cfg.str_or("solver_type", "bh2")? {
            "bh1" => false,
            // diffusers maps the DPM-Solver names onto bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            _ => return Err(cfg.unsupported("solver_type", "implemented: bh1, bh2")),
        };
        let karras = karras_flag(cfg)?;
        for key in ["thresholding", "use_flow_sigmas", "use_dynamic_shifting"] {
            reject_true(cfg, key, false)?;
        }
        if cfg.opt_f64("shift_terminal")?.is_some() {
            return Err(cfg.unsupported(
                "shift_terminal",
                "diffusers refuses shift_terminal without use_flow_sigmas",
            ));
        }
        if cfg.values_has_non_null("solver_p") {
            return Err(cfg.unsupported("solver_p", "a separate predictor is not implemented"));
        }
        let disable_corrector = cfg.usize_list_or_empty("disable_corrector")?;
        let predict_x0 = cfg.bool_or("predict_x0", true)?;
        let lower_order_final = cfg.bool_or("lower_order_final", true)?;
        let sigma_min = cfg.opt_f64("sigma_min")?;
        let sigma_max = cfg.opt_f64("sigma_max")?;
        for (key, v) in [("sigma_min", sigma_min), ("sigma_max", sigma_max)] {
            if karras && v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err(cfg.unsupported(key, "expected a positive finite sigma"));
            }
        }
        let final_sigmas_type = cfg.str_or("final_sigmas_type", "zero")?;
        if !matches!(final_sigmas_type, "zero" | "sigma_min") {
            return Err(cfg.unsupported("final_sigmas_type", "implemented: zero, sigma_min"));
        }
        let zero_final = final_sigmas_type == "zero";
        if zero_final && !predict_x0 {
            return Err(cfg.unsupported(
                "predict_x0",
                "the noise-prediction form cannot step to a zero final sigma (diffusers' last \
                 step is NaN); use final_sigmas_type sigma_min, or predict_x0 true",
            ));
        }
        if zero_final && !lower_order_final && order > 1 && num_steps > 1 {
            return Err(cfg.unsupported(
                "lower_order_final",
                "a higher-order last step to a zero final sigma divides by an infinite step \
                 (diffusers' last step is NaN or a singular solve); keep lower_order_final \
                 true, or use final_sigmas_type sigma_min",
            ));
        }

        let n = num_steps;
        let train_sigmas_f32 = sd.train_sigmas();
        let (timesteps, mut sigmas, karras_last): (Vec<i64>, Vec<f32>, f64) = if karras {
            let lo = sigma_min.unwrap_or(train_sigmas_f32[0] as f64);
            let hi = sigma_max.unwrap_or(train_sigmas_f32[n_train - 1] as f64);
            if lo > hi {
                return Err(cfg.unsupported(
                    "sigma_min",
                    &format!("the Karras ramp needs sigma_min <= sigma_max ({hi})"),
                ));
            }
            let k = karras_sigmas(lo, hi, n);
            let logs = log_sigmas(&train_sigmas_f32);
            let t = k
                .iter()
                .map(|&s| sigma_to_t(s, &logs).round_ties_even() as i64)
                .collect();
            let last = k[n - 1];
            (t, k.iter().map(|&s| s as f32).collect(), last)
        } else {
            let mut t = multistep_timesteps(&sd, n_train, n);
            // Trailing spacing may give one timestep too many (see `trailing_timesteps`).
            t.truncate(n);
            let train_sigmas: Vec<f64> = train_sigmas_f32.iter().map(|&s| s as f64).collect();
            let s = t
                .iter()
                .map(|&t| np_interp_index(t as f64, &train_sigmas) as f32)
                .collect();
            (t, s, train_sigmas_f32[0] as f64)
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0 || t >= n_train as i64) {
            return Err(Error::TimestepOutOfRange {
                path: cfg.path().to_path_buf(),
                steps: n,
                timestep: t,
                num_train_timesteps: n_train,
            });
        }
        // sigma_min: the Karras ramp's own end there, the training table's first sigma
        // otherwise (diffusers computes the latter in float32 from alphas_cumprod[0]).
        sigmas.push(if zero_final {
            0.0
        } else if karras {
            karras_last as f32
        } else {
            sd.final_sigma(cfg)?
        });
        Ok(Self {
            prediction_type: sd.prediction_type,
            predict_x0,
            bh2,
            order,
            lower_order_final,
            disable_corrector,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas_f64: sigmas.iter().map(|&s| s as f64).collect(),
            sigmas,
            model_outputs: Vec::new(),
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
        })
    }

    /// `(alpha, sigma, lambda)` at sigma index `i`.
    fn point(&self, i: usize) -> (f32, f32, f32) {
        let (a, s) = alpha_sigma(self.sigmas[i]);
        (a, s, lambda(a, s))
    }

    /// The data (or noise) prediction the solver works on.
    fn convert(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t, _) = self.point(i);
        if self.predict_x0 {
            match self.prediction_type {
                PredictionType::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t),
                PredictionType::VPrediction => mul(sample, alpha_t)? - mul(model_output, sigma_t)?,
            }
        } else {
            match self.prediction_type {
                PredictionType::Epsilon => Ok(model_output.clone()),
                PredictionType::VPrediction => mul(model_output, alpha_t)? + mul(sample, sigma_t)?,
            }
        }
    }

    /// The B(h) update's coefficients: `h_phi_1`, `B(h)` and the right-hand side `b` of
    /// the order conditions, in float32 as diffusers computes them.
    fn coefficients(&self, h: f32, order: usize) -> (f32, f32, Vec<f32>) {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1u64;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= (i + 1) as u64;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        (h_phi_1, b_h, b)
    }

    /// `x_t_` of both updates: the first-order (DDIM-like) part.
    fn first_order(
        &self,
        x: &Tensor,
        m0: &Tensor,
        (alpha_t, sigma_t): (f32, f32),
        (alpha_s0, sigma_s0): (f32, f32),
        h_phi_1: f32,
    ) -> candle_core::Result<Tensor> {
        if self.predict_x0 {
            mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * h_phi_1)?
        } else {
            mul(x, alpha_t / alpha_s0)? - mul(m0, sigma_t * h_phi_1)?
        }
    }

    /// The factor of the higher-order residual: `alpha_t B(h)` or `sigma_t B(h)`.
    fn residual_factor(&self, alpha_t: f32, sigma_t: f32, b_h: f32) -> f32 {
        if self.predict_x0 {
            alpha_t * b_h
        } else {
            sigma_t * b_h
        }
    }

    /// UniP-`order` from sample `x` at step `i` (the newest model output is `m0`).
    fn predictor(&self, x: &Tensor, order: usize, i: usize) -> candle_core::Result<Tensor> {
        let outputs = &self.model_outputs;
        let m0 = &outputs[outputs.len() - 1];
        let (alpha_t, sigma_t, lambda_t) = self.point(i + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(i);
        let h = lambda_t - lambda_s0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let mk = &outputs[outputs.len() - 1 - k];
            let (_, _, lambda_sk) = self.point(i - k);
            let rk = (lambda_sk - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div(&(mk - m0)?, rk)?);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, b) = self.coefficients(h, order);
        let x_t_ = self.first_order(x, m0, (alpha_t, sigma_t), (alpha_s0, sigma_s0), h_phi_1)?;
        if d1s.is_empty() {
            // diffusers multiplies a zero residual by B(h), which is infinite for bh1 at a
            // zero final sigma (NaN there); the term is zero.
            return Ok(x_t_);
        }
        let rhos: Vec<f32> = if order == 2 {
            vec![0.5]
        } else {
            solve(&powers(&rks, order - 1), &b[..order - 1])
        };
        let res = weighted_sum(&rhos, &d1s)?;
        x_t_ - mul(&res, self.residual_factor(alpha_t, sigma_t, b_h))?
    }

    /// UniC-`order`: the last predictor's result (now at step `i`) corrected with this
    /// step's converted model output `model_t`, recomputed from `last_sample`.
    fn corrector(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
        i: usize,
    ) -> candle_core::Result<Tensor> {
        let outputs = &self.model_outputs;
        let m0 = &outputs[outputs.len() - 1];
        let (alpha_t, sigma_t, lambda_t) = self.point(i);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(i - 1);
        let h = lambda_t - lambda_s0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let mk = &outputs[outputs.len() - 1 - k];
            let (_, _, lambda_sk) = self.point(i - (k + 1));
            let rk = (lambda_sk - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div(&(mk - m0)?, rk)?);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, b) = self.coefficients(h, order);
        let rhos: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            solve(&powers(&rks, order), &b)
        };
        let x_t_ = self.first_order(
            last_sample,
            m0,
            (alpha_t, sigma_t),
            (alpha_s0, sigma_s0),
            h_phi_1,
        )?;
        let d1_t = (model_t - m0)?;
        let last = mul(&d1_t, rhos[rhos.len() - 1])?;
        let inner = if d1s.is_empty() {
            last
        } else {
            (weighted_sum(&rhos[..rhos.len() - 1], &d1s)? + last)?
        };
        x_t_ - mul(&inner, self.residual_factor(alpha_t, sigma_t, b_h))?
    }
}

/// The matrix `R[p][k] = rks[k]^p` for p in 0..n, restricted to its first n columns.
fn powers(rks: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|p| rks[..n].iter().map(|r| r.powi(p as i32)).collect())
        .collect()
}

/// Solves the small system `a x = b` (Gaussian elimination with partial pivoting, in
/// float64, rounded to float32: diffusers' `torch.linalg.solve` in float32).
fn solve(a: &[Vec<f32>], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = a[i][..n].iter().map(|&v| v as f64).collect();
            row.push(b[i] as f64);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&x, &y| m[x][col].abs().total_cmp(&m[y][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let (top, rest) = m.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for row in rest.iter_mut() {
            let f = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
        }
    }
    let mut x = vec![0f64; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    x.into_iter().map(|v| v as f32).collect()
}

/// `sum_k w[k] d[k]` (diffusers' einsum over the stacked differences).
fn weighted_sum(w: &[f32], d: &[Tensor]) -> candle_core::Result<Tensor> {
    let mut acc = mul(&d[0], w[0])?;
    for (wk, dk) in w.iter().zip(d).skip(1) {
        acc = (acc + mul(dk, *wk)?)?;
    }
    Ok(acc)
}

impl Scheduler for UniPCMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Calling with `step_index == 0` starts a new run and drops the history.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let n = self.timesteps.len();
        let i = step_index;
        if i >= n {
            bail!("UniPC step index {i} out of range for {n} steps")
        }
        if i == 0 {
            self.model_outputs.clear();
            self.last_sample = None;
            self.this_order = 1;
            self.lower_order_nums = 0;
        }
        let out_dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let converted = self.convert(&model_output, &sample, i)?;
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.corrector(&converted, last, self.this_order, i)?,
            _ => sample,
        };
        self.model_outputs.push(converted);
        if self.model_outputs.len() > self.order {
            self.model_outputs.remove(0);
        }
        let this_order = if self.lower_order_final {
            self.order.min(n - i)
        } else {
            self.order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predictor(&sample, self.this_order, i)?;
        self.last_sample = Some(sample);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        prev.to_dtype(out_dtype)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }
}
