//! Text to image: a diffusers pipeline folder (`model_index.json`), prompts in, an RGB
//! image out, through any strategy.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::vae::{to_rgb8, PipelineVae};
use hybridiff_models::Conditioning;
use hybridiff_schedulers::SchedulerKind;
use hybridiff_text::{PipelineKind, PromptEncoder};

pub use crate::noise::NoiseKind;
use crate::source::{ModelSpec, ResolvedModel};
use crate::{
    denoise, DenoiseInputs, Error, Field, Job, Model, Noise, Result, RunOptions, Runner,
    SamplingOptions, Strategy, Trace,
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

/// diffusers' `check_inputs` of an image's size: `h` and `w` positive multiples of the VAE
/// factor times the denoiser's latent multiple (SD3's patch size); the U-Net copes with any
/// latent size (`forward_upsample_size`). Refused as [`Field::Size`].
pub fn check_size(h: usize, w: usize, vae_factor: usize, latent_multiple: usize) -> Result<()> {
    let f = vae_factor;
    let multiple = f * latent_multiple;
    if h == 0 || w == 0 || !h.is_multiple_of(multiple) || !w.is_multiple_of(multiple) {
        let why = if latent_multiple == 1 {
            format!("the VAE's factor {f}")
        } else {
            format!("the VAE's factor {f} times the denoiser's patch size {latent_multiple}")
        };
        return Err(Error::refused(
            Field::Size,
            format!(
                "--height {h} --width {w}: both must be positive multiples of {multiple} ({why}), as in diffusers"
            ),
            format!(
                "`size` {w}x{h}: width and height must be positive multiples of {multiple} for this model ({why})"
            ),
        ));
    }
    Ok(())
}

/// A pipeline's checks of one image request, detached from the pipeline (`Send + Sync` and
/// cheap to clone) so that another thread, a service's request handlers, can run them while
/// the pipeline runs a job. They are the checks the job itself runs, on stand-in inputs of
/// the request's shapes (zero latents, the empty prompt's encodings): [`check_size`], the
/// memory of the job and its VAE decode ([`MemoryCheck`]), the scheduler's fit with the
/// model's training objective and its schedule for the step count
/// ([`crate::sampler::check_schedule`]), and [`crate::check_job_within`] (steps, guidance, the run layout, the
/// strategy's own checks: world size, hybrid's thresholds, stage plans, patch bands). No
/// compute: the prompts are not encoded and a measured stage plan is not measured. Values a
/// request chooses are refused as [`Error::Refused`], worded for the command line and for an
/// API client.
#[derive(Clone)]
pub struct RequestCheck {
    memory: MemoryCheck,
    scheduler_config: std::sync::Arc<hybridiff_schedulers::SchedulerConfig>,
    /// The denoiser's diffusers class, for pairing the scheduler with its objective.
    denoiser_class: &'static str,
    latent_multiple: usize,
    cond: Conditioning,
    uncond: Conditioning,
    default_guidance: f64,
}

impl RequestCheck {
    /// Checks `req` (all but its prompts) as `strategy` would run it with `opts`, the
    /// memory against `limit` (read earlier, e.g. when a service started; `None`: no limit).
    pub fn check(
        &self,
        req: &Request,
        strategy: &dyn Strategy,
        opts: &RunOptions,
        limit: Option<crate::memory::Limit>,
    ) -> Result<()> {
        let m = &self.memory;
        // As in `Pipeline::prepare`: given latents set the size, else the sample size.
        let default = match req.latents.as_ref().map(|l| l.dims()) {
            Some([_, _, lh, lw]) => (lh * m.vae_factor, lw * m.vae_factor),
            _ => (m.default_side, m.default_side),
        };
        let (h, w) = (
            req.height.unwrap_or(default.0),
            req.width.unwrap_or(default.1),
        );
        check_size(h, w, m.vae_factor, self.latent_multiple)?;
        m.check_within(
            req,
            strategy.name(),
            opts.world_size,
            strategy.cache().copied(),
            limit,
        )?;
        let (lh, lw) = (h / m.vae_factor, w / m.vae_factor);
        let scheduler = check_sampler(
            &self.scheduler_config,
            self.denoiser_class,
            req,
            image_seq_len(lh, lw, m.denoiser.patch_size()),
        )?;
        // Sized by the checks above (within the memory limit); only its shape is read.
        let latents = Tensor::zeros((1, m.latent_channels, lh, lw), DType::F32, &Device::Cpu)?;
        let sampling = req.sampling(&latents)?;
        let inputs = DenoiseInputs {
            latents,
            cond: self.cond.clone(),
            uncond: self.uncond.clone(),
        };
        let job = Job {
            model: m.denoiser.as_ref(),
            scheduler_config: &self.scheduler_config,
            scheduler,
            steps: req.steps,
            guidance: req.guidance.unwrap_or(self.default_guidance),
            inputs: &inputs,
            progress: None,
            sampling,
        };
        crate::check_job_within(&job, strategy, opts, opts.world_size, limit)
    }
}

/// The image's token count as flow schedulers' dynamic shifting reads it: `(lh / p) * (lw
/// / p)` for latents of `lh x lw` and the denoiser's patch size `p` (1 for a U-Net), as
/// diffusers' SD3 pipeline computes it.
pub fn image_seq_len(lh: usize, lw: usize, patch_size: usize) -> usize {
    let p = patch_size.max(1);
    (lh / p) * (lw / p)
}

/// The sampler checks of a request, before any compute, shared by [`Pipeline`] and
/// [`RequestCheck`]: the guidance rescale (0 to 1, none for flow matching), then the
/// request's scheduler (else the config's `_class_name`) against the model's training
/// objective ([`crate::model::check_scheduler_family`]) and its schedule for the request's
/// steps, `--karras` and image size ([`crate::sampler::check_schedule`]: LCM's step limit,
/// UniPC's order, schedules that give NaN). Returns the scheduler kind. Values a request
/// chooses are refused as [`Error::Refused`] naming the field.
pub fn check_sampler(
    config: &hybridiff_schedulers::SchedulerConfig,
    denoiser_class: &str,
    req: &Request,
    image_seq_len: usize,
) -> Result<SchedulerKind> {
    let scheduler = match req.scheduler {
        Some(s) => s,
        None => config.default_kind()?,
    };
    crate::check_guidance_rescale(req.guidance_rescale, Some(scheduler))?;
    crate::model::check_scheduler_family(
        config,
        denoiser_class,
        scheduler,
        req.scheduler.is_some(),
    )?;
    if req.steps > 0 {
        let opts = hybridiff_schedulers::ScheduleOptions {
            karras: req.karras,
            image_seq_len: Some(image_seq_len),
        };
        crate::sampler::check_schedule(config, scheduler, req.steps, &opts)?;
    }
    Ok(scheduler)
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
    /// `--karras`: Karras sigmas whatever the scheduler config says.
    pub karras: bool,
    /// diffusers' `guidance_rescale`, 0 (off) to 1.
    pub guidance_rescale: f64,
    /// Pixel size; `None` takes the size of `latents` when given, else the denoiser's
    /// `sample_size`, times the VAE factor.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Starting noise: given latents, or drawn from `seed` by `noise` (see
    /// [`seeded_latents_with`]).
    pub latents: Option<Tensor>,
    /// The seed of the starting noise (when `latents` is `None`) and of stochastic
    /// samplers' step noise (always; see [`crate::noise`]).
    pub seed: u64,
    pub noise: NoiseKind,
}

impl Request {
    /// The job's [`SamplingOptions`] for starting `latents` `[1, C, h, w]`: `--karras`, the
    /// guidance rescale and the seed's noise, which drew those latents unless the request
    /// gave them (a torch generator's step noise follows its latents, see [`crate::noise`]).
    pub fn sampling(&self, latents: &Tensor) -> Result<SamplingOptions> {
        let noise = Noise::new(self.noise, self.seed);
        let noise = match self.latents {
            Some(_) => noise,
            None => {
                let (_, c, h, w) = latents.dims4()?;
                noise.after_latents((c, h, w))
            }
        };
        Ok(SamplingOptions {
            karras: self.karras,
            guidance_rescale: self.guidance_rescale,
            noise,
        })
    }
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
/// seed gives the same latents on every machine and for every strategy (see
/// [`Noise::initial_latents`]).
pub fn seeded_latents(seed: u64, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
    seeded_latents_with(NoiseKind::Chacha8, seed, shape, device)
}

/// The starting noise `[1, C, h, w]` for `seed` from the generator `noise` names, filled
/// in row-major order (for [`NoiseKind::Torch`], as `torch.randn((1, C, h, w),
/// generator=torch.Generator("cpu").manual_seed(seed))`, which diffusers' `prepare_latents`
/// draws before scaling by the scheduler's `init_noise_sigma`).
pub fn seeded_latents_with(
    noise: NoiseKind,
    seed: u64,
    shape: (usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    Noise::new(noise, seed).initial_latents(shape, device)
}

impl Pipeline {
    /// Loads the text encoders, the denoiser, the scheduler config and the VAE.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if dir.is_dir() && !dir.join("model_index.json").is_file() {
            return Err(Error::io(
                dir,
                "not a diffusers pipeline folder: model_index.json is missing (for a bare denoiser folder use `hybridiff denoise`)",
            ));
        }
        Self::load_resolved(&ModelSpec::folder(dir).resolve(true)?, dtype, device)
    }

    /// Loads a resolved model (a folder or a single file, with `--vae` and LoRAs): the
    /// text encoders, the denoiser, the scheduler config and the VAE.
    pub fn load_resolved(r: &ResolvedModel, dtype: DType, device: &Device) -> Result<Self> {
        let Some(parts) = &r.text else {
            return Err(Error::io(
                &r.path,
                "not a diffusers pipeline folder: model_index.json is missing (for a bare denoiser folder use `hybridiff denoise`)",
            ));
        };
        let text = PromptEncoder::from_parts(parts, dtype, device)?;
        let model = Model::load_resolved(r, dtype, device)?;
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

    /// The request's height and width in pixels: given, else those of its latents (times
    /// the VAE factor), else the denoiser's sample size.
    fn pixel_size(&self, req: &Request) -> (usize, usize) {
        let f = self.vae_factor();
        let default = match req.latents.as_ref().map(|l| l.dims()) {
            Some([_, _, lh, lw]) => (lh * f, lw * f),
            _ => {
                let d = self.model.sample_size().unwrap_or(128) * f;
                (d, d)
            }
        };
        (
            req.height.unwrap_or(default.0),
            req.width.unwrap_or(default.1),
        )
    }

    /// Checks the request's sampler before anything is computed (the prompts are not
    /// encoded yet) and returns its kind (the request's, else the model's): it fits the
    /// model's training objective, builds for the request's steps, size and `--karras`
    /// (e.g. LCM's step limit, UniPC's order) and runs them without NaN, and the guidance
    /// rescale fits it. See [`check_sampler`].
    pub fn check_sampling(&self, req: &Request) -> Result<SchedulerKind> {
        let (h, w) = self.pixel_size(req);
        let f = self.vae_factor();
        check_sampler(
            &self.model.scheduler_config,
            self.model.denoiser_class,
            req,
            image_seq_len(h / f, w / f, self.model.denoiser.patch_size()),
        )
    }

    /// Encodes the prompts and draws or checks the starting latents.
    pub fn prepare(&self, req: &Request) -> Result<DenoiseInputs> {
        let f = self.vae_factor();
        let spec = &self.model.input_spec;
        let (h, w) = self.pixel_size(req);
        check_size(h, w, f, spec.latent_multiple)?;
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
            None => {
                seeded_latents_with(req.noise, req.seed, (spec.latent_channels, lh, lw), device)?
            }
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
    /// steps against the scheduler, the strategy's layout: [`RequestCheck::check`] against
    /// the memory limit now), then its given latents and the text encoders' widths, without
    /// denoising, so that a batch reports a request-wide error once, before any prompt runs.
    pub fn check_request(
        &self,
        req: &Request,
        strategy: &dyn Strategy,
        opts: &RunOptions,
    ) -> Result<()> {
        let limit = crate::memory::limit().map_err(Error::Options)?;
        self.request_check()?.check(req, strategy, opts, limit)?;
        self.prepare(req).map(|_| ())
    }

    /// This pipeline's [`RequestCheck`]; encodes the empty prompt once for the stand-in
    /// conditionings.
    pub fn request_check(&self) -> Result<RequestCheck> {
        let e = self.text.encode_opt("", None)?;
        self.check_text_widths(&e)?;
        let spec = &self.model.input_spec;
        let time_ids = if spec.time_ids {
            let side = self.memory_check().default_side as f32;
            Some(Tensor::new(
                &[[side, side, 0.0, 0.0, side, side]],
                &self.model.device,
            )?)
        } else {
            None
        };
        Ok(RequestCheck {
            memory: self.memory_check(),
            scheduler_config: std::sync::Arc::new(self.model.scheduler_config.clone()),
            denoiser_class: self.model.denoiser_class,
            latent_multiple: spec.latent_multiple,
            cond: Conditioning {
                prompt_embeds: e.prompt_embeds,
                pooled: e.pooled_prompt_embeds,
                time_ids: time_ids.clone(),
            },
            uncond: Conditioning {
                prompt_embeds: e.negative_prompt_embeds,
                pooled: e.negative_pooled_prompt_embeds,
                time_ids,
            },
            default_guidance: self.default_guidance(),
        })
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
        self.generate_with(req, progress, None, |job| {
            denoise(job, strategy, opts).map(Some)
        })
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
        self.generate_with(req, progress, Some(runner.host_pool()), |job| {
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
        self.generate_with(req, progress, None, |job| {
            crate::denoise_rank(job, strategy, opts, comm)
        })
    }

    /// `decode_on`: the pool the VAE decode runs in (the warm ranks' cores), else the
    /// calling thread's.
    fn generate_with(
        &self,
        req: &Request,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
        decode_on: Option<&rayon::ThreadPool>,
        run: impl FnOnce(&Job) -> Result<Option<crate::DenoiseOutput>>,
    ) -> Result<Option<Generated>> {
        let scheduler = self.check_sampling(req)?;
        let inputs = self.prepare(req)?;
        let sampling = req.sampling(&inputs.latents)?;
        let job = Job {
            model: self.model.denoiser.as_ref(),
            scheduler_config: &self.model.scheduler_config,
            scheduler,
            steps: req.steps,
            guidance: req.guidance.unwrap_or_else(|| self.default_guidance()),
            inputs: &inputs,
            progress,
            sampling,
        };
        let Some(out) = run(&job)? else {
            return Ok(None);
        };
        let latents = out.latents.to_dtype(DType::F32)?;
        let image = match decode_on {
            Some(pool) => pool.install(|| self.vae.decode_latents(&latents))?,
            None => self.vae.decode_latents(&latents)?,
        };
        let (width, height, rgb) = to_rgb8(&image)?;
        Ok(Some(Generated {
            width,
            height,
            rgb,
            trace: out.trace,
        }))
    }
}
