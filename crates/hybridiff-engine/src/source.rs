//! What `--model` (with `--config`, `--vae` and `--lora`) names, resolved into the
//! components to load, before any weight is read: a diffusers folder, or a single-file
//! SD 1.x / 2.x / SDXL checkpoint in the original layout (see
//! [`hybridiff_models::single_file`]) with its family's published configs built in and
//! the CLIP vocabulary this binary carries; LoRA files matched to the components' weights
//! and attached to them, to be merged as they load
//! ([`hybridiff_models::lora`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hybridiff_models::lora::{ComponentIndex, LoraFile, LoraSpec, Target};
use hybridiff_models::single_file::{self, Detected, Family, Header, TextLayout};
use hybridiff_models::unet::UNetConfig;
use hybridiff_models::weights::{read_text_bounded, ComponentSource, Weights, MAX_CONFIG_BYTES};
use hybridiff_schedulers::SchedulerConfig;
use hybridiff_text::{ClipPart, PipelineKind, PromptParts, TokenizerSource};
use serde_json::Value;

use crate::{Error, Result};

/// What the user named: the model and what goes with it.
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    /// A diffusers folder or a single-file `.safetensors` checkpoint.
    pub model: PathBuf,
    /// `--config DIR`: a diffusers folder whose configs and tokenizers a single file is
    /// loaded with (no weights needed), for checkpoints of non-standard shapes.
    pub config: Option<PathBuf>,
    /// `--vae FOLDER|FILE`: a VAE to decode with instead of the model's.
    pub vae: Option<PathBuf>,
    /// `--lora FILE[:SCALE]`, merged in order.
    pub loras: Vec<LoraSpec>,
}

/// The denoiser to load.
#[derive(Debug, Clone)]
pub enum DenoiserSource {
    Unet(ComponentSource),
    Transformer(ComponentSource),
}

impl DenoiserSource {
    pub fn source(&self) -> &ComponentSource {
        match self {
            DenoiserSource::Unet(s) | DenoiserSource::Transformer(s) => s,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            DenoiserSource::Unet(_) => "unet",
            DenoiserSource::Transformer(_) => "transformer",
        }
    }
}

/// A LoRA as merged: its file, scale and how many modules of each component it changes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraInfo {
    pub path: PathBuf,
    pub scale: f64,
    /// Component name (`unet`, `text_encoder`, ...) -> modules changed.
    pub modules: std::collections::BTreeMap<String, usize>,
}

/// A model resolved into its components (nothing loaded yet).
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The `--model` path.
    pub path: PathBuf,
    /// What it is, e.g. `diffusers folder` or `SDXL base single file (built-in configs)`.
    pub description: String,
    pub denoiser: DenoiserSource,
    pub vae: Option<ComponentSource>,
    /// The text side; `None` for a folder without `model_index.json` (a bare denoiser
    /// folder, enough for `denoise` and `bench`).
    pub text: Option<PromptParts>,
    pub scheduler: SchedulerConfig,
    pub loras: Vec<LoraInfo>,
}

impl ResolvedModel {
    /// One line for stderr: what the model is and which LoRAs it carries, or `None` for a
    /// plain diffusers folder (nothing the user may not expect).
    pub fn summary(&self) -> Option<String> {
        if self.description == "diffusers folder" && self.loras.is_empty() {
            return None;
        }
        let mut line = format!("model {}: {}", self.path.display(), self.description);
        for l in &self.loras {
            let modules: Vec<String> = l.modules.iter().map(|(c, n)| format!("{c} {n}")).collect();
            line.push_str(&format!(
                "; LoRA {} x{} ({} modules)",
                l.path.display(),
                l.scale,
                modules.join(", ")
            ));
        }
        Some(line)
    }
}

/// A family's built-in configs (`families/*.json`).
struct FamilyConfigs(Value);

impl FamilyConfigs {
    fn of(family: Family) -> Self {
        let text = match family {
            Family::Sd1 => include_str!("families/sd1.json"),
            Family::Sd2 => include_str!("families/sd2.json"),
            Family::Sdxl => include_str!("families/sdxl.json"),
        };
        Self(serde_json::from_str(text).expect("the built-in family configs are valid JSON"))
    }

    fn text(&self, key: &str) -> String {
        self.0[key].to_string()
    }

    fn str(&self, key: &str) -> String {
        self.0[key].as_str().unwrap_or_default().to_string()
    }
}

fn family_dir(family: Family) -> &'static str {
    match family {
        Family::Sd1 => "sd1",
        Family::Sd2 => "sd2",
        Family::Sdxl => "sdxl",
    }
}

/// The shapes that tell a standard checkpoint of `family` (its published sizes): checked
/// before loading with built-in configs, so a checkpoint of another size asks for
/// `--config` instead of failing on its first mismatched tensor.
fn fingerprint(family: Family) -> Vec<(&'static str, Vec<usize>)> {
    let u = |n: &'static str| n;
    let mut v = vec![
        (
            u("model.diffusion_model.input_blocks.0.0.weight"),
            vec![320, 4, 3, 3],
        ),
        (u("model.diffusion_model.out.2.weight"), vec![4, 320, 3, 3]),
    ];
    match family {
        Family::Sd1 => v.extend([
            (
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                vec![320, 768],
            ),
            (
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                vec![49408, 768],
            ),
        ]),
        Family::Sd2 => v.extend([
            (
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                vec![320, 1024],
            ),
            (
                "cond_stage_model.model.token_embedding.weight",
                vec![49408, 1024],
            ),
            (
                "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
                vec![3072, 1024],
            ),
        ]),
        Family::Sdxl => v.extend([
            (
                "model.diffusion_model.label_emb.0.0.weight",
                vec![1280, 2816],
            ),
            (
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                vec![640, 2048],
            ),
            (
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                vec![49408, 768],
            ),
            (
                "conditioner.embedders.1.model.token_embedding.weight",
                vec![49408, 1280],
            ),
            (
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                vec![3840, 1280],
            ),
        ]),
    }
    v
}

/// A config text and the path that names it in messages.
struct Cfg {
    path: PathBuf,
    text: String,
}

/// Where a single file's configs and tokenizers come from.
enum Configs {
    Builtin(Family, FamilyConfigs),
    Folder(PathBuf, Value),
}

impl Configs {
    fn component(&self, name: &str) -> Result<Cfg> {
        match self {
            Configs::Builtin(f, c) => {
                let key = if name == "scheduler" {
                    "scheduler"
                } else {
                    name
                };
                Ok(Cfg {
                    path: PathBuf::from(format!(
                        "<built-in {} config>/{name}/config.json",
                        family_dir(*f)
                    )),
                    text: c.text(key),
                })
            }
            Configs::Folder(dir, _) => {
                let path = if name == "scheduler" {
                    dir.join("scheduler").join("scheduler_config.json")
                } else {
                    dir.join(name).join("config.json")
                };
                if !path.is_file() {
                    return Err(Error::io(
                        &path,
                        format!("--config {}: not found (the folder needs the configs of every component, as a diffusers pipeline folder has them)", dir.display()),
                    ));
                }
                Ok(Cfg {
                    text: read_text_bounded(&path, MAX_CONFIG_BYTES)?,
                    path,
                })
            }
        }
    }
}

impl ModelSpec {
    /// A diffusers folder alone.
    pub fn folder(dir: &Path) -> Self {
        Self {
            model: dir.to_path_buf(),
            ..Self::default()
        }
    }

    /// Resolves the model, its VAE, text side and LoRAs, reading configs and file headers
    /// only. `with_text: false` (denoise, bench) skips the text side, and LoRA modules of
    /// the text encoders are left out.
    pub fn resolve(&self, with_text: bool) -> Result<ResolvedModel> {
        let path = &self.model;
        let mut r = if path.is_dir() {
            if let Some(c) = &self.config {
                return Err(Error::Options(format!(
                    "--config {}: only goes with a single-file --model; {} is a folder with its own configs",
                    c.display(),
                    path.display()
                )));
            }
            resolve_folder(path, with_text)?
        } else if path.exists() {
            if let Some(kind) = hybridiff_models::weights::non_regular_kind(path) {
                return Err(Error::io(path, kind));
            }
            resolve_file(path, self.config.as_deref(), with_text)?
        } else {
            return Err(Error::io(
                path,
                "not found (expected a diffusers model folder or a single-file .safetensors checkpoint)",
            ));
        };
        if let Some(v) = &self.vae {
            r.vae = Some(resolve_vae(v, r.vae.as_ref())?);
            r.description
                .push_str(&format!(", VAE from {}", v.display()));
        }
        if !self.loras.is_empty() {
            attach_loras(&mut r, &self.loras, with_text)?;
        }
        Ok(r)
    }
}

fn resolve_folder(dir: &Path, with_text: bool) -> Result<ResolvedModel> {
    // The text side first: a pipeline folder's model_index.json names what it must hold.
    let text = if with_text {
        if !dir.join("model_index.json").is_file() {
            return Err(Error::io(
                dir,
                "not a diffusers pipeline folder: model_index.json is missing (for a bare denoiser folder use `hybridiff denoise`)",
            ));
        }
        Some(PromptParts::from_folder(dir)?)
    } else {
        None
    };
    let sched_path = dir.join("scheduler").join("scheduler_config.json");
    if !sched_path.is_file() {
        return Err(Error::io(&sched_path, "scheduler config not found"));
    }
    let scheduler = SchedulerConfig::from_file(&sched_path)?;
    let denoiser = if dir.join("unet").is_dir() {
        DenoiserSource::Unet(ComponentSource::folder(&dir.join("unet")))
    } else if dir.join("transformer").is_dir() {
        DenoiserSource::Transformer(ComponentSource::folder(&dir.join("transformer")))
    } else {
        return Err(Error::io(
            dir,
            "no denoiser found: expected a unet/ (SD, SDXL) or transformer/ (SD3) folder in diffusers layout",
        ));
    };
    let vae_dir = dir.join("vae");
    let vae = vae_dir.is_dir().then(|| ComponentSource::folder(&vae_dir));
    Ok(ResolvedModel {
        path: dir.to_path_buf(),
        description: "diffusers folder".into(),
        denoiser,
        vae,
        text,
        scheduler,
        loras: Vec::new(),
    })
}

/// A1111's convention for SD 2.x: a `.yaml` beside the checkpoint whose
/// `parameterization: "v"` marks v-prediction. `None` when there is no such file.
fn sidecar_v_prediction(path: &Path) -> Result<Option<bool>> {
    for ext in ["yaml", "yml"] {
        let side = path.with_extension(ext);
        if side.is_file() {
            let text = read_text_bounded(&side, MAX_CONFIG_BYTES)?;
            let v = text.lines().any(|l| {
                let l = l.trim();
                l.starts_with("parameterization:")
                    && l["parameterization:".len()..]
                        .trim()
                        .trim_matches(['"', '\''])
                        == "v"
            });
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn resolve_file(path: &Path, config: Option<&Path>, with_text: bool) -> Result<ResolvedModel> {
    let header = single_file::read_header(path)?;
    let detected = single_file::detect(&header)?;
    let family = detected.family;
    let configs = match config {
        None => {
            let fp = fingerprint(family);
            let fp: Vec<(&str, &[usize])> = fp.iter().map(|(n, s)| (*n, s.as_slice())).collect();
            single_file::check_shapes(&header, family, &fp)?;
            Configs::Builtin(family, FamilyConfigs::of(family))
        }
        Some(dir) => {
            let index_path = dir.join("model_index.json");
            if !dir.is_dir() || !index_path.is_file() {
                return Err(Error::io(
                    dir,
                    "--config: expected a diffusers pipeline folder (model_index.json, the components' config.json files and the tokenizers; no weights needed)",
                ));
            }
            let index: Value = hybridiff_models::weights::read_config(&index_path)?;
            let class = index
                .get("_class_name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let kind = PipelineKind::from_class_name(class);
            let fits = matches!(
                (kind, family),
                (
                    Some(PipelineKind::StableDiffusion),
                    Family::Sd1 | Family::Sd2
                ) | (Some(PipelineKind::StableDiffusionXl), Family::Sdxl)
            );
            if !fits {
                return Err(Error::Input(format!(
                    "--config {}: `_class_name` {class:?} does not fit {}, which is an {} checkpoint (found from its tensor names)",
                    dir.display(),
                    path.display(),
                    family.name()
                )));
            }
            Configs::Folder(dir.to_path_buf(), index)
        }
    };
    let file = Arc::new(Weights::open(std::slice::from_ref(&path.to_path_buf()))?);
    let unet_cfg = configs.component("unet")?;
    let unet_config = UNetConfig::from_raw(
        hybridiff_models::weights::parse_config(&unet_cfg.text, &unet_cfg.path)?,
        &unet_cfg.path,
    )?;
    let unet_tensors = single_file::unet_tensors(&file, &header, &unet_config);
    let unet = ComponentSource::mapped(Arc::new(unet_tensors), unet_cfg.path, &unet_cfg.text);
    let vae = match &detected.vae_prefix {
        Some(prefix) => {
            let cfg = configs.component("vae")?;
            let vc: hybridiff_models::vae::VaeConfig =
                hybridiff_models::weights::parse_config(&cfg.text, &cfg.path)?;
            let t = single_file::vae_tensors(
                &file,
                &header,
                prefix,
                vc.block_out_channels.len(),
                vc.layers_per_block,
            );
            Some(ComponentSource::mapped(Arc::new(t), cfg.path, &cfg.text))
        }
        None => None,
    };
    let mut scheduler_cfg = configs.component("scheduler")?;
    let mut prediction_note = String::new();
    if matches!(configs, Configs::Builtin(..)) {
        // diffusers' from_single_file takes stable-diffusion-2-1's v-prediction config for
        // every SD 2.x file; A1111's sidecar .yaml and ComfyUI's `v_pred` tensor say
        // otherwise when present.
        let v = match sidecar_v_prediction(path)? {
            Some(v) => {
                prediction_note = format!(
                    ", {} from {}",
                    if v { "v-prediction" } else { "epsilon" },
                    path.with_extension("yaml").display()
                );
                Some(v)
            }
            None if detected.v_pred_marker => {
                prediction_note = ", v-prediction (the file's `v_pred` tensor)".into();
                Some(true)
            }
            None => None,
        };
        if let Some(v) = v {
            let mut s: Value = serde_json::from_str(&scheduler_cfg.text)
                .map_err(|e| Error::Input(format!("built-in scheduler config: {e}")))?;
            s["prediction_type"] = Value::from(if v { "v_prediction" } else { "epsilon" });
            scheduler_cfg.text = s.to_string();
        } else if family == Family::Sd2 {
            prediction_note = ", v-prediction (SD 2.1 768; for a 512 px epsilon model such as SD 2.1-base, put a .yaml with parameterization: \"eps\" beside it, or use --config)".into();
        }
    }
    let scheduler = SchedulerConfig::from_json_str(&scheduler_cfg.text, scheduler_cfg.path)?;
    let text = if with_text {
        Some(file_text_parts(&file, &header, &detected, &configs)?)
    } else {
        None
    };
    let what = match &configs {
        Configs::Builtin(..) => "built-in configs".to_string(),
        Configs::Folder(d, _) => format!("configs of {}", d.display()),
    };
    Ok(ResolvedModel {
        path: path.to_path_buf(),
        description: format!("{} single file ({what}{prediction_note})", family.name()),
        denoiser: DenoiserSource::Unet(unet),
        vae,
        text,
        scheduler,
        loras: Vec::new(),
    })
}

/// The text encoders of a single file, with built-in tokenizers (or `--config`'s).
fn file_text_parts(
    file: &Arc<Weights>,
    header: &Header,
    detected: &Detected,
    configs: &Configs,
) -> Result<PromptParts> {
    let (kind, force_zeros) = match (detected.family, configs) {
        (Family::Sdxl, Configs::Folder(_, index)) => (
            PipelineKind::StableDiffusionXl,
            index
                .get("force_zeros_for_empty_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        ),
        (Family::Sdxl, _) => (PipelineKind::StableDiffusionXl, true),
        _ => (PipelineKind::StableDiffusion, false),
    };
    let mut clips = Vec::new();
    for (i, layout) in detected.text.iter().enumerate() {
        let slot = if i == 0 {
            "text_encoder".to_string()
        } else {
            format!("text_encoder_{}", i + 1)
        };
        let tok_slot = slot.replace("text_encoder", "tokenizer");
        let cfg = configs.component(&slot)?;
        let tc = hybridiff_text::ClipTextConfig::from_text(&cfg.text, &cfg.path)?;
        let with_projection = tc
            .architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection");
        let tensors = single_file::text_tensors(
            file,
            header,
            layout,
            &slot,
            tc.hidden_size,
            tc.num_hidden_layers,
            with_projection,
        );
        let tokenizer = match configs {
            Configs::Builtin(f, c) => {
                let key = if i == 0 {
                    "tokenizer_pad".to_string()
                } else {
                    format!("tokenizer_{}_pad", i + 1)
                };
                TokenizerSource::BuiltinClip {
                    pad: c.str(&key),
                    label: PathBuf::from(format!("<built-in {} {tok_slot}>", family_dir(*f))),
                }
            }
            Configs::Folder(dir, _) => {
                let d = dir.join(&tok_slot);
                if !d.is_dir() {
                    return Err(Error::io(
                        &d,
                        format!("--config {}: the tokenizer folder is missing (a single file holds no tokenizer)", dir.display()),
                    ));
                }
                TokenizerSource::Folder(d)
            }
        };
        if let TextLayout::OpenClip { .. } = layout {
            if tensors.map.is_empty() {
                return Err(Error::Input(format!(
                    "{}: no tensors for {slot} under `{}`",
                    header.path.display(),
                    layout.prefix()
                )));
            }
        }
        clips.push(ClipPart {
            slot,
            tokenizer,
            encoder: ComponentSource::mapped(Arc::new(tensors), cfg.path, &cfg.text),
            with_projection,
        });
    }
    Ok(PromptParts {
        kind,
        clips,
        t5: None,
        t5_zeros_width: 0,
        force_zeros_for_empty_prompt: force_zeros,
    })
}

/// `--vae`: a `vae/` folder, a VAE file in diffusers names, or one in the original layout
/// (`encoder.down.0...`, also below `first_stage_model.`). A file takes the config of the
/// model's own VAE.
fn resolve_vae(path: &Path, model_vae: Option<&ComponentSource>) -> Result<ComponentSource> {
    if path.is_dir() {
        let src = ComponentSource::folder(path);
        if !src.has_config() {
            return Err(Error::io(
                path.join("config.json"),
                "--vae: not found (a VAE folder holds config.json and the weights)",
            ));
        }
        return Ok(src);
    }
    if !path.exists() {
        return Err(Error::io(path, "--vae: not found"));
    }
    let header = single_file::read_header(path)?;
    let Some(model_vae) = model_vae.filter(|v| v.has_config()) else {
        return Err(Error::Input(format!(
            "--vae {}: a VAE file needs a config, taken from the model's VAE, and the model has none; pass a VAE folder (config.json + weights)",
            path.display()
        )));
    };
    let cfg_path = model_vae.config_path();
    let cfg_text = model_vae.config_text()?;
    Ok(match single_file::vae_file_layout(&header)? {
        Some(prefix) => {
            let vc: hybridiff_models::vae::VaeConfig =
                hybridiff_models::weights::parse_config(&cfg_text, &cfg_path)?;
            let file = Arc::new(Weights::open(std::slice::from_ref(&path.to_path_buf()))?);
            let t = single_file::vae_tensors(
                &file,
                &header,
                &prefix,
                vc.block_out_channels.len(),
                vc.layers_per_block,
            );
            ComponentSource::mapped(Arc::new(t), cfg_path, &cfg_text)
        }
        None => ComponentSource::file(path, cfg_path, &cfg_text),
    })
}

/// Reads the LoRA files, matches their modules to the model's weights and attaches the
/// deltas to the components.
fn attach_loras(r: &mut ResolvedModel, specs: &[LoraSpec], with_text: bool) -> Result<()> {
    let mut files = Vec::with_capacity(specs.len());
    for s in specs {
        if s.path.is_dir() {
            return Err(Error::io(
                &s.path,
                "--lora: is a folder; expected a .safetensors LoRA file",
            ));
        }
        if !s.path.exists() {
            return Err(Error::io(&s.path, "--lora: not found"));
        }
        files.push(LoraFile::open(s)?);
    }
    let den = r.denoiser.source();
    let den_name = r.denoiser.name();
    let ldm = match &r.denoiser {
        DenoiserSource::Unet(s) => Some(hybridiff_models::ldm::PrefixMap::unet(
            &UNetConfig::from_raw(s.read_config()?, &s.config_path())?,
        )),
        DenoiserSource::Transformer(_) => None,
    };
    let den_index = ComponentIndex::new(den_name, den.tensor_shapes()?, |m| {
        ldm.as_ref().and_then(|l| l.to_ldm(m)).into_iter().collect()
    });
    let text_indices: Vec<ComponentIndex> = match (&r.text, with_text) {
        (Some(t), true) => t
            .clips
            .iter()
            .map(|c| {
                Ok(ComponentIndex::new(
                    &c.slot,
                    c.encoder.tensor_shapes()?,
                    |m| {
                        // Some trainers name OpenCLIP modules (SD 2.x, SDXL's second encoder).
                        hybridiff_models::ldm::open_clip_module(m)
                            .into_iter()
                            .collect()
                    },
                ))
            })
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    let mut components: Vec<(Target, &ComponentIndex)> = vec![(Target::Denoiser, &den_index)];
    for (i, idx) in text_indices.iter().enumerate() {
        components.push((Target::TextEncoder(i), idx));
    }
    if !with_text {
        // denoise and bench run the denoiser alone: text-encoder modules have nothing to
        // change. A file with no denoiser module is still an error below.
        for f in &mut files {
            f.retain_targets(|t| t == Target::Denoiser);
        }
    }
    let model = format!("{} ({})", r.path.display(), r.description);
    let patches = hybridiff_models::lora::match_files(&files, &components, &model)?;
    let mut patches = patches.into_iter();
    let den_patches = patches.next().expect("one per component");
    match &mut r.denoiser {
        DenoiserSource::Unet(s) | DenoiserSource::Transformer(s) => {
            *s = s.clone().with_patches(Arc::new(den_patches));
        }
    }
    if let Some(t) = r.text.as_mut().filter(|_| with_text) {
        for (c, p) in t.clips.iter_mut().zip(patches) {
            c.encoder = c.encoder.clone().with_patches(Arc::new(p));
        }
    }
    for f in &files {
        let modules = f
            .counts()
            .into_iter()
            .map(|(t, n)| {
                let name = match t {
                    Target::Denoiser => den_name.to_string(),
                    t => t.name(den_name),
                };
                (name, n)
            })
            .collect();
        r.loras.push(LoraInfo {
            path: f.spec.path.clone(),
            scale: f.spec.scale,
            modules,
        });
    }
    Ok(())
}
