//! diffusers' `UNet2DConditionModel` (SD 1.5, SD 2.1, SDXL) as a [`Denoiser`] of named
//! modules: `conv_in`, each `down_blocks.i`, `mid_block`, each up block's
//! `resnets.j` / `attentions.j` / `upsamplers` separately, `conv_norm_out`, `conv_out`.

mod config;
mod transformer;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::Linear;

pub use config::{BlockKind, RawUNetConfig, UNetConfig, MAX_CHANNELS, MAX_LAYERS, MAX_SAMPLE_SIZE};
pub use transformer::{CrossAttention, Transformer2DModel, TransformerConfig};

use crate::nn::{conv2d, Conv2d, ResnetBlock2D, ResnetConfig};
use crate::patch::{self, GroupNorm, Patch};
use crate::weights::ComponentSource;
use crate::{Conditioning, Denoiser, Error, OutputRef, Result, State};

/// Sinusoidal timestep embedding, computed in f32 exactly as diffusers'
/// `get_timestep_embedding` does (so the fixture's low bits match).
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let ln = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((ln * i as f32) / denom).exp()).collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Ok(Tensor::from_vec(out, (timesteps.len(), dim), device)?)
}

/// [`timestep_embedding`] of timesteps that live in a tensor (`[n]`, any float dtype, on
/// any device), computed where they live: `[n, dim]` f32 on the same device. Only the
/// frequencies (known from `dim` alone) are uploaded; the same f32 products and `sin` /
/// `cos` as the host version, so the CPU results are bit-identical.
pub fn timestep_embedding_tensor(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let device = timesteps.device();
    let n = timesteps.elem_count();
    let half = dim / 2;
    let ln = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((ln * i as f32) / denom).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let t = timesteps.to_dtype(DType::F32)?.reshape((n, 1))?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut parts = if flip_sin_to_cos {
        vec![cos, sin]
    } else {
        vec![sin, cos]
    };
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((n, 1), DType::F32, device)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Output scale of the down/up blocks' resnets. diffusers' `get_down_block` /
/// `get_up_block` pass `resnet_out_scale_factor` only to the ResnetDownsample /
/// SimpleCrossAttn block types; `DownBlock2D`, `CrossAttnDownBlock2D`, `UpBlock2D` and
/// `CrossAttnUpBlock2D` keep their default of 1, so the config value is ignored here.
const BLOCK_RESNET_SCALE: f64 = 1.0;

/// diffusers' `TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
#[derive(Debug, Clone)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, cin: usize, dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: crate::kernels::linear(cin, dim, vb.pp("linear_1"))?,
            linear_2: crate::kernels::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .linear_2
            .forward(&crate::kernels::silu(&self.linear_1.forward(x)?)?)?)
    }
}

#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    pad: bool,
}

impl Downsample {
    fn forward(&self, x: &Tensor, p: Option<&Patch>) -> Result<Tensor> {
        if !self.pad {
            return patch::conv(&self.conv, x, p);
        }
        // diffusers pads right/bottom by one when `downsample_padding` is 0. On a band the
        // bottom row is the next band's first (bands start at even rows), zeros at the edge.
        let x = x.pad_with_zeros(3, 0, 1)?;
        match p {
            None => Ok(self.conv.forward(&x.pad_with_zeros(2, 0, 1)?)?),
            Some(p) => Ok(self
                .conv
                .forward_rows_unpadded(&p.extend_rows(&x, 0, 1, 1)?)?),
        }
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample>,
    cin: usize,
    cout: usize,
}

impl DownBlock {
    /// Returns the block's output states; the last is the new hidden state.
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        p: Option<&Patch>,
    ) -> Result<Vec<Tensor>> {
        let mut h = x.clone();
        let mut outs = Vec::with_capacity(self.resnets.len() + 1);
        for (j, r) in self.resnets.iter().enumerate() {
            h = r.forward_patch(&h, Some(temb), p)?;
            if let Some(a) = self.attentions.get(j) {
                h = a.forward_patch(&h, ctx, p)?;
            }
            outs.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h, p)?;
            outs.push(h);
        }
        Ok(outs)
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        p: Option<&Patch>,
    ) -> Result<Tensor> {
        let mut h = self.resnets[0].forward_patch(x, Some(temb), p)?;
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = a.forward_patch(&h, ctx, p)?;
            h = r.forward_patch(&h, Some(temb), p)?;
        }
        Ok(h)
    }
}

/// One named module of the U-Net's forward.
#[derive(Debug, Clone)]
enum Module_ {
    ConvIn(Conv2d),
    Down(Box<DownBlock>),
    Mid(Box<MidBlock>),
    /// Pops one skip residual, concatenates it on channels, runs the resnet.
    UpResnet(Box<ResnetBlock2D>, usize, usize),
    UpAttention(Box<Transformer2DModel>),
    /// Nearest 2x upsampling (to the next skip's size) and a 3x3 conv.
    UpSampler(Conv2d),
    ConvNormOut(GroupNorm),
    ConvOut(Conv2d),
}

/// diffusers' `UNet2DConditionModel`.
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    modules: Vec<Module_>,
    names: Vec<String>,
    /// Resolution level (number of halvings) at each module's input.
    levels: Vec<usize>,
    /// Channels at each module's input.
    channels_in: Vec<usize>,
    /// What each module reads, derived once from the skip-stack discipline.
    reads: Vec<Vec<OutputRef>>,
    dtype: DType,
    device: Device,
}

impl UNet2DConditionModel {
    /// Loads `<dir>/config.json` and the weights of a diffusers `unet/` folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                "U-Net folder not found (expected <model>/unet)",
            ));
        }
        Self::load_source(&ComponentSource::folder(dir), dtype, device)
    }

    /// Loads the U-Net of any component source (a `unet/` folder, or the U-Net of a
    /// single-file checkpoint), with its LoRA deltas merged.
    pub fn load_source(src: &ComponentSource, dtype: DType, device: &Device) -> Result<Self> {
        let config = UNetConfig::from_raw(src.read_config()?, &src.config_path())?;
        src.load(dtype, device, &[], |vb| Self::new(vb, config))
    }

    /// Builds the model from a var builder rooted at the U-Net's weights.
    pub fn new(vb: VarBuilder, config: UNetConfig) -> Result<Self> {
        let w = |e: candle_core::Error| Error::Weights(e.to_string());
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb_dim = c.time_embed_dim();
        let groups = c.norm_num_groups;
        let resnet = |vb: VarBuilder, cin: usize, cout: usize, scale: f64| {
            ResnetBlock2D::new(
                vb,
                ResnetConfig {
                    in_channels: cin,
                    out_channels: cout,
                    temb_channels: Some(temb_dim),
                    groups,
                    eps: c.norm_eps,
                    output_scale_factor: scale,
                },
            )
        };
        let transformer =
            |vb: VarBuilder, channels: usize, heads: usize, layers: usize, ctx: usize| {
                Transformer2DModel::new(
                    vb,
                    TransformerConfig {
                        channels,
                        heads,
                        layers,
                        context_dim: ctx,
                        groups,
                        linear_projection: c.use_linear_projection,
                    },
                )
            };
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb_dim).map_err(w)?;
        let add_embedding = match c.text_time {
            Some((_, proj_dim)) => Some(
                TimestepEmbedding::new(vb.pp("add_embedding"), proj_dim, temb_dim).map_err(w)?,
            ),
            None => None,
        };

        let mut modules = Vec::new();
        let mut names = Vec::new();
        let mut levels = Vec::new();
        let mut channels_in = Vec::new();
        let mut push = |m: Module_, name: String, level: usize, cin: usize| {
            modules.push(m);
            names.push(name);
            levels.push(level);
            channels_in.push(cin);
        };

        let conv_in =
            conv2d(vb.pp("conv_in"), c.in_channels, ch[0], c.conv_in_kernel, 1).map_err(w)?;
        push(Module_::ConvIn(conv_in), "conv_in".into(), 0, c.in_channels);

        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let cin = out_ch;
            out_ch = block_ch;
            let vbb = vb.pp("down_blocks").pp(i);
            let layers = c.layers_per_block[i];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let rin = if j == 0 { cin } else { out_ch };
                resnets.push(
                    resnet(vbb.pp("resnets").pp(j), rin, out_ch, BLOCK_RESNET_SCALE).map_err(w)?,
                );
                if c.down_block_types[i] == BlockKind::CrossAttn {
                    attentions.push(
                        transformer(
                            vbb.pp("attentions").pp(j),
                            out_ch,
                            c.num_attention_heads[i],
                            c.transformer_layers_per_block[i],
                            c.cross_attention_dim[i],
                        )
                        .map_err(w)?,
                    );
                }
            }
            let downsampler = if i + 1 < n {
                let pad = c.downsample_padding;
                let conv = Conv2d::new(vbb.pp("downsamplers.0.conv"), out_ch, out_ch, 3, 2, pad)
                    .map_err(w)?;
                Some(Downsample {
                    conv,
                    pad: pad == 0,
                })
            } else {
                None
            };
            push(
                Module_::Down(Box::new(DownBlock {
                    resnets,
                    attentions,
                    downsampler,
                    cin,
                    cout: out_ch,
                })),
                format!("down_blocks.{i}"),
                i,
                cin,
            );
        }

        let bottom = n - 1;
        if c.has_mid_block {
            let vbm = vb.pp("mid_block");
            let layers = 1;
            let mut resnets = vec![resnet(
                vbm.pp("resnets.0"),
                ch[bottom],
                ch[bottom],
                c.mid_block_scale_factor,
            )
            .map_err(w)?];
            let mut attentions = Vec::new();
            for j in 0..layers {
                attentions.push(
                    transformer(
                        vbm.pp("attentions").pp(j),
                        ch[bottom],
                        c.num_attention_heads[bottom],
                        c.transformer_layers_per_block[bottom],
                        c.cross_attention_dim[bottom],
                    )
                    .map_err(w)?,
                );
                resnets.push(
                    resnet(
                        vbm.pp("resnets").pp(j + 1),
                        ch[bottom],
                        ch[bottom],
                        c.mid_block_scale_factor,
                    )
                    .map_err(w)?,
                );
            }
            push(
                Module_::Mid(Box::new(MidBlock {
                    resnets,
                    attentions,
                })),
                "mid_block".into(),
                bottom,
                ch[bottom],
            );
        }

        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = c.num_attention_heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = c.layers_per_block.iter().rev().copied().collect();
        let rev_ctx: Vec<usize> = c.cross_attention_dim.iter().rev().copied().collect();
        let mut out_ch = rev_ch[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev_ch[i];
            let skip_in = rev_ch[(i + 1).min(n - 1)];
            let level = bottom - i;
            let vbu = vb.pp("up_blocks").pp(i);
            let layers = rev_layers[i] + 1;
            for j in 0..layers {
                let res_skip = if j == layers - 1 { skip_in } else { out_ch };
                let rin = if j == 0 { prev } else { out_ch };
                let r = resnet(
                    vbu.pp("resnets").pp(j),
                    rin + res_skip,
                    out_ch,
                    BLOCK_RESNET_SCALE,
                )
                .map_err(w)?;
                push(
                    Module_::UpResnet(Box::new(r), rin, res_skip),
                    format!("up_blocks.{i}.resnets.{j}"),
                    level,
                    rin,
                );
                if c.up_block_types[i] == BlockKind::CrossAttn {
                    let a = transformer(
                        vbu.pp("attentions").pp(j),
                        out_ch,
                        rev_heads[i],
                        c.reverse_transformer_layers_per_block[i],
                        rev_ctx[i],
                    )
                    .map_err(w)?;
                    push(
                        Module_::UpAttention(Box::new(a)),
                        format!("up_blocks.{i}.attentions.{j}"),
                        level,
                        out_ch,
                    );
                }
            }
            if i + 1 < n {
                let conv = conv2d(vbu.pp("upsamplers.0.conv"), out_ch, out_ch, 3, 1).map_err(w)?;
                push(
                    Module_::UpSampler(conv),
                    format!("up_blocks.{i}.upsamplers"),
                    level,
                    out_ch,
                );
            }
        }
        let norm = GroupNorm::new(groups, ch[0], c.norm_eps, vb.pp("conv_norm_out")).map_err(w)?;
        push(Module_::ConvNormOut(norm), "conv_norm_out".into(), 0, ch[0]);
        let conv_out = conv2d(
            vb.pp("conv_out"),
            ch[0],
            c.out_channels,
            c.conv_out_kernel,
            1,
        )
        .map_err(w)?;
        push(Module_::ConvOut(conv_out), "conv_out".into(), 0, ch[0]);

        let reads = data_flow(&modules);
        Ok(Self {
            time_embedding,
            add_embedding,
            modules,
            names,
            levels,
            channels_in,
            reads,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
        })
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One module on the whole image, or on one band with `p`.
    fn run_module_on(&self, idx: usize, s: &State, p: Option<&Patch>) -> Result<Vec<Tensor>> {
        let m = self.modules.get(idx).ok_or_else(|| {
            Error::Input(format!(
                "module index {idx} out of range ({} modules)",
                self.modules.len()
            ))
        })?;
        let out = match m {
            Module_::ConvIn(c) => vec![patch::conv(c, &s.hidden, p)?],
            Module_::Down(b) => b.forward(&s.hidden, &s.temb, &s.context, p)?,
            Module_::Mid(b) => vec![b.forward(&s.hidden, &s.temb, &s.context, p)?],
            Module_::UpResnet(r, _, _) => {
                let skip = s.skips.last().ok_or_else(|| {
                    Error::Input(format!("{}: no skip residual left", self.names[idx]))
                })?;
                let x = Tensor::cat(&[&s.hidden, skip], 1)?;
                vec![r.forward_patch(&x, Some(&s.temb), p)?]
            }
            Module_::UpAttention(a) => vec![a.forward_patch(&s.hidden, &s.context, p)?],
            Module_::UpSampler(conv) => {
                let (h, w) = match s.skips.last() {
                    Some(skip) => (skip.dim(2)?, skip.dim(3)?),
                    None => (s.hidden.dim(2)? * 2, s.hidden.dim(3)? * 2),
                };
                vec![patch::conv(conv, &s.hidden.upsample_nearest2d(h, w)?, p)?]
            }
            Module_::ConvNormOut(n) => vec![n.forward_silu(&s.hidden, p)?],
            Module_::ConvOut(c) => vec![patch::conv(c, &s.hidden, p)?],
        };
        Ok(out)
    }

    fn check_inputs(&self, sample: &Tensor, cond: &Conditioning) -> Result<()> {
        let c = &self.config;
        let dims = sample.dims();
        if dims.len() != 4 || dims[1] != c.in_channels {
            return Err(Error::Input(format!(
                "`sample` has shape {dims:?}, expected [B, {}, H, W]",
                c.in_channels
            )));
        }
        let b = dims[0];
        let ctx = cond.prompt_embeds.dims();
        let want = c.cross_attention_dim[0];
        if ctx.len() != 3 || ctx[0] != b || ctx[2] != want {
            return Err(Error::Input(format!(
                "`encoder_hidden_states` (prompt embeds) has shape {ctx:?}, expected [{b}, L, {want}]"
            )));
        }
        if let Some((t, p)) = c.text_time {
            let pooled_dim = p - 6 * t;
            match &cond.pooled {
                Some(x) if x.dims() == [b, pooled_dim] => {}
                Some(x) => {
                    return Err(Error::Input(format!(
                        "`text_embeds` (pooled prompt embeds) has shape {:?}, expected [{b}, {pooled_dim}]",
                        x.dims()
                    )))
                }
                None => {
                    return Err(Error::Input(
                        "this SDXL U-Net needs pooled prompt embeds (`text_embeds`)".into(),
                    ))
                }
            }
            match &cond.time_ids {
                Some(x) if x.dims() == [b, 6] => {}
                Some(x) => {
                    return Err(Error::Input(format!(
                        "`time_ids` has shape {:?}, expected [{b}, 6]",
                        x.dims()
                    )))
                }
                None => return Err(Error::Input("this SDXL U-Net needs `time_ids`".into())),
            }
        }
        if dims[2] == 0 || dims[3] == 0 {
            return Err(Error::Input(format!(
                "`sample` has shape {dims:?}: latent height and width must be at least 1"
            )));
        }
        Ok(())
    }
}

fn output_count(m: &Module_) -> usize {
    match m {
        Module_::Down(b) => b.resnets.len() + usize::from(b.downsampler.is_some()),
        _ => 1,
    }
}

/// Which outputs each module reads: the previous module's activation, and for up resnets
/// the skip on top of the stack that `conv_in` and the down blocks push.
fn data_flow(modules: &[Module_]) -> Vec<Vec<OutputRef>> {
    let mut stack: Vec<OutputRef> = Vec::new();
    let mut reads = Vec::with_capacity(modules.len());
    for (i, m) in modules.iter().enumerate() {
        let mut r = Vec::new();
        if i > 0 {
            r.push(OutputRef {
                module: i - 1,
                index: output_count(&modules[i - 1]) - 1,
            });
        }
        match m {
            Module_::ConvIn(_) => stack.push(OutputRef {
                module: i,
                index: 0,
            }),
            Module_::Down(_) => {
                stack.extend((0..output_count(m)).map(|index| OutputRef { module: i, index }))
            }
            Module_::UpResnet(..) => r.extend(stack.pop()),
            _ => {}
        }
        r.sort();
        r.dedup();
        reads.push(r);
    }
    reads
}

impl Denoiser for UNet2DConditionModel {
    fn module_names(&self) -> &[String] {
        &self.names
    }

    fn forward_memory(
        &self,
        batch: usize,
        hw: (usize, usize),
        ctx_len: usize,
    ) -> Option<crate::memory::ForwardMemory> {
        let elem = self.dtype.size_in_bytes();
        Some(crate::memory::unet_forward(
            &self.config,
            batch,
            hw,
            ctx_len,
            elem,
        ))
    }

    fn module_output_count(&self, idx: usize) -> usize {
        output_count(&self.modules[idx])
    }

    fn module_reads(&self, idx: usize) -> Vec<OutputRef> {
        self.reads[idx].clone()
    }

    fn module_flops(&self, h: usize, w: usize) -> Vec<f64> {
        let ctx_len = 77;
        let conv = |cin: usize, cout: usize, k: usize, hh: usize, ww: usize| {
            2.0 * (k * k * cin * cout * hh * ww) as f64
        };
        let res = |cin: usize, cout: usize, hh: usize, ww: usize| {
            conv(cin, cout, 3, hh, ww)
                + conv(cout, cout, 3, hh, ww)
                + if cin != cout {
                    conv(cin, cout, 1, hh, ww)
                } else {
                    0.0
                }
        };
        self.modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                // Each downsampler rounds up (stride 2, padding 1), so odd sizes do too.
                let (hh, ww) = (
                    h.div_ceil(1 << self.levels[i]),
                    w.div_ceil(1 << self.levels[i]),
                );
                let cin = self.channels_in[i];
                match m {
                    Module_::ConvIn(_) => conv(
                        cin,
                        self.config.block_out_channels[0],
                        self.config.conv_in_kernel,
                        hh,
                        ww,
                    ),
                    Module_::Down(b) => {
                        let mut f = 0.0;
                        for (j, _) in b.resnets.iter().enumerate() {
                            f += res(if j == 0 { b.cin } else { b.cout }, b.cout, hh, ww);
                            if let Some(a) = b.attentions.get(j) {
                                f += a.flops(hh, ww, ctx_len);
                            }
                        }
                        if b.downsampler.is_some() {
                            f += conv(b.cout, b.cout, 3, hh / 2, ww / 2);
                        }
                        f
                    }
                    Module_::Mid(b) => {
                        b.resnets.len() as f64 * res(cin, cin, hh, ww)
                            + b.attentions
                                .iter()
                                .map(|a| a.flops(hh, ww, ctx_len))
                                .sum::<f64>()
                    }
                    Module_::UpResnet(_, rin, skip) => {
                        let cout = self.channels_in.get(i + 1).copied().unwrap_or(*rin);
                        res(rin + skip, cout, hh, ww)
                    }
                    Module_::UpAttention(a) => a.flops(hh, ww, ctx_len),
                    Module_::UpSampler(_) => conv(cin, cin, 3, hh * 2, ww * 2),
                    Module_::ConvNormOut(_) => (10 * cin * hh * ww) as f64,
                    Module_::ConvOut(_) => conv(
                        cin,
                        self.config.out_channels,
                        self.config.conv_out_kernel,
                        hh,
                        ww,
                    ),
                }
            })
            .collect()
    }

    fn begin(&self, sample: &Tensor, timestep: f64, cond: &Conditioning) -> Result<State> {
        self.check_inputs(sample, cond)?;
        let c = &self.config;
        let (b, _, h, w) = sample.dims4()?;
        let t_emb = timestep_embedding(
            &vec![timestep as f32; b],
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            &self.device,
        )?
        .to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let (Some(add), Some((tdim, _))) = (&self.add_embedding, c.text_time) {
            // On the device: reading `time_ids` back to the host would be a round trip
            // per forward on a GPU (see `crate::host`).
            let time_ids = cond
                .time_ids
                .as_ref()
                .expect("checked")
                .to_device(&self.device)?
                .to_dtype(DType::F32)?
                .flatten_all()?;
            let time_embeds =
                timestep_embedding_tensor(&time_ids, tdim, c.flip_sin_to_cos, c.freq_shift)?
                    .reshape((b, 6 * tdim))?
                    .to_dtype(self.dtype)?;
            let pooled = cond
                .pooled
                .as_ref()
                .expect("checked")
                .to_dtype(self.dtype)?;
            let add_embeds = Tensor::cat(&[&pooled, &time_embeds], 1)?;
            emb = (emb + add.forward(&add_embeds)?)?;
        }
        let mut hidden = sample.to_dtype(self.dtype)?;
        if c.center_input_sample {
            hidden = ((hidden * 2.0)? - 1.0)?;
        }
        Ok(State {
            hidden,
            context: cond.prompt_embeds.to_dtype(self.dtype)?,
            temb: emb,
            skips: Vec::new(),
            sample_hw: (h, w),
        })
    }

    fn run_module(&self, idx: usize, s: &State) -> Result<Vec<Tensor>> {
        self.run_module_on(idx, s, None)
    }

    fn patch_alignment(&self) -> Option<(usize, usize)> {
        Some((1 << (self.config.block_out_channels.len() - 1), 1))
    }

    /// Every module outputs `[B, C, h, w]` activations: a band's are rows (dim 2).
    fn band_dim(&self, _idx: usize, _index: usize) -> Option<usize> {
        Some(2)
    }

    fn begin_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        _band: crate::Band,
    ) -> Result<State> {
        // Nothing before the first module depends on where the band lies.
        self.begin(sample, timestep, cond)
    }

    fn run_module_patch(&self, idx: usize, s: &State, p: &Patch) -> Result<Vec<Tensor>> {
        self.run_module_on(idx, s, Some(p))
    }

    /// The first down block's first resnet where the time embedding is added (a U-Net's
    /// timestep-modulated input), after `conv_in`.
    fn modulated_input(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> Result<Option<Tensor>> {
        let (Some(Module_::ConvIn(conv_in)), Some(Module_::Down(down))) =
            (self.modules.first(), self.modules.get(1))
        else {
            return Ok(None);
        };
        let Some(first) = down.resnets.first() else {
            return Ok(None);
        };
        let state = self.begin(sample, timestep, cond)?;
        let h = conv_in.forward(&state.hidden)?;
        Ok(Some(first.modulated(&h, &state.temb)?))
    }

    fn apply_module(&self, idx: usize, s: &mut State, mut out: Vec<Tensor>) -> Result<()> {
        let name = &self.names[idx];
        let last = out
            .last()
            .cloned()
            .ok_or_else(|| Error::Input(format!("{name}: empty module output")))?;
        match &self.modules[idx] {
            Module_::ConvIn(_) => {
                s.skips.push(last.clone());
            }
            Module_::Down(_) => {
                s.skips.append(&mut out);
            }
            Module_::UpResnet(..) => {
                s.skips
                    .pop()
                    .ok_or_else(|| Error::Input(format!("{name}: no skip residual left")))?;
            }
            _ => {}
        }
        s.hidden = last;
        Ok(())
    }

    fn end(&self, state: State) -> Result<Tensor> {
        Ok(state.hidden)
    }
}
