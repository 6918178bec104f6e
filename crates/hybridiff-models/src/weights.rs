//! Loading diffusers weight files: single, sharded (`*.safetensors.index.json`) and
//! `fp16`-variant safetensors, memory-mapped, behind a `VarBuilder` whose errors name
//! the tensor, the expected shape and the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The weight file stems diffusers uses, per component kind.
const STEMS: &[&str] = &["diffusion_pytorch_model", "model"];

/// Memory-mapped safetensors files of one model component (or of a whole single-file
/// checkpoint), with a name -> file routing. Opening maps the files and parses their
/// headers; no tensor data is read until a tensor is loaded.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
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
        Ok(Self { files, routing })
    }

    /// Bytes the tensors take once loaded in `dtype`, from the files' headers (nothing is
    /// read); integer tensors count at their stored size.
    pub fn bytes_in(&self, dtype: DType) -> u128 {
        let mut total = 0u128;
        for (_, st) in &self.files {
            for (_, view) in st.tensors() {
                let stored = DType::try_from(view.dtype()).ok();
                total = total.saturating_add(tensor_bytes(view.shape(), stored, dtype));
            }
        }
        total
    }

    /// The shape and stored dtype of tensor `name`, from the header (nothing is read).
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, Option<DType>)> {
        let (_, st) = &self.files[*self.routing.get(name)?];
        let view = st.get(name).ok()?;
        Some((Vec::from(view.shape()), DType::try_from(view.dtype()).ok()))
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.routing.get(name).map(|&i| self.files[i].0.as_path())
    }

    /// Opens a component folder and builds a model from it: see
    /// [`ComponentSource::load`] (this is that, for `ComponentSource::folder(dir)`).
    pub fn load_component<T, E: From<Error>>(
        dir: &Path,
        dtype: DType,
        dev: &Device,
        unused_ok: &[&str],
        build: impl FnOnce(VarBuilder<'static>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        ComponentSource::folder(dir).load(dtype, dev, unused_ok, build)
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

    /// Tensor `name` as stored (any dtype), with errors naming it and its file.
    pub fn load_raw(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let idx = *self.routing.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "missing tensor `{name}` in {}: the checkpoint does not match its config.json",
                self.file_list()
            ))
        })?;
        let (path, st) = &self.files[idx];
        st.load(name, dev).map_err(|e| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` in {} cannot be read: {e}",
                path.display()
            ))
        })
    }

    /// Wraps these weights into a `VarBuilder` of the given dtype and device.
    pub fn into_var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        let backend = Backend {
            loader: Loader::Files(self),
            patches: None,
            used: Arc::default(),
        };
        let backend: Box<dyn SimpleBackend> = Box::new(backend);
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

/// Reads a JSON config file into `T`, with errors naming the file.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text_bounded(path, MAX_CONFIG_BYTES)?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Parses config text into `T`; `path` names it in errors.
pub fn parse_config<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Bytes a tensor of `shape` takes once loaded in `dtype` (integer tensors at their stored
/// size; an unknown stored dtype counts as 8 bytes per element).
fn tensor_bytes(shape: &[usize], stored: Option<DType>, dtype: DType) -> u128 {
    let n: u128 = shape.iter().map(|&d| d as u128).product();
    let size = match stored {
        Some(d) if d.is_float() => dtype.size_in_bytes(),
        Some(d) => d.size_in_bytes(),
        None => 8,
    };
    n.saturating_mul(size as u128)
}

/// How a component tensor is cut from a checkpoint tensor (original-layout checkpoints
/// store some weights fused or transposed; see `crate::ldm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// The tensor as stored.
    None,
    /// Rows `start..start + len` of dimension 0 (OpenCLIP's fused `in_proj` into q, k, v).
    Rows { start: usize, len: usize },
    /// The transpose of a matrix (OpenCLIP's `text_projection` is `x @ P`, a Linear is
    /// `x @ W^T`).
    Transpose,
    /// A `[out, in, 1, 1]` or `[out, in, 1]` convolution weight as the `[out, in]` matrix
    /// of a Linear (the LDM VAE's attention projections).
    Squeeze,
}

/// One component tensor taken from a checkpoint tensor.
#[derive(Debug, Clone)]
pub struct Mapped {
    /// The tensor's name in the checkpoint.
    pub source: String,
    pub transform: Transform,
    /// Shape after the transform.
    pub shape: Vec<usize>,
    /// The stored dtype.
    pub dtype: Option<DType>,
}

/// The tensors of one component inside a checkpoint that holds several (a single-file
/// SD / SDXL checkpoint), under the component's diffusers names.
pub struct MappedTensors {
    /// The opened checkpoint (shared by every component taken from it).
    pub file: Arc<Weights>,
    /// Diffusers name -> where it comes from.
    pub map: BTreeMap<String, Mapped>,
    /// Names the component in messages, e.g. `model.safetensors (unet)`.
    pub label: String,
}

/// Where a component's `config.json` comes from.
#[derive(Debug, Clone)]
enum ConfigSource {
    File(PathBuf),
    /// Built in, or taken from another folder; `path` names it in messages.
    Text {
        path: PathBuf,
        text: Arc<str>,
    },
}

/// Where a component's tensors come from.
#[derive(Clone)]
enum WeightsSource {
    /// A diffusers component folder (`unet/`, `vae/`, `text_encoder/`, ...).
    Folder(PathBuf),
    /// A file of the component alone, under diffusers names (e.g. a VAE `.safetensors`).
    File(PathBuf),
    /// Part of a single-file checkpoint.
    Mapped(Arc<MappedTensors>),
}

/// A model component to load: its config and its tensors, wherever they come from, plus
/// the LoRA deltas to merge into them as they are loaded.
#[derive(Clone)]
pub struct ComponentSource {
    label: PathBuf,
    config: ConfigSource,
    weights: WeightsSource,
    patches: Option<Arc<crate::lora::ComponentPatches>>,
}

impl std::fmt::Debug for ComponentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentSource")
            .field("label", &self.label)
            .field("config", &self.config_path())
            .field("lora", &self.patches.as_ref().map(|p| p.len()))
            .finish()
    }
}

impl ComponentSource {
    /// A diffusers component folder: `dir/config.json` and the weights in `dir`.
    pub fn folder(dir: &Path) -> Self {
        Self {
            label: dir.to_path_buf(),
            config: ConfigSource::File(dir.join("config.json")),
            weights: WeightsSource::Folder(dir.to_path_buf()),
            patches: None,
        }
    }

    /// A component of a single-file checkpoint with the config `config_text` (named
    /// `config_path` in messages).
    pub fn mapped(tensors: Arc<MappedTensors>, config_path: PathBuf, config_text: &str) -> Self {
        Self {
            label: PathBuf::from(&tensors.label),
            config: ConfigSource::Text {
                path: config_path,
                text: Arc::from(config_text),
            },
            weights: WeightsSource::Mapped(tensors),
            patches: None,
        }
    }

    /// One safetensors file of a component's weights under diffusers names, with the config
    /// `config_text` (named `config_path` in messages).
    pub fn file(path: &Path, config_path: PathBuf, config_text: &str) -> Self {
        Self {
            label: path.to_path_buf(),
            config: ConfigSource::Text {
                path: config_path,
                text: Arc::from(config_text),
            },
            weights: WeightsSource::File(path.to_path_buf()),
            patches: None,
        }
    }

    /// This source with its config replaced by `text` (named `path` in messages).
    pub fn with_config(mut self, path: PathBuf, text: &str) -> Self {
        self.config = ConfigSource::Text {
            path,
            text: Arc::from(text),
        };
        self
    }

    /// This source with LoRA deltas merged into its tensors as they load.
    pub fn with_patches(mut self, patches: Arc<crate::lora::ComponentPatches>) -> Self {
        self.patches = (!patches.is_empty()).then_some(patches);
        self
    }

    /// The LoRA deltas merged into this component, if any.
    pub fn patches(&self) -> Option<&Arc<crate::lora::ComponentPatches>> {
        self.patches.as_ref()
    }

    /// The folder or file this component comes from, for messages.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// The config file (or what names a built-in config) for messages.
    pub fn config_path(&self) -> PathBuf {
        match &self.config {
            ConfigSource::File(p) => p.clone(),
            ConfigSource::Text { path, .. } => path.clone(),
        }
    }

    /// The config's text.
    pub fn config_text(&self) -> Result<String> {
        match &self.config {
            ConfigSource::File(p) => read_text_bounded(p, MAX_CONFIG_BYTES),
            ConfigSource::Text { text, .. } => Ok(text.to_string()),
        }
    }

    /// The config parsed into `T`, with errors naming it.
    pub fn read_config<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        parse_config(&self.config_text()?, &self.config_path())
    }

    /// Whether the config exists (a folder without `config.json` has none).
    pub fn has_config(&self) -> bool {
        match &self.config {
            ConfigSource::File(p) => p.is_file(),
            ConfigSource::Text { .. } => true,
        }
    }

    fn loader(&self) -> Result<Loader> {
        Ok(match &self.weights {
            WeightsSource::Folder(dir) => Loader::Files(Weights::from_component_dir(dir)?),
            WeightsSource::File(path) => Loader::Files(Weights::open(std::slice::from_ref(path))?),
            WeightsSource::Mapped(m) => Loader::Mapped(m.clone()),
        })
    }

    /// The component's tensor names and shapes under diffusers names, from the headers
    /// (no tensor data is read).
    pub fn tensor_shapes(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        let loader = self.loader()?;
        Ok(loader
            .names()
            .into_iter()
            .filter_map(|n| loader.shape(&n).map(|s| (n, s)))
            .collect())
    }

    /// Opens the weights, checks that they fit in memory (see [`crate::memory::limit`]),
    /// builds a model with `build`, then warns about tensors the model did not read, as
    /// diffusers reports "unexpected keys", except those whose names start with one of
    /// `unused_ok` (e.g. a VAE's `encoder.`, which the decoder never needs). Missing
    /// tensors are errors from `build`. LoRA deltas ([`Self::with_patches`]) are added to
    /// their tensors in f32 as each is loaded, once.
    pub fn load<T, E: From<Error>>(
        &self,
        dtype: DType,
        dev: &Device,
        unused_ok: &[&str],
        build: impl FnOnce(VarBuilder<'static>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let loader = self.loader()?;
        crate::memory::check(
            &format!("loading the weights of {}", self.label.display()),
            loader.bytes_in(dtype),
        )
        .map_err(Error::Weights)?;
        let names = loader.names();
        let files = loader.describe();
        let used: Arc<Mutex<HashSet<String>>> = Arc::default();
        let backend = Backend {
            loader,
            patches: self.patches.clone(),
            used: used.clone(),
        };
        let backend: Box<dyn SimpleBackend> = Box::new(backend);
        let model = build(VarBuilder::from_backend(backend, dtype, dev.clone()))?;
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
        if let Some(p) = &self.patches {
            let mut missed = p.unapplied(&used);
            // Weights a model knowingly skips (their outputs are discarded) take their
            // delta to no effect, as in diffusers.
            missed.retain(|n| !unused_ok.iter().any(|p| n.starts_with(p)));
            if !missed.is_empty() {
                return Err(Error::Weights(format!(
                    "{}: LoRA weights for {} tensor(s) the model never loaded: {}",
                    self.label.display(),
                    missed.len(),
                    missed.join(", ")
                ))
                .into());
            }
        }
        Ok(model)
    }
}

/// Where a [`Backend`] reads tensors.
enum Loader {
    Files(Weights),
    Mapped(Arc<MappedTensors>),
}

impl Loader {
    fn names(&self) -> Vec<String> {
        match self {
            Loader::Files(w) => w.routing.keys().cloned().collect(),
            Loader::Mapped(m) => m.map.keys().cloned().collect(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Loader::Files(w) => w.info(name).map(|i| i.0),
            Loader::Mapped(m) => m.map.get(name).map(|t| t.shape.clone()),
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            Loader::Files(w) => w.routing.contains_key(name),
            Loader::Mapped(m) => m.map.contains_key(name),
        }
    }

    fn bytes_in(&self, dtype: DType) -> u128 {
        match self {
            Loader::Files(w) => w.bytes_in(dtype),
            Loader::Mapped(m) => m
                .map
                .values()
                .map(|t| tensor_bytes(&t.shape, t.dtype, dtype))
                .fold(0u128, u128::saturating_add),
        }
    }

    fn describe(&self) -> String {
        match self {
            Loader::Files(w) => w.file_list(),
            Loader::Mapped(m) => m.label.clone(),
        }
    }

    /// Where `name` comes from, for messages: the file, and for a mapped tensor its name
    /// in the checkpoint.
    fn origin(&self, name: &str) -> String {
        match self {
            Loader::Files(w) => w
                .file_of(name)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| w.file_list()),
            Loader::Mapped(m) => match m.map.get(name) {
                Some(t) if t.source != name => {
                    let file = m
                        .file
                        .file_of(&t.source)
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    format!("{file} (checkpoint tensor `{}`)", t.source)
                }
                _ => m.label.clone(),
            },
        }
    }

    fn load_raw(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        match self {
            Loader::Files(w) => w.load_raw(name, dev),
            Loader::Mapped(m) => {
                let t = m.map.get(name).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "missing tensor `{name}` in {}: the checkpoint has no tensor that maps to it (is it of another model family, or does its config not match?)",
                        m.label
                    ))
                })?;
                let raw = m.file.load_raw(&t.source, dev)?;
                let out = match t.transform {
                    Transform::None => raw,
                    Transform::Rows { start, len } => raw.narrow(0, start, len)?.contiguous()?,
                    Transform::Transpose => raw.t()?.contiguous()?,
                    Transform::Squeeze => raw.reshape(t.shape.as_slice())?,
                };
                Ok(out)
            }
        }
    }
}

/// The `VarBuilder` backend of every component: reads a tensor, refuses integer and
/// non-finite weights, merges LoRA deltas, converts to the run's dtype and records what
/// the model read.
struct Backend {
    loader: Loader,
    patches: Option<Arc<crate::lora::ComponentPatches>>,
    used: Arc<Mutex<HashSet<String>>>,
}

impl Backend {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.loader.load_raw(name, dev)?;
        // Converting integers would run the model on silently rounded weights.
        if !t.dtype().is_float() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} has dtype {:?}; weights must be floating point (f32, f16, bf16 or f64)",
                self.loader.origin(name),
                t.dtype()
            )));
        }
        let t = match self
            .patches
            .as_ref()
            .map(|p| p.apply(name, &t))
            .transpose()?
        {
            Some(Some(merged)) => merged,
            _ => t,
        };
        let t = t.to_dtype(dtype)?;
        // After the conversion, so that values beyond f16's range are caught too.
        if let Some((i, v)) = first_non_finite(&t)? {
            let lora = if self.patches.as_ref().is_some_and(|p| p.touches(name)) {
                " after merging the LoRA (is its scale too large?)"
            } else {
                ""
            };
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} holds a non-finite value ({v}) at flat index {i} in {dtype:?}{lora}; the checkpoint is damaged{}",
                self.loader.origin(name),
                if dtype == DType::F16 { " or does not fit f16 (try --dtype f32)" } else { "" }
            )));
        }
        self.used
            .lock()
            .expect("no panics while holding the lock")
            .insert(name.to_string());
        Ok(t)
    }
}

impl SimpleBackend for Backend {
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
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} has shape {:?}, expected {:?} from config.json",
                self.loader.origin(name),
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
        self.loader.contains(name)
    }
}
