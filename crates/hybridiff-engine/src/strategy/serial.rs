//! `serial`: one rank runs the CFG batch of 2 (uncond, cond), as diffusers does.

use candle_core::Tensor;
use hybridiff_comm::Communicator;
use hybridiff_models::Conditioning;

use super::Strategy;
use crate::{Error, Job, Result};

/// The single-device baseline.
pub struct Serial;

impl Strategy for Serial {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn check(&self, world_size: usize) -> Result<()> {
        if world_size != 1 {
            return Err(Error::Options(format!(
                "--world-size {world_size}: the serial strategy runs on 1 rank; use --strategy cfg for 2 or 4"
            )));
        }
        Ok(())
    }

    fn predict(
        &self,
        job: &Job,
        _comm: &mut dyn Communicator,
        x: &Tensor,
        t: f64,
    ) -> Result<(Tensor, Tensor)> {
        let batch = Tensor::cat(&[x, x], 0)?;
        let cond = Conditioning::cat(&job.inputs.uncond, &job.inputs.cond)?;
        let eps = job.model.forward(&batch, t, &cond)?;
        Ok((eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?))
    }
}
