//! One rank's copy of the sampling state: scheduler, latents, guidance and step noise.
//! Every rank steps its own copy with the same predictions and draws the same noise (a
//! function of the seed and the step, see [`crate::noise`]), so ranks stay in lockstep
//! without sending latents.
//!
//! Guidance is applied here and only here: [`Sampler::step_guided`] combines the branches
//! (`eps_u + w (eps_c - eps_u)`) and then rescales (diffusers' `guidance_rescale`), for
//! every strategy; [`Sampler::step_reused`] does the same for Hybridiff's pipelined steps
//! under `--pipelined-guidance reuse`.

use candle_core::{DType, Tensor};
use hybridiff_models::nn::mean_abs;
use hybridiff_schedulers::{Scheduler, SchedulerConfig, SchedulerKind};

use crate::noise::NoiseStream;
use crate::{Error, Field, Job, Result};
use hybridiff_schedulers::ScheduleOptions;

/// The error of building a `kind` schedule of `steps` steps, as a [`Error::Refused`] where
/// it is about a value a request chooses: `--karras` for a sampler without Karras sigmas
/// ([`Field::Karras`]), a step count the sampler cannot run (LCM above its
/// `original_inference_steps`, a UniPC order above the steps: [`Field::Steps`]). Config
/// errors stay [`Error::Scheduler`]: they name the key.
pub fn schedule_refusal(
    e: hybridiff_schedulers::Error,
    kind: SchedulerKind,
    steps: usize,
) -> Error {
    match e {
        hybridiff_schedulers::Error::Option { option, message } if option == "--karras" => {
            Error::refused(
                Field::Karras,
                format!("{option}: {message}"),
                format!("`karras`: {message}"),
            )
        }
        hybridiff_schedulers::Error::Option { option, message }
            if option.starts_with("--steps") =>
        {
            Error::refused(
                Field::Steps,
                format!("{option}: {message}"),
                format!("`num_inference_steps` {steps} with the {kind} sampler: {message}"),
            )
        }
        e => Error::Scheduler(e),
    }
}

/// Steps a `kind` sampler of `steps` steps with `opts` and a stand-in model (one latent
/// value, a prediction of `0.1 x` each step, zero step noise where the sampler draws any)
/// and returns the first step that gives NaN or inf, if any: a schedule that divides by
/// zero (two timesteps that round to one, a timestep past the training schedule:
/// diffusers' DPM-Solver at 999 of 1000 steps) ruins any model's run, so it is refused
/// before compute rather than blamed on the weights at step 2. Costs a few scalar ops per
/// step.
fn first_non_finite_step(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    steps: usize,
    opts: &ScheduleOptions,
) -> Result<Option<usize>> {
    let mut s = hybridiff_schedulers::build_with(config, kind, steps, opts)
        .map_err(|e| schedule_refusal(e, kind, steps))?;
    let dev = candle_core::Device::Cpu;
    let mut x =
        (Tensor::ones((1, 1, 1, 1), candle_core::DType::F32, &dev)? * s.init_noise_sigma())?;
    let zero = Tensor::zeros((1, 1, 1, 1), candle_core::DType::F32, &dev)?;
    for i in 0..steps {
        let input = s.scale_model_input(&x, i)?;
        let eps = (input * 0.1)?;
        x = s.step(&eps, i, &x, Some(&zero))?;
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        if !v.iter().all(|v| v.is_finite()) || !s.timestep(i).is_finite() {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Whether a `kind` schedule of `steps` steps can run: it builds, and steps a stand-in model
/// without NaN.
fn schedule_runs(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    steps: usize,
    opts: &ScheduleOptions,
) -> bool {
    matches!(first_non_finite_step(config, kind, steps, opts), Ok(None))
}

/// Checks, before any compute, that `config` gives a `kind` schedule of `steps` steps
/// that a well-behaved model can run: the errors of [`hybridiff_schedulers::build`] about the
/// step count (too many steps, a timestep past the training schedule) and schedules that
/// give NaN by themselves are worded for `--steps` and say the most steps that work.
/// Config errors (a bad key) are returned as they are: they name the key; the sampler's own
/// refusals (`--karras`, LCM's and UniPC's step limits) as [`schedule_refusal`] words them.
/// `opts`: `--karras` and the image's token count (flow dynamic shifting).
pub fn check_schedule(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    steps: usize,
    opts: &ScheduleOptions,
) -> Result<()> {
    // The most steps a config could give (past it, the error says so), for the search below.
    let mut top = steps.saturating_sub(1);
    let problem = match first_non_finite_step(config, kind, steps, opts) {
        Ok(None) => return Ok(()),
        Ok(Some(i)) => format!(
            "the {kind} sampler's schedule for {steps} steps gives NaN or inf at step {} of {steps} whatever the model (timestep {})",
            i + 1,
            hybridiff_schedulers::build_with(config, kind, steps, opts)?.timestep(i)
        ),
        Err(Error::Scheduler(e @ hybridiff_schedulers::Error::NumSteps { .. })) => {
            if let hybridiff_schedulers::Error::NumSteps {
                num_train_timesteps,
                ..
            } = e
            {
                top = top.min(num_train_timesteps);
            }
            e.to_string()
        }
        Err(Error::Scheduler(e @ hybridiff_schedulers::Error::TimestepOutOfRange { .. })) => {
            e.to_string()
        }
        Err(e) => return Err(e),
    };
    // The most steps at or below `top` that run: usually the first tried; the search stops
    // after about 200000 simulated steps (well under a second).
    let mut budget = 200_000usize;
    let most = (top.saturating_sub(255).max(1)..=top).rev().find(|&n| {
        budget = budget.saturating_sub(n);
        n > 0 && budget > 0 && schedule_runs(config, kind, n, opts)
    });
    let (fix, request_fix) = match most {
        Some(n) => (
            format!("at most {n} steps work: use --steps {n} or fewer"),
            format!("at most {n} steps work"),
        ),
        None => (
            "use fewer --steps".to_string(),
            "use fewer steps".to_string(),
        ),
    };
    Err(Error::refused(
        crate::Field::Steps,
        format!(
            "--steps {steps}: too many for the {kind} sampler with this model's scheduler config: {problem}; {fix}"
        ),
        format!(
            "`num_inference_steps` {steps}: too many for this model's scheduler ({kind}); {request_fix}"
        ),
    ))
}

/// A rank's sampling state.
pub struct Sampler {
    scheduler: Box<dyn Scheduler>,
    /// The current latents, `[1, C, h, w]`.
    pub latents: Tensor,
    guidance: f64,
    guidance_rescale: f64,
    noise: NoiseStream,
    /// The prediction the last step took (guided, rescaled), for a step cache that repeats
    /// it ([`Sampler::last_prediction`]).
    last: Option<Tensor>,
}

/// `mean|eps_c - eps_u| / (mean|eps_u| + 1e-12)`: the branches' relative discrepancy.
pub fn rel_mae(eps_u: &Tensor, eps_c: &Tensor) -> Result<f64> {
    Ok(mean_abs(&(eps_c - eps_u)?)? / (mean_abs(eps_u)? + 1e-12))
}

/// diffusers' `rescale_noise_cfg` (Lin et al. 2023, section 3.4): the guided prediction
/// `noise_cfg` rescaled to the per-sample standard deviation of the conditional one,
/// `noise_cfg * std(text) / std(cfg)`, mixed with the unrescaled one by `phi`:
/// `phi * rescaled + (1 - phi) * noise_cfg`. Shapes `[B, ...]`, statistics per sample over
/// all other dimensions, unbiased (torch's `std`), computed on the tensors' device in
/// float64 (no host read).
///
/// Where a sample's `std(cfg)` is 0 (a constant guided prediction) the ratio is 1, so
/// the rescale leaves it unchanged: diffusers divides by zero there and the NaN spreads
/// through the rest of the run (diffusers#13425).
pub fn rescale_noise_cfg(noise_cfg: &Tensor, noise_pred_text: &Tensor, phi: f64) -> Result<Tensor> {
    let dtype = noise_cfg.dtype();
    let b = noise_cfg.dim(0)?;
    let std = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F64)?.reshape((b, ()))?;
        let n = t.dim(1)?;
        let mean = t.mean_keepdim(1)?;
        let dev = t.broadcast_sub(&mean)?;
        // An unbiased variance needs two values; one value has none (torch gives NaN).
        let var = (dev.sqr()?.sum_keepdim(1)? / (n.max(2) - 1) as f64)?;
        Ok(var.sqrt()?)
    };
    let std_text = std(noise_pred_text)?;
    let std_cfg = std(noise_cfg)?;
    let ratio = std_text.div(&std_cfg)?;
    // Per sample: the ratio where std(cfg) > 0 and the ratio is finite, else 1.
    let usable = std_cfg.gt(0.0)?.mul(&ratio.abs()?.lt(f64::MAX)?)?;
    let ratio = usable.where_cond(&ratio, &ratio.ones_like()?)?;
    let shape: Vec<usize> = std::iter::once(b)
        .chain(std::iter::repeat_n(1, noise_cfg.rank() - 1))
        .collect();
    let ratio = ratio.reshape(shape)?;
    let cfg64 = noise_cfg.to_dtype(DType::F64)?;
    let rescaled = cfg64.broadcast_mul(&ratio)?;
    let mixed = ((rescaled * phi)? + (cfg64 * (1.0 - phi))?)?;
    Ok(mixed.to_dtype(dtype)?)
}

impl Sampler {
    /// Sets up the scheduler and the starting latents (scaled by `init_noise_sigma`).
    pub fn new(job: &Job) -> Result<Self> {
        let scheduler = job.build_scheduler()?;
        let latents = (&job.inputs.latents * scheduler.init_noise_sigma())?;
        Ok(Self {
            scheduler,
            latents,
            guidance: job.guidance,
            guidance_rescale: job.sampling.guidance_rescale,
            noise: job.sampling.noise.stream(),
            last: None,
        })
    }

    /// The denoiser's timestep at step `i`.
    pub fn timestep(&self, i: usize) -> f64 {
        self.scheduler.timestep(i)
    }

    /// The denoiser's input at step `i`.
    pub fn model_input(&self, i: usize) -> Result<Tensor> {
        Ok(self.scheduler.scale_model_input(&self.latents, i)?)
    }

    /// Applies guidance (`eps_u + w (eps_c - eps_u)`, diffusers' order), then the guidance
    /// rescale toward `eps_c` when one is set, and steps.
    pub fn step_guided(&mut self, i: usize, eps_u: &Tensor, eps_c: &Tensor) -> Result<()> {
        let eps = (eps_u + ((eps_c - eps_u)? * self.guidance)?)?;
        let eps = self.rescale(eps, eps_c)?;
        self.step(i, &eps)
    }

    /// A pipelined Hybridiff step under `--pipelined-guidance reuse`: the stale-input
    /// prediction `pred` plus the last exact step's guidance correction `w * diff`
    /// (`diff = eps_c - eps_u` of that step), then the guidance rescale toward `pred`, the
    /// one prediction this step has (its counterpart of `eps_c`), and steps.
    pub fn step_reused(&mut self, i: usize, pred: &Tensor, diff: &Tensor) -> Result<()> {
        let eps = (pred + (diff * self.guidance)?)?;
        let eps = self.rescale(eps, pred)?;
        self.step(i, &eps)
    }

    /// The prediction the last step took, after guidance and rescale, as the scheduler saw
    /// it; `None` before the first step. Stepping with it again is what a cached step of a
    /// whole-prediction cache (`teacache` on a U-Net) does, whatever layout computed it.
    pub fn last_prediction(&self) -> Option<Tensor> {
        self.last.clone()
    }

    fn rescale(&self, eps: Tensor, cond: &Tensor) -> Result<Tensor> {
        if self.guidance_rescale > 0.0 {
            rescale_noise_cfg(&eps, cond, self.guidance_rescale)
        } else {
            Ok(eps)
        }
    }

    /// Steps with a prediction used as is: the conditional one without CFG, or a
    /// pipelined Hybridiff step's (`--pipelined-guidance none`: unguided, so nothing to
    /// rescale; its rescale toward itself would be the identity). Draws step `i`'s noise
    /// when the scheduler needs it.
    pub fn step(&mut self, i: usize, eps: &Tensor) -> Result<()> {
        let eps = eps.to_dtype(self.latents.dtype())?;
        self.last = Some(eps.clone());
        let noise = if self.scheduler.needs_noise(i) {
            let n = self
                .noise
                .step(i, self.latents.dims(), self.latents.device())?;
            Some(n.to_dtype(self.latents.dtype())?)
        } else {
            None
        };
        self.latents = self
            .scheduler
            .step(&eps, i, &self.latents, noise.as_ref())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn rescale_matches_the_formula() {
        let dev = Device::Cpu;
        let cfg = Tensor::new(&[[1.0f32, 2.0, 4.0, 7.0], [0.5, -0.5, 1.5, 0.0]], &dev).unwrap();
        let text = Tensor::new(&[[0.0f32, 1.0, 0.0, 1.0], [3.0, -3.0, 0.0, 6.0]], &dev).unwrap();
        let got = values(&rescale_noise_cfg(&cfg, &text, 0.7).unwrap());
        let std = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
        };
        let c = [[1.0, 2.0, 4.0, 7.0], [0.5, -0.5, 1.5, 0.0]];
        let t = [[0.0, 1.0, 0.0, 1.0], [3.0, -3.0, 0.0, 6.0]];
        for r in 0..2 {
            let ratio = std(&t[r]) / std(&c[r]);
            for k in 0..4 {
                let want = 0.7 * c[r][k] * ratio + 0.3 * c[r][k];
                assert!((got[r * 4 + k] as f64 - want).abs() < 1e-6, "{r} {k}");
            }
        }
    }

    #[test]
    fn a_constant_guided_prediction_is_left_unchanged_not_nan() {
        // diffusers#13425: std(cfg) = 0 divides by zero. Row 0 constant, row 1 zeros, row
        // 2 an ordinary row that must still be rescaled.
        let dev = Device::Cpu;
        let cfg = Tensor::new(
            &[
                [2.0f32, 2.0, 2.0, 2.0],
                [0.0, 0.0, 0.0, 0.0],
                [1.0, -1.0, 1.0, -1.0],
            ],
            &dev,
        )
        .unwrap();
        let text = Tensor::new(
            &[
                [1.0f32, -1.0, 3.0, 0.0],
                [1.0, 2.0, 3.0, 4.0],
                [2.0, -2.0, 2.0, -2.0],
            ],
            &dev,
        )
        .unwrap();
        let got = values(&rescale_noise_cfg(&cfg, &text, 0.7).unwrap());
        assert!(got.iter().all(|v| v.is_finite()), "{got:?}");
        assert_eq!(&got[..8], &[2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
        // Row 2: std ratio 2, so 0.7 * 2x + 0.3 x = 1.7 x.
        for (g, x) in got[8..].iter().zip([1.0f32, -1.0, 1.0, -1.0]) {
            assert!((g - 1.7 * x).abs() < 1e-6, "{g}");
        }
        // phi = 0 is the plain guided prediction.
        let plain = values(&rescale_noise_cfg(&cfg, &text, 0.0).unwrap());
        assert_eq!(plain, values(&cfg));
    }

    #[test]
    fn rescale_keeps_shape_and_dtype() {
        let dev = Device::Cpu;
        let cfg = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
        let text = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
        let out = rescale_noise_cfg(&cfg, &text, 1.0).unwrap();
        assert_eq!(out.dims(), cfg.dims());
        assert_eq!(out.dtype(), DType::F32);
        // phi = 1: each sample's std equals the conditional one's.
        for b in 0..2 {
            let std = |t: &Tensor| {
                let v: Vec<f64> = values(&t.get(b).unwrap())
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let m = v.iter().sum::<f64>() / v.len() as f64;
                (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
            };
            assert!((std(&out) - std(&text)).abs() < 1e-5);
        }
    }
}
