//! The denoising engine: model folders, job inputs and outputs, the per-rank sampling
//! loop and the parallel strategies that share its work.

pub mod bench;
pub mod error;
pub mod init;
pub mod io;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod sampler;
pub mod stages;
pub mod strategy;
pub mod switch;
pub mod trace;

use std::time::{Duration, Instant};

use candle_core::Tensor;
use hybridiff_comm::RunError;
use hybridiff_models::Denoiser;
use hybridiff_schedulers::{SchedulerConfig, SchedulerKind};

pub use error::{Error, Result};
pub use io::DenoiseInputs;
pub use model::Model;
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

impl Job<'_> {
    /// Whether classifier-free guidance is on: `guidance > 1`, diffusers'
    /// `do_classifier_free_guidance`. Off, each step is one conditional forward and the
    /// negative branch is never computed.
    pub fn cfg(&self) -> bool {
        self.guidance > 1.0
    }
}

/// The largest `|--guidance|` accepted: diffusers' pipelines are used with 0 to about 20,
/// and far larger values only overflow the latents.
pub const MAX_GUIDANCE: f64 = 1000.0;

/// Rejects a guidance scale that can only produce NaN or garbage, naming the flag.
pub fn check_guidance(guidance: f64) -> Result<()> {
    if !guidance.is_finite() || guidance.abs() > MAX_GUIDANCE {
        let shown = if guidance.abs() >= 1e6 {
            format!("{guidance:e}")
        } else {
            guidance.to_string()
        };
        return Err(Error::Options(format!(
            "--guidance {shown}: expected a finite number between -{MAX_GUIDANCE} and {MAX_GUIDANCE} (values above 1 turn classifier-free guidance on; diffusers' pipelines use about 1 to 20)"
        )));
    }
    Ok(())
}

/// How the ranks are laid out.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub world_size: usize,
    pub threads_per_rank: usize,
    /// The longest any rank waits for another before failing the job.
    pub comm_timeout: Duration,
}

/// Most ranks of one job.
pub const MAX_WORLD_SIZE: usize = 64;
/// Most in-process threads per core: beyond it more threads only add switching.
pub const MAX_THREADS_PER_CORE: usize = 4;
/// Longest `--comm-timeout` (a week).
pub const MAX_COMM_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// This machine's cores as the OS reports them (at least 1).
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl RunOptions {
    /// Refuses layouts that cannot run well on `cores` cores: ranks are threads of this
    /// process, so `--threads-per-rank` is at most the cores, `--world-size` at most
    /// [`MAX_WORLD_SIZE`], and all threads together at most [`MAX_THREADS_PER_CORE`] per
    /// core; `--comm-timeout` is 1 s to a week.
    pub fn check(&self, cores: usize) -> Result<()> {
        let (w, t) = (self.world_size, self.threads_per_rank);
        let opt = |m: String| Err(Error::Options(m));
        if w == 0 {
            return opt("--world-size must be at least 1".into());
        }
        if t == 0 {
            return opt("--threads-per-rank must be at least 1".into());
        }
        if t > cores {
            return opt(format!(
                "--threads-per-rank {t}: this machine has {cores} core(s); more threads per rank than cores only slows it down"
            ));
        }
        let max_world = MAX_WORLD_SIZE.min(MAX_THREADS_PER_CORE * cores);
        if w > max_world {
            return opt(format!(
                "--world-size {w}: at most {max_world} in-process ranks on {cores} core(s) ({MAX_THREADS_PER_CORE} threads per core, {MAX_WORLD_SIZE} ranks at most)"
            ));
        }
        if w * t > MAX_THREADS_PER_CORE * cores {
            return opt(format!(
                "--world-size {w} x --threads-per-rank {t} = {} threads: at most {} on {cores} core(s)",
                w * t,
                MAX_THREADS_PER_CORE * cores
            ));
        }
        if self.comm_timeout.is_zero() || self.comm_timeout > MAX_COMM_TIMEOUT {
            return opt(format!(
                "--comm-timeout {}: expected 1 to {} seconds",
                self.comm_timeout.as_secs_f64(),
                MAX_COMM_TIMEOUT.as_secs()
            ));
        }
        Ok(())
    }
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

/// Runs a whole denoising job with `strategy` on `opts.world_size` in-process ranks.
pub fn denoise(job: &Job, strategy: &dyn Strategy, opts: &RunOptions) -> Result<DenoiseOutput> {
    if job.steps == 0 {
        return Err(Error::Options("--steps must be at least 1".into()));
    }
    opts.check(cores())?;
    let ctx_len = job.inputs.cond.prompt_embeds.dim(1)?;
    memory::check_counts(job.steps, ctx_len)?;
    check_guidance(job.guidance)?;
    strategy.check(job, opts.world_size)?;
    let (_, c, h, w) = job.inputs.latents.dims4()?;
    let shape = memory::JobShape::for_strategy(
        strategy.name(),
        opts.world_size,
        (c, h, w),
        ctx_len,
        job.steps,
    );
    memory::estimate_job(job.model, &shape).check()?;
    let stage_plan = strategy.plan_summary(job, opts.world_size)?;
    let start = Instant::now();
    let results = hybridiff_comm::run_ranks(
        opts.world_size,
        opts.threads_per_rank,
        opts.comm_timeout,
        |comm| strategy::run_rank(strategy, job, comm),
    )
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
        classifier_free_guidance: job.cfg(),
        note: (!job.cfg()).then(|| strategy.without_cfg().to_string()),
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
