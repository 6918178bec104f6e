//! diffusers' `Transformer2DModel` (continuous input) with `BasicTransformerBlock`s, as
//! the SD / SDXL U-Nets use it.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use crate::kernels::Linear;

use crate::nn::{attention, conv2d, Conv2d};
use crate::patch::{self, GroupNorm, Patch};

/// diffusers' `Attention` without norms: self-attention, or cross-attention on a context.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    /// `context_dim` is `None` for self-attention.
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(dim);
        Ok(Self {
            to_q: crate::kernels::linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: crate::kernels::linear_no_bias(kv_dim, inner, vb.pp("to_k"))?,
            to_v: crate::kernels::linear_no_bias(kv_dim, inner, vb.pp("to_v"))?,
            to_out: crate::kernels::linear(inner, dim, vb.pp("to_out").pp("0"))?,
            heads,
        })
    }

    /// `x`: `[B, L, dim]`; `context`: `[B, Lk, context_dim]` or `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out.forward(&attention(&q, &k, &v, self.heads)?)
    }

    /// Self-attention of one band's tokens (`x`: `[B, L_band, dim]`) over every band's
    /// keys and values.
    fn self_attention_patch(&self, x: &Tensor, p: &Patch) -> crate::Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(x)?;
        let v = self.to_v.forward(x)?;
        let inner = k.dim(D::Minus1)?;
        let kv = patch::tokens(&Tensor::cat(&[&k, &v], D::Minus1)?, Some(p))?;
        let (k, v) = (
            kv.narrow(D::Minus1, 0, inner)?,
            kv.narrow(D::Minus1, inner, inner)?,
        );
        Ok(self.to_out.forward(&attention(&q, &k, &v, self.heads)?)?)
    }
}

/// The GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`).
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: crate::kernels::linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: crate::kernels::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&crate::kernels::geglu(&self.proj.forward(x)?)?)
    }
}

/// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, context_dim: usize) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, Some(context_dim), heads, head_dim)?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, p: Option<&Patch>) -> crate::Result<Tensor> {
        let n1 = self.norm1.forward(x)?;
        let a1 = match p {
            None => self.attn1.forward(&n1, None)?,
            Some(p) => self.attn1.self_attention_patch(&n1, p)?,
        };
        let x = (a1 + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + x)?)
    }
}

#[derive(Debug, Clone)]
enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers' `Transformer2DModel` for continuous (image) input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
    channels: usize,
    heads: usize,
    context_dim: usize,
}

/// Hyper-parameters of a `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2DModel {
    /// Loads e.g. `down_blocks.1.attentions.0`.
    pub fn new(vb: VarBuilder, c: TransformerConfig) -> Result<Self> {
        let norm = GroupNorm::new(c.groups, c.channels, 1e-6, vb.pp("norm"))?;
        let proj = |name: &str| -> Result<Proj> {
            if c.linear_projection {
                Ok(Proj::Linear(crate::kernels::linear(
                    c.channels,
                    c.channels,
                    vb.pp(name),
                )?))
            } else {
                Ok(Proj::Conv(conv2d(
                    vb.pp(name),
                    c.channels,
                    c.channels,
                    1,
                    1,
                )?))
            }
        };
        let proj_in = proj("proj_in")?;
        let proj_out = proj("proj_out")?;
        let blocks = (0..c.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    c.channels,
                    c.heads,
                    c.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
            channels: c.channels,
            heads: c.heads,
            context_dim: c.context_dim,
        })
    }

    /// `x`: `[B, C, H, W]`; `context`: `[B, L, context_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_patch(x, context, None)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// [`Self::forward`] on the whole image, or on one band with `patch` (the norm and
    /// the self-attention read the other bands).
    pub fn forward_patch(
        &self,
        x: &Tensor,
        context: &Tensor,
        p: Option<&Patch>,
    ) -> crate::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x, p)?;
        let to_seq =
            |t: &Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let to_img = |t: &Tensor| -> Result<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let mut x = match &self.proj_in {
            Proj::Linear(l) => l.forward(&to_seq(&x)?)?,
            Proj::Conv(cv) => to_seq(&cv.forward(&x)?)?,
        };
        for block in &self.blocks {
            x = block.forward(&x, context, p)?;
        }
        let x = match &self.proj_out {
            Proj::Linear(l) => to_img(&l.forward(&x)?)?,
            Proj::Conv(cv) => cv.forward(&to_img(&x)?)?,
        };
        Ok((x + residual)?)
    }

    /// FLOPs for a `[1, C, h, w]` input with a text context of `ctx_len` tokens.
    pub fn flops(&self, h: usize, w: usize, ctx_len: usize) -> f64 {
        let l = (h * w) as f64;
        let c = self.channels as f64;
        let lk = ctx_len as f64;
        let d = self.context_dim as f64;
        let _ = self.heads;
        let per_block = 2.0 * l * c * c * 4.0          // attn1 q k v out
            + 4.0 * l * l * c                            // attn1 scores + mix
            + 2.0 * l * c * c * 2.0 + 2.0 * lk * d * c * 2.0 // attn2 q out, k v
            + 4.0 * l * lk * c                           // attn2 scores + mix
            + 2.0 * l * c * 8.0 * c + 2.0 * l * 4.0 * c * c; // geglu ff
        2.0 * l * c * c * 2.0 + per_block * self.blocks.len() as f64
    }
}
