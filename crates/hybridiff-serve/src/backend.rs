//! What makes the images: a [`Backend`] runs one image job at a time on the service's single
//! job thread, where it is also built (so it need not be `Send`). [`PipelineBackend`] is the
//! real one (a loaded pipeline on warm ranks); tests may plug in their own to script failures
//! and timings.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use hybridiff_engine::pipeline::{NoiseKind, Pipeline, Request};
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
    /// What the model is (`diffusers folder`, `SDXL base single file (...)`).
    pub model_source: String,
    /// The LoRAs merged into it: file name (no folder: clients learn nothing of the
    /// server's files), scale, modules changed per component.
    pub loras: Vec<serde_json::Value>,
}

/// One image to make (a request with `n` images is `n` jobs with seeds `seed`, `seed + 1`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageJob {
    pub prompt: String,
    /// `None`: not given (zero negative embeddings on SDXL with force_zeros_for_empty_prompt).
    pub negative_prompt: Option<String>,
    pub seed: u64,
    /// The generator that draws the starting noise from `seed` (request field `noise`).
    pub noise: NoiseKind,
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
    /// before queueing it: every check the job would make of the values a request chooses
    /// (steps, size, guidance and any field added to [`ImageJob`]), so that a job this
    /// backend would refuse is answered 400 naming the field at once rather than 500 after
    /// its wait. Asked once, when the service starts; also used then to find the limits
    /// `GET /v1/models` reports. `None`: nothing beyond the service's limits.
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
/// Shared by the job thread and the request check, so `Send + Sync`; `Err` says why.
pub type StrategyFor =
    Arc<dyn Fn(usize) -> Result<Box<dyn Strategy>, hybridiff_engine::Error> + Send + Sync>;

/// The engine's request for `job` (the one conversion the job and its check share, so that
/// a field added to [`ImageJob`] reaches both).
fn engine_request(job: &ImageJob, scheduler: Option<SchedulerKind>) -> Request {
    Request {
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        steps: job.steps,
        guidance: Some(job.guidance),
        scheduler,
        height: Some(job.height as usize),
        width: Some(job.width as usize),
        latents: None,
        seed: job.seed,
        noise: job.noise,
    }
}

/// The answer to a job the engine refuses before running it: 400 naming the request field
/// (the engine's [`hybridiff_engine::Refusal`] in an API client's words), a job that cannot
/// fit in memory as 400 on `size`, anything else 400 with the engine's message.
pub fn refusal(e: &hybridiff_engine::Error, job: &ImageJob) -> crate::ApiError {
    use hybridiff_engine::Error as E;
    match e {
        E::Refused(r) => crate::ApiError::bad_field(r.field.param(), r.request.clone()),
        E::Memory(m) => {
            crate::ApiError::bad_field("size", format!("`size` {}x{}: {m}", job.width, job.height))
        }
        e => crate::ApiError::bad_request_code(
            format!("this service cannot run this request: {e}"),
            "unsupported_request",
        ),
    }
}

/// A pipeline loaded once, denoising on ranks started once.
pub struct PipelineBackend {
    pipeline: Pipeline,
    runner: Runner,
    strategy_for: StrategyFor,
    /// Built by `strategy_for`, by step count (at most `--max-steps` of them).
    strategies: HashMap<usize, Box<dyn Strategy>>,
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
        let strategy = strategy_for(defaults.steps).map_err(|e| e.to_string())?;
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
            model_source: String::new(),
            loras: Vec::new(),
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
            noise: NoiseKind::default(),
        };
        pipeline
            .check_request(&default_request, strategy.as_ref(), runner.options())
            .map_err(|e| format!("a request with the defaults would fail: {e}"))?;
        Ok(Self {
            pipeline,
            runner,
            strategy_for,
            strategies: HashMap::from([(info.default_steps, strategy)]),
            scheduler,
            info,
        })
    }
}

impl PipelineBackend {
    /// Says what the model is and which LoRAs it carries, for `GET /v1/models`.
    pub fn describe(mut self, model_source: String, loras: Vec<serde_json::Value>) -> Self {
        self.info.model_source = model_source;
        self.info.loras = loras;
        self
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

    /// The engine's checks of the job ([`hybridiff_engine::pipeline::RequestCheck`]: size,
    /// memory, the schedule, steps, guidance, the strategy built for the request's step
    /// count), the memory against the limit read now, when the service starts (weights
    /// resident, no job running), so that the answer does not depend on what a running job
    /// holds. A refusal is 400 naming the field in an API client's words. A job that fits
    /// then but not when it runs (the machine's memory went elsewhere) still fails at run
    /// time, 500.
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
        let check = match self.pipeline.request_check() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("no request check: {e}");
                return None;
            }
        };
        let strategy_for = Arc::clone(&self.strategy_for);
        let opts = self.runner.options().clone();
        let scheduler = self.scheduler;
        Some(Arc::new(move |job: &ImageJob| {
            let req = engine_request(job, scheduler);
            strategy_for(job.steps)
                .and_then(|s| check.check(&req, s.as_ref(), &opts, limit))
                .map_err(|e| refusal(&e, job))
        }))
    }

    fn generate(
        &mut self,
        job: &ImageJob,
        progress: &(dyn Fn(usize, usize) + Sync),
        cancel: &AtomicBool,
    ) -> Result<Image, BackendError> {
        let start = Instant::now();
        let req = engine_request(job, self.scheduler);
        if !self.strategies.contains_key(&job.steps) {
            let s =
                (self.strategy_for)(job.steps).map_err(|e| BackendError::Failed(e.to_string()))?;
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
