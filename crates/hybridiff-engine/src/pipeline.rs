//! Text to image: a diffusers pipeline folder (`model_index.json`), prompts in, an RGB
//! image out, through any strategy.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::vae::{to_rgb8, AutoencoderKL};
use hybridiff_models::Conditioning;
use hybridiff_schedulers::SchedulerKind;
use hybridiff_text::{PipelineKind, PromptEncoder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{denoise, DenoiseInputs, Error, Job, Model, Result, RunOptions, Strategy, Trace};

/// A loaded text-to-image pipeline.
pub struct Pipeline {
    pub model: Model,
    pub text: PromptEncoder,
    pub vae: AutoencoderKL,
}

/// One image to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Guidance scale; `None` takes the pipeline's default (SD3 7.0, others 5.0).
    pub guidance: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    /// Pixel size; `None` takes the denoiser's `sample_size` times the VAE factor.
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

    /// Encodes the prompts and draws or checks the starting latents.
    pub fn prepare(&self, req: &Request) -> Result<DenoiseInputs> {
        let f = self.vae_factor();
        let spec = &self.model.input_spec;
        let default = self.model.sample_size().unwrap_or(128) * f;
        let (h, w) = (req.height.unwrap_or(default), req.width.unwrap_or(default));
        let multiple = f * spec.latent_multiple;
        if h == 0 || w == 0 || h % multiple != 0 || w % multiple != 0 {
            return Err(Error::Options(format!(
                "--height {h} --width {w}: both must be positive multiples of {multiple} (VAE factor {f} times the denoiser's {})",
                spec.latent_multiple
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
                l.to_dtype(DType::F32)?
            }
            None => seeded_latents(req.seed, (spec.latent_channels, lh, lw), device)?,
        };
        let e = self.text.encode(&req.prompt, &req.negative_prompt)?;
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

    /// Makes one image.
    pub fn generate(
        &self,
        req: &Request,
        strategy: &dyn Strategy,
        opts: &RunOptions,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
    ) -> Result<Generated> {
        self.generate_with(req, progress, |job| denoise(job, strategy, opts).map(Some))
            .map(|g| g.expect("the in-process run returns the image"))
    }

    /// Makes one image as this process's rank of a job whose ranks are processes joined by
    /// `comm` (see [`crate::denoise_rank`]). Every process calls it with the same request;
    /// rank 0 decodes and returns the image, the others return `None`.
    pub fn generate_on(
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
