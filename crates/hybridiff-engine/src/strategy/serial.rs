//! `serial`: one rank runs the CFG batch of 2 (uncond, cond), as diffusers does; with
//! guidance off (`guidance <= 1`) the conditional branch alone at batch 1.

use std::time::Instant;

use candle_core::Tensor;
use hybridiff_comm::Communicator;
use hybridiff_models::Conditioning;

use super::{conditional_step, StepOutput, Strategy, Worker};
use crate::{Error, Job, Result};

/// The single-device baseline.
pub struct Serial;

struct SerialWorker<'a> {
    job: &'a Job<'a>,
    cond: Conditioning,
}

impl Strategy for Serial {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn check(&self, _job: &Job, world_size: usize) -> Result<()> {
        if world_size != 1 {
            return Err(Error::Options(format!(
                "--world-size {world_size}: the serial strategy runs on 1 rank; use --strategy cfg, async, hybrid or patch for more"
            )));
        }
        Ok(())
    }

    fn worker<'a>(&'a self, job: &'a Job<'a>, _: usize, _: usize) -> Result<Box<dyn Worker + 'a>> {
        let cond = Conditioning::cat(&job.inputs.uncond, &job.inputs.cond)?;
        Ok(Box::new(SerialWorker { job, cond }))
    }
}

impl Worker for SerialWorker<'_> {
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
        let start = Instant::now();
        let batch = Tensor::cat(&[x, x], 0)?;
        let eps = self.job.model.forward(&batch, t, &self.cond)?;
        // A GPU runs queued kernels after the call returns: wait for them before the clock.
        eps.device().synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        StepOutput::exact(eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?, secs)
    }
}
