//! Loading diffusers weight files: single, sharded (`*.safetensors.index.json`) and
//! `fp16`-variant safetensors, memory-mapped, behind a `VarBuilder` whose errors name
//! the tensor, the expected shape and the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
}

impl Weights {
    /// Opens the given safetensors files (memory-mapped).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (idx, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(Error::io(path, "weight file not found"));
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
        Ok(Self { files, routing })
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
        t.to_dtype(dtype)
    }

    /// Wraps these weights into a `VarBuilder` of the given dtype and device.
    pub fn into_var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self);
        VarBuilder::from_backend(backend, dtype, dev.clone())
    }
}

fn shards_of(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
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
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}
