//! `async`: the AsyncDiff baseline (Chen et al. 2024, arXiv 2406.06911). Every rank works on
//! the whole CFG batch (uncond and cond stacked); the denoiser is cut into `n` stages, and
//! after `warmup` exact steps every step is pipelined: each stage computes on one-step-stale
//! inputs and the last stage's output, guided as usual, is the prediction. Without
//! classifier-free guidance (`guidance <= 1`) the batch is the conditional branch alone.
//!
//! **Stride** (`--stride`, AsyncDiff's "stride denoising"), as its released code does it:
//! - stride 1: `n = W` stages, one per rank; every step pipelined.
//! - stride 2: `n = W - 1` stages (world size `n + stride - 1`, the reference's assertion) and
//!   one more rank that mirrors the last stage. Steps after the warm-up go in rounds of two.
//!   In a round's first step `i` every stage owner computes its stage for step `i + 1`
//!   (timestep `t_{i+1}`, on step `i`'s input and the stale outputs of the other stages),
//!   while the extra rank computes the last stage for step `i` itself (`t_i`): its output is
//!   step `i`'s prediction. The round's second step computes nothing: its prediction is the
//!   last stage's output computed a step ahead. So each rank computes once per two steps and
//!   the ranks exchange stage outputs once per round. A lone step at the end (an odd number
//!   of steps after the warm-up) runs at stride 1, the extra rank idle for that step.
//!   AsyncDiff's `time_shift` option is not implemented.
//!
//! The warm-up (and the fill, with `--warmup 0`) runs the stages one after another on exact
//! inputs ([`StagedRunner::fill_sequential`]): the plain forward, bit for bit, computed once
//! in all (the reference computes it on every rank).

use candle_core::Tensor;
use hybridiff_comm::Communicator;
use hybridiff_models::Conditioning;

use super::hybrid::plan_json;
use super::{StepOutput, Strategy, Worker};
use crate::stages::{PlanCache, StageRanks, StagedRunner};
use crate::trace::StepMode;
use crate::{Error, Job, Result};

/// AsyncDiff with `warmup` exact steps and stride 1 or 2.
pub struct AsyncDiff {
    pub warmup: usize,
    pub stride: usize,
    pub stages: PlanCache,
}

struct AsyncWorker<'a> {
    warmup: usize,
    stride: usize,
    steps: usize,
    runner: StagedRunner<'a>,
    /// The CFG batch (uncond, cond), or the conditional branch alone without CFG.
    cond: Conditioning,
    cfg: bool,
    /// Every step's timestep (stride 2 computes one step ahead).
    timesteps: Vec<f64>,
    /// Stride 2, on the last stage's owner: its output for the round's second step.
    ahead: Option<Tensor>,
}

impl AsyncDiff {
    /// The number of stages on `world_size` ranks: `W - stride + 1`.
    fn stage_count(&self, world_size: usize) -> Result<usize> {
        if self.stride != 1 && self.stride != 2 {
            return Err(Error::Options(format!(
                "--stride {}: AsyncDiff's stride is 1 or 2 (as its code allows)",
                self.stride
            )));
        }
        let least = self.stride + 1;
        if world_size < least {
            return Err(Error::Options(format!(
                "--world-size {world_size}: async with --stride {} needs at least {least} ranks (n + stride - 1 with n >= 2 stages){}",
                self.stride,
                if self.stride == 2 {
                    "; use --stride 1 on 2 ranks"
                } else {
                    ""
                }
            )));
        }
        Ok(world_size + 1 - self.stride)
    }

    fn placement(&self, n: usize) -> StageRanks {
        let mut r = StageRanks::consecutive(0, n);
        if self.stride == 2 {
            r.mirrors.push(n);
        }
        r
    }
}

impl Strategy for AsyncDiff {
    fn name(&self) -> &'static str {
        "async"
    }

    fn check(&self, job: &Job, world_size: usize) -> Result<()> {
        let n = self.stage_count(world_size)?;
        if self.stride == 2 {
            let first = self.warmup.max(1);
            if job.steps < first + 2 {
                return Err(Error::Options(format!(
                    "--steps {}: --stride 2 needs a round of two steps after the {first} exact step{}: use --steps {} or more, or --stride 1",
                    job.steps,
                    if first == 1 { "" } else { "s" },
                    first + 2
                )));
            }
        }
        self.stages.check(job, n)
    }

    fn worker<'a>(
        &'a self,
        job: &'a Job<'a>,
        rank: usize,
        world_size: usize,
    ) -> Result<Box<dyn Worker + 'a>> {
        let n = self.stage_count(world_size)?;
        let plan = self.stages.get(job, n)?;
        let scheduler =
            hybridiff_schedulers::build(job.scheduler_config, job.scheduler, job.steps)?;
        Ok(Box::new(AsyncWorker {
            warmup: self.warmup,
            stride: self.stride,
            steps: job.steps,
            runner: StagedRunner::on(job.model, plan, self.placement(n), rank)?,
            cond: if job.cfg() {
                Conditioning::cat(&job.inputs.uncond, &job.inputs.cond)?
            } else {
                job.inputs.cond.clone()
            },
            cfg: job.cfg(),
            timesteps: (0..job.steps).map(|i| scheduler.timestep(i)).collect(),
            ahead: None,
        }))
    }

    fn without_cfg(&self) -> &'static str {
        "guidance <= 1 turns classifier-free guidance off (as in diffusers): the stages pipeline the conditional branch alone at batch 1"
    }

    fn describe(&self, _job: &Job, world_size: usize) -> String {
        match self.stage_count(world_size) {
            Ok(n) if self.stride == 2 => format!("stride 2, {n} stages + 1"),
            Ok(n) => format!("stride 1, {n} stages"),
            Err(_) => String::new(),
        }
    }

    fn plan_summary(&self, job: &Job, world_size: usize) -> Result<Option<serde_json::Value>> {
        let n = self.stage_count(world_size)?;
        Ok(Some(plan_json(
            job,
            &self.stages.get(job, n)?,
            &[self.placement(n)],
        )))
    }
}

impl AsyncWorker<'_> {
    /// `y` from `root` on every rank.
    fn from(&self, comm: &mut dyn Communicator, y: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let me = comm.rank();
        Ok(comm.broadcast(if me == root { y } else { None }, root)?)
    }

    /// This step's prediction `y` of the batch as an output, guided as usual.
    fn output(&self, mode: StepMode, y: Tensor, secs: f64, extra: u64) -> Result<StepOutput> {
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

impl Worker for AsyncWorker<'_> {
    /// Never skipped whole: a stride-2 round's second step takes what its first computed
    /// a step ahead, and the warm-up fills stage by stage; cached steps reuse each stage's
    /// modules instead (the step cache's module-level path).
    fn skip(&mut self, _i: usize) -> Option<super::Skipped> {
        None
    }

    fn step(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput> {
        let me = comm.rank();
        let batch = if self.cfg {
            Tensor::cat(&[x, x], 0)?
        } else {
            x.clone()
        };
        let last = self.runner.last_stage_rank();
        if i < self.warmup || !self.runner.is_filled() {
            // Exact: the stages one after another on this step's inputs (fills the caches).
            let mode = if i < self.warmup {
                StepMode::Exact
            } else {
                StepMode::Fill
            };
            let y = self.runner.fill_sequential(comm, &batch, t, &self.cond)?;
            let y = self.from(comm, y.as_ref(), last)?;
            let mut out = self.output(mode, y, self.runner.compute_seconds, 0)?;
            out.chain_groups = 1;
            return Ok(out);
        }
        let extra = self.runner.reference_extra(me);
        if self.stride == 1 {
            let (y, extra) = self.runner.pipelined_step(comm, &batch, t, &self.cond)?;
            return self.output(StepMode::Pipelined, y, self.runner.compute_seconds, extra);
        }
        let first = self.warmup.max(1);
        let mirror = self.runner.ranks().mirrors[0];
        if (i - first) % 2 == 1 {
            // The round's second step: computed a step ahead by the last stage's owner.
            let ahead = self.ahead.take();
            let y = self.from(comm, ahead.as_ref(), last)?;
            let mut out = self.output(StepMode::Pipelined, y, 0.0, 0)?;
            out.overlapped = Default::default();
            return Ok(out);
        }
        self.runner.exchange(comm)?;
        let lone = i + 1 == self.steps;
        let y = if lone {
            // No step follows: stride 1 for this step; the mirror has nothing to add.
            let y = if me == mirror {
                self.runner.compute_seconds = 0.0;
                None
            } else {
                Some(self.runner.pipelined(&batch, t, &self.cond)?)
            };
            self.from(comm, y.as_ref(), last)?
        } else {
            let ahead_t = if me == mirror {
                t
            } else {
                self.timesteps[i + 1]
            };
            let y = self.runner.pipelined(&batch, ahead_t, &self.cond)?;
            if me == last {
                self.ahead = Some(y.clone());
            }
            self.from(comm, (me == mirror).then_some(&y), mirror)?
        };
        self.output(StepMode::Pipelined, y, self.runner.compute_seconds, extra)
    }
}
