//! Reading job inputs and writing outputs. Every output is written to a temporary file
//! in the destination folder and renamed into place, so a failed run never leaves a
//! half-written file.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::Conditioning;

use crate::{Error, Result};

/// The tensors of a `--inputs` file: starting latents and the CFG branches' embeddings.
#[derive(Debug, Clone)]
pub struct DenoiseInputs {
    /// `[1, C, h, w]` initial noise.
    pub latents: Tensor,
    pub cond: Conditioning,
    pub uncond: Conditioning,
}

const REQUIRED: [&str; 5] = [
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
];

/// Checks that the folder an output goes to exists, before any compute is spent.
pub fn check_output_path(path: &Path, flag: &str) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            msg: format!(
                "{flag}: the folder {} does not exist; create it first",
                parent.display()
            ),
        });
    }
    if path.is_dir() {
        return Err(Error::io(
            path,
            format!("{flag}: is a folder, expected a file path"),
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".hybridiff-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| {
            Error::io(
                path,
                format!("cannot create a temporary file next to it: {e}"),
            )
        })?;
    write(tmp.path())?;
    // Temporary files are private (0600); a finished output gets the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path).map_err(|e| {
        Error::io(
            path,
            format!("cannot move the finished file into place: {e}"),
        )
    })?;
    Ok(())
}

/// Writes bytes atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(path, e))?;
        f.sync_all().map_err(|e| Error::io(path, e))
    })
}

/// Writes named tensors as a safetensors file, atomically.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_atomic(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(|e| Error::io(path, e))
    })
}

/// Writes an RGB8 image as PNG, atomically.
pub fn save_png(path: &Path, width: u32, height: u32, rgb: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::io(path, "image buffer does not match its size"))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::io(path, e))?;
    write_bytes_atomic(path, &bytes)
}

/// Loads a safetensors file, with errors that name it.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::io(path, "file not found"));
    }
    candle_core::safetensors::load(path, device).map_err(|e| {
        Error::io(
            path,
            format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        )
    })
}

fn check_finite(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` holds a non-finite value ({}) at flat index {i}",
            path.display(),
            v[i]
        )));
    }
    Ok(())
}

impl DenoiseInputs {
    /// Loads and validates an inputs file against the denoiser's expectations:
    /// `latent_channels` channels, `context_dim`-wide embeddings and `pooled_dim` pooled
    /// embeddings (when the model takes them). `time_ids`, when the file has none, are
    /// `[H, W, 0, 0, H, W]` in pixels (`vae_factor` times the latent size).
    pub fn load(path: &Path, spec: &InputSpec, device: &Device) -> Result<Self> {
        let mut t = load_safetensors(path, device)?;
        for name in REQUIRED {
            if !t.contains_key(name) {
                let have: Vec<&String> = t.keys().collect();
                return Err(Error::Input(format!(
                    "{}: tensor `{name}` is missing (the file has {have:?}); expected {REQUIRED:?}",
                    path.display()
                )));
            }
        }
        let shape_err = |name: &str, got: &[usize], want: String| {
            Error::Input(format!(
                "{}: tensor `{name}` has shape {got:?}, expected {want}",
                path.display()
            ))
        };
        let latents = t.remove("latents").expect("checked");
        let ld = latents.dims().to_vec();
        if ld.len() != 4 || ld[0] != 1 || ld[1] != spec.latent_channels {
            return Err(shape_err(
                "latents",
                &ld,
                format!("[1, {}, h, w]", spec.latent_channels),
            ));
        }
        let f = spec.latent_multiple;
        if ld[2] % f != 0 || ld[3] % f != 0 || ld[2] == 0 || ld[3] == 0 {
            return Err(shape_err(
                "latents",
                &ld,
                format!("height and width divisible by {f}"),
            ));
        }
        let mut embeds = HashMap::new();
        for name in ["prompt_embeds", "negative_prompt_embeds"] {
            let e = t.remove(name).expect("checked");
            let d = e.dims();
            if d.len() != 3 || d[0] != 1 || d[2] != spec.context_dim {
                return Err(shape_err(name, d, format!("[1, L, {}]", spec.context_dim)));
            }
            embeds.insert(name, e);
        }
        let (pl, nl) = (
            embeds["prompt_embeds"].dim(1)?,
            embeds["negative_prompt_embeds"].dim(1)?,
        );
        if pl != nl {
            return Err(Error::Input(format!(
                "{}: `prompt_embeds` has {pl} tokens but `negative_prompt_embeds` {nl}; both branches need the same length",
                path.display()
            )));
        }
        for name in ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"] {
            let e = t.remove(name).expect("checked");
            let d = e.dims();
            if let Some(p) = spec.pooled_dim {
                if d != [1, p] {
                    return Err(shape_err(name, d, format!("[1, {p}]")));
                }
            }
            embeds.insert(name, e);
        }
        for (name, e) in embeds.iter() {
            check_finite(path, name, e)?;
        }
        check_finite(path, "latents", &latents)?;
        let time_ids = if spec.time_ids {
            Some(match t.remove("time_ids") {
                Some(ti) => {
                    if ti.elem_count() != 6 {
                        return Err(shape_err("time_ids", ti.dims(), "[1, 6]".into()));
                    }
                    ti.reshape((1, 6))?.to_dtype(DType::F32)?
                }
                None => {
                    let (h, w) = (
                        (ld[2] * spec.vae_factor) as f32,
                        (ld[3] * spec.vae_factor) as f32,
                    );
                    Tensor::new(&[[h, w, 0.0, 0.0, h, w]], device)?
                }
            })
        } else {
            None
        };
        let cond = Conditioning {
            prompt_embeds: embeds["prompt_embeds"].clone(),
            pooled: Some(embeds["pooled_prompt_embeds"].clone()),
            time_ids: time_ids.clone(),
        };
        let uncond = Conditioning {
            prompt_embeds: embeds["negative_prompt_embeds"].clone(),
            pooled: Some(embeds["negative_pooled_prompt_embeds"].clone()),
            time_ids,
        };
        Ok(Self {
            latents,
            cond,
            uncond,
        })
    }
}

/// What a model expects of an inputs file.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub latent_channels: usize,
    /// Latent height and width must be multiples of this.
    pub latent_multiple: usize,
    pub context_dim: usize,
    pub pooled_dim: Option<usize>,
    /// Whether the model takes SDXL `time_ids`.
    pub time_ids: bool,
    /// Pixels per latent pixel.
    pub vae_factor: usize,
}
