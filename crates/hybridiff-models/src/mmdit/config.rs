//! `transformer/config.json` of diffusers' `SD3Transformer2DModel`, validated.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// The config of an SD3 / SD3.5 MMDiT, with diffusers' defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct MMDiTConfig {
    /// The latent size the model was trained at; sets the base of the position grid.
    #[serde(default = "d_128")]
    pub sample_size: usize,
    #[serde(default = "d_2")]
    pub patch_size: usize,
    #[serde(default = "d_16")]
    pub in_channels: usize,
    #[serde(default = "d_18")]
    pub num_layers: usize,
    #[serde(default = "d_64")]
    pub attention_head_dim: usize,
    #[serde(default = "d_18")]
    pub num_attention_heads: usize,
    #[serde(default = "d_4096")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_1152")]
    pub caption_projection_dim: usize,
    #[serde(default = "d_2048")]
    pub pooled_projection_dim: usize,
    /// `null` means `in_channels`, as in diffusers; see [`MMDiTConfig::out_channels`].
    #[serde(default = "d_out")]
    pub out_channels: Option<usize>,
    /// `null` selects PatchEmbed's interpolating path instead of SD3's cropping.
    #[serde(default = "d_96")]
    pub pos_embed_max_size: Option<usize>,
    /// Blocks with a second, image-only attention (`attn2`), as in SD3.5 medium.
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `null` (SD3) or `"rms_norm"` (SD3.5).
    #[serde(default)]
    pub qk_norm: Option<String>,
    /// diffusers' `_class_name`, checked so that another transformer's folder is refused.
    #[serde(default, rename = "_class_name")]
    pub class_name: Option<String>,
    /// The file this config came from, for error messages (not a JSON key).
    #[serde(skip)]
    pub path: PathBuf,
}

fn d_128() -> usize {
    128
}
fn d_2() -> usize {
    2
}
fn d_16() -> usize {
    16
}
fn d_18() -> usize {
    18
}
fn d_64() -> usize {
    64
}
fn d_4096() -> usize {
    4096
}
fn d_1152() -> usize {
    1152
}
fn d_2048() -> usize {
    2048
}
fn d_out() -> Option<usize> {
    Some(16)
}
fn d_96() -> Option<usize> {
    Some(96)
}

impl MMDiTConfig {
    /// Reads and validates `transformer/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut c: MMDiTConfig = crate::weights::read_config(path)?;
        c.path = path.to_path_buf();
        c.validate()?;
        Ok(c)
    }

    /// Rejects values this engine does not implement or that cannot build a model;
    /// errors name `self.path` and the key.
    pub fn validate(&self) -> Result<()> {
        let path = &self.path;
        let unsupported = |key: &str, value: String, hint: &str| Error::Unsupported {
            path: path.clone(),
            key: key.to_string(),
            value,
            hint: hint.to_string(),
        };
        let invalid = |msg: String| Error::Config {
            path: path.clone(),
            msg,
        };
        if let Some(name) = &self.class_name {
            if name != "SD3Transformer2DModel" {
                return Err(unsupported(
                    "_class_name",
                    format!("{name:?}"),
                    "this loader implements SD3Transformer2DModel only",
                ));
            }
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => {
                return Err(unsupported(
                    "qk_norm",
                    format!("{other:?}"),
                    "supported: null (SD3) or \"rms_norm\" (SD3.5)",
                ))
            }
        }
        use crate::unet::{MAX_CHANNELS, MAX_LAYERS, MAX_SAMPLE_SIZE};
        // Bounds keep every product of sizes far from overflow; SD3.5 large has 38
        // blocks of 38 heads of 64, a 4096-wide context and a 192 position grid.
        for (key, v, max) in [
            ("patch_size", self.patch_size, 64),
            ("in_channels", self.in_channels, MAX_CHANNELS),
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("attention_head_dim", self.attention_head_dim, MAX_CHANNELS),
            ("num_attention_heads", self.num_attention_heads, 1024),
            (
                "joint_attention_dim",
                self.joint_attention_dim,
                MAX_CHANNELS,
            ),
            (
                "caption_projection_dim",
                self.caption_projection_dim,
                MAX_CHANNELS,
            ),
            (
                "pooled_projection_dim",
                self.pooled_projection_dim,
                MAX_CHANNELS,
            ),
            ("out_channels", self.out_channels(), MAX_CHANNELS),
            ("sample_size", self.sample_size, MAX_SAMPLE_SIZE),
        ] {
            if v == 0 || v > max {
                return Err(invalid(format!("`{key}` = {v}: expected 1 to {max}")));
            }
        }
        if let Some(m) = self.pos_embed_max_size {
            if m == 0 || m > 4096 {
                return Err(invalid(format!(
                    "`pos_embed_max_size` = {m}: expected 1 to 4096, or null"
                )));
            }
        }
        let inner = self.inner_dim();
        // The joint attention projects the context with `add_*_proj` of input width
        // `inner_dim`, so diffusers only runs when the two agree.
        if self.caption_projection_dim != inner {
            return Err(invalid(format!(
                "`caption_projection_dim` = {} must equal num_attention_heads * attention_head_dim = {inner}",
                self.caption_projection_dim
            )));
        }
        // Half the width encodes each axis with sin and cos halves.
        if !inner.is_multiple_of(4) {
            return Err(invalid(format!(
                "num_attention_heads * attention_head_dim = {inner} must be divisible by 4 for the 2D sin-cos position embedding"
            )));
        }
        if self.sample_size < self.patch_size {
            return Err(invalid(format!(
                "`sample_size` = {} is smaller than `patch_size` = {}",
                self.sample_size, self.patch_size
            )));
        }
        if let Some(&bad) = self
            .dual_attention_layers
            .iter()
            .find(|&&i| i >= self.num_layers)
        {
            return Err(invalid(format!(
                "`dual_attention_layers` names block {bad}, but `num_layers` is {}",
                self.num_layers
            )));
        }
        Ok(())
    }

    /// Width of the token stream (`num_attention_heads * attention_head_dim`).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels, `in_channels` when the config says `null`.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Whether block `i` has the SD3.5 second attention (`attn2`).
    pub fn is_dual_attention(&self, i: usize) -> bool {
        self.dual_attention_layers.contains(&i)
    }
}
