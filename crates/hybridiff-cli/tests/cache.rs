//! `--cache` on the command line: bad specs, specs that do not fit the model and bad
//! `cache` keys in hybridiff.json are refused before compute naming the flag or the file
//! and key; `--cache default` takes the model's recommendation; no flag (or `none`) changes
//! nothing; bench runs each strategy with and without the cache and counts forwards; the
//! memory estimate names the cache.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{fixture, hybridiff, s, stderr};

fn denoise(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let inputs = fixture("tiny-sdxl/inputs.safetensors");
    let inputs = if model.join("transformer").exists() {
        fixture("tiny-sd3/inputs.safetensors")
    } else {
        inputs
    };
    let mut args = vec![
        "denoise",
        "--model",
        s(model),
        "--inputs",
        s(&inputs),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    hybridiff(&args)
}

fn expect_refused(o: &Output, out: &Path, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!out.exists(), "an output was written");
}

/// A copy of the tiny SDXL denoiser folder (by symbolic links) with this `hybridiff.json`.
#[cfg(unix)]
fn tiny_sdxl_with(dir: &Path, json: Option<&str>) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for part in ["unet", "scheduler", "vae"] {
        std::os::unix::fs::symlink(fixture("tiny-sdxl").join(part), m.join(part)).unwrap();
    }
    if let Some(json) = json {
        std::fs::write(m.join("hybridiff.json"), json).unwrap();
    }
    m
}

#[test]
fn bad_cache_flags_are_refused_before_compute_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let sdxl = fixture("tiny-sdxl");
    let sd3 = fixture("tiny-sd3");
    let cases: &[(&Path, &str, &[&str])] = &[
        (
            &sdxl,
            "fastcache",
            &["--cache fastcache", "unknown method", "deepcache"],
        ),
        (
            &sdxl,
            "deepcache:speed=2",
            &["--cache", "no parameter `speed`", "interval"],
        ),
        (
            &sdxl,
            "deepcache:interval=1",
            &["interval=1 is out of range", "from 2 to 1000"],
        ),
        (
            &sdxl,
            "deepcache:interval=x",
            &["interval=x is not a number"],
        ),
        (&sdxl, "deepcache:interval=2,interval=3", &["given twice"]),
        (
            &sdxl,
            "deepcache:branch=3",
            &["branch=3", "branch is 0 to 2"],
        ),
        (
            &sdxl,
            "deepcache:warmup=8",
            &["warmup=8 leaves none of the 8 steps"],
        ),
        (
            &sdxl,
            "teacache:threshold=0",
            &["threshold=0 is out of range"],
        ),
        (&sdxl, "teacache:threshold=-1", &["out of range"]),
        (
            &sd3,
            "deepcache",
            &["deepcache fits U-Nets", "use --cache teacache"],
        ),
        (
            &sdxl,
            "default",
            &["--cache default", "recommends no cache"],
        ),
    ];
    for (model, spec, needles) in cases {
        let o = denoise(model, &out, &["--steps", "8", "--cache", spec]);
        expect_refused(&o, &out, needles);
    }
    // The other commands take the flag too and refuse the same way, before any run.
    let o = hybridiff(&[
        "bench",
        "--model",
        s(&sd3),
        "--repeats",
        "0",
        "--steps",
        "4",
        "--cache",
        "deepcache",
    ]);
    expect_refused(&o, &out, &["use --cache teacache"]);
    let png = dir.path().join("x.png");
    let o = hybridiff(&[
        "generate",
        "--prompt",
        "a red circle",
        "--steps",
        "4",
        "--out",
        s(&png),
        "--cache",
        "deepcache:interval=0",
    ]);
    expect_refused(&o, &png, &["--cache deepcache:interval=0", "out of range"]);
    let o = hybridiff(&["serve", "--port", "0", "--cache", "nocache"]);
    expect_refused(&o, &png, &["--cache nocache", "unknown method"]);
}

#[cfg(unix)]
#[test]
fn cache_keys_in_hybridiff_json_are_checked_and_default_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    for (i, (json, needles)) in [
        (
            r#"{"cache": "deepcache:interval=1"}"#,
            &["hybridiff.json", "key `cache`", "interval=1"][..],
        ),
        (
            r#"{"cache": "fastcache"}"#,
            &["hybridiff.json", "key `cache`", "unknown method"][..],
        ),
        (r#"{"cache": 3}"#, &["hybridiff.json", "cache"][..]),
        (
            r#"{"cache": "deepcache:branch=9"}"#,
            &["--cache default", "hybridiff.json", "branch is 0 to 2"][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let model = tiny_sdxl_with(&dir.path().join(i.to_string()), Some(json));
        let o = denoise(&model, &out, &["--steps", "6", "--cache", "default"]);
        expect_refused(&o, &out, needles);
    }
    // `default` takes the recommendation, and says so.
    let model = tiny_sdxl_with(
        &dir.path().join("good"),
        Some(r#"{"cache": "deepcache:interval=2,warmup=2"}"#),
    );
    let trace = dir.path().join("t.json");
    let o = denoise(
        &model,
        &out,
        &["--steps", "6", "--cache", "default", "--trace", s(&trace)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--cache default: deepcache:interval=2,branch=0,warmup=2 (from"),
        "{}",
        stderr(&o)
    );
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert_eq!(t["cache"], "deepcache:interval=2,branch=0,warmup=2");
    let decisions: Vec<&str> = t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cache"]["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        ["computed", "computed", "computed", "cached", "computed", "cached"]
    );
    // The recommendation is only taken when asked for.
    std::fs::remove_file(&out).unwrap();
    let o = denoise(&model, &out, &["--steps", "6", "--trace", s(&trace)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert!(t.get("cache").is_none(), "{t}");
}

#[test]
fn without_the_flag_or_with_none_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture("tiny-sdxl");
    let mut outs = Vec::new();
    for (i, extra) in [&[][..], &["--cache", "none"][..]].into_iter().enumerate() {
        let out = dir.path().join(format!("{i}.safetensors"));
        let trace = dir.path().join(format!("{i}.json"));
        let mut args = vec!["--steps", "6", "--trace", s(&trace)];
        args.extend_from_slice(extra);
        let o = denoise(&root, &out, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
        assert!(t.get("cache").is_none());
        assert_eq!(t["cached_steps"], 0);
        assert_eq!(t["forwards"], 12.0);
        outs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
    // ... and a cache does change the result (so the comparison above could fail).
    let out = dir.path().join("c.safetensors");
    let o = denoise(
        &root,
        &out,
        &["--steps", "6", "--cache", "deepcache:interval=2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read(&out).unwrap(), outs[0]);
}

#[test]
fn bench_runs_every_strategy_with_and_without_the_cache_and_counts_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture("tiny-sdxl");
    let json = dir.path().join("b.json");
    let md = dir.path().join("b.md");
    let traces = dir.path().join("traces");
    std::fs::create_dir(&traces).unwrap();
    let o = hybridiff(&[
        "bench",
        "--model",
        s(&root),
        "--inputs",
        s(&root.join("inputs.safetensors")),
        "--strategies",
        "serial,cfg,hybrid",
        "--steps",
        "12",
        "--repeats",
        "0",
        "--l-slope",
        "3",
        "--eps-slope",
        "0.05",
        "--k",
        "3",
        "--tau-cap",
        "6",
        "--cache",
        "deepcache:interval=3",
        "--json",
        s(&json),
        "--markdown",
        s(&md),
        "--trace-dir",
        s(&traces),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let rows: Vec<(&str, &str)> = runs
        .iter()
        .map(|r| {
            (
                r["strategy"].as_str().unwrap(),
                r["cache"].as_str().unwrap(),
            )
        })
        .collect();
    let spec = "deepcache:interval=3,branch=0,warmup=1";
    assert_eq!(
        rows,
        [
            ("serial", "-"),
            ("serial", spec),
            ("cfg", "-"),
            ("cfg", spec),
            ("hybrid", "-"),
            ("hybrid", spec)
        ]
    );
    for pair in runs.chunks(2) {
        let (plain, cached) = (&pair[0], &pair[1]);
        assert_eq!(plain["cached_steps"], 0);
        assert_eq!(plain["forwards_saved"], 0.0);
        assert!(cached["cached_steps"].as_u64().unwrap() > 0);
        let saved = cached["forwards_saved"].as_f64().unwrap();
        assert!(saved > 0.0);
        // The cache removes compute and adds none.
        let (f0, f1) = (
            plain["forwards"].as_f64().unwrap(),
            cached["forwards"].as_f64().unwrap(),
        );
        assert!(
            (f1 + saved - f0).abs() < 1e-6 || plain["strategy"] == "hybrid",
            "{pair:?}"
        );
        assert!(f1 < f0);
        assert!(
            cached["psnr_db"].as_f64().unwrap() < 100.0,
            "cached vs uncached serial"
        );
    }
    assert_eq!(runs[0]["forwards"], 24.0);
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(
        table.contains("| cache |") && table.contains(spec),
        "{table}"
    );
    for f in [
        "serial.json",
        "serial-deepcache.json",
        "hybrid-deepcache.json",
    ] {
        assert!(traces.join(f).is_file(), "{f}");
    }
}

#[test]
fn the_memory_estimate_counts_the_step_cache() {
    let root = fixture("tiny-sdxl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--model",
            s(&root),
            "--latent-size",
            "128",
            "--strategies",
            "serial",
            "--repeats",
            "0",
            "--steps",
            "4",
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_hybridiff"))
            .args(&args)
            .env("HYBRIDIFF_MEMORY_LIMIT", "20M")
            .output()
            .unwrap()
    };
    let o = run(&["--cache", "deepcache"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("step cache (--cache deepcache)"), "{err}");
    let o = run(&[]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("needs an estimated") && !err.contains("step cache"),
        "{err}"
    );
}

#[test]
fn the_default_models_recommendation_is_taken_and_stays_near_serial() {
    let dir = tempfile::tempdir().unwrap();
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default/hybridiff.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let recommended: hybridiff_engine::cache::CacheSpec =
        rec["cache"].as_str().unwrap().parse().unwrap();
    let batch = dir.path().join("b.json");
    std::fs::write(
        &batch,
        r#"[{"prompt": "a red circle on a white background", "seed": 1},
            {"prompt": "a green triangle on a black background", "seed": 2}]"#,
    )
    .unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["generate", "--prompts", s(&batch), "--out", s(&out)];
        args.extend_from_slice(extra);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_hybridiff"))
            .args(&args)
            .env("HYBRIDIFF_CACHE", dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        (out, m)
    };
    let (serial, m) = run("serial", &["--threads-per-rank", "1"]);
    assert_eq!(m[0]["forwards"], 40.0, "20 recommended steps, 2 branches");
    for (name, extra) in [
        (
            "serial-cache",
            &["--threads-per-rank", "1", "--cache", "default"][..],
        ),
        (
            "hybrid-cache",
            &[
                "--strategy",
                "hybrid",
                "--threads-per-rank",
                "1",
                "--cache",
                "default",
            ][..],
        ),
    ] {
        let (out, m) = run(name, extra);
        for e in m.as_array().unwrap() {
            assert_eq!(e["cache"], recommended.to_string().as_str());
            assert!(e["cached_steps"].as_u64().unwrap() > 0, "{e}");
            // Fewer than serial's 40 without a cache (hybrid's detection steps compute).
            assert!(e["forwards_saved"].as_f64().unwrap() > 0.0, "{e}");
            assert!(e["forwards"].as_f64().unwrap() < 40.0, "{e}");
        }
        let o = hybridiff(&["compare", s(&serial), s(&out), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let (psnr, ssim) = (
            v["mean_psnr_db"].as_f64().unwrap(),
            v["mean_ssim"].as_f64().unwrap(),
        );
        eprintln!("{name}: {psnr:.2} dB, SSIM {ssim:.4}");
        assert!(
            psnr >= 30.0 && ssim >= 0.95,
            "{name}: {psnr} dB, SSIM {ssim}"
        );
    }
}
