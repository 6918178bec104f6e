//! SD3 MMDiT parity with diffusers on the tiny SD3 fixture, and the module interface.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hybridiff_models::mmdit::{get_2d_sincos_pos_embed, MMDiTConfig, SD3Transformer2DModel};
use hybridiff_models::{Conditioning, Denoiser, Error, OutputRef};

fn transformer_dir() -> PathBuf {
    fixtures().join("tiny-sd3/transformer")
}

struct Case {
    model: SD3Transformer2DModel,
    sample: Tensor,
    timestep: f64,
    cond: Conditioning,
    uncond: Conditioning,
    out_cond: Tensor,
    out_uncond: Tensor,
}

fn load_case() -> Case {
    let dev = Device::Cpu;
    let root = fixtures().join("tiny-sd3");
    let model = SD3Transformer2DModel::load(&root.join("transformer"), DType::F32, &dev).unwrap();
    let inputs = candle_core::safetensors::load(root.join("inputs.safetensors"), &dev).unwrap();
    let exp =
        candle_core::safetensors::load(root.join("expected/denoiser_forward.safetensors"), &dev)
            .unwrap();
    Case {
        model,
        sample: exp["sample"].clone(),
        timestep: exp["timestep"].to_vec1::<f32>().unwrap()[0] as f64,
        cond: Conditioning {
            prompt_embeds: inputs["prompt_embeds"].clone(),
            pooled: Some(inputs["pooled_prompt_embeds"].clone()),
            time_ids: None,
        },
        uncond: Conditioning {
            prompt_embeds: inputs["negative_prompt_embeds"].clone(),
            pooled: Some(inputs["negative_pooled_prompt_embeds"].clone()),
            time_ids: None,
        },
        out_cond: exp["out_cond"].clone(),
        out_uncond: exp["out_uncond"].clone(),
    }
}

#[test]
fn forward_matches_diffusers_cond_and_uncond() {
    // The comparison `hybridiff parity` runs on GPUs too (hybridiff_models::parity).
    let rows = hybridiff_models::parity::denoiser_forward(
        &fixtures().join("tiny-sd3"),
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
fn timestep_changes_the_output() {
    // Guards against a timestep path that is silently ignored.
    let c = load_case();
    let a = c.model.forward(&c.sample, c.timestep, &c.cond).unwrap();
    let b = c
        .model
        .forward(&c.sample, c.timestep * 0.5 + 1.0, &c.cond)
        .unwrap();
    assert!(max_abs_diff(&a, &b) > 1e-3);
}

#[test]
fn cfg_batch_of_two_matches_each_branch() {
    let c = load_case();
    let sample = Tensor::cat(&[&c.sample, &c.sample], 0).unwrap();
    let cond = Conditioning::cat(&c.uncond, &c.cond).unwrap();
    let got = c.model.forward(&sample, c.timestep, &cond).unwrap();
    assert_close(&got.narrow(0, 0, 1).unwrap(), &c.out_uncond, "batch[0]");
    assert_close(&got.narrow(0, 1, 1).unwrap(), &c.out_cond, "batch[1]");
}

#[test]
fn module_names_are_the_blocks_then_norm_out_then_proj_out() {
    let c = load_case();
    let mut want: Vec<String> = (0..24).map(|i| format!("transformer_blocks.{i}")).collect();
    want.push("norm_out".into());
    want.push("proj_out".into());
    assert_eq!(c.model.module_names(), want.as_slice());
    let counts: Vec<usize> = (0..want.len())
        .map(|i| c.model.module_output_count(i))
        .collect();
    let mut want_counts = vec![2; 23];
    want_counts.extend([1, 1, 1]);
    assert_eq!(counts, want_counts);
}

#[test]
fn modules_run_one_by_one_with_substituted_outputs_match_forward() {
    let c = load_case();
    let (cache, state) = run_modules(&c.model, &c.sample, c.timestep, &c.cond);
    let first = c.model.end(state).unwrap();
    assert_close(&first, &c.out_cond, "module-by-module");
    // The last module's last output is the prediction.
    assert_eq!(
        max_abs_diff(cache.last().unwrap().last().unwrap(), &first),
        0.0
    );
    assert_substitution_reproduces(&c.model, &c.sample, c.timestep, &c.cond, cache, &first);
}

#[test]
fn module_flops_are_positive_per_module() {
    let c = load_case();
    let f = c.model.module_flops(16, 16);
    assert_eq!(f.len(), c.model.module_names().len());
    assert!(f.iter().all(|x| *x > 0.0));
    // Blocks dominate, and a larger latent costs more.
    assert!(f[0] > f[24] && f[0] > f[25]);
    let big = c.model.module_flops(32, 32);
    assert!(big.iter().zip(&f).all(|(b, s)| b > s));
}

#[test]
fn module_reads_are_all_a_module_needs() {
    let c = load_case();
    assert_reads_suffice(&c.model, &c.sample, c.timestep, &c.cond);
    // The declared reads themselves: a block reads its predecessor's context and
    // hidden, norm_out the last block's hidden, proj_out norm_out's output.
    let r = |module, index| OutputRef { module, index };
    assert!(c.model.module_reads(0).is_empty());
    assert_eq!(c.model.module_reads(5), vec![r(4, 0), r(4, 1)]);
    assert_eq!(c.model.module_reads(23), vec![r(22, 0), r(22, 1)]);
    assert_eq!(c.model.module_reads(24), vec![r(23, 0)]);
    assert_eq!(c.model.module_reads(25), vec![r(24, 0)]);
}

#[test]
fn computed_position_table_matches_the_checkpoint_buffer() {
    // The checkpoint stores `pos_embed.pos_embed`; the same table computed here is what
    // a checkpoint without it, or `pos_embed_max_size: null`, uses.
    let dev = Device::Cpu;
    let st = candle_core::safetensors::load(
        transformer_dir().join("diffusion_pytorch_model.safetensors"),
        &dev,
    )
    .unwrap();
    let stored = st["pos_embed.pos_embed"].reshape((256, 16)).unwrap();
    // sample_size 16, patch 2: base size 8, a 16x16 table.
    let computed =
        Tensor::from_vec(get_2d_sincos_pos_embed(16, 16, 16, 8), (256, 16), &dev).unwrap();
    let d = max_abs_diff(&computed, &stored);
    assert!(d < 1e-6, "max abs diff {d}");
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hybridiff-mmdit-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture_config_json() -> serde_json::Value {
    let text = std::fs::read_to_string(transformer_dir().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn unsupported_config_values_name_key_and_file() {
    for (tag, key, value) in [
        ("qk", "qk_norm", serde_json::json!("layer_norm")),
        (
            "class",
            "_class_name",
            serde_json::json!("FluxTransformer2DModel"),
        ),
    ] {
        let dir = temp_dir(tag);
        let mut cfg = fixture_config_json();
        cfg[key] = value.clone();
        let path = dir.join("config.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = match SD3Transformer2DModel::load(&dir, DType::F32, &Device::Cpu) {
            Err(e) => e,
            Ok(_) => panic!("{key} = {value} was accepted"),
        };
        assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(key), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(value.as_str().unwrap()), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn inconsistent_config_values_name_the_key() {
    for (tag, key, value) in [
        ("caption", "caption_projection_dim", serde_json::json!(24)),
        ("dual", "dual_attention_layers", serde_json::json!([0, 24])),
    ] {
        let dir = temp_dir(tag);
        let mut cfg = fixture_config_json();
        cfg[key] = value;
        let path = dir.join("config.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = MMDiTConfig::from_file(&path).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(key), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn mis_shaped_inputs_name_the_tensor() {
    let c = load_case();
    let expect_input_err = |sample: &Tensor, cond: &Conditioning, needle: &str| {
        let err = c.model.forward(sample, c.timestep, cond).unwrap_err();
        assert!(matches!(err, Error::Input(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    };
    let dev = Device::Cpu;
    // Wrong channel count.
    let s = Tensor::zeros((1, 4, 16, 16), DType::F32, &dev).unwrap();
    expect_input_err(&s, &c.cond, "`sample`");
    // Odd latent size: not divisible by the patch size.
    let s = Tensor::zeros((1, 16, 15, 16), DType::F32, &dev).unwrap();
    expect_input_err(&s, &c.cond, "patch_size 2");
    // Larger than the 16x16 position table allows.
    let s = Tensor::zeros((1, 16, 34, 16), DType::F32, &dev).unwrap();
    expect_input_err(&s, &c.cond, "pos_embed_max_size 16");
    // Prompt embeds of the wrong width.
    let mut bad = c.cond.clone();
    bad.prompt_embeds = Tensor::zeros((1, 16, 31), DType::F32, &dev).unwrap();
    expect_input_err(&c.sample, &bad, "`encoder_hidden_states`");
    // Batch mismatch between sample and prompt embeds.
    let two = Tensor::cat(&[&c.sample, &c.sample], 0).unwrap();
    expect_input_err(&two, &c.cond, "[2, L, 32]");
    // Pooled embeds missing or mis-shaped.
    let mut bad = c.cond.clone();
    bad.pooled = None;
    expect_input_err(&c.sample, &bad, "`pooled_projections`");
    bad.pooled = Some(Tensor::zeros((1, 31), DType::F32, &dev).unwrap());
    expect_input_err(&c.sample, &bad, "`pooled_projections`");
}

#[test]
fn smaller_latents_crop_the_position_table() {
    // A 12x8 latent (6x4 patches) runs and gives a 12x8 prediction.
    let c = load_case();
    let s = c.sample.narrow(2, 2, 12).unwrap().narrow(3, 4, 8).unwrap();
    let out = c.model.forward(&s, c.timestep, &c.cond).unwrap();
    assert_eq!(out.dims(), [1, 16, 12, 8]);
    assert!(max_abs(&out).is_finite());
}

/// The fixture's weights, plus what SD3.5's options add: `rms_norm` qk norms and a
/// dual-attention block 0 whose extra modulation (chunks 6..9 of `norm1`) is zero.
fn sd35_weights(dev: &Device, qk_norm: bool) -> HashMap<String, Tensor> {
    let mut w = candle_core::safetensors::load(
        transformer_dir().join("diffusion_pytorch_model.safetensors"),
        dev,
    )
    .unwrap();
    let dim = 16;
    let head = 8;
    let attn = "transformer_blocks.0.attn";
    let mut extra = HashMap::new();
    for p in ["to_q", "to_k", "to_v", "to_out.0"] {
        for t in ["weight", "bias"] {
            extra.insert(
                format!("transformer_blocks.0.attn2.{p}.{t}"),
                w[&format!("{attn}.{p}.{t}")].clone(),
            );
        }
    }
    if qk_norm {
        for i in 0..24 {
            let mut names = vec![
                "attn.norm_q",
                "attn.norm_k",
                "attn.norm_added_q",
                "attn.norm_added_k",
            ];
            if i == 0 {
                names.extend(["attn2.norm_q", "attn2.norm_k"]);
            }
            for n in names {
                extra.insert(
                    format!("transformer_blocks.{i}.{n}.weight"),
                    Tensor::ones(head, DType::F32, dev).unwrap(),
                );
            }
        }
    }
    let n1w = "transformer_blocks.0.norm1.linear.weight".to_string();
    let n1b = "transformer_blocks.0.norm1.linear.bias".to_string();
    let zw = Tensor::zeros((3 * dim, dim), DType::F32, dev).unwrap();
    let zb = Tensor::zeros(3 * dim, DType::F32, dev).unwrap();
    let ww = Tensor::cat(&[&w[&n1w], &zw], 0).unwrap();
    let bb = Tensor::cat(&[&w[&n1b], &zb], 0).unwrap();
    w.insert(n1w, ww);
    w.insert(n1b, bb);
    w.extend(extra);
    w
}

fn sd35_config(qk_norm: bool) -> MMDiTConfig {
    let mut cfg = fixture_config_json();
    cfg["dual_attention_layers"] = serde_json::json!([0]);
    if qk_norm {
        cfg["qk_norm"] = serde_json::json!("rms_norm");
    }
    serde_json::from_value(cfg).unwrap()
}

#[test]
fn dual_attention_with_zero_extra_modulation_equals_sd3() {
    // With shift/scale/gate of `attn2` all zero, SD3.5's dual-attention block reduces to
    // the SD3 block: this checks the 9-way split keeps the first six chunks in place and
    // that `attn2` loads under diffusers' weight names.
    let c = load_case();
    let dev = Device::Cpu;
    let vb = VarBuilder::from_tensors(sd35_weights(&dev, false), DType::F32, &dev);
    let model = SD3Transformer2DModel::new(vb, sd35_config(false)).unwrap();
    let got = model.forward(&c.sample, c.timestep, &c.cond).unwrap();
    assert_close(&got, &c.out_cond, "dual attention, zero gate");
}

#[test]
fn rms_qk_norm_loads_and_changes_the_output() {
    // No reference output exists for qk norms; this checks diffusers' weight names load
    // and that the norms take part in the computation.
    let c = load_case();
    let dev = Device::Cpu;
    let vb = VarBuilder::from_tensors(sd35_weights(&dev, true), DType::F32, &dev);
    let model = SD3Transformer2DModel::new(vb, sd35_config(true)).unwrap();
    let got = model.forward(&c.sample, c.timestep, &c.cond).unwrap();
    assert_eq!(got.dims(), c.out_cond.dims());
    assert!(max_abs(&got).is_finite());
    assert!(max_abs_diff(&got, &c.out_cond) > 1e-4);
}
