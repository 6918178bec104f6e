//! Parallel strategies: how the ranks of a job share the work of each denoising step.
//! One file each. Every rank runs the same sampling loop ([`run_rank`]); a strategy's
//! per-rank [`Worker`] supplies each step's prediction, identical on every rank.
//!
//! Strategies compose three mechanisms rather than copying each other: the condition split
//! and bands of [`layout::BandLayout`] run by [`patch::BandStep`] (`cfg`, `patch`, `hybrid`'s
//! exact steps), and stages run by [`crate::stages::StagedRunner`] (`async`, `hybrid`'s
//! pipelined steps). `run_rank` counts every rank's FLOPs where the denoiser is called
//! ([`crate::work::Counted`]).

pub mod asyncdiff;
pub mod cfg;
pub mod hybrid;
pub mod layout;
pub mod patch;
pub mod serial;

use std::str::FromStr;
use std::time::Instant;

use candle_core::Tensor;
use hybridiff_comm::Communicator;

use crate::stages::{PlanCache, PlanKind};
use crate::switch::SwitchParams;
use crate::trace::StepMode;
use crate::{Error, Job, Result, Sampler};

/// The strategies `--strategy` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    /// One rank, the CFG batch of 2.
    Serial,
    /// Condition-based partitioning: uncond and cond branches on different ranks.
    Cfg,
    /// AsyncDiff: stages over the CFG batch on one-step-stale inputs.
    Async,
    /// Hybridiff: condition split, switching to stages where the branches agree.
    Hybrid,
    /// DistriFusion: the CFG split, then one horizontal band of the latents per rank.
    Patch,
}

impl StrategyKind {
    /// Every strategy, in the order benchmarks list them.
    pub const ALL: [StrategyKind; 5] = [
        Self::Serial,
        Self::Cfg,
        Self::Async,
        Self::Hybrid,
        Self::Patch,
    ];
}

impl FromStr for StrategyKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "serial" => Ok(Self::Serial),
            "cfg" => Ok(Self::Cfg),
            "async" => Ok(Self::Async),
            "hybrid" => Ok(Self::Hybrid),
            "patch" => Ok(Self::Patch),
            other => Err(Error::Options(format!(
                "--strategy: unknown strategy `{other}`; expected serial, cfg, async, hybrid or patch"
            ))),
        }
    }
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Serial => "serial",
            Self::Cfg => "cfg",
            Self::Async => "async",
            Self::Hybrid => "hybrid",
            Self::Patch => "patch",
        })
    }
}

/// What the model's prediction is in pipelined Hybridiff steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PipelinedGuidance {
    /// The reference: the last stage's output, unguided.
    None,
    /// The last stage's output plus the last exact step's `w (eps_c - eps_u)`.
    Reuse,
}

impl FromStr for PipelinedGuidance {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "reuse" => Ok(Self::Reuse),
            other => Err(Error::Options(format!(
                "--pipelined-guidance: unknown mode `{other}`; expected none or reuse"
            ))),
        }
    }
}

impl std::fmt::Display for PipelinedGuidance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Reuse => "reuse",
        })
    }
}

/// The knobs of every strategy (each reads its own).
#[derive(Debug, Clone)]
pub struct StrategyOptions {
    /// `async`: exact steps before pipelining; `patch`, `hybrid` (displaced bands): sync
    /// steps first.
    pub warmup: usize,
    /// `async`: AsyncDiff's stride, 1 or 2 (world size `n + stride - 1`).
    pub stride: usize,
    /// `hybrid`: the switching parameters.
    pub switch: SwitchParams,
    /// `async`, `hybrid`: how stages are planned.
    pub stages: PlanKind,
    /// `hybrid`: the prediction of pipelined steps.
    pub pipelined_guidance: PipelinedGuidance,
    /// `patch`, `hybrid`'s exact steps, `cfg` (sync only): fresh (`sync`) or previous-step
    /// (`displaced`) activations of other bands; `None` for the strategy's default
    /// (`patch`: displaced; `cfg`, `hybrid`: sync).
    pub patch_mode: Option<patch::PatchMode>,
    /// `hybrid`: the pipelined steps' layout; `None` for the default at the run's `W`.
    pub pipeline_layout: Option<hybrid::PipelineLayout>,
    /// `patch`: split the CFG branches across two rank groups before the bands.
    pub cfg_split: bool,
    /// Every strategy: step caching (`--cache`), none by default.
    pub cache: Option<crate::cache::CacheSpec>,
}

impl Default for StrategyOptions {
    fn default() -> Self {
        Self {
            warmup: 1,
            stride: 1,
            switch: SwitchParams::SDXL,
            stages: PlanKind::Default,
            pipelined_guidance: PipelinedGuidance::None,
            patch_mode: None,
            pipeline_layout: None,
            cfg_split: true,
            cache: None,
        }
    }
}

impl StrategyKind {
    /// The strategy's implementation with its options (with a step cache when
    /// `opts.cache` says so).
    pub fn build(self, opts: &StrategyOptions) -> Box<dyn Strategy> {
        let inner = self.build_uncached(opts);
        match opts.cache {
            Some(spec) => Box::new(Cached {
                inner,
                spec,
                async_stride: (self == Self::Async).then_some(opts.stride),
            }),
            None => inner,
        }
    }

    fn build_uncached(self, opts: &StrategyOptions) -> Box<dyn Strategy> {
        match self {
            Self::Serial => Box::new(serial::Serial),
            Self::Cfg => Box::new(cfg::CfgSplit {
                patch_mode: opts.patch_mode,
            }),
            Self::Async => Box::new(asyncdiff::AsyncDiff {
                warmup: opts.warmup,
                stride: opts.stride,
                stages: PlanCache::new(opts.stages),
            }),
            Self::Hybrid => Box::new(hybrid::Hybrid {
                switch: opts.switch,
                stages: PlanCache::new(opts.stages),
                guidance: opts.pipelined_guidance,
                patch_mode: opts.patch_mode.unwrap_or(patch::PatchMode::Sync),
                warmup: opts.warmup,
                layout: opts.pipeline_layout,
            }),
            Self::Patch => Box::new(patch::PatchParallel {
                mode: opts.patch_mode.unwrap_or(patch::PatchMode::Displaced),
                warmup: opts.warmup,
                cfg_split: opts.cfg_split,
            }),
        }
    }
}

/// A step's prediction. Guidance is never applied here: the sampler does it
/// ([`Sampler::step_guided`], [`Sampler::step_reused`]).
pub enum Prediction {
    /// Both branches; the sampler applies guidance (and its rescale).
    Branches(Tensor, Tensor),
    /// One prediction used as is (without CFG; pipelined Hybridiff steps under
    /// `--pipelined-guidance none`).
    Guided(Tensor),
    /// A pipelined Hybridiff step under `--pipelined-guidance reuse`: the prediction and
    /// the last exact step's branch difference `eps_c - eps_u`; the sampler adds
    /// `w * diff` (and rescales).
    Reused { pred: Tensor, diff: Tensor },
}

/// What a worker returns for one step.
pub struct StepOutput {
    pub mode: StepMode,
    pub prediction: Prediction,
    /// The branches' rel-MAE (0 where one prediction stands for both).
    pub rel_mae: f64,
    /// The switching slope, when one was computed this step.
    pub slope: Option<f64>,
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
    /// Seconds of denoiser compute on this rank.
    pub compute_seconds: f64,
    /// Bytes the reference implementation would have sent beyond ours this step (it sends
    /// every cached module output to every rank); reported by rank 0 only.
    pub reference_extra_bytes: u64,
    /// Bytes and messages this rank sent this step that the schedule lets overlap with
    /// compute (stage outputs sent one step ahead, displaced patch activations); the rest of
    /// what it sent is on the step's critical path. See [`crate::latency`].
    pub overlapped: Sent,
    /// When the step's ranks computed one after another (a sequential fill or warm-up): in
    /// how many independent chains (the ranks split into that many equal consecutive groups,
    /// each a chain); 0 when the ranks computed side by side. See [`crate::latency`].
    pub chain_groups: usize,
}

/// Bytes and messages sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub bytes: u64,
    pub messages: u64,
}

impl Sent {
    /// What `comm` has sent so far.
    pub fn so_far(comm: &dyn Communicator) -> Self {
        Self {
            bytes: comm.bytes_sent(),
            messages: comm.messages_sent(),
        }
    }

    /// What was sent since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            bytes: self.bytes - earlier.bytes,
            messages: self.messages - earlier.messages,
        }
    }
}

impl StepOutput {
    /// An exact step without classifier-free guidance: the conditional prediction alone.
    pub fn conditional(eps: Tensor, compute_seconds: f64) -> Self {
        Self {
            mode: StepMode::Exact,
            prediction: Prediction::Guided(eps),
            rel_mae: 0.0,
            slope: None,
            tau1: None,
            tau2: None,
            compute_seconds,
            reference_extra_bytes: 0,
            overlapped: Sent::default(),
            chain_groups: 0,
        }
    }

    /// An exact step with both branches.
    pub fn exact(eps_u: Tensor, eps_c: Tensor, compute_seconds: f64) -> Result<Self> {
        let rel_mae = crate::sampler::rel_mae(&eps_u, &eps_c)?;
        Ok(Self {
            mode: StepMode::Exact,
            prediction: Prediction::Branches(eps_u, eps_c),
            rel_mae,
            slope: None,
            tau1: None,
            tau2: None,
            compute_seconds,
            reference_extra_bytes: 0,
            overlapped: Sent::default(),
            chain_groups: 0,
        })
    }
}

/// One rank's stateful part of a strategy.
pub trait Worker {
    /// Produces step `i`'s prediction for denoiser input `x` at timestep `t`.
    fn step(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput>;

    /// Whether the step about to run feeds a detector that needs computed predictions:
    /// Hybridiff's exact steps until `tau1` is decided. The step cache holds off for them,
    /// since a cached step's predictions repeat the previous step's and would read as a
    /// flat rel-MAE curve (an early `tau1`); so a run's `tau1` and `tau2` are those of the
    /// run without a cache, and `tune` can predict them from serial's curve.
    fn detecting(&self) -> bool {
        false
    }

    /// Step `i` is cached by a whole-prediction step cache: skip it whole, keeping the
    /// worker's own schedule in step, and say what the step was; or `None` (the same on
    /// every rank) to run it, its modules then reused one by one. The default suits
    /// workers whose steps are all alike.
    fn skip(&mut self, _i: usize) -> Option<Skipped> {
        Some(Skipped {
            mode: StepMode::Exact,
            tau1: None,
            tau2: None,
        })
    }
}

/// What a worker reports for a step it did not compute ([`Worker::skip`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// The mode the step had in the worker's schedule.
    pub mode: StepMode,
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
}

/// A way of sharing each step's work among ranks.
pub trait Strategy: Sync {
    /// The name used on the command line and in traces.
    fn name(&self) -> &'static str;
    /// Rejects world sizes and options that cannot work, before any compute.
    fn check(&self, job: &Job, world_size: usize) -> Result<()>;
    /// The worker of one rank.
    fn worker<'a>(
        &'a self,
        job: &'a Job<'a>,
        rank: usize,
        world_size: usize,
    ) -> Result<Box<dyn Worker + 'a>>;
    /// What the strategy does when classifier-free guidance is off (`guidance <= 1`),
    /// for the trace and the user.
    fn without_cfg(&self) -> &'static str {
        "guidance <= 1 turns classifier-free guidance off (as in diffusers): one conditional forward per step"
    }
    /// The layout in a few words for tables (e.g. `patch`'s mode and band count); empty
    /// when the name says it all.
    fn describe(&self, _job: &Job, _world_size: usize) -> String {
        String::new()
    }
    /// A description of the stage plan, if the strategy uses one.
    fn plan_summary(&self, _job: &Job, _world_size: usize) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }
    /// The step cache every rank applies to its forwards (see [`crate::cache`]).
    fn cache(&self) -> Option<&crate::cache::CacheSpec> {
        None
    }
}

/// A strategy with step caching: the same layout and worker, every forward of every rank
/// going through that rank's [`crate::cache::StepCache`] (set up by [`run_rank`]).
pub struct Cached {
    pub inner: Box<dyn Strategy>,
    pub spec: crate::cache::CacheSpec,
    /// `async`'s stride, when the inner strategy is `async`.
    pub async_stride: Option<usize>,
}

impl Strategy for Cached {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn check(&self, job: &Job, world_size: usize) -> Result<()> {
        self.inner.check(job, world_size)?;
        // At stride 2 each rank computes its stage once per two steps, at the next step's
        // timestep: no stage has its own output of the previous step to reuse, so deepcache
        // would only mark steps cached while computing them all.
        if self.async_stride == Some(2)
            && matches!(self.spec, crate::cache::CacheSpec::DeepCache { .. })
        {
            return Err(Error::Options(format!(
                "--cache {}: deepcache reuses a stage's output of the previous step, which async --stride 2 never computes (each stage runs once per two steps); use --stride 1, or --cache teacache",
                self.spec
            )));
        }
        self.spec.skip_range(job.model).map(|_| ())
    }
    fn worker<'a>(
        &'a self,
        job: &'a Job<'a>,
        rank: usize,
        world_size: usize,
    ) -> Result<Box<dyn Worker + 'a>> {
        self.inner.worker(job, rank, world_size)
    }
    fn without_cfg(&self) -> &'static str {
        self.inner.without_cfg()
    }
    fn describe(&self, job: &Job, world_size: usize) -> String {
        let inner = self.inner.describe(job, world_size);
        if inner.is_empty() {
            self.spec.to_string()
        } else {
            format!("{inner} + {}", self.spec)
        }
    }
    fn plan_summary(&self, job: &Job, world_size: usize) -> Result<Option<serde_json::Value>> {
        self.inner.plan_summary(job, world_size)
    }
    fn cache(&self) -> Option<&crate::cache::CacheSpec> {
        Some(&self.spec)
    }
}

/// One exact step without classifier-free guidance: rank 0 runs the conditional branch
/// at batch 1 and hands the prediction to any other ranks (`serial`'s step when
/// `guidance <= 1`; the multi-rank strategies split that branch into bands instead).
pub fn conditional_step(
    job: &Job,
    comm: &mut dyn Communicator,
    x: &Tensor,
    t: f64,
) -> Result<StepOutput> {
    let (eps, secs) = if comm.rank() == 0 {
        let start = Instant::now();
        let eps = job.model.forward(x, t, &job.inputs.cond)?;
        // A GPU runs queued kernels after the call returns: wait for them before the clock.
        eps.device().synchronize()?;
        (Some(eps), start.elapsed().as_secs_f64())
    } else {
        (None, 0.0)
    };
    let eps = if comm.world_size() > 1 {
        comm.broadcast(eps.as_ref(), 0)?
    } else {
        eps.expect("rank 0 computed it")
    };
    Ok(StepOutput::conditional(eps, secs))
}

/// Fails the job when step `i` left non-finite latents (checked with one reduction per
/// step), naming the step, the strategy and the likely causes, so that NaN never becomes
/// a silent black image.
fn check_latents(
    latents: &Tensor,
    i: usize,
    job: &Job,
    strategy: &str,
    out: &StepOutput,
) -> Result<()> {
    let sum = latents
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(());
    }
    let mode = match out.mode {
        StepMode::Exact => "exact",
        StepMode::Fill => "fill",
        StepMode::Pipelined => "pipelined",
    };
    // What the user can change first; the weights are finite (checked when loaded) and the
    // schedule runs a stand-in model without NaN (checked before compute), so neither alone
    // is the cause.
    let sampler = format!(
        "the {} sampler at --steps {} with this model's predictions (try another --scheduler or fewer --steps)",
        job.scheduler, job.steps
    );
    let mut causes = vec![
        "activations beyond the float range inside the denoiser (weights or inputs far from what it was trained on)",
        sampler.as_str(),
    ];
    let pred_dtype = match &out.prediction {
        Prediction::Branches(u, _) => u.dtype(),
        Prediction::Guided(eps) | Prediction::Reused { pred: eps, .. } => eps.dtype(),
    };
    // f16 tops out at 65504: a model whose activations exceed it overflows to inf, then
    // NaN, where f32 and bf16 (float32's exponent range) do not.
    match pred_dtype {
        candle_core::DType::F16 => causes.insert(
            0,
            "overflow in half precision: --dtype f16 holds values up to 65504 only; run with --dtype f32, or --dtype bf16 (float32's range; CUDA builds)",
        ),
        candle_core::DType::BF16 => causes.insert(
            0,
            "rounding or overflow in half precision: --dtype bf16 keeps 8 significant bits; run with --dtype f32",
        ),
        _ => {}
    }
    let guidance = format!(
        "a very large --guidance {} (diffusers' pipelines use about 1 to 20)",
        job.guidance
    );
    if job.cfg() && job.guidance.abs() > 50.0 {
        causes.insert(0, guidance.as_str());
    }
    Err(Error::Numerics(format!(
        "the latents became non-finite (NaN or inf) at step {} of {} (trace index {i}; {mode} step of strategy {strategy}, guidance {}); likely causes: {}; no output was written",
        i + 1,
        job.steps,
        job.guidance,
        causes.join("; ")
    )))
}

/// What one rank measured in one step.
#[derive(Debug, Clone)]
pub struct RankStep {
    pub timestep: f64,
    pub mode: StepMode,
    pub rel_mae: f64,
    pub slope: Option<f64>,
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
    pub compute_seconds: f64,
    pub wall_seconds: f64,
    pub bytes_sent: u64,
    pub messages_sent: u64,
    /// The part of the sent bytes and messages that may overlap compute.
    pub overlapped: Sent,
    pub reference_extra_bytes: u64,
    /// What this rank's step cache did (forwards computed and saved, modules reused).
    pub cache: crate::cache::StepRecord,
    /// FLOPs this rank's denoiser calls counted in the step ([`crate::work::Counted`]).
    pub flops: f64,
    /// See [`StepOutput::chain_groups`].
    pub chain_groups: usize,
}

/// What one rank returns from a run.
#[derive(Debug, Clone)]
pub struct RankOutput {
    pub latents: Tensor,
    pub step_latents: Vec<Tensor>,
    pub steps: Vec<RankStep>,
}

/// Runs the sampling loop on one rank with `strategy` providing the predictions. Every
/// forward goes through this rank's [`crate::cache::StepCache`], which counts forwards
/// and, with `strategy.cache()`, decides each step whether it is cached; below it,
/// [`crate::work::Counted`] counts the FLOPs of what is actually computed.
pub fn run_rank(
    strategy: &dyn Strategy,
    job: &Job,
    comm: &mut dyn Communicator,
) -> Result<RankOutput> {
    let hw = (job.inputs.latents.dim(2)?, job.inputs.latents.dim(3)?);
    // Every denoiser call of this rank is counted here, whatever the strategy.
    let counted = crate::work::Counted::new(job.model);
    let cache = crate::cache::StepCache::new(&counted, strategy.cache().copied(), hw)?;
    let job = &Job {
        model: &cache,
        ..*job
    };
    let mut worker = strategy.worker(job, comm.rank(), comm.world_size())?;
    counted.take();
    let mut sampler = Sampler::new(job)?;
    let mut steps = Vec::with_capacity(job.steps);
    let mut step_latents = Vec::with_capacity(job.steps);
    for i in 0..job.steps {
        let start = Instant::now();
        let sent0 = Sent::so_far(comm);
        let x = sampler.model_input(i)?;
        let t = sampler.timestep(i);
        let plan = cache.plan_step(i, job.steps, comm, job, &x, t, worker.detecting())?;
        // A whole-prediction cache skips the step before any layout runs it: the sampler
        // takes the last prediction again, so the step costs nothing on any rank whatever
        // its mode (a fill, the first exact step after pipelining).
        let repeat = match plan.cached && cache.skips_whole_steps() {
            true => sampler
                .last_prediction()
                .and_then(|eps| worker.skip(i).map(|s| (eps, s))),
            false => None,
        };
        let (out, record) = match repeat {
            Some((eps, s)) => {
                let out = StepOutput {
                    mode: s.mode,
                    prediction: Prediction::Guided(eps),
                    rel_mae: 0.0,
                    slope: None,
                    tau1: s.tau1,
                    tau2: s.tau2,
                    compute_seconds: 0.0,
                    reference_extra_bytes: 0,
                    overlapped: Sent::default(),
                    chain_groups: 0,
                };
                (out, cache.skip_step(plan))
            }
            None => {
                let out = worker.step(comm, i, &x, t)?;
                (out, cache.end_step(plan))
            }
        };
        match &out.prediction {
            Prediction::Branches(u, c) => sampler.step_guided(i, u, c)?,
            Prediction::Guided(eps) => sampler.step(i, eps)?,
            Prediction::Reused { pred, diff } => sampler.step_reused(i, pred, diff)?,
        }
        check_latents(&sampler.latents, i, job, strategy.name(), &out)?;
        step_latents.push(sampler.latents.clone());
        steps.push(RankStep {
            timestep: t,
            mode: out.mode,
            rel_mae: out.rel_mae,
            slope: out.slope,
            tau1: out.tau1,
            tau2: out.tau2,
            compute_seconds: out.compute_seconds + record.probe_seconds,
            wall_seconds: start.elapsed().as_secs_f64(),
            bytes_sent: comm.bytes_sent() - sent0.bytes,
            messages_sent: comm.messages_sent() - sent0.messages,
            overlapped: out.overlapped,
            reference_extra_bytes: out.reference_extra_bytes,
            cache: record,
            flops: counted.take(),
            chain_groups: out.chain_groups,
        });
        if comm.rank() == 0 {
            if let Some(p) = job.progress {
                p(i + 1, job.steps);
            }
        }
    }
    Ok(RankOutput {
        latents: sampler.latents,
        step_latents,
        steps,
    })
}
