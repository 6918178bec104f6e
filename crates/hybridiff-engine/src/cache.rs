//! Step caching (`--cache`): fewer denoiser forwards by reusing module outputs of an
//! earlier step, under every strategy.
//!
//! Two methods, each for the models it fits:
//! - `deepcache` (DeepCache, Ma et al., CVPR 2024, arXiv 2312.00858): a U-Net's deep
//!   features change slowly from step to step, so on cached steps only the shallow branch
//!   runs (`conv_in`, `down_blocks.0..=branch`, `up_blocks.{n-1-branch}..`, the output
//!   layers) and every module in between (deeper down blocks, `mid_block`, deeper up
//!   blocks) gives its output of the last step that computed it; the deep feature entering
//!   the shallow up block is the one DeepCache caches. A full forward every `interval`
//!   steps (uniform 1:N schedule, sec. 3.3), after `warmup` full steps.
//! - `teacache` (TeaCache, Liu et al., arXiv 2411.19108): the first block's
//!   timestep-modulated input ([`Denoiser::modulated_input`]) is computed every step; its
//!   relative L1 change from the previous step is accumulated, and while the sum stays under
//!   `threshold` the step skips the blocks. On an MMDiT (the paper's setting) these are the
//!   transformer blocks, and the step adds the residual they produced at the last computed
//!   step (output minus input tokens) to this step's input tokens; `norm_out` and
//!   `proj_out` always run. On a U-Net the blocks are the whole network (its input and
//!   output are different quantities, so there is no residual to carry): a cached step
//!   reuses the last computed prediction, and the indicator is the first resnet's state
//!   where the time embedding is added. The sum resets when a step computes. The first
//!   `warmup` steps and the last step compute. No rescaling polynomial (the paper fits one
//!   per model; none is fitted for ours), so thresholds are in raw relative L1.
//!
//! How it composes: `run_rank` wraps the job's model in a [`StepCache`] (a [`Denoiser`]
//! that forwards to the model) and decides, before each step, whether the step is cached
//! ([`StepCache::plan_step`]). Every forward a strategy runs goes through the wrapper: a
//! whole forward ([`Denoiser::forward`]: serial, cfg, hybrid's exact steps), a band forward
//! ([`Denoiser::forward_patch`]: patch), or module by module (`begin` / `run_module` /
//! `apply_module` / `end`: the staged runner of async and hybrid), so every strategy, and
//! any layout built from these paths, caches the same way. On a cached step a skipped
//! module's output is this rank's own output of that module from the previous step, on
//! the same path with the same shapes (what `apply_module` already takes from other ranks
//! or earlier steps); where there is none (the first step of a path: a fill step, the first
//! exact step after pipelining) the module computes. The decision is the same on every
//! rank: `deepcache`'s from the step index; `teacache`'s from the modulated input of the
//! shared latents on the conditional branch, computed on rank 0 and broadcast as one
//! counted 4-byte message per step (so ranks on different devices cannot disagree on a
//! rounding). Ranks that skip modules skip the same ones, so band exchanges stay matched
//! (see `strategy::patch`).

use std::sync::Mutex;

use candle_core::Tensor;
use hybridiff_comm::Communicator;
use hybridiff_models::{Band, Conditioning, Denoiser, OutputRef, PatchContext, State};

use crate::{Error, Job, Result};

/// The methods, for messages.
pub const METHODS: &str = "deepcache (U-Nets) or teacache (MMDiTs and U-Nets)";

/// A step-caching method and its parameters, as `--cache` and `hybridiff.json`'s `cache`
/// write it: `deepcache:interval=3,branch=0,warmup=1`, `teacache:threshold=0.1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSpec {
    /// DeepCache: a full forward every `interval` steps after `warmup` full steps; cached
    /// steps run only the shallow branch at down block `branch`.
    DeepCache {
        interval: usize,
        branch: usize,
        warmup: usize,
    },
    /// TeaCache: skip every transformer block while the accumulated relative L1 change of
    /// the modulated input stays under `threshold`; the first `warmup` steps compute.
    TeaCache { threshold: f64, warmup: usize },
}

/// One parameter of a method: its name, bounds and default, for parsing, messages and
/// `hybridiff tune` (each method's first knob is the one that trades quality for speed).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Knob {
    pub method: &'static str,
    pub name: &'static str,
    /// Inclusive bounds (`threshold`'s minimum is exclusive: 0 caches nothing).
    pub min: f64,
    pub max: f64,
    pub default: f64,
    /// Whole numbers only.
    pub integer: bool,
    pub doc: &'static str,
}

/// Every method's parameters, the speed/quality knob first.
pub const KNOBS: &[Knob] = &[
    Knob {
        method: "deepcache",
        name: "interval",
        min: 2.0,
        max: 1000.0,
        default: 3.0,
        integer: true,
        doc: "a full forward every N steps (larger: faster, further from serial)",
    },
    Knob {
        method: "deepcache",
        name: "branch",
        min: 0.0,
        max: 15.0,
        default: 0.0,
        integer: true,
        doc: "the down block whose skip branch cached steps keep computing (0: the shallowest, fastest)",
    },
    Knob {
        method: "deepcache",
        name: "warmup",
        min: 0.0,
        max: crate::memory::MAX_STEPS as f64,
        default: 1.0,
        integer: true,
        doc: "full steps before caching starts",
    },
    Knob {
        method: "teacache",
        name: "threshold",
        min: 0.0,
        max: 10.0,
        default: 0.1,
        integer: false,
        doc: "accumulated relative L1 change of the modulated input under which a step reuses the blocks' residual (larger: faster, further from serial)",
    },
    Knob {
        method: "teacache",
        name: "warmup",
        min: 0.0,
        max: crate::memory::MAX_STEPS as f64,
        default: 1.0,
        integer: true,
        doc: "steps computed before caching starts (the first and last steps always compute)",
    },
];

impl CacheSpec {
    /// The method's name (`deepcache`, `teacache`).
    pub fn method(&self) -> &'static str {
        match self {
            Self::DeepCache { .. } => "deepcache",
            Self::TeaCache { .. } => "teacache",
        }
    }

    /// The method's parameters (the first trades quality for speed).
    pub fn knobs(&self) -> Vec<Knob> {
        knobs_of(self.method())
    }

    /// Parameter `name`'s value.
    pub fn get(&self, name: &str) -> Option<f64> {
        match (self, name) {
            (Self::DeepCache { interval, .. }, "interval") => Some(*interval as f64),
            (Self::DeepCache { branch, .. }, "branch") => Some(*branch as f64),
            (Self::DeepCache { warmup, .. }, "warmup") => Some(*warmup as f64),
            (Self::TeaCache { threshold, .. }, "threshold") => Some(*threshold),
            (Self::TeaCache { warmup, .. }, "warmup") => Some(*warmup as f64),
            _ => None,
        }
    }

    /// Sets parameter `name` to `value`, checked against its bounds (for `tune`).
    ///
    /// # Errors
    /// [`Error::Options`] naming the parameter and its bounds.
    pub fn set(&mut self, name: &str, value: f64) -> Result<()> {
        let knob = self.knob(name, "--cache")?;
        check_value(&knob, value, "--cache")?;
        let n = value as usize;
        match (self, name) {
            (Self::DeepCache { interval, .. }, "interval") => *interval = n,
            (Self::DeepCache { branch, .. }, "branch") => *branch = n,
            (Self::DeepCache { warmup, .. }, "warmup") => *warmup = n,
            (Self::TeaCache { threshold, .. }, "threshold") => *threshold = value,
            (Self::TeaCache { warmup, .. }, "warmup") => *warmup = n,
            _ => unreachable!("knob() found it"),
        }
        Ok(())
    }

    fn knob(&self, name: &str, source: &str) -> Result<Knob> {
        let all = self.knobs();
        all.iter().find(|k| k.name == name).copied().ok_or_else(|| {
            Error::Options(format!(
                "{source}: {} has no parameter `{name}`; its parameters are {}",
                self.method(),
                all.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The defaults of `method`.
    fn defaults(method: &str, source: &str) -> Result<Self> {
        let d = |name: &str| {
            KNOBS
                .iter()
                .find(|k| k.method == method && k.name == name)
                .map(|k| k.default)
                .unwrap_or(0.0)
        };
        match method {
            "deepcache" => Ok(Self::DeepCache {
                interval: d("interval") as usize,
                branch: d("branch") as usize,
                warmup: d("warmup") as usize,
            }),
            "teacache" => Ok(Self::TeaCache {
                threshold: d("threshold"),
                warmup: d("warmup") as usize,
            }),
            "" => Err(Error::Options(format!(
                "{source}: no method; expected METHOD[:KEY=VALUE,...] with METHOD {METHODS}"
            ))),
            other => Err(Error::Options(format!(
                "{source}: unknown method `{other}`; expected {METHODS} (e.g. deepcache:interval=3, teacache:threshold=0.1)"
            ))),
        }
    }

    /// Parses `METHOD[:KEY=VALUE,...]`; errors name `source` (the flag, or the file and
    /// key) and say what was expected.
    ///
    /// # Errors
    /// [`Error::Options`]: an unknown method or parameter, a repeated parameter, or a
    /// value that is not a number in the parameter's bounds.
    pub fn parse(s: &str, source: &str) -> Result<Self> {
        let s = s.trim();
        let (method, params) = match s.split_once(':') {
            Some((m, p)) => (m.trim(), Some(p)),
            None => (s, None),
        };
        let source = format!("{source} {s}");
        let mut spec = Self::defaults(method, &source)?;
        let mut seen: Vec<&str> = Vec::new();
        for item in params.into_iter().flat_map(|p| p.split(',')) {
            let item = item.trim();
            let Some((key, value)) = item.split_once('=') else {
                return Err(Error::Options(format!(
                    "{source}: `{item}` is not KEY=VALUE; {method}'s parameters are {}",
                    spec.knobs()
                        .iter()
                        .map(|k| k.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let (key, value) = (key.trim(), value.trim());
            let knob = spec.knob(key, &source)?;
            if seen.contains(&key) {
                return Err(Error::Options(format!("{source}: `{key}` is given twice")));
            }
            seen.push(key);
            let v: f64 = value.parse().map_err(|_| {
                Error::Options(format!(
                    "{source}: {key}={value} is not a number; expected {}",
                    bounds(&knob)
                ))
            })?;
            check_value(&knob, v, &source)?;
            spec.set(key, v)?;
        }
        Ok(spec)
    }

    /// The modules a cached step skips in `model` and how their outputs are replaced.
    ///
    /// # Errors
    /// [`Error::Options`] when the method does not fit the model (saying which does) or
    /// `branch` is beyond the U-Net's down blocks.
    pub fn skip_range(&self, model: &dyn Denoiser) -> Result<SkipRange> {
        let names = model.module_names();
        let index = |name: &str| names.iter().position(|n| n == name);
        let starts = |prefix: &str| names.iter().position(|n| n.starts_with(prefix));
        let is_unet = starts("down_blocks.").is_some() && starts("up_blocks.").is_some();
        let blocks: Vec<usize> = (0..names.len())
            .filter(|&i| names[i].starts_with("transformer_blocks."))
            .collect();
        match *self {
            Self::DeepCache { branch, .. } => {
                if !is_unet {
                    return Err(Error::Options(format!(
                        "--cache {self}: deepcache fits U-Nets (down and up blocks joined by skip connections); this model has none{}",
                        if blocks.is_empty() { String::new() } else { "; use --cache teacache for this MMDiT".into() }
                    )));
                }
                let downs = (0..)
                    .take_while(|i| index(&format!("down_blocks.{i}")).is_some())
                    .count();
                if branch >= downs {
                    return Err(Error::Options(format!(
                        "--cache {self}: branch={branch}, but this U-Net has {downs} down blocks; branch is 0 to {} (0 skips the most)",
                        downs.saturating_sub(1)
                    )));
                }
                let start = index(&format!("down_blocks.{branch}")).expect("counted") + 1;
                let up = downs - 1 - branch;
                let end = starts(&format!("up_blocks.{up}.")).ok_or_else(|| {
                    Error::Options(format!(
                        "--cache {self}: this U-Net has no up_blocks.{up} to rejoin at branch {branch}"
                    ))
                })?;
                if start >= end {
                    return Err(Error::Options(format!(
                        "--cache {self}: branch={branch} leaves no module between down_blocks.{branch} and up_blocks.{up} to cache; use a smaller branch"
                    )));
                }
                Ok(SkipRange {
                    start,
                    end,
                    kind: Substitute::Reuse,
                })
            }
            Self::TeaCache { .. } => match (blocks.first(), blocks.last()) {
                (Some(&start), Some(&last)) => Ok(SkipRange {
                    start,
                    end: last + 1,
                    kind: Substitute::Residual,
                }),
                // A U-Net's blocks are the whole network: a cached step reuses its prediction.
                _ if is_unet => Ok(SkipRange {
                    start: 0,
                    end: names.len(),
                    kind: Substitute::Reuse,
                }),
                _ => Err(Error::Options(format!(
                    "--cache {self}: teacache fits transformers and U-Nets (its indicator is a timestep-modulated input); this model is neither"
                ))),
            },
        }
    }

    /// The same spec for a run of `steps` steps when it was chosen for `tuned_steps` (a model's
    /// recommendation): `warmup` covers the same share of the trajectory (rounded, at least 1
    /// when it was); the other parameters keep their values (teacache's threshold bounds the
    /// indicator's change along the trajectory, whatever the step count).
    pub fn scaled_to(&self, tuned_steps: usize, steps: usize) -> Self {
        let scale = |w: usize| {
            if w == 0 || tuned_steps == 0 {
                return w;
            }
            ((w * steps + tuned_steps / 2) / tuned_steps).max(1)
        };
        match *self {
            Self::DeepCache {
                interval,
                branch,
                warmup,
            } => Self::DeepCache {
                interval,
                branch,
                warmup: scale(warmup),
            },
            Self::TeaCache { threshold, warmup } => Self::TeaCache {
                threshold,
                warmup: scale(warmup),
            },
        }
    }

    /// Refuses a spec that leaves none of `steps` steps to cache (a run of a fixed step
    /// count; a service's requests each have their own, and a short one simply caches
    /// nothing).
    ///
    /// # Errors
    /// [`Error::Options`] naming `--cache`, `warmup` and `--steps`.
    pub fn check_steps(&self, steps: usize) -> Result<()> {
        let warmup = match *self {
            Self::DeepCache { warmup, .. } | Self::TeaCache { warmup, .. } => warmup,
        };
        // teacache always computes the last step; deepcache may cache it.
        let last = match self {
            Self::DeepCache { .. } => steps,
            Self::TeaCache { .. } => steps.saturating_sub(1),
        };
        if warmup.max(1) >= last {
            return Err(Error::Options(format!(
                "--cache {self}: warmup={warmup} leaves none of the {steps} steps to cache (the first step always computes{}); use a smaller warmup or more --steps",
                if matches!(self, Self::TeaCache { .. }) { ", and teacache's last" } else { "" }
            )));
        }
        Ok(())
    }

    /// Bytes one rank's cache holds beyond the run without it, for a forward whose memory
    /// is `fwd` (see [`crate::memory`]): deepcache keeps the skipped modules' outputs (at
    /// most every module output of a forward); teacache the residual and the anchor tokens
    /// of a forward and two indicators (each at most the main activation's size; a U-Net's
    /// prediction is smaller).
    pub fn memory(&self, fwd: &hybridiff_models::memory::ForwardMemory) -> u128 {
        match self {
            Self::DeepCache { .. } => fwd.module_outputs,
            Self::TeaCache { .. } => fwd.hidden.saturating_mul(4),
        }
    }
}

fn knobs_of(method: &str) -> Vec<Knob> {
    KNOBS
        .iter()
        .filter(|k| k.method == method)
        .copied()
        .collect()
}

fn bounds(k: &Knob) -> String {
    let fmt = |v: f64| {
        if k.integer {
            format!("{}", v as u64)
        } else {
            format!("{v}")
        }
    };
    if k.name == "threshold" {
        format!("a number above {} and at most {}", fmt(k.min), fmt(k.max))
    } else if k.integer {
        format!("a whole number from {} to {}", fmt(k.min), fmt(k.max))
    } else {
        format!("a number from {} to {}", fmt(k.min), fmt(k.max))
    }
}

fn check_value(k: &Knob, v: f64, source: &str) -> Result<()> {
    let above_min = if k.name == "threshold" {
        v > k.min
    } else {
        v >= k.min
    };
    let whole = !k.integer || v.fract() == 0.0;
    if !v.is_finite() || !above_min || v > k.max || !whole {
        return Err(Error::Options(format!(
            "{source}: {}={v} is out of range; expected {} ({})",
            k.name,
            bounds(k),
            k.doc
        )));
    }
    Ok(())
}

impl std::fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DeepCache {
                interval,
                branch,
                warmup,
            } => write!(
                f,
                "deepcache:interval={interval},branch={branch},warmup={warmup}"
            ),
            Self::TeaCache { threshold, warmup } => {
                write!(f, "teacache:threshold={threshold},warmup={warmup}")
            }
        }
    }
}

impl std::str::FromStr for CacheSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s, "--cache")
    }
}

impl serde::Serialize for CacheSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CacheSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s, "`cache`").map_err(serde::de::Error::custom)
    }
}

/// How a cached step replaces the outputs of the modules it skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Substitute {
    /// Each skipped module gives its own output of the last computed step (DeepCache's
    /// deep features; the skip stack stays consistent).
    Reuse,
    /// The last skipped module gives the hidden state before the range plus the residual
    /// the range added at the last computed step (TeaCache); the modules before it are not
    /// applied (transformer blocks only replace the hidden and context tokens).
    Residual,
}

/// The modules `start..end` a cached step skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkipRange {
    pub start: usize,
    pub end: usize,
    pub kind: Substitute,
}

impl SkipRange {
    fn contains(&self, m: usize) -> bool {
        (self.start..self.end).contains(&m)
    }

    /// Whether every one of a model's `modules` is reused: the last prediction stands.
    fn whole(&self, modules: usize) -> bool {
        self.kind == Substitute::Reuse && self.start == 0 && self.end == modules
    }
}

/// What one rank's cache did in one step.
#[derive(Debug, Clone, Default)]
pub struct StepRecord {
    /// The step's decision: skip the range where the cache allows.
    pub cached: bool,
    /// Modules whose outputs this rank took from an earlier step instead of computing.
    pub served: Vec<usize>,
    /// Sample-forwards this rank computed (module FLOPs computed over a whole forward's, times
    /// the batch, times the band's share of the rows).
    pub forwards: f64,
    /// Sample-forwards the cache saved this rank.
    pub saved: f64,
    /// `teacache`: the accumulated relative L1 change the decision compared with the
    /// threshold (rank 0).
    pub signal: Option<f64>,
    /// Seconds rank 0 spent on the decision's indicator.
    pub probe_seconds: f64,
}

/// One path's memory of its last forward: the skipped range's outputs or residual.
#[derive(Default)]
struct Memo {
    /// The step of the last forward on this path (computed or cached).
    touched: Option<usize>,
    /// The sample's shape then.
    key: Vec<usize>,
    /// `Reuse`: outputs of the range's modules, in order.
    outputs: Vec<Vec<Tensor>>,
    /// `Residual`: hidden after the range minus hidden before it.
    residual: Option<Tensor>,
    /// `Reuse` of every module: the prediction (nothing else is needed).
    prediction: Option<Tensor>,
}

impl Memo {
    fn usable(&self, step: usize, key: &[usize], range: &SkipRange, whole: bool) -> bool {
        step > 0
            && self.touched == Some(step - 1)
            && self.key == key
            && match range.kind {
                _ if whole => self.prediction.is_some(),
                Substitute::Reuse => self.outputs.len() == range.end - range.start,
                Substitute::Residual => self.residual.is_some(),
            }
    }

    fn forget_before(&mut self, step: usize) {
        if self.touched.is_some_and(|t| t + 1 < step) {
            *self = Memo::default();
        }
    }
}

/// The staged runner's module-by-module path: outputs per module with the step that last
/// touched them, and the residual's anchor of the forward in progress.
#[derive(Default)]
struct StagedMemo {
    outputs: std::collections::HashMap<usize, (usize, Vec<Tensor>)>,
    residual: Option<(usize, Tensor)>,
    anchor: Option<Tensor>,
    batch: usize,
}

#[derive(Default)]
struct Plan {
    step: usize,
    cached: bool,
    /// teacache on rank 0: the last indicator and the accumulated change.
    previous: Option<Tensor>,
    accumulated: f64,
}

#[derive(Default)]
struct Account {
    served: std::collections::BTreeSet<usize>,
    forwards: f64,
    saved: f64,
}

/// One rank's step cache: a [`Denoiser`] that forwards to the job's model and, on cached
/// steps, replaces the skipped modules' outputs (see the module docs). Without a
/// [`CacheSpec`] it only counts forwards and changes nothing.
pub struct StepCache<'a> {
    inner: &'a dyn Denoiser,
    spec: Option<CacheSpec>,
    range: Option<SkipRange>,
    /// Each module's share of a whole forward's FLOPs at the job's latent size.
    share: Vec<f64>,
    plan: Mutex<Plan>,
    /// Whole forwards: one memo per half of a batch run as two halves.
    plain: [Mutex<Memo>; 2],
    patch: Mutex<Memo>,
    staged: Mutex<StagedMemo>,
    account: Mutex<Account>,
    /// Sample-forwards (computed and saved) of this rank's last computed step: what a step
    /// skipped whole saves.
    last_forwards: Mutex<f64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic on another thread of this rank already fails the job; the data stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'a> StepCache<'a> {
    /// The cache of one rank over `inner` for latents of `hw`.
    ///
    /// # Errors
    /// The spec does not fit the model ([`CacheSpec::skip_range`]).
    pub fn new(
        inner: &'a dyn Denoiser,
        spec: Option<CacheSpec>,
        hw: (usize, usize),
    ) -> Result<Self> {
        let range = spec.map(|s| s.skip_range(inner)).transpose()?;
        let flops = inner.module_flops(hw.0, hw.1);
        let total: f64 = flops.iter().sum();
        let share = flops
            .iter()
            .map(|f| if total > 0.0 { f / total } else { 0.0 })
            .collect();
        Ok(Self {
            inner,
            spec,
            range,
            share,
            plan: Mutex::new(Plan::default()),
            plain: [Mutex::new(Memo::default()), Mutex::new(Memo::default())],
            patch: Mutex::new(Memo::default()),
            staged: Mutex::new(StagedMemo::default()),
            account: Mutex::new(Account::default()),
            last_forwards: Mutex::new(0.0),
        })
    }

    /// Decides step `i` (of `steps`) for `x` at timestep `t`, the same on every rank: see
    /// the module docs. Call on every rank before the step's forwards. `hold` (the same on
    /// every rank: [`crate::strategy::Worker::detecting`]) makes the step compute, as a
    /// warm-up step does.
    ///
    /// # Errors
    /// The indicator's forward or the broadcast failed.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_step(
        &self,
        i: usize,
        steps: usize,
        comm: &mut dyn Communicator,
        job: &Job,
        x: &Tensor,
        t: f64,
        hold: bool,
    ) -> Result<StepRecord> {
        let mut record = StepRecord::default();
        let mut plan = lock(&self.plan);
        plan.step = i;
        plan.cached = match self.spec {
            None => false,
            Some(CacheSpec::DeepCache {
                interval, warmup, ..
            }) => !hold && i >= warmup.max(1) && !(i - warmup).is_multiple_of(interval),
            Some(CacheSpec::TeaCache { threshold, warmup }) => {
                let mine = if comm.rank() == 0 {
                    let start = std::time::Instant::now();
                    let probe = self
                        .inner
                        .modulated_input(x, t, &job.inputs.cond)?
                        .ok_or_else(|| {
                            Error::Options(
                                "--cache teacache: this model has no modulated input".into(),
                            )
                        })?;
                    let change = match &plan.previous {
                        Some(prev) => {
                            let num = hybridiff_models::nn::mean_abs(&(&probe - prev)?)?;
                            let den = hybridiff_models::nn::mean_abs(prev)?;
                            num / (den + 1e-12)
                        }
                        None => 0.0,
                    };
                    plan.previous = Some(probe);
                    let cache = if hold || i < warmup.max(1) || i + 1 == steps {
                        false
                    } else {
                        plan.accumulated += change;
                        plan.accumulated < threshold
                    };
                    record.signal = Some(plan.accumulated);
                    if !cache {
                        plan.accumulated = 0.0;
                    }
                    record.probe_seconds = start.elapsed().as_secs_f64();
                    Some(cache)
                } else {
                    None
                };
                if comm.world_size() > 1 {
                    let flag = mine.map(|c| Tensor::new(&[u8::from(c)], &candle_core::Device::Cpu));
                    let flag = flag.transpose()?;
                    let got = comm.broadcast(flag.as_ref(), 0)?;
                    got.to_vec1::<u8>()?.first().copied().unwrap_or(0) != 0
                } else {
                    mine.unwrap_or(false)
                }
            }
        };
        record.cached = plan.cached;
        drop(plan);
        for m in &self.plain {
            lock(m).forget_before(i);
        }
        lock(&self.patch).forget_before(i);
        let mut staged = lock(&self.staged);
        staged.outputs.retain(|_, (touched, _)| *touched + 1 >= i);
        if staged.residual.as_ref().is_some_and(|(t, _)| t + 1 < i) {
            staged.residual = None;
        }
        *lock(&self.account) = Account::default();
        Ok(record)
    }

    /// What this rank's forwards did in the step just run.
    pub fn end_step(&self, mut record: StepRecord) -> StepRecord {
        let a = std::mem::take(&mut *lock(&self.account));
        record.served = a.served.into_iter().collect();
        record.forwards = a.forwards;
        record.saved = a.saved;
        if a.forwards > 0.0 {
            *lock(&self.last_forwards) = a.forwards + a.saved;
        }
        record
    }

    /// Whether a cached step skips the whole network (`teacache` on a U-Net: the
    /// prediction is reused). `run_rank` then skips the step before any layout runs it,
    /// and the sampler takes its last prediction again ([`crate::Sampler::last_prediction`]):
    /// the same as reusing each path's last output where the last step was exact, and no
    /// compute where it had none (a fill step, the first exact step after pipelining).
    pub fn skips_whole_steps(&self) -> bool {
        let modules = self.inner.module_names().len();
        self.range.is_some_and(|r| r.whole(modules))
    }

    /// The record of a step skipped whole: every module served from the last step, nothing
    /// computed, and saved what this rank computed in its last computed step.
    pub fn skip_step(&self, record: StepRecord) -> StepRecord {
        let mut record = self.end_step(record);
        record.served = (0..self.inner.module_names().len()).collect();
        record.saved = *lock(&self.last_forwards);
        record
    }

    fn step_plan(&self) -> (usize, bool) {
        let p = lock(&self.plan);
        (p.step, p.cached)
    }

    fn count(&self, forwards: f64, saved: f64, served: &[usize]) {
        let mut a = lock(&self.account);
        a.forwards += forwards;
        a.saved += saved;
        a.served.extend(served.iter().copied());
    }

    /// `begin`, every module (computed, or replaced on a cached step), `end`, with `memo`
    /// the path's memory; `weight` scales the counted forwards (a band's share of the rows).
    fn cached_forward(
        &self,
        memo: &Mutex<Memo>,
        range: SkipRange,
        sample: &Tensor,
        begin: &dyn Fn() -> hybridiff_models::Result<State>,
        weight: f64,
        run: &dyn Fn(usize, &State) -> hybridiff_models::Result<Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (step, cached) = self.step_plan();
        let mut memo = lock(memo);
        let key = sample.dims().to_vec();
        let n = self.inner.module_names().len();
        let whole = range.whole(n);
        let reuse = cached && memo.usable(step, &key, &range, whole);
        let batch = sample.dim(0)? as f64;
        if whole && reuse {
            // Every module skipped: the last computed prediction, nothing else.
            memo.touched = Some(step);
            let y = memo.prediction.clone().expect("usable");
            drop(memo);
            let served: Vec<usize> = (0..n).collect();
            self.count(0.0, batch * weight, &served);
            return Ok(y);
        }
        let mut state = begin()?;
        let mut anchor = None;
        let mut outputs = Vec::new();
        let mut residual = None;
        let (mut computed, mut saved) = (0.0, 0.0);
        for m in 0..n {
            if m == range.start {
                anchor = Some(state.hidden.clone());
            }
            if reuse && range.contains(m) {
                saved += self.share[m];
                match range.kind {
                    Substitute::Reuse => {
                        let out = memo.outputs[m - range.start].clone();
                        self.inner.apply_module(m, &mut state, out)?;
                    }
                    Substitute::Residual if m + 1 == range.end => {
                        let anchor = anchor.as_ref().expect("set at the range's start");
                        let r = memo.residual.as_ref().expect("usable");
                        let out = self.residual_output(m, &state, (anchor + r)?);
                        self.inner.apply_module(m, &mut state, out)?;
                    }
                    Substitute::Residual => {}
                }
                continue;
            }
            let out = run(m, &state)?;
            computed += self.share[m];
            if range.contains(m) && !whole {
                match range.kind {
                    Substitute::Reuse => outputs.push(out.clone()),
                    Substitute::Residual if m + 1 == range.end => {
                        let last = out.last().expect("a module outputs a tensor");
                        let anchor = anchor.as_ref().expect("set at the range's start");
                        residual = Some((last - anchor)?);
                    }
                    Substitute::Residual => {}
                }
            }
            self.inner.apply_module(m, &mut state, out)?;
        }
        let y = self.inner.end(state)?;
        memo.touched = Some(step);
        memo.key = key;
        if !reuse {
            memo.outputs = outputs;
            memo.residual = residual;
            memo.prediction = whole.then(|| y.clone());
        }
        drop(memo);
        let served: Vec<usize> = if reuse {
            (range.start..range.end).collect()
        } else {
            Vec::new()
        };
        self.count(batch * weight * computed, batch * weight * saved, &served);
        Ok(y)
    }

    /// The last skipped module's outputs on a `Residual` step: the new hidden state last,
    /// any other output the current context (unchanged by the skipped blocks).
    fn residual_output(&self, m: usize, state: &State, hidden: Tensor) -> Vec<Tensor> {
        let count = self.inner.module_output_count(m).max(1);
        let mut out = vec![state.context.clone(); count - 1];
        out.push(hidden);
        out
    }

    fn forward_slot(
        &self,
        slot: usize,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        let range = self.range.expect("only with a spec");
        self.cached_forward(
            &self.plain[slot],
            range,
            sample,
            &|| self.inner.begin(sample, timestep, cond),
            1.0,
            &|m, s| self.inner.run_module(m, s),
        )
    }
}

fn model_err(e: Error) -> hybridiff_models::Error {
    match e {
        Error::Model(e) => e,
        other => hybridiff_models::Error::Input(other.to_string()),
    }
}

impl Denoiser for StepCache<'_> {
    fn module_names(&self) -> &[String] {
        self.inner.module_names()
    }
    fn module_flops(&self, h: usize, w: usize) -> Vec<f64> {
        self.inner.module_flops(h, w)
    }
    fn module_output_count(&self, idx: usize) -> usize {
        self.inner.module_output_count(idx)
    }
    fn module_reads(&self, idx: usize) -> Vec<OutputRef> {
        self.inner.module_reads(idx)
    }
    fn forward_memory(
        &self,
        batch: usize,
        hw: (usize, usize),
        ctx_len: usize,
    ) -> Option<hybridiff_models::memory::ForwardMemory> {
        self.inner.forward_memory(batch, hw, ctx_len)
    }
    fn patch_alignment(&self) -> Option<(usize, usize)> {
        self.inner.patch_alignment()
    }
    fn modulated_input(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<Option<Tensor>> {
        self.inner.modulated_input(sample, timestep, cond)
    }

    /// The staged runner's path: a forward module by module.
    fn begin(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<State> {
        let state = self.inner.begin(sample, timestep, cond)?;
        let mut st = lock(&self.staged);
        st.batch = sample.dim(0)?;
        st.anchor = match self.range {
            Some(r) if r.kind == Substitute::Residual && r.start == 0 => Some(state.hidden.clone()),
            _ => None,
        };
        Ok(state)
    }

    fn run_module(&self, idx: usize, state: &State) -> hybridiff_models::Result<Vec<Tensor>> {
        let Some(range) = self.range.filter(|r| r.contains(idx)) else {
            let out = self.inner.run_module(idx, state)?;
            let batch = lock(&self.staged).batch.max(1) as f64;
            self.count(batch * self.share[idx], 0.0, &[]);
            return Ok(out);
        };
        let (step, cached) = self.step_plan();
        let mut st = lock(&self.staged);
        let batch = st.batch.max(1) as f64;
        let fresh = |t: usize| step > 0 && t + 1 == step;
        if cached {
            let served = if range.kind == Substitute::Residual && idx + 1 == range.end {
                let hidden = match (&st.residual, &st.anchor) {
                    (Some((t, r)), Some(a)) if fresh(*t) => Some((a + r)?),
                    _ => None,
                };
                match hidden {
                    Some(hidden) => {
                        if let Some((t, _)) = st.residual.as_mut() {
                            *t = step;
                        }
                        Some(self.residual_output(idx, state, hidden))
                    }
                    None => None,
                }
            } else {
                match st.outputs.get_mut(&idx) {
                    Some((t, out)) if fresh(*t) => {
                        *t = step;
                        Some(out.clone())
                    }
                    _ => None,
                }
            };
            if let Some(out) = served {
                drop(st);
                self.count(0.0, batch * self.share[idx], &[idx]);
                return Ok(out);
            }
        }
        drop(st);
        let out = self.inner.run_module(idx, state)?;
        let mut st = lock(&self.staged);
        if range.kind == Substitute::Residual && idx + 1 == range.end {
            if let (Some(last), Some(anchor)) = (out.last(), st.anchor.as_ref()) {
                let r = (last - anchor)?;
                st.residual = Some((step, r));
            }
        }
        st.outputs.insert(idx, (step, out.clone()));
        drop(st);
        self.count(batch * self.share[idx], 0.0, &[]);
        Ok(out)
    }

    fn apply_module(
        &self,
        idx: usize,
        state: &mut State,
        output: Vec<Tensor>,
    ) -> hybridiff_models::Result<()> {
        self.inner.apply_module(idx, state, output)?;
        if let Some(r) = self.range {
            if r.kind == Substitute::Residual && idx + 1 == r.start {
                lock(&self.staged).anchor = Some(state.hidden.clone());
            }
        }
        Ok(())
    }

    fn end(&self, state: State) -> hybridiff_models::Result<Tensor> {
        self.inner.end(state)
    }

    /// Whole forwards (serial, cfg, hybrid's exact steps). A batch of two or more runs as
    /// two halves side by side, as [`Denoiser::forward`]'s default does, each half with its
    /// own memory, so a cached run's computed steps equal the uncached run's bit for bit.
    fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<Tensor> {
        let b = sample.dim(0)?;
        if self.range.is_none() {
            let y = self.inner.forward(sample, timestep, cond)?;
            self.count(b as f64, 0.0, &[]);
            return Ok(y);
        }
        if b >= 2
            && sample.device().is_cpu()
            && rayon::current_num_threads() >= 2
            && cond.batch_is(b)
        {
            let h = b / 2;
            let (x0, x1) = (sample.narrow(0, 0, h)?, sample.narrow(0, h, b - h)?);
            let (c0, c1) = (cond.narrow(0, h)?, cond.narrow(h, b - h)?);
            let (e0, e1) = rayon::join(
                || self.forward_slot(0, &x0, timestep, &c0),
                || self.forward_slot(1, &x1, timestep, &c1),
            );
            return Ok(Tensor::cat(
                &[e0.map_err(model_err)?, e1.map_err(model_err)?],
                0,
            )?);
        }
        self.forward_slot(0, sample, timestep, cond)
            .map_err(model_err)
    }

    fn band_dim(&self, idx: usize, index: usize) -> Option<usize> {
        self.inner.band_dim(idx, index)
    }

    fn begin_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        band: Band,
    ) -> hybridiff_models::Result<State> {
        self.inner.begin_patch(sample, timestep, cond, band)
    }

    fn run_module_patch(
        &self,
        idx: usize,
        state: &State,
        patch: &hybridiff_models::patch::Patch,
    ) -> hybridiff_models::Result<Vec<Tensor>> {
        self.inner.run_module_patch(idx, state, patch)
    }

    /// Band forwards (patch). Skipped modules make no band exchanges; every band skips the
    /// same ones, and the engine's exchange drains what peers sent for them a step earlier.
    fn forward_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        ctx: &dyn PatchContext,
    ) -> hybridiff_models::Result<Tensor> {
        let band = ctx.band();
        let weight = band.rows as f64 / band.full_rows.max(1) as f64;
        // A step a stage pipeline starts from needs every module's output: computed whole.
        let range = self.range.filter(|_| !ctx.keeps_outputs());
        let Some(range) = range else {
            let y = self.inner.forward_patch(sample, timestep, cond, ctx)?;
            self.count(sample.dim(0)? as f64 * weight, 0.0, &[]);
            return Ok(y);
        };
        let p = hybridiff_models::patch::Patch::new(ctx);
        self.cached_forward(
            &self.patch,
            range,
            sample,
            &|| self.inner.begin_patch(sample, timestep, cond, band),
            weight,
            &|m, s| {
                p.enter_module(m)?;
                self.inner.run_module_patch(m, s, &p)
            },
        )
        .map_err(model_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_print_and_round_trip() {
        let d: CacheSpec = "deepcache".parse().unwrap();
        assert_eq!(
            d,
            CacheSpec::DeepCache {
                interval: 3,
                branch: 0,
                warmup: 1
            }
        );
        let s: CacheSpec = "deepcache:interval=5, branch=1".parse().unwrap();
        assert_eq!(s.to_string(), "deepcache:interval=5,branch=1,warmup=1");
        assert_eq!(s.to_string().parse::<CacheSpec>().unwrap(), s);
        let t: CacheSpec = "teacache:threshold=0.25,warmup=3".parse().unwrap();
        assert_eq!(t.to_string(), "teacache:threshold=0.25,warmup=3");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"teacache:threshold=0.25,warmup=3\"");
        assert_eq!(serde_json::from_str::<CacheSpec>(&json).unwrap(), t);
        assert_eq!(t.get("threshold"), Some(0.25));
        assert_eq!(
            t.scaled_to(20, 50).to_string(),
            "teacache:threshold=0.25,warmup=8"
        );
        assert_eq!(t.scaled_to(20, 4).get("warmup"), Some(1.0));
        let mut t2 = t;
        t2.set("threshold", 0.5).unwrap();
        assert_eq!(t2.get("threshold"), Some(0.5));
        assert_eq!(t.knobs()[0].name, "threshold", "the speed knob first");
        assert_eq!(d.knobs()[0].name, "interval", "the speed knob first");
    }

    #[test]
    fn bad_specs_name_the_flag_and_what_was_expected() {
        let cases = [
            ("fastcache", "unknown method `fastcache`"),
            ("", "no method"),
            ("deepcache:speed=2", "no parameter `speed`"),
            ("deepcache:interval", "is not KEY=VALUE"),
            ("deepcache:interval=1", "interval=1 is out of range"),
            ("deepcache:interval=2.5", "whole number"),
            ("deepcache:interval=abc", "not a number"),
            ("deepcache:interval=3,interval=4", "given twice"),
            ("deepcache:warmup=-1", "out of range"),
            ("teacache:threshold=0", "threshold=0 is out of range"),
            ("teacache:threshold=-0.1", "out of range"),
            ("teacache:threshold=nan", "out of range"),
            ("teacache:threshold=inf", "out of range"),
            ("teacache:threshold=11", "out of range"),
            ("teacache:interval=3", "no parameter `interval`"),
        ];
        for (spec, want) in cases {
            let e = spec.parse::<CacheSpec>().unwrap_err().to_string();
            assert!(e.starts_with("--cache"), "{spec}: {e}");
            assert!(e.contains(want), "{spec}: {e}");
        }
        let e = serde_json::from_str::<CacheSpec>("\"deepcache:interval=0\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`cache`") && e.contains("interval=0"), "{e}");
        let mut d: CacheSpec = "deepcache".parse().unwrap();
        assert!(d.set("interval", 1.0).is_err());
        assert!(d.set("threshold", 0.1).is_err());
    }
}
