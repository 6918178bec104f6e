//! diffusers' `SD3Transformer2DModel` (the SD3 / SD3.5 MMDiT) as a [`Denoiser`] of named
//! modules: `transformer_blocks.0` .. `transformer_blocks.{N-1}`, `norm_out`, `proj_out`.
//!
//! The patch embedding, the time + pooled-text embedding and the context projection run
//! in [`Denoiser::begin`]. `proj_out` includes the unpatchify, so its output is the
//! `[B, out_channels, H, W]` prediction and [`Denoiser::end`] only hands it back.
//!
//! State: `hidden` = image tokens `[B, N, D]`, `context` = text tokens `[B, L, D]`,
//! `temb` = `[B, D]`, `sample_hw` = latent size; `skips` is unused.

mod block;
mod config;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::kernels::Linear;

pub use config::MMDiTConfig;

use crate::patch::{Band, Patch};
use crate::unet::timestep_embedding;
use crate::weights::ComponentSource;
use crate::{Conditioning, Denoiser, Error, OutputRef, Result, State};
use block::{ada_norm_continuous, AdaLinear, JointTransformerBlock};

/// Context length assumed by [`Denoiser::module_flops`]: SD3's 77 CLIP + 256 T5 tokens.
pub const FLOPS_CONTEXT_LEN: usize = 333;

/// Width of the sinusoidal timestep projection (`Timesteps(num_channels=256)`).
const TIME_PROJ_DIM: usize = 256;

/// diffusers' `get_2d_sincos_pos_embed(embed_dim, (grid_h, grid_w), base_size=base_size,
/// interpolation_scale=1.0)`: `[grid_h * grid_w, embed_dim]` row-major over the grid.
/// The first half of each row encodes the column, the second the row; the grid is built
/// in f32 and the sines in f64, as diffusers does, then rounded to f32.
pub fn get_2d_sincos_pos_embed(
    embed_dim: usize,
    grid_h: usize,
    grid_w: usize,
    base_size: usize,
) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f32> {
        let step = (n as f64 / base_size as f64) as f32;
        (0..n).map(|i| i as f32 / step).collect()
    };
    let (hs, ws) = (axis(grid_h), axis(grid_w));
    let half = embed_dim / 2;
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / (half as f64 / 2.0)))
        .collect();
    let mut out = Vec::with_capacity(grid_h * grid_w * embed_dim);
    let push_1d = |pos: f32, out: &mut Vec<f32>| {
        let p = pos as f64;
        out.extend(omega.iter().map(|o| (p * o).sin() as f32));
        out.extend(omega.iter().map(|o| (p * o).cos() as f32));
    };
    for &h in &hs {
        for &w in &ws {
            push_1d(w, &mut out);
            push_1d(h, &mut out);
        }
    }
    out
}

/// `linear_1`, SiLU, `linear_2`: diffusers' `TimestepEmbedding` and the SiLU
/// `PixArtAlphaTextProjection` share this shape.
#[derive(Debug, Clone)]
struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, cin: usize, dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: crate::kernels::linear(cin, dim, vb.pp("linear_1"))?,
            linear_2: crate::kernels::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&crate::kernels::silu(&self.linear_1.forward(x)?)?)
    }
}

/// Where the position embedding comes from.
#[derive(Debug, Clone)]
enum PosEmbed {
    /// SD3: a `[M * M, D]` table, centre-cropped to the token grid.
    Cropped { table: Tensor, max: usize },
    /// `pos_embed_max_size: null`: computed for the token grid around `base_size`.
    Interpolated { base_size: usize },
}

/// diffusers' `SD3Transformer2DModel`.
pub struct SD3Transformer2DModel {
    pub config: MMDiTConfig,
    patch_proj: Conv2d,
    pos_embed: PosEmbed,
    timestep_embedder: Mlp,
    text_embedder: Mlp,
    context_embedder: Linear,
    blocks: Vec<JointTransformerBlock>,
    norm_out: AdaLinear,
    proj_out: Linear,
    names: Vec<String>,
    dtype: DType,
    device: Device,
}

impl SD3Transformer2DModel {
    /// Loads `<dir>/config.json` and the weights of a diffusers `transformer/` folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                "transformer folder not found (expected <model>/transformer)",
            ));
        }
        Self::load_source(&ComponentSource::folder(dir), dtype, device)
    }

    /// Loads the transformer of any component source, with its LoRA deltas merged.
    pub fn load_source(src: &ComponentSource, dtype: DType, device: &Device) -> Result<Self> {
        let mut config: MMDiTConfig = src.read_config()?;
        config.path = src.config_path();
        config.validate()?;
        // The last block (context_pre_only) has an `add_q_proj` whose output only feeds
        // the context tokens that block discards: diffusers computes it, we skip it.
        let last = config.num_layers.saturating_sub(1);
        let skipped = format!("transformer_blocks.{last}.attn.add_q_proj.");
        src.load(dtype, device, &[skipped.as_str()], |vb| {
            Self::new(vb, config)
        })
    }

    /// Builds the model from a var builder rooted at the transformer's weights.
    pub fn new(vb: VarBuilder, config: MMDiTConfig) -> Result<Self> {
        config.validate()?;
        let w = |e: candle_core::Error| Error::Weights(e.to_string());
        let c = &config;
        let dim = c.inner_dim();
        let p = c.patch_size;
        let dtype = vb.dtype();
        let device = vb.device().clone();

        let vbp = vb.pp("pos_embed");
        let patch_proj = candle_nn::conv2d(
            c.in_channels,
            dim,
            p,
            Conv2dConfig {
                stride: p,
                ..Default::default()
            },
            vbp.pp("proj"),
        )
        .map_err(w)?;
        let base_size = c.sample_size / p;
        let pos_embed = match c.pos_embed_max_size {
            Some(max) => {
                // diffusers stores the table as a persistent buffer; a checkpoint that
                // lacks it gets the one its constructor computes.
                let table = if vbp.contains_tensor("pos_embed") {
                    vbp.get((1, max * max, dim), "pos_embed")
                        .map_err(w)?
                        .reshape((max * max, dim))?
                } else {
                    let need = (max as u128) * (max as u128) * (dim as u128) * 4;
                    crate::memory::check("the computed `pos_embed` table", need).map_err(|m| {
                        Error::Config {
                            path: c.path.clone(),
                            msg: format!("`pos_embed_max_size` = {max}: {m}"),
                        }
                    })?;
                    Tensor::from_vec(
                        get_2d_sincos_pos_embed(dim, max, max, base_size),
                        (max * max, dim),
                        &device,
                    )?
                    .to_dtype(dtype)?
                };
                PosEmbed::Cropped { table, max }
            }
            None => PosEmbed::Interpolated { base_size },
        };
        let vbt = vb.pp("time_text_embed");
        let timestep_embedder =
            Mlp::new(vbt.pp("timestep_embedder"), TIME_PROJ_DIM, dim).map_err(w)?;
        let text_embedder =
            Mlp::new(vbt.pp("text_embedder"), c.pooled_projection_dim, dim).map_err(w)?;
        let context_embedder = crate::kernels::linear(
            c.joint_attention_dim,
            c.caption_projection_dim,
            vb.pp("context_embedder"),
        )
        .map_err(w)?;

        let mut blocks = Vec::with_capacity(c.num_layers);
        let mut names = Vec::with_capacity(c.num_layers + 2);
        for i in 0..c.num_layers {
            blocks.push(
                JointTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    dim,
                    c.num_attention_heads,
                    c.attention_head_dim,
                    i + 1 == c.num_layers,
                    c.qk_norm.is_some(),
                    c.is_dual_attention(i),
                )
                .map_err(w)?,
            );
            names.push(format!("transformer_blocks.{i}"));
        }
        let norm_out = AdaLinear::new(vb.pp("norm_out"), dim, 2).map_err(w)?;
        let proj_out =
            crate::kernels::linear(dim, p * p * c.out_channels(), vb.pp("proj_out")).map_err(w)?;
        names.push("norm_out".into());
        names.push("proj_out".into());
        Ok(Self {
            config,
            patch_proj,
            pos_embed,
            timestep_embedder,
            text_embedder,
            context_embedder,
            blocks,
            norm_out,
            proj_out,
            names,
            dtype,
            device,
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

    fn norm_out_idx(&self) -> usize {
        self.blocks.len()
    }

    /// [`Denoiser::begin`] for the whole sample, or for one band of rows (`band`): the
    /// position embedding is the band's rows of the whole image's.
    fn begin_band(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        band: Option<Band>,
    ) -> Result<State> {
        let (b, _, h, w) = sample.dims4()?;
        let (row0, full_rows) = match band {
            Some(band) => {
                let p = self.config.patch_size;
                if band.rows != h || !band.row0.is_multiple_of(p) {
                    return Err(Error::Input(format!(
                        "band {} of {}: {h} rows starting at row {}, expected {} rows starting at a multiple of patch_size {p}",
                        band.index, band.count, band.row0, band.rows
                    )));
                }
                (band.row0, band.full_rows)
            }
            None => (0, h),
        };
        // The checks read only shapes: check the whole image's.
        let whole = Tensor::zeros(
            (b, sample.dim(1)?, full_rows, w),
            sample.dtype(),
            sample.device(),
        )?;
        self.check_inputs(if band.is_some() { &whole } else { sample }, cond)?;
        let hidden = self.patch_embed(&sample.to_dtype(self.dtype)?, row0, full_rows)?;
        let temb = self.temb(timestep, b, cond)?;
        let context = self
            .context_embedder
            .forward(&cond.prompt_embeds.to_dtype(self.dtype)?)?;
        Ok(State {
            hidden,
            context,
            temb,
            skips: Vec::new(),
            sample_hw: (h, w),
        })
    }

    /// The time + pooled-text embedding (`time_text_embed`), `[b, D]`; `cond` is checked.
    fn temb(&self, timestep: f64, b: usize, cond: &Conditioning) -> Result<Tensor> {
        // The pipeline hands diffusers an f32 timestep (e.g. 981.87...); projecting it in
        // f32 keeps the low bits that the embedding MLP amplifies.
        let t_proj = timestep_embedding(
            &vec![timestep as f32; b],
            TIME_PROJ_DIM,
            true,
            0.0,
            &self.device,
        )?
        .to_dtype(self.dtype)?;
        let pooled = cond
            .pooled
            .as_ref()
            .expect("checked")
            .to_dtype(self.dtype)?;
        Ok((self.timestep_embedder.forward(&t_proj)? + self.text_embedder.forward(&pooled)?)?)
    }

    /// One module on the whole image, or on one band's tokens with `p`.
    fn run_module_on(&self, idx: usize, s: &State, p: Option<&Patch>) -> Result<Vec<Tensor>> {
        if let Some(block) = self.blocks.get(idx) {
            let (ctx, hidden) = block.forward(&s.hidden, &s.context, &s.temb, p)?;
            return Ok(match ctx {
                Some(ctx) => vec![ctx, hidden],
                None => vec![hidden],
            });
        }
        match idx - self.norm_out_idx() {
            0 => Ok(vec![ada_norm_continuous(
                &self.norm_out,
                &s.hidden,
                &s.temb,
            )?]),
            1 => {
                let x = self.proj_out.forward(&s.hidden)?;
                Ok(vec![self.unpatchify(&x, s.sample_hw)?])
            }
            _ => Err(Error::Input(format!(
                "module index {idx} out of range ({} modules)",
                self.names.len()
            ))),
        }
    }

    fn check_inputs(&self, sample: &Tensor, cond: &Conditioning) -> Result<()> {
        let c = &self.config;
        let p = c.patch_size;
        let dims = sample.dims();
        if dims.len() != 4 || dims[0] == 0 || dims[1] != c.in_channels {
            return Err(Error::Input(format!(
                "`sample` has shape {dims:?}, expected [B, {}, H, W]",
                c.in_channels
            )));
        }
        let (b, h, w) = (dims[0], dims[2], dims[3]);
        if h == 0 || w == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Error::Input(format!(
                "`sample` has shape {dims:?}: latent height and width must be positive multiples of patch_size {p}"
            )));
        }
        if let Some(max) = c.pos_embed_max_size {
            if h / p > max || w / p > max {
                return Err(Error::Input(format!(
                    "`sample` has shape {dims:?}: {}x{} patches exceed pos_embed_max_size {max} (latents up to {}x{})",
                    h / p,
                    w / p,
                    max * p,
                    max * p
                )));
            }
        }
        let ctx = cond.prompt_embeds.dims();
        let want = c.joint_attention_dim;
        if ctx.len() != 3 || ctx[0] != b || ctx[1] == 0 || ctx[2] != want {
            return Err(Error::Input(format!(
                "`encoder_hidden_states` (prompt embeds) has shape {ctx:?}, expected [{b}, L, {want}]"
            )));
        }
        let pooled_dim = c.pooled_projection_dim;
        match &cond.pooled {
            Some(x) if x.dims() == [b, pooled_dim] => Ok(()),
            Some(x) => Err(Error::Input(format!(
                "`pooled_projections` (pooled prompt embeds) has shape {:?}, expected [{b}, {pooled_dim}]",
                x.dims()
            ))),
            None => Err(Error::Input(format!(
                "the SD3 transformer needs pooled prompt embeds (`pooled_projections`, [{b}, {pooled_dim}])"
            ))),
        }
    }

    /// diffusers' `PatchEmbed`: patchify, flatten to tokens, add the position embedding.
    /// `sample` holds rows `row0..` of an image `full_rows` rows tall.
    fn patch_embed(&self, sample: &Tensor, row0: usize, full_rows: usize) -> Result<Tensor> {
        let p = self.config.patch_size;
        let (_, _, h, w) = sample.dims4()?;
        let (gh, gw) = (h / p, w / p);
        let (g0, gh_full) = (row0 / p, full_rows / p);
        let tokens = self
            .patch_proj
            .forward(sample)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let dim = tokens.dim(2)?;
        let pos = match &self.pos_embed {
            PosEmbed::Cropped { table, max } => {
                let (top, left) = ((max - gh_full) / 2 + g0, (max - gw) / 2);
                table
                    .reshape((*max, *max, dim))?
                    .narrow(0, top, gh)?
                    .narrow(1, left, gw)?
                    .reshape((1, gh * gw, dim))?
            }
            PosEmbed::Interpolated { base_size } => Tensor::from_vec(
                get_2d_sincos_pos_embed(dim, gh_full, gw, *base_size),
                (1, gh_full * gw, dim),
                &self.device,
            )?
            .narrow(1, g0 * gw, gh * gw)?
            .to_dtype(self.dtype)?,
        };
        Ok(tokens.broadcast_add(&pos)?)
    }

    /// `[B, h*w, p*p*C]` tokens to a `[B, C, h*p, w*p]` image (diffusers' `nhwpqc->nchpwq`).
    fn unpatchify(&self, x: &Tensor, (height, width): (usize, usize)) -> Result<Tensor> {
        let p = self.config.patch_size;
        let c = self.config.out_channels();
        let b = x.dim(0)?;
        let (h, w) = (height / p, width / p);
        Ok(x.reshape((b, h, w, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .contiguous()?
            .reshape((b, c, h * p, w * p))?)
    }
}

impl Denoiser for SD3Transformer2DModel {
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
        Some(crate::memory::mmdit_forward(
            &self.config,
            batch,
            hw,
            ctx_len,
            elem,
        ))
    }

    fn module_output_count(&self, idx: usize) -> usize {
        match self.blocks.get(idx) {
            Some(b) if !b.context_pre_only() => 2,
            _ => 1,
        }
    }

    fn module_reads(&self, idx: usize) -> Vec<OutputRef> {
        if idx == 0 || idx >= self.names.len() {
            // Block 0 reads only what `begin` set up.
            return Vec::new();
        }
        // Every module reads all its predecessor outputs: a block's [context, hidden],
        // norm_out the last block's [hidden], proj_out norm_out's [hidden].
        let prev = idx - 1;
        (0..self.module_output_count(prev))
            .map(|index| OutputRef {
                module: prev,
                index,
            })
            .collect()
    }

    fn module_flops(&self, h: usize, w: usize) -> Vec<f64> {
        let p = self.config.patch_size;
        let n = (h / p) * (w / p);
        let d = self.config.inner_dim();
        let mut f: Vec<f64> = self
            .blocks
            .iter()
            .map(|b| b.flops(n, FLOPS_CONTEXT_LEN))
            .collect();
        f.push(2.0 * (2 * d * d) as f64 + 10.0 * (n * d) as f64);
        f.push(2.0 * (n * d * p * p * self.config.out_channels()) as f64);
        f
    }

    fn begin(&self, sample: &Tensor, timestep: f64, cond: &Conditioning) -> Result<State> {
        self.begin_band(sample, timestep, cond, None)
    }

    fn run_module(&self, idx: usize, s: &State) -> Result<Vec<Tensor>> {
        self.run_module_on(idx, s, None)
    }

    fn patch_size(&self) -> usize {
        self.config.patch_size
    }

    fn patch_alignment(&self) -> Option<(usize, usize)> {
        Some((self.config.patch_size, self.config.patch_size))
    }

    /// Blocks and `norm_out` output image tokens `[B, L, D]` (a band's are a run of rows of
    /// patches: dim 1) and, but the last block, the text stream `[B, Lc, D]`, which every band
    /// computes whole; `proj_out` outputs the band's rows of the prediction (dim 2).
    fn band_dim(&self, idx: usize, index: usize) -> Option<usize> {
        if idx + 1 == self.names.len() {
            return Some(2);
        }
        let texts = self.module_output_count(idx) - 1;
        if index < texts {
            None
        } else {
            Some(1)
        }
    }

    fn begin_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        band: Band,
    ) -> Result<State> {
        self.begin_band(sample, timestep, cond, Some(band))
    }

    fn run_module_patch(&self, idx: usize, s: &State, p: &Patch) -> Result<Vec<Tensor>> {
        self.run_module_on(idx, s, Some(p))
    }

    fn modulated_input(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> Result<Option<Tensor>> {
        let Some(first) = self.blocks.first() else {
            return Ok(None);
        };
        self.check_inputs(sample, cond)?;
        let (b, _, h, _) = sample.dims4()?;
        let hidden = self.patch_embed(&sample.to_dtype(self.dtype)?, 0, h)?;
        let temb = self.temb(timestep, b, cond)?;
        Ok(Some(first.modulated_input(&hidden, &temb)?))
    }

    fn apply_module(&self, idx: usize, s: &mut State, mut out: Vec<Tensor>) -> Result<()> {
        let name = self.names.get(idx).ok_or_else(|| {
            Error::Input(format!(
                "module index {idx} out of range ({} modules)",
                self.names.len()
            ))
        })?;
        let want = self.module_output_count(idx);
        if out.len() != want {
            return Err(Error::Input(format!(
                "{name}: got {} output tensors, expected {want}",
                out.len()
            )));
        }
        // The last block outputs no context; the old one stays, unread.
        s.hidden = out.pop().expect("counted");
        if let Some(ctx) = out.pop() {
            s.context = ctx;
        }
        Ok(())
    }

    fn end(&self, state: State) -> Result<Tensor> {
        Ok(state.hidden)
    }
}
