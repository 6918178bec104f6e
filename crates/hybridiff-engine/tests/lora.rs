//! LoRA files merged at load equal diffusers' `load_lora_weights` + `fuse_lora`
//! (tests/fixtures/lora, tools/make_lora_fixtures.py): the same weights change, to the
//! same values within float rounding, for kohya (SGM and diffusers module names, alpha,
//! LoCon convolutions), PEFT and diffusers' older namings, one file or two, on a folder and
//! on its single-file checkpoint (where the second text encoder's q, k, v are rows of one
//! fused OpenCLIP tensor), and PEFT on an SD3 MMDiT.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use hybridiff_engine::source::ModelSpec;
use hybridiff_models::lora::LoraSpec;
use hybridiff_models::weights::ComponentSource;

mod common;
use common::fixture;

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("lora").join("expected.json")).unwrap())
        .unwrap()
}

fn spec(c: &serde_json::Value, single_file: bool) -> ModelSpec {
    let model = c["model"].as_str().unwrap();
    let folder = if model == "tiny-sd3" {
        fixture(model)
    } else {
        fixture("single-file").join(model)
    };
    ModelSpec {
        model: if single_file {
            fixture("single-file").join(format!("{model}.safetensors"))
        } else {
            folder.clone()
        },
        config: single_file.then_some(folder),
        vae: None,
        loras: c["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| LoraSpec {
                path: fixture("lora").join(l[0].as_str().unwrap()),
                scale: l[1].as_f64().unwrap(),
            })
            .collect(),
    }
}

/// Loads the named weights of a component through its LoRA-merging loader.
fn merged(src: &ComponentSource, names: &[String]) -> BTreeMap<String, Tensor> {
    src.load(DType::F32, &Device::Cpu, &[""], |vb| {
        names
            .iter()
            .map(|n| Ok((n.clone(), vb.get_unchecked(n)?)))
            .collect::<hybridiff_models::Result<BTreeMap<_, _>>>()
    })
    .unwrap()
}

fn check(case: &str, c: &serde_json::Value, single_file: bool) {
    let want = candle_core::safetensors::load(
        fixture("lora").join(format!("expected_{case}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    // The SD3 fixture is a denoiser folder: its LoRA changes the MMDiT alone.
    let sd3 = c["model"] == "tiny-sd3";
    let r = spec(c, single_file).resolve(!sd3).unwrap();
    let mut comps: Vec<(&str, &ComponentSource)> = vec![(
        if sd3 { "transformer" } else { "unet" },
        r.denoiser.source(),
    )];
    for clip in r.text.iter().flat_map(|t| &t.clips) {
        comps.push((clip.slot.as_str(), &clip.encoder));
    }
    let changed: BTreeSet<String> = c["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut seen = BTreeSet::new();
    for (name, src) in comps {
        let Some(patches) = src.patches() else {
            continue;
        };
        // transformers 5 saves a bare CLIPTextModel without `text_model.`; our names have it.
        let key = |w: &str| {
            let bare = format!("{name}.{}", w.strip_prefix("text_model.").unwrap_or(w));
            if want.contains_key(&bare) {
                bare
            } else {
                format!("{name}.{w}")
            }
        };
        let weights: Vec<String> = patches.weights().map(str::to_string).collect();
        for (w, got) in merged(src, &weights) {
            let k = key(&w);
            let expected = want
                .get(&k)
                .unwrap_or_else(|| panic!("{case}: we change {k}, diffusers does not"));
            let diff: f32 = (&got - expected)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                diff <= 2e-6,
                "{case} ({}): {k} differs by {diff}",
                if single_file { "file" } else { "folder" }
            );
            seen.insert(k);
        }
    }
    assert_eq!(seen, changed, "{case}: the weights that change");
}

#[test]
fn merged_weights_equal_diffusers_fuse_lora() {
    let m = cases();
    let mut n = 0;
    for (case, c) in m.as_object().unwrap() {
        if case == "note" {
            continue;
        }
        check(case, c, false);
        if c["model"] != "tiny-sd3" {
            check(case, c, true);
        }
        n += 1;
    }
    assert_eq!(n, 6);
}

#[test]
fn a_lora_for_another_family_is_refused_listing_its_keys() {
    let c = &cases()["sd15_kohya"];
    let mut s = spec(c, false);
    s.model = fixture("single-file").join("sdxl");
    let e = s.resolve(true).unwrap_err().to_string();
    assert!(
        e.contains("another model family")
            && e.contains("lora_unet_down_blocks_0_attentions_0_proj_in"),
        "{e}"
    );
    // A module that exists with another shape names the key and both shapes.
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("wrong.safetensors");
    let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            (format!("{key}.lora_down.weight"), t(&[2, 9])),
            (format!("{key}.lora_up.weight"), t(&[8, 2])),
        ]),
        &path,
    )
    .unwrap();
    let mut s = ModelSpec::folder(&fixture("single-file").join("sd15"));
    s.loras = vec![LoraSpec { path, scale: 1.0 }];
    let e = s.resolve(true).unwrap_err().to_string();
    assert!(
        e.contains(key) && e.contains("[2, 9]") && e.contains("[8, 8]"),
        "{e}"
    );
}
