//! What makes the images: a [`Backend`] runs one image job at a time on the service's single
//! job thread, where it is also built (so it need not be `Send`). [`PipelineBackend`] is the
//! real one (a loaded pipeline on warm ranks); tests may plug in their own to script failures
//! and timings.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use hybridiff_engine::pipeline::{Pipeline, Request};
use hybridiff_engine::{Runner, Strategy};
use hybridiff_schedulers::SchedulerKind;

/// What the service tells clients about its model and how it runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendInfo {
    /// The id clients pass as `model` and see in `GET /v1/models`.
    pub model_id: String,
    /// Width and height in pixels when a request gives no `size`.
    pub default_size: (u32, u32),
    /// Width and height must be multiples of this (VAE factor x the denoiser's latent
    /// multiple).
    pub size_multiple: u32,
    /// Steps when a request gives no `num_inference_steps`.
    pub default_steps: usize,
    /// Guidance when a request gives no `guidance_scale`.
    pub default_guidance: f64,
    /// `serial`, `cfg`, `async` or `hybrid`.
    pub strategy: String,
    pub world_size: usize,
    pub threads_per_rank: usize,
}

/// One image to make (a request with `n` images is `n` jobs with seeds `seed`, `seed + 1`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageJob {
    pub prompt: String,
    /// `None`: not given (zero negative embeddings on SDXL with force_zeros_for_empty_prompt).
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// Pixels; already checked against the limits and [`BackendInfo::size_multiple`].
    pub width: u32,
    pub height: u32,
}

/// A made image.
#[derive(Debug, Clone)]
pub struct Image {
    /// The PNG file, byte for byte what `hybridiff generate` writes for the same job.
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Wall time of this image (text encoding, denoising, decoding, PNG).
    pub seconds: f64,
    /// Hybridiff's switching steps, when the strategy has them.
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
}

/// Why a job made no image.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The cancel flag was set (timeout, client gone).
    #[error("cancelled")]
    Cancelled,
    /// The job failed; the message names the cause (a rank error, NaN, ...).
    #[error("{0}")]
    Failed(String),
}

/// A backend's check of a request's job before it is queued: `Err` is the answer (400
/// naming the field, or 500). It runs on the HTTP side while the backend may be busy with
/// another job, so it is `Send + Sync` and quick (no compute, no wait for the job thread).
pub type RequestCheck = Arc<dyn Fn(&ImageJob) -> Result<(), crate::ApiError> + Send + Sync>;

/// Makes images, one at a time, on the service's job thread.
pub trait Backend {
    fn info(&self) -> &BackendInfo;

    /// What the service checks of a request (its first job: the others differ only in seed)
    /// before queueing it, so that a job this backend would refuse (e.g. a size that does not
    /// fit in memory) is answered 400 at once rather than 500 after its wait. Asked once,
    /// when the service starts. `None`: nothing beyond the service's limits.
    fn request_check(&self) -> Option<RequestCheck> {
        None
    }

    /// Makes one image. Calls `progress(steps done, total)` as it goes, and stops with
    /// [`BackendError::Cancelled`] soon after `cancel` is set.
    fn generate(
        &mut self,
        job: &ImageJob,
        progress: &(dyn Fn(usize, usize) + Sync),
        cancel: &AtomicBool,
    ) -> Result<Image, BackendError>;
}

/// Builds the strategy for a request's step count, with the thresholds that depend on it
/// (hybrid's) resolved for that count as `hybridiff generate --steps N` resolves them.
/// `Err` says why (naming the flags).
pub type StrategyFor = Box<dyn Fn(usize) -> Result<Box<dyn Strategy>, String> + Send>;

/// A pipeline loaded once, denoising on ranks started once.
pub struct PipelineBackend {
    pipeline: Pipeline,
    runner: Runner,
    strategy_for: StrategyFor,
    /// Built by `strategy_for`, by step count (at most `--max-steps` of them).
    strategies: HashMap<usize, Box<dyn Strategy>>,
    strategy_name: &'static str,
    /// The step cache every request runs with (`--cache`), for the memory check.
    cache: Option<hybridiff_engine::cache::CacheSpec>,
    scheduler: Option<SchedulerKind>,
    info: BackendInfo,
}

/// What a request that leaves fields out gets.
#[derive(Debug, Clone, Default)]
pub struct RequestDefaults {
    /// `num_inference_steps`.
    pub steps: usize,
    /// `guidance_scale`; `None` takes the pipeline's default.
    pub guidance: Option<f64>,
    /// `size` as (width, height); `None` takes the denoiser's sample size.
    pub size: Option<(u32, u32)>,
}

impl PipelineBackend {
    /// Serves `pipeline` with the strategies of `strategy_for` on `runner`'s ranks;
    /// `scheduler` `None` takes the model's.
    ///
    /// # Errors
    /// A request with the defaults would fail (the strategy does not fit the model or
    /// `--world-size`, the default size does not fit in memory, ...): the engine's
    /// message, so that the service does not start only to fail every request.
    pub fn new(
        model_id: String,
        pipeline: Pipeline,
        runner: Runner,
        strategy_for: StrategyFor,
        scheduler: Option<SchedulerKind>,
        defaults: RequestDefaults,
    ) -> Result<Self, String> {
        let f = pipeline.vae_factor();
        let multiple = (f * pipeline.model.input_spec.latent_multiple) as u32;
        let side = (pipeline.model.sample_size().unwrap_or(128) * f) as u32;
        let strategy = strategy_for(defaults.steps)?;
        let info = BackendInfo {
            model_id,
            default_size: defaults.size.unwrap_or((side, side)),
            size_multiple: multiple,
            default_steps: defaults.steps,
            default_guidance: defaults
                .guidance
                .unwrap_or_else(|| pipeline.default_guidance()),
            strategy: strategy.name().to_string(),
            world_size: runner.options().world_size,
            threads_per_rank: runner.options().threads_per_rank,
        };
        let default_request = Request {
            prompt: String::new(),
            negative_prompt: None,
            steps: info.default_steps,
            guidance: Some(info.default_guidance),
            scheduler,
            height: Some(info.default_size.1 as usize),
            width: Some(info.default_size.0 as usize),
            latents: None,
            seed: 0,
        };
        pipeline
            .check_request(&default_request, strategy.as_ref(), runner.options())
            .map_err(|e| format!("a request with the defaults would fail: {e}"))?;
        let strategy_name = strategy.name();
        let cache = strategy.cache().copied();
        Ok(Self {
            pipeline,
            runner,
            strategy_for,
            strategies: HashMap::from([(info.default_steps, strategy)]),
            strategy_name,
            cache,
            scheduler,
            info,
        })
    }
}

/// Encodes RGB8 as PNG the way `hybridiff generate` does (`image`'s default PNG encoder).
pub fn encode_png(width: u32, height: u32, rgb: Vec<u8>) -> Result<Vec<u8>, String> {
    let img = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| "image buffer does not match its size".to_string())?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| format!("PNG encoding failed: {e}"))?;
    Ok(bytes)
}

impl Backend for PipelineBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// The engine's memory estimate of the job (and its VAE decode) against the memory limit
    /// read now, when the service starts (weights resident, no job running), so that the
    /// answer does not depend on what a running job holds: a job that cannot fit is 400 on
    /// `size`, with the estimate and the limit. A job that fits then but not when it runs
    /// (the machine's memory went elsewhere) still fails at run time, 500.
    fn request_check(&self) -> Option<RequestCheck> {
        let limit = match hybridiff_engine::memory::limit() {
            Ok(l) => l,
            Err(e) => {
                // Loading the weights has read it already, so this does not happen; if it
                // did, every job would fail at run time with this message.
                tracing::warn!("no request check: {e}");
                return None;
            }
        };
        let memory = self.pipeline.memory_check();
        let strategy = self.strategy_name;
        let cache = self.cache;
        let world_size = self.runner.options().world_size;
        let scheduler = self.scheduler;
        Some(Arc::new(move |job: &ImageJob| {
            let req = Request {
                prompt: String::new(),
                negative_prompt: None,
                steps: job.steps,
                guidance: Some(job.guidance),
                scheduler,
                height: Some(job.height as usize),
                width: Some(job.width as usize),
                latents: None,
                seed: job.seed,
            };
            memory
                .check_within(&req, strategy, world_size, cache, limit)
                .map_err(|e| match e {
                    hybridiff_engine::Error::Memory(m) => crate::ApiError::bad_field(
                        "size",
                        format!("`size` {}x{}: {m}", job.width, job.height),
                    ),
                    e => crate::ApiError::internal(format!("cannot check the request: {e}")),
                })
        }))
    }

    fn generate(
        &mut self,
        job: &ImageJob,
        progress: &(dyn Fn(usize, usize) + Sync),
        cancel: &AtomicBool,
    ) -> Result<Image, BackendError> {
        let start = Instant::now();
        let req = Request {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            steps: job.steps,
            guidance: Some(job.guidance),
            scheduler: self.scheduler,
            height: Some(job.height as usize),
            width: Some(job.width as usize),
            latents: None,
            seed: job.seed,
        };
        if !self.strategies.contains_key(&job.steps) {
            let s = (self.strategy_for)(job.steps).map_err(BackendError::Failed)?;
            self.strategies.insert(job.steps, s);
        }
        let strategy: &dyn Strategy = self.strategies[&job.steps].as_ref();
        let img = self
            .pipeline
            .generate_on(&self.runner, &req, strategy, Some(progress), Some(cancel))
            .map_err(|e| match e {
                hybridiff_engine::Error::Cancelled => BackendError::Cancelled,
                e => BackendError::Failed(e.to_string()),
            })?;
        let (width, height) = (img.width, img.height);
        let png = encode_png(width, height, img.rgb).map_err(BackendError::Failed)?;
        Ok(Image {
            png,
            width,
            height,
            seconds: start.elapsed().as_secs_f64(),
            tau1: img.trace.tau1,
            tau2: img.trace.tau2,
        })
    }
}
