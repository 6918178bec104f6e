//! `hybrid`: Hybridiff. Exact condition-split steps (as `cfg`) until the branches'
//! rel-MAE curve flattens (`tau1`), then `k` steps where the denoiser runs as a
//! pipeline of stages, one per rank, each rank on its own branch's conditioning and
//! one-step-stale inputs, then exact again after `tau2`.
//!
//! Without classifier-free guidance (`guidance <= 1`) there is no rel-MAE between
//! branches to switch on: every step runs as `cfg` does then (rank 0, conditional branch).

use candle_core::Tensor;
use hybridiff_comm::Communicator;
use hybridiff_models::Conditioning;

use super::cfg::{check_world, exact_step, NO_BRANCHES};
use super::{conditional_step, PipelinedGuidance, Prediction, StepOutput, Strategy, Worker};
use crate::stages::{PlanCache, StagePlan, StagedRunner};
use crate::switch::{Phase, SwitchParams, Switcher};
use crate::trace::StepMode;
use crate::{Job, Result};

/// Hybridiff with its switching parameters.
pub struct Hybrid {
    pub switch: SwitchParams,
    pub stages: PlanCache,
    pub guidance: PipelinedGuidance,
}

struct HybridWorker<'a> {
    job: &'a Job<'a>,
    switcher: Switcher,
    runner: StagedRunner<'a>,
    branch: &'a Conditioning,
    guidance: PipelinedGuidance,
    /// `w (eps_c - eps_u)` of the last exact step, for `--pipelined-guidance reuse`.
    correction: Option<Tensor>,
}

/// The plan as JSON: the modules of each stage and its counted FLOPs.
pub fn plan_json(job: &Job, plan: &StagePlan) -> serde_json::Value {
    let names = job.model.module_names();
    let stages: Vec<serde_json::Value> = (0..plan.n)
        .map(|s| {
            let modules: Vec<&str> = plan
                .owner
                .iter()
                .enumerate()
                .filter(|(_, o)| **o == s)
                .map(|(m, _)| names[m].as_str())
                .collect();
            serde_json::json!({ "rank": s, "flops": plan.stage_flops[s], "modules": modules })
        })
        .collect();
    serde_json::Value::Array(stages)
}

impl Strategy for Hybrid {
    fn name(&self) -> &'static str {
        "hybrid"
    }

    fn check(&self, job: &Job, world_size: usize) -> Result<()> {
        check_world(world_size, "hybrid")?;
        if !job.cfg() {
            return Ok(());
        }
        self.switch.check(job.steps)?;
        self.stages.check(job, world_size)
    }

    fn without_cfg(&self) -> &'static str {
        NO_BRANCHES
    }

    fn worker<'a>(
        &'a self,
        job: &'a Job<'a>,
        rank: usize,
        world_size: usize,
    ) -> Result<Box<dyn Worker + 'a>> {
        let plan = self.stages.get(job, world_size)?;
        let branch = if rank < world_size / 2 {
            &job.inputs.uncond
        } else {
            &job.inputs.cond
        };
        Ok(Box::new(HybridWorker {
            job,
            switcher: Switcher::new(self.switch),
            runner: StagedRunner::new(job.model, plan, rank),
            branch,
            guidance: self.guidance,
            correction: None,
        }))
    }

    fn plan_summary(&self, job: &Job, world_size: usize) -> Result<Option<serde_json::Value>> {
        if !job.cfg() {
            return Ok(None);
        }
        Ok(Some(plan_json(job, &self.stages.get(job, world_size)?)))
    }
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
            return conditional_step(self.job, comm, x, t);
        }
        let mut out = match self.switcher.phase(i) {
            Phase::Exact => {
                self.runner.clear();
                let (u, c, secs) = exact_step(self.job, comm, x, t)?;
                if self.guidance == PipelinedGuidance::Reuse {
                    self.correction = Some(((&c - &u)? * self.job.guidance)?);
                }
                let mut out = StepOutput::exact(u, c, secs)?;
                out.slope = self.switcher.record(i, out.rel_mae);
                out
            }
            Phase::Pipelined => {
                let (mode, pred, extra) = if self.runner.is_filled() {
                    let (y, extra) = self.runner.pipelined_step(comm, x, t, self.branch)?;
                    (StepMode::Pipelined, y, extra)
                } else {
                    let y = self.runner.fill(x, t, self.branch)?;
                    (StepMode::Fill, self.runner.from_last_stage(comm, &y)?, 0)
                };
                self.switcher.record(i, 0.0);
                let eps = match (&self.correction, self.guidance) {
                    (Some(corr), PipelinedGuidance::Reuse) => (pred + corr)?,
                    _ => pred,
                };
                StepOutput {
                    mode,
                    prediction: Prediction::Guided(eps),
                    rel_mae: 0.0,
                    slope: None,
                    tau1: None,
                    tau2: None,
                    compute_seconds: self.runner.compute_seconds,
                    reference_extra_bytes: extra,
                    overlapped: if mode == StepMode::Pipelined {
                        self.runner.exchanged
                    } else {
                        Default::default()
                    },
                }
            }
        };
        out.tau1 = self.switcher.tau1;
        out.tau2 = self.switcher.tau2;
        Ok(out)
    }
}
