//! The denoising engine: model folders, job inputs and outputs, the per-rank sampling
//! loop and the parallel strategies that share its work.

pub mod bench;
pub mod error;
pub mod init;
pub mod io;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod runner;
pub mod sampler;
pub mod stages;
pub mod strategy;
pub mod switch;
pub mod trace;

use std::time::{Duration, Instant};

use candle_core::Tensor;
use hybridiff_comm::{Communicator, RunError, WarmRanks};
use hybridiff_models::Denoiser;
use hybridiff_schedulers::{SchedulerConfig, SchedulerKind};

pub use error::{Error, Result};
pub use io::DenoiseInputs;
pub use model::Model;
pub use runner::Runner;
pub use sampler::Sampler;
pub use strategy::{PipelinedGuidance, Strategy, StrategyKind, StrategyOptions};
pub use trace::{StepTrace, Trace};

/// Everything a rank needs to denoise one image.
pub struct Job<'a> {
    pub model: &'a dyn Denoiser,
    pub scheduler_config: &'a SchedulerConfig,
    pub scheduler: SchedulerKind,
    pub steps: usize,
    pub guidance: f64,
    pub inputs: &'a DenoiseInputs,
    /// Called on rank 0 after each step with (steps done, total).
    pub progress: Option<&'a (dyn Fn(usize, usize) + Sync)>,
}

/// How the ranks are laid out.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub world_size: usize,
    pub threads_per_rank: usize,
    /// The longest any rank waits for another before failing the job.
    pub comm_timeout: Duration,
}

/// The result of a denoising run.
#[derive(Debug, Clone)]
pub struct DenoiseOutput {
    /// Final latents, `[1, C, h, w]`.
    pub latents: Tensor,
    /// Latents after each step, `[T, C, h, w]`.
    pub step_latents: Tensor,
    pub trace: Trace,
}

/// Runs a whole denoising job with `strategy` on `opts.world_size` in-process ranks started
/// for this job (see [`Runner`] for ranks kept warm across jobs).
pub fn denoise(job: &Job, strategy: &dyn Strategy, opts: &RunOptions) -> Result<DenoiseOutput> {
    denoise_on(job, strategy, opts, None)
}

/// [`denoise`] on `warm` ranks when given (their layout must be `opts`), else on fresh ones.
pub(crate) fn denoise_on(
    job: &Job,
    strategy: &dyn Strategy,
    opts: &RunOptions,
    warm: Option<&WarmRanks>,
) -> Result<DenoiseOutput> {
    if job.steps == 0 {
        return Err(Error::Options("--steps must be at least 1".into()));
    }
    if opts.threads_per_rank == 0 {
        return Err(Error::Options(
            "--threads-per-rank must be at least 1".into(),
        ));
    }
    strategy.check(job, opts.world_size)?;
    let stage_plan = strategy.plan_summary(job, opts.world_size)?;
    let start = Instant::now();
    let body = |comm: &mut dyn Communicator| strategy::run_rank(strategy, job, comm);
    let results = match warm {
        Some(ranks) => ranks.run(body),
        None => hybridiff_comm::run_ranks(
            opts.world_size,
            opts.threads_per_rank,
            opts.comm_timeout,
            body,
        ),
    }
    .map_err(|e| match e {
        RunError::Failed { error, .. } if opts.world_size == 1 => error,
        RunError::Failed { rank, error } => Error::Options(format!("rank {rank}: {error}")),
        other => Error::Options(other.to_string()),
    })?;
    let total_seconds = start.elapsed().as_secs_f64();
    let rank0 = &results[0];
    let steps: Vec<StepTrace> = (0..job.steps)
        .map(|i| {
            let s = &rank0.steps[i];
            StepTrace {
                index: i,
                timestep: s.timestep,
                mode: s.mode,
                rel_mae: s.rel_mae,
                wall_seconds: s.wall_seconds,
                rank_compute_seconds: results.iter().map(|r| r.steps[i].compute_seconds).collect(),
                bytes_sent: results.iter().map(|r| r.steps[i].bytes_sent).sum::<u64>(),
                reference_bytes_sent: results.iter().map(|r| r.steps[i].bytes_sent).sum::<u64>()
                    + s.reference_extra_bytes,
                slope: s.slope,
                tau1: s.tau1,
                tau2: s.tau2,
            }
        })
        .collect();
    let trace = Trace {
        strategy: strategy.name().to_string(),
        world_size: opts.world_size,
        threads_per_rank: opts.threads_per_rank,
        scheduler: job.scheduler.to_string(),
        num_steps: job.steps,
        guidance: job.guidance,
        total_seconds,
        bytes_sent: steps.iter().map(|s| s.bytes_sent).sum(),
        reference_bytes_sent: steps.iter().map(|s| s.reference_bytes_sent).sum(),
        stage_plan,
        tau1: rank0.steps.last().and_then(|s| s.tau1),
        tau2: rank0.steps.last().and_then(|s| s.tau2),
        rel_mae_log: steps.iter().map(|s| s.rel_mae).collect(),
        steps,
    };
    let step_latents = Tensor::cat(&rank0.step_latents, 0)?;
    Ok(DenoiseOutput {
        latents: rank0.latents.clone(),
        step_latents,
        trace,
    })
}
