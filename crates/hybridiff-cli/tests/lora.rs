//! `--lora FILE[:SCALE]` makes the image diffusers makes with the LoRA fused
//! (tests/fixtures/lora), on every strategy (the weights are merged once, at load), and bad
//! LoRA input is refused before any compute with nothing written.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

mod common;
use common::{fixture, hybridiff, s, stderr};

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("lora").join("expected.json")).unwrap())
        .unwrap()
}

fn psnr(png: &Path, want: &Tensor) -> f64 {
    let got = image::open(png).unwrap().to_rgb8();
    let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.as_raw().len(), want.len());
    let mse = got
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum::<f64>()
        / want.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// `generate` with the case's LoRAs on its model; `extra` adds flags.
fn generate(case: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let c = &cases()[case];
    let latents = fixture("lora").join(format!("expected_{case}.safetensors"));
    let model = fixture("single-file").join(c["model"].as_str().unwrap());
    let mut args: Vec<String> = ["generate"].iter().map(|x| x.to_string()).collect();
    if !extra.contains(&"--model") {
        args.extend(["--model".to_string(), s(&model).to_string()]);
    }
    args.extend(
        [
            "--prompt",
            c["prompt"].as_str().unwrap(),
            "--negative-prompt",
            c["negative_prompt"].as_str().unwrap(),
            "--steps",
            &c["num_inference_steps"].to_string(),
            "--guidance",
            &c["guidance_scale"].to_string(),
            "--latents",
            s(&latents),
            "--out",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string()),
    );
    for l in c["loras"].as_array().unwrap() {
        args.push("--lora".into());
        args.push(format!(
            "{}:{}",
            fixture("lora").join(l[0].as_str().unwrap()).display(),
            l[1]
        ));
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    hybridiff(&a)
}

#[test]
fn lora_images_match_diffusers_fuse_lora() {
    let m = cases();
    // Every case with an image (the SD3 one is checked on its weights, engine/tests/lora.rs).
    for (case, _) in m
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, c)| *k != "note" && c["model"] != "tiny-sd3")
    {
        let want = candle_core::safetensors::load(
            fixture("lora").join(format!("expected_{case}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("l.png");
        let o = generate(case, &png, &[]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let p = psnr(&png, &want["image_u8"]);
        eprintln!("{case}: PSNR {p:.1} dB against diffusers");
        assert!(p >= 60.0, "{case}: PSNR {p:.1} dB against diffusers' image");
    }
}

#[test]
fn every_strategy_and_the_single_file_see_the_same_merged_weights() {
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.png");
    let o = generate("sdxl_both", &serial, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = dir.path().join("cfg.png");
    let o = generate(
        "sdxl_both",
        &cfg,
        &["--strategy", "cfg", "--world-size", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&serial).unwrap(),
        std::fs::read(&cfg).unwrap()
    );
    // The same LoRAs on the single file of the same pipeline.
    let file = dir.path().join("file.png");
    let folder = fixture("single-file").join("sdxl");
    let sf = fixture("single-file").join("sdxl.safetensors");
    let o = generate(
        "sdxl_both",
        &file,
        &["--model", s(&sf), "--config", s(&folder)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&serial).unwrap(),
        std::fs::read(&file).unwrap()
    );
}

/// Runs `generate` on the tiny SD 1.x pipeline with `lora` and expects a refusal that
/// says `says`, with no output written.
fn refused(lora: &str, says: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = hybridiff(&[
        "generate",
        "--model",
        s(&fixture("single-file").join("sd15")),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--lora",
        lora,
        "--out",
        s(&out),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{lora}: succeeded");
    for w in says {
        assert!(e.contains(w), "{lora}: {e}");
    }
    assert!(!e.contains("panicked"), "{e}");
    assert!(!out.exists(), "{lora}: wrote an output");
}

#[test]
fn bad_lora_input_is_refused_before_compute() {
    let good = fixture("lora").join("sd15_kohya.safetensors");
    let good = s(&good);
    refused(&format!("{good}:nan"), &["--lora", "not a finite number"]);
    refused(&format!("{good}:inf"), &["not a finite number"]);
    refused(&format!("{good}:strong"), &["not a number"]);
    refused(
        "/nonexistent/style.safetensors",
        &["style.safetensors", "not found"],
    );
    // A LoRA for SDXL on an SD 1.x model: every unmatched key listed.
    let xl = fixture("lora").join("sdxl_kohya.safetensors");
    refused(s(&xl), &["another model family", "lora_te2_"]);
    let dir = tempfile::tempdir().unwrap();
    // A pickle is refused with why and how to convert.
    let pt = dir.path().join("style.pt");
    std::fs::write(&pt, b"\x80\x02}q\x00.").unwrap();
    refused(s(&pt), &["pickle", "safetensors"]);
    // LoHa and unknown namings are named, not guessed.
    let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let loha = dir.path().join("loha.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("lora_unet_conv_in.hada_w1_a".to_string(), t(&[2, 2])),
            ("lora_unet_conv_in.hada_w1_b".to_string(), t(&[2, 2])),
        ]),
        &loha,
    )
    .unwrap();
    refused(s(&loha), &["LoHa", "not supported"]);
    let odd = dir.path().join("odd.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("some.random.weight".to_string(), t(&[2, 2]))]),
        &odd,
    )
    .unwrap();
    refused(s(&odd), &["some.random.weight", "no LoRA naming"]);
    // NaN in a LoRA weight.
    let nan = dir.path().join("nan.safetensors");
    let k = "lora_unet_down_blocks_0_attentions_0_proj_in";
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            (
                format!("{k}.lora_down.weight"),
                Tensor::new(&[[f32::NAN; 8], [0.0; 8]], &Device::Cpu)
                    .unwrap()
                    .reshape((2, 8, 1, 1))
                    .unwrap(),
            ),
            (format!("{k}.lora_up.weight"), t(&[8, 2, 1, 1])),
        ]),
        &nan,
    )
    .unwrap();
    refused(s(&nan), &["non-finite", "lora_down"]);
}
