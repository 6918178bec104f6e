//! `async`: the AsyncDiff baseline. Every rank works on the whole CFG batch (uncond and
//! cond stacked); the first `warmup` steps run the full denoiser on every rank (filling
//! the module caches), every later step is pipelined: each rank computes its stage on
//! one-step-stale inputs and the last stage's output, guided as usual, is the
//! prediction. Stride 1 (one stage per rank per step). Without classifier-free guidance
//! (`guidance <= 1`) the batch is the conditional branch alone, pipelined the same way.

use candle_core::Tensor;
use hybridiff_comm::Communicator;
use hybridiff_models::Conditioning;

use super::hybrid::plan_json;
use super::{StepOutput, Strategy, Worker};
use crate::stages::{PlanCache, StagedRunner};
use crate::trace::StepMode;
use crate::{Error, Job, Result};

/// AsyncDiff with `warmup` exact steps.
pub struct AsyncDiff {
    pub warmup: usize,
    pub stages: PlanCache,
}

struct AsyncWorker<'a> {
    warmup: usize,
    runner: StagedRunner<'a>,
    /// The CFG batch (uncond, cond), or the conditional branch alone without CFG.
    cond: Conditioning,
    cfg: bool,
}

impl Strategy for AsyncDiff {
    fn name(&self) -> &'static str {
        "async"
    }

    fn check(&self, job: &Job, world_size: usize) -> Result<()> {
        if world_size < 2 {
            return Err(Error::Options(format!(
                "--world-size {world_size}: the async strategy needs at least 2 ranks (one stage each)"
            )));
        }
        self.stages.check(job, world_size)
    }

    fn worker<'a>(
        &'a self,
        job: &'a Job<'a>,
        rank: usize,
        world_size: usize,
    ) -> Result<Box<dyn Worker + 'a>> {
        let plan = self.stages.get(job, world_size)?;
        Ok(Box::new(AsyncWorker {
            warmup: self.warmup,
            runner: StagedRunner::new(job.model, plan, rank),
            cond: if job.cfg() {
                Conditioning::cat(&job.inputs.uncond, &job.inputs.cond)?
            } else {
                job.inputs.cond.clone()
            },
            cfg: job.cfg(),
        }))
    }

    fn without_cfg(&self) -> &'static str {
        "guidance <= 1 turns classifier-free guidance off (as in diffusers): the stages pipeline the conditional branch alone at batch 1"
    }

    fn plan_summary(&self, job: &Job, world_size: usize) -> Result<Option<serde_json::Value>> {
        Ok(Some(plan_json(job, &self.stages.get(job, world_size)?)))
    }
}

impl Worker for AsyncWorker<'_> {
    fn step(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput> {
        let batch = if self.cfg {
            Tensor::cat(&[x, x], 0)?
        } else {
            x.clone()
        };
        let (mode, y, extra) = if i < self.warmup || !self.runner.is_filled() {
            // Every rank computes the whole batch: exact, and it fills the caches.
            let mode = if i < self.warmup {
                StepMode::Exact
            } else {
                StepMode::Fill
            };
            (mode, self.runner.fill(&batch, t, &self.cond)?, 0)
        } else {
            let (y, extra) = self.runner.pipelined_step(comm, &batch, t, &self.cond)?;
            (StepMode::Pipelined, y, extra)
        };
        let secs = self.runner.compute_seconds;
        let mut out = if self.cfg {
            StepOutput::exact(y.narrow(0, 0, 1)?, y.narrow(0, 1, 1)?, secs)?
        } else {
            StepOutput::conditional(y, secs)
        };
        if mode == StepMode::Pipelined {
            out.overlapped = self.runner.exchanged;
        }
        out.mode = mode;
        out.reference_extra_bytes = extra;
        Ok(out)
    }
}
