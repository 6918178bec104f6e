//! transformers' `T5EncoderModel`: relative position buckets computed by the first
//! block's self-attention and shared by all blocks, T5's RMS layer norm, gated-act or
//! plain dense feed-forward, `final_layer_norm`. Weight names as transformers saves them
//! (`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`, ...).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use hybridiff_models::weights::{read_config, Weights};
use serde::Deserialize;

use crate::act::Activation;
use crate::error::CandleContext;
use crate::{Error, Result};

/// The keys of a T5 `config.json` that shape the encoder; defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_model")]
    pub d_model: usize,
    #[serde(default = "d_kv")]
    pub d_kv: usize,
    #[serde(default = "d_ff")]
    pub d_ff: usize,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_heads")]
    pub num_heads: usize,
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (T5 v1.1, SD3's T5-XXL), `relu` (original T5), or `[gated-]<act>`.
    #[serde(default = "d_ffp")]
    pub feed_forward_proj: String,
}

fn d_vocab() -> usize {
    32128
}
fn d_model() -> usize {
    512
}
fn d_kv() -> usize {
    64
}
fn d_ff() -> usize {
    2048
}
fn d_layers() -> usize {
    6
}
fn d_heads() -> usize {
    8
}
fn d_buckets() -> usize {
    32
}
fn d_distance() -> usize {
    128
}
fn d_eps() -> f64 {
    1e-6
}
fn d_ffp() -> String {
    "relu".into()
}

impl T5Config {
    /// Reads and checks `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_config(path)?;
        cfg.feed_forward(path)?;
        if !(cfg.layer_norm_epsilon.is_finite()
            && cfg.layer_norm_epsilon > 0.0
            && cfg.layer_norm_epsilon <= 1e-1)
        {
            return Err(Error::config(
                path,
                format!(
                    "`layer_norm_epsilon` = {}: expected a small positive number, at most 1e-1 (it keeps the RMS norms' divisions finite without changing them)",
                    cfg.layer_norm_epsilon
                ),
            ));
        }
        Ok(cfg)
    }

    /// transformers' reading of `feed_forward_proj`: `(is_gated, activation)`, with
    /// `gated-gelu` meaning the tanh GELU (`gelu_new`) for backwards compatibility.
    fn feed_forward(&self, path: &Path) -> Result<(bool, Activation)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let unsupported = || Error::Unsupported {
            path: path.to_path_buf(),
            key: "feed_forward_proj".into(),
            value: format!("{:?}", self.feed_forward_proj),
            hint: "expected `<act>` or `gated-<act>`".into(),
        };
        let (gated, act) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => return Err(unsupported()),
        };
        let act = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            act
        };
        Ok((gated, Activation::parse(act, path, "feed_forward_proj")?))
    }
}

/// T5's layer norm: RMS over the last dim, no mean subtraction, no bias; computed in
/// float32, then cast to the weight's dtype when that is half precision.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        let normed = match self.weight.dtype() {
            DType::F16 | DType::BF16 => normed.to_dtype(self.weight.dtype())?,
            _ => normed,
        };
        normed.broadcast_mul(&self.weight.to_dtype(normed.dtype())?)
    }
}

/// Adds with torch's type promotion between a half-precision and a float32 tensor.
fn add_promoted(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == b.dtype() {
        a + b
    } else {
        a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    relative_attention_bias: Option<Embedding>,
    heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, cfg: &T5Config, has_bias: bool) -> candle_core::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let relative_attention_bias = if has_bias {
            Some(candle_nn::embedding(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                vb.pp("relative_attention_bias"),
            )?)
        } else {
            None
        };
        Ok(Self {
            q: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: candle_nn::linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            relative_attention_bias,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `bias`: `[1, H, S, S]`, added to the unscaled scores (T5 folds the scaling
    /// into its initialisation).
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, s, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(&bias.to_dtype(DType::F32)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, s, self.heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

#[derive(Debug, Clone)]
enum FeedForward {
    Dense {
        wi: Linear,
        wo: Linear,
    },
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: T5LayerNorm,
    attn: SelfAttention,
    ff_norm: T5LayerNorm,
    ff: FeedForward,
    act: Activation,
}

impl Block {
    fn new(
        vb: VarBuilder,
        cfg: &T5Config,
        first: bool,
        gated: bool,
        act: Activation,
    ) -> candle_core::Result<Self> {
        let l0 = vb.pp("layer.0");
        let l1 = vb.pp("layer.1");
        let dense = l1.pp("DenseReluDense");
        // transformers keeps `wo` in float32 when a T5 is loaded in float16
        // (`_keep_in_fp32_modules`), which overflows otherwise; its output then
        // promotes the residual stream to float32.
        let wo_vb = if dense.dtype() == DType::F16 {
            dense.pp("wo").set_dtype(DType::F32)
        } else {
            dense.pp("wo")
        };
        let wo = candle_nn::linear_no_bias(cfg.d_ff, cfg.d_model, wo_vb)?;
        let ff = if gated {
            FeedForward::Gated {
                wi_0: candle_nn::linear_no_bias(cfg.d_model, cfg.d_ff, dense.pp("wi_0"))?,
                wi_1: candle_nn::linear_no_bias(cfg.d_model, cfg.d_ff, dense.pp("wi_1"))?,
                wo,
            }
        } else {
            FeedForward::Dense {
                wi: candle_nn::linear_no_bias(cfg.d_model, cfg.d_ff, dense.pp("wi"))?,
                wo,
            }
        };
        Ok(Self {
            attn_norm: T5LayerNorm::new(l0.pp("layer_norm"), cfg.d_model, cfg.layer_norm_epsilon)?,
            attn: SelfAttention::new(l0.pp("SelfAttention"), cfg, first)?,
            ff_norm: T5LayerNorm::new(l1.pp("layer_norm"), cfg.d_model, cfg.layer_norm_epsilon)?,
            ff,
            act,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let h = add_promoted(x, &self.attn.forward(&self.attn_norm.forward(x)?, bias)?)?;
        let n = self.ff_norm.forward(&h)?;
        let y = match &self.ff {
            FeedForward::Dense { wi, wo } => {
                let a = self.act.forward(&wi.forward(&n)?)?;
                wo.forward(&a.to_dtype(wo.weight().dtype())?)?
            }
            FeedForward::Gated { wi_0, wi_1, wo } => {
                let a = (self.act.forward(&wi_0.forward(&n)?)? * wi_1.forward(&n)?)?;
                wo.forward(&a.to_dtype(wo.weight().dtype())?)?
            }
        };
        add_promoted(&h, &y)
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// (`memory_position - query_position`), reproducing its float32 logarithm so that the
/// bucket boundaries land where torch puts them.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let rp = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if rp < max_exact {
        bucket += rp;
    } else {
        let ratio = (rp as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32)
            * (num_buckets - max_exact) as f32;
        let large = max_exact + ratio as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket as usize
}

/// transformers' `T5EncoderModel`.
#[derive(Debug, Clone)]
pub struct T5EncoderModel {
    shared: Embedding,
    blocks: Vec<Block>,
    final_layer_norm: T5LayerNorm,
    num_buckets: usize,
    max_distance: usize,
}

impl T5EncoderModel {
    /// Builds the encoder from weights under `vb` (the checkpoint root). The token
    /// embedding is `shared.weight`, or its tied copy `encoder.embed_tokens.weight`.
    pub fn new(vb: VarBuilder, cfg: &T5Config) -> Result<Self> {
        let (gated, act) = cfg.feed_forward(Path::new("config.json"))?;
        let build = || -> candle_core::Result<Self> {
            let emb_vb = if !vb.contains_tensor("shared.weight")
                && vb.contains_tensor("encoder.embed_tokens.weight")
            {
                vb.pp("encoder.embed_tokens")
            } else {
                vb.pp("shared")
            };
            let shared = candle_nn::embedding(cfg.vocab_size, cfg.d_model, emb_vb)?;
            let enc = vb.pp("encoder");
            let blocks = (0..cfg.num_layers)
                .map(|i| Block::new(enc.pp(format!("block.{i}")), cfg, i == 0, gated, act))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let final_layer_norm = T5LayerNorm::new(
                enc.pp("final_layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
            )?;
            Ok(Self {
                shared,
                blocks,
                final_layer_norm,
                num_buckets: cfg.relative_attention_num_buckets,
                max_distance: cfg.relative_attention_max_distance,
            })
        };
        build().context(|| "loading the T5 encoder".into())
    }

    /// Loads `dir/config.json` and the weights of `dir` (e.g. SD3's `text_encoder_3/`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = T5Config::from_file(&dir.join("config.json"))?;
        // transformers' T5EncoderModel ties `encoder.embed_tokens` to `shared` and may
        // save both; decoder halves of full T5 checkpoints are never read.
        let unused_ok = ["encoder.embed_tokens.", "decoder.", "lm_head."];
        Weights::load_component(dir, dtype, device, &unused_ok, |vb| {
            Self::new(vb, &cfg).map_err(|e| match e {
                Error::Candle { source, .. } => Error::Candle {
                    context: format!("{}: loading the T5 encoder", dir.display()),
                    source,
                },
                e => e,
            })
        })
    }

    /// The `[1, H, S, S]` position bias of the first block's self-attention.
    fn position_bias(&self, s: usize, device: &Device) -> candle_core::Result<Tensor> {
        let buckets: Vec<u32> = (0..s as i64)
            .flat_map(|q| {
                (0..s as i64).map(move |k| {
                    relative_position_bucket(k - q, true, self.num_buckets, self.max_distance)
                        as u32
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, s * s, device)?;
        let emb = self
            .blocks
            .first()
            .and_then(|b| b.attn.relative_attention_bias.as_ref());
        let emb = emb.ok_or_else(|| candle_core::Error::Msg("T5 encoder without blocks".into()))?;
        let heads = emb.embeddings().dim(1)?;
        emb.forward(&buckets)?
            .reshape((s, s, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// `last_hidden_state` for `input_ids` (`[B, S]`), with no attention mask, as
    /// diffusers' SD3 pipeline calls it: pad positions are attended to.
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, s) = input_ids.dims2()?;
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let mut x = self.shared.forward(&input_ids)?;
        let bias = self.position_bias(s, input_ids.device())?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        self.final_layer_norm.forward(&x)
    }
}
