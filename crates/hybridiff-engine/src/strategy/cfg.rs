//! `cfg`: condition-based partitioning, the exact half of Hybridiff, on any even number of
//! ranks. Ranks `[0, W/2)` form the uncond group and `[W/2, W)` the cond group; inside a
//! group the `P = W/2` ranks split the latents into `P` horizontal bands, exchanging what the
//! bands read of each other in the same step (`patch`'s band machinery in `sync` mode), so
//! every rank computes a distinct `1/W` of each step and the result equals serial up to
//! float rounding. With `P = 1` each group's rank runs the plain forward on its branch and
//! the two predictions are exchanged (the paper's condition split). The reference code at
//! W = 4 has both ranks of a group compute the same thing; here they split it.
//!
//! With guidance off (`guidance <= 1`) there are no branches to split: all `W` ranks split
//! the conditional branch into `W` bands instead (exact; no rank idles).

use candle_core::Tensor;
use hybridiff_comm::Communicator;

use super::layout::BandLayout;
use super::patch::{layout_json, BandStep, PatchMode};
use super::{StepOutput, Strategy, Worker};
use crate::{Error, Job, Result};

/// Condition-based partitioning (x bands when `W > 2`).
pub struct CfgSplit {
    /// `--patch-mode` when given: `sync` only (cfg is exact).
    pub patch_mode: Option<PatchMode>,
}

/// What `cfg` and `hybrid` do without classifier-free guidance.
pub(crate) const NO_BRANCHES: &str = "guidance <= 1 turns classifier-free guidance off (as in diffusers), so there are no branches to split: the ranks split the conditional branch into one band of the latents each instead (exact; --strategy async pipelines it over the ranks, approximately)";

/// The exact layout of `cfg` (and of `hybrid`'s exact steps): the condition split x bands,
/// or bands alone without CFG.
pub fn exact_layout(job: &Job, world_size: usize, strategy: &str) -> Result<BandLayout> {
    if world_size < 2 {
        return Err(Error::Options(format!(
            "--world-size {world_size}: the {strategy} strategy needs 2 ranks or more (2 x P: one band group per CFG branch); use --strategy serial for 1"
        )));
    }
    BandLayout::new(job, world_size, if job.cfg() { 2 } else { 1 }, strategy)
}

struct CfgWorker<'a>(BandStep<'a>);

impl Strategy for CfgSplit {
    fn name(&self) -> &'static str {
        "cfg"
    }

    fn check(&self, job: &Job, world_size: usize) -> Result<()> {
        if self.patch_mode == Some(PatchMode::Displaced) {
            return Err(Error::Options(
                "--patch-mode displaced: cfg is exact, its bands are always sync; for displaced bands use --strategy patch (or hybrid, whose exact steps take --patch-mode)".into(),
            ));
        }
        exact_layout(job, world_size, "cfg").map(|_| ())
    }

    fn without_cfg(&self) -> &'static str {
        NO_BRANCHES
    }

    fn describe(&self, job: &Job, world_size: usize) -> String {
        match exact_layout(job, world_size, "cfg") {
            Ok(l) if l.bands > 1 => format!("sync {}", l.describe()),
            _ => String::new(),
        }
    }

    fn plan_summary(&self, job: &Job, world_size: usize) -> Result<Option<serde_json::Value>> {
        let l = exact_layout(job, world_size, "cfg")?;
        Ok((l.bands > 1).then(|| layout_json(&l, PatchMode::Sync, 0, job.steps)))
    }

    fn worker<'a>(
        &'a self,
        job: &'a Job<'a>,
        rank: usize,
        world_size: usize,
    ) -> Result<Box<dyn Worker + 'a>> {
        let l = exact_layout(job, world_size, "cfg")?;
        Ok(Box::new(CfgWorker(BandStep::new(
            job,
            l,
            rank,
            PatchMode::Sync,
            0,
        )?)))
    }
}

impl Worker for CfgWorker<'_> {
    fn step(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput> {
        self.0.step(comm, i, x, t)
    }
}
