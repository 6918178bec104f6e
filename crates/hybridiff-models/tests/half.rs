//! The VAE in half precision as pipelines run it (`PipelineVae`): diffusers' `force_upcast`
//! (decode in f32 under f16), a half decode near the f32 reference when the config allows
//! one, and the f32 retry of a half decode that overflows. All on the CPU.

mod common;
use common::*;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::vae::{AutoencoderKL, PipelineVae};

/// Bound on max |f16 decode - f32 reference| / max(1, max |reference|) for the fixtures'
/// VAEs, measured on the 2-core x86-64 CPU test machine at 3.1e-3 (tiny-sdxl) and 4.8e-3
/// (tiny-sd3). f16's unit roundoff is 2^-11 = 4.9e-4; a decode rounds the weights and
/// the activations after each of its ~20 convs, norms and the attention, and those errors
/// add over the depth with partial cancellation, so the error sits at 6-10 roundoffs.
/// 1.5e-2 is 3x the larger: a correct half decode passes on other CPUs and GPUs (other
/// summation orders), while a wrong op (a missing scale, an f16 overflow) is off by order
/// 1 and fails.
const VAE_F16_TOL: f32 = 1.5e-2;

/// The fixture's latents and the f32 image diffusers decoded from them.
fn reference(model: &str) -> (Tensor, Tensor) {
    let path = fixtures()
        .join(model)
        .join("expected/vae_decode.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    (t["latents"].clone(), t["image"].clone())
}

/// A copy of the fixture's `vae/` folder in `dst` with `force_upcast` set to `upcast` and
/// the weights passed through `edit`.
fn vae_copy(model: &str, dst: &Path, upcast: bool, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let src = fixtures().join(model).join("vae");
    std::fs::create_dir_all(dst).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["force_upcast"] = serde_json::Value::Bool(upcast);
    std::fs::write(dst.join("config.json"), config.to_string()).unwrap();
    let file = "diffusion_pytorch_model.safetensors";
    let mut weights: Vec<(String, Tensor)> =
        candle_core::safetensors::load(src.join(file), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    edit(&mut weights);
    let weights: std::collections::HashMap<_, _> = weights.into_iter().collect();
    candle_core::safetensors::save(&weights, dst.join(file)).unwrap();
}

#[test]
fn a_force_upcast_vae_decodes_in_f32_under_f16() {
    for model in ["tiny-sdxl", "tiny-sd3"] {
        let dir = fixtures().join(model).join("vae");
        let vae = PipelineVae::load(&dir, DType::F16, &Device::Cpu).unwrap();
        assert!(
            vae.config.force_upcast,
            "{model}: the fixture sets force_upcast"
        );
        assert_eq!(vae.dtype(), DType::F32, "{model}");
        let (latents, _) = reference(model);
        // The pipeline hands over f16 latents under --dtype f16.
        let got = vae
            .decode_latents(&latents.to_dtype(DType::F16).unwrap())
            .unwrap();
        let f32_vae = AutoencoderKL::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let want = f32_vae
            .decode_latents(&latents.to_dtype(DType::F16).unwrap())
            .unwrap();
        assert_eq!(got.dtype(), DType::F32, "{model}");
        assert_eq!(
            max_abs_diff(&got, &want),
            0.0,
            "{model}: the upcast decode is the f32 decode"
        );
        assert_eq!(vae.f32_retries(), 0);
    }
    // f32 pipelines and bf16 ones (diffusers upcasts f16 only) keep their dtype.
    let config =
        hybridiff_models::vae::VaeConfig::from_file(&fixtures().join("tiny-sdxl/vae/config.json"))
            .unwrap();
    assert_eq!(config.decode_dtype(DType::F32), DType::F32);
    assert_eq!(config.decode_dtype(DType::BF16), DType::BF16);
}

#[test]
fn a_vae_without_force_upcast_decodes_in_f16_near_the_f32_reference() {
    let tmp = tempfile::tempdir().unwrap();
    for model in ["tiny-sdxl", "tiny-sd3"] {
        let dir = tmp.path().join(model);
        vae_copy(model, &dir, false, |_| {});
        let vae = PipelineVae::load(&dir, DType::F16, &Device::Cpu).unwrap();
        assert_eq!(vae.dtype(), DType::F16, "{model}");
        let (latents, want) = reference(model);
        let got = vae.decode_latents(&latents).unwrap();
        assert_eq!(got.dtype(), DType::F16, "{model}: decoded in f16");
        assert_eq!(vae.f32_retries(), 0, "{model}: no overflow, no retry");
        let scale = max_abs(&want).max(1.0);
        let rel = max_abs_diff(&got, &want) / scale;
        println!("{model} vae decode f16 vs f32 reference: max abs diff / max(1, max|ref|) = {rel:e} (bound {VAE_F16_TOL:e})");
        assert!(rel < VAE_F16_TOL, "{model}: {rel} >= {VAE_F16_TOL}");
        // Not the f32 decode by accident: f16 rounding shows.
        assert!(
            rel > 0.0,
            "{model}: an f16 decode equal to f32's was not in f16"
        );
    }
}

#[test]
fn a_half_decode_that_overflows_is_redone_in_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vae");
    // Finite weights that f16 can hold (max 6e4 < 65504) but whose products overflow it:
    // the decoder's first conv yields values past 65504 (inf in f16, then NaN), which f32
    // holds and the following GroupNorm scales back.
    vae_copy("tiny-sdxl", &dir, false, |w| {
        for (name, t) in w.iter_mut() {
            if name == "decoder.conv_in.weight" {
                let k = 6e4 / f64::from(max_abs(t));
                *t = (&*t * k).unwrap();
            }
        }
    });
    let (latents, _) = reference("tiny-sdxl");
    let half = AutoencoderKL::load(&dir, DType::F16, &Device::Cpu).unwrap();
    let raw = half.decode_latents(&latents).unwrap();
    let bad = hybridiff_models::weights::first_non_finite(&raw).unwrap();
    assert!(
        bad.is_some(),
        "the test's weights must overflow an f16 decode"
    );

    let vae = PipelineVae::load(&dir, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(vae.dtype(), DType::F16);
    let got = vae.decode_latents(&latents).unwrap();
    assert_eq!(vae.f32_retries(), 1);
    assert_eq!(got.dtype(), DType::F32, "redone in f32");
    let want = AutoencoderKL::load(&dir, DType::F32, &Device::Cpu)
        .unwrap()
        .decode_latents(&latents)
        .unwrap();
    assert!(hybridiff_models::weights::first_non_finite(&want)
        .unwrap()
        .is_none());
    assert_eq!(
        max_abs_diff(&got, &want),
        0.0,
        "the retry is the f32 decode"
    );
    // The f32 copy is kept: a second overflow retries again, from memory.
    vae.decode_latents(&latents).unwrap();
    assert_eq!(vae.f32_retries(), 2);
}
