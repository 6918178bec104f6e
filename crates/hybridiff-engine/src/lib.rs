//! The denoising engine: model folders, job inputs and outputs, the per-rank sampling
//! loop and the parallel strategies that share its work.

pub mod bench;
pub mod cache;
pub mod device;
pub mod error;
pub mod init;
pub mod io;
pub mod latency;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod runner;
pub mod sampler;
pub mod source;
pub mod stages;
pub mod strategy;
pub mod switch;
pub mod torch_rng;
pub mod trace;
pub mod tune;
pub mod work;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use hybridiff_comm::{Communicator, RunError, WarmRanks};
use hybridiff_models::Denoiser;
use hybridiff_schedulers::{SchedulerConfig, SchedulerKind};

pub use error::{Error, Field, Refusal, Result};
pub use io::DenoiseInputs;
pub use model::Model;
pub use noise::{Noise, NoiseKind};
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
    /// Karras sigmas, guidance rescale and the step noise of stochastic samplers.
    pub sampling: SamplingOptions,
}

/// How a job samples beyond its scheduler kind, steps and guidance.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingOptions {
    /// `--karras`: Karras sigmas whatever the scheduler config says (refused for samplers
    /// whose diffusers class has none).
    pub karras: bool,
    /// `--guidance-rescale`: diffusers' `guidance_rescale` (Lin et al. 2023, "Common
    /// Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4), 0 (off) to 1.
    /// See [`sampler::rescale_noise_cfg`].
    pub guidance_rescale: f64,
    /// The image's random numbers: each stochastic step's noise comes from its seed and
    /// the step index alone (see [`noise`]).
    pub noise: Noise,
}

impl Job<'_> {
    /// Whether classifier-free guidance is on: `guidance > 1`, diffusers'
    /// `do_classifier_free_guidance`. Off, each step is one conditional forward and the
    /// negative branch is never computed.
    pub fn cfg(&self) -> bool {
        self.guidance > 1.0
    }

    /// The image's token count as the scheduler's dynamic shifting reads it:
    /// `(h / p) * (w / p)` for latents of `h x w` and the denoiser's patch size p (1 for a
    /// U-Net), as diffusers' SD3 pipeline computes it.
    pub fn image_seq_len(&self) -> Result<usize> {
        let (_, _, h, w) = self.inputs.latents.dims4()?;
        let p = self.model.patch_size().max(1);
        Ok((h / p) * (w / p))
    }

    /// The run's scheduler, built and checked (every rank builds its own from this).
    pub fn build_scheduler(&self) -> Result<Box<dyn hybridiff_schedulers::Scheduler>> {
        let opts = hybridiff_schedulers::ScheduleOptions {
            karras: self.sampling.karras,
            image_seq_len: Some(self.image_seq_len()?),
        };
        hybridiff_schedulers::build_with(self.scheduler_config, self.scheduler, self.steps, &opts)
            .map_err(|e| sampler::schedule_refusal(e, self.scheduler, self.steps))
    }
}

/// The largest `--guidance-rescale`: diffusers' `guidance_rescale` mixes the rescaled and
/// the plain guided prediction, `phi` in [0, 1] (the paper uses 0.7).
pub const MAX_GUIDANCE_RESCALE: f64 = 1.0;

/// Rejects a guidance rescale outside [0, 1] or not finite, naming the flag, and one that
/// a flow-matching sampler would be given (diffusers' SD3 pipeline has no
/// `guidance_rescale`: it is defined for epsilon / v-prediction models).
pub fn check_guidance_rescale(phi: f64, scheduler: Option<SchedulerKind>) -> Result<()> {
    if !(phi.is_finite() && (0.0..=MAX_GUIDANCE_RESCALE).contains(&phi)) {
        return Err(Error::refused(
            Field::GuidanceRescale,
            format!(
                "--guidance-rescale {phi}: expected a number from 0 (off) to {MAX_GUIDANCE_RESCALE} (diffusers' guidance_rescale; 0.7 in the paper)"
            ),
            format!(
                "`guidance_rescale` {phi}: expected a number from 0 (off) to {MAX_GUIDANCE_RESCALE}"
            ),
        ));
    }
    if let Some(kind) = scheduler {
        if phi > 0.0 && kind.family() == hybridiff_schedulers::Family::FlowMatching {
            return Err(Error::refused(
                Field::GuidanceRescale,
                format!(
                    "--guidance-rescale {phi} with the flow-matching sampler {kind}: diffusers' SD3 pipeline has no guidance_rescale (it rescales epsilon / v predictions, Lin et al. 2023); leave it at 0"
                ),
                format!(
                    "`guidance_rescale` {phi} with the flow-matching sampler {kind}: it rescales epsilon / v predictions only (diffusers' SD3 pipeline has none); leave it at 0"
                ),
            ));
        }
    }
    Ok(())
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
        return Err(Error::refused(
            Field::Guidance,
            format!(
                "--guidance {shown}: expected a finite number between -{MAX_GUIDANCE} and {MAX_GUIDANCE} (values above 1 turn classifier-free guidance on; diffusers' pipelines use about 1 to 20)"
            ),
            format!(
                "`guidance_scale` {shown}: expected a finite number between -{MAX_GUIDANCE} and {MAX_GUIDANCE} (values above 1 turn classifier-free guidance on; diffusers' pipelines use about 1 to 20)"
            ),
        ));
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
    /// Which device each in-process rank computes on (default: all on the job's device).
    pub placement: device::Placement,
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
    let stage_plan = check_job(job, strategy, opts, opts.world_size)?;
    let job_device = job.inputs.latents.device().clone();
    let start = Instant::now();
    let body = |comm: &mut dyn Communicator| {
        let (device, replica) = opts.placement.for_rank(comm.rank(), &job_device)?;
        let mut comm = device::DeviceComm::new(comm, device.clone());
        match replica {
            None => strategy::run_rank(strategy, job, &mut comm),
            Some(model) => {
                // This rank's own copy of the model and inputs, on its device.
                let inputs = job.inputs.to_device(&device)?;
                let here = Job {
                    model: model.as_ref(),
                    inputs: &inputs,
                    ..*job
                };
                strategy::run_rank(strategy, &here, &mut comm)
            }
        }
    };
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
    let per_rank: Vec<Vec<RankCost>> = results
        .iter()
        .map(|r| r.steps.iter().map(RankCost::of).collect())
        .collect();
    let rank0 = results
        .into_iter()
        .next()
        .ok_or_else(|| Error::Options("--world-size must be at least 1".into()))?;
    assemble(
        job,
        strategy,
        opts,
        stage_plan,
        total_seconds,
        rank0,
        &RankRecords {
            costs: per_rank,
            devices: None,
        },
    )
}

/// Runs this process's rank of a job whose ranks are separate processes joined by `comm` (one
/// rank per process, e.g. started by `mpirun`). Every process calls it with the same job,
/// strategy and options; `opts.world_size` must equal `comm.world_size()`.
///
/// The rank computes on a rayon pool of `opts.threads_per_rank` threads, as an in-process rank
/// does. Returns `Some(output)` on rank 0 and `None` elsewhere: rank 0's trace holds every
/// rank's per-step compute seconds and bytes (gathered over `comm` after the last step, so the
/// gathering counts in no step), which makes trace, bytes and latents those of [`denoise`].
///
/// # Errors
/// Before any compute, the checks of [`denoise`], and an error if the ranks disagree on the job
/// (flags, input shapes or stage plan; `--stages measured` times each process separately, so it
/// cannot be used across processes). If this rank fails or panics, `comm` is aborted, so that
/// the other ranks stop at their next wait with an error naming this rank, and the error is
/// returned naming this rank; a rank stopped by another's abort returns that
/// [`hybridiff_comm::Error::Aborted`].
pub fn denoise_rank(
    job: &Job,
    strategy: &dyn Strategy,
    opts: &RunOptions,
    comm: &mut dyn hybridiff_comm::Communicator,
) -> Result<Option<DenoiseOutput>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let checked = check_job(job, strategy, opts, 1).and_then(|plan| {
        if world != opts.world_size {
            return Err(Error::Options(format!(
                "--world-size {}: this job has {world} processes; give {world} or leave it out",
                opts.world_size
            )));
        }
        Ok(plan)
    });
    let stage_plan = match checked {
        Ok(plan) => plan,
        Err(e) => {
            // Usually every rank fails the same check; if only this one does, the others
            // must not wait for it until the timeout.
            comm.abort(&format!("rank {rank}: {e}"));
            return Err(e);
        }
    };
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads_per_rank)
        .thread_name(move |i| format!("hybridiff-rank-{rank}-worker-{i}"))
        .build()
    {
        Ok(pool) => pool,
        Err(e) => {
            let msg = format!(
                "rank {rank}: could not build its pool of {} threads: {e}",
                opts.threads_per_rank
            );
            comm.abort(&msg);
            return Err(Error::Options(msg));
        }
    };
    let comm_ref = &mut *comm;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        pool.install(|| -> Result<_> {
            agree_on_job(job, strategy, opts, stage_plan.as_ref(), comm_ref)?;
            // Processes start at different times (model loading); time the run from here.
            comm_ref.barrier()?;
            let start = Instant::now();
            let device = job.inputs.latents.device().clone();
            let out = strategy::run_rank(
                strategy,
                job,
                &mut device::DeviceComm::new(&mut *comm_ref, device),
            )?;
            let per_rank = gather_steps(comm_ref, &out.steps)?;
            let devices = gather_devices(comm_ref, job.inputs.latents.device())?;
            Ok((out, (per_rank, devices), start.elapsed().as_secs_f64()))
        })
    }));
    let failure = match outcome {
        Ok(Ok((out, (per_rank, devices), total_seconds))) => {
            return if rank == 0 {
                assemble(
                    job,
                    strategy,
                    opts,
                    stage_plan,
                    total_seconds,
                    out,
                    &RankRecords {
                        costs: per_rank,
                        devices: Some(devices),
                    },
                )
                .map(Some)
            } else {
                Ok(None)
            };
        }
        Ok(Err(Error::Comm(e))) if e.is_aborted() => return Err(Error::Comm(e)),
        Ok(Err(e)) => format!("rank {rank}: {e}"),
        Err(payload) => format!(
            "rank {rank} panicked: {} (a bug; run with RUST_BACKTRACE=1 for where)",
            hybridiff_comm::panic_message(payload.as_ref())
        ),
    };
    comm.abort(&failure);
    Err(Error::Options(failure))
}

/// The checks both runners make before any compute; returns the stage plan's summary.
fn check_job(
    job: &Job,
    strategy: &dyn Strategy,
    opts: &RunOptions,
    local_ranks: usize,
) -> Result<Option<serde_json::Value>> {
    let limit = memory::limit().map_err(Error::Options)?;
    check_job_within(job, strategy, opts, local_ranks, limit)?;
    strategy.plan_summary(job, opts.world_size)
}

/// What a job is checked for before any compute: its step count, the rank layout on this
/// machine (`local_ranks` of them here), guidance, the strategy's own checks (world size,
/// thresholds, layout for the latent size) and the estimated memory against `limit` (read
/// earlier; `None`: no limit). It only reads the inputs' shapes and plans nothing that needs
/// compute, so a service runs it on stand-in inputs of a request's shapes before queueing
/// the request ([`pipeline::RequestCheck`]); values a request chooses are refused as
/// [`Error::Refused`].
pub fn check_job_within(
    job: &Job,
    strategy: &dyn Strategy,
    opts: &RunOptions,
    local_ranks: usize,
    limit: Option<memory::Limit>,
) -> Result<()> {
    if job.steps == 0 {
        return Err(Error::refused(
            Field::Steps,
            "--steps must be at least 1",
            "`num_inference_steps` must be at least 1",
        ));
    }
    // The ranks on this machine share its cores and memory: all of them as threads, one
    // per process under MPI (the launcher places the others).
    RunOptions {
        world_size: local_ranks,
        ..opts.clone()
    }
    .check(cores())?;
    let ctx_len = job.inputs.cond.prompt_embeds.dim(1)?;
    memory::check_counts(job.steps, ctx_len)?;
    check_guidance(job.guidance)?;
    check_guidance_rescale(job.sampling.guidance_rescale, Some(job.scheduler))?;
    job.build_scheduler()?;
    strategy.check(job, opts.world_size)?;
    let (_, c, h, w) = job.inputs.latents.dims4()?;
    let shape =
        memory::JobShape::for_strategy(strategy.name(), local_ranks, (c, h, w), ctx_len, job.steps)
            .with_cache(strategy.cache().copied());
    memory::estimate_job(job.model, &shape).check_within(limit)
}

/// Fails on every rank whose view of the job differs from rank 0's: processes read their own
/// flags and files, and ranks that disagree would otherwise exchange mismatched tensors.
fn agree_on_job(
    job: &Job,
    strategy: &dyn Strategy,
    opts: &RunOptions,
    stage_plan: Option<&serde_json::Value>,
    comm: &mut dyn hybridiff_comm::Communicator,
) -> Result<()> {
    let mine = format!(
        "strategy {} | world {} | steps {} | guidance {} | scheduler {} | sampling {:?} | latents {:?} {:?} | stages {} | cache {}",
        strategy.name(),
        opts.world_size,
        job.steps,
        job.guidance,
        job.scheduler,
        job.sampling,
        job.inputs.latents.dims(),
        job.inputs.latents.dtype(),
        stage_plan.map(|p| p.to_string()).unwrap_or_default(),
        strategy
            .cache()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".into()),
    );
    let bytes = Tensor::new(mine.as_bytes(), &candle_core::Device::Cpu)?;
    let root = comm.broadcast((comm.rank() == 0).then_some(&bytes), 0)?;
    let theirs = String::from_utf8_lossy(&root.to_vec1::<u8>()?).into_owned();
    if theirs != mine {
        return Err(Error::Options(format!(
            "this process's job differs from rank 0's: every process needs the same flags and \
             inputs (and `--stages measured` times each process separately: use auto or \
             reference across processes).\n  rank 0: {theirs}\n  here:   {mine}"
        )));
    }
    Ok(())
}

/// What every rank reported: per-step costs and, when ranks are processes, each one's device
/// (in-process ranks' devices come from the placement).
struct RankRecords {
    costs: Vec<Vec<RankCost>>,
    devices: Option<Vec<device::RankDevice>>,
}

/// Every process's device (one rank per process), index = rank.
fn gather_devices(
    comm: &mut dyn hybridiff_comm::Communicator,
    mine: &candle_core::Device,
) -> Result<Vec<device::RankDevice>> {
    let code = match device::RankDevice::of(mine) {
        device::RankDevice::Cpu => -1i64,
        device::RankDevice::Cuda(n) => n as i64,
    };
    let all = comm.all_gather(&Tensor::new(&[code], &candle_core::Device::Cpu)?)?;
    all.iter()
        .map(|t| {
            let v = t.to_vec1::<i64>()?;
            Ok(match v.first() {
                Some(&n) if n >= 0 => device::RankDevice::Cuda(n as usize),
                _ => device::RankDevice::Cpu,
            })
        })
        .collect()
}

/// What one rank spent in one step: compute seconds, bytes and messages sent, and the
/// part of those that may overlap compute.
#[derive(Debug, Clone, Copy)]
struct RankCost {
    compute_seconds: f64,
    flops: f64,
    bytes: u64,
    messages: u64,
    overlapped: strategy::Sent,
    /// Sample-forwards computed and saved by the step cache.
    forwards: f64,
    saved: f64,
}

impl RankCost {
    fn of(s: &strategy::RankStep) -> Self {
        Self {
            compute_seconds: s.compute_seconds,
            flops: s.flops,
            bytes: s.bytes_sent,
            messages: s.messages_sent,
            overlapped: s.overlapped,
            forwards: s.cache.forwards,
            saved: s.cache.saved,
        }
    }
}

/// Every rank's per-step costs, index = rank.
fn gather_steps(
    comm: &mut dyn hybridiff_comm::Communicator,
    steps: &[strategy::RankStep],
) -> Result<Vec<Vec<RankCost>>> {
    let dev = candle_core::Device::Cpu;
    // Per step: compute seconds, FLOPs, forwards computed and forwards saved.
    let secs: Vec<f64> = steps
        .iter()
        .flat_map(|s| [s.compute_seconds, s.flops, s.cache.forwards, s.cache.saved])
        .collect();
    // i64 carries any count a step can have (< 2^63): bytes, messages, overlapped bytes
    // and messages, step after step.
    let counts: Vec<i64> = steps
        .iter()
        .flat_map(|s| {
            [
                s.bytes_sent,
                s.messages_sent,
                s.overlapped.bytes,
                s.overlapped.messages,
            ]
        })
        .map(|v| v as i64)
        .collect();
    let secs = comm.all_gather(&Tensor::new(secs.as_slice(), &dev)?)?;
    let counts = comm.all_gather(&Tensor::new(counts.as_slice(), &dev)?)?;
    secs.iter()
        .zip(&counts)
        .map(|(s, c)| {
            let (s, c) = (s.to_vec1::<f64>()?, c.to_vec1::<i64>()?);
            if s.len() != 4 * steps.len() || c.len() != 4 * steps.len() {
                return Err(Error::Options(format!(
                    "a rank reported {} steps, expected {}",
                    s.len(),
                    steps.len()
                )));
            }
            Ok(s.chunks(4)
                .zip(c.chunks(4))
                .map(|(s, c)| RankCost {
                    compute_seconds: s[0],
                    flops: s[1],
                    bytes: c[0] as u64,
                    messages: c[1] as u64,
                    overlapped: strategy::Sent {
                        bytes: c[2] as u64,
                        messages: c[3] as u64,
                    },
                    forwards: s[2],
                    saved: s[3],
                })
                .collect())
        })
        .collect()
}

/// The run's output from rank 0's record and every rank's `(compute seconds, bytes)` per step.
fn assemble(
    job: &Job,
    strategy: &dyn Strategy,
    opts: &RunOptions,
    stage_plan: Option<serde_json::Value>,
    total_seconds: f64,
    rank0: strategy::RankOutput,
    ranks: &RankRecords,
) -> Result<DenoiseOutput> {
    let per_rank = &ranks.costs;
    let names = job.model.module_names();
    let job_device = job.inputs.latents.device();
    let rank_devices: Vec<device::RankDevice> = ranks.devices.clone().unwrap_or_else(|| {
        (0..opts.world_size)
            .map(|r| opts.placement.label(r, job_device))
            .collect()
    });
    let steps: Vec<StepTrace> = (0..job.steps)
        .map(|i| {
            let s = &rank0.steps[i];
            let bytes_sent = per_rank.iter().map(|r| r[i].bytes).sum::<u64>();
            StepTrace {
                index: i,
                timestep: s.timestep,
                mode: s.mode,
                rel_mae: s.rel_mae,
                wall_seconds: s.wall_seconds,
                rank_compute_seconds: per_rank.iter().map(|r| r[i].compute_seconds).collect(),
                rank_flops: per_rank.iter().map(|r| r[i].flops).collect(),
                chain_groups: s.chain_groups,
                bytes_sent,
                rank_bytes_sent: per_rank.iter().map(|r| r[i].bytes).collect(),
                rank_messages_sent: per_rank.iter().map(|r| r[i].messages).collect(),
                rank_overlapped_bytes: per_rank.iter().map(|r| r[i].overlapped.bytes).collect(),
                rank_overlapped_messages: per_rank
                    .iter()
                    .map(|r| r[i].overlapped.messages)
                    .collect(),
                reference_bytes_sent: bytes_sent + s.reference_extra_bytes,
                slope: s.slope,
                tau1: s.tau1,
                tau2: s.tau2,
                forwards: per_rank.iter().fold(0.0, |a, r| a + r[i].forwards),
                cache: strategy.cache().map(|_| trace::StepCacheTrace {
                    decision: if s.cache.cached { "cached" } else { "computed" }.into(),
                    cached_modules: s
                        .cache
                        .served
                        .iter()
                        .map(|&m| names.get(m).cloned().unwrap_or_default())
                        .collect(),
                    forwards_saved: per_rank.iter().fold(0.0, |a, r| a + r[i].saved),
                    signal: s.cache.signal,
                }),
            }
        })
        .collect();
    let trace = Trace {
        strategy: strategy.name().to_string(),
        world_size: opts.world_size,
        threads_per_rank: opts.threads_per_rank,
        rank_devices: rank_devices.iter().map(|d| d.to_string()).collect(),
        transfer: device::transfer(&rank_devices).to_string(),
        scheduler: job.scheduler.to_string(),
        karras: job.sampling.karras,
        guidance_rescale: job.sampling.guidance_rescale,
        noise_seed: job
            .scheduler
            .is_stochastic()
            .then_some(job.sampling.noise.seed),
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
        cache: strategy.cache().map(|c| c.to_string()),
        forwards: steps.iter().fold(0.0, |a, s| a + s.forwards),
        forwards_saved: steps
            .iter()
            .filter_map(|s| s.cache.as_ref())
            .fold(0.0, |a, c| a + c.forwards_saved),
        cached_steps: steps.iter().filter(|s| s.cached()).count(),
        steps,
    };
    let step_latents = Tensor::cat(&rank0.step_latents, 0)?;
    Ok(DenoiseOutput {
        latents: rank0.latents.clone(),
        step_latents,
        trace,
    })
}
