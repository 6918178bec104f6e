//! `hybrid`: Hybridiff on `W = 2P` ranks. Exact steps are `cfg`'s: the condition split x `P`
//! bands (sync by default, or DistriFusion's displaced bands with `--patch-mode displaced`),
//! until the branches' rel-MAE curve flattens (`tau1`); then `k` pipelined steps, where the
//! denoiser runs as stages on one-step-stale inputs; then exact again after `tau2`. The
//! switching rules and thresholds are the paper's at every `W`.
//!
//! Pipelined steps have two layouts (`--pipeline-layout`):
//! - `across` (the paper's, generalised): `2P` stages over all ranks, stage `j` on rank `j`
//!   with its group's conditioning (ranks `[0, P)` uncond, `[P, 2P)` cond); the last stage's
//!   output is the prediction, unguided (or with the last exact step's correction,
//!   `--pipelined-guidance reuse`). Each rank computes `1/2P` of a forward per step.
//! - `per-branch` (`P >= 2`): each branch group pipelines its own branch over `P` stages and
//!   both groups' last stages give `(eps_u, eps_c)`, guided as in exact steps. Each rank
//!   computes `1/P` of a forward per step.
//!
//! At `P = 1` `across` is exactly the paper's Hybridiff (its fill step too: every rank runs
//! the whole denoiser on its branch). At `P >= 2` the fill step is an exact step (the
//! condition split x bands, guided) whose band outputs, gathered inside each band group,
//! fill the stages' caches ([`StagedRunner::fill_from_bands`]): no rank repeats another's
//! work, and the fill costs an exact step's `1/W` instead of a whole forward.
//!
//! Without classifier-free guidance (`guidance <= 1`) there is no rel-MAE between
//! branches to switch on: every step runs as `cfg` does then (the conditional branch in `W`
//! bands).
//!
//! Guidance and its rescale (`--guidance-rescale`) are applied by the sampler, as for every
//! strategy: exact steps combine the two branches and rescale toward the conditional one.
//! A pipelined step has one prediction: under `--pipelined-guidance none` (the reference)
//! it is unguided, so there is nothing to rescale (a rescale toward itself is the
//! identity); under `reuse` the sampler adds the last exact step's `w (eps_c - eps_u)` and
//! rescales the sum toward the prediction, the step's stand-in for `eps_c`. Stochastic
//! samplers draw their step noise from the seed and the step alone, so the switching
//! decisions (rel-MAE of exact steps) are the same on every rank.

use candle_core::Tensor;
use hybridiff_comm::Communicator;
use hybridiff_models::Conditioning;

use super::cfg::{exact_layout, NO_BRANCHES};
use super::patch::{check_warmup, BandStep, PatchMode};
use super::{PipelinedGuidance, Prediction, Skipped, StepOutput, Strategy, Worker};
use crate::stages::{PlanCache, StagePlan, StageRanks, StagedRunner};
use crate::switch::{Phase, SwitchParams, Switcher};
use crate::trace::StepMode;
use crate::{Error, Job, Result};

/// How pipelined steps use the ranks (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PipelineLayout {
    /// `2P` stages across both branch groups, one prediction, unguided.
    Across,
    /// `P` stages per branch group, both branches, guided.
    PerBranch,
}

impl std::str::FromStr for PipelineLayout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "across" => Ok(Self::Across),
            "per-branch" => Ok(Self::PerBranch),
            other => Err(Error::Options(format!(
                "--pipeline-layout: unknown layout `{other}`; expected across or per-branch"
            ))),
        }
    }
}

impl std::fmt::Display for PipelineLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Across => "across",
            Self::PerBranch => "per-branch",
        })
    }
}

impl PipelineLayout {
    /// The default at `P` ranks per branch group: `across`, chosen by measurement
    /// (`docs/benchmarks/scale-out.md`): it halves each rank's compute in pipelined steps,
    /// while `per-branch`'s pipelined step costs each rank what an exact banded step does
    /// (`1/P` of a forward), so it saves only the bands' exchanges (slow links) and buys its
    /// better images at `cfg`'s latency, where `cfg` itself is exact.
    pub fn default_for(_p: usize) -> Self {
        Self::Across
    }
}

/// Hybridiff with its switching parameters.
pub struct Hybrid {
    pub switch: SwitchParams,
    pub stages: PlanCache,
    pub guidance: PipelinedGuidance,
    /// Exact steps' bands: `sync` (exact) or `displaced`.
    pub patch_mode: PatchMode,
    /// `displaced`: synchronous band steps first, after the start and after each pipelined
    /// phase.
    pub warmup: usize,
    /// Pipelined steps' layout; `None` for [`PipelineLayout::default_for`].
    pub layout: Option<PipelineLayout>,
}

struct HybridWorker<'a> {
    job: &'a Job<'a>,
    switcher: Switcher,
    band: BandStep<'a>,
    /// The pipelined steps' stages (none without CFG: nothing is pipelined then).
    runner: Option<StagedRunner<'a>>,
    layout: PipelineLayout,
    /// Ranks per branch group.
    p: usize,
    branch: &'a Conditioning,
    guidance: PipelinedGuidance,
    /// `eps_c - eps_u` of the last exact step, for `--pipelined-guidance reuse` (the
    /// sampler scales it by the guidance).
    correction: Option<Tensor>,
}

/// The plan as JSON: for each stage its rank, counted FLOPs and modules; one entry per rank
/// that owns a stage (a plan placed on several groups appears once per group).
pub fn plan_json(job: &Job, plan: &StagePlan, groups: &[StageRanks]) -> serde_json::Value {
    let names = job.model.module_names();
    let mut stages = Vec::new();
    for ranks in groups {
        for (s, &rank) in ranks.owners.iter().enumerate() {
            let modules: Vec<&str> = plan
                .owner
                .iter()
                .enumerate()
                .filter(|(_, o)| **o == s)
                .map(|(m, _)| names[m].as_str())
                .collect();
            stages.push(
                serde_json::json!({ "rank": rank, "flops": plan.stage_flops[s], "modules": modules }),
            );
        }
        for &rank in &ranks.mirrors {
            stages.push(serde_json::json!({ "rank": rank, "mirrors_stage": plan.n - 1 }));
        }
    }
    serde_json::Value::Array(stages)
}

impl Hybrid {
    fn pipeline(&self, job: &Job, p: usize) -> Result<PipelineLayout> {
        let layout = self.layout.unwrap_or(PipelineLayout::default_for(p));
        if layout == PipelineLayout::PerBranch {
            if p < 2 {
                return Err(Error::Options(format!(
                    "--pipeline-layout per-branch (the flag, or a model's hybridiff.json `pipeline_layout` tuned for more ranks): needs 2 or more ranks per CFG branch group (--world-size 4 or 8); with {} the group's one rank would run its whole branch, which is cfg; use --pipeline-layout across",
                    2 * p
                )));
            }
            if self.guidance == PipelinedGuidance::Reuse {
                return Err(Error::Options(
                    "--pipelined-guidance reuse: per-branch pipelined steps compute both branches and guide them as exact steps do; reuse applies to --pipeline-layout across".into(),
                ));
            }
        }
        let _ = job;
        Ok(layout)
    }

    /// The stage count and where the stages of `group` run.
    fn placement(layout: PipelineLayout, p: usize, group: usize) -> (usize, StageRanks) {
        match layout {
            PipelineLayout::Across => (2 * p, StageRanks::consecutive(0, 2 * p)),
            PipelineLayout::PerBranch => (p, StageRanks::consecutive(group * p, p)),
        }
    }
}

impl Strategy for Hybrid {
    fn name(&self) -> &'static str {
        "hybrid"
    }

    fn check(&self, job: &Job, world_size: usize) -> Result<()> {
        check_warmup(self.patch_mode, self.warmup)?;
        let l = exact_layout(job, world_size, "hybrid")?;
        if !job.cfg() {
            return Ok(());
        }
        self.switch.check(job.steps)?;
        let layout = self.pipeline(job, l.bands)?;
        let (n, _) = Self::placement(layout, l.bands, 0);
        self.stages.check(job, n)
    }

    fn without_cfg(&self) -> &'static str {
        NO_BRANCHES
    }

    fn describe(&self, job: &Job, world_size: usize) -> String {
        let Ok(l) = exact_layout(job, world_size, "hybrid") else {
            return String::new();
        };
        if l.bands == 1 {
            return String::new();
        }
        let layout = self.layout.unwrap_or(PipelineLayout::default_for(l.bands));
        format!(
            "exact: {} {}; pipelined: {layout}",
            self.patch_mode,
            l.describe()
        )
    }

    fn worker<'a>(
        &'a self,
        job: &'a Job<'a>,
        rank: usize,
        world_size: usize,
    ) -> Result<Box<dyn Worker + 'a>> {
        let l = exact_layout(job, world_size, "hybrid")?;
        let p = l.bands;
        let group = l.group_of(rank);
        let layout = if job.cfg() {
            self.pipeline(job, p)?
        } else {
            PipelineLayout::Across
        };
        // Without CFG no step is pipelined, so no plan is made.
        let runner = if job.cfg() {
            let (n, ranks) = Self::placement(layout, p, group);
            let plan = self.stages.get(job, n)?;
            Some(StagedRunner::on(job.model, plan, ranks, rank)?)
        } else {
            None
        };
        let branch = if group == 0 && job.cfg() {
            &job.inputs.uncond
        } else {
            &job.inputs.cond
        };
        Ok(Box::new(HybridWorker {
            job,
            switcher: Switcher::new(self.switch),
            band: BandStep::new(job, l, rank, self.patch_mode, self.warmup)?,
            runner,
            layout,
            p,
            branch,
            guidance: self.guidance,
            correction: None,
        }))
    }

    fn plan_summary(&self, job: &Job, world_size: usize) -> Result<Option<serde_json::Value>> {
        if !job.cfg() {
            return Ok(None);
        }
        let p = exact_layout(job, world_size, "hybrid")?.bands;
        let layout = self.pipeline(job, p)?;
        let (n, first) = Self::placement(layout, p, 0);
        let plan = self.stages.get(job, n)?;
        let groups = match layout {
            PipelineLayout::Across => vec![first],
            PipelineLayout::PerBranch => vec![first, Self::placement(layout, p, 1).1],
        };
        Ok(Some(plan_json(job, &plan, &groups)))
    }
}

impl HybridWorker<'_> {
    /// A pipelined or fill step's output.
    fn staged_output(
        runner: &StagedRunner,
        mode: StepMode,
        prediction: Prediction,
        extra: u64,
    ) -> StepOutput {
        StepOutput {
            mode,
            prediction,
            rel_mae: 0.0,
            slope: None,
            tau1: None,
            tau2: None,
            compute_seconds: runner.compute_seconds,
            reference_extra_bytes: extra,
            overlapped: if mode == StepMode::Pipelined {
                runner.exchanged
            } else {
                Default::default()
            },
            chain_groups: 0,
        }
    }

    /// Step `i` when it is pipelined: fill the caches first if they are empty.
    fn staged_step(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput> {
        let me = comm.rank();
        let (layout, p, branch, guidance) = (self.layout, self.p, self.branch, self.guidance);
        let filled = self.runner.as_ref().is_some_and(|r| r.is_filled());
        if !filled && p >= 2 {
            // Stages x bands: an exact banded step (both branches, guided as in exact steps)
            // whose band outputs, gathered inside each band group, fill the pipeline.
            let (mut out, kept) = self.band.step_keeping_outputs(comm, i, x, t)?;
            // Displaced bands sent this step's activations ahead for a banded next step,
            // which will not come: they go before the stage pieces use the same channels.
            self.band.settle(comm)?;
            let group = self.band.layout().group(self.band.layout().group_of(me));
            let runner = self.runner.as_mut().ok_or_else(|| {
                Error::Options("hybrid: a pipelined step without classifier-free guidance".into())
            })?;
            runner.fill_from_bands(comm, &group, kept)?;
            out.mode = StepMode::Fill;
            out.rel_mae = 0.0;
            out.overlapped = Default::default();
            return Ok(out);
        }
        self.band.settle(comm)?;
        let correction = self.correction.clone();
        // Under `reuse` the sampler adds `w * diff` and applies the guidance rescale to the
        // sum (toward `pred`), as for every strategy's guidance.
        let correct = |pred: Tensor| -> Prediction {
            match (&correction, guidance) {
                (Some(diff), PipelinedGuidance::Reuse) => Prediction::Reused {
                    pred,
                    diff: diff.clone(),
                },
                _ => Prediction::Guided(pred),
            }
        };
        let runner = self.runner.as_mut().ok_or_else(|| {
            Error::Options("hybrid: a pipelined step without classifier-free guidance".into())
        })?;
        let out = |runner: &StagedRunner, mode, prediction, extra| {
            Self::staged_output(runner, mode, prediction, extra)
        };
        if !runner.is_filled() {
            return match (layout, p) {
                (PipelineLayout::Across, 1) => {
                    // The paper's fill: every rank runs the whole denoiser on its branch.
                    let y = runner.fill(x, t, branch)?;
                    let pred = correct(runner.from_last_stage(comm, &y)?);
                    Ok(out(runner, StepMode::Fill, pred, 0))
                }
                (PipelineLayout::Across, _) => {
                    let y = runner.fill_sequential(comm, x, t, branch)?;
                    let root = runner.last_stage_rank();
                    let pred = comm.broadcast(if me == root { y.as_ref() } else { None }, root)?;
                    let mut o = out(runner, StepMode::Fill, correct(pred), 0);
                    o.chain_groups = 1;
                    Ok(o)
                }
                (PipelineLayout::PerBranch, _) => {
                    let y = runner.fill_sequential(comm, x, t, branch)?;
                    let (u, c) = both_last_stages(comm, p, y.as_ref())?;
                    let mut o = out(runner, StepMode::Fill, Prediction::Branches(u, c), 0);
                    o.chain_groups = 2;
                    Ok(o)
                }
            };
        }
        let extra = runner.reference_extra(me);
        match layout {
            PipelineLayout::Across => {
                let (pred, _) = runner.pipelined_step(comm, x, t, branch)?;
                Ok(out(runner, StepMode::Pipelined, correct(pred), extra))
            }
            PipelineLayout::PerBranch => {
                runner.exchange(comm)?;
                let y = runner.pipelined(x, t, branch)?;
                let last = runner.last_stage_rank() == me;
                let (u, c) = both_last_stages(comm, p, last.then_some(&y))?;
                Ok(out(
                    runner,
                    StepMode::Pipelined,
                    Prediction::Branches(u, c),
                    extra,
                ))
            }
        }
    }
}

/// `(eps_u, eps_c)` on every rank from the two branch groups' last stages (ranks `P - 1`
/// and `2P - 1`, per-branch layout); `y` is this rank's output when it is one of them.
fn both_last_stages(
    comm: &mut dyn Communicator,
    p: usize,
    y: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let me = comm.rank();
    let (ru, rc) = (p - 1, 2 * p - 1);
    let u = comm.broadcast(if me == ru { y } else { None }, ru)?;
    let c = comm.broadcast(if me == rc { y } else { None }, rc)?;
    Ok((u, c))
}

impl Worker for HybridWorker<'_> {
    fn step(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput> {
        if !self.job.cfg() {
            return self.band.step(comm, i, x, t);
        }
        let mut out = match self.switcher.phase(i) {
            Phase::Exact => {
                if let Some(r) = &mut self.runner {
                    r.clear();
                }
                let mut out = self.band.step(comm, i, x, t)?;
                if let (Prediction::Branches(u, c), PipelinedGuidance::Reuse) =
                    (&out.prediction, self.guidance)
                {
                    // Unscaled: the sampler multiplies by the guidance (Prediction::Reused).
                    self.correction = Some((c - u)?);
                }
                out.slope = self.switcher.record(i, out.rel_mae);
                out
            }
            Phase::Pipelined => {
                let out = self.staged_step(comm, i, x, t)?;
                self.switcher.record(i, 0.0);
                out
            }
        };
        out.tau1 = self.switcher.tau1;
        out.tau2 = self.switcher.tau2;
        Ok(out)
    }

    fn detecting(&self) -> bool {
        self.job.cfg() && self.switcher.tau1.is_none()
    }

    fn skip(&mut self, i: usize) -> Option<Skipped> {
        let mode = match (self.job.cfg(), self.switcher.phase(i)) {
            (true, Phase::Pipelined) => StepMode::Pipelined,
            _ => StepMode::Exact,
        };
        if self.job.cfg() {
            self.switcher.record(i, 0.0);
        }
        Some(Skipped {
            mode,
            tau1: self.switcher.tau1,
            tau2: self.switcher.tau2,
        })
    }
}
