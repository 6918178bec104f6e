//! `cfg`: condition-based partitioning, the exact half of Hybridiff. Ranks `[0, W/2)`
//! form the uncond group and `[W/2, W)` the cond group; each group's leader runs the
//! denoiser at batch 1 on its branch and the two predictions are exchanged each step.
//!
//! With guidance off (`guidance <= 1`) there are no branches to split: rank 0 runs the
//! conditional branch and the others wait for its prediction (exact, no speedup).
//!
//! With W = 4 the reference has both ranks of a group compute the same thing; here the
//! second rank only receives the predictions (same latency, half the energy).

use std::time::Instant;

use candle_core::Tensor;
use hybridiff_comm::Communicator;

use super::{conditional_step, StepOutput, Strategy, Worker};
use crate::{Error, Job, Result};

/// Condition-based partitioning.
pub struct CfgSplit;

/// What `cfg` and `hybrid` do without classifier-free guidance.
pub(crate) const NO_BRANCHES: &str = "guidance <= 1 turns classifier-free guidance off (as in diffusers), so there are no branches to split: rank 0 runs the conditional branch at batch 1 and the other ranks idle (exact, no faster than serial); --strategy async pipelines that single branch over the ranks (approximate)";

struct CfgWorker<'a> {
    job: &'a Job<'a>,
}

/// Checks a world size for the condition split: 2 or 4 ranks.
pub fn check_world(world_size: usize, strategy: &str) -> Result<()> {
    if world_size != 2 && world_size != 4 {
        return Err(Error::Options(format!(
            "--world-size {world_size}: the {strategy} strategy needs 2 or 4 ranks (one or two per CFG branch)"
        )));
    }
    Ok(())
}

/// One exact condition-split step: the group leaders compute their branch, exchange
/// predictions and hand them to their group. Returns `(eps_u, eps_c)` on every rank
/// and this rank's compute seconds.
pub fn exact_step(
    job: &Job,
    comm: &mut dyn Communicator,
    x: &Tensor,
    t: f64,
) -> Result<(Tensor, Tensor, f64)> {
    let w = comm.world_size();
    let rank = comm.rank();
    let half = w / 2;
    let (leader_u, leader_c) = (0, half);
    let group: Vec<usize> = if rank < half {
        (1..half).collect()
    } else {
        (half + 1..w).collect()
    };
    if rank == leader_u || rank == leader_c {
        let (branch, peer) = if rank == leader_u {
            (&job.inputs.uncond, leader_c)
        } else {
            (&job.inputs.cond, leader_u)
        };
        let start = Instant::now();
        let mine = job.model.forward(x, t, branch)?;
        // A GPU runs queued kernels after the call returns: wait for them before the clock.
        mine.device().synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        comm.send(&mine, peer)?;
        let theirs = comm.recv(peer)?;
        let (u, c) = if rank == leader_u {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        for &member in &group {
            comm.send(&u, member)?;
            comm.send(&c, member)?;
        }
        Ok((u, c, secs))
    } else {
        let leader = if rank < half { leader_u } else { leader_c };
        Ok((comm.recv(leader)?, comm.recv(leader)?, 0.0))
    }
}

impl Strategy for CfgSplit {
    fn name(&self) -> &'static str {
        "cfg"
    }

    fn check(&self, _job: &Job, world_size: usize) -> Result<()> {
        check_world(world_size, "cfg")
    }

    fn without_cfg(&self) -> &'static str {
        NO_BRANCHES
    }

    fn worker<'a>(&'a self, job: &'a Job<'a>, _: usize, _: usize) -> Result<Box<dyn Worker + 'a>> {
        Ok(Box::new(CfgWorker { job }))
    }
}

impl Worker for CfgWorker<'_> {
    fn step(
        &mut self,
        comm: &mut dyn Communicator,
        _: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput> {
        if !self.job.cfg() {
            return conditional_step(self.job, comm, x, t);
        }
        let (u, c, secs) = exact_step(self.job, comm, x, t)?;
        StepOutput::exact(u, c, secs)
    }
}
