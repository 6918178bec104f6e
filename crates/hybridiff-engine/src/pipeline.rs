//! Text to image: a diffusers pipeline folder (`model_index.json`), prompts in, an RGB
//! image out, through any strategy.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::vae::{to_rgb8, PipelineVae};
use hybridiff_models::Conditioning;
use hybridiff_schedulers::SchedulerKind;
use hybridiff_text::{PipelineKind, PromptEncoder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{
    denoise, DenoiseInputs, Error, Job, Model, Result, RunOptions, Runner, Strategy, Trace,
};

/// A loaded text-to-image pipeline.
pub struct Pipeline {
    pub model: Model,
    pub text: PromptEncoder,
    pub vae: PipelineVae,
}

/// A pipeline's memory check without the pipeline: see [`Pipeline::memory_check`].
#[derive(Clone)]
pub struct MemoryCheck {
    denoiser: std::sync::Arc<dyn hybridiff_models::Denoiser>,
    vae: hybridiff_models::vae::VaeConfig,
    latent_channels: usize,
    vae_factor: usize,
    /// Pixels per side when a request gives no size.
    default_side: usize,
}

impl MemoryCheck {
    /// Refuses `req` (its size and steps) run by the strategy named `strategy` on
    /// `world_size` ranks with step cache `cache` when its job or its VAE decode is
    /// estimated not to fit in the memory limit ([`Error::Memory`], naming the estimate and
    /// the limit). The text length is taken at its upper bound (512 tokens), as the prompts
    /// are not encoded yet.
    pub fn check(
        &self,
        req: &Request,
        strategy: &str,
        world_size: usize,
        cache: Option<crate::cache::CacheSpec>,
    ) -> Result<()> {
        let limit = crate::memory::limit().map_err(Error::Options)?;
        self.check_within(req, strategy, world_size, cache, limit)
    }

    /// [`MemoryCheck::check`] against a limit read earlier (`None`: no limit), e.g. when a
    /// service started, so that a request's answer does not depend on what a running job
    /// holds at the time.
    pub fn check_within(
        &self,
        req: &Request,
        strategy: &str,
        world_size: usize,
        cache: Option<crate::cache::CacheSpec>,
        limit: Option<crate::memory::Limit>,
    ) -> Result<()> {
        let f = self.vae_factor;
        let (h, w) = (
            req.height.unwrap_or(self.default_side),
            req.width.unwrap_or(self.default_side),
        );
        let (lh, lw) = (h.div_ceil(f), w.div_ceil(f));
        crate::memory::check_counts(req.steps, 77)?;
        let shape = crate::memory::JobShape::for_strategy(
            strategy,
            world_size,
            (self.latent_channels, lh, lw),
            512,
            req.steps,
        )
        .with_cache(cache);
        crate::memory::estimate_job(self.denoiser.as_ref(), &shape).check_within(limit)?;
        crate::memory::estimate_decode(&self.vae, (lh, lw)).check_within(limit)
    }
}

/// One image to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// `None` is diffusers' default: zero negative embeddings on SDXL pipelines with
    /// `force_zeros_for_empty_prompt`, the empty string elsewhere. `Some("")` is encoded.
    pub negative_prompt: Option<String>,
    pub steps: usize,
    /// Guidance scale; `None` takes the pipeline's default (SD3 7.0, others 5.0).
    pub guidance: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    /// Pixel size; `None` takes the size of `latents` when given, else the denoiser's
    /// `sample_size`, times the VAE factor.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Starting noise: given latents, or drawn from `seed` (see [`seeded_latents`]).
    pub latents: Option<Tensor>,
    pub seed: u64,
}

/// A made image.
pub struct Generated {
    pub width: u32,
    pub height: u32,
    /// RGB8, row-major.
    pub rgb: Vec<u8>,
    pub trace: Trace,
}

/// The starting noise for `seed`: standard-normal values from `ChaCha8Rng::seed_from_u64(seed)`
/// (rand_distr's `StandardNormal`), filling `[1, C, h, w]` in row-major order. The same
/// seed gives the same latents on every machine and for every strategy.
pub fn seeded_latents(seed: u64, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
    let (c, h, w) = shape;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..c * h * w)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, (1, c, h, w), device)?)
}

impl Pipeline {
    /// Loads the text encoders, the denoiser, the scheduler config and the VAE.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.join("model_index.json").is_file() {
            return Err(Error::io(
                dir,
                "not a diffusers pipeline folder: model_index.json is missing (for a bare denoiser folder use `hybridiff denoise`)",
            ));
        }
        let text = PromptEncoder::load(dir, dtype, device)?;
        let model = Model::load(dir, dtype, device)?;
        let vae = model.load_vae()?;
        Ok(Self { model, text, vae })
    }

    /// Pixels per latent pixel.
    pub fn vae_factor(&self) -> usize {
        self.model.input_spec.vae_factor
    }

    /// The default guidance of the pipeline family.
    pub fn default_guidance(&self) -> f64 {
        match self.text.kind() {
            PipelineKind::StableDiffusion3 => 7.0,
            _ => 5.0,
        }
    }

    /// Refuses text embeddings whose widths are not what the denoiser takes: the folder's
    /// components do not belong together (e.g. a text encoder missing from
    /// `model_index.json`), and the denoiser would fail on a bare shape mismatch.
    fn check_text_widths(&self, e: &hybridiff_text::EncodedPrompts) -> Result<()> {
        let spec = &self.model.input_spec;
        let width = e.prompt_embeds.dims().last().copied().unwrap_or(0);
        let pooled = e
            .pooled_prompt_embeds
            .as_ref()
            .and_then(|p| p.dims().last().copied());
        let pooled_ok = match (spec.pooled_dim, pooled) {
            (Some(want), Some(got)) => want == got,
            (Some(_), None) => false,
            (None, _) => true,
        };
        if width != spec.context_dim || !pooled_ok {
            return Err(Error::Input(format!(
                "{}: the text encoders give {width}-wide embeddings{} but the denoiser takes {}{}; do the components named in model_index.json belong together?",
                self.model.dir.display(),
                pooled.map(|p| format!(" and {p}-wide pooled ones")).unwrap_or_default(),
                spec.context_dim,
                spec.pooled_dim
                    .map(|p| format!(" and {p}-wide pooled embeddings"))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Encodes the prompts and draws or checks the starting latents.
    pub fn prepare(&self, req: &Request) -> Result<DenoiseInputs> {
        let f = self.vae_factor();
        let spec = &self.model.input_spec;
        // Given latents set the size (times the VAE factor); else the denoiser's sample size.
        let default = match req.latents.as_ref().map(|l| l.dims()) {
            Some([_, _, lh, lw]) => (lh * f, lw * f),
            _ => {
                let d = self.model.sample_size().unwrap_or(128) * f;
                (d, d)
            }
        };
        let (h, w) = (
            req.height.unwrap_or(default.0),
            req.width.unwrap_or(default.1),
        );
        // diffusers' check_inputs: multiples of the VAE factor (times SD3's patch size);
        // the U-Net copes with any latent size (`forward_upsample_size`).
        let multiple = f * spec.latent_multiple;
        if h == 0 || w == 0 || h % multiple != 0 || w % multiple != 0 {
            let why = if spec.latent_multiple == 1 {
                format!("the VAE's factor {f}")
            } else {
                format!(
                    "the VAE's factor {f} times the denoiser's patch size {}",
                    spec.latent_multiple
                )
            };
            return Err(Error::Options(format!(
                "--height {h} --width {w}: both must be positive multiples of {multiple} ({why}), as in diffusers"
            )));
        }
        let (lh, lw) = (h / f, w / f);
        let device = &self.model.device;
        let latents = match &req.latents {
            Some(l) => {
                if l.dims() != [1, spec.latent_channels, lh, lw] {
                    return Err(Error::Input(format!(
                        "--latents: tensor `latents` has shape {:?}, expected [1, {}, {lh}, {lw}] for {h}x{w}",
                        l.dims(),
                        spec.latent_channels
                    )));
                }
                let l = crate::io::float_tensor(Path::new("--latents"), "latents", l)?;
                let v = l.flatten_all()?.to_vec1::<f32>()?;
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(Error::Input(format!(
                        "--latents: tensor `latents` holds a non-finite value ({}) at flat index {i}",
                        v[i]
                    )));
                }
                l
            }
            None => seeded_latents(req.seed, (spec.latent_channels, lh, lw), device)?,
        };
        let e = self
            .text
            .encode_opt(&req.prompt, req.negative_prompt.as_deref())?;
        self.check_text_widths(&e)?;
        let time_ids = if spec.time_ids {
            let (hf, wf) = (h as f32, w as f32);
            Some(Tensor::new(&[[hf, wf, 0.0, 0.0, hf, wf]], device)?)
        } else {
            None
        };
        let cond = Conditioning {
            prompt_embeds: e.prompt_embeds,
            pooled: e.pooled_prompt_embeds,
            time_ids: time_ids.clone(),
        };
        let uncond = Conditioning {
            prompt_embeds: e.negative_prompt_embeds,
            pooled: e.negative_pooled_prompt_embeds,
            time_ids,
        };
        Ok(DenoiseInputs {
            latents,
            cond,
            uncond,
        })
    }

    /// Refuses a request whose job or VAE decode would not fit in memory (see
    /// [`crate::memory`]), before its latents are drawn. The text length is taken at its
    /// upper bound (512 tokens), as the prompts are not encoded yet.
    pub fn check_memory(
        &self,
        req: &Request,
        strategy: &dyn Strategy,
        opts: &RunOptions,
    ) -> Result<()> {
        self.memory_check().check(
            req,
            strategy.name(),
            opts.world_size,
            strategy.cache().copied(),
        )
    }

    /// What [`Pipeline::check_memory`] reads, detached from the pipeline (it is `Send + Sync`
    /// and cheap to clone), so that another thread (a service's request handlers) can check
    /// requests while this pipeline runs a job.
    pub fn memory_check(&self) -> MemoryCheck {
        let f = self.vae_factor();
        MemoryCheck {
            denoiser: std::sync::Arc::clone(&self.model.denoiser),
            vae: self.vae.config.clone(),
            latent_channels: self.model.input_spec.latent_channels,
            vae_factor: f,
            default_side: self.model.sample_size().unwrap_or(128) * f,
        }
    }

    /// Checks everything about `req` that does not depend on its prompt (sizes, memory,
    /// steps against the scheduler, the strategy's layout) without denoising, so that a
    /// batch reports a request-wide error once, before any prompt runs.
    pub fn check_request(
        &self,
        req: &Request,
        strategy: &dyn Strategy,
        opts: &RunOptions,
    ) -> Result<()> {
        opts.check(crate::cores())?;
        self.check_memory(req, strategy, opts)?;
        let inputs = self.prepare(req)?;
        let scheduler = match req.scheduler {
            Some(s) => s,
            None => self.model.scheduler_config.default_kind()?,
        };
        hybridiff_schedulers::build(&self.model.scheduler_config, scheduler, req.steps)?;
        let job = Job {
            model: self.model.denoiser.as_ref(),
            scheduler_config: &self.model.scheduler_config,
            scheduler,
            steps: req.steps,
            guidance: req.guidance.unwrap_or_else(|| self.default_guidance()),
            inputs: &inputs,
            progress: None,
        };
        strategy.check(&job, opts.world_size)
    }

    /// Makes one image on ranks started for it.
    pub fn generate(
        &self,
        req: &Request,
        strategy: &dyn Strategy,
        opts: &RunOptions,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
    ) -> Result<Generated> {
        self.check_memory(req, strategy, opts)?;
        self.generate_with(req, progress, |job| denoise(job, strategy, opts).map(Some))
            .map(|g| g.expect("the in-process run returns the image"))
    }

    /// Makes one image on `runner`'s warm ranks: the same image as [`Pipeline::generate`]
    /// with the runner's options. Setting `cancel` stops the job ([`Error::Cancelled`]).
    pub fn generate_on(
        &self,
        runner: &Runner,
        req: &Request,
        strategy: &dyn Strategy,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
        cancel: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<Generated> {
        self.check_memory(req, strategy, runner.options())?;
        self.generate_with(req, progress, |job| {
            runner.denoise(job, strategy, cancel).map(Some)
        })
        .map(|g| g.expect("the in-process run returns the image"))
    }

    /// Makes one image as this process's rank of a job whose ranks are processes joined by
    /// `comm` (see [`crate::denoise_rank`]). Every process calls it with the same request;
    /// rank 0 decodes and returns the image, the others return `None`.
    pub fn generate_rank(
        &self,
        req: &Request,
        strategy: &dyn Strategy,
        opts: &RunOptions,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
        comm: &mut dyn hybridiff_comm::Communicator,
    ) -> Result<Option<Generated>> {
        self.generate_with(req, progress, |job| {
            crate::denoise_rank(job, strategy, opts, comm)
        })
    }

    fn generate_with(
        &self,
        req: &Request,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
        run: impl FnOnce(&Job) -> Result<Option<crate::DenoiseOutput>>,
    ) -> Result<Option<Generated>> {
        let inputs = self.prepare(req)?;
        let scheduler = match req.scheduler {
            Some(s) => s,
            None => self.model.scheduler_config.default_kind()?,
        };
        let job = Job {
            model: self.model.denoiser.as_ref(),
            scheduler_config: &self.model.scheduler_config,
            scheduler,
            steps: req.steps,
            guidance: req.guidance.unwrap_or_else(|| self.default_guidance()),
            inputs: &inputs,
            progress,
        };
        let Some(out) = run(&job)? else {
            return Ok(None);
        };
        let image = self
            .vae
            .decode_latents(&out.latents.to_dtype(DType::F32)?)?;
        let (width, height, rgb) = to_rgb8(&image)?;
        Ok(Some(Generated {
            width,
            height,
            rgb,
            trace: out.trace,
        }))
    }
}
