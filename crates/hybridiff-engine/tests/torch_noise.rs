//! `--noise torch` draws what `torch.randn(n, generator=torch.Generator("cpu")
//! .manual_seed(seed))` draws, bit for bit: stored values (tools/make_torch_noise_fixtures.py,
//! torch 2.15) for sizes on both sides of PyTorch's vectorised threshold (16), drawn one
//! after another from one generator as diffusers' schedulers do, a hash sweep over 500
//! seeds, and the starting latents of diffusers' pipelines in tests/fixtures/single-file.

use candle_core::{Device, Tensor};
use hybridiff_engine::pipeline::{seeded_latents, seeded_latents_with, NoiseKind};
use hybridiff_engine::torch_rng::TorchGenerator;

mod common;
use common::fixture;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn sequences_of_draws_equal_torch_bit_for_bit() {
    let dir = fixture("noise");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("torch_randn.json")).unwrap())
            .unwrap();
    let want =
        candle_core::safetensors::load(dir.join("torch_randn.safetensors"), &Device::Cpu).unwrap();
    let sizes: Vec<usize> = meta["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert!(sizes.iter().any(|&n| n < 16) && sizes.iter().any(|&n| n > 16 && n % 16 != 0));
    for seed in meta["seeds"].as_array().unwrap() {
        let seed = seed.as_u64().unwrap();
        let mut g = TorchGenerator::manual_seed(seed);
        let got: Vec<f32> = sizes.iter().flat_map(|&n| g.randn(n)).collect();
        let want: Vec<f32> = want[&format!("seed_{seed}")].to_vec1().unwrap();
        assert_eq!(got.len(), want.len());
        let (g, w) = (bits(&got), bits(&want));
        if let Some(i) = g.iter().zip(&w).position(|(a, b)| a != b) {
            panic!(
                "seed {seed}: value {i} is {} (bits {:#x}), torch drew {} ({:#x})",
                got[i], g[i], want[i], w[i]
            );
        }
    }
}

#[test]
fn five_hundred_seeds_hash_as_torch() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("noise").join("torch_randn_hashes.json")).unwrap(),
    )
    .unwrap();
    let sizes: Vec<usize> = v["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap() as usize)
        .collect();
    let hashes = v["hashes"].as_object().unwrap();
    assert_eq!(hashes.len(), 500);
    for (seed, want) in hashes {
        let mut g = TorchGenerator::manual_seed(seed.parse().unwrap());
        for (k, &n) in sizes.iter().enumerate() {
            let h = g.randn(n).iter().enumerate().fold(0u64, |h, (i, x)| {
                h.wrapping_add((x.to_bits() as u64).wrapping_mul(i as u64 + 1))
            });
            let w: u64 = want[k].as_str().unwrap().parse().unwrap();
            assert_eq!(h, w, "seed {seed}, draw {k} ({n} values)");
        }
    }
}

#[test]
fn pipeline_latents_are_diffusers_starting_noise() {
    let dir = fixture("single-file");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut n = 0;
    for (case, c) in meta.as_object().unwrap() {
        if !case.starts_with("torch_") {
            continue;
        }
        let t = candle_core::safetensors::load(
            dir.join(format!("expected_{case}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let want = &t["latents"];
        let (h, w) = (
            c["height"].as_u64().unwrap() as usize / 8,
            c["width"].as_u64().unwrap() as usize / 8,
        );
        let got = seeded_latents_with(
            NoiseKind::Torch,
            c["seed"].as_u64().unwrap(),
            (4, h, w),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(got.dims(), want.dims(), "{case}");
        let flat = |t: &Tensor| bits(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(flat(&got), flat(want), "{case}");
        n += 1;
    }
    assert_eq!(n, 6, "the fixture's torch cases");
    // The default stays ChaCha8: the same seed draws other values.
    let a = seeded_latents(0, (4, 2, 3), &Device::Cpu).unwrap();
    let b = seeded_latents_with(NoiseKind::Torch, 0, (4, 2, 3), &Device::Cpu).unwrap();
    let (a, b): (Vec<f32>, Vec<f32>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert_ne!(a, b);
    assert_eq!(NoiseKind::default(), NoiseKind::Chacha8);
}
