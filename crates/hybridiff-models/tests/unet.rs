//! U-Net parity with diffusers on the tiny SDXL fixture.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::unet::UNet2DConditionModel;
use hybridiff_models::{Conditioning, Denoiser};

struct Case {
    unet: UNet2DConditionModel,
    sample: Tensor,
    timestep: f64,
    cond: Conditioning,
    uncond: Conditioning,
    out_cond: Tensor,
    out_uncond: Tensor,
}

fn load_case() -> Case {
    let dev = Device::Cpu;
    let root = fixtures().join("tiny-sdxl");
    let unet = UNet2DConditionModel::load(&root.join("unet"), DType::F32, &dev).unwrap();
    let inputs = candle_core::safetensors::load(root.join("inputs.safetensors"), &dev).unwrap();
    let exp =
        candle_core::safetensors::load(root.join("expected/denoiser_forward.safetensors"), &dev)
            .unwrap();
    let time_ids = exp["time_ids"].clone();
    let timestep = exp["timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    Case {
        unet,
        sample: exp["sample"].clone(),
        timestep,
        cond: Conditioning {
            prompt_embeds: inputs["prompt_embeds"].clone(),
            pooled: Some(inputs["pooled_prompt_embeds"].clone()),
            time_ids: Some(time_ids.clone()),
        },
        uncond: Conditioning {
            prompt_embeds: inputs["negative_prompt_embeds"].clone(),
            pooled: Some(inputs["negative_pooled_prompt_embeds"].clone()),
            time_ids: Some(time_ids),
        },
        out_cond: exp["out_cond"].clone(),
        out_uncond: exp["out_uncond"].clone(),
    }
}

#[test]
fn forward_matches_diffusers_cond_and_uncond() {
    // The comparison `hybridiff parity` runs on GPUs too (hybridiff_models::parity).
    let rows = hybridiff_models::parity::denoiser_forward(
        &fixtures().join("tiny-sdxl"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_rows_pass(&rows);
    // The branches must differ, or the test could not tell them apart.
    let c = load_case();
    assert!(max_abs_diff(&c.out_cond, &c.out_uncond) > 1e-3);
}

#[test]
fn cfg_batch_of_two_matches_each_branch() {
    let c = load_case();
    let sample = Tensor::cat(&[&c.sample, &c.sample], 0).unwrap();
    let cond = Conditioning::cat(&c.uncond, &c.cond).unwrap();
    let got = c.unet.forward(&sample, c.timestep, &cond).unwrap();
    assert_close(&got.narrow(0, 0, 1).unwrap(), &c.out_uncond, "batch[0]");
    assert_close(&got.narrow(0, 1, 1).unwrap(), &c.out_cond, "batch[1]");
}

#[test]
fn modules_run_one_by_one_with_substituted_outputs_match_forward() {
    let c = load_case();
    let names = c.unet.module_names().to_vec();
    let expected_names = [
        "conv_in",
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0.resnets.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.resnets.1",
        "up_blocks.0.attentions.1",
        "up_blocks.0.resnets.2",
        "up_blocks.0.attentions.2",
        "up_blocks.0.upsamplers",
        "up_blocks.1.resnets.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.resnets.1",
        "up_blocks.1.attentions.1",
        "up_blocks.1.resnets.2",
        "up_blocks.1.attentions.2",
        "up_blocks.1.upsamplers",
        "up_blocks.2.resnets.0",
        "up_blocks.2.resnets.1",
        "up_blocks.2.resnets.2",
        "conv_norm_out",
        "conv_out",
    ];
    assert_eq!(names, expected_names);

    let (cache, state) = run_modules(&c.unet, &c.sample, c.timestep, &c.cond);
    assert!(state.skips.is_empty(), "every skip residual consumed");
    let first = c.unet.end(state).unwrap();
    assert_close(&first, &c.out_cond, "module-by-module");
    assert_substitution_reproduces(&c.unet, &c.sample, c.timestep, &c.cond, cache, &first);
}

#[test]
fn module_flops_are_positive_per_module() {
    let c = load_case();
    let f = c.unet.module_flops(16, 16);
    assert_eq!(f.len(), c.unet.module_names().len());
    assert!(f.iter().all(|x| *x > 0.0));
}

#[test]
fn module_reads_are_all_a_module_needs() {
    let c = load_case();
    assert_reads_suffice(&c.unet, &c.sample, c.timestep, &c.cond);
    // Up resnets read a skip; the first reads the bottom down block's last output.
    let names = c.unet.module_names();
    let up0 = names
        .iter()
        .position(|m| m == "up_blocks.0.resnets.0")
        .unwrap();
    let down2 = names.iter().position(|m| m == "down_blocks.2").unwrap();
    assert!(c
        .unet
        .module_reads(up0)
        .contains(&hybridiff_models::OutputRef {
            module: down2,
            index: 1
        }));
}
