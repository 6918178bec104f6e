//! `unet/config.json` as diffusers writes it, with the per-block lists resolved.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// A config value that diffusers allows as a scalar or as a per-block list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn per_block(&self, n: usize, key: &str, path: &Path) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(Error::Config {
                path: path.to_path_buf(),
                msg: format!(
                    "`{key}` has {} entries, expected one per block ({n})",
                    v.len()
                ),
            }),
        }
    }
}

/// The raw fields of a diffusers `UNet2DConditionModel` config that affect the maths.
#[derive(Debug, Clone, Deserialize)]
pub struct RawUNetConfig {
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: OneOrManyBool,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "d_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: serde_json::Value,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default = "d_head")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// SDXL-base's published config has `null` here, which diffusers reads as false.
    #[serde(default, deserialize_with = "null_as_false")]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default_opt")]
    pub attention_type: Option<String>,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

/// `only_cross_attention` may be a bool or a per-block list of bools.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrManyBool {
    One(bool),
    Many(Vec<bool>),
}

impl Default for OneOrManyBool {
    fn default() -> Self {
        OneOrManyBool::One(false)
    }
}

fn d_4() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_one_usize() -> usize {
    1
}
fn d_one() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_tlayers() -> serde_json::Value {
    serde_json::Value::from(1)
}
fn d_head() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_default_opt() -> Option<String> {
    Some("default".into())
}
fn d_positional() -> String {
    "positional".into()
}
fn d_three() -> usize {
    3
}

/// Most channels of any layer (SDXL has 1280, SD3.5 large 2432).
pub const MAX_CHANNELS: usize = 1 << 16;
/// Most resolution levels.
const MAX_BLOCKS: usize = 16;
/// Most layers per block or transformer layers per block.
pub const MAX_LAYERS: usize = 1024;
/// Most attention heads per block.
const MAX_HEADS: usize = 1024;
/// Largest convolution kernel.
const MAX_KERNEL: usize = 15;
/// Largest `sample_size` in latent pixels.
pub const MAX_SAMPLE_SIZE: usize = 1 << 14;

/// A resolved U-Net config: every per-block value expanded, every unsupported option
/// rejected with the key named.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    /// The file this config came from, for error messages.
    pub path: PathBuf,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<BlockKind>,
    pub up_block_types: Vec<BlockKind>,
    pub has_mid_block: bool,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: Vec<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub reverse_transformer_layers_per_block: Vec<usize>,
    /// Heads per block (diffusers' `attention_head_dim` is really the head count
    /// unless `num_attention_heads` is set: a historical naming quirk we keep).
    pub num_attention_heads: Vec<usize>,
    pub use_linear_projection: bool,
    /// `Some((addition_time_embed_dim, projection_input_dim))` for SDXL's `text_time`.
    pub text_time: Option<(usize, usize)>,
    pub resnet_out_scale_factor: f64,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    /// The latent size the model was trained at (`sample_size`), when it is square.
    pub sample_size: Option<usize>,
}

/// The block types this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: resnets and transformers.
    CrossAttn,
}

fn null_as_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(<Option<bool> as serde::Deserialize>::deserialize(d)?.unwrap_or(false))
}

impl UNetConfig {
    /// Reads and validates `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawUNetConfig = crate::weights::read_config(path)?;
        Self::from_raw(raw, path)
    }

    /// Validates a parsed config; `path` is only used in messages.
    pub fn from_raw(raw: RawUNetConfig, path: &Path) -> Result<Self> {
        let unsupported = |key: &str, value: &dyn std::fmt::Debug, hint: &str| Error::Unsupported {
            path: path.to_path_buf(),
            key: key.to_string(),
            value: format!("{value:?}"),
            hint: hint.to_string(),
        };
        let n = raw.block_out_channels.len();
        if n == 0 || raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return Err(Error::Config {
                path: path.to_path_buf(),
                msg: format!(
                    "`down_block_types` ({}), `up_block_types` ({}) and `block_out_channels` ({}) must have the same, non-zero length",
                    raw.down_block_types.len(),
                    raw.up_block_types.len(),
                    n
                ),
            });
        }
        let kind = |key: &str, t: &str, down: bool| -> Result<BlockKind> {
            match (t, down) {
                ("DownBlock2D", true) | ("UpBlock2D", false) => Ok(BlockKind::Plain),
                ("CrossAttnDownBlock2D", true) | ("CrossAttnUpBlock2D", false) => {
                    Ok(BlockKind::CrossAttn)
                }
                _ => Err(unsupported(
                    key,
                    &t,
                    "supported: DownBlock2D, CrossAttnDownBlock2D, UpBlock2D, CrossAttnUpBlock2D",
                )),
            }
        };
        let down_block_types = raw
            .down_block_types
            .iter()
            .map(|t| kind("down_block_types", t, true))
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = raw
            .up_block_types
            .iter()
            .map(|t| kind("up_block_types", t, false))
            .collect::<Result<Vec<_>>>()?;
        let has_mid_block = match raw.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => true,
            None => false,
            Some(other) => {
                return Err(unsupported(
                    "mid_block_type",
                    &other,
                    "supported: UNetMidBlock2DCrossAttn or null",
                ))
            }
        };
        if raw.act_fn != "silu" {
            return Err(unsupported("act_fn", &raw.act_fn, "supported: silu"));
        }
        match &raw.only_cross_attention {
            OneOrManyBool::One(false) => {}
            OneOrManyBool::Many(v) if v.iter().all(|b| !b) => {}
            other => {
                return Err(unsupported(
                    "only_cross_attention",
                    other,
                    "supported: false",
                ))
            }
        }
        if raw.dual_cross_attention {
            return Err(unsupported(
                "dual_cross_attention",
                &true,
                "supported: false",
            ));
        }
        let checks: [(&str, bool, String); 14] = [
            (
                "class_embed_type",
                raw.class_embed_type.is_some(),
                format!("{:?}", raw.class_embed_type),
            ),
            (
                "num_class_embeds",
                raw.num_class_embeds.is_some(),
                format!("{:?}", raw.num_class_embeds),
            ),
            (
                "encoder_hid_dim",
                raw.encoder_hid_dim.is_some(),
                format!("{:?}", raw.encoder_hid_dim),
            ),
            (
                "encoder_hid_dim_type",
                raw.encoder_hid_dim_type.is_some(),
                format!("{:?}", raw.encoder_hid_dim_type),
            ),
            (
                "resnet_time_scale_shift",
                raw.resnet_time_scale_shift != "default",
                raw.resnet_time_scale_shift.clone(),
            ),
            (
                "resnet_skip_time_act",
                raw.resnet_skip_time_act,
                "true".into(),
            ),
            (
                "time_embedding_type",
                raw.time_embedding_type != "positional",
                raw.time_embedding_type.clone(),
            ),
            (
                "time_embedding_dim",
                raw.time_embedding_dim.is_some(),
                format!("{:?}", raw.time_embedding_dim),
            ),
            (
                "time_embedding_act_fn",
                raw.time_embedding_act_fn.is_some(),
                format!("{:?}", raw.time_embedding_act_fn),
            ),
            (
                "timestep_post_act",
                raw.timestep_post_act.is_some(),
                format!("{:?}", raw.timestep_post_act),
            ),
            (
                "time_cond_proj_dim",
                raw.time_cond_proj_dim.is_some(),
                format!("{:?}", raw.time_cond_proj_dim),
            ),
            (
                "class_embeddings_concat",
                raw.class_embeddings_concat,
                "true".into(),
            ),
            (
                "cross_attention_norm",
                raw.cross_attention_norm.is_some(),
                format!("{:?}", raw.cross_attention_norm),
            ),
            (
                "attention_type",
                raw.attention_type
                    .as_deref()
                    .is_some_and(|t| t != "default"),
                format!("{:?}", raw.attention_type),
            ),
        ];
        for (key, bad, value) in checks {
            if bad {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    key: key.into(),
                    value,
                    hint: "this engine implements the SD 1.5 / SD 2.1 / SDXL U-Net options only"
                        .into(),
                });
            }
        }
        let text_time = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let t = raw.addition_time_embed_dim.ok_or_else(|| Error::Config {
                    path: path.to_path_buf(),
                    msg: "`addition_embed_type` is text_time but `addition_time_embed_dim` is missing".into(),
                })?;
                let p = raw.projection_class_embeddings_input_dim.ok_or_else(|| Error::Config {
                    path: path.to_path_buf(),
                    msg: "`addition_embed_type` is text_time but `projection_class_embeddings_input_dim` is missing".into(),
                })?;
                Some((t, p))
            }
            Some(other) => {
                return Err(unsupported(
                    "addition_embed_type",
                    &other,
                    "supported: text_time (SDXL) or null",
                ))
            }
        };
        let norm_num_groups = raw
            .norm_num_groups
            .ok_or_else(|| unsupported("norm_num_groups", &"null", "a group count is required"))?;
        let invalid = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        // Counts bound what the model allocates and how its sizes multiply; real U-Nets
        // stay far below (SDXL: 1280 channels, 10 transformer layers, 20 heads).
        let mut counts: Vec<(String, usize, usize)> = vec![
            ("in_channels".into(), raw.in_channels, MAX_CHANNELS),
            ("out_channels".into(), raw.out_channels, MAX_CHANNELS),
            ("norm_num_groups".into(), norm_num_groups, MAX_CHANNELS),
            ("block_out_channels".into(), n, MAX_BLOCKS),
        ];
        for (i, &c) in raw.block_out_channels.iter().enumerate() {
            counts.push((format!("block_out_channels[{i}]"), c, MAX_CHANNELS));
        }
        for (key, v) in [
            ("addition_time_embed_dim", raw.addition_time_embed_dim),
            (
                "projection_class_embeddings_input_dim",
                raw.projection_class_embeddings_input_dim,
            ),
        ] {
            if let Some(v) = v {
                counts.push((key.into(), v, MAX_CHANNELS));
            }
        }
        for (key, v, max) in counts {
            if v == 0 || v > max {
                return Err(invalid(format!("`{key}` = {v}: expected 1 to {max}")));
            }
        }
        for (key, v) in [
            ("norm_eps", raw.norm_eps),
            ("freq_shift", raw.freq_shift),
            ("mid_block_scale_factor", raw.mid_block_scale_factor),
            ("resnet_out_scale_factor", raw.resnet_out_scale_factor),
        ] {
            if !v.is_finite() {
                return Err(invalid(format!("`{key}` = {v}: expected a finite number")));
            }
        }
        if raw.norm_eps <= 0.0 {
            return Err(invalid(format!(
                "`norm_eps` = {}: expected a positive number (it keeps the norms' divisions finite)",
                raw.norm_eps
            )));
        }
        // Resnet outputs are divided by these scales; diffusers' models all use 1.
        for (key, v) in [
            ("mid_block_scale_factor", raw.mid_block_scale_factor),
            ("resnet_out_scale_factor", raw.resnet_out_scale_factor),
        ] {
            if !(1e-3..=1e3).contains(&v.abs()) {
                return Err(invalid(format!(
                    "`{key}` = {v}: expected a scale between 1e-3 and 1e3 in size (outputs are divided by it; diffusers' models use 1)"
                )));
            }
        }
        // The timestep embedding divides by (half its width - freq_shift).
        let half = raw.block_out_channels[0] / 2;
        if raw.freq_shift >= half as f64 {
            return Err(invalid(format!(
                "`freq_shift` = {}: expected less than half the time embedding width ({half}), which it is subtracted from before a division",
                raw.freq_shift
            )));
        }
        if let Some((t, p)) = text_time {
            if p <= 6 * t {
                return Err(invalid(format!(
                    "`projection_class_embeddings_input_dim` = {p} must exceed 6 * `addition_time_embed_dim` = {}: SDXL's input is the pooled text embedding followed by 6 time embeddings",
                    6 * t
                )));
            }
        }
        if raw.downsample_padding > 1 {
            return Err(unsupported(
                "downsample_padding",
                &raw.downsample_padding,
                "supported: 0 or 1",
            ));
        }
        for (i, c) in raw.block_out_channels.iter().enumerate() {
            if c % norm_num_groups != 0 {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    msg: format!(
                        "`block_out_channels[{i}]` = {c} is not divisible by `norm_num_groups` = {norm_num_groups}"
                    ),
                });
            }
        }
        let layers = |v: &serde_json::Value, key: &str| -> Result<usize> {
            let x = v.as_u64().ok_or_else(|| {
                unsupported(
                    key,
                    v,
                    "per-layer nested lists are not supported; use one integer per block",
                )
            })?;
            if x > MAX_LAYERS as u64 {
                return Err(invalid(format!(
                    "`{key}` = {x}: expected at most {MAX_LAYERS}"
                )));
            }
            Ok(x as usize)
        };
        let tl = &raw.transformer_layers_per_block;
        let transformer_layers_per_block = match tl.as_array() {
            None => vec![layers(tl, "transformer_layers_per_block")?; n],
            Some(list) if list.len() == n => list
                .iter()
                .map(|v| layers(v, "transformer_layers_per_block"))
                .collect::<Result<Vec<_>>>()?,
            Some(list) => {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    msg: format!(
                    "`transformer_layers_per_block` has {} entries, expected one per block ({n})",
                    list.len()
                ),
                })
            }
        };
        let reverse_transformer_layers_per_block = match &raw.reverse_transformer_layers_per_block {
            None | Some(serde_json::Value::Null) => {
                transformer_layers_per_block.iter().rev().copied().collect()
            }
            Some(v) => {
                return Err(unsupported(
                    "reverse_transformer_layers_per_block",
                    v,
                    "supported: null",
                ))
            }
        };
        let heads_src = raw
            .num_attention_heads
            .clone()
            .unwrap_or(raw.attention_head_dim.clone());
        let num_attention_heads = heads_src.per_block(n, "attention_head_dim", path)?;
        for (i, (&c, &h)) in raw
            .block_out_channels
            .iter()
            .zip(&num_attention_heads)
            .enumerate()
        {
            if h == 0 || c % h != 0 {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    msg: format!("block {i}: {c} channels do not split into {h} attention heads"),
                });
            }
        }
        for (key, k) in [
            ("conv_in_kernel", raw.conv_in_kernel),
            ("conv_out_kernel", raw.conv_out_kernel),
        ] {
            if k % 2 == 0 || k > MAX_KERNEL {
                return Err(unsupported(
                    key,
                    &k,
                    &format!("an odd kernel size up to {MAX_KERNEL} is required"),
                ));
            }
        }
        let layers_per_block = raw
            .layers_per_block
            .per_block(n, "layers_per_block", path)?;
        let cross_attention_dim =
            raw.cross_attention_dim
                .per_block(n, "cross_attention_dim", path)?;
        for (key, list, max) in [
            ("layers_per_block", &layers_per_block, MAX_LAYERS),
            ("cross_attention_dim", &cross_attention_dim, MAX_CHANNELS),
            ("attention_head_dim", &num_attention_heads, MAX_HEADS),
        ] {
            if let Some(&v) = list.iter().find(|&&v| v == 0 || v > max) {
                return Err(invalid(format!("`{key}` holds {v}: expected 1 to {max}")));
            }
        }
        let sample_size = match &raw.sample_size {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let side = |x: &serde_json::Value| {
                    x.as_u64()
                        .filter(|&s| s >= 1 && s <= MAX_SAMPLE_SIZE as u64)
                        .map(|s| s as usize)
                };
                let bad = || {
                    invalid(format!(
                        "`sample_size` = {v}: expected a latent size from 1 to {MAX_SAMPLE_SIZE}, or a [height, width] pair of them"
                    ))
                };
                match v.as_array() {
                    // Non-square sizes are valid in diffusers; there is no square default then.
                    Some(pair) if pair.len() == 2 => {
                        let (h, w) = (
                            side(&pair[0]).ok_or_else(bad)?,
                            side(&pair[1]).ok_or_else(bad)?,
                        );
                        (h == w).then_some(h)
                    }
                    Some(_) => return Err(bad()),
                    None => Some(side(v).ok_or_else(bad)?),
                }
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            center_input_sample: raw.center_input_sample,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            down_block_types,
            up_block_types,
            has_mid_block,
            layers_per_block,
            cross_attention_dim,
            block_out_channels: raw.block_out_channels,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            norm_num_groups,
            norm_eps: raw.norm_eps,
            transformer_layers_per_block,
            reverse_transformer_layers_per_block,
            num_attention_heads,
            use_linear_projection: raw.use_linear_projection,
            text_time,
            resnet_out_scale_factor: raw.resnet_out_scale_factor,
            conv_in_kernel: raw.conv_in_kernel,
            conv_out_kernel: raw.conv_out_kernel,
            sample_size,
        })
    }

    /// Time embedding width (`block_out_channels[0] * 4`).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// How many times the U-Net halves the resolution.
    pub fn num_downsamples(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}
