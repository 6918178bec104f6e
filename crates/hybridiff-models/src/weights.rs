//! Loading diffusers weight files: single, sharded (`*.safetensors.index.json`) and
//! `fp16`-variant safetensors, memory-mapped, behind a `VarBuilder` whose errors name
//! the tensor, the expected shape and the file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The weight file stems diffusers uses, per component kind.
const STEMS: &[&str] = &["diffusion_pytorch_model", "model"];

/// Memory-mapped safetensors files of one model component, with a name -> file routing.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
    /// Names the model asked for, to report the ones it did not (diffusers' "unexpected keys").
    used: Arc<Mutex<HashSet<String>>>,
}

/// Largest config or index JSON read (real ones are a few KiB; a sharded index of a big
/// model is well under 1 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// What a path that is not a regular file is, for messages ("a folder", "a FIFO").
pub fn non_regular_kind(path: &Path) -> Option<&'static str> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Some("not found"),
    };
    if meta.is_file() {
        return None;
    }
    if meta.is_dir() {
        return Some("is a folder, not a file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return Some("is a FIFO (named pipe), not a regular file");
        }
        if t.is_char_device() || t.is_block_device() {
            return Some("is a device, not a regular file");
        }
        if t.is_socket() {
            return Some("is a socket, not a regular file");
        }
    }
    Some("is not a regular file")
}

/// Reads a text file of at most `max` bytes, refusing folders, FIFOs and devices (which
/// would block or never end) and larger files, with messages naming the path.
pub fn read_text_bounded(path: &Path, max: u64) -> Result<String> {
    if let Some(kind) = non_regular_kind(path) {
        return Err(Error::io(path, kind));
    }
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > max {
        return Err(Error::io(
            path,
            format!(
                "is {}, more than the {} a file of this kind may have",
                crate::memory::bytes(len as u128),
                crate::memory::bytes(max as u128)
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text =
        String::from_utf8(bytes).map_err(|e| Error::io(path, format!("not UTF-8 text: {e}")))?;
    // Editors on Windows may start UTF-8 files with a byte-order mark.
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// The index and value of the first non-finite element of `t`, if any.
pub fn first_non_finite(t: &Tensor) -> candle_core::Result<Option<(usize, f64)>> {
    if !t.dtype().is_float() {
        return Ok(None);
    }
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])))
}

impl Weights {
    /// Opens the given safetensors files (memory-mapped).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (idx, path) in paths.iter().enumerate() {
            if let Some(kind) = non_regular_kind(path) {
                let kind = if kind == "not found" {
                    "weight file not found"
                } else {
                    kind
                };
                return Err(Error::io(path, kind));
            }
            // SAFETY: the file is mapped read-only; like every mmap user we rely on it
            // not being truncated by another process while we run.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                Error::Weights(format!(
                    "{}: not a valid safetensors file ({e}); is it truncated or corrupt? re-download or re-export it",
                    path.display()
                ))
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, idx);
            }
            files.push((path.clone(), st));
        }
        Ok(Self {
            files,
            routing,
            used: Arc::default(),
        })
    }

    /// Bytes the tensors take once loaded in `dtype`, from the files' headers (nothing is
    /// read); integer tensors count at their stored size.
    pub fn bytes_in(&self, dtype: DType) -> u128 {
        let mut total = 0u128;
        for (_, st) in &self.files {
            for (_, view) in st.tensors() {
                let n: u128 = view.shape().iter().map(|&d| d as u128).product();
                let stored = DType::try_from(view.dtype()).ok();
                let size = match stored {
                    Some(d) if d.is_float() => dtype.size_in_bytes(),
                    Some(d) => d.size_in_bytes(),
                    None => 8,
                };
                total = total.saturating_add(n.saturating_mul(size as u128));
            }
        }
        total
    }

    /// Opens a component folder, checks that its weights fit in memory (see
    /// [`crate::memory::limit`]), builds a model with `build`, then warns about tensors
    /// the model did not read, as diffusers reports "unexpected keys", except those whose
    /// names start with one of `unused_ok` (e.g. a VAE's `encoder.`, which the decoder
    /// never needs). Missing tensors are errors from `build`.
    pub fn load_component<T, E: From<Error>>(
        dir: &Path,
        dtype: DType,
        dev: &Device,
        unused_ok: &[&str],
        build: impl FnOnce(VarBuilder<'static>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let weights = Self::from_component_dir(dir)?;
        crate::memory::check(
            &format!("loading the weights of {}", dir.display()),
            weights.bytes_in(dtype),
        )
        .map_err(Error::Weights)?;
        let used = weights.used.clone();
        let names: Vec<String> = weights.routing.keys().cloned().collect();
        let files = weights.file_list();
        let model = build(weights.into_var_builder(dtype, dev))?;
        let used = used.lock().expect("no panics while holding the lock");
        let mut unused: Vec<&String> = names
            .iter()
            .filter(|n| !used.contains(*n) && !unused_ok.iter().any(|p| n.starts_with(p)))
            .collect();
        if !unused.is_empty() {
            unused.sort();
            let shown: Vec<&str> = unused.iter().take(8).map(|s| s.as_str()).collect();
            tracing::warn!(
                "{files}: {} tensor(s) the model does not use (unexpected keys; does config.json match the checkpoint?): {}{}",
                unused.len(),
                shown.join(", "),
                if unused.len() > shown.len() { ", ..." } else { "" }
            );
        }
        Ok(model)
    }

    /// Finds the weight files of a diffusers component folder (e.g. `<model>/unet`):
    /// `diffusion_pytorch_model[.fp16].safetensors`, or the sharded index
    /// `diffusion_pytorch_model.safetensors.index[.fp16].json` (also with the `model` stem).
    pub fn from_component_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(dir, "model component folder not found"));
        }
        for variant in ["", ".fp16"] {
            for stem in STEMS {
                let single = dir.join(format!("{stem}{variant}.safetensors"));
                if single.is_file() {
                    return Self::open(&[single]);
                }
                let index = dir.join(format!("{stem}.safetensors.index{variant}.json"));
                if index.is_file() {
                    return Self::open(&shards_of(&index)?);
                }
            }
        }
        Err(Error::io(
            dir,
            "no weights found: expected diffusion_pytorch_model.safetensors, a sharded \
             *.safetensors.index.json, or their .fp16 variants",
        ))
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(|s| s.as_str())
    }

    fn file_list(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        names.join(", ")
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let idx = *self.routing.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "missing tensor `{name}` in {}: the checkpoint does not match its config.json",
                self.file_list()
            ))
        })?;
        let (path, st) = &self.files[idx];
        let t = st.load(name, dev).map_err(|e| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` in {} cannot be read: {e}",
                path.display()
            ))
        })?;
        // Converting integers would run the model on silently rounded weights.
        if !t.dtype().is_float() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} has dtype {:?}; weights must be floating point (f32, f16, bf16 or f64)",
                path.display(),
                t.dtype()
            )));
        }
        let t = t.to_dtype(dtype)?;
        // After the conversion, so that values beyond f16's range are caught too.
        if let Some((i, v)) = first_non_finite(&t)? {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} holds a non-finite value ({v}) at flat index {i} in {dtype:?}; the checkpoint is damaged{}",
                path.display(),
                if dtype == DType::F16 { " or does not fit f16 (try --dtype f32)" } else { "" }
            )));
        }
        self.used
            .lock()
            .expect("no panics while holding the lock")
            .insert(name.to_string());
        Ok(t)
    }

    /// Wraps these weights into a `VarBuilder` of the given dtype and device.
    pub fn into_var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self);
        VarBuilder::from_backend(backend, dtype, dev.clone())
    }
}

fn shards_of(index: &Path) -> Result<Vec<PathBuf>> {
    let text = read_text_bounded(index, MAX_CONFIG_BYTES)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index.to_path_buf(),
        msg: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: index.to_path_buf(),
            msg: "no `weight_map` object".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for v in map.values() {
        let f = v.as_str().ok_or_else(|| Error::Config {
            path: index.to_path_buf(),
            msg: "`weight_map` values must be file names".into(),
        })?;
        let p = dir.join(f);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    Ok(files)
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            let file = &self.files[self.routing[name]].0;
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} has shape {:?}, expected {:?} from config.json",
                file.display(),
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

/// Reads a JSON config file into `T`, with errors naming the file.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text_bounded(path, MAX_CONFIG_BYTES)?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}
