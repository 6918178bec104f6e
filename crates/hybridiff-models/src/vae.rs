//! `AutoencoderKL` decoder (SDXL and SD3 VAEs), as diffusers' `AutoencoderKL._decode`:
//! `post_quant_conv` (when the config has one), then `Decoder`. Weight names follow
//! diffusers; the encoder's weights may sit in the same file and are never read.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{GroupNorm, VarBuilder};

use crate::kernels::Linear;

use crate::nn::{attention, conv2d, Conv2d, ResnetBlock2D, ResnetConfig};
use crate::weights::{read_config, ComponentSource};
use crate::{Error, Result};

/// diffusers hard-codes this epsilon for every norm of the decoder.
const DECODER_EPS: f64 = 1e-6;

/// The `config.json` of a diffusers `AutoencoderKL` (the `vae/` folder). Missing keys take
/// diffusers' defaults; keys this engine does not need (e.g. `sample_size`) are ignored.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// diffusers' class name; only `AutoencoderKL` is supported.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Image channels the encoder takes.
    pub in_channels: usize,
    /// Image channels the decoder returns.
    pub out_channels: usize,
    /// Channels of the latent space.
    pub latent_channels: usize,
    /// Channels per resolution level, highest resolution first.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block; decoder blocks have one more.
    pub layers_per_block: usize,
    /// Groups of every GroupNorm.
    pub norm_num_groups: usize,
    /// Activation; only `silu` is supported.
    pub act_fn: String,
    /// Encoder block types (unused: only the decoder is built).
    pub down_block_types: Vec<String>,
    /// Decoder block types; only `UpDecoderBlock2D` is supported.
    pub up_block_types: Vec<String>,
    /// Whether the mid block has its self-attention.
    pub mid_block_add_attention: bool,
    /// Latents are divided by this before decoding.
    pub scaling_factor: f64,
    /// Added to the scaled latents before decoding (SD3); none means 0.
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics; unsupported when set.
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent statistics; unsupported when set.
    pub latents_std: Option<Vec<f64>>,
    /// Whether the encoder has a `quant_conv` (unused here).
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` runs before the decoder.
    pub use_post_quant_conv: bool,
    /// Pipelines run this VAE in f32 even when the denoiser runs in f16 (diffusers'
    /// default: true); see [`VaeConfig::decode_dtype`].
    pub force_upcast: bool,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL.__init__` defaults.
    fn default() -> Self {
        Self {
            class_name: None,
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![64],
            layers_per_block: 1,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            mid_block_add_attention: true,
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            force_upcast: true,
        }
    }
}

impl VaeConfig {
    /// The dtype a pipeline running in `dtype` decodes this VAE in, by diffusers' rule
    /// (`StableDiffusionXLPipeline.__call__`: `needs_upcasting = vae.dtype == float16 and
    /// vae.config.force_upcast`): f32 when `force_upcast` is set and `dtype` is f16, else
    /// `dtype`. bf16 is not upcast, as in diffusers: it has float32's exponent range, so
    /// the overflow `force_upcast` guards against (SDXL's VAE exceeds f16's 65504) cannot
    /// happen. diffusers' SD3 pipeline ignores `force_upcast`; this engine applies it to
    /// every pipeline, which only makes SD3 decodes more precise.
    pub fn decode_dtype(&self, dtype: DType) -> DType {
        if self.force_upcast && dtype == DType::F16 {
            DType::F32
        } else {
            dtype
        }
    }

    /// Reads and validates a VAE `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_config(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Reads and validates the config of a component source.
    pub fn from_source(src: &ComponentSource) -> Result<Self> {
        let config: Self = src.read_config()?;
        config.validate(&src.config_path())?;
        Ok(config)
    }

    /// Rejects values this decoder does not implement; `path` names the config in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |key: &str, value: String, hint: &str| Error::Unsupported {
            path: path.to_path_buf(),
            key: key.into(),
            value,
            hint: hint.into(),
        };
        let invalid = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        if let Some(class) = &self.class_name {
            if class != "AutoencoderKL" {
                return Err(unsupported(
                    "_class_name",
                    format!("{class:?}"),
                    "only AutoencoderKL VAEs are implemented",
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(unsupported(
                "act_fn",
                format!("{:?}", self.act_fn),
                "only \"silu\" is implemented",
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(unsupported(
                "up_block_types",
                format!("{t:?}"),
                "only \"UpDecoderBlock2D\" is implemented",
            ));
        }
        // Pipelines that set these de-normalise per channel (latents * std / scaling +
        // mean); decoding as if they were absent would silently give wrong images.
        for (key, value) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(v) = value {
                return Err(unsupported(
                    key,
                    format!("{v:?}"),
                    "per-channel latent normalisation is not implemented; expected null",
                ));
            }
        }
        // Latents are divided by it: real VAEs use 0.13 to 1.5; far outside, the decoder
        // sees values that overflow to NaN.
        if !(1e-4..=1e4).contains(&self.scaling_factor.abs()) {
            return Err(unsupported(
                "scaling_factor",
                self.scaling_factor.to_string(),
                "must be finite, between 1e-4 and 1e4 in size",
            ));
        }
        if self.block_out_channels.is_empty() {
            return Err(invalid("`block_out_channels` is empty".into()));
        }
        if self.up_block_types.len() != self.block_out_channels.len() {
            return Err(invalid(format!(
                "`up_block_types` has {} entries but `block_out_channels` has {}",
                self.up_block_types.len(),
                self.block_out_channels.len()
            )));
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| groups == 0 || c % groups != 0)
        {
            return Err(invalid(format!(
                "`norm_num_groups` = {groups} does not divide the block channel count {c}"
            )));
        }
        if self.latent_channels == 0 || self.out_channels == 0 {
            return Err(invalid(
                "`latent_channels` and `out_channels` must be positive".into(),
            ));
        }
        use crate::unet::{MAX_CHANNELS, MAX_LAYERS};
        // Each level doubles the image side; 8 levels (x128) is far past any real VAE.
        let mut counts = vec![
            (
                "block_out_channels (levels)",
                self.block_out_channels.len(),
                8,
            ),
            ("layers_per_block", self.layers_per_block, MAX_LAYERS),
            ("latent_channels", self.latent_channels, MAX_CHANNELS),
            ("out_channels", self.out_channels, MAX_CHANNELS),
        ];
        for &c in &self.block_out_channels {
            counts.push(("block_out_channels", c, MAX_CHANNELS));
        }
        for (key, v, max) in counts {
            if v > max || (v == 0 && key == "block_out_channels") {
                return Err(invalid(format!("`{key}` = {v}: expected 1 to {max}")));
            }
        }
        // Added to the unscaled latents: real VAEs use below 1 (SD3 0.0609); large ones
        // saturate the image to grey or overflow the decoder to NaN.
        if let Some(s) = self.shift_factor {
            if !(s.is_finite() && s.abs() <= 1e2) {
                return Err(unsupported(
                    "shift_factor",
                    s.to_string(),
                    "must be null or finite, at most 1e2 in size",
                ));
            }
        }
        Ok(())
    }
}

/// diffusers' `Attention` as the VAE mid block builds it: group-normed single-head
/// self-attention over the pixels, with a residual connection.
#[derive(Debug, Clone)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // Old diffusers checkpoints name the projections `query`/`key`/`value`/`proj_attn`;
        // diffusers renames them on load, so accept both.
        let (q, k, v, o) =
            if !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight") {
                ("query", "key", "value", "proj_attn")
            } else {
                ("to_q", "to_k", "to_v", "to_out.0")
            };
        let lin = |name: &str| crate::kernels::linear(channels, channels, vb.pp(name));
        Ok(Self {
            group_norm: candle_nn::group_norm(groups, channels, DECODER_EPS, vb.pp("group_norm"))?,
            to_q: lin(q)?,
            to_k: lin(k)?,
            to_v: lin(v)?,
            to_out: lin(o)?,
            // The decoder passes attention_head_dim = channels: one head.
            heads: 1,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // GroupNorm statistics are per (batch, group) whatever the spatial layout, so
        // normalising the 4-D tensor equals diffusers' normalising of [B, C, H*W].
        let hs = self.group_norm.forward(x)?;
        let hs = hs.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&hs)?;
        let k = self.to_k.forward(&hs)?;
        let v = self.to_v.forward(&hs)?;
        let out = attention(&q, &k, &v, self.heads)?;
        let out = self.to_out.forward(&out)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        // rescale_output_factor is 1 in the decoder.
        Ok((out + x)?)
    }
}

/// `UNetMidBlock2D` with one layer: resnet, (attention,) resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<AttentionBlock>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let rc = resnet_config(channels, channels, groups);
        Ok(Self {
            resnet0: ResnetBlock2D::new(vb.pp("resnets.0"), rc)?,
            attention: if add_attention {
                Some(AttentionBlock::new(
                    vb.pp("attentions.0"),
                    channels,
                    groups,
                )?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::new(vb.pp("resnets.1"), rc)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        Ok(self.resnet1.forward(&h, None)?)
    }
}

/// `UpDecoderBlock2D`: resnets, then an optional `Upsample2D` (nearest x2 + 3x3 conv).
#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

impl UpDecoderBlock {
    fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        groups: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(
                    vb.pp(format!("resnets.{i}")),
                    resnet_config(cin, out_channels, groups),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let upsampler = if add_upsample {
            Some(conv2d(
                vb.pp("upsamplers.0.conv"),
                out_channels,
                out_channels,
                3,
                1,
            )?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, hh, ww) = h.dims4()?;
            h = conv.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?;
        }
        Ok(h)
    }
}

fn resnet_config(cin: usize, cout: usize, groups: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups,
        eps: DECODER_EPS,
        output_scale_factor: 1.0,
    }
}

/// diffusers' `Decoder` with `norm_type="group"`.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let groups = c.norm_num_groups;
        // `validate` guarantees at least one level.
        let top = c.block_out_channels[c.block_out_channels.len() - 1];
        let conv_in = conv2d(vb.pp("conv_in"), c.latent_channels, top, 3, 1)?;
        let mid_block = MidBlock::new(vb.pp("mid_block"), top, groups, c.mid_block_add_attention)?;
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut out_ch = reversed[0];
        for (i, &ch) in reversed.iter().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            up_blocks.push(UpDecoderBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                prev,
                out_ch,
                c.layers_per_block + 1,
                groups,
                i + 1 != reversed.len(),
            )?);
        }
        let bottom = c.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: candle_nn::group_norm(
                groups,
                bottom,
                DECODER_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(vb.pp("conv_out"), bottom, c.out_channels, 3, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        let h = self.conv_norm_out.forward(&h)?.silu()?;
        Ok(self.conv_out.forward(&h)?)
    }
}

/// diffusers' `AutoencoderKL`, decoder side only.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    /// The config the model was built from.
    pub config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    dtype: DType,
    device: Device,
}

impl AutoencoderKL {
    /// Loads the decoder from a diffusers `vae/` folder (`config.json` + weights).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_source(&ComponentSource::folder(dir), dtype, device)
    }

    /// Loads the decoder from any component source (a `vae/` folder, a VAE file, or the
    /// VAE of a single-file checkpoint).
    pub fn load_source(src: &ComponentSource, dtype: DType, device: &Device) -> Result<Self> {
        let config = VaeConfig::from_source(src)?;
        // The encoder half shares the file; the decoder never reads it.
        let encoder_only = ["encoder.", "quant_conv."];
        src.load(dtype, device, &encoder_only, |vb| Self::new(vb, config))
    }

    /// Builds the decoder from weights named as diffusers' `AutoencoderKL` state dict.
    pub fn new(vb: VarBuilder, config: VaeConfig) -> Result<Self> {
        config.validate(&PathBuf::from("<in-memory VaeConfig>"))?;
        let post_quant_conv = if config.use_post_quant_conv {
            let l = config.latent_channels;
            Some(conv2d(vb.pp("post_quant_conv"), l, l, 1, 1)?)
        } else {
            None
        };
        let decoder = Decoder::new(vb.pp("decoder"), &config)?;
        Ok(Self {
            config,
            post_quant_conv,
            decoder,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Raw decoder: `post_quant_conv` (if any) then the decoder, on `z` of shape
    /// `[B, latent_channels, h, w]` (moved to the model's dtype and device). Returns the
    /// `[B, out_channels, 8h, 8w]` image (for 4 levels), about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latents("z", z)?;
        let z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }

    /// What diffusers' pipelines do before decoding: `latents / scaling_factor +
    /// shift_factor` (shift 0 when unset), then [`Self::decode`].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_latents("latents", latents)?;
        // Pipelines cast the latents to the VAE's dtype before scaling.
        let z = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        // A true division, as torch does, rather than candle's multiply-by-reciprocal.
        let scale = Tensor::new(self.config.scaling_factor, &self.device)?.to_dtype(self.dtype)?;
        let mut z = z.broadcast_div(&scale)?;
        if let Some(shift) = self.config.shift_factor {
            let shift = Tensor::new(shift, &self.device)?.to_dtype(self.dtype)?;
            z = z.broadcast_add(&shift)?;
        }
        self.decode(&z)
    }

    fn check_latents(&self, name: &str, t: &Tensor) -> Result<()> {
        let c = self.config.latent_channels;
        match t.dims() {
            [_, ch, _, _] if *ch == c => Ok(()),
            dims => Err(Error::Input(format!(
                "`{name}` has shape {dims:?}, expected [batch, {c}, height, width] \
                 (latent_channels = {c} in the VAE config)"
            ))),
        }
    }
}

/// A VAE as a text-to-image pipeline running in `dtype` decodes with it: in
/// [`VaeConfig::decode_dtype`] (f32 when `force_upcast` is set and `dtype` is f16, as in
/// diffusers), else in `dtype`. A half-precision decode that gives any non-finite value
/// (overflow: the reason `force_upcast` exists) is redone in f32, with a warning that
/// names the VAE and `force_upcast`; the f32 weights are read from the folder on that first
/// need and kept for later decodes.
#[derive(Debug)]
pub struct PipelineVae {
    /// The VAE's config (`dir/config.json`).
    pub config: VaeConfig,
    source: ComponentSource,
    device: Device,
    model: AutoencoderKL,
    upcast: std::sync::OnceLock<AutoencoderKL>,
    retries: std::sync::atomic::AtomicUsize,
}

impl PipelineVae {
    /// Loads the decoder of the diffusers `vae/` folder `dir` for a pipeline running in
    /// `dtype` on `device` (see [`PipelineVae`]). Errors name the file or tensor.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_source(&ComponentSource::folder(dir), dtype, device)
    }

    /// [`PipelineVae::load`] from any component source (a folder, a VAE file, the VAE of
    /// a single-file checkpoint).
    pub fn load_source(src: &ComponentSource, dtype: DType, device: &Device) -> Result<Self> {
        let config = VaeConfig::from_source(src)?;
        let decode_dtype = config.decode_dtype(dtype);
        let model = AutoencoderKL::load_source(src, decode_dtype, device)?;
        if decode_dtype != dtype {
            tracing::debug!(
                "{}: force_upcast is true, so the VAE decodes in {decode_dtype:?} while the pipeline runs in {dtype:?} (as diffusers)",
                src.label().display()
            );
        }
        Ok(Self {
            config,
            source: src.clone(),
            device: device.clone(),
            model,
            upcast: std::sync::OnceLock::new(),
            retries: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The dtype decodes run in first (f32 retries aside).
    pub fn dtype(&self) -> DType {
        self.model.dtype
    }

    /// How many decodes were redone in f32 because the half-precision one was non-finite.
    pub fn f32_retries(&self) -> usize {
        self.retries.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// [`AutoencoderKL::decode_latents`] in [`PipelineVae::dtype`], redone in f32 when a
    /// half-precision decode holds a NaN or inf. `latents`: `[B, latent_channels, h, w]`
    /// in any float dtype; returns the image in the dtype that decoded it. A decode that is
    /// non-finite in f32 too is returned as is ([`to_rgb8`] refuses it, naming the VAE's
    /// weights and `scaling_factor`).
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let image = self.model.decode_latents(latents)?;
        if self.model.dtype == DType::F32 || all_finite(&image)? {
            return Ok(image);
        }
        tracing::warn!(
            "{}: the VAE decode in {:?} gave NaN or inf (half-precision overflow); decoding again in F32. force_upcast is false in {}; set it to true to always decode this VAE in f32",
            self.source.label().display(),
            self.model.dtype,
            self.source.config_path().display()
        );
        self.retries
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let f32_model = match self.upcast.get() {
            Some(m) => m,
            None => {
                let m = AutoencoderKL::load_source(&self.source, DType::F32, &self.device)?;
                // Two threads racing here load the same weights; either copy serves.
                let _ = self.upcast.set(m);
                self.upcast.get().expect("set just above")
            }
        };
        f32_model.decode_latents(latents)
    }
}

/// Whether every element of `t` is finite, on `t`'s device with one scalar read back:
/// `x - x` is 0 for a finite `x` and NaN for NaN or inf, so the sum of `t - t` is finite
/// exactly when every element is (a plain sum could overflow on large finite values).
fn all_finite(t: &Tensor) -> Result<bool> {
    let zeros = t.sub(t)?.to_dtype(DType::F32)?;
    Ok(zeros.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// Converts a `[1, 3, H, W]` image in about [-1, 1] to RGB8 bytes in HWC order, as
/// diffusers' `VaeImageProcessor.postprocess(output_type="pil")` does:
/// `(x / 2 + 0.5).clamp(0, 1) * 255`, rounded half to even (numpy's `round`).
/// Returns `(width, height, bytes)`.
pub fn to_rgb8(image: &Tensor) -> Result<(u32, u32, Vec<u8>)> {
    let (h, w) = match image.dims() {
        [1, 3, h, w] => (*h, *w),
        dims => {
            return Err(Error::Input(format!(
                "`image` has shape {dims:?}, expected [1, 3, height, width]"
            )))
        }
    };
    let too_big = |_| Error::Input(format!("`image` of {w}x{h} pixels is too large"));
    let (width, height) = (
        u32::try_from(w).map_err(too_big)?,
        u32::try_from(h).map_err(too_big)?,
    );
    let values = image
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // A NaN would silently become a black pixel.
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "the decoded image holds a non-finite value ({}) at flat index {i}; check the VAE's weights and `scaling_factor`",
            values[i]
        )));
    }
    let bytes = values
        .into_iter()
        .map(|v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
        .collect();
    Ok((width, height, bytes))
}
