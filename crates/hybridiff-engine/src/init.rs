//! `hybridiff init`: a random-weight model folder in diffusers layout, so real-size
//! benchmarks need no download. Weights follow PyTorch's default initialisation
//! (uniform in ±1/sqrt(fan_in) for linear and conv weights, ones/zeros for norms), drawn
//! from a ChaCha stream seeded by `seed` and the tensor's name, so a folder is
//! reproducible and independent of load order.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use hybridiff_models::mmdit::{MMDiTConfig, SD3Transformer2DModel};
use hybridiff_models::unet::{UNet2DConditionModel, UNetConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::io::{save_safetensors, write_bytes_atomic, OutputFolder};
use crate::{Error, Result};

/// A backend that invents every tensor it is asked for, and remembers it.
struct RandomBackend {
    seed: u64,
    made: Mutex<HashMap<String, Tensor>>,
    /// Bytes made so far, and the most this process may use (None: no limit known).
    bytes: Mutex<u128>,
    limit: Option<hybridiff_models::memory::Limit>,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher's keys.
    let mut h = 0xcbf29ce484222325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Shares the backend between the var builder and the caller who saves its records.
struct Shared(Arc<RandomBackend>);

impl SimpleBackend for Shared {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        {
            // Checked before each tensor is made: the weights are held twice at the end
            // (the tensors and the file's bytes as they are written).
            let mut made = self
                .0
                .bytes
                .lock()
                .expect("no panics while holding the lock");
            let after = made.saturating_add(n as u128 * 4);
            if let Some(l) = self.0.limit {
                if after.saturating_mul(2) > l.bytes {
                    return Err(candle_core::Error::Msg(format!(
                        "the weights need more than {} (with tensor `{name}` of shape {:?}), held twice while writing; more than the {l} available",
                        hybridiff_models::memory::bytes(after),
                        s.dims()
                    )));
                }
            }
            *made = after;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(name_seed(self.0.seed, name));
        let data: Vec<f32> = match h {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
            Init::Randn { mean, stdev } => {
                let d = rand_distr::Normal::new(mean, stdev)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                (0..n).map(|_| rng.sample(d) as f32).collect()
            }
            Init::Kaiming { .. } => {
                let fan_in = candle_nn::init::FanInOut::FanIn.for_shape(&s).max(1);
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
        };
        let t = Tensor::from_vec(data, s, dev)?.to_dtype(dtype)?;
        self.0
            .made
            .lock()
            .expect("no panics while holding the lock")
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random init cannot invent `{name}` without a shape"
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The scheduler config written next to a random U-Net: SDXL's DDIM settings.
pub const SDXL_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "DDIMScheduler",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "set_alpha_to_one": false,
  "steps_offset": 1,
  "timestep_spacing": "leading"
}
"#;

/// The scheduler config written next to a random MMDiT: SD3's flow matching, shift 3.
pub const SD3_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "num_train_timesteps": 1000,
  "shift": 3.0,
  "use_dynamic_shifting": false
}
"#;

/// Writes a random-weight model folder for a denoiser config: a U-Net config
/// (`UNet2DConditionModel`) gives `unet/` with SDXL's DDIM scheduler, an MMDiT config
/// (`SD3Transformer2DModel`) gives `transformer/` with SD3's flow-matching scheduler;
/// plus `scheduler/scheduler_config.json` and a `model_index.json`.
///
/// `out` is an [`OutputFolder`]: new or empty, or with `force` one that holds only what
/// an earlier `init` wrote (replaced as a whole, so a U-Net folder re-initialised from an
/// MMDiT config keeps no `unet/`); anything else in it is refused, never deleted. The folder
/// is assembled under a temporary name next to `out` and moved into place, so a failed run
/// leaves nothing. The weights are checked against the memory limit tensor by tensor,
/// before each is made.
pub fn init_model_folder(config_path: &Path, out: &Path, seed: u64, force: bool) -> Result<()> {
    let folder = OutputFolder {
        flag: "--out",
        path: out,
        force,
        ours: written_by_init,
        kinds: "model_index.json, unet/, transformer/ and scheduler/ as init writes them",
    };
    let previous = folder.check()?;
    // --force must not remove the config it reads.
    let mut keys = std::collections::HashMap::new();
    let config_key = crate::io::FileKey::of(config_path, &mut keys);
    if previous.iter().any(|p| {
        std::fs::canonicalize(config_path)
            .is_ok_and(|c| p.canonicalize().is_ok_and(|p| c.starts_with(p)))
            || crate::io::FileKey::of(p, &mut keys) == config_key
    }) {
        return Err(Error::Options(format!(
            "--config {} is inside --out {}, which --force would replace; copy the config elsewhere first",
            config_path.display(),
            out.display()
        )));
    }
    let config_text = hybridiff_models::weights::read_text_bounded(
        config_path,
        hybridiff_models::weights::MAX_CONFIG_BYTES,
    )?;
    let raw: serde_json::Value = serde_json::from_str(&config_text).map_err(|e| Error::Io {
        path: config_path.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })?;
    let class = raw
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let backend = Arc::new(RandomBackend {
        seed,
        made: Mutex::new(HashMap::new()),
        bytes: Mutex::new(0),
        limit: hybridiff_models::memory::limit().map_err(Error::Options)?,
    });
    let vb = VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, Device::Cpu);
    // Building the model asks the backend for every tensor with its shape and init.
    let (component, pipeline, denoiser_class, scheduler_class, scheduler_text) = match class {
        "SD3Transformer2DModel" => {
            SD3Transformer2DModel::new(vb, MMDiTConfig::from_file(config_path)?)?;
            (
                "transformer",
                "StableDiffusion3Pipeline",
                "SD3Transformer2DModel",
                "FlowMatchEulerDiscreteScheduler",
                SD3_SCHEDULER_CONFIG,
            )
        }
        _ => {
            UNet2DConditionModel::new(vb, UNetConfig::from_file(config_path)?)?;
            (
                "unet",
                "StableDiffusionXLPipeline",
                "UNet2DConditionModel",
                "DDIMScheduler",
                SDXL_SCHEDULER_CONFIG,
            )
        }
    };
    let made = std::mem::take(
        &mut *backend
            .made
            .lock()
            .expect("no panics while holding the lock"),
    );

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".hybridiff-init-")
        .suffix(crate::io::TEMP_SUFFIX)
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, format!("cannot create a temporary folder: {e}")))?;
    // Locked while it is assembled: another run's clean-up leaves it alone.
    let _lock = std::fs::File::open(staging.path()).inspect(crate::io::lock_exclusive);
    write_folder(
        staging.path(),
        component,
        &config_text,
        &made,
        scheduler_text,
        pipeline,
        denoiser_class,
        scheduler_class,
        seed,
    )?;
    if !out.exists() {
        let staged = staging.keep();
        std::fs::rename(&staged, out).map_err(|e| {
            let _ = std::fs::remove_dir_all(&staged);
            Error::io(
                out,
                format!("cannot move the finished folder into place: {e}"),
            )
        })?;
        return Ok(());
    }
    // An existing folder (empty, or an earlier init's with --force): its old entries go,
    // then the new ones move in; the staging folder is removed when `staging` drops.
    folder.prepare(&previous)?;
    for e in std::fs::read_dir(staging.path()).map_err(|e| Error::io(staging.path(), e))? {
        let e = e.map_err(|e| Error::io(staging.path(), e))?;
        let to = out.join(e.file_name());
        std::fs::rename(e.path(), &to).map_err(|err| {
            Error::io(
                &to,
                format!("cannot move the finished file into place: {err}"),
            )
        })?;
    }
    Ok(())
}

/// Whether an entry of an `init --out` folder is one `init` writes: `model_index.json`, or a
/// `unet/`, `transformer/` or `scheduler/` folder holding only the files init puts there.
fn written_by_init(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return false;
    };
    match name {
        "model_index.json" => meta.is_file(),
        "unet" | "transformer" | "scheduler" if meta.is_dir() => std::fs::read_dir(p)
            .map(|entries| {
                entries.flatten().all(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let file = e.file_type().is_ok_and(|t| t.is_file());
                    crate::io::is_temp_name(&n)
                        || (file
                            && matches!(
                                n.as_str(),
                                "config.json"
                                    | "diffusion_pytorch_model.safetensors"
                                    | "scheduler_config.json"
                            ))
                })
            })
            .unwrap_or(false),
        _ => false,
    }
}

#[allow(clippy::too_many_arguments)]
fn write_folder(
    out: &Path,
    component: &str,
    config_text: &str,
    made: &HashMap<String, Tensor>,
    scheduler_text: &str,
    pipeline: &str,
    denoiser_class: &str,
    scheduler_class: &str,
    seed: u64,
) -> Result<()> {
    let model_dir = out.join(component);
    let sched_dir = out.join("scheduler");
    for d in [&model_dir, &sched_dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    write_bytes_atomic(&model_dir.join("config.json"), config_text.as_bytes())?;
    save_safetensors(&model_dir.join("diffusion_pytorch_model.safetensors"), made)?;
    write_bytes_atomic(
        &sched_dir.join("scheduler_config.json"),
        scheduler_text.as_bytes(),
    )?;
    let index = serde_json::json!({
        "_class_name": pipeline,
        "_hybridiff_init": { "seed": seed },
        component: ["diffusers", denoiser_class],
        "scheduler": ["diffusers", scheduler_class],
    });
    write_bytes_atomic(
        &out.join("model_index.json"),
        serde_json::to_string_pretty(&index)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(())
}
