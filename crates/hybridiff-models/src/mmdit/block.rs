//! diffusers' `JointTransformerBlock` (SD3 / SD3.5) with `JointAttnProcessor2_0`, and the
//! adaptive norms it uses. Weight names follow diffusers.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::kernels::Linear;

use crate::nn::{attention, gelu};
use crate::patch::{self, Patch};

/// `nn.LayerNorm(elementwise_affine=False)`, computed in f32 as torch's CPU and CUDA
/// kernels do for half inputs.
pub(crate) fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    xc.broadcast_mul(&rstd)?.to_dtype(dtype)
}

/// `x * (1 + scale[:, None]) + shift[:, None]` for `x: [B, L, D]`, `scale, shift: [B, D]`.
fn modulate(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `modulate(layer_norm(x, eps), scale, shift)`, fused into one pass on the CPU.
fn norm_modulate(x: &Tensor, eps: f64, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    match crate::kernels::layer_norm_modulate_cpu(x, eps, scale, shift)? {
        Some(y) => Ok(y),
        None => modulate(&layer_norm(x, eps)?, scale, shift),
    }
}

/// `gate[:, None] * x`.
fn gated(gate: &Tensor, x: &Tensor) -> Result<Tensor> {
    gate.unsqueeze(1)?.broadcast_mul(x)
}

/// diffusers' `RMSNorm` with a weight, as `qk_norm="rms_norm"` builds it per head.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        // diffusers casts to the weight's dtype before applying it.
        let normed = x.broadcast_mul(&rstd)?.to_dtype(self.weight.dtype())?;
        normed.broadcast_mul(&self.weight)?.to_dtype(dtype)
    }

    /// Normalises each head of a `[B, L, heads * d]` projection.
    fn forward_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, inner) = x.dims3()?;
        let y = self.forward(&x.reshape((b, l, heads, inner / heads))?)?;
        y.reshape((b, l, inner))
    }
}

/// The per-head `q` and `k` norms of one token stream (`qk_norm="rms_norm"`).
#[derive(Debug, Clone)]
struct QkNorm {
    q: RmsNorm,
    k: RmsNorm,
}

/// `to_q`, `to_k`, `to_v` (or `add_*_proj`) of one token stream, with optional qk norms.
#[derive(Debug, Clone)]
struct Qkv {
    /// `None` when the stream's queries are not needed (see `JointAttention::new`).
    q: Option<Linear>,
    k: Linear,
    v: Linear,
    norm: Option<QkNorm>,
}

impl Qkv {
    fn new(
        vb: &VarBuilder,
        names: [&str; 5],
        dim: usize,
        head_dim: usize,
        with_q: bool,
        qk_norm: bool,
    ) -> Result<Self> {
        let lin = |n: &str| crate::kernels::linear(dim, dim, vb.pp(n));
        let norm = if qk_norm {
            Some(QkNorm {
                q: RmsNorm::new(vb.pp(names[3]), head_dim, 1e-6)?,
                k: RmsNorm::new(vb.pp(names[4]), head_dim, 1e-6)?,
            })
        } else {
            None
        };
        Ok(Self {
            q: if with_q { Some(lin(names[0])?) } else { None },
            k: lin(names[1])?,
            v: lin(names[2])?,
            norm,
        })
    }

    /// `(q, k, v)` as `[B, L, heads * d]`, norms applied per head.
    fn forward(&self, x: &Tensor, heads: usize) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let mut q = match &self.q {
            Some(l) => Some(l.forward(x)?),
            None => None,
        };
        let mut k = self.k.forward(x)?;
        if let Some(n) = &self.norm {
            q = match q {
                Some(q) => Some(n.q.forward_heads(&q, heads)?),
                None => None,
            };
            k = n.k.forward_heads(&k, heads)?;
        }
        Ok((q, k, self.v.forward(x)?))
    }
}

/// diffusers' `Attention` with `JointAttnProcessor2_0`: image tokens and (optionally)
/// context tokens attend jointly over their concatenation `[image, context]`.
#[derive(Debug, Clone)]
struct JointAttention {
    x: Qkv,
    to_out: Linear,
    /// The context stream (`add_*_proj`), absent for SD3.5's image-only `attn2`.
    ctx: Option<Qkv>,
    to_add_out: Option<Linear>,
    heads: usize,
}

impl JointAttention {
    /// `context`: `None` for an image-only attention, else `Some(context_pre_only)`.
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        context: Option<bool>,
    ) -> Result<Self> {
        let x = Qkv::new(
            &vb,
            ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            dim,
            head_dim,
            true,
            qk_norm,
        )?;
        let to_out = crate::kernels::linear(dim, dim, vb.pp("to_out").pp("0"))?;
        let (ctx, to_add_out) = match context {
            None => (None, None),
            // The last block (`context_pre_only`) discards the context output, and each
            // query row of attention is independent, so its context queries are skipped.
            Some(pre_only) => (
                Some(Qkv::new(
                    &vb,
                    [
                        "add_q_proj",
                        "add_k_proj",
                        "add_v_proj",
                        "norm_added_q",
                        "norm_added_k",
                    ],
                    dim,
                    head_dim,
                    !pre_only,
                    qk_norm,
                )?),
                if pre_only {
                    None
                } else {
                    Some(crate::kernels::linear(dim, dim, vb.pp("to_add_out"))?)
                },
            ),
        };
        Ok(Self {
            x,
            to_out,
            ctx,
            to_add_out,
            heads,
        })
    }

    /// Returns the image output and, when the context queries are kept, the context output.
    /// With `patch`, `x` is one band's image tokens and the keys and values are every
    /// band's (the queries stay this band's).
    fn forward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        patch: Option<&Patch>,
    ) -> crate::Result<(Tensor, Option<Tensor>)> {
        let n = x.dim(1)?;
        let (q, k, v) = self.x.forward(x, self.heads)?;
        let (k, v) = match patch {
            None => (k, v),
            Some(_) => {
                let inner = k.dim(D::Minus1)?;
                let kv = patch::tokens(&Tensor::cat(&[&k, &v], D::Minus1)?, patch)?;
                (
                    kv.narrow(D::Minus1, 0, inner)?,
                    kv.narrow(D::Minus1, inner, inner)?,
                )
            }
        };
        let q = q.expect("image queries are always built");
        let (Some(p), Some(c)) = (&self.ctx, ctx) else {
            let out = attention(&q, &k, &v, self.heads)?;
            return Ok((self.to_out.forward(&out)?, None));
        };
        let (cq, ck, cv) = p.forward(c, self.heads)?;
        let k = Tensor::cat(&[&k, &ck], 1)?;
        let v = Tensor::cat(&[&v, &cv], 1)?;
        let Some(cq) = cq else {
            let out = attention(&q, &k, &v, self.heads)?;
            return Ok((self.to_out.forward(&out)?, None));
        };
        let q = Tensor::cat(&[&q, &cq], 1)?;
        let out = attention(&q, &k, &v, self.heads)?;
        let l = out.dim(1)? - n;
        let x_out = self.to_out.forward(&out.narrow(1, 0, n)?)?;
        let c_out = match &self.to_add_out {
            Some(o) => Some(o.forward(&out.narrow(1, n, l)?)?),
            None => None,
        };
        Ok((x_out, c_out))
    }

    fn flops(&self, n: usize, l: usize, dim: usize) -> f64 {
        let (n, l, d) = (n as f64, l as f64, dim as f64);
        // q, k, v and out projections of the image stream.
        let mut f = 2.0 * 4.0 * n * d * d;
        let (lq, lk) = match &self.ctx {
            None => (n, n),
            Some(p) => {
                let with_q = p.q.is_some();
                let projections = if with_q { 3.0 } else { 2.0 };
                f += 2.0 * projections * l * d * d;
                if self.to_add_out.is_some() {
                    f += 2.0 * l * d * d;
                }
                (if with_q { n + l } else { n }, n + l)
            }
        };
        // Scores and the weighted sum of values.
        f + 2.0 * 2.0 * lq * lk * d
    }
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj`, tanh-GELU, `net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            proj: crate::kernels::linear(dim, 4 * dim, vb.pp("net.0.proj"))?,
            out: crate::kernels::linear(4 * dim, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&gelu(&self.proj.forward(x)?, true)?)
    }

    fn flops(n: usize, dim: usize) -> f64 {
        2.0 * 2.0 * 4.0 * (n * dim * dim) as f64
    }
}

/// `linear(silu(temb))` split into `k` chunks: the modulation of an adaptive norm.
#[derive(Debug, Clone)]
pub(crate) struct AdaLinear {
    linear: Linear,
    chunks: usize,
}

impl AdaLinear {
    pub(crate) fn new(vb: VarBuilder, dim: usize, chunks: usize) -> Result<Self> {
        Ok(Self {
            linear: crate::kernels::linear(dim, chunks * dim, vb.pp("linear"))?,
            chunks,
        })
    }

    pub(crate) fn forward(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        self.linear
            .forward(&crate::kernels::silu(temb)?)?
            .chunk(self.chunks, D::Minus1)
    }
}

/// diffusers' `AdaLayerNormContinuous(elementwise_affine=False, eps=1e-6)`; note the
/// `(scale, shift)` order, unlike the zero norms.
pub(crate) fn ada_norm_continuous(ada: &AdaLinear, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
    let m = ada.forward(temb)?;
    norm_modulate(x, 1e-6, &m[0], &m[1])
}

/// diffusers' `JointTransformerBlock`.
#[derive(Debug, Clone)]
pub(crate) struct JointTransformerBlock {
    /// `AdaLayerNormZero` (6 chunks) or, with dual attention, `SD35AdaLayerNormZeroX` (9).
    norm1: AdaLinear,
    /// `AdaLayerNormZero`, or `AdaLayerNormContinuous` (2 chunks) when `context_pre_only`.
    norm1_context: AdaLinear,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
    dim: usize,
}

impl JointTransformerBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_pre_only: bool,
        qk_norm: bool,
        dual_attention: bool,
    ) -> Result<Self> {
        let norm1 = AdaLinear::new(vb.pp("norm1"), dim, if dual_attention { 9 } else { 6 })?;
        let norm1_context = AdaLinear::new(
            vb.pp("norm1_context"),
            dim,
            if context_pre_only { 2 } else { 6 },
        )?;
        let attn = JointAttention::new(
            vb.pp("attn"),
            dim,
            heads,
            head_dim,
            qk_norm,
            Some(context_pre_only),
        )?;
        let attn2 = if dual_attention {
            Some(JointAttention::new(
                vb.pp("attn2"),
                dim,
                heads,
                head_dim,
                qk_norm,
                None,
            )?)
        } else {
            None
        };
        let ff = FeedForward::new(vb.pp("ff"), dim)?;
        let ff_context = if context_pre_only {
            None
        } else {
            Some(FeedForward::new(vb.pp("ff_context"), dim)?)
        };
        Ok(Self {
            norm1,
            norm1_context,
            attn,
            attn2,
            ff,
            ff_context,
            dim,
        })
    }

    /// Whether this is the last block, which outputs no context.
    pub(crate) fn context_pre_only(&self) -> bool {
        self.ff_context.is_none()
    }

    /// `norm1`'s output for the image tokens `x` (`[B, N, D]`): the layer-normalised input
    /// shifted and scaled by `temb`'s `shift_msa`, `scale_msa` (TeaCache's indicator).
    pub(crate) fn modulated_input(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = self.norm1.forward(temb)?;
        norm_modulate(x, 1e-6, &m[1], &m[0])
    }

    /// Returns `(new context or None when context_pre_only, new hidden)`.
    /// With `patch`, `x` is one band's image tokens (see [`JointAttention::forward`]).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        temb: &Tensor,
        patch: Option<&Patch>,
    ) -> crate::Result<(Option<Tensor>, Tensor)> {
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]
        let m = self.norm1.forward(temb)?;
        let norm_x = norm_modulate(x, 1e-6, &m[1], &m[0])?;

        let (norm_ctx, cm) = if self.context_pre_only() {
            (ada_norm_continuous(&self.norm1_context, ctx, temb)?, None)
        } else {
            let cm = self.norm1_context.forward(temb)?;
            (norm_modulate(ctx, 1e-6, &cm[1], &cm[0])?, Some(cm))
        };

        let (attn_out, ctx_attn_out) = self.attn.forward(&norm_x, Some(&norm_ctx), patch)?;
        let x_in = x;
        let mut x = (x + gated(&m[2], &attn_out)?)?;
        if let Some(attn2) = &self.attn2 {
            // The block's input x, normalised again (cheaper than keeping it).
            let norm_x2 = norm_modulate(x_in, 1e-6, &m[7], &m[6])?;
            let (out2, _) = attn2.forward(&norm_x2, None, patch)?;
            x = (x + gated(&m[8], &out2)?)?;
        }
        let norm_x = norm_modulate(&x, 1e-6, &m[4], &m[3])?;
        let x = (&x + gated(&m[5], &self.ff.forward(&norm_x)?)?)?;

        let ctx = match (&self.ff_context, cm, ctx_attn_out) {
            (Some(ff_context), Some(cm), Some(ctx_attn_out)) => {
                let ctx = (ctx + gated(&cm[2], &ctx_attn_out)?)?;
                let norm_ctx = norm_modulate(&ctx, 1e-6, &cm[4], &cm[3])?;
                Some((&ctx + gated(&cm[5], &ff_context.forward(&norm_ctx)?)?)?)
            }
            _ => None,
        };
        Ok((ctx, x))
    }

    /// FLOPs for `n` image tokens and `l` context tokens, batch 1.
    pub(crate) fn flops(&self, n: usize, l: usize) -> f64 {
        let d = self.dim;
        let mut f = self.attn.flops(n, l, d) + FeedForward::flops(n, d);
        if let Some(a) = &self.attn2 {
            f += a.flops(n, 0, d);
        }
        if self.ff_context.is_some() {
            f += FeedForward::flops(l, d);
        }
        // Norms and modulation: a handful of element-wise passes over both streams.
        f + 10.0 * ((n + l) * d) as f64
    }
}
