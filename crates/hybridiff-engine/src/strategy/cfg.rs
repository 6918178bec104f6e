//! `cfg`: condition-based partitioning, the exact half of Hybridiff. Ranks `[0, W/2)`
//! form the uncond group and `[W/2, W)` the cond group; each group's leader runs the
//! denoiser at batch 1 on its branch and the two predictions are exchanged each step.
//!
//! With W = 4 the reference has both ranks of a group compute the same thing; here the
//! second rank only receives the predictions (same latency, half the energy) until a
//! strategy gives it real work (pipelining inside the group).

use candle_core::Tensor;
use hybridiff_comm::Communicator;

use super::Strategy;
use crate::{Error, Job, Result};

/// Condition-based partitioning.
pub struct CfgSplit;

impl Strategy for CfgSplit {
    fn name(&self) -> &'static str {
        "cfg"
    }

    fn check(&self, world_size: usize) -> Result<()> {
        if world_size != 2 && world_size != 4 {
            return Err(Error::Options(format!(
                "--world-size {world_size}: the cfg strategy needs 2 or 4 ranks (one or two per CFG branch)"
            )));
        }
        Ok(())
    }

    fn predict(
        &self,
        job: &Job,
        comm: &mut dyn Communicator,
        x: &Tensor,
        t: f64,
    ) -> Result<(Tensor, Tensor)> {
        let w = comm.world_size();
        let rank = comm.rank();
        let half = w / 2;
        let (leader_u, leader_c) = (0, half);
        let group: Vec<usize> = if rank < half {
            (1..half).collect()
        } else {
            (half + 1..w).collect()
        };
        let (eps_u, eps_c) = if rank == leader_u || rank == leader_c {
            let (branch, peer) = if rank == leader_u {
                (&job.inputs.uncond, leader_c)
            } else {
                (&job.inputs.cond, leader_u)
            };
            let mine = job.model.forward(x, t, branch)?;
            comm.send(&mine, peer)?;
            let theirs = comm.recv(peer)?;
            let pair = if rank == leader_u {
                (mine, theirs)
            } else {
                (theirs, mine)
            };
            for &member in &group {
                comm.send(&pair.0, member)?;
                comm.send(&pair.1, member)?;
            }
            pair
        } else {
            let leader = if rank < half { leader_u } else { leader_c };
            (comm.recv(leader)?, comm.recv(leader)?)
        };
        Ok((eps_u, eps_c))
    }
}
