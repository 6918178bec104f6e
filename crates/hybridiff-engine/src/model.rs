//! A diffusers model folder: which denoiser it holds, its scheduler config and VAE.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use hybridiff_models::mmdit::SD3Transformer2DModel;
use hybridiff_models::unet::UNet2DConditionModel;
use hybridiff_models::vae::PipelineVae;
use hybridiff_models::Denoiser;
use hybridiff_schedulers::{SchedulerConfig, SchedulerKind};

use crate::io::InputSpec;
use crate::{Error, Result};

/// A loaded model folder.
pub struct Model {
    pub dir: PathBuf,
    pub denoiser: Arc<dyn Denoiser>,
    pub scheduler_config: SchedulerConfig,
    pub input_spec: InputSpec,
    pub dtype: DType,
    pub device: Device,
    /// The denoiser's diffusers class (`UNet2DConditionModel`, `SD3Transformer2DModel`).
    pub denoiser_class: &'static str,
    sample_size: Option<usize>,
}

/// Pixels per latent pixel, from `vae/config.json` when there is one (diffusers' default 8).
fn vae_factor(dir: &Path) -> Result<usize> {
    let path = dir.join("vae").join("config.json");
    if !path.is_file() {
        return Ok(8);
    }
    let v: serde_json::Value = hybridiff_models::weights::read_config(&path)?;
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

/// How many times this process has loaded a model folder: a service shows with it that it
/// loads its model once, not per request.
pub fn loads() -> u64 {
    LOADS.load(std::sync::atomic::Ordering::SeqCst)
}

impl Model {
    /// Loads the denoiser and scheduler config of a diffusers model folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        LOADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                "model folder not found (expected a diffusers folder with unet/ and scheduler/)",
            ));
        }
        let sched_path = dir.join("scheduler").join("scheduler_config.json");
        if !sched_path.is_file() {
            return Err(Error::io(&sched_path, "scheduler config not found"));
        }
        let scheduler_config = SchedulerConfig::from_file(&sched_path)?;
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
        let unet_dir = dir.join("unet");
        if unet_dir.is_dir() {
            let unet = UNet2DConditionModel::load(&unet_dir, dtype, device)?;
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
                vae_factor: vae_factor(dir)?,
            };
            return Ok(Self {
                dir: dir.to_path_buf(),
                denoiser: Arc::new(unet),
                scheduler_config,
                input_spec,
                dtype,
                device: device.clone(),
                denoiser_class: "UNet2DConditionModel",
                sample_size,
            });
        }
        let dit_dir = dir.join("transformer");
        if dit_dir.is_dir() {
            let dit = SD3Transformer2DModel::load(&dit_dir, dtype, device)?;
            let c = &dit.config;
            same_channels(c.path.clone(), c.in_channels, c.out_channels())?;
            let input_spec = InputSpec {
                latent_channels: c.in_channels,
                latent_multiple: c.patch_size,
                context_dim: c.joint_attention_dim,
                pooled_dim: Some(c.pooled_projection_dim),
                time_ids: false,
                vae_factor: vae_factor(dir)?,
            };
            let sample_size = Some(c.sample_size);
            return Ok(Self {
                dir: dir.to_path_buf(),
                denoiser: Arc::new(dit),
                scheduler_config,
                input_spec,
                dtype,
                device: device.clone(),
                denoiser_class: "SD3Transformer2DModel",
                sample_size,
            });
        }
        Err(Error::io(
            dir,
            "no denoiser found: expected a unet/ (SD, SDXL) or transformer/ (SD3) folder in diffusers layout",
        ))
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
    /// - a schedule that cannot run `steps` steps ([`crate::sampler::check_schedule`]).
    ///
    /// [`Family`]: hybridiff_schedulers::Family
    /// [`SchedulerConfig::objective`]: hybridiff_schedulers::SchedulerConfig::objective
    pub fn scheduler(
        &self,
        requested: Option<SchedulerKind>,
        steps: usize,
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
            crate::sampler::check_schedule(&self.scheduler_config, kind, steps)?;
        }
        Ok(kind)
    }

    /// The latent size the denoiser was configured for, if its config says.
    pub fn sample_size(&self) -> Option<usize> {
        self.sample_size
    }

    /// Refuses decoding `h x w` latents when the VAE's estimated memory does not fit
    /// (see [`crate::memory::estimate_decode`]); a folder without a VAE passes.
    pub fn check_decode_memory(&self, (h, w): (usize, usize)) -> Result<()> {
        let path = self.dir.join("vae").join("config.json");
        if !path.is_file() {
            return Ok(());
        }
        let config = hybridiff_models::vae::VaeConfig::from_file(&path)?;
        crate::memory::estimate_decode(&config, (h, w)).check()
    }

    /// Loads the folder's VAE (for `--decode` and `generate`) for decoding in the model's
    /// dtype as diffusers does: f32 when its config's `force_upcast` is set (the default)
    /// and the dtype is f16, else the model's dtype with an f32 retry of a non-finite
    /// decode (see [`PipelineVae`]).
    pub fn load_vae(&self) -> Result<PipelineVae> {
        let vae_dir = self.dir.join("vae");
        if !vae_dir.is_dir() {
            return Err(Error::io(
                &vae_dir,
                "no VAE in the model folder; cannot decode",
            ));
        }
        Ok(PipelineVae::load(&vae_dir, self.dtype, &self.device)?)
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
    Err(Error::Options(format!(
        "{chosen} is a {} sampler, but the model was trained for {trained}: it would run and ruin the image; use --scheduler {}",
        kind.family(),
        fitting.join(", --scheduler ")
    )))
}
