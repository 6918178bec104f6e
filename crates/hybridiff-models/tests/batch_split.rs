//! `Denoiser::forward` runs a batch as two halves side by side when the pool has two or
//! more threads (issue 12): the prediction must not change by a single bit with the
//! thread count, and each sample's prediction must equal its own batch-1 forward (CFG's
//! two branches give the same image whether they run batched, split or on two ranks).

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::mmdit::SD3Transformer2DModel;
use hybridiff_models::unet::UNet2DConditionModel;
use hybridiff_models::{Conditioning, Denoiser};

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// `n` different samples from one: `x`, `-0.5 x`, `x + 0.25`, ...
fn batch_of(x: &Tensor, n: usize) -> Tensor {
    let items: Vec<Tensor> = (0..n)
        .map(|i| match i % 3 {
            0 => x.clone(),
            1 => (x * -0.5).unwrap(),
            _ => (x + 0.25 * i as f64).unwrap(),
        })
        .collect();
    Tensor::cat(&items, 0).unwrap()
}

fn cond_of(c: &Conditioning, n: usize) -> Conditioning {
    let b = |t: &Tensor| batch_of(t, n);
    Conditioning {
        prompt_embeds: b(&c.prompt_embeds),
        pooled: c.pooled.as_ref().map(b),
        time_ids: c.time_ids.as_ref().map(b),
    }
}

fn assert_split_is_exact(
    model: &dyn Denoiser,
    x: &Tensor,
    t: f64,
    cond: &Conditioning,
    what: &str,
) {
    for n in [2, 3] {
        let (xb, cb) = (batch_of(x, n), cond_of(cond, n));
        let one = in_pool(1, || model.forward(&xb, t, &cb).unwrap());
        for i in 0..n {
            let xi = xb.narrow(0, i, 1).unwrap();
            let ci = cb.narrow(i, 1).unwrap();
            let alone = in_pool(1, || model.forward(&xi, t, &ci).unwrap());
            assert_eq!(
                bits(&alone),
                bits(&one.narrow(0, i, 1).unwrap()),
                "{what}, batch {n}: sample {i} alone vs in the batch"
            );
        }
        for threads in [2, 3] {
            let got = in_pool(threads, || model.forward(&xb, t, &cb).unwrap());
            assert_eq!(
                bits(&one),
                bits(&got),
                "{what}, batch {n}: 1 vs {threads} threads"
            );
        }
    }
}

#[test]
fn unet_batch_halves_give_the_same_bits_at_any_thread_count() {
    let exp = candle_core::safetensors::load(
        fixtures().join("behaviour/unet_odd_sizes.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let unet =
        UNet2DConditionModel::load(&fixtures().join("tiny-sdxl/unet"), DType::F32, &Device::Cpu)
            .unwrap();
    let cond = Conditioning {
        prompt_embeds: exp["sq9_encoder_hidden_states"].clone(),
        pooled: Some(exp["sq9_text_embeds"].clone()),
        time_ids: Some(exp["sq9_time_ids"].clone()),
    };
    assert_split_is_exact(&unet, &exp["sq9_sample"], 500.0, &cond, "tiny-sdxl U-Net");
}

#[test]
fn mmdit_batch_halves_give_the_same_bits_at_any_thread_count() {
    let root = fixtures().join("tiny-sd3");
    let model =
        SD3Transformer2DModel::load(&root.join("transformer"), DType::F32, &Device::Cpu).unwrap();
    let inputs =
        candle_core::safetensors::load(root.join("inputs.safetensors"), &Device::Cpu).unwrap();
    let exp = candle_core::safetensors::load(
        root.join("expected/denoiser_forward.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let cond = Conditioning {
        prompt_embeds: inputs["prompt_embeds"].clone(),
        pooled: Some(inputs["pooled_prompt_embeds"].clone()),
        time_ids: None,
    };
    let x = exp["sample"].narrow(0, 0, 1).unwrap();
    assert_split_is_exact(&model, &x, 500.0, &cond, "tiny SD3 MMDiT");
}
