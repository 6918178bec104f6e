//! A diffusers model folder: which denoiser it holds, its scheduler config and VAE.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use hybridiff_models::mmdit::SD3Transformer2DModel;
use hybridiff_models::unet::UNet2DConditionModel;
use hybridiff_models::vae::PipelineVae;
use hybridiff_models::weights::ComponentSource;
use hybridiff_models::Denoiser;
use hybridiff_schedulers::{SchedulerConfig, SchedulerKind};

use crate::io::InputSpec;
use crate::source::{DenoiserSource, ModelSpec, ResolvedModel};
use crate::{Error, Result};

/// A loaded denoiser with its scheduler config (from a folder or a single file).
pub struct Model {
    /// The `--model` path (a folder or a single file), for messages.
    pub dir: PathBuf,
    /// The VAE to decode with, if the model has one.
    pub vae: Option<ComponentSource>,
    pub denoiser: Arc<dyn Denoiser>,
    pub scheduler_config: SchedulerConfig,
    pub input_spec: InputSpec,
    pub dtype: DType,
    pub device: Device,
    /// The denoiser's diffusers class (`UNet2DConditionModel`, `SD3Transformer2DModel`).
    pub denoiser_class: &'static str,
    sample_size: Option<usize>,
}

/// Pixels per latent pixel, from the VAE's config when there is one (diffusers' default 8).
fn vae_factor(vae: Option<&ComponentSource>) -> Result<usize> {
    let Some(vae) = vae.filter(|v| v.has_config()) else {
        return Ok(8);
    };
    let path = vae.config_path();
    let v: serde_json::Value = vae.read_config()?;
    let n = v
        .get("block_out_channels")
        .and_then(|b| b.as_array())
        .map(|a| a.len())
        .unwrap_or(4);
    if n > 8 {
        return Err(Error::Input(format!(
            "{}: `block_out_channels` has {n} levels; at most 8 (each doubles the image side)",
            path.display()
        )));
    }
    Ok(1 << n.saturating_sub(1))
}

/// Calls of [`Model::load`] in this process (see [`loads`]).
static LOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times this process has loaded a model (folder or file): a service shows with it that it
/// loads its model once, not per request.
pub fn loads() -> u64 {
    LOADS.load(std::sync::atomic::Ordering::SeqCst)
}

impl Model {
    /// Loads the denoiser and scheduler config of a diffusers model folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            LOADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::io(
                dir,
                "model folder not found (expected a diffusers folder with unet/ and scheduler/)",
            ));
        }
        Self::load_resolved(&ModelSpec::folder(dir).resolve(false)?, dtype, device)
    }

    /// Loads the denoiser of a resolved model (a folder or a single file, LoRAs merged).
    pub fn load_resolved(r: &ResolvedModel, dtype: DType, device: &Device) -> Result<Self> {
        LOADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let scheduler_config = r.scheduler.clone();
        // The samplers step the latents with the prediction: both need the same channels
        // (a learned-variance model's extra outputs would need splitting first).
        let same_channels = |path: PathBuf, cin: usize, cout: usize| {
            if cin == cout {
                Ok(())
            } else {
                Err(Error::Input(format!(
                    "{}: `out_channels` = {cout} differs from `in_channels` = {cin}; the samplers need a prediction shaped like the latents",
                    path.display()
                )))
            }
        };
        let vae_factor = vae_factor(r.vae.as_ref())?;
        match &r.denoiser {
            DenoiserSource::Unet(src) => {
                let unet = UNet2DConditionModel::load_source(src, dtype, device)?;
                let c = &unet.config;
                same_channels(c.path.clone(), c.in_channels, c.out_channels)?;
                let sample_size = c.sample_size;
                let input_spec = InputSpec {
                    latent_channels: c.in_channels,
                    // Any latent size: the upsamplers take their skip's size, as diffusers'
                    // `forward_upsample_size` does.
                    latent_multiple: 1,
                    context_dim: c.cross_attention_dim[0],
                    pooled_dim: c.text_time.map(|(t, p)| p - 6 * t),
                    time_ids: c.text_time.is_some(),
                    vae_factor,
                };
                Ok(Self {
                    dir: r.path.clone(),
                    vae: r.vae.clone(),
                    denoiser: Arc::new(unet),
                    scheduler_config,
                    input_spec,
                    dtype,
                    device: device.clone(),
                    denoiser_class: "UNet2DConditionModel",
                    sample_size,
                })
            }
            DenoiserSource::Transformer(src) => {
                let dit = SD3Transformer2DModel::load_source(src, dtype, device)?;
                let c = &dit.config;
                same_channels(c.path.clone(), c.in_channels, c.out_channels())?;
                let input_spec = InputSpec {
                    latent_channels: c.in_channels,
                    latent_multiple: c.patch_size,
                    context_dim: c.joint_attention_dim,
                    pooled_dim: Some(c.pooled_projection_dim),
                    time_ids: false,
                    vae_factor,
                };
                let sample_size = Some(c.sample_size);
                Ok(Self {
                    dir: r.path.clone(),
                    vae: r.vae.clone(),
                    denoiser: Arc::new(dit),
                    scheduler_config,
                    input_spec,
                    dtype,
                    device: device.clone(),
                    denoiser_class: "SD3Transformer2DModel",
                    sample_size,
                })
            }
        }
    }

    /// The sampler of a run of `steps` steps: `requested` (`--scheduler`) or, when `None`,
    /// the one the scheduler config's `_class_name` names; checked before any compute.
    ///
    /// # Errors
    /// - a sampler of the other [`Family`] than the model's training objective (epsilon /
    ///   v-prediction diffusion vs flow matching), naming both and the samplers that fit. The
    ///   objective comes from the scheduler config ([`SchedulerConfig::objective`]: class and
    ///   `prediction_type`), else from the denoiser (SD3's MMDiT is flow matching, U-Nets
    ///   diffusion);
    /// - a schedule that cannot run `steps` steps with `opts` (`--karras`, the image's
    ///   token count; see [`Model::schedule_options`]), e.g. LCM above its
    ///   `original_inference_steps`, a UniPC order above the steps
    ///   ([`crate::sampler::check_schedule`]).
    ///
    /// [`Family`]: hybridiff_schedulers::Family
    /// [`SchedulerConfig::objective`]: hybridiff_schedulers::SchedulerConfig::objective
    pub fn scheduler(
        &self,
        requested: Option<SchedulerKind>,
        steps: usize,
        opts: &hybridiff_schedulers::ScheduleOptions,
    ) -> Result<SchedulerKind> {
        let kind = match requested {
            Some(k) => k,
            None => self.scheduler_config.default_kind()?,
        };
        check_scheduler_family(
            &self.scheduler_config,
            self.denoiser_class,
            kind,
            requested.is_some(),
        )?;
        if steps > 0 {
            crate::sampler::check_schedule(&self.scheduler_config, kind, steps, opts)?;
        }
        Ok(kind)
    }

    /// The [`ScheduleOptions`](hybridiff_schedulers::ScheduleOptions) of a run with
    /// `--karras` as `karras` on latents of `latent` = `(h, w)` (`None`: the denoiser's
    /// sample size, 128 when its config has none): the token count that flow schedulers'
    /// dynamic shifting reads.
    pub fn schedule_options(
        &self,
        karras: bool,
        latent: Option<(usize, usize)>,
    ) -> hybridiff_schedulers::ScheduleOptions {
        let side = self.sample_size().unwrap_or(128);
        let (h, w) = latent.unwrap_or((side, side));
        hybridiff_schedulers::ScheduleOptions {
            karras,
            image_seq_len: Some(crate::pipeline::image_seq_len(
                h,
                w,
                self.denoiser.patch_size(),
            )),
        }
    }

    /// The latent size the denoiser was configured for, if its config says.
    pub fn sample_size(&self) -> Option<usize> {
        self.sample_size
    }

    /// Refuses decoding `h x w` latents when the VAE's estimated memory does not fit
    /// (see [`crate::memory::estimate_decode`]); a folder without a VAE passes.
    pub fn check_decode_memory(&self, (h, w): (usize, usize)) -> Result<()> {
        let Some(vae) = self.vae.as_ref().filter(|v| v.has_config()) else {
            return Ok(());
        };
        let config = hybridiff_models::vae::VaeConfig::from_source(vae)?;
        crate::memory::estimate_decode(&config, (h, w)).check()
    }

    /// Loads the folder's VAE (for `--decode` and `generate`) for decoding in the model's
    /// dtype as diffusers does: f32 when its config's `force_upcast` is set (the default)
    /// and the dtype is f16, else the model's dtype with an f32 retry of a non-finite
    /// decode (see [`PipelineVae`]).
    pub fn load_vae(&self) -> Result<PipelineVae> {
        let Some(vae) = &self.vae else {
            return Err(Error::io(
                &self.dir,
                "the model has no VAE (no vae/ folder, or no first_stage_model. tensors in the file); cannot decode: pass --vae FOLDER|FILE",
            ));
        };
        let vae = PipelineVae::load_source(vae, self.dtype, &self.device)?;
        // A VAE of another family (e.g. SD3's 16-channel one beside a 4-channel U-Net) would
        // only fail at the decode, after every step: refused here, before compute.
        let (theirs, ours) = (vae.config.latent_channels, self.input_spec.latent_channels);
        if theirs != ours {
            return Err(Error::Input(format!(
                "{}: the VAE has {theirs} latent channels but the denoiser makes {ours}: they are not of one family; a --vae must match the model (SD 1.x, 2.x, SDXL: 4 channels; SD3: 16)",
                self.dir.display()
            )));
        }
        Ok(vae)
    }
}

/// Refuses a sampler whose [`Family`](hybridiff_schedulers::Family) is not the model's
/// training objective, naming both and the samplers that fit: the objective comes from the
/// scheduler config ([`SchedulerConfig::objective`]: class and `prediction_type`), else from
/// the denoiser (`denoiser_class`: SD3's MMDiT is flow matching, U-Nets diffusion). `flag`:
/// the kind was given as `--scheduler` (else it is the config's own).
pub fn check_scheduler_family(
    config: &SchedulerConfig,
    denoiser_class: &str,
    kind: SchedulerKind,
    flag: bool,
) -> Result<()> {
    use hybridiff_schedulers::Family;
    let path = config.path().display();
    let (family, trained) = match config.objective() {
        Some(o) => (
            o.family,
            format!("{} (its {path} says {})", o.prediction, o.keys),
        ),
        None => {
            let family = if denoiser_class == "SD3Transformer2DModel" {
                Family::FlowMatching
            } else {
                Family::Diffusion
            };
            let what = match family {
                Family::FlowMatching => "flow matching",
                Family::Diffusion => "epsilon prediction",
            };
            (
                family,
                format!(
                    "{what} (its denoiser is a {denoiser_class}; {path} names no scheduler class or prediction_type)"
                ),
            )
        }
    };
    if kind.family() == family {
        return Ok(());
    }
    let fitting: Vec<&str> = SchedulerKind::ALL
        .iter()
        .filter(|k| k.family() == family)
        .map(|k| k.as_str())
        .collect();
    let chosen = if flag {
        format!("--scheduler {kind}")
    } else {
        format!("the scheduler config's {kind}")
    };
    let flags = format!(
        "{chosen} is a {} sampler, but the model was trained for {trained}: it would run and ruin the image; use --scheduler {}",
        kind.family(),
        fitting.join(", --scheduler ")
    );
    if !flag {
        // The model's own config: nothing a request chose.
        return Err(Error::Options(flags));
    }
    Err(Error::refused(
        crate::Field::Scheduler,
        flags,
        format!(
            "`scheduler` {kind} is a {} sampler, but this model was trained for {}: use one of {}",
            kind.family(),
            match config.objective() {
                Some(o) => o.prediction,
                None => family.to_string(),
            },
            fitting.join(", ")
        ),
    ))
}
