//! Models people already have: a single-file checkpoint gives the image its diffusers folder
//! gives, bit for bit; `--noise torch --seed S` gives the image diffusers makes with
//! `torch.Generator("cpu").manual_seed(S)`. Fixtures: tests/fixtures/single-file
//! (tools/make_single_file_fixtures.py; diffusers' `from_single_file` reads the same files
//! as the folders' weights and images).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

mod common;
use common::{fixture, hybridiff, s, stderr};

fn meta() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture("single-file").join("expected.json")).unwrap(),
    )
    .unwrap()
}

fn case_tensors(case: &str) -> (PathBuf, std::collections::HashMap<String, Tensor>) {
    let f = fixture("single-file").join(format!("expected_{case}.safetensors"));
    let t = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    (f, t)
}

/// PSNR (dB) of an 8-bit PNG against diffusers' 8-bit image (NHWC).
fn psnr(png: &Path, want: &Tensor) -> f64 {
    let got = image::open(png).unwrap().to_rgb8();
    let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.as_raw().len(), want.len(), "image size");
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

/// `generate` args for a fixture case (prompt, negative prompt, steps, guidance, size).
fn case_args(c: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = [
        "generate",
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--negative-prompt",
        c["negative_prompt"].as_str().unwrap(),
        "--steps",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(c["num_inference_steps"].to_string());
    for (flag, key) in [
        ("--guidance", "guidance_scale"),
        ("--height", "height"),
        ("--width", "width"),
    ] {
        v.push(flag.into());
        v.push(c[key].to_string());
    }
    v
}

fn run(args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    hybridiff(&a)
}

#[test]
fn single_files_give_their_folders_image_bit_for_bit_and_diffusers_image() {
    let m = meta();
    let root = fixture("single-file");
    for name in ["sd15", "sdxl"] {
        let case = format!("folder_{name}");
        let c = &m[&case];
        let (latents, t) = case_tensors(&case);
        let dir = tempfile::tempdir().unwrap();
        let folder_png = dir.path().join("folder.png");
        let file_png = dir.path().join("file.png");
        let mut a = case_args(c);
        a.extend(["--latents".into(), s(&latents).into()]);
        let mut folder = a.clone();
        folder.extend([
            "--model".into(),
            s(&root.join(name)).into(),
            "--out".into(),
            s(&folder_png).into(),
        ]);
        let o = run(&folder);
        assert!(o.status.success(), "{name} folder: {}", stderr(&o));
        let mut file = a.clone();
        file.extend([
            "--model".into(),
            s(&root.join(format!("{name}.safetensors"))).into(),
            "--config".into(),
            s(&root.join(name)).into(),
            "--out".into(),
            s(&file_png).into(),
        ]);
        let o = run(&file);
        assert!(o.status.success(), "{name} single file: {}", stderr(&o));
        assert_eq!(
            std::fs::read(&folder_png).unwrap(),
            std::fs::read(&file_png).unwrap(),
            "{name}: the single file's image differs from the folder's"
        );
        let p = psnr(&file_png, &t["image_u8"]);
        eprintln!("{name}: PSNR {p:.1} dB against diffusers");
        assert!(p >= 60.0, "{name}: PSNR {p:.1} dB against diffusers' image");
    }
}

#[test]
fn torch_noise_reproduces_diffusers_images_from_a_seed() {
    let m = meta();
    let mut n = 0;
    for (case, c) in m.as_object().unwrap() {
        if !case.starts_with("torch_") {
            continue;
        }
        let (_, t) = case_tensors(case);
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("t.png");
        let model = fixture("single-file").join(c["model"].as_str().unwrap());
        let mut a = case_args(c);
        a.extend([
            "--model".into(),
            s(&model).into(),
            "--noise".into(),
            "torch".into(),
            "--seed".into(),
            c["seed"].to_string(),
            "--out".into(),
            s(&png).into(),
        ]);
        let o = run(&a);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let p = psnr(&png, &t["image_u8"]);
        eprintln!("{case}: PSNR {p:.1} dB against diffusers");
        assert!(p >= 60.0, "{case}: PSNR {p:.1} dB against diffusers' image");
        // ChaCha8 (the default) draws other noise: the image differs.
        let png2 = dir.path().join("c.png");
        let b: Vec<String> = a
            .iter()
            .map(|x| {
                if x == "torch" {
                    "chacha8".into()
                } else if x == s(&png) {
                    s(&png2).into()
                } else {
                    x.clone()
                }
            })
            .collect();
        let o = run(&b);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert!(
            psnr(&png2, &t["image_u8"]) < 40.0,
            "{case}: chacha8 should differ"
        );
        n += 1;
    }
    assert_eq!(n, 6);
}

fn png_of(args: &[&str], out: &Path) -> Vec<u8> {
    let mut a = vec![
        "generate",
        "--prompt",
        "a red circle",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        s(out),
    ];
    a.extend_from_slice(args);
    let o = hybridiff(&a);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    std::fs::read(out).unwrap()
}

#[test]
fn vae_override_takes_a_folder_or_a_file_in_either_naming() {
    let root = fixture("single-file");
    let dir = tempfile::tempdir().unwrap();
    let (file, folder) = (root.join("sd15.safetensors"), root.join("sd15"));
    let base = png_of(
        &["--model", s(&file), "--config", s(&folder)],
        &dir.path().join("a.png"),
    );
    let vae_dir = folder.join("vae");
    let vae_file = vae_dir.join("diffusion_pytorch_model.safetensors");
    for (i, vae) in [vae_dir.as_path(), vae_file.as_path(), file.as_path()]
        .iter()
        .enumerate()
    {
        let png = png_of(
            &["--model", s(&file), "--config", s(&folder), "--vae", s(vae)],
            &dir.path().join(format!("v{i}.png")),
        );
        assert_eq!(png, base, "--vae {}", vae.display());
    }
    // Another pipeline's VAE decodes differently.
    let other = png_of(
        &[
            "--model",
            s(&folder),
            "--vae",
            s(&root.join("sdxl").join("vae")),
        ],
        &dir.path().join("o.png"),
    );
    assert_ne!(other, base);
}

/// `generate` that must fail saying every string of `says`, writing nothing.
fn refused(args: &[&str], says: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let mut a = vec![
        "generate",
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        s(&out),
    ];
    a.extend_from_slice(args);
    let o = hybridiff(&a);
    let e = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    for w in says {
        assert!(e.contains(w), "{args:?}: {e}");
    }
    assert!(!e.contains("panicked"), "{e}");
    assert!(!out.exists());
}

#[test]
fn bad_single_file_input_is_refused_naming_the_file() {
    let root = fixture("single-file");
    let sd15 = root.join("sd15.safetensors");
    // The tiny file is SD 1.x by its names, but not of SD 1.x's published shapes.
    refused(
        &["--model", s(&sd15)],
        &["sd15.safetensors", "SD 1.x", "--config"],
    );
    // --config of another family.
    refused(
        &["--model", s(&sd15), "--config", s(&root.join("sdxl"))],
        &["StableDiffusionXLPipeline", "SD 1.x"],
    );
    // --config goes with single files only.
    refused(
        &[
            "--model",
            s(&root.join("sd15")),
            "--config",
            s(&root.join("sd15")),
        ],
        &["--config", "single-file"],
    );
    // A config folder without its tokenizer.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg");
    for sub in ["unet", "vae", "text_encoder", "scheduler"] {
        std::fs::create_dir_all(cfg.join(sub)).unwrap();
    }
    for f in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ] {
        std::fs::copy(root.join("sd15").join(f), cfg.join(f)).unwrap();
    }
    refused(
        &["--model", s(&sd15), "--config", s(&cfg)],
        &["tokenizer", "missing"],
    );
    // Pickles, by name or content, and files that are no model.
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02}q\x00.").unwrap();
    refused(
        &["--model", s(&ckpt)],
        &["model.ckpt", "pickle", "runs any code"],
    );
    let lora = fixture("lora").join("sd15_kohya.safetensors");
    refused(&["--model", s(&lora)], &["LoRA", "--lora"]);
    let vae = root
        .join("sd15")
        .join("vae")
        .join("diffusion_pytorch_model.safetensors");
    refused(&["--model", s(&vae)], &["VAE", "--vae"]);
    // A VAE that is not one.
    refused(
        &[
            "--model",
            s(&root.join("sd15")),
            "--vae",
            s(&root
                .join("sd15")
                .join("text_encoder")
                .join("model.safetensors")),
        ],
        &["not a VAE"],
    );
    // The output may not replace the model file.
    let o = hybridiff(&[
        "generate",
        "--prompt",
        "x",
        "--model",
        s(&sd15),
        "--config",
        s(&root.join("sd15")),
        "--out",
        s(&sd15),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--out"),
        "{}",
        stderr(&o)
    );
}

/// A `--vae` of another family (SD3's 16 latent channels beside the default model's
/// 4-channel U-Net) is refused before the first step, naming both channel counts and
/// `--vae`; nothing is written.
#[test]
fn a_vae_of_another_family_is_refused_before_compute() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v.png");
    let vae = fixture("tiny-sd3").join("vae");
    let o = hybridiff(&[
        "generate",
        "--prompt",
        "a red circle",
        "--steps",
        "10000",
        "--vae",
        s(&vae),
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("16 latent channels") && err.contains("makes 4") && err.contains("--vae"),
        "{err}"
    );
    assert!(!out.exists());
}
