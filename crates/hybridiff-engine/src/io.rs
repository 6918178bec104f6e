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

/// Largest magnitude accepted in an input tensor. Real latents and text embeddings stay
/// within a few hundred; values near f32's range overflow the attention products to NaN.
pub const MAX_INPUT_ABS: f64 = 1e6;

/// What a path that exists but is not a regular file is ("a folder", "a FIFO (named
/// pipe)", "a character device"); `None` for regular files and missing paths. Symbolic
/// links are followed.
pub fn special_file_kind(path: &Path) -> Option<&'static str> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return None;
    }
    if meta.is_dir() {
        return Some("a folder");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return Some("a FIFO (named pipe)");
        }
        if t.is_char_device() {
            return Some("a character device");
        }
        if t.is_block_device() {
            return Some("a block device");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    Some("not a regular file")
}

/// Refuses to replace anything but a regular file: outputs are written to a temporary
/// file and renamed over the target, which would replace a device node or a FIFO
/// (`/dev/null` as root) with our file.
///
/// A symbolic link (to a file, or dangling) is refused too: renaming over it would
/// replace the link and leave its target untouched, and writing through it would not be
/// atomic; the message names the target to give instead.
fn refuse_special_target(path: &Path, flag: &str) -> Result<()> {
    if let Some(kind) = special_file_kind(path) {
        return Err(Error::io(
            path,
            format!(
                "{flag}: is {kind}; outputs only replace regular files (write to a file and copy it there yourself)"
            ),
        ));
    }
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if is_link {
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(Error::io(
            path,
            format!(
                "{flag}: is a symbolic link (to {target}); outputs never replace or write through links: give the target's path, or remove the link"
            ),
        ));
    }
    Ok(())
}

/// The same file, or the same path for files that do not exist yet.
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    let norm = |p: &Path| {
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        (
            parent
                .canonicalize()
                .unwrap_or_else(|_| parent.to_path_buf()),
            p.file_name().map(|n| n.to_os_string()),
        )
    };
    norm(a) == norm(b)
}

/// Refuses output paths that name the same file twice, or name an input: one output
/// would overwrite the other, or the job would destroy what it reads. `outputs` and
/// `inputs` are `(flag, path)` pairs.
pub fn check_distinct_paths(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (fa, a)) in outputs.iter().enumerate() {
        for (fb, b) in outputs.iter().skip(i + 1) {
            if same_file(a, b) {
                return Err(Error::Options(format!(
                    "{fa} and {fb} name the same file ({}); one output would overwrite the other",
                    a.display()
                )));
            }
        }
        for (fb, b) in inputs {
            if same_file(a, b) {
                return Err(Error::Options(format!(
                    "{fa} {} is also {fb}: writing it would destroy the input",
                    a.display()
                )));
            }
        }
    }
    Ok(())
}

/// `path` with symbolic links and `..` resolved as far as it exists: the deepest existing
/// ancestor is canonicalised and the rest appended (outputs usually do not exist yet).
fn resolve_lossy(path: &Path) -> std::path::PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| Path::new(".").to_path_buf())
            .join(path)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            return rest.iter().rev().fold(c, |acc, n| acc.join(n));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuses outputs inside `folder` (a model's folder, named by `what` such as
/// "--model"): writing there would replace the weights or configs the job reads. Both
/// the path (its folder resolved) and, for an existing file or link, its final target
/// are checked.
pub fn check_outside_folder(outputs: &[(&str, &Path)], folder: &Path, what: &str) -> Result<()> {
    let Ok(root) = folder.canonicalize() else {
        return Ok(());
    };
    for (flag, out) in outputs {
        let mut candidates = vec![resolve_lossy(out)];
        if let (Some(parent), Some(name)) = (out.parent(), out.file_name()) {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            candidates.push(resolve_lossy(parent).join(name));
        }
        if root.is_file() && candidates.contains(&root) {
            return Err(Error::Options(format!(
                "{flag} {}: is {what} {}; writing it would destroy that input",
                out.display(),
                folder.display()
            )));
        }
        if candidates.iter().any(|c| c.starts_with(&root)) {
            return Err(Error::Options(format!(
                "{flag} {}: is inside {what} {}; outputs never go into the model's folder (they could replace its weights)",
                out.display(),
                folder.display()
            )));
        }
    }
    Ok(())
}

/// Checks that the folder an output goes to exists and that the output would replace
/// nothing but a regular file, before any compute is spent.
pub fn check_output_path(path: &Path, flag: &str) -> Result<()> {
    if path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(Error::io(
            path,
            format!("{flag}: ends with `/`, a folder; expected a file path"),
        ));
    }
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
    refuse_special_target(path, flag)?;
    check_writable_folder(parent, path, flag)
}

/// Creates and removes a temporary file in `folder`, as writing `path` will: a read-only
/// folder, or one under `/proc` or `/sys`, is refused before any compute is spent.
pub fn check_writable_folder(folder: &Path, path: &Path, flag: &str) -> Result<()> {
    tempfile::Builder::new()
        .prefix(".hybridiff-probe-")
        .tempfile_in(folder)
        .map(drop)
        .map_err(|e| {
            Error::io(
                path,
                format!(
                    "{flag}: cannot write in the folder {}: {e}",
                    folder.display()
                ),
            )
        })
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
    // Checked again here: batch outputs are named inside a folder, and the target may
    // have appeared since the flags were checked.
    refuse_special_target(path, "output")?;
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

/// Encodes an RGB8 image as PNG bytes; `path` (where it will go) names errors.
pub fn encode_png(path: &Path, width: u32, height: u32, rgb: Vec<u8>) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::io(path, "image buffer does not match its size"))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Writes an RGB8 image as PNG, atomically.
pub fn save_png(path: &Path, width: u32, height: u32, rgb: Vec<u8>) -> Result<()> {
    write_bytes_atomic(path, &encode_png(path, width, height, rgb)?)
}

/// Loads a safetensors file, with errors that name it: a missing path, a folder, FIFO
/// or device, and a file whose tensors would not fit in memory are refused first.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if let Some(kind) = special_file_kind(path) {
        return Err(Error::io(
            path,
            format!("is {kind}, expected a safetensors file"),
        ));
    }
    if !path.is_file() {
        return Err(Error::io(path, "file not found"));
    }
    // The tensors take about the file's size once loaded (a sparse file can claim more
    // than the disk holds).
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    hybridiff_models::memory::check(&format!("reading {}", path.display()), len as u128)
        .map_err(Error::Memory)?;
    candle_core::safetensors::load(path, device).map_err(|e| {
        Error::io(
            path,
            format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        )
    })
}

/// Loads only the tensors of `wanted` that a safetensors file has, by its header: other
/// tensors are never converted (an unused tensor of a dtype candle cannot read does not
/// block the file), and a wanted tensor of an unsupported dtype (int8, bool, fp8, ...) is
/// refused naming the tensor, the file and the dtype. Returns the tensors found and the
/// names of the file's other tensors, sorted.
pub fn load_safetensors_named(
    path: &Path,
    device: &Device,
    wanted: &[&str],
) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    if let Some(kind) = special_file_kind(path) {
        return Err(Error::io(
            path,
            format!("is {kind}, expected a safetensors file"),
        ));
    }
    if !path.is_file() {
        return Err(Error::io(path, "file not found"));
    }
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    hybridiff_models::memory::check(&format!("reading {}", path.display()), len as u128)
        .map_err(Error::Memory)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::io(
            path,
            format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        )
    })?;
    let mut found = HashMap::new();
    let mut others = Vec::new();
    for (name, view) in st.tensors() {
        if !wanted.contains(&name.as_str()) {
            others.push(name);
            continue;
        }
        use safetensors::Dtype as D;
        if !matches!(
            view.dtype(),
            D::F16 | D::BF16 | D::F32 | D::F64 | D::U8 | D::U32 | D::I16 | D::I32 | D::I64
        ) {
            return Err(Error::Input(format!(
                "{}: tensor `{name}` has dtype {:?}, which cannot be read; expected floating point (f32, f16, bf16 or f64)",
                path.display(),
                view.dtype()
            )));
        }
        use candle_core::safetensors::Load;
        let t = view
            .load(device)
            .map_err(|e| Error::io(path, format!("tensor `{name}`: cannot read it ({e})")))?;
        found.insert(name, t);
    }
    others.sort();
    Ok((found, others))
}

/// Refuses a tensor read from `path` that holds NaN, an infinity or a value beyond
/// [`MAX_INPUT_ABS`], naming the tensor, the file and the first offending index.
pub fn check_finite(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` holds a non-finite value ({}) at flat index {i}",
            path.display(),
            v[i]
        )));
    }
    if let Some(i) = v.iter().position(|x| x.abs() > MAX_INPUT_ABS) {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` holds {:.3e} at flat index {i}; values beyond ±{MAX_INPUT_ABS:e} overflow the attention to NaN (real latents and embeddings stay within a few hundred)",
            path.display(),
            v[i]
        )));
    }
    Ok(())
}

/// A tensor read from `path` as f32: floating dtypes are converted, integer and boolean
/// ones refused (the samplers would run in integer arithmetic), naming tensor and file.
pub fn float_tensor(path: &Path, name: &str, t: &Tensor) -> Result<Tensor> {
    if !t.dtype().is_float() {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` has dtype {:?}; expected floating point (f32, f16, bf16 or f64)",
            path.display(),
            t.dtype()
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

impl DenoiseInputs {
    /// The same inputs on `device` (no copy for tensors already there).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let cond = |c: &Conditioning| -> Result<Conditioning> {
            let opt = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                Ok(match t {
                    Some(t) => Some(t.to_device(device)?),
                    None => None,
                })
            };
            Ok(Conditioning {
                prompt_embeds: c.prompt_embeds.to_device(device)?,
                pooled: opt(&c.pooled)?,
                time_ids: opt(&c.time_ids)?,
            })
        };
        Ok(Self {
            latents: self.latents.to_device(device)?,
            cond: cond(&self.cond)?,
            uncond: cond(&self.uncond)?,
        })
    }

    /// Loads and validates an inputs file against the denoiser's expectations:
    /// `latent_channels` channels, `context_dim`-wide embeddings and `pooled_dim` pooled
    /// embeddings (when the model takes them). `time_ids`, when the file has none, are
    /// `[H, W, 0, 0, H, W]` in pixels (`vae_factor` times the latent size).
    pub fn load(path: &Path, spec: &InputSpec, device: &Device) -> Result<Self> {
        let wanted: Vec<&str> = REQUIRED.iter().copied().chain(["time_ids"]).collect();
        let (mut t, others) = load_safetensors_named(path, device, &wanted)?;
        for name in &others {
            let hint = if name == "add_time_ids" {
                " (diffusers' name; rename it `time_ids` to use it)"
            } else {
                ""
            };
            tracing::warn!(
                "{}: ignoring tensor `{name}`, which denoising does not use{hint}; it reads {wanted:?}",
                path.display()
            );
        }
        for name in REQUIRED {
            if !t.contains_key(name) {
                let have: Vec<&String> = t.keys().collect();
                return Err(Error::Input(format!(
                    "{}: tensor `{name}` is missing (the file has {have:?}); expected {REQUIRED:?}",
                    path.display()
                )));
            }
        }
        for (name, tensor) in t.iter_mut() {
            if REQUIRED.contains(&name.as_str()) || name == "time_ids" {
                *tensor = float_tensor(path, name, tensor)?;
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
                    check_finite(path, "time_ids", &ti)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_named_and_regular_ones_pass() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(special_file_kind(&file), None);
        assert_eq!(special_file_kind(&dir.path().join("missing")), None);
        assert_eq!(special_file_kind(dir.path()), Some("a folder"));
        #[cfg(unix)]
        {
            let null = dir.path().join("null");
            std::os::unix::fs::symlink("/dev/null", &null).unwrap();
            assert_eq!(special_file_kind(&null), Some("a character device"));
            let e = check_output_path(&null, "--out").unwrap_err().to_string();
            assert!(e.contains("only replace regular files"), "{e}");
            // Written through the atomic writer too: refused, and /dev/null untouched.
            let e = write_bytes_atomic(&null, b"x").unwrap_err().to_string();
            assert!(e.contains("character device"), "{e}");
            assert!(std::fs::symlink_metadata(&null)
                .unwrap()
                .file_type()
                .is_symlink());
        }
    }

    #[test]
    fn outputs_must_differ_from_each_other_and_from_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        assert!(check_distinct_paths(&[("--out", &a), ("--trace", &b)], &[]).is_ok());
        // Not yet existing: compared by folder and name, whatever the spelling.
        let a2 = dir.path().join(".").join("a");
        let e = check_distinct_paths(&[("--out", &a), ("--decode", &a2)], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--out and --decode"), "{e}");
        // Existing: the same file under another name.
        std::fs::write(&a, "in").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&a, &b).unwrap();
            let e = check_distinct_paths(&[("--out", &b)], &[("--inputs", &a)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--inputs"), "{e}");
        }
    }
}
