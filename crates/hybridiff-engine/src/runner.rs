//! The warm-rank job runner: ranks started once, then given one denoising job at a time.
//!
//! [`crate::denoise`] starts `world_size` threads (and a rayon pool per rank) for every
//! job. A service, or a batch of prompts, keeps them instead: [`Runner::start`] starts the
//! ranks, and [`Runner::denoise`] runs each job on them with the same result as
//! [`crate::denoise`] and the same failure rules (a failing rank aborts the job with the
//! root cause). After a failed job the runner serves the next one: each job gets a fresh
//! communicator group (no threads), so an aborted group is never reused.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use hybridiff_comm::WarmRanks;
use hybridiff_models::{Conditioning, Denoiser, OutputRef, State};

use crate::{denoise_on, DenoiseOutput, Error, Job, Result, RunOptions, Strategy};

/// Ranks kept warm for denoising jobs; one job at a time (callers on several threads
/// queue on an internal lock).
#[derive(Debug)]
pub struct Runner {
    ranks: WarmRanks,
    opts: RunOptions,
    /// Every core the ranks compute on, for the work of an image outside its job (the VAE
    /// decode), when the ranks wait.
    host: rayon::ThreadPool,
}

impl Runner {
    /// Starts `opts.world_size` rank threads with `opts.threads_per_rank` compute threads
    /// each; `opts.comm_timeout` bounds every wait of every job.
    ///
    /// Errors: a world size or thread count of 0 ([`Error::Options`] naming the flag), or
    /// threads the OS refused.
    pub fn start(opts: RunOptions) -> Result<Self> {
        if opts.world_size == 0 {
            return Err(Error::Options("--world-size must be at least 1".into()));
        }
        if opts.threads_per_rank == 0 {
            return Err(Error::Options(
                "--threads-per-rank must be at least 1".into(),
            ));
        }
        let ranks = WarmRanks::start(opts.world_size, opts.threads_per_rank, opts.comm_timeout)
            .map_err(|e| Error::Options(e.to_string()))?;
        let host = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.world_size.saturating_mul(opts.threads_per_rank))
            .thread_name(|i| format!("hybridiff-host-{i}"))
            .build()
            .map_err(|e| Error::Options(format!("could not start the host threads: {e}")))?;
        Ok(Self { ranks, opts, host })
    }

    /// A pool of as many threads as the ranks compute with (world size x threads per
    /// rank), for an image's work outside its denoising job while the ranks wait: the VAE
    /// decode runs there ([`crate::pipeline::Pipeline::generate_on`]), its convolutions
    /// split over every core the job used (the same values as on one thread: their bands
    /// do not depend on the thread count).
    pub fn host_pool(&self) -> &rayon::ThreadPool {
        &self.host
    }

    /// The layout the ranks were started with.
    pub fn options(&self) -> &RunOptions {
        &self.opts
    }

    /// Runs one denoising job on the warm ranks; see [`crate::denoise`] for the result and
    /// the errors.
    ///
    /// With `cancel`, every rank checks the flag before each denoiser module (band forwards
    /// included), so setting it
    /// stops the job within one module's time with [`Error::Cancelled`] (a service uses it
    /// for requests that timed out or whose client left).
    pub fn denoise(
        &self,
        job: &Job,
        strategy: &dyn Strategy,
        cancel: Option<&AtomicBool>,
    ) -> Result<DenoiseOutput> {
        let Some(flag) = cancel else {
            return denoise_on(job, strategy, &self.opts, Some(&self.ranks));
        };
        let model = Cancellable {
            inner: job.model,
            cancel: flag,
        };
        let job = Job {
            model: &model,
            scheduler_config: job.scheduler_config,
            scheduler: job.scheduler,
            steps: job.steps,
            guidance: job.guidance,
            inputs: job.inputs,
            progress: job.progress,
            sampling: job.sampling,
        };
        let out = denoise_on(&job, strategy, &self.opts, Some(&self.ranks));
        if out.is_err() && flag.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        out
    }
}

/// A denoiser that fails its next module once `cancel` is set; otherwise the inner one.
struct Cancellable<'a> {
    inner: &'a dyn Denoiser,
    cancel: &'a AtomicBool,
}

impl Denoiser for Cancellable<'_> {
    fn module_names(&self) -> &[String] {
        self.inner.module_names()
    }
    fn module_flops(&self, h: usize, w: usize) -> Vec<f64> {
        self.inner.module_flops(h, w)
    }
    fn module_output_count(&self, idx: usize) -> usize {
        self.inner.module_output_count(idx)
    }
    fn module_reads(&self, idx: usize) -> Vec<OutputRef> {
        self.inner.module_reads(idx)
    }
    fn begin(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<State> {
        self.inner.begin(sample, timestep, cond)
    }
    fn run_module(&self, idx: usize, state: &State) -> hybridiff_models::Result<Vec<Tensor>> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(hybridiff_models::Error::Input("job cancelled".into()));
        }
        self.inner.run_module(idx, state)
    }
    fn apply_module(
        &self,
        idx: usize,
        state: &mut State,
        output: Vec<Tensor>,
    ) -> hybridiff_models::Result<()> {
        self.inner.apply_module(idx, state, output)
    }
    fn end(&self, state: State) -> hybridiff_models::Result<Tensor> {
        self.inner.end(state)
    }
    // Everything else the inner model overrides must be forwarded too, or the trait's
    // defaults answer instead ("does not support patch parallelism", no memory estimate).
    fn forward_memory(
        &self,
        batch: usize,
        hw: (usize, usize),
        ctx_len: usize,
    ) -> Option<hybridiff_models::memory::ForwardMemory> {
        self.inner.forward_memory(batch, hw, ctx_len)
    }
    fn patch_size(&self) -> usize {
        self.inner.patch_size()
    }

    fn patch_alignment(&self) -> Option<(usize, usize)> {
        self.inner.patch_alignment()
    }
    fn band_dim(&self, idx: usize, index: usize) -> Option<usize> {
        self.inner.band_dim(idx, index)
    }
    fn begin_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        band: hybridiff_models::Band,
    ) -> hybridiff_models::Result<State> {
        self.inner.begin_patch(sample, timestep, cond, band)
    }
    fn run_module_patch(
        &self,
        idx: usize,
        state: &State,
        patch: &hybridiff_models::patch::Patch,
    ) -> hybridiff_models::Result<Vec<Tensor>> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(hybridiff_models::Error::Input("job cancelled".into()));
        }
        self.inner.run_module_patch(idx, state, patch)
    }
    fn modulated_input(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<Option<Tensor>> {
        self.inner.modulated_input(sample, timestep, cond)
    }
}
