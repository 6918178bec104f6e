//! Any latent size, as in diffusers: U-Net forwards on sizes that are not multiples of
//! 2^downsamples (each upsampler takes its skip's size, diffusers'
//! `forward_upsample_size`), against diffusers' outputs in
//! `tests/fixtures/behaviour/unet_odd_sizes.safetensors` (`tools/make_behaviour_fixtures.py`).

mod common;
use common::*;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::unet::UNet2DConditionModel;
use hybridiff_models::{Conditioning, Denoiser};

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("behaviour/unet_odd_sizes.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn tiny_sdxl_unet_matches_diffusers_at_odd_and_non_square_sizes() {
    let exp = expected();
    let t = exp["timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let unet =
        UNet2DConditionModel::load(&fixtures().join("tiny-sdxl/unet"), DType::F32, &Device::Cpu)
            .unwrap();
    for tag in ["sq9", "wide", "tall"] {
        let cond = Conditioning {
            prompt_embeds: exp[&format!("{tag}_encoder_hidden_states")].clone(),
            pooled: Some(exp[&format!("{tag}_text_embeds")].clone()),
            time_ids: Some(exp[&format!("{tag}_time_ids")].clone()),
        };
        let x = &exp[&format!("{tag}_sample")];
        let want = &exp[&format!("{tag}_out")];
        let got = unet.forward(x, t, &cond).unwrap();
        assert_close(&got, want, &format!("tiny-sdxl {tag} {:?}", x.dims()));
        // Module by module (as staged strategies run it) gives the same.
        let (_, state) = run_modules(&unet, x, t, &cond);
        assert_close(&unet.end(state).unwrap(), want, &format!("{tag} by module"));
    }
}

#[test]
fn unet_with_downsample_padding_0_matches_diffusers_at_an_odd_size() {
    let exp = expected();
    let t = exp["timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let unet = UNet2DConditionModel::load(
        &fixtures().join("models/unet-odd"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let cond = Conditioning {
        prompt_embeds: exp["odd_encoder_hidden_states"].clone(),
        pooled: None,
        time_ids: None,
    };
    let got = unet.forward(&exp["odd_sample"], t, &cond).unwrap();
    assert_close(&got, &exp["odd_out"], "unet-odd 11x13");
}
