//! Prompt encoding as the diffusers pipelines' `encode_prompt` does it, for one prompt
//! and one image per prompt, with classifier-free guidance (the negative embeddings are
//! always computed).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use hybridiff_models::weights::{read_config, ComponentSource};
use serde_json::Value;

use crate::error::CandleContext;
use crate::{ClipTextModel, ClipTokenizer, Error, Result, T5EncoderModel, T5Tokenizer};

/// diffusers' `max_sequence_length` default for SD3's T5.
pub const DEFAULT_T5_MAX_LENGTH: usize = 256;

/// Which diffusers pipeline's `encode_prompt` to follow, from `model_index.json`'s
/// `_class_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// `StableDiffusionPipeline` (SD 1.x, 2.x): one CLIP, its last hidden state after
    /// `final_layer_norm`, no pooled embedding.
    StableDiffusion,
    /// `StableDiffusionXLPipeline`: two CLIPs' penultimate hidden states, concatenated;
    /// the projected pooled output of the second.
    StableDiffusionXl,
    /// `StableDiffusion3Pipeline`: CLIP-L + CLIP-G penultimate hidden states, padded to
    /// T5's width and followed by T5's output; both projected pooled outputs.
    StableDiffusion3,
}

impl PipelineKind {
    /// The family of a diffusers pipeline class name (`model_index.json`'s `_class_name`).
    pub fn from_class_name(name: &str) -> Option<Self> {
        // Img2img/inpaint/controlnet variants share their family's encode_prompt.
        if name.starts_with("StableDiffusion3") {
            Some(Self::StableDiffusion3)
        } else if name.starts_with("StableDiffusionXL") {
            Some(Self::StableDiffusionXl)
        } else if name.starts_with("StableDiffusion") {
            Some(Self::StableDiffusion)
        } else {
            None
        }
    }
}

/// What `encode_prompt` returns, batch 1, in the encoder's dtype.
#[derive(Debug, Clone)]
pub struct EncodedPrompts {
    /// `[1, S, D]`: SD `[1, 77, hidden]`, SDXL `[1, 77, hidden_1 + hidden_2]`,
    /// SD3 `[1, 77 + max_sequence_length, t5_width]`.
    pub prompt_embeds: Tensor,
    /// Same shape as `prompt_embeds`.
    pub negative_prompt_embeds: Tensor,
    /// SDXL `[1, projection_dim]`, SD3 `[1, projection_1 + projection_2]`, SD `None`.
    pub pooled_prompt_embeds: Option<Tensor>,
    /// Same shape as `pooled_prompt_embeds`.
    pub negative_pooled_prompt_embeds: Option<Tensor>,
    /// The prompt's token ids, one list per tokenizer in the pipeline's order
    /// (`tokenizer`, `tokenizer_2`, `tokenizer_3` when present).
    pub input_ids: Vec<Vec<u32>>,
    /// The negative prompt's token ids likewise; empty when the negative embeddings
    /// are zeros (`force_zeros_for_empty_prompt`).
    pub negative_input_ids: Vec<Vec<u32>>,
}

#[derive(Debug)]
struct ClipBranch {
    dir: PathBuf,
    tokenizer: ClipTokenizer,
    encoder: ClipTextModel,
}

struct ClipRun {
    ids: Vec<u32>,
    out: crate::ClipTextOutput,
}

impl ClipBranch {
    fn run(&self, text: &str, device: &Device) -> Result<ClipRun> {
        let enc = self.tokenizer.encode(text)?;
        let out = self
            .encoder
            .forward_ids(&enc.ids, device)
            .context(|| format!("{}: CLIP text encoder forward", self.dir.display()))?;
        Ok(ClipRun { ids: enc.ids, out })
    }

    fn penultimate(&self, run: &ClipRun) -> Result<Tensor> {
        let hs = &run.out.hidden_states;
        hs.len()
            .checked_sub(2)
            .map(|i| hs[i].clone())
            .ok_or_else(|| {
                Error::config(
                    self.dir.join("config.json"),
                    "`num_hidden_layers` must be at least 1 to take hidden_states[-2]",
                )
            })
    }

    fn projected(&self, run: &ClipRun) -> Result<Tensor> {
        run.out.text_embeds.clone().ok_or_else(|| {
            Error::config(
                self.dir.join("config.json"),
                "this pipeline needs a CLIPTextModelWithProjection here",
            )
        })
    }
}

#[derive(Debug)]
struct T5Branch {
    dir: PathBuf,
    tokenizer: T5Tokenizer,
    encoder: T5EncoderModel,
}

/// The tokenizers and text encoders of a diffusers pipeline folder, with the pipeline's
/// `encode_prompt` logic. The one prompt goes to every tokenizer, as diffusers does
/// when `prompt_2` / `prompt_3` are not given.
#[derive(Debug)]
pub struct PromptEncoder {
    kind: PipelineKind,
    clips: Vec<ClipBranch>,
    t5: Option<T5Branch>,
    /// SD3 without `text_encoder_3`: the transformer's `joint_attention_dim`, the width
    /// of the zeros diffusers puts in T5's place.
    t5_zeros_width: usize,
    max_sequence_length: usize,
    force_zeros_for_empty_prompt: bool,
    dtype: DType,
    device: Device,
    /// The last texts encoded, most recent first (see [`EncodeMemo`]).
    memo: std::sync::Mutex<EncodeMemo>,
}

/// One text through every encoder: `(embeds, pooled, ids per tokenizer)`.
type Encoded = (Tensor, Option<Tensor>, Vec<Vec<u32>>);

/// The encodings of the last [`EncodeMemo::CAPACITY`] texts: a batch or a service
/// encodes the same negative prompt (usually empty) for every image and often the same
/// prompt for several seeds. Encoding is deterministic, so a remembered encoding is the
/// one a new run would compute, bit for bit.
#[derive(Debug, Default)]
struct EncodeMemo {
    entries: std::collections::VecDeque<(String, Encoded)>,
}

impl EncodeMemo {
    /// A few prompts' worth: SDXL's two encoders give 77 x 2048 values per text (630 KB).
    const CAPACITY: usize = 16;

    fn get(&mut self, text: &str) -> Option<Encoded> {
        let at = self.entries.iter().position(|(t, _)| t == text)?;
        let entry = self.entries.remove(at)?;
        let value = entry.1.clone();
        self.entries.push_front(entry);
        Some(value)
    }

    fn put(&mut self, text: &str, value: Encoded) {
        self.entries.retain(|(t, _)| t != text);
        self.entries.push_front((text.to_string(), value));
        self.entries.truncate(Self::CAPACITY);
    }
}

/// `model_index.json`'s `[library, class]` entry for `key`, or `None` when the
/// component is absent (`[null, null]` or no entry).
fn component(index: &Value, key: &str) -> Option<String> {
    match index.get(key)? {
        Value::Array(v) if v.len() == 2 && !v[0].is_null() && !v[1].is_null() => {
            v[1].as_str().map(str::to_owned)
        }
        _ => None,
    }
}

fn require_dir(model_dir: &Path, name: &str) -> Result<PathBuf> {
    let dir = model_dir.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(Error::io(
            &dir,
            format!("folder `{name}` is listed in model_index.json but missing"),
        ))
    }
}

/// Where a CLIP tokenizer comes from.
#[derive(Debug, Clone)]
pub enum TokenizerSource {
    /// A diffusers `tokenizer*/` folder.
    Folder(PathBuf),
    /// The CLIP vocabulary this binary carries, with this pad token (see
    /// [`ClipTokenizer::builtin`]); the path names it in messages.
    BuiltinClip { pad: String, label: PathBuf },
}

impl TokenizerSource {
    fn load(&self) -> Result<ClipTokenizer> {
        match self {
            TokenizerSource::Folder(dir) => ClipTokenizer::from_dir(dir),
            TokenizerSource::BuiltinClip { pad, label } => ClipTokenizer::builtin(pad, label),
        }
    }
}

/// One CLIP branch of a pipeline: its slot (`text_encoder`, `text_encoder_2`), tokenizer
/// and encoder.
#[derive(Debug, Clone)]
pub struct ClipPart {
    pub slot: String,
    pub tokenizer: TokenizerSource,
    pub encoder: ComponentSource,
    /// `CLIPTextModelWithProjection` (SDXL's second encoder, SD3's two).
    pub with_projection: bool,
}

/// Everything [`PromptEncoder`] loads, resolved but not read: the family, the CLIP
/// branches in the pipeline's order, SD3's T5, and `force_zeros_for_empty_prompt`.
#[derive(Debug, Clone)]
pub struct PromptParts {
    pub kind: PipelineKind,
    pub clips: Vec<ClipPart>,
    /// SD3's `(tokenizer_3 folder, text_encoder_3 folder)`.
    pub t5: Option<(PathBuf, PathBuf)>,
    /// SD3 without `text_encoder_3`: the width of the zeros in T5's place.
    pub t5_zeros_width: usize,
    pub force_zeros_for_empty_prompt: bool,
}

impl PromptParts {
    /// The tokenizers and text encoders that `model_dir/model_index.json` lists.
    pub fn from_folder(model_dir: &Path) -> Result<Self> {
        let index_path = model_dir.join("model_index.json");
        if !index_path.is_file() {
            return Err(Error::io(
                &index_path,
                "not found: a diffusers pipeline folder needs model_index.json",
            ));
        }
        let index: Value = read_config(&index_path)?;
        let class = index
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let kind = PipelineKind::from_class_name(&class).ok_or_else(|| Error::Unsupported {
            path: index_path.clone(),
            key: "_class_name".into(),
            value: format!("{class:?}"),
            hint: "supported: StableDiffusion*, StableDiffusionXL*, StableDiffusion3* pipelines"
                .into(),
        })?;
        let unsupported = |key: &str, value: String, hint: &str| Error::Unsupported {
            path: index_path.clone(),
            key: key.into(),
            value,
            hint: hint.into(),
        };
        let clip_part = |n: &str, required: bool| -> Result<Option<ClipPart>> {
            let te_key = format!("text_encoder{n}");
            let tok_key = format!("tokenizer{n}");
            let (te, tok) = (component(&index, &te_key), component(&index, &tok_key));
            let Some(te_class) = te else {
                return if required {
                    Err(unsupported(
                        &te_key,
                        "null".into(),
                        "this pipeline needs this text encoder",
                    ))
                } else {
                    Ok(None)
                };
            };
            let with_projection = match te_class.as_str() {
                "CLIPTextModel" => false,
                "CLIPTextModelWithProjection" => true,
                other => {
                    return Err(unsupported(
                        &te_key,
                        format!("{other:?}"),
                        "expected CLIPTextModel or CLIPTextModelWithProjection",
                    ))
                }
            };
            if tok.is_none() {
                return Err(unsupported(
                    &tok_key,
                    "null".into(),
                    "a text encoder needs its tokenizer",
                ));
            }
            let tok_dir = require_dir(model_dir, &tok_key)?;
            let te_dir = require_dir(model_dir, &te_key)?;
            Ok(Some(ClipPart {
                slot: te_key,
                tokenizer: TokenizerSource::Folder(tok_dir),
                encoder: ComponentSource::folder(&te_dir),
                with_projection,
            }))
        };

        let mut clips = Vec::new();
        let mut t5 = None;
        let mut t5_zeros_width = 0;
        match kind {
            PipelineKind::StableDiffusion => {
                let te_dir = require_dir(model_dir, "text_encoder")?;
                let cfg_path = te_dir.join("config.json");
                let cfg: Value = read_config(&cfg_path)?;
                if cfg.get("use_attention_mask").and_then(Value::as_bool) == Some(true) {
                    return Err(Error::Unsupported {
                        path: cfg_path,
                        key: "use_attention_mask".into(),
                        value: "true".into(),
                        hint: "the padding attention mask is not implemented".into(),
                    });
                }
                clips.extend(clip_part("", true)?);
            }
            PipelineKind::StableDiffusionXl => {
                // The SDXL refiner has only the second encoder.
                clips.extend(clip_part("", false)?);
                clips.extend(clip_part("_2", true)?);
            }
            PipelineKind::StableDiffusion3 => {
                clips.extend(clip_part("", true)?);
                clips.extend(clip_part("_2", true)?);
                if component(&index, "text_encoder_3").is_some() {
                    let tok_dir = require_dir(model_dir, "tokenizer_3")?;
                    let te_dir = require_dir(model_dir, "text_encoder_3")?;
                    t5 = Some((tok_dir, te_dir));
                } else {
                    let cfg_path = model_dir.join("transformer").join("config.json");
                    let cfg: Value = read_config(&cfg_path)?;
                    t5_zeros_width = cfg
                        .get("joint_attention_dim")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| {
                            Error::config(
                                &cfg_path,
                                "no `joint_attention_dim`: needed for the zero T5 embeddings \
                                 of a pipeline without text_encoder_3",
                            )
                        })? as usize;
                }
            }
        }
        if kind != PipelineKind::StableDiffusion && !clips.iter().any(|c| c.with_projection) {
            return Err(unsupported(
                "text_encoder_2",
                "CLIPTextModel".into(),
                "the pooled embedding needs a CLIPTextModelWithProjection",
            ));
        }
        let force_zeros_for_empty_prompt = kind == PipelineKind::StableDiffusionXl
            && index
                .get("force_zeros_for_empty_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(true);
        Ok(Self {
            kind,
            clips,
            t5,
            t5_zeros_width,
            force_zeros_for_empty_prompt,
        })
    }
}

impl PromptEncoder {
    /// Loads the tokenizers and text encoders that `model_dir/model_index.json` lists,
    /// in `dtype` on `device`.
    pub fn load(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_parts(&PromptParts::from_folder(model_dir)?, dtype, device)
    }

    /// Loads resolved parts (a folder's, or a single file's with built-in tokenizers),
    /// with the LoRA deltas their encoders carry.
    pub fn from_parts(parts: &PromptParts, dtype: DType, device: &Device) -> Result<Self> {
        let clips = parts
            .clips
            .iter()
            .map(|c| {
                Ok(ClipBranch {
                    dir: c.encoder.label().to_path_buf(),
                    tokenizer: c.tokenizer.load()?,
                    encoder: ClipTextModel::load_source_as(
                        &c.encoder,
                        c.with_projection,
                        dtype,
                        device,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let t5 = match &parts.t5 {
            Some((tok_dir, te_dir)) => Some(T5Branch {
                tokenizer: T5Tokenizer::from_dir(tok_dir)?,
                encoder: T5EncoderModel::load(te_dir, dtype, device)?,
                dir: te_dir.clone(),
            }),
            None => None,
        };
        Ok(Self {
            kind: parts.kind,
            clips,
            t5,
            t5_zeros_width: parts.t5_zeros_width,
            max_sequence_length: DEFAULT_T5_MAX_LENGTH,
            force_zeros_for_empty_prompt: parts.force_zeros_for_empty_prompt,
            dtype,
            device: device.clone(),
            memo: Default::default(),
        })
    }

    /// The pipeline family this folder belongs to.
    pub fn kind(&self) -> PipelineKind {
        self.kind
    }

    /// SD3's T5 sequence length (diffusers' `max_sequence_length`, 256 by default).
    pub fn set_max_sequence_length(&mut self, n: usize) {
        self.max_sequence_length = n;
        *self.memo.get_mut().unwrap_or_else(|e| e.into_inner()) = EncodeMemo::default();
    }

    /// Encodes `prompt` and `negative_prompt` as the pipeline's `encode_prompt` with
    /// classifier-free guidance. An empty `negative_prompt` stands for diffusers'
    /// default `None`: SDXL with `force_zeros_for_empty_prompt` then returns zero
    /// negative embeddings, the other pipelines encode the empty string.
    pub fn encode(&self, prompt: &str, negative_prompt: &str) -> Result<EncodedPrompts> {
        let negative = (!negative_prompt.is_empty()).then_some(negative_prompt);
        self.encode_opt(prompt, negative)
    }

    /// [`Self::encode`] with diffusers' exact `negative_prompt` semantics: only `None`
    /// triggers `force_zeros_for_empty_prompt`; `Some("")` encodes the empty string.
    pub fn encode_opt(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
    ) -> Result<EncodedPrompts> {
        let (prompt_embeds, pooled, input_ids) = self.encode_one(prompt)?;
        if self.force_zeros_for_empty_prompt && negative_prompt.is_none() {
            let zeros = |t: &Tensor| t.zeros_like().context(|| "zero negative embeddings".into());
            let negative_pooled = pooled.as_ref().map(zeros).transpose()?;
            return Ok(EncodedPrompts {
                negative_prompt_embeds: zeros(&prompt_embeds)?,
                prompt_embeds,
                pooled_prompt_embeds: pooled,
                negative_pooled_prompt_embeds: negative_pooled,
                input_ids,
                negative_input_ids: Vec::new(),
            });
        }
        let (negative_prompt_embeds, negative_pooled, negative_input_ids) =
            self.encode_one(negative_prompt.unwrap_or(""))?;
        Ok(EncodedPrompts {
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds: pooled,
            negative_pooled_prompt_embeds: negative_pooled,
            input_ids,
            negative_input_ids,
        })
    }

    /// One text through every encoder: `(embeds, pooled, ids per tokenizer)`, remembered
    /// for the next texts ([`EncodeMemo`]).
    fn encode_one(&self, text: &str) -> Result<Encoded> {
        // A panic elsewhere leaves the memo consistent (whole entries only).
        let hit = self
            .memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(text);
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let value = self.encode_uncached(text)?;
        self.memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(text, value.clone());
        Ok(value)
    }

    fn encode_uncached(&self, text: &str) -> Result<Encoded> {
        let runs = self
            .clips
            .iter()
            .map(|c| c.run(text, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let mut ids: Vec<Vec<u32>> = runs.iter().map(|r| r.ids.clone()).collect();
        let cat = |parts: &[Tensor], dim: D, what: &str| {
            Tensor::cat(parts, dim).context(|| format!("concatenating {what}"))
        };
        match self.kind {
            PipelineKind::StableDiffusion => Ok((runs[0].out.last_hidden_state.clone(), None, ids)),
            PipelineKind::StableDiffusionXl => {
                let hidden = self
                    .clips
                    .iter()
                    .zip(&runs)
                    .map(|(c, r)| c.penultimate(r))
                    .collect::<Result<Vec<_>>>()?;
                let embeds = cat(&hidden, D::Minus1, "the CLIP hidden states")?;
                // diffusers keeps the first 2-D `output[0]`, i.e. the first encoder with
                // a projection (the second one in SDXL base).
                let pooled = runs.iter().find_map(|r| r.out.text_embeds.clone());
                Ok((embeds, pooled, ids))
            }
            PipelineKind::StableDiffusion3 => {
                let hidden = self
                    .clips
                    .iter()
                    .zip(&runs)
                    .map(|(c, r)| c.penultimate(r))
                    .collect::<Result<Vec<_>>>()?;
                let pooled = self
                    .clips
                    .iter()
                    .zip(&runs)
                    .map(|(c, r)| c.projected(r))
                    .collect::<Result<Vec<_>>>()?;
                let clip = cat(&hidden, D::Minus1, "the CLIP hidden states")?;
                let t5 = match &self.t5 {
                    Some(t5) => {
                        let enc = t5.tokenizer.encode(text, self.max_sequence_length)?;
                        let out = Tensor::new(enc.ids.as_slice(), &self.device)
                            .and_then(|t| t.unsqueeze(0))
                            .and_then(|t| t5.encoder.forward(&t))
                            .and_then(|t| t.to_dtype(self.dtype))
                            .context(|| format!("{}: T5 encoder forward", t5.dir.display()))?;
                        ids.push(enc.ids);
                        out
                    }
                    None => Tensor::zeros(
                        (1, self.max_sequence_length, self.t5_zeros_width),
                        self.dtype,
                        &self.device,
                    )
                    .context(|| "zero T5 embeddings".into())?,
                };
                let clip = pad_last_dim(&clip, t5.dim(D::Minus1).context(|| "T5 width".into())?)
                    .context(|| "padding the CLIP embeddings to T5's width".into())?;
                let embeds = cat(&[clip, t5], D::Minus2, "the CLIP and T5 embeddings")?;
                let pooled = cat(&pooled, D::Minus1, "the pooled CLIP embeddings")?;
                Ok((embeds, Some(pooled), ids))
            }
        }
    }
}

/// `torch.nn.functional.pad(x, (0, width - x.shape[-1]))`: zeros on the right, or a crop
/// when `width` is smaller, as a negative pad does.
fn pad_last_dim(x: &Tensor, width: usize) -> candle_core::Result<Tensor> {
    let w = x.dim(D::Minus1)?;
    if w == width {
        Ok(x.clone())
    } else if w > width {
        x.narrow(D::Minus1, 0, width)
    } else {
        let mut shape = x.dims().to_vec();
        let last = shape.len() - 1;
        shape[last] = width - w;
        let zeros = Tensor::zeros(shape, x.dtype(), x.device())?;
        Tensor::cat(&[x, &zeros], D::Minus1)
    }
}

#[cfg(test)]
mod memo_tests {
    use super::*;

    fn value(v: f32) -> Encoded {
        (
            Tensor::new(&[v], &Device::Cpu).unwrap(),
            None,
            vec![vec![v as u32]],
        )
    }

    #[test]
    fn the_memo_keeps_the_most_recent_texts() {
        let mut m = EncodeMemo::default();
        for i in 0..EncodeMemo::CAPACITY {
            m.put(&i.to_string(), value(i as f32));
        }
        // A hit moves "0" to the front; the next new text evicts the oldest, "1".
        assert_eq!(m.get("0").unwrap().2, vec![vec![0]]);
        m.put("new", value(99.0));
        assert_eq!(m.entries.len(), EncodeMemo::CAPACITY);
        assert!(m.get("1").is_none());
        assert!(m.get("0").is_some() && m.get("2").is_some() && m.get("new").is_some());
        // Putting a remembered text again keeps one entry.
        m.put("new", value(7.0));
        assert_eq!(m.entries.iter().filter(|(t, _)| t == "new").count(), 1);
        assert_eq!(m.get("new").unwrap().2, vec![vec![7]]);
    }
}
