//! Issue 23 from the command line: sampler names (ours and diffusers' class names, with a
//! suggestion for a near miss), `--karras`, `--guidance-rescale`, refusals before compute
//! that name the flag or config key, and stochastic samplers giving each image of a batch
//! the image its own run gives, on any strategy.

use std::path::Path;
use std::process::Command;

mod common;
use common::{fixture, hybridiff, s, stderr};

/// `hybridiff denoise` on the tiny SDXL with `extra` flags, 4 steps; `Ok(latents)` or
/// `Err(stderr)`.
fn denoise(dir: &Path, name: &str, extra: &[&str]) -> Result<Vec<f32>, String> {
    let root = fixture("tiny-sdxl");
    let inputs = root.join("inputs.safetensors");
    let out = dir.join(format!("{name}.safetensors"));
    let mut args = vec![
        "denoise",
        "--model",
        s(&root),
        "--inputs",
        s(&inputs),
        "--out",
        s(&out),
        "--threads-per-rank",
        "1",
    ];
    if !extra.contains(&"--steps") {
        args.extend(["--steps", "4"]);
    }
    args.extend_from_slice(extra);
    let o = hybridiff(&args);
    if !o.status.success() {
        assert!(
            !out.exists(),
            "{name}: a refused run wrote {}",
            out.display()
        );
        return Err(stderr(&o));
    }
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    Ok(t["latents"].flatten_all().unwrap().to_vec1().unwrap())
}

#[test]
fn every_sampler_runs_by_our_name_and_by_its_class_name() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = [
        ("euler-a", "EulerAncestralDiscreteScheduler"),
        ("unipc", "UniPCMultistepScheduler"),
        ("lcm", "LCMScheduler"),
        ("dpmpp-2m", "DPMSolverMultistepScheduler"),
        ("euler", "EulerDiscreteScheduler"),
    ];
    for (ours, class) in pairs {
        let a = denoise(dir.path(), ours, &["--scheduler", ours]).unwrap();
        let b = denoise(dir.path(), class, &["--scheduler", class]).unwrap();
        assert_eq!(a, b, "{ours} vs {class}");
        assert!(a.iter().all(|v| v.is_finite()), "{ours}");
    }
    // SDE: stochastic, from --seed.
    let a = denoise(
        dir.path(),
        "sde1",
        &["--scheduler", "dpmpp-2m-sde", "--seed", "1"],
    )
    .unwrap();
    let b = denoise(
        dir.path(),
        "sde2",
        &["--scheduler", "dpmpp-2m-sde", "--seed", "2"],
    )
    .unwrap();
    assert_ne!(a, b, "the seed drives the SDE's noise");
    let k = denoise(
        dir.path(),
        "karras",
        &["--scheduler", "dpmpp-2m", "--karras"],
    )
    .unwrap();
    let plain = denoise(dir.path(), "plain", &["--scheduler", "dpmpp-2m"]).unwrap();
    assert_ne!(k, plain, "--karras changed nothing");
    // A deterministic sampler ignores the seed.
    let d1 = denoise(dir.path(), "ddim1", &["--seed", "1"]).unwrap();
    let d2 = denoise(dir.path(), "ddim2", &["--seed", "2"]).unwrap();
    assert_eq!(d1, d2);
}

#[test]
fn a_near_miss_gets_a_suggestion_and_help_lists_every_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let err = denoise(dir.path(), "typo", &["--scheduler", "eulr-a"]).unwrap_err();
    assert!(
        err.contains("euler-a") && err.contains("possible values"),
        "{err}"
    );
    let err = denoise(dir.path(), "typo2", &["--scheduler", "pndm"]).unwrap_err();
    assert!(
        err.contains("dpmpp-2m-sde") && err.contains("LCMScheduler"),
        "{err}"
    );
    for cmd in ["generate", "denoise", "serve"] {
        let help = String::from_utf8_lossy(&hybridiff(&[cmd, "--help"]).stdout).into_owned();
        for name in hybridiff_schedulers::SchedulerKind::names() {
            assert!(help.contains(name), "{cmd} --help lacks {name}");
        }
        assert!(
            help.contains("--karras") && help.contains("--guidance-rescale"),
            "{cmd}"
        );
    }
}

#[test]
fn what_a_sampler_cannot_run_is_refused_before_compute_naming_the_flag_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        // DDIM (the fixture's) has no Karras sigmas in diffusers.
        (&["--karras"], &["--karras", "DDIMScheduler"]),
        (
            &["--scheduler", "euler-a", "--karras"],
            &["--karras", "EulerAncestralDiscreteScheduler"],
        ),
        // LCM runs at most its original_inference_steps (50).
        (
            &["--scheduler", "lcm", "--steps", "60"],
            &["--steps 60", "original_inference_steps"],
        ),
        // UniPC's order 2 needs 2 steps.
        (
            &["--scheduler", "unipc", "--steps", "1"],
            &["--steps 1", "solver_order"],
        ),
        (&["--guidance-rescale", "1.5"], &["--guidance-rescale"]),
        (&["--guidance-rescale", "-0.2"], &["--guidance-rescale"]),
        (&["--guidance-rescale", "nan"], &["--guidance-rescale"]),
    ];
    for (i, (flags, want)) in cases.iter().enumerate() {
        let err = denoise(dir.path(), &format!("bad{i}"), flags).unwrap_err();
        for w in *want {
            assert!(err.contains(w), "{flags:?}: no {w:?} in {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
    // generate too, before the prompt is encoded.
    for (flags, want) in [
        (
            &["--scheduler", "lcm", "--steps", "51"][..],
            "original_inference_steps",
        ),
        (&["--scheduler", "ddim", "--karras"][..], "--karras"),
    ] {
        let out = dir.path().join("g.png");
        let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
            .args(["generate", "--model"])
            .arg(fixture("tiny-sdxl-pipeline"))
            .args(["--prompt", "a red circle", "--out"])
            .arg(&out)
            .args(flags)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(!o.status.success() && !out.exists(), "{flags:?}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    // SD3 (flow matching): diffusers' SD3 pipeline has no guidance_rescale.
    let root = fixture("tiny-sd3");
    let out = dir.path().join("sd3.safetensors");
    let o = hybridiff(&[
        "denoise",
        "--model",
        s(&root),
        "--inputs",
        s(&root.join("inputs.safetensors")),
        "--out",
        s(&out),
        "--steps",
        "2",
        "--guidance-rescale",
        "0.7",
    ]);
    assert!(!o.status.success() && !out.exists());
    let err = stderr(&o);
    assert!(
        err.contains("--guidance-rescale") && err.contains("SD3"),
        "{err}"
    );
}

fn generate(dir: &Path, out: &str, extra: &[&str]) -> Vec<u8> {
    let path = dir.join(out);
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .args(["generate", "--model"])
        .arg(fixture("tiny-sdxl-pipeline"))
        .args(["--steps", "5", "--threads-per-rank", "1", "--out"])
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    std::fs::read(if path.is_dir() {
        path.join("0001.png")
    } else {
        path
    })
    .unwrap()
}

#[test]
fn image_i_of_a_batch_is_its_own_run_with_a_stochastic_sampler_on_any_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a red circle\na blue square\n").unwrap();
    let mut by_noise = Vec::new();
    for (sampler, noise) in [
        ("euler-a", "chacha8"),
        ("dpmpp-2m-sde", "chacha8"),
        ("lcm", "chacha8"),
        // The torch generator: each image replays its own from its seed.
        ("euler-a", "torch"),
        ("lcm", "torch"),
    ] {
        let sampler_flags = [
            "--scheduler",
            sampler,
            "--guidance-rescale",
            "0.5",
            "--noise",
            noise,
        ];
        let sampler = format!("{sampler}-{noise}");
        let sampler = sampler.as_str();
        let mut batch_flags = vec!["--prompts", s(&prompts), "--seed", "40"];
        batch_flags.extend(sampler_flags);
        // Prompt 1 of the batch gets seed 41.
        let batch = generate(dir.path(), &format!("batch-{sampler}"), &batch_flags);
        let mut one_flags = vec!["--prompt", "a blue square", "--seed", "41"];
        one_flags.extend(sampler_flags);
        let alone = generate(dir.path(), &format!("{sampler}.png"), &one_flags);
        assert_eq!(
            batch, alone,
            "{sampler}: image 1 of the batch differs from its own run"
        );
        // The same image with the branches on two ranks.
        let mut cfg_flags = one_flags.clone();
        cfg_flags.extend(["--strategy", "cfg", "--world-size", "2"]);
        let cfg = generate(dir.path(), &format!("{sampler}-cfg.png"), &cfg_flags);
        assert_eq!(cfg, alone, "{sampler}: cfg on 2 ranks differs from serial");
        // Another seed: another image (the noise is used).
        let mut other = one_flags.clone();
        other[3] = "42";
        let other = generate(dir.path(), &format!("{sampler}-42.png"), &other);
        assert_ne!(other, alone, "{sampler}: the seed changed nothing");
        by_noise.push((sampler.to_string(), alone));
    }
    // euler-a's image differs between the generators.
    assert_ne!(
        by_noise[0].1, by_noise[3].1,
        "{} = {}",
        by_noise[0].0, by_noise[3].0
    );
}

/// `generate --noise torch --seed S` gives diffusers' picture from
/// `generator=torch.Generator("cpu").manual_seed(S)` on the embedded default model, for the
/// samplers that draw noise in every step (euler-a, dpmpp-2m-sde) or between steps (lcm)
/// and two that draw none, on serial and on the condition split (fixtures:
/// tools/make_sampler_torch_fixtures.py, diffusers' StableDiffusionPipeline).
#[test]
fn torch_noise_gives_diffusers_images_for_the_stochastic_samplers() {
    let root = fixture("samplers-torch");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("expected.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let number = |k: &str| expected[k].as_f64().unwrap().to_string();
    let (seed, steps, guidance) = (number("seed"), number("steps"), number("guidance"));
    for case in expected["cases"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let flags: Vec<&str> = case["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let want = image::open(root.join(file)).unwrap().to_rgb8();
        for strategy in [
            &["--strategy", "serial"][..],
            &["--strategy", "cfg", "--world-size", "2"],
        ] {
            let out = dir.path().join(format!("{}-{file}", strategy[1]));
            let mut args = vec![
                "generate",
                "--prompt",
                expected["prompt"].as_str().unwrap(),
                "--seed",
                &seed,
                "--steps",
                &steps,
                "--guidance",
                &guidance,
                "--noise",
                "torch",
                "--threads-per-rank",
                "1",
                "--out",
                s(&out),
            ];
            args.extend_from_slice(&flags);
            args.extend_from_slice(strategy);
            let o = hybridiff(&args);
            assert!(o.status.success(), "{args:?}: {}", stderr(&o));
            let got = image::open(&out).unwrap().to_rgb8();
            assert_eq!(got.dimensions(), want.dimensions(), "{file}");
            // Float rounding between PyTorch's kernels and ours may move a pixel by a level
            // or two in the samplers that add noise every step; the picture is the same.
            let worst = got
                .as_raw()
                .iter()
                .zip(want.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            let psnr = hybridiff_engine::metrics::psnr_u8(got.as_raw(), want.as_raw());
            assert!(
                worst <= 8 && psnr >= 50.0,
                "{file} {strategy:?}: worst pixel difference {worst}, PSNR {psnr:.1} dB against diffusers"
            );
        }
    }
}

/// `--guidance-rescale` acts on the guided prediction only: with guidance <= 1 it would be
/// ignored, so it is refused (as `--negative-prompt` is), before anything is written.
#[test]
fn guidance_rescale_without_classifier_free_guidance_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g.png");
    let o = hybridiff(&[
        "generate",
        "--prompt",
        "a red circle",
        "--steps",
        "4",
        "--guidance",
        "1",
        "--guidance-rescale",
        "0.7",
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--guidance-rescale 0.7") && err.contains("--guidance above 1"),
        "{err}"
    );
    assert!(!out.exists());
}
