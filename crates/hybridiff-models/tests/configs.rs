//! The full-size configs in `configs/` (`hybridiff init` random weights for
//! tools/gpu-check.sh) load, and hold the published layout of SDXL-base's U-Net and
//! SD3-medium's MMDiT.

use std::path::PathBuf;

use hybridiff_models::mmdit::MMDiTConfig;
use hybridiff_models::unet::UNetConfig;

fn configs() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs"))
}

#[test]
fn sdxl_base_unet_config_loads_with_sdxls_layout() {
    let c = UNetConfig::from_file(&configs().join("sdxl-base-unet.json")).unwrap();
    assert_eq!(c.block_out_channels, [320, 640, 1280]);
    assert_eq!(c.transformer_layers_per_block, [1, 2, 10]);
    assert_eq!(c.cross_attention_dim, [2048; 3]);
    // 64-dimensional heads: 5, 10 and 20 of them.
    assert_eq!(c.num_attention_heads, [5, 10, 20]);
    // 1280 pooled CLIP-G dims + 6 time ids x 256.
    assert_eq!(c.text_time, Some((256, 2816)));
    assert_eq!(c.sample_size, Some(128));
}

#[test]
fn sd3_medium_transformer_config_loads_with_sd3s_layout() {
    let c = MMDiTConfig::from_file(&configs().join("sd3-medium-transformer.json")).unwrap();
    assert_eq!(
        (c.num_layers, c.num_attention_heads, c.attention_head_dim),
        (24, 24, 64)
    );
    assert_eq!(c.caption_projection_dim, 1536);
    assert_eq!(
        (c.joint_attention_dim, c.pooled_projection_dim),
        (4096, 2048)
    );
    assert_eq!((c.patch_size, c.in_channels, c.sample_size), (2, 16, 128));
    assert_eq!(c.pos_embed_max_size, Some(192));
    assert!(c.dual_attention_layers.is_empty() && c.qk_norm.is_none());
}
