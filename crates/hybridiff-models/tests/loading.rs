//! Weight-file layouts diffusers writes (sharded with an index, `fp16` variant) and
//! the errors for checkpoints that do not match their config, on copies of the tiny
//! SDXL U-Net written into scratch folders.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hybridiff_models::unet::UNet2DConditionModel;
use hybridiff_models::{Conditioning, Denoiser, Error};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

fn unet_dir() -> PathBuf {
    fixtures().join("tiny-sdxl/unet")
}

/// A scratch U-Net folder holding the fixture's config.json and no weights.
fn folder_with_config() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        unet_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

fn fixture_weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(unet_dir().join(WEIGHTS), &Device::Cpu).unwrap()
}

/// The fixture's forward inputs (conditional branch).
fn inputs() -> (Tensor, f64, Conditioning) {
    let dev = Device::Cpu;
    let root = fixtures().join("tiny-sdxl");
    let inputs = candle_core::safetensors::load(root.join("inputs.safetensors"), &dev).unwrap();
    let exp =
        candle_core::safetensors::load(root.join("expected/denoiser_forward.safetensors"), &dev)
            .unwrap();
    let cond = Conditioning {
        prompt_embeds: inputs["prompt_embeds"].clone(),
        pooled: Some(inputs["pooled_prompt_embeds"].clone()),
        time_ids: Some(exp["time_ids"].clone()),
    };
    let t = exp["timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    (exp["sample"].clone(), t, cond)
}

fn forward(dir: &Path, dtype: DType) -> Tensor {
    let unet = UNet2DConditionModel::load(dir, dtype, &Device::Cpu).unwrap();
    assert_eq!(unet.dtype(), dtype);
    let (sample, t, cond) = inputs();
    unet.forward(&sample.to_dtype(dtype).unwrap(), t, &cond)
        .unwrap()
}

/// Writes `weights` as two shards plus a diffusers index; `variant` is "" or ".fp16".
/// Returns the shard file names.
fn write_sharded(dir: &Path, weights: &HashMap<String, Tensor>, variant: &str) -> [String; 2] {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let files =
        [1, 2].map(|i| format!("diffusion_pytorch_model{variant}-0000{i}-of-00002.safetensors"));
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0;
    for (i, name) in names.iter().enumerate() {
        // Interleave, so that both shards hold tensors of every block.
        let s = i % 2;
        let t = &weights[*name];
        total_size += t.elem_count() * t.dtype().size_in_bytes();
        shards[s].insert((*name).clone(), t.clone());
        weight_map.insert((*name).clone(), serde_json::Value::from(files[s].clone()));
    }
    for (shard, file) in shards.iter().zip(&files) {
        assert!(!shard.is_empty());
        candle_core::safetensors::save(shard, dir.join(file)).unwrap();
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    std::fs::write(
        dir.join(format!(
            "diffusion_pytorch_model.safetensors.index{variant}.json"
        )),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    files
}

fn to_f16(weights: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    weights
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect()
}

#[test]
fn sharded_checkpoint_loads_and_matches_the_single_file_exactly() {
    let tmp = folder_with_config();
    write_sharded(tmp.path(), &fixture_weights(), "");
    assert!(!tmp.path().join(WEIGHTS).exists());
    let sharded = forward(tmp.path(), DType::F32);
    let single = forward(&unet_dir(), DType::F32);
    assert_eq!(max_abs_diff(&sharded, &single), 0.0);
    assert!(max_abs(&single) > 0.1);
}

#[test]
fn sharded_index_missing_a_shard_names_the_shard() {
    let tmp = folder_with_config();
    let files = write_sharded(tmp.path(), &fixture_weights(), "");
    std::fs::remove_file(tmp.path().join(&files[1])).unwrap();
    let err = UNet2DConditionModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("a missing shard must fail");
    let msg = err.to_string();
    assert!(msg.contains(&files[1]), "{msg}");
}

#[test]
fn fp16_variant_loads_in_f32_and_f16() {
    let tmp = folder_with_config();
    let w16 = to_f16(&fixture_weights());
    candle_core::safetensors::save(
        &w16,
        tmp.path().join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    assert!(!tmp.path().join(WEIGHTS).exists());
    let reference = forward(&unet_dir(), DType::F32);
    let scale = max_abs(&reference).max(1.0);

    let from_f16 = forward(tmp.path(), DType::F32);
    assert_eq!(from_f16.dtype(), DType::F32);
    let rel = max_abs_diff(&from_f16, &reference) / scale;
    println!("fp16 weights, f32 compute: max abs diff / max(1, max|ref|) = {rel:e}");
    assert!(rel < 1e-2, "relative diff {rel}");
    // f16-rounded weights really were loaded (not the f32 file next door).
    assert!(rel > 0.0);

    let in_f16 = forward(tmp.path(), DType::F16);
    assert_eq!(in_f16.dtype(), DType::F16);
    let rel16 = max_abs_diff(&in_f16, &reference) / scale;
    println!("fp16 weights, f16 compute: max abs diff / max(1, max|ref|) = {rel16:e}");
    assert!(rel16.is_finite() && rel16 < 5e-2, "relative diff {rel16}");
}

#[test]
fn sharded_fp16_variant_loads() {
    let tmp = folder_with_config();
    let w16 = to_f16(&fixture_weights());
    write_sharded(tmp.path(), &w16, ".fp16");
    let reference = forward(&unet_dir(), DType::F32);
    let got = forward(tmp.path(), DType::F32);
    let rel = max_abs_diff(&got, &reference) / max_abs(&reference).max(1.0);
    assert!(rel < 1e-2 && rel > 0.0, "relative diff {rel}");
}

#[test]
fn single_file_is_preferred_over_fp16_variant() {
    // diffusers loads the f32 file unless asked for the variant.
    let tmp = folder_with_config();
    let w = fixture_weights();
    candle_core::safetensors::save(&w, tmp.path().join(WEIGHTS)).unwrap();
    candle_core::safetensors::save(
        &to_f16(&w),
        tmp.path().join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let got = forward(tmp.path(), DType::F32);
    let reference = forward(&unet_dir(), DType::F32);
    assert_eq!(max_abs_diff(&got, &reference), 0.0);
}

#[test]
fn wrong_shape_names_tensor_expected_shape_and_file() {
    let name = "down_blocks.1.attentions.0.proj_in.weight";
    let mut w = fixture_weights();
    assert_eq!(w[name].dims(), [64, 64]);
    w.insert(
        name.to_string(),
        Tensor::zeros((64, 32), DType::F32, &Device::Cpu).unwrap(),
    );

    let tmp = folder_with_config();
    candle_core::safetensors::save(&w, tmp.path().join(WEIGHTS)).unwrap();
    let err = UNet2DConditionModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("a mis-shaped tensor must fail");
    assert!(matches!(err, Error::Weights(_)), "{err:?}");
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains(name), "{msg}");
    assert!(msg.contains("[64, 64]"), "expected shape missing: {msg}");
    assert!(msg.contains("[64, 32]"), "actual shape missing: {msg}");
    assert!(
        msg.contains(&tmp.path().join(WEIGHTS).display().to_string()),
        "file missing: {msg}"
    );

    // Sharded: the message names the shard that holds the tensor.
    let tmp = folder_with_config();
    let files = write_sharded(tmp.path(), &w, "");
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let shard = &files[names.iter().position(|n| *n == name).unwrap() % 2];
    let other = &files[1 - names.iter().position(|n| *n == name).unwrap() % 2];
    let msg = UNet2DConditionModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("a mis-shaped tensor must fail")
        .to_string();
    assert!(msg.contains(name) && msg.contains("[64, 64]"), "{msg}");
    assert!(msg.contains(shard.as_str()), "shard {shard} missing: {msg}");
    assert!(!msg.contains(other.as_str()), "wrong shard named: {msg}");
}

#[test]
fn missing_tensor_is_named() {
    let name = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight";
    let mut w = fixture_weights();
    assert!(w.remove(name).is_some());
    let tmp = folder_with_config();
    candle_core::safetensors::save(&w, tmp.path().join(WEIGHTS)).unwrap();
    let err = UNet2DConditionModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("a missing tensor must fail");
    assert!(matches!(err, Error::Weights(_)), "{err:?}");
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains(name), "{msg}");
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn folder_without_weights_says_what_it_looked_for() {
    let tmp = folder_with_config();
    let err = UNet2DConditionModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("no weights must fail");
    let msg = err.to_string();
    assert!(msg.contains(WEIGHTS), "{msg}");
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
}
