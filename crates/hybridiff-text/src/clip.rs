//! transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`, with the weight
//! names transformers saves (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
//! `text_projection.weight`; transformers 5 saves a bare `CLIPTextModel` without the
//! `text_model.` prefix, and both layouts load).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use hybridiff_models::weights::{read_config, ComponentSource};
use serde::Deserialize;

use crate::act::Activation;
use crate::error::CandleContext;
use crate::{Error, Result};

/// The keys of a CLIP text encoder's `config.json` (`CLIPTextConfig`) that shape the
/// computation; defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_projection")]
    pub projection_dim: Option<usize>,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Where the pooled output is taken: the first position of this id, or, for the
    /// legacy value 2 (SD 1.x/2.x and SDXL's first encoder), the argmax of the ids.
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    /// A diffusers-era key: when true, the SD pipelines pass the padding mask.
    #[serde(default)]
    pub use_attention_mask: Option<bool>,
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_projection() -> Option<usize> {
    Some(512)
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> i64 {
    49407
}

impl ClipTextConfig {
    /// Reads and checks `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::checked(read_config(path)?, path)
    }

    /// Reads and checks the config of a component source.
    pub fn from_source(src: &ComponentSource) -> Result<Self> {
        Self::checked(src.read_config()?, &src.config_path())
    }

    /// Parses and checks config text; `path` names it in errors.
    pub fn from_text(text: &str, path: &Path) -> Result<Self> {
        Self::checked(hybridiff_models::weights::parse_config(text, path)?, path)
    }

    fn checked(cfg: Self, path: &Path) -> Result<Self> {
        Activation::parse(&cfg.hidden_act, path, "hidden_act")?;
        if !(cfg.layer_norm_eps.is_finite()
            && cfg.layer_norm_eps > 0.0
            && cfg.layer_norm_eps <= 1e-1)
        {
            return Err(Error::config(
                path,
                format!(
                    "`layer_norm_eps` = {}: expected a small positive number, at most 1e-1 (it keeps the layer norms' divisions finite without changing them)",
                    cfg.layer_norm_eps
                ),
            ));
        }
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "`hidden_size` {} is not a multiple of `num_attention_heads` {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        Ok(cfg)
    }
}

/// Tensors a CLIP checkpoint may hold that the encoder never reads: the `position_ids`
/// buffer older transformers saved, and a projection a `CLIPTextModel` does not apply.
const CLIP_UNUSED_OK: &[&str] = &[
    "text_model.embeddings.position_ids",
    "embeddings.position_ids",
    "text_projection.",
];

/// What a CLIP text encoder returns (transformers' names).
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// The last layer's output after `final_layer_norm`, `[B, S, hidden]`.
    pub last_hidden_state: Tensor,
    /// `output_hidden_states=True`: the embeddings, then every layer's output (the last
    /// one before `final_layer_norm`); `num_hidden_layers + 1` tensors `[B, S, hidden]`.
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at the EOS position, `[B, hidden]`.
    pub pooler_output: Tensor,
    /// `text_projection(pooler_output)`, `[B, projection_dim]`, for the WithProjection model.
    pub text_embeds: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, c) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        // transformers takes the softmax in float32 whatever the model dtype.
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, c))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, act: Activation) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            self_attn: Attention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: candle_nn::linear(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?,
            act,
            layer_norm2: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let m = self.fc1.forward(&self.layer_norm2.forward(&h)?)?;
        let m = self.fc2.forward(&self.act.forward(&m)?)?;
        h + m
    }
}

/// transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when it carries a
/// `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: i64,
    max_positions: usize,
}

impl ClipTextModel {
    /// Builds the model from weights under `vb` (the checkpoint root). The text model's
    /// weights may sit under `text_model.` (published checkpoints, the WithProjection
    /// model) or at the root (a `CLIPTextModel` saved by transformers 5).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, with_projection: bool) -> Result<Self> {
        let act = Activation::parse(&cfg.hidden_act, Path::new("config.json"), "hidden_act")?;
        let build = || -> candle_core::Result<Self> {
            let tm = if vb.contains_tensor("embeddings.token_embedding.weight")
                && !vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            {
                vb.clone()
            } else {
                vb.pp("text_model")
            };
            let h = cfg.hidden_size;
            let emb = tm.pp("embeddings");
            let token_embedding =
                candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
            let position_embedding =
                candle_nn::embedding(cfg.max_position_embeddings, h, emb.pp("position_embedding"))?;
            let layers = (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(tm.pp(format!("encoder.layers.{i}")), cfg, act))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let final_layer_norm =
                candle_nn::layer_norm(h, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?;
            let text_projection = if with_projection {
                let p = cfg.projection_dim.ok_or_else(|| {
                    candle_core::Error::Msg(
                        "a CLIPTextModelWithProjection needs `projection_dim` in config.json"
                            .into(),
                    )
                })?;
                Some(candle_nn::linear_no_bias(h, p, vb.pp("text_projection"))?)
            } else {
                None
            };
            Ok(Self {
                token_embedding,
                position_embedding,
                layers,
                final_layer_norm,
                text_projection,
                eos_token_id: cfg.eos_token_id,
                max_positions: cfg.max_position_embeddings,
            })
        };
        build().context(|| "loading the CLIP text encoder".into())
    }

    /// Loads `dir/config.json` and the weights of `dir`; the projection is there when
    /// the config's `architectures` names `CLIPTextModelWithProjection`, or, without
    /// `architectures`, when the weights hold `text_projection.weight`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let src = ComponentSource::folder(dir);
        let cfg = ClipTextConfig::from_source(&src)?;
        src.load(dtype, device, CLIP_UNUSED_OK, |vb| {
            let with_projection = if cfg.architectures.is_empty() {
                vb.contains_tensor("text_projection.weight")
            } else {
                cfg.architectures
                    .iter()
                    .any(|a| a == "CLIPTextModelWithProjection")
            };
            Self::with_config(dir, &cfg, vb, with_projection)
        })
    }

    /// Loads `dir` as a `CLIPTextModel` (`with_projection` false) or a
    /// `CLIPTextModelWithProjection`, as a pipeline's `model_index.json` names it.
    pub fn load_as(
        dir: &Path,
        with_projection: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_source_as(
            &ComponentSource::folder(dir),
            with_projection,
            dtype,
            device,
        )
    }

    /// [`Self::load_as`] from any component source (a folder, or a text encoder inside a
    /// single-file checkpoint), with its LoRA deltas merged.
    pub fn load_source_as(
        src: &ComponentSource,
        with_projection: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg = ClipTextConfig::from_source(src)?;
        src.load(dtype, device, CLIP_UNUSED_OK, |vb| {
            Self::with_config(src.label(), &cfg, vb, with_projection)
        })
    }

    fn with_config(
        dir: &Path,
        cfg: &ClipTextConfig,
        vb: VarBuilder,
        with_projection: bool,
    ) -> Result<Self> {
        Self::new(vb, cfg, with_projection).map_err(|e| match e {
            Error::Candle { source, .. } => Error::Candle {
                context: format!("{}: loading the CLIP text encoder", dir.display()),
                source,
            },
            e => e,
        })
    }

    /// Whether this is the WithProjection model.
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Runs the encoder on `input_ids` (`[B, S]`, u32, S <= `max_position_embeddings`)
    /// with CLIP's causal mask and no padding mask, as the diffusers pipelines call it.
    /// Reads the ids back to the host for the pooling position: on a GPU prefer
    /// [`Self::forward_ids`], which knows them already.
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<ClipTextOutput> {
        let rows = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let pool: Vec<usize> = rows.iter().map(|r| self.pool_position(r)).collect();
        self.forward_pooled_at(input_ids, &pool)
    }

    /// [`Self::forward`] on one prompt's token ids, held on the host: uploads them to
    /// `device` and pools at the position they give, so the forward reads nothing back
    /// from the device (no host round trip on a GPU).
    pub fn forward_ids(&self, ids: &[u32], device: &Device) -> candle_core::Result<ClipTextOutput> {
        let input_ids = Tensor::new(ids, device)?.unsqueeze(0)?;
        self.forward_pooled_at(&input_ids, &[self.pool_position(ids)])
    }

    /// The forward, pooling row `i` at `pool[i]`.
    fn forward_pooled_at(
        &self,
        input_ids: &Tensor,
        pool: &[usize],
    ) -> candle_core::Result<ClipTextOutput> {
        let (b, s) = input_ids.dims2()?;
        if pool.len() != b {
            candle_core::bail!("{} pooling positions for a batch of {b}", pool.len());
        }
        if s > self.max_positions {
            candle_core::bail!(
                "sequence length {s} exceeds max_position_embeddings {}",
                self.max_positions
            );
        }
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, s as u32, device)?;
        let mut x = self
            .token_embedding
            .forward(&input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?.unsqueeze(0)?)?;
        let dtype = x.dtype();
        let mask = causal_mask(s, dtype, device)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;
        let mut pooled = Vec::with_capacity(b);
        for (i, &p) in pool.iter().enumerate() {
            pooled.push(last_hidden_state.i((i, p))?);
        }
        let pooler_output = Tensor::stack(&pooled, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooler_output)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooler_output,
            text_embeds,
        })
    }

    /// transformers' pooling position: with the legacy `eos_token_id` 2 the argmax of
    /// the ids (the first maximal one, as torch's argmax), else the first occurrence of
    /// `eos_token_id` (0 when there is none, as torch's argmax over all-false).
    fn pool_position(&self, ids: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            let mut best = 0;
            for (j, &id) in ids.iter().enumerate() {
                if id > ids[best] {
                    best = j;
                }
            }
            best
        } else {
            ids.iter()
                .position(|&id| i64::from(id) == self.eos_token_id)
                .unwrap_or(0)
        }
    }
}

/// `[S, S]` additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(s: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (s, s), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_shape_and_values() {
        let m = causal_mask(3, DType::F32, &Device::Cpu).unwrap();
        let v = m.to_vec2::<f32>().unwrap();
        assert_eq!(v[0][0], 0.0);
        assert!(v[0][1].is_infinite() && v[0][1] < 0.0);
        assert_eq!(v[2][1], 0.0);
    }
}
