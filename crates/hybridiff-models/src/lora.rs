//! LoRA files merged into the weights once, as they load (diffusers' `load_lora_weights`
//! followed by `fuse_lora`): `W' = W + scale * (alpha / rank) * up @ down` for every
//! module a file names, so a LoRA costs nothing per step and every strategy and rank sees
//! the same weights.
//!
//! Namings read (diffusers' `lora_conversion_utils` and `lora_pipeline` are the spec):
//!
//! - kohya / A1111 (`sd-scripts`): `lora_unet_<module>.lora_down.weight`,
//!   `.lora_up.weight`, `.alpha`, with `lora_te_` / `lora_te1_` (first text encoder) and
//!   `lora_te2_` (second); module paths with `_` for `.`, in diffusers names or, for SDXL
//!   U-Nets, the SGM names (`input_blocks_4_1_...`). Linear and convolution ("LoCon")
//!   modules.
//! - diffusers / PEFT: `<component>.<module>.lora_A.weight` / `.lora_B.weight`, the older
//!   `<module>.lora.down.weight` / `.lora.up.weight`, attention processors'
//!   `...attn1.processor.to_q_lora.down.weight`, text encoders'
//!   `...self_attn.to_q_lora.down.weight` and `...mlp.fc1.lora_linear_layer.down.weight`;
//!   components `unet`, `transformer`, `text_encoder`, `text_encoder_2` (none: the
//!   denoiser). Alpha from `<module>.alpha` tensors or the `lora_adapter_metadata` that
//!   diffusers' `save_lora_weights` writes (`lora_alpha`, `alpha_pattern`); without
//!   either, alpha equals the rank (scale 1), as PEFT's default.
//!
//! Every key of a file must be understood and every module must match a weight of the
//! model, with shapes that fit; otherwise loading stops before any weight is read, naming
//! the keys (a LoRA for another model family is the usual cause) or the key and both
//! shapes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::single_file::read_header;
use crate::weights::Weights;
use crate::{Error, Result};

/// Which component of a pipeline a LoRA module targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The U-Net or the MMDiT.
    Denoiser,
    /// `text_encoder` (0), `text_encoder_2` (1), `text_encoder_3` (2).
    TextEncoder(usize),
}

impl Target {
    /// The diffusers component name.
    pub fn name(self, denoiser: &str) -> String {
        match self {
            Target::Denoiser => denoiser.to_string(),
            Target::TextEncoder(0) => "text_encoder".into(),
            Target::TextEncoder(i) => format!("text_encoder_{}", i + 1),
        }
    }
}

/// How a LoRA file names a module.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ModuleName {
    /// kohya's `_`-joined path (ambiguous: `to_q` has an underscore too), matched against
    /// the model's module paths with `.` replaced by `_`.
    Underscored(String),
    /// A dotted module path.
    Dotted(String),
}

/// One module of a LoRA file: its low-rank pair and alpha.
#[derive(Debug, Clone)]
struct RawModule {
    target: Target,
    name: ModuleName,
    /// The key prefix as written, for messages.
    key: String,
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// A LoRA file as given on the command line: `FILE[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl LoraSpec {
    /// Parses `FILE[:SCALE]` (`--lora`): the part after the last `:` is the scale when it
    /// reads as a number (default 1.0). The scale must be finite.
    pub fn parse(arg: &str) -> Result<Self> {
        let bad = |msg: String| Error::Input(format!("--lora {arg}: {msg}"));
        let (path, scale) = match arg.rsplit_once(':') {
            Some((p, s)) if !p.is_empty() && s.trim().parse::<f64>().is_ok() => {
                (p, s.trim().parse::<f64>().unwrap_or(f64::NAN))
            }
            Some((p, s))
                if !p.is_empty() && !Path::new(arg).exists() && !s.contains(['/', '\\']) =>
            {
                return Err(bad(format!(
                    "`{s}` after the last `:` is not a number; expected FILE or FILE:SCALE (e.g. style.safetensors:0.8)"
                )))
            }
            _ => (arg, 1.0),
        };
        if !scale.is_finite() {
            return Err(bad(format!(
                "the scale {scale} is not a finite number; expected e.g. 0.8 or -0.5"
            )));
        }
        if path.is_empty() {
            return Err(bad("no file given".into()));
        }
        Ok(Self {
            path: PathBuf::from(path),
            scale,
        })
    }
}

/// A parsed LoRA file: its modules with their tensors (f32, on the CPU).
pub struct LoraFile {
    pub spec: LoraSpec,
    modules: Vec<LoraModule>,
}

struct LoraModule {
    target: Target,
    name: ModuleName,
    key: String,
    down: Tensor,
    up: Tensor,
    alpha: f64,
}

/// Suffixes of LoRA-like formats that are not plain low-rank pairs.
const UNSUPPORTED_VARIANTS: &[(&str, &str)] = &[
    (
        "lora_mid.weight",
        "LoCon with a CP / Tucker middle factor (lora_mid)",
    ),
    ("dora_scale", "DoRA (dora_scale)"),
    ("hada_w1_a", "LoHa (hada_*)"),
    ("hada_w1_b", "LoHa (hada_*)"),
    ("lokr_w1", "LoKr (lokr_*)"),
    ("lokr_w1_a", "LoKr (lokr_*)"),
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".diff", "a full weight difference (diff)"),
    (".diff_b", "a full bias difference (diff_b)"),
];

/// The component of a dotted key's first segment.
fn dotted_component(key: &str) -> (Target, &str) {
    for (prefix, t) in [
        ("unet.", Target::Denoiser),
        ("transformer.", Target::Denoiser),
        ("text_encoder.", Target::TextEncoder(0)),
        ("text_encoder_2.", Target::TextEncoder(1)),
        ("text_encoder_3.", Target::TextEncoder(2)),
        ("base_model.model.", Target::Denoiser),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return (t, rest);
        }
    }
    (Target::Denoiser, key)
}

/// Which part of a module a key is.
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits one key into (module key, target, name, part), or `None` for a key of no
/// known naming.
fn classify(key: &str) -> Option<(String, Target, ModuleName, Part)> {
    // kohya: lora_<component>_<path>.{lora_down.weight, lora_up.weight, alpha}
    if let Some((base, suffix)) = key.split_once('.') {
        if base.starts_with("lora_") && !base.contains('.') {
            let part = match suffix {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                _ => return None,
            };
            for (prefix, t) in [
                ("lora_unet_", Target::Denoiser),
                ("lora_transformer_", Target::Denoiser),
                ("lora_te1_", Target::TextEncoder(0)),
                ("lora_te2_", Target::TextEncoder(1)),
                ("lora_te3_", Target::TextEncoder(2)),
                ("lora_te_", Target::TextEncoder(0)),
            ] {
                if let Some(rest) = base.strip_prefix(prefix) {
                    return Some((
                        base.to_string(),
                        t,
                        ModuleName::Underscored(rest.to_string()),
                        part,
                    ));
                }
            }
            return None;
        }
    }
    // diffusers / PEFT, dotted.
    let forms = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    for (suffix, part) in forms {
        if let Some(module) = key.strip_suffix(suffix) {
            let (t, path) = dotted_component(module);
            return Some((
                module.to_string(),
                t,
                ModuleName::Dotted(path.to_string()),
                part,
            ));
        }
    }
    // diffusers' old attention-processor names: ...attn1.processor.to_q_lora.down.weight
    // (U-Net) and ...self_attn.to_q_lora.down.weight (text encoders).
    for (suffix, part) in [
        ("_lora.down.weight", Part::Down),
        ("_lora.up.weight", Part::Up),
    ] {
        if let Some(module) = key.strip_suffix(suffix) {
            let (t, path) = dotted_component(module);
            let (parent, proj) = path.rsplit_once('.')?;
            let is_text = matches!(t, Target::TextEncoder(_));
            let parent = parent.strip_suffix(".processor").unwrap_or(parent);
            let proj = match (proj, is_text) {
                ("to_q", true) => "q_proj",
                ("to_k", true) => "k_proj",
                ("to_v", true) => "v_proj",
                ("to_out", true) => "out_proj",
                ("to_out", false) => "to_out.0",
                (p @ ("to_q" | "to_k" | "to_v"), false) => p,
                _ => return None,
            };
            return Some((
                module.to_string(),
                t,
                ModuleName::Dotted(format!("{parent}.{proj}")),
                part,
            ));
        }
    }
    None
}

/// The value of a scalar `alpha` tensor.
fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()
        .map(|v| if v.len() == 1 { v[0] } else { f64::NAN })
}

/// `alpha` for `module` of `target` from diffusers' `lora_adapter_metadata`.
fn metadata_alpha(meta: &serde_json::Value, target_name: &str, module: &str) -> Option<f64> {
    let get = |k: &str| {
        meta.get(format!("{target_name}.{k}"))
            .or_else(|| meta.get(k))
    };
    if let Some(serde_json::Value::Object(p)) = get("alpha_pattern") {
        for (pat, v) in p {
            if module == pat || module.ends_with(&format!(".{pat}")) {
                return v.as_f64();
            }
        }
    }
    get("lora_alpha").and_then(|v| v.as_f64())
}

impl LoraFile {
    /// Reads `spec.path`: checks its naming and tensors (finite, rank-consistent), loads
    /// the low-rank pairs as f32 on the CPU. Refuses pickles and non-safetensors files.
    pub fn open(spec: &LoraSpec) -> Result<Self> {
        let path = &spec.path;
        let header = read_header(path).map_err(|e| match e {
            Error::Io { path, msg } => Error::Input(format!("--lora {}: {msg}", path.display())),
            e => e,
        })?;
        let shown = |key: &str| format!("--lora {}: `{key}`", path.display());
        let mut modules: BTreeMap<String, RawModule> = BTreeMap::new();
        let mut unknown = Vec::new();
        for key in header.tensors.keys() {
            if let Some((_, what)) = UNSUPPORTED_VARIANTS.iter().find(|(s, _)| key.ends_with(s)) {
                return Err(Error::Input(format!(
                    "{}: {what} is not supported; hybridiff merges plain LoRA / LoCon pairs (lora_down/lora_up, lora_A/lora_B)",
                    shown(key)
                )));
            }
            let Some((mkey, target, name, part)) = classify(key) else {
                unknown.push(key.clone());
                continue;
            };
            let m = modules.entry(mkey.clone()).or_insert_with(|| RawModule {
                target,
                name,
                key: mkey,
                down: None,
                up: None,
                alpha: None,
            });
            let slot = match part {
                Part::Down => &mut m.down,
                Part::Up => &mut m.up,
                Part::Alpha => &mut m.alpha,
            };
            *slot = Some(key.clone());
        }
        if !unknown.is_empty() {
            let n = unknown.len();
            unknown.truncate(10);
            return Err(Error::Input(format!(
                "--lora {}: {n} key(s) of no LoRA naming hybridiff reads (kohya lora_unet_/lora_te*_ with lora_down/lora_up, or diffusers/PEFT lora_A/lora_B, lora.down/lora.up): {}{}",
                path.display(),
                unknown.join(", "),
                if n > 10 { ", ..." } else { "" }
            )));
        }
        if modules.is_empty() {
            return Err(Error::Input(format!(
                "--lora {}: the file holds no LoRA weights",
                path.display()
            )));
        }
        let need: u128 = header
            .tensors
            .values()
            .map(|t| t.shape.iter().map(|&d| d as u128).product::<u128>() * 4)
            .sum();
        crate::memory::check(&format!("loading the LoRA {}", path.display()), need)
            .map_err(Error::Weights)?;
        let meta: Option<serde_json::Value> = header
            .metadata
            .get("lora_adapter_metadata")
            .and_then(|m| serde_json::from_str(m).ok());
        let file = Weights::open(std::slice::from_ref(path))?;
        let load = |k: &str| -> Result<Tensor> {
            let t = file.load_raw(k, &Device::Cpu)?;
            if !t.dtype().is_float() {
                return Err(Error::Input(format!(
                    "{}: dtype {:?}; LoRA weights must be floating point",
                    shown(k),
                    t.dtype()
                )));
            }
            let t = t.to_dtype(DType::F32)?;
            if let Some((i, v)) = crate::weights::first_non_finite(&t)? {
                return Err(Error::Input(format!(
                    "{}: non-finite value {v} at flat index {i}; the file is damaged",
                    shown(k)
                )));
            }
            Ok(t)
        };
        let mut out = Vec::with_capacity(modules.len());
        for m in modules.into_values() {
            let (Some(dk), Some(uk)) = (&m.down, &m.up) else {
                let (has, lacks) = if m.down.is_some() {
                    ("down (A)", "up (B)")
                } else if m.up.is_some() {
                    ("up (B)", "down (A)")
                } else {
                    ("only alpha", "down and up")
                };
                return Err(Error::Input(format!(
                    "{}: has {has} but no {lacks} weight",
                    shown(&m.key)
                )));
            };
            let down = load(dk)?;
            let up = load(uk)?;
            let (dd, ud) = (Vec::from(down.dims()), Vec::from(up.dims()));
            let rank = dd.first().copied().unwrap_or(0);
            let ok = dd.len() >= 2
                && ud.len() >= 2
                && dd.len() == ud.len()
                && rank > 0
                && ud[1] == rank
                && ud[2..].iter().all(|&d| d == 1);
            if !ok {
                return Err(Error::Input(format!(
                    "{}: down {dd:?} and up {ud:?} are not a low-rank pair (down [rank, in, ...], up [out, rank, 1...])",
                    shown(&m.key)
                )));
            }
            let alpha = match &m.alpha {
                Some(k) => {
                    let a = scalar(&file.load_raw(k, &Device::Cpu)?)?;
                    if !a.is_finite() {
                        return Err(Error::Input(format!(
                            "{}: alpha is not one finite number",
                            shown(k)
                        )));
                    }
                    a
                }
                None => {
                    let module = match &m.name {
                        ModuleName::Dotted(d) => d.clone(),
                        ModuleName::Underscored(u) => u.clone(),
                    };
                    meta.as_ref()
                        .and_then(|meta| {
                            let t = m.target.name(if m.key.starts_with("transformer.") {
                                "transformer"
                            } else {
                                "unet"
                            });
                            metadata_alpha(meta, &t, &module)
                        })
                        .unwrap_or(rank as f64)
                }
            };
            out.push(LoraModule {
                target: m.target,
                name: m.name,
                key: m.key,
                down,
                up,
                alpha,
            });
        }
        Ok(Self {
            spec: spec.clone(),
            modules: out,
        })
    }

    /// Keeps only the modules whose target passes `keep` (a run without text encoders
    /// drops theirs).
    pub fn retain_targets(&mut self, keep: impl Fn(Target) -> bool) {
        self.modules.retain(|m| keep(m.target));
    }

    /// Modules per target, for summaries.
    pub fn counts(&self) -> BTreeMap<Target, usize> {
        let mut c = BTreeMap::new();
        for m in &self.modules {
            *c.entry(m.target).or_insert(0) += 1;
        }
        c
    }
}

/// The weight names and shapes of one component, indexed for LoRA matching.
pub struct ComponentIndex {
    /// `unet`, `transformer`, `text_encoder`, ...
    pub name: String,
    shapes: BTreeMap<String, Vec<usize>>,
    /// `_`-joined module path -> weight name.
    underscored: HashMap<String, String>,
    /// Other dotted names of a module (SGM / OpenCLIP names) -> weight name.
    aliases: HashMap<String, String>,
}

impl ComponentIndex {
    /// Indexes `shapes` (diffusers weight names -> shapes). `alias` gives other names of a
    /// module path (e.g. the SGM name of a U-Net module), which match too.
    pub fn new(
        name: &str,
        shapes: BTreeMap<String, Vec<usize>>,
        alias: impl Fn(&str) -> Vec<String>,
    ) -> Self {
        let mut underscored = HashMap::new();
        let mut aliases = HashMap::new();
        for w in shapes.keys() {
            let Some(module) = w.strip_suffix(".weight") else {
                continue;
            };
            let mut names = vec![module.to_string()];
            // transformers 5 saves a bare CLIPTextModel without `text_model.`; LoRA files
            // name the module with it.
            if let Some(m) = module.strip_prefix("text_model.") {
                names.push(m.to_string());
            } else if name.starts_with("text_encoder") && !module.starts_with("text_projection") {
                names.push(format!("text_model.{module}"));
            }
            names.extend(alias(module));
            for n in names {
                underscored.insert(n.replace('.', "_"), w.clone());
                aliases.insert(n, w.clone());
            }
        }
        Self {
            name: name.to_string(),
            shapes,
            underscored,
            aliases,
        }
    }

    fn find(&self, name: &ModuleName) -> Option<&String> {
        match name {
            ModuleName::Underscored(u) => self.underscored.get(u),
            ModuleName::Dotted(d) => self.aliases.get(d),
        }
    }
}

/// One low-rank delta to add to a weight.
#[derive(Debug, Clone)]
struct Delta {
    down: Tensor,
    up: Tensor,
    /// `user scale * alpha / rank`.
    scale: f64,
    origin: String,
}

/// The LoRA deltas of one component, by weight name; merged by the weight loader
/// ([`crate::weights::ComponentSource::with_patches`]).
#[derive(Debug, Default)]
pub struct ComponentPatches {
    deltas: BTreeMap<String, Vec<Delta>>,
}

impl ComponentPatches {
    /// How many weights get a delta.
    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// The weights that get a delta.
    pub fn weights(&self) -> impl Iterator<Item = &str> {
        self.deltas.keys().map(String::as_str)
    }

    /// Whether weight `name` gets a delta.
    pub fn touches(&self, name: &str) -> bool {
        self.deltas.contains_key(name)
    }

    /// The weights with deltas that are not in `used` (a model that never loaded them).
    pub fn unapplied(&self, used: &HashSet<String>) -> Vec<String> {
        self.deltas
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// `base + sum(scale * up @ down)` in f32 on `base`'s device, or `None` when `name`
    /// has no delta. Convolution pairs are flattened to matrices over `in * kh * kw` and
    /// the product reshaped to the weight's shape (PEFT's merge for LoCon).
    pub fn apply(&self, name: &str, base: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(deltas) = self.deltas.get(name) else {
            return Ok(None);
        };
        let dev = base.device();
        let mut w = base.to_dtype(DType::F32)?;
        let shape = Vec::from(w.dims());
        let out = shape[0];
        let rest: usize = shape[1..].iter().product();
        for d in deltas {
            let rank = d.down.dim(0)?;
            let up = d.up.to_device(dev)?.reshape((out, rank))?;
            let down = d.down.to_device(dev)?.reshape((rank, rest))?;
            let delta = up
                .matmul(&down)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", d.origin)))?;
            let delta = (delta * d.scale)?.reshape(shape.as_slice())?;
            w = (w + delta)?;
        }
        Ok(Some(w))
    }
}

/// Matches the modules of `files` to the components of a model and returns each
/// component's deltas (in `components`' order). Errors list every key that matches no
/// weight, or name the key and both shapes when a pair does not fit its weight.
pub fn match_files(
    files: &[LoraFile],
    components: &[(Target, &ComponentIndex)],
    model: &str,
) -> Result<Vec<ComponentPatches>> {
    let mut out: Vec<ComponentPatches> = components.iter().map(|_| Default::default()).collect();
    let mut unmatched: Vec<String> = Vec::new();
    for f in files {
        for m in &f.modules {
            let Some(ci) = components.iter().position(|(t, _)| *t == m.target) else {
                unmatched.push(format!(
                    "{} ({}: this model has none)",
                    m.key,
                    m.target.name("denoiser")
                ));
                continue;
            };
            let index = components[ci].1;
            let Some(weight) = index.find(&m.name) else {
                unmatched.push(m.key.clone());
                continue;
            };
            let shape = &index.shapes[weight];
            let (dd, ud) = (m.down.dims(), m.up.dims());
            let rank = dd[0];
            let fits = shape.len() >= 2
                && ud[0] == shape[0]
                && dd[1..].iter().product::<usize>() == shape[1..].iter().product::<usize>()
                && (dd.len() == 2 || dd[2..] == shape[2..]);
            if !fits {
                return Err(Error::Input(format!(
                    "--lora {}: `{}` (down {dd:?}, up {ud:?}) does not fit `{weight}` of {} ({shape:?}); is this LoRA for another model?",
                    f.spec.path.display(),
                    m.key,
                    index.name
                )));
            }
            out[ci]
                .deltas
                .entry(weight.clone())
                .or_default()
                .push(Delta {
                    down: m.down.clone(),
                    up: m.up.clone(),
                    scale: f.spec.scale * m.alpha / rank as f64,
                    origin: format!("--lora {}: `{}`", f.spec.path.display(), m.key),
                });
        }
    }
    if !unmatched.is_empty() {
        let n = unmatched.len();
        unmatched.sort();
        unmatched.truncate(12);
        let files: Vec<String> = files
            .iter()
            .map(|f| f.spec.path.display().to_string())
            .collect();
        return Err(Error::Input(format!(
            "--lora {}: {n} module(s) match no weight of {model} (a LoRA for another model family is the usual cause): {}{}",
            files.join(", "),
            unmatched.join(", "),
            if n > 12 { ", ..." } else { "" }
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_parsed_from_the_last_colon() {
        assert_eq!(LoraSpec::parse("a.safetensors").unwrap().scale, 1.0);
        let s = LoraSpec::parse("dir:x/a.safetensors:0.5").unwrap();
        assert_eq!(
            (s.path.to_str().unwrap(), s.scale),
            ("dir:x/a.safetensors", 0.5)
        );
        assert_eq!(LoraSpec::parse("a.safetensors:-1").unwrap().scale, -1.0);
        for bad in [
            "a.safetensors:nan",
            "a.safetensors:inf",
            "a.safetensors:1e999",
        ] {
            let e = LoraSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("not a finite number") && e.contains(bad), "{e}");
        }
        let e = LoraSpec::parse("a.safetensors:strong")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn every_naming_is_classified() {
        let cases = [
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", Target::Denoiser, ModuleName::Underscored("down_blocks_0_attentions_0_proj_in".into())),
            ("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha", Target::TextEncoder(1), ModuleName::Underscored("text_model_encoder_layers_0_mlp_fc1".into())),
            ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", Target::TextEncoder(0), ModuleName::Underscored("text_model_encoder_layers_0_mlp_fc1".into())),
            ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", Target::Denoiser, ModuleName::Dotted("down_blocks.0.attentions.0.proj_in".into())),
            ("text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj.lora_B.weight", Target::TextEncoder(1), ModuleName::Dotted("text_model.encoder.layers.1.self_attn.k_proj".into())),
            ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight", Target::Denoiser, ModuleName::Dotted("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0".into())),
            ("text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.down.weight", Target::TextEncoder(0), ModuleName::Dotted("text_model.encoder.layers.0.self_attn.v_proj".into())),
            ("text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.up.weight", Target::TextEncoder(0), ModuleName::Dotted("text_model.encoder.layers.0.mlp.fc2".into())),
            ("transformer.transformer_blocks.0.attn.to_q.lora.down.weight", Target::Denoiser, ModuleName::Dotted("transformer_blocks.0.attn.to_q".into())),
            ("down_blocks.0.attentions.0.proj_in.lora_A.weight", Target::Denoiser, ModuleName::Dotted("down_blocks.0.attentions.0.proj_in".into())),
        ];
        for (key, target, name) in cases {
            let (_, t, n, _) = classify(key).unwrap_or_else(|| panic!("{key}"));
            assert_eq!((t, n), (target, name), "{key}");
        }
        assert!(classify("lora_foo_bar.lora_down.weight").is_none());
        assert!(classify("model.diffusion_model.out.2.weight").is_none());
    }
}
