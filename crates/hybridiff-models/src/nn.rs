//! Building blocks shared by the models: diffusers' `ResnetBlock2D` and multi-head
//! attention. Weight names follow diffusers.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::kernels::Linear;

use crate::patch::{self, GroupNorm, Patch};

pub use crate::conv::Conv2d;

/// 3x3 (or kxk) convolution with "same" padding, as diffusers builds them.
pub fn conv2d(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
    Conv2d::new(vb, cin, cout, k, stride, k / 2)
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Hyper-parameters of a `ResnetBlock2D`.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Loads the block from `vb` (e.g. `down_blocks.0.resnets.1`).
    pub fn new(vb: VarBuilder, c: ResnetConfig) -> Result<Self> {
        let norm1 = GroupNorm::new(c.groups, c.in_channels, c.eps, vb.pp("norm1"))?;
        let conv1 = conv2d(vb.pp("conv1"), c.in_channels, c.out_channels, 3, 1)?;
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(crate::kernels::linear(
                t,
                c.out_channels,
                vb.pp("time_emb_proj"),
            )?),
            None => None,
        };
        let norm2 = GroupNorm::new(c.groups, c.out_channels, c.eps, vb.pp("norm2"))?;
        let conv2 = conv2d(vb.pp("conv2"), c.out_channels, c.out_channels, 3, 1)?;
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(
                vb.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                1,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `temb` is the (already computed) time embedding, `[B, temb_channels]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        self.forward_patch(x, temb, None)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// The hidden state where the time embedding enters: `conv1(silu(norm1(x)))` plus the
    /// projected `temb` (`[B, C_out, h, w]`), the block's timestep-modulated input (TeaCache's
    /// indicator on a U-Net).
    pub fn modulated(&self, x: &Tensor, temb: &Tensor) -> crate::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x, None)?)?;
        Ok(match &self.time_emb_proj {
            Some(proj) => h.broadcast_add(
                &proj
                    .forward(&crate::kernels::silu(temb)?)?
                    .unsqueeze(2)?
                    .unsqueeze(3)?,
            )?,
            None => h,
        })
    }

    /// [`Self::forward`] on the whole image, or on one band with `patch` (the norms and
    /// 3x3 convolutions read the other bands).
    pub fn forward_patch(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        p: Option<&Patch>,
    ) -> crate::Result<Tensor> {
        let h = patch::conv(&self.conv1, &self.norm1.forward_silu(x, p)?, p)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj
                    .forward(&crate::kernels::silu(t)?)?
                    .unsqueeze(2)?
                    .unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            _ => h,
        };
        let h = patch::conv(&self.conv2, &self.norm2.forward_silu(&h, p)?, p)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        if self.output_scale_factor != 1.0 {
            Ok((out / self.output_scale_factor)?)
        } else {
            Ok(out)
        }
    }
}

/// Multi-head scaled dot-product attention on `[B, L, heads * d]` projections.
/// The softmax runs in f32 whatever the input dtype, as diffusers' upcast does.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if let Some(out) = crate::kernels::attention_cpu(q, k, v, heads)? {
        return Ok(out);
    }
    let (b, lq, inner) = q.dims3()?;
    let lk = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, l: usize| -> Result<Tensor> {
        t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    let scale = 1.0 / (d as f64).sqrt();
    let dtype = q.dtype();
    // Half-precision scores can overflow on real checkpoints (diffusers' upcast_attention):
    // take the scores and the softmax in f32, and scale before the product.
    let (qs, ks) = if dtype == DType::F32 {
        (q, k)
    } else {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    };
    let scores = (qs * scale)?.matmul(&ks.t()?)?;
    let probs = crate::kernels::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    let out = probs.matmul(&v)?;
    out.transpose(1, 2)?.reshape((b, lq, inner))
}

/// GELU with the tanh approximation ("gelu_tanh") or exact erf ("gelu"), per diffusers.
pub fn gelu(x: &Tensor, approximate: bool) -> Result<Tensor> {
    crate::kernels::gelu(x, approximate)
}

/// Mean of |x| over all elements, as f64.
pub fn mean_abs(x: &Tensor) -> Result<f64> {
    x.abs()?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .mean(D::Minus1)?
        .to_scalar::<f64>()
}
