//! Single-file checkpoints in the original layout (the `.safetensors` files of SD 1.5, SD
//! 2.x and SDXL that A1111 and ComfyUI load): reading the header alone, refusing pickles,
//! telling the model family from tensor names and shapes, and presenting each component
//! (U-Net, VAE, text encoders) under its diffusers names ([`MappedTensors`]).
//!
//! Detection follows diffusers' `infer_diffusers_model_type` in what it tells apart and
//! why, by the prefixes of the text towers rather than by one tensor of a given depth, so
//! that a checkpoint with fewer layers (a tiny test model, a pruned one) is still told
//! apart; see [`detect`].

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;

use crate::ldm::{open_clip_to_diffusers, PrefixMap};
use crate::weights::{Mapped, MappedTensors, Transform, Weights};
use crate::{Error, Result};

/// Largest safetensors header read (real checkpoints' are well under 1 MiB).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// safetensors' dtype name (`F16`, `F32`, `BF16`, `I64`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// The candle dtype, when candle has it.
    pub fn candle_dtype(&self) -> Option<DType> {
        Some(match self.dtype.as_str() {
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            "U8" => DType::U8,
            "U32" => DType::U32,
            "I64" => DType::I64,
            _ => return None,
        })
    }
}

/// The header of a safetensors file: its tensors' names, dtypes and shapes, and its
/// `__metadata__` strings. Reading it reads the first `8 + N` bytes of the file only.
#[derive(Debug, Clone)]
pub struct Header {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

/// Pickle-based PyTorch formats, refused: loading one runs whatever code it holds.
const PICKLE_EXTENSIONS: &[&str] = &["ckpt", "pt", "pth", "bin", "pkl", "pickle"];

/// The error for a PyTorch pickle: why it is refused and how to convert it.
pub fn pickle_refusal(path: &Path, what: &str) -> Error {
    Error::Input(format!(
        "{}: a PyTorch pickle ({what}); hybridiff does not load pickles, because loading one runs any code it contains. Convert it once, where you trust it, to safetensors: python -c \"import torch, safetensors.torch as st; sd = torch.load('{}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, 'model.safetensors')\" (weights_only=True refuses code in the pickle), then pass the .safetensors file",
        path.display(),
        path.display()
    ))
}

/// Refuses `path` if its extension or first bytes say it is a pickle (a zip archive of
/// `torch.save`, or a bare pickle stream).
pub fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if let Some(ext) = ext.as_deref().filter(|e| PICKLE_EXTENSIONS.contains(e)) {
        return Err(pickle_refusal(path, &format!(".{ext} file")));
    }
    let mut magic = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.read_exact(&mut magic).is_ok() {
            if magic == *b"PK\x03\x04" {
                return Err(pickle_refusal(path, "a zip archive as torch.save writes"));
            }
            if magic[0] == 0x80 && (2..=5).contains(&magic[1]) {
                return Err(pickle_refusal(path, "a pickle stream"));
            }
        }
    }
    Ok(())
}

/// Reads the header of safetensors file `path` (never its tensor data), refusing pickles,
/// folders, FIFOs and files that are not safetensors, with messages naming the file.
pub fn read_header(path: &Path) -> Result<Header> {
    if let Some(kind) = crate::weights::non_regular_kind(path) {
        return Err(Error::io(path, kind));
    }
    refuse_pickle(path)?;
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let bad = |why: String| {
        Error::Input(format!(
            "{}: not a safetensors file ({why}); expected a .safetensors checkpoint, a diffusers folder, or (with --config) a checkpoint of a diffusers folder's configs",
            path.display()
        ))
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad(format!("{len} bytes, too short for a header")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > len.saturating_sub(8) {
        return Err(bad(format!(
            "its first 8 bytes give a header of {n} bytes in a file of {len}"
        )));
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text)
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("the header is not JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad("the header is not a JSON object".into()))?;
    let data_len = len - 8 - n;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    if let Some(s) = v.as_str() {
                        metadata.insert(k.clone(), s.to_string());
                    }
                }
            }
            continue;
        }
        let dtype = v.get("dtype").and_then(|d| d.as_str());
        let shape = v.get("shape").and_then(|s| s.as_array()).and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<usize>>>()
        });
        let end = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64());
        let (Some(dtype), Some(shape), Some(end)) = (dtype, shape, end) else {
            return Err(bad(format!(
                "entry `{name}` lacks dtype, shape or data_offsets"
            )));
        };
        if end > data_len {
            return Err(bad(format!(
                "tensor `{name}` ends at byte {end} of a data section of {data_len}: is the file truncated? re-download it"
            )));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype: dtype.to_string(),
                shape,
            },
        );
    }
    Ok(Header {
        path: path.to_path_buf(),
        tensors,
        metadata,
    })
}

/// The model families whose single files load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: one CLIP ViT-L text encoder (`cond_stage_model.transformer.`).
    Sd1,
    /// SD 2.x: one OpenCLIP ViT-H text encoder (`cond_stage_model.model.`).
    Sd2,
    /// SDXL base: CLIP ViT-L (`conditioner.embedders.0.transformer.`) and OpenCLIP ViT-bigG
    /// (`conditioner.embedders.1.model.`).
    Sdxl,
}

impl Family {
    /// The family's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL base",
        }
    }
}

/// Where a text encoder's tensors sit in a single file and how they are named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextLayout {
    /// transformers' `CLIPTextModel` names below `prefix` (`text_model.`...).
    Clip { prefix: String },
    /// OpenCLIP's text tower below `prefix` (`transformer.resblocks.`...).
    OpenClip { prefix: String },
}

impl TextLayout {
    pub fn prefix(&self) -> &str {
        match self {
            TextLayout::Clip { prefix } | TextLayout::OpenClip { prefix } => prefix,
        }
    }
}

/// Prefix of the U-Net in the original layout.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefixes of the VAE in the original layout (diffusers' `LDM_VAE_KEYS`).
pub const VAE_PREFIXES: &[&str] = &["first_stage_model.", "vae."];

/// A single file's family and where its components are.
#[derive(Debug, Clone)]
pub struct Detected {
    pub family: Family,
    /// The text encoders in the pipeline's order (`text_encoder`, `text_encoder_2`).
    pub text: Vec<TextLayout>,
    /// The VAE's prefix, if the file has one.
    pub vae_prefix: Option<String>,
    /// Whether the file marks itself v-prediction (a `v_pred` tensor, as ComfyUI reads it).
    pub v_pred_marker: bool,
}

fn any_prefix(h: &Header, p: &str) -> bool {
    h.tensors
        .range(p.to_string()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(p))
}

fn count_prefix(h: &Header, p: &str) -> usize {
    h.tensors
        .range(p.to_string()..)
        .take_while(|(k, _)| k.starts_with(p))
        .count()
}

/// A few names of the file, for messages.
fn sample_names(h: &Header) -> String {
    let names: Vec<&str> = h.tensors.keys().take(4).map(String::as_str).collect();
    format!(
        "{} tensor(s), such as {}",
        h.tensors.len(),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// Tells the model family of a single-file checkpoint from its header (names and shapes
/// only), or says what the file is instead: a diffusers component, a LoRA, a VAE, a family
/// that does not load (SDXL refiner, inpainting, SD3, FLUX, ...), or neither layout.
pub fn detect(h: &Header) -> Result<Detected> {
    let path = h.path.display();
    let unsupported = |what: &str, hint: &str| {
        Error::Input(format!(
            "{path}: {what}; single files load for SD 1.x, SD 2.x and SDXL base{hint}"
        ))
    };
    let has = |k: &str| h.tensors.contains_key(k);
    let some = |p: &str| any_prefix(h, p);
    if some("lora_unet_")
        || some("lora_te")
        || h.tensors.keys().any(|k| {
            k.contains(".lora_A.") || k.contains(".lora_down.") || k.contains(".lora.down.")
        })
    {
        return Err(Error::Input(format!(
            "{path}: this is a LoRA file, not a model; pass it with --lora {path} next to --model"
        )));
    }
    if !some(UNET_PREFIX) {
        if has("joint_blocks.0.context_block.adaLN_modulation.1.bias") {
            return Err(unsupported(
                "an SD3 transformer (MMDiT) in the original layout",
                "; for SD3 use a diffusers folder",
            ));
        }
        if some("double_blocks.") || some("single_blocks.") {
            return Err(unsupported("a FLUX transformer", ""));
        }
        if has("conv_in.weight") && some("down_blocks.") && some("up_blocks.") && !some("decoder.")
        {
            return Err(Error::Input(format!(
                "{path}: a diffusers denoiser file (unet/diffusion_pytorch_model.safetensors), not a single-file checkpoint; pass the pipeline folder that holds it to --model"
            )));
        }
        if some("decoder.up.") || some("decoder.up_blocks.") || some("first_stage_model.decoder.") {
            return Err(Error::Input(format!(
                "{path}: a VAE on its own, not a whole model; pass it with --vae next to --model"
            )));
        }
        if some("text_model.") || some("encoder.block.") {
            return Err(Error::Input(format!(
                "{path}: a text encoder on its own, not a whole model"
            )));
        }
        return Err(Error::Input(format!(
            "{path}: neither a diffusers folder nor a single-file SD / SDXL checkpoint (no tensor starts with `{UNET_PREFIX}`): {}",
            sample_names(h)
        )));
    }
    if has("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias") {
        return Err(unsupported(
            "an SD3 / SD3.5 checkpoint",
            "; for SD3 use a diffusers folder",
        ));
    }
    if some("model.diffusion_model.double_blocks.") {
        return Err(unsupported("a FLUX checkpoint", ""));
    }
    if has("edm_mean") {
        return Err(unsupported("a Playground v2.5 checkpoint (EDM)", ""));
    }
    if let Some(t) = h
        .tensors
        .get("model.diffusion_model.input_blocks.0.0.weight")
    {
        if let Some(&c) = t.shape.get(1) {
            if c != 4 {
                let what = match c {
                    9 => "an inpainting checkpoint (9 input channels)".to_string(),
                    8 => "an instruct-pix2pix checkpoint (8 input channels)".to_string(),
                    7 => "an x4 upscaler checkpoint (7 input channels)".to_string(),
                    c => format!("a U-Net with {c} input channels (text-to-image takes 4)"),
                };
                return Err(unsupported(&what, " text-to-image (4 latent channels)"));
            }
        }
    }
    if some("control_model.") {
        return Err(unsupported("a ControlNet", ""));
    }
    let v_pred_marker = has("v_pred");
    let vae_prefix = VAE_PREFIXES
        .iter()
        .find(|p| some(&format!("{p}decoder.")))
        .map(|p| p.to_string());
    let xl_clip = "conditioner.embedders.0.transformer.";
    let xl_open = "conditioner.embedders.1.model.";
    let refiner_open = "conditioner.embedders.0.model.";
    let sd1_clip = "cond_stage_model.transformer.";
    let sd2_open = "cond_stage_model.model.";
    let (family, text) = if some(xl_open) {
        if !some(xl_clip) {
            return Err(unsupported(
                "an SDXL checkpoint whose first text encoder (conditioner.embedders.0.transformer.) is missing",
                "",
            ));
        }
        (
            Family::Sdxl,
            vec![
                TextLayout::Clip {
                    prefix: xl_clip.into(),
                },
                TextLayout::OpenClip {
                    prefix: xl_open.into(),
                },
            ],
        )
    } else if some(refiner_open) {
        return Err(unsupported(
            "an SDXL refiner (one OpenCLIP text encoder, aesthetic-score conditioning): it refines images (img2img), which hybridiff does not run",
            "",
        ));
    } else if some(sd2_open) {
        (
            Family::Sd2,
            vec![TextLayout::OpenClip {
                prefix: sd2_open.into(),
            }],
        )
    } else if some(sd1_clip) {
        (
            Family::Sd1,
            vec![TextLayout::Clip {
                prefix: sd1_clip.into(),
            }],
        )
    } else {
        return Err(unsupported(
            "a U-Net without a text encoder (no cond_stage_model. or conditioner.embedders. tensors)",
            "; the text encoders must be in the same file",
        ));
    };
    Ok(Detected {
        family,
        text,
        vae_prefix,
        v_pred_marker,
    })
}

/// Checks that the tensors named in `expected` have those shapes in `h` (the family's
/// published shapes), so that a checkpoint of another size is refused before loading,
/// naming the tensor, both shapes and `--config`.
pub fn check_shapes(h: &Header, family: Family, expected: &[(&str, &[usize])]) -> Result<()> {
    for (name, want) in expected {
        match h.tensors.get(*name) {
            Some(t) if t.shape == *want => {}
            Some(t) => {
                return Err(Error::Input(format!(
                    "{}: tensor `{name}` has shape {:?}; {}'s published config gives {:?}. This checkpoint is not the standard {} size: pass --config DIR with a diffusers folder (its configs and tokenizers; no weights needed) that matches it",
                    h.path.display(),
                    t.shape,
                    family.name(),
                    want,
                    family.name()
                )))
            }
            None => {
                return Err(Error::Input(format!(
                    "{}: tensor `{name}` is missing; every {} checkpoint has it (is the file truncated or pruned?)",
                    h.path.display(),
                    family.name()
                )))
            }
        }
    }
    Ok(())
}

fn info_dtype(t: &TensorInfo) -> Option<DType> {
    t.candle_dtype()
}

/// Builds the tensors of one component of a single file under diffusers names, given how
/// each checkpoint key (below `prefix`) maps. Keys that map to nothing are left out (the
/// caller reports them).
fn build(
    file: &Arc<Weights>,
    h: &Header,
    prefix: &str,
    label: String,
    mut map_key: impl FnMut(&str, &TensorInfo) -> Vec<(String, Transform)>,
) -> MappedTensors {
    let mut map = BTreeMap::new();
    for (key, info) in h
        .tensors
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
    {
        let rest = &key[prefix.len()..];
        for (name, transform) in map_key(rest, info) {
            let shape = match transform {
                Transform::None => info.shape.clone(),
                Transform::Rows { len, .. } => {
                    let mut s = info.shape.clone();
                    if let Some(d) = s.first_mut() {
                        *d = len;
                    }
                    s
                }
                Transform::Transpose => info.shape.iter().rev().copied().collect(),
                Transform::Squeeze => info.shape.iter().take(2).copied().collect(),
            };
            map.insert(
                name,
                Mapped {
                    source: key.clone(),
                    transform,
                    shape,
                    dtype: info_dtype(info),
                },
            );
        }
    }
    MappedTensors {
        file: file.clone(),
        map,
        label,
    }
}

/// The U-Net of a single file under diffusers names (`config` gives its block layout).
pub fn unet_tensors(
    file: &Arc<Weights>,
    h: &Header,
    config: &crate::unet::UNetConfig,
) -> MappedTensors {
    let m = PrefixMap::unet(config);
    build(
        file,
        h,
        UNET_PREFIX,
        format!("{} (unet)", h.path.display()),
        |rest, _| {
            m.to_diffusers(rest)
                .map(|(n, _)| vec![(n, Transform::None)])
                .unwrap_or_default()
        },
    )
}

/// The VAE of a file under diffusers names: a single file's (below `prefix`), or a VAE
/// file of its own in the original layout (`prefix` empty). `levels` and
/// `layers_per_block` come from the VAE config.
pub fn vae_tensors(
    file: &Arc<Weights>,
    h: &Header,
    prefix: &str,
    levels: usize,
    layers_per_block: usize,
) -> MappedTensors {
    let m = PrefixMap::vae(levels, layers_per_block);
    build(
        file,
        h,
        prefix,
        format!("{} (vae)", h.path.display()),
        |rest, info| match m.to_diffusers(rest) {
            Some((n, attention)) => {
                let squeeze = attention && n.ends_with(".weight") && info.shape.len() > 2;
                vec![(
                    n,
                    if squeeze {
                        Transform::Squeeze
                    } else {
                        Transform::None
                    },
                )]
            }
            None => vec![],
        },
    )
}

/// A text encoder of a single file under transformers' `CLIPTextModel` names;
/// `hidden_size` and `num_hidden_layers` come from its config (OpenCLIP towers are cut to
/// that many layers, as SD 2.x's 23 of 24). Without `with_projection` (a `CLIPTextModel`)
/// the file's projection is left out, as diffusers leaves SD 2.x's out.
pub fn text_tensors(
    file: &Arc<Weights>,
    h: &Header,
    layout: &TextLayout,
    slot: &str,
    hidden_size: usize,
    num_hidden_layers: usize,
    with_projection: bool,
) -> MappedTensors {
    let label = format!("{} ({slot})", h.path.display());
    let mut t = text_tensors_all(file, h, layout, label, hidden_size, num_hidden_layers);
    if !with_projection {
        t.map.retain(|k, _| !k.starts_with("text_projection"));
    }
    t
}

fn text_tensors_all(
    file: &Arc<Weights>,
    h: &Header,
    layout: &TextLayout,
    label: String,
    hidden_size: usize,
    num_hidden_layers: usize,
) -> MappedTensors {
    match layout {
        TextLayout::Clip { prefix } => build(file, h, prefix, label, |rest, _| {
            if rest.ends_with("position_ids") {
                return vec![];
            }
            // Old transformers checkpoints lack the `text_model.` level.
            let name = if rest.starts_with("text_model.") {
                rest.to_string()
            } else {
                format!("text_model.{rest}")
            };
            let keep = match name
                .strip_prefix("text_model.encoder.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok())
            {
                Some(layer) => layer < num_hidden_layers,
                None => true,
            };
            if keep {
                vec![(name, Transform::None)]
            } else {
                vec![]
            }
        }),
        TextLayout::OpenClip { prefix } => build(file, h, prefix, label, |rest, _| {
            open_clip_to_diffusers(rest, hidden_size, num_hidden_layers).unwrap_or_default()
        }),
    }
}

/// The VAE layout of a VAE file of its own: `Some(prefix)` for the original layout
/// (`encoder.down.0...`, possibly below `first_stage_model.`), `None` for diffusers names.
pub fn vae_file_layout(h: &Header) -> Result<Option<String>> {
    for p in ["", "first_stage_model.", "vae."] {
        if any_prefix(h, &format!("{p}decoder.up.")) {
            return Ok(Some(p.to_string()));
        }
    }
    if any_prefix(h, "decoder.up_blocks.") {
        return Ok(None);
    }
    Err(Error::Input(format!(
        "{}: not a VAE (no decoder.up. or decoder.up_blocks. tensors): {}",
        h.path.display(),
        sample_names(h)
    )))
}

/// How many tensors of `h` start with `prefix`.
pub fn tensors_under(h: &Header, prefix: &str) -> usize {
    count_prefix(h, prefix)
}
