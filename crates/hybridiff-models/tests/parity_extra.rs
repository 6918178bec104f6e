//! Parity with diffusers on more denoiser layouts: SD 1.5 and SD 2.1 U-Nets, a U-Net
//! with unusual config values, and an SD3.5-medium-style MMDiT (RMS qk norm, dual
//! attention). Fixtures: `tests/fixtures/models/*`, made by `tools/make_model_fixtures.py`.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hybridiff_models::mmdit::SD3Transformer2DModel;
use hybridiff_models::unet::UNet2DConditionModel;
use hybridiff_models::{Conditioning, Denoiser};

fn models_dir() -> PathBuf {
    fixtures().join("models")
}

fn expected(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn timestep(exp: &HashMap<String, Tensor>) -> f64 {
    exp["timestep"].to_vec1::<f32>().unwrap()[0] as f64
}

fn unet_cond(exp: &HashMap<String, Tensor>) -> Conditioning {
    Conditioning {
        prompt_embeds: exp["encoder_hidden_states"].clone(),
        pooled: None,
        time_ids: None,
    }
}

/// Loads the U-Net in `dir`, runs the forward on the inputs stored in
/// `models/<fixture>/expected.safetensors` and compares with diffusers' output.
/// Returns the model for further checks.
fn check_unet(dir: &Path, fixture: &str) -> UNet2DConditionModel {
    let what = format!("{fixture} ({})", dir.display());
    let unet = UNet2DConditionModel::load(dir, DType::F32, &Device::Cpu).unwrap();
    let exp = expected(&models_dir().join(fixture));
    let got = unet
        .forward(&exp["sample"], timestep(&exp), &unet_cond(&exp))
        .unwrap();
    assert_close(&got, &exp["out"], &what);
    unet
}

#[test]
fn unet_sd15_layout_matches_diffusers() {
    let unet = check_unet(&models_dir().join("unet-sd15"), "unet-sd15");
    let c = &unet.config;
    assert!(
        !c.use_linear_projection,
        "SD 1.5 uses conv proj_in/proj_out"
    );
    assert!(c.text_time.is_none());
    assert_eq!(c.layers_per_block, [2, 2, 2]);
    assert_eq!(c.num_attention_heads, [2, 2, 2]);
    // The batch holds two different samples and contexts: they must stay apart.
    let exp = expected(&models_dir().join("unet-sd15"));
    assert_eq!(exp["sample"].dim(0).unwrap(), 2);
    let out = &exp["out"];
    let d = max_abs_diff(&out.narrow(0, 0, 1).unwrap(), &out.narrow(0, 1, 1).unwrap());
    assert!(d > 1e-2, "batch items too similar ({d})");
    let one = unet
        .forward(
            &exp["sample"].narrow(0, 1, 1).unwrap(),
            timestep(&exp),
            &Conditioning {
                prompt_embeds: exp["encoder_hidden_states"].narrow(0, 1, 1).unwrap(),
                pooled: None,
                time_ids: None,
            },
        )
        .unwrap();
    assert_close(
        &one,
        &out.narrow(0, 1, 1).unwrap(),
        "unet-sd15 batch[1] alone",
    );
}

#[test]
fn unet_sd21_layout_matches_diffusers() {
    let unet = check_unet(&models_dir().join("unet-sd21"), "unet-sd21");
    let c = &unet.config;
    assert!(c.use_linear_projection);
    assert_eq!(c.num_attention_heads, [1, 2, 4]);
    assert_eq!(c.layers_per_block, [1, 1, 1]);
}

#[test]
fn unet_odd_config_matches_diffusers() {
    let unet = check_unet(&models_dir().join("unet-odd"), "unet-odd");
    let c = &unet.config;
    assert_eq!(c.downsample_padding, 0);
    assert_eq!(c.layers_per_block, [1, 2, 1]);
    assert_eq!(c.transformer_layers_per_block, [2, 1, 1]);
    assert_eq!(c.reverse_transformer_layers_per_block, [1, 1, 2]);
    assert!(c.center_input_sample);
    assert_eq!(c.mid_block_scale_factor, 1.5);
    assert_eq!(c.resnet_out_scale_factor, 2.0);
    assert_eq!((c.conv_in_kernel, c.conv_out_kernel), (5, 1));
    assert!(!c.flip_sin_to_cos);
    let exp = expected(&models_dir().join("unet-odd"));
    assert_eq!(exp["sample"].dims(), [1, 4, 16, 24]);
    assert_eq!(exp["out"].dims(), [1, 6, 16, 24]);
}

#[test]
fn unet_odd_config_module_by_module_matches_forward() {
    // Per-block layer counts change how many skips each block pushes and pops.
    let dir = models_dir().join("unet-odd");
    let unet = UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let exp = expected(&dir);
    let cond = unet_cond(&exp);
    let (_, state) = run_modules(&unet, &exp["sample"], timestep(&exp), &cond);
    assert!(state.skips.is_empty(), "every skip residual consumed");
    let got = unet.end(state).unwrap();
    assert_close(&got, &exp["out"], "unet-odd module by module");
}

#[test]
fn unet_explicit_num_attention_heads_overrides_attention_head_dim() {
    // diffusers 0.42.1 refuses `num_attention_heads` in a U-Net config (a historical
    // naming issue); the intended meaning is "heads per block", with
    // `attention_head_dim` then unused by the cross-attention blocks. Same weights,
    // heads given the new way, and a different (valid) `attention_head_dim`.
    let tmp = edited_copy(
        "unet-odd",
        |cfg| {
            assert_eq!(cfg["attention_head_dim"], serde_json::json!([2, 3, 4]));
            cfg["num_attention_heads"] = serde_json::json!([2, 3, 4]);
            cfg["attention_head_dim"] = serde_json::json!(4);
        },
        None,
    );
    let unet = check_unet(tmp.path(), "unet-odd");
    assert_eq!(unet.config.num_attention_heads, [2, 3, 4]);
}

#[test]
fn unet_head_count_is_not_ignored() {
    // Guards the fixture's sensitivity: the same weights with other head counts must
    // give a different output, or a head-split bug could pass unnoticed.
    let tmp = edited_copy(
        "unet-sd21",
        |cfg| cfg["attention_head_dim"] = serde_json::json!([2, 4, 2]),
        None,
    );
    let unet = UNet2DConditionModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let exp = expected(&models_dir().join("unet-sd21"));
    let got = unet
        .forward(&exp["sample"], timestep(&exp), &unet_cond(&exp))
        .unwrap();
    let d = max_abs_diff(&got, &exp["out"]);
    assert!(d > 1e-2, "head count barely matters ({d})");
}

fn mmdit_cond(exp: &HashMap<String, Tensor>, suffix: &str) -> Conditioning {
    Conditioning {
        prompt_embeds: exp[&format!("encoder_hidden_states{suffix}")].clone(),
        pooled: Some(exp[&format!("pooled_projections{suffix}")].clone()),
        time_ids: None,
    }
}

#[test]
fn mmdit_sd35_matches_diffusers() {
    let dir = models_dir().join("mmdit-sd35");
    let model = SD3Transformer2DModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let c = &model.config;
    assert_eq!(c.qk_norm.as_deref(), Some("rms_norm"));
    assert_eq!(c.dual_attention_layers, [0, 1]);
    assert_eq!(c.num_layers, 4);
    let exp = expected(&dir);
    let t = timestep(&exp);
    for (suffix, what) in [
        ("", "mmdit-sd35 16x16 batch 2"),
        ("_wide", "mmdit-sd35 8x12"),
    ] {
        let got = model
            .forward(
                &exp[&format!("sample{suffix}")],
                t,
                &mmdit_cond(&exp, suffix),
            )
            .unwrap();
        assert_close(&got, &exp[&format!("out{suffix}")], what);
    }
}

#[test]
fn mmdit_sd35_module_by_module_matches_forward() {
    let dir = models_dir().join("mmdit-sd35");
    let model = SD3Transformer2DModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let exp = expected(&dir);
    let cond = mmdit_cond(&exp, "");
    let (_, state) = run_modules(&model, &exp["sample"], timestep(&exp), &cond);
    let got = model.end(state).unwrap();
    assert_close(&got, &exp["out"], "mmdit-sd35 module by module");
}

/// A scratch copy of `models/<fixture>` with `edit` applied to its config.json and,
/// when given, its weights replaced.
fn edited_copy(
    fixture: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    weights: Option<&HashMap<String, Tensor>>,
) -> tempfile::TempDir {
    let src = models_dir().join(fixture);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let dst = tmp.path().join("diffusion_pytorch_model.safetensors");
    match weights {
        Some(w) => candle_core::safetensors::save(w, &dst).unwrap(),
        None => {
            std::fs::copy(src.join("diffusion_pytorch_model.safetensors"), &dst).unwrap();
        }
    }
    tmp
}

#[test]
fn unet_odd_options_each_move_the_output() {
    // If the engine ignored one of these options, the parity test would have to fail:
    // flipping it on the same weights changes diffusers' maths well beyond tolerance.
    let exp = expected(&models_dir().join("unet-odd"));
    let tol = 1e-4 * max_abs(&exp["out"]).max(1.0);
    for (key, value) in [
        ("center_input_sample", serde_json::json!(false)),
        ("mid_block_scale_factor", serde_json::json!(1.0)),
        ("downsample_padding", serde_json::json!(1)),
        ("flip_sin_to_cos", serde_json::json!(true)),
        ("freq_shift", serde_json::json!(0)),
    ] {
        let tmp = edited_copy("unet-odd", |c| c[key] = value, None);
        let unet = UNet2DConditionModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
        let got = unet
            .forward(&exp["sample"], timestep(&exp), &unet_cond(&exp))
            .unwrap();
        let d = max_abs_diff(&got, &exp["out"]);
        println!("unet-odd with {key} flipped: max abs diff {d:e}");
        assert!(d > 10.0 * tol, "{key}: output barely changes ({d})");
    }
    // diffusers' DownBlock2D / CrossAttnDownBlock2D / UpBlock2D / CrossAttnUpBlock2D do
    // not receive `resnet_out_scale_factor`; the value must not matter.
    let tmp = edited_copy(
        "unet-odd",
        |c| c["resnet_out_scale_factor"] = serde_json::json!(1.0),
        None,
    );
    let unet = UNet2DConditionModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let got = unet
        .forward(&exp["sample"], timestep(&exp), &unet_cond(&exp))
        .unwrap();
    assert_close(&got, &exp["out"], "unet-odd with resnet_out_scale_factor 1");
}

#[test]
fn mmdit_sd35_features_each_move_the_output() {
    // Without RMS qk norms, with unit norm weights, or with the second attention
    // silenced, the output must move well beyond tolerance.
    let dir = models_dir().join("mmdit-sd35");
    let exp = expected(&dir);
    let tol = 1e-4 * max_abs(&exp["out"]).max(1.0);
    let weights = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let edit_weights = |pred: &dyn Fn(&str) -> bool, f: &dyn Fn(&Tensor) -> Tensor| {
        let mut n = 0;
        let w: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| {
                if pred(k) {
                    n += 1;
                    (k.clone(), f(v))
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect();
        assert!(n > 0);
        w
    };
    let unit_norms = edit_weights(&|k| k.contains(".norm_") && k.ends_with(".weight"), &|v| {
        v.ones_like().unwrap()
    });
    let no_attn2 = edit_weights(&|k| k.contains(".attn2.to_out."), &|v| {
        v.zeros_like().unwrap()
    });
    let cases: [(&str, tempfile::TempDir); 3] = [
        (
            "qk_norm null",
            edited_copy(
                "mmdit-sd35",
                |c| c["qk_norm"] = serde_json::Value::Null,
                None,
            ),
        ),
        (
            "unit qk-norm weights",
            edited_copy("mmdit-sd35", |_| {}, Some(&unit_norms)),
        ),
        (
            "attn2 silenced",
            edited_copy("mmdit-sd35", |_| {}, Some(&no_attn2)),
        ),
    ];
    for (what, tmp) in &cases {
        let model = SD3Transformer2DModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
        let got = model
            .forward(&exp["sample"], timestep(&exp), &mmdit_cond(&exp, ""))
            .unwrap();
        let d = max_abs_diff(&got, &exp["out"]);
        println!("mmdit-sd35 with {what}: max abs diff {d:e}");
        assert!(d > 10.0 * tol, "{what}: output barely changes ({d})");
    }
}
