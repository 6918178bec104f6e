//! Names of the original (LDM / SGM, "A1111" / ComfyUI) checkpoint layout and their
//! diffusers counterparts, which are this engine's module paths.
//!
//! The correspondences are those diffusers' `single_file_utils` applies when it converts a
//! checkpoint (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), written here as module
//! prefix pairs derived from the component's config so that they run in both directions:
//! checkpoint -> diffusers for loading, diffusers -> checkpoint for kohya LoRA files that
//! name SGM modules (`lora_unet_input_blocks_4_1_...`).

use std::collections::HashMap;

use crate::unet::{BlockKind, UNetConfig};
use crate::weights::Transform;

/// How the part of a name after a module prefix is renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Identical below the prefix.
    Plain,
    /// An LDM U-Net `ResBlock` (`in_layers.0` = `norm1`, ...).
    UnetResnet,
    /// An LDM VAE `ResnetBlock` (`nin_shortcut` = `conv_shortcut`).
    VaeResnet,
    /// An LDM VAE `AttnBlock` (`q` = `to_q`, `proj_out` = `to_out.0`; 1x1 conv weights).
    VaeAttention,
}

const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];
const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut", "conv_shortcut")];
const VAE_ATTENTION: &[(&str, &str)] = &[
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
];

impl Kind {
    fn renames(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Plain => &[],
            Kind::UnetResnet => UNET_RESNET,
            Kind::VaeResnet => VAE_RESNET,
            Kind::VaeAttention => VAE_ATTENTION,
        }
    }
}

/// Module prefix pairs of one component, usable both ways.
#[derive(Debug, Clone, Default)]
pub struct PrefixMap {
    to_diffusers: HashMap<String, (String, Kind)>,
    to_ldm: HashMap<String, (String, Kind)>,
}

/// Renames the first segments of `rest` by `table` (`from` -> `to`, or the reverse).
fn rename_rest(rest: &str, kind: Kind, forward: bool) -> String {
    for (a, b) in kind.renames() {
        let (from, to) = if forward { (a, b) } else { (b, a) };
        if rest == *from {
            return to.to_string();
        }
        if let Some(tail) = rest.strip_prefix(from).and_then(|t| t.strip_prefix('.')) {
            return format!("{to}.{tail}");
        }
    }
    rest.to_string()
}

/// The longest prefix of `key` (at a `.` boundary) found in `map`, with the rest.
fn split_longest<'a, V>(map: &'a HashMap<String, V>, key: &'a str) -> Option<(&'a V, &'a str)> {
    let mut best = None;
    for (i, c) in key.char_indices() {
        if c == '.' {
            if let Some(v) = map.get(&key[..i]) {
                best = Some((v, &key[i + 1..]));
            }
        }
    }
    best
}

impl PrefixMap {
    fn add(&mut self, ldm: impl Into<String>, diffusers: impl Into<String>, kind: Kind) {
        let (ldm, diffusers) = (ldm.into(), diffusers.into());
        self.to_diffusers
            .insert(ldm.clone(), (diffusers.clone(), kind));
        self.to_ldm.insert(diffusers, (ldm, kind));
    }

    /// The diffusers name of checkpoint name `key` (without the component's prefix), and
    /// whether it is a VAE attention projection (stored as a 1x1 convolution).
    pub fn to_diffusers(&self, key: &str) -> Option<(String, bool)> {
        let ((prefix, kind), rest) = split_longest(&self.to_diffusers, key)?;
        let name = format!("{prefix}.{}", rename_rest(rest, *kind, true));
        Some((name, *kind == Kind::VaeAttention))
    }

    /// The checkpoint name of diffusers name `key` (a weight or a module path).
    pub fn to_ldm(&self, key: &str) -> Option<String> {
        if let Some((ldm, _)) = self.to_ldm.get(key) {
            return Some(ldm.clone());
        }
        let ((prefix, kind), rest) = split_longest(&self.to_ldm, key)?;
        Some(format!("{prefix}.{}", rename_rest(rest, *kind, false)))
    }

    /// The U-Net of `config` in the LDM layout (`input_blocks.i.j`, `middle_block.i`,
    /// `output_blocks.i.j`, `time_embed`, `label_emb`, `out`), as diffusers'
    /// `convert_ldm_unet_checkpoint` lays it out: each down block's resnets (each followed
    /// by its attention) then its downsampler, one `input_blocks` entry each; the mid
    /// block's resnet, attention, resnet; each up block's resnets (with attention) with the
    /// upsampler in the last entry.
    pub fn unet(config: &UNetConfig) -> Self {
        let mut m = Self::default();
        m.add("time_embed.0", "time_embedding.linear_1", Kind::Plain);
        m.add("time_embed.2", "time_embedding.linear_2", Kind::Plain);
        if config.text_time.is_some() {
            m.add("label_emb.0.0", "add_embedding.linear_1", Kind::Plain);
            m.add("label_emb.0.2", "add_embedding.linear_2", Kind::Plain);
        }
        m.add("input_blocks.0.0", "conv_in", Kind::Plain);
        m.add("out.0", "conv_norm_out", Kind::Plain);
        m.add("out.2", "conv_out", Kind::Plain);
        let n = config.block_out_channels.len();
        let mut i = 1;
        for b in 0..n {
            for l in 0..config.layers_per_block[b] {
                m.add(
                    format!("input_blocks.{i}.0"),
                    format!("down_blocks.{b}.resnets.{l}"),
                    Kind::UnetResnet,
                );
                if config.down_block_types[b] == BlockKind::CrossAttn {
                    m.add(
                        format!("input_blocks.{i}.1"),
                        format!("down_blocks.{b}.attentions.{l}"),
                        Kind::Plain,
                    );
                }
                i += 1;
            }
            if b + 1 != n {
                m.add(
                    format!("input_blocks.{i}.0.op"),
                    format!("down_blocks.{b}.downsamplers.0.conv"),
                    Kind::Plain,
                );
                i += 1;
            }
        }
        if config.has_mid_block {
            m.add("middle_block.0", "mid_block.resnets.0", Kind::UnetResnet);
            m.add("middle_block.1", "mid_block.attentions.0", Kind::Plain);
            m.add("middle_block.2", "mid_block.resnets.1", Kind::UnetResnet);
        }
        let mut i = 0;
        for (b, per_block) in config.layers_per_block.iter().rev().enumerate() {
            let layers = per_block + 1;
            let attn = config.up_block_types[b] == BlockKind::CrossAttn;
            for l in 0..layers {
                m.add(
                    format!("output_blocks.{i}.0"),
                    format!("up_blocks.{b}.resnets.{l}"),
                    Kind::UnetResnet,
                );
                if attn {
                    m.add(
                        format!("output_blocks.{i}.1"),
                        format!("up_blocks.{b}.attentions.{l}"),
                        Kind::Plain,
                    );
                }
                if l + 1 == layers && b + 1 != n {
                    let j = if attn { 2 } else { 1 };
                    m.add(
                        format!("output_blocks.{i}.{j}.conv"),
                        format!("up_blocks.{b}.upsamplers.0.conv"),
                        Kind::Plain,
                    );
                }
                i += 1;
            }
        }
        m
    }

    /// The `AutoencoderKL` with `levels` resolution levels and `layers_per_block` encoder
    /// resnets per level in the LDM layout (`encoder.down.i.block.j`, `decoder.up.i.block.j`
    /// counted from the lowest resolution, `mid.block_1`, `mid.attn_1`, `norm_out`), as
    /// diffusers' `convert_ldm_vae_checkpoint`.
    pub fn vae(levels: usize, layers_per_block: usize) -> Self {
        let mut m = Self::default();
        for side in ["encoder", "decoder"] {
            for name in ["conv_in", "conv_out"] {
                m.add(
                    format!("{side}.{name}"),
                    format!("{side}.{name}"),
                    Kind::Plain,
                );
            }
            m.add(
                format!("{side}.norm_out"),
                format!("{side}.conv_norm_out"),
                Kind::Plain,
            );
            m.add(
                format!("{side}.mid.block_1"),
                format!("{side}.mid_block.resnets.0"),
                Kind::VaeResnet,
            );
            m.add(
                format!("{side}.mid.block_2"),
                format!("{side}.mid_block.resnets.1"),
                Kind::VaeResnet,
            );
            m.add(
                format!("{side}.mid.attn_1"),
                format!("{side}.mid_block.attentions.0"),
                Kind::VaeAttention,
            );
        }
        m.add("quant_conv", "quant_conv", Kind::Plain);
        m.add("post_quant_conv", "post_quant_conv", Kind::Plain);
        for i in 0..levels {
            let up = levels - 1 - i;
            for j in 0..layers_per_block + 1 {
                m.add(
                    format!("encoder.down.{i}.block.{j}"),
                    format!("encoder.down_blocks.{i}.resnets.{j}"),
                    Kind::VaeResnet,
                );
                m.add(
                    format!("decoder.up.{up}.block.{j}"),
                    format!("decoder.up_blocks.{i}.resnets.{j}"),
                    Kind::VaeResnet,
                );
            }
            m.add(
                format!("encoder.down.{i}.downsample.conv"),
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                Kind::Plain,
            );
            m.add(
                format!("decoder.up.{up}.upsample.conv"),
                format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                Kind::Plain,
            );
        }
        m
    }
}

/// The transformers `CLIPTextModel` name of a key of an OpenCLIP text tower (below its
/// prefix, e.g. `transformer.resblocks.3.attn.in_proj_weight`), as diffusers'
/// `convert_open_clip_checkpoint`: the fused `in_proj` gives three tensors (rows of q, k,
/// v, each `hidden` wide), `text_projection` is transposed. Layers at or beyond `layers`
/// are dropped (SD 2.x uses 23 of the 24), as is `logit_scale`; `None` for a key that has
/// no counterpart.
pub fn open_clip_to_diffusers(
    key: &str,
    hidden: usize,
    layers: usize,
) -> Option<Vec<(String, Transform)>> {
    let one = |name: &str, t: Transform| Some(vec![(name.to_string(), t)]);
    match key {
        "token_embedding.weight" => {
            return one(
                "text_model.embeddings.token_embedding.weight",
                Transform::None,
            )
        }
        "positional_embedding" => {
            return one(
                "text_model.embeddings.position_embedding.weight",
                Transform::None,
            )
        }
        "ln_final.weight" => return one("text_model.final_layer_norm.weight", Transform::None),
        "ln_final.bias" => return one("text_model.final_layer_norm.bias", Transform::None),
        "text_projection" => return one("text_projection.weight", Transform::Transpose),
        _ => {}
    }
    let rest = key.strip_prefix("transformer.resblocks.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= layers {
        return None;
    }
    let base = format!("text_model.encoder.layers.{layer}");
    let fused = |kind: &str| {
        Some(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    (
                        format!("{base}.self_attn.{p}.{kind}"),
                        Transform::Rows {
                            start: i * hidden,
                            len: hidden,
                        },
                    )
                })
                .collect(),
        )
    };
    let renamed = match rest {
        "attn.in_proj_weight" => return fused("weight"),
        "attn.in_proj_bias" => return fused("bias"),
        _ => {
            let (module, param) = rest.rsplit_once('.')?;
            let module = match module {
                "ln_1" => "layer_norm1",
                "ln_2" => "layer_norm2",
                "mlp.c_fc" => "mlp.fc1",
                "mlp.c_proj" => "mlp.fc2",
                "attn.out_proj" => "self_attn.out_proj",
                _ => return None,
            };
            format!("{base}.{module}.{param}")
        }
    };
    one(&renamed, Transform::None)
}

/// The OpenCLIP key (below its prefix) that diffusers name `module` (a module path of a
/// `CLIPTextModel`, e.g. `text_model.encoder.layers.3.mlp.fc1`) comes from, for LoRA
/// files that name OpenCLIP modules; q, k and v come from one fused tensor and have none.
pub fn open_clip_module(module: &str) -> Option<String> {
    let rest = module.strip_prefix("text_model.encoder.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let m = match rest {
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        "self_attn.out_proj" => "attn.out_proj",
        _ => return None,
    };
    Some(format!("transformer.resblocks.{layer}.{m}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_like() -> UNetConfig {
        let raw: crate::unet::RawUNetConfig = serde_json::from_str(
            r#"{"block_out_channels": [32, 64, 64, 64], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 32, "attention_head_dim": 2}"#,
        )
        .unwrap();
        UNetConfig::from_raw(raw, std::path::Path::new("t")).unwrap()
    }

    #[test]
    fn unet_names_follow_the_ldm_layout_both_ways() {
        let m = PrefixMap::unet(&sd15_like());
        let cases = [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.bias",
                "down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.11.0.out_layers.3.weight",
                "down_blocks.3.resnets.1.conv2.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.2.emb_layers.1.bias",
                "mid_block.resnets.1.time_emb_proj.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.weight",
                "up_blocks.1.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
                "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight",
            ),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("out.2.bias", "conv_out.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(m.to_diffusers(ldm).unwrap().0, diffusers, "{ldm}");
            assert_eq!(m.to_ldm(diffusers).unwrap(), ldm, "{diffusers}");
        }
        assert_eq!(
            m.to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
                .unwrap(),
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        );
        assert!(m.to_diffusers("label_emb.0.0.weight").is_none());
    }

    #[test]
    fn vae_names_count_decoder_levels_from_the_bottom() {
        let m = PrefixMap::vae(4, 2);
        let (n, squeeze) = m
            .to_diffusers("decoder.up.3.block.2.nin_shortcut.weight")
            .unwrap();
        assert_eq!(n, "decoder.up_blocks.0.resnets.2.conv_shortcut.weight");
        assert!(!squeeze);
        let (n, squeeze) = m
            .to_diffusers("decoder.mid.attn_1.proj_out.weight")
            .unwrap();
        assert_eq!(n, "decoder.mid_block.attentions.0.to_out.0.weight");
        assert!(squeeze);
        assert_eq!(
            m.to_diffusers("encoder.norm_out.bias").unwrap().0,
            "encoder.conv_norm_out.bias"
        );
        assert_eq!(
            m.to_diffusers("decoder.up.0.upsample.conv.weight")
                .unwrap()
                .0,
            "decoder.up_blocks.3.upsamplers.0.conv.weight"
        );
    }

    #[test]
    fn open_clip_splits_in_proj_and_drops_layers_past_the_config() {
        let v =
            open_clip_to_diffusers("transformer.resblocks.1.attn.in_proj_weight", 8, 2).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(
            v[2].0,
            "text_model.encoder.layers.1.self_attn.v_proj.weight"
        );
        assert_eq!(v[2].1, Transform::Rows { start: 16, len: 8 });
        assert!(open_clip_to_diffusers("transformer.resblocks.2.ln_1.weight", 8, 2).is_none());
        assert_eq!(
            open_clip_to_diffusers("transformer.resblocks.0.mlp.c_proj.bias", 8, 2).unwrap()[0].0,
            "text_model.encoder.layers.0.mlp.fc2.bias"
        );
        assert!(open_clip_to_diffusers("logit_scale", 8, 2).is_none());
    }
}
