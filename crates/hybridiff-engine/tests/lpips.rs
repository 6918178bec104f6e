//! LPIPS against the `lpips` Python package (`tests/fixtures/lpips`, written by
//! `tools/lpips_weights.py fixture`): the package's real linear heads on a seeded random
//! AlexNet backbone that both sides rebuild bit for bit. Tolerance: |ours - lpips| <=
//! 1e-4 x lpips + 1e-7 (f32 convolutions summed in another order).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::fixture;
use hybridiff_engine::metrics::compare_dirs;
use hybridiff_models::lpips::{seeded_backbone, Lpips};

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("lpips/expected.json")).unwrap()).unwrap()
}

/// The fixture's weights file: the seeded backbone plus the wheel's heads.
fn weights(dir: &Path) -> PathBuf {
    let seed = expected()["backbone_seed"].as_u64().unwrap();
    let mut t: HashMap<String, Tensor> = seeded_backbone(seed).unwrap();
    let heads =
        candle_core::safetensors::load(fixture("lpips/heads.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(heads.len(), 5);
    t.extend(heads);
    let p = dir.join("lpips.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    p
}

#[test]
fn lpips_matches_the_lpips_package() {
    let tmp = tempfile::tempdir().unwrap();
    let lpips = Lpips::load(&weights(tmp.path()), &Device::Cpu).unwrap();
    let cmp = compare_dirs(&fixture("lpips/a"), &fixture("lpips/b"), Some(&lpips), None).unwrap();
    let want = expected();
    let want = want["distances"].as_object().unwrap();
    assert_eq!(cmp.pairs.len(), want.len());
    for p in &cmp.pairs {
        let w = want[&p.file].as_f64().unwrap();
        let g = p.lpips.unwrap();
        assert!(
            (g - w).abs() <= 1e-4 * w + 1e-7,
            "{}: ours {g}, lpips {w}",
            p.file
        );
    }
    // The same image is at distance 0; without weights no LPIPS is reported.
    let same = compare_dirs(&fixture("lpips/a"), &fixture("lpips/a"), Some(&lpips), None).unwrap();
    assert!(same.pairs.iter().all(|p| p.lpips == Some(0.0)));
    let plain = compare_dirs(&fixture("lpips/a"), &fixture("lpips/b"), None, None).unwrap();
    assert!(plain.pairs.iter().all(|p| p.lpips.is_none()));
}

#[test]
fn lpips_refuses_small_images_and_wrong_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let lpips = Lpips::load(&weights(tmp.path()), &Device::Cpu).unwrap();
    // 30 pixels is one short of AlexNet's second max-pool window.
    let img = vec![128u8; 30 * 40 * 3];
    let err = lpips
        .distance_rgb8(&img, &img, 40, 30)
        .unwrap_err()
        .to_string();
    assert!(err.contains("31x31") && err.contains("40x30"), "{err}");
    let err = lpips
        .distance_rgb8(&img, &img[3..], 40, 30)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bytes"), "{err}");
    // A folder pair with a 24x32 image (the PSNR/SSIM fixture) names the file and the size.
    let err = compare_dirs(
        &fixture("metrics/a"),
        &fixture("metrics/b"),
        Some(&lpips),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("32x24") && err.contains("--lpips"), "{err}");
    // The heads alone are not LPIPS weights: the missing tensor and the file are named.
    let err = Lpips::load(&fixture("lpips/heads.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("features.0.weight") && err.contains("heads.safetensors"),
        "{err}"
    );
    let err = Lpips::load(&tmp.path().join("missing.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
    // Negative heads would give negative distances: refused, naming the head.
    let mut t = candle_core::safetensors::load(weights(tmp.path()), &Device::Cpu).unwrap();
    let lin2 = "lin2.model.1.weight".to_string();
    let neg = t[&lin2].neg().unwrap();
    t.insert(lin2, neg);
    let p = tmp.path().join("negative.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let err = Lpips::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("lin2.model.1.weight") && err.contains("non-negative"),
        "{err}"
    );
}
