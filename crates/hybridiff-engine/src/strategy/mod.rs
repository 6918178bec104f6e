//! Parallel strategies: how the ranks of a job share the work of each denoising step.
//! One file each; every strategy runs the same per-rank [`Sampler`] loop and differs in
//! how a step's two CFG predictions are obtained.

pub mod cfg;
pub mod serial;

use std::str::FromStr;
use std::time::Instant;

use candle_core::Tensor;
use hybridiff_comm::Communicator;

use crate::trace::StepMode;
use crate::{Error, Job, Result, Sampler};

/// The strategies `hybridiff denoise --strategy` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    /// One rank, the CFG batch of 2.
    Serial,
    /// Condition-based partitioning: uncond and cond branches on different ranks.
    Cfg,
}

impl FromStr for StrategyKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "serial" => Ok(Self::Serial),
            "cfg" => Ok(Self::Cfg),
            other => Err(Error::Options(format!(
                "--strategy: unknown strategy `{other}`; expected serial or cfg"
            ))),
        }
    }
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Serial => "serial",
            Self::Cfg => "cfg",
        })
    }
}

impl StrategyKind {
    /// The strategy's implementation.
    pub fn build(self) -> Box<dyn Strategy> {
        match self {
            Self::Serial => Box::new(serial::Serial),
            Self::Cfg => Box::new(cfg::CfgSplit),
        }
    }
}

/// What one rank measured in one step.
#[derive(Debug, Clone)]
pub struct RankStep {
    pub timestep: f64,
    pub mode: StepMode,
    pub rel_mae: f64,
    pub compute_seconds: f64,
    pub wall_seconds: f64,
    pub bytes_sent: u64,
}

/// What one rank returns from a run.
#[derive(Debug, Clone)]
pub struct RankOutput {
    pub latents: Tensor,
    pub step_latents: Vec<Tensor>,
    pub steps: Vec<RankStep>,
}

/// A way of sharing each step's work among ranks.
pub trait Strategy: Sync {
    /// The name used on the command line and in traces.
    fn name(&self) -> &'static str;
    /// Rejects world sizes the strategy cannot use, before any compute.
    fn check(&self, world_size: usize) -> Result<()>;
    /// Obtains step `i`'s unconditional and conditional predictions on this rank, given
    /// the denoiser input `x` and timestep `t`. Every rank must return the same pair.
    fn predict(
        &self,
        job: &Job,
        comm: &mut dyn Communicator,
        x: &Tensor,
        t: f64,
    ) -> Result<(Tensor, Tensor)>;
}

/// Runs the sampling loop on one rank with `strategy` providing the predictions.
pub fn run_rank(
    strategy: &dyn Strategy,
    job: &Job,
    comm: &mut dyn Communicator,
) -> Result<RankOutput> {
    let mut sampler = Sampler::new(job)?;
    let mut steps = Vec::with_capacity(job.steps);
    let mut step_latents = Vec::with_capacity(job.steps);
    for i in 0..job.steps {
        let start = Instant::now();
        let bytes0 = comm.bytes_sent();
        let x = sampler.model_input(i)?;
        let t = sampler.timestep(i);
        let compute = Instant::now();
        let (eps_u, eps_c) = strategy.predict(job, comm, &x, t)?;
        let compute_seconds = compute.elapsed().as_secs_f64();
        let rel_mae = crate::sampler::rel_mae(&eps_u, &eps_c)?;
        sampler.step_guided(i, &eps_u, &eps_c)?;
        step_latents.push(sampler.latents.clone());
        steps.push(RankStep {
            timestep: t,
            mode: StepMode::Exact,
            rel_mae,
            compute_seconds,
            wall_seconds: start.elapsed().as_secs_f64(),
            bytes_sent: comm.bytes_sent() - bytes0,
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
