//! `hybridiff tune`, `hybridiff plot` and `compare --lpips` through the binary, on the tiny
//! SDXL pipeline fixture (12 steps, a small grid: seconds per run).

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The common flags of a small tune on the tiny pipeline.
fn tune_args<'a>(model: &'a str, prompts: &'a str, out: &'a str, report: &'a str) -> Vec<&'a str> {
    vec![
        "tune",
        "--model",
        model,
        "--prompts",
        prompts,
        "--steps",
        "12",
        "--seeds",
        "1",
        "--holdout-seeds",
        "1",
        "--l-slope",
        "2,3",
        "--eps-slope",
        "1e-3,2e-2",
        "--k",
        "2,3",
        "--tau-cap",
        "5,8",
        "--pipelined-guidance",
        "none",
        "--threads-per-rank",
        "1",
        "--out",
        out,
        "--report",
        report,
    ]
}

fn prompts_file(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.txt");
    std::fs::write(&p, "a red ball\na green field under a blue sky\n").unwrap();
    p
}

fn png_size(p: &Path) -> (u32, u32) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (img.width(), img.height())
}

/// Pixels that are neither white nor near-white: something was drawn.
fn inked(p: &Path) -> usize {
    image::open(p)
        .unwrap()
        .to_rgb8()
        .pixels()
        .filter(|px| px.0.iter().any(|&c| c < 200))
        .count()
}

#[test]
fn tune_writes_a_recommendation_generate_reads_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts_file(dir.path());
    // A copy of the pipeline, so that its hybridiff.json can be the output.
    let model = dir.path().join("model");
    copy_dir(&fixture("tiny-sdxl-pipeline"), &model);
    let out = model.join("hybridiff.json");
    let report = dir.path().join("report");
    let mut args = tune_args(s(&model), s(&prompts), s(&out), s(&report));
    args.extend(["--min-psnr", "15"]);
    let o = hybridiff(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("chose L "), "{stdout}");
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for key in [
        "steps",
        "guidance",
        "l_slope",
        "eps_slope",
        "k",
        "tau_cap",
        "stages",
        "pipelined_guidance",
    ] {
        assert!(!rec[key].is_null(), "{key}: {rec}");
    }
    assert_eq!(rec["steps"], 12);
    assert_eq!(rec["pipelined_guidance"], "none");
    assert!(
        rec["tune"]["tuning"]["worst"].as_f64().unwrap() >= 15.0,
        "{rec}"
    );
    // The report: Markdown, JSON and two PNGs with something drawn on them.
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(
        md.contains("## Pareto front") && md.contains("(chosen)"),
        "{md}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("tune.json")).unwrap()).unwrap();
    let (grid_runs, made) = (
        j["grid_runs"].as_u64().unwrap(),
        j["runs_made"].as_u64().unwrap(),
    );
    assert_eq!(grid_runs, 16 * 2, "16 candidates on 2 inputs");
    assert!(made < grid_runs, "{made} of {grid_runs}");
    assert_eq!(
        j["schedules_mismatched"], 0,
        "every run took its predicted schedule"
    );
    assert_eq!(j["validation"]["values"].as_array().unwrap().len(), 2);
    assert!(j["candidates"][0]["values"].as_array().unwrap().len() == 2);
    for png in ["latency-quality.png", "rel-mae.png"] {
        let p = report.join(png);
        let (w, h) = png_size(&p);
        assert!(w >= 500 && h >= 300, "{png}: {w}x{h}");
        assert!(inked(&p) > 2000, "{png}: little drawn");
    }
    // generate reads the recommendation: the thresholds it announces are the chosen ones.
    let img = dir.path().join("img.png");
    let o = hybridiff(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a red ball",
        "--strategy",
        "hybrid",
        "--world-size",
        "2",
        "--threads-per-rank",
        "1",
        "--out",
        s(&img),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!(
        "--l-slope {} --eps-slope {:.3e} --k {} --tau-cap {}",
        rec["l_slope"],
        rec["eps_slope"].as_f64().unwrap(),
        rec["k"],
        rec["tau_cap"]
    );
    assert!(stderr(&o).contains(&want), "{want}: {}", stderr(&o));
}

#[test]
fn a_floor_no_candidate_meets_names_the_best_and_writes_no_recommendation() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts_file(dir.path());
    let out = dir.path().join("hybridiff.json");
    let report = dir.path().join("report");
    let model = fixture("tiny-sdxl-pipeline");
    let args = with(
        tune_args(s(&model), s(&prompts), s(&out), s(&report)),
        &[
            ("--min-psnr", "99"),
            ("--holdout-seeds", "0"),
            ("--l-slope", "2"),
            ("--eps-slope", "2e-2"),
            ("--k", "2,3"),
            ("--tau-cap", "5"),
        ],
    );
    let o = hybridiff(&args);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("no candidate meets --min-psnr 99")
            && err.contains("best reached PSNR (dB)")
            && err.contains("worst on a "),
        "{err}"
    );
    assert!(!out.exists(), "no hybridiff.json");
    // The report is complete (it says why), and nothing temporary is left behind.
    assert!(std::fs::read_to_string(report.join("report.md"))
        .unwrap()
        .contains("No candidate meets"));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".hybridiff"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_tune_requests_fail_before_any_run() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts_file(dir.path());
    let model = fixture("tiny-sdxl-pipeline");
    let out = dir.path().join("hybridiff.json");
    let report = dir.path().join("report");
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), "").unwrap();
    let inner = report.join("h.json");
    // (Not under unet/ or vae/: the fixture links those to tiny-sdxl/, outside the folder.)
    let model_file = model.join("h.json");
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("--steps", "4"), ("--k", "3"), ("--tau-cap", "3")],
            "--steps 4: no candidate fits",
        ),
        (vec![("--steps", "2")], "--steps 2: too few"),
        (vec![("--world-size", "3")], "--world-size 3"),
        (
            vec![("--guidance", "1")],
            "--guidance 1: hybrid needs classifier-free guidance",
        ),
        (vec![("--min-psnr", "-3")], "--min-psnr -3"),
        (vec![("--l-slope", "1")], "--l-slope 1"),
        (
            vec![("--stages", "sideways")],
            "--stages: unknown plan `sideways`",
        ),
        (vec![("--simulate-link", "warp")], "--simulate-link warp"),
        (
            vec![("--out", "/nonexistent-folder/h.json")],
            "does not exist",
        ),
        (vec![("--report", s(&full))], "the folder is not empty"),
        (vec![("--out", s(&inner))], "is inside --report"),
        (vec![("--out", s(&model_file))], "inside --model"),
        (vec![("--cache", "nocache")], "unknown method `nocache`"),
        (vec![("--cache", "default")], "tune searches step caches"),
        (
            vec![("--cache", "teacache:warmup=11")],
            "leaves none of the 12 steps",
        ),
        (vec![("--cache", "deepcache:branch=7")], "branch is 0 to"),
        (
            vec![("--pipeline-layout", "per-branch")],
            "per-branch (the flag, or a model's hybridiff.json",
        ),
        (vec![("--pipeline-layout", "diagonal")], "diagonal"),
    ];
    let check = |args: Vec<&str>, needle: &str| {
        let start = std::time::Instant::now();
        let o = hybridiff(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(needle),
            "{args:?}: expected `{needle}` in: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            start.elapsed().as_secs_f64() < 20.0,
            "{args:?}: took {:?}",
            start.elapsed()
        );
        assert!(
            !out.exists() && !report.exists(),
            "{args:?} wrote something"
        );
    };
    for (extra, needle) in cases {
        check(
            with(
                tune_args(s(&model), s(&prompts), s(&out), s(&report)),
                &extra,
            ),
            needle,
        );
    }
    // A bare denoiser folder has no VAE: PSNR of latents only, and no prompts.
    let bare = fixture("tiny-sdxl");
    let mut args = tune_args(s(&bare), s(&prompts), s(&out), s(&report));
    let at = args.iter().position(|a| *a == "--prompts").unwrap();
    args.drain(at..at + 2);
    check(with(args.clone(), &[("--min-ssim", "0.9")]), "no VAE");
    check(
        with(tune_args(s(&bare), s(&prompts), s(&out), s(&report)), &[]),
        "no text encoder",
    );
    // --max-lpips needs --lpips (clap names both).
    check(
        with(
            tune_args(s(&model), s(&prompts), s(&out), s(&report)),
            &[("--max-lpips", "0.1")],
        ),
        "--lpips",
    );
}

/// `args` with each flag's value replaced, or the flag appended.
fn with<'a>(mut args: Vec<&'a str>, flags: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    for &(flag, value) in flags {
        match args.iter().position(|a| *a == flag) {
            Some(at) => args[at + 1] = value,
            None => args.extend([flag, value]),
        }
    }
    args
}

#[test]
fn plot_draws_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.json");
    let o = hybridiff(&[
        "generate",
        "--model",
        s(&fixture("tiny-sdxl-pipeline")),
        "--prompt",
        "a red ball",
        "--steps",
        "12",
        "--strategy",
        "hybrid",
        "--world-size",
        "2",
        "--threads-per-rank",
        "1",
        "--l-slope",
        "2",
        "--eps-slope",
        "0.02",
        "--k",
        "3",
        "--tau-cap",
        "6",
        "--trace",
        s(&trace),
        "--out",
        s(&dir.path().join("x.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let png = dir.path().join("trace.png");
    let o = hybridiff(&["plot", s(&trace), "--out", s(&png)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&png), (1000, 960));
    assert!(inked(&png) > 5000);
    // Not a trace, and an output that would replace the input.
    let o = hybridiff(&["plot", s(&prompts_file(dir.path())), "--out", s(&png)]);
    assert!(
        !o.status.success() && stderr(&o).contains("not a trace"),
        "{}",
        stderr(&o)
    );
    let o = hybridiff(&["plot", s(&trace), "--out", s(&trace)]);
    assert!(!o.status.success(), "{}", stderr(&o));
}

#[test]
fn compare_with_lpips_prints_the_lpips_packages_distances() {
    let dir = tempfile::tempdir().unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lpips/expected.json")).unwrap())
            .unwrap();
    let mut t =
        hybridiff_models::lpips::seeded_backbone(expected["backbone_seed"].as_u64().unwrap())
            .unwrap();
    t.extend(
        candle_core::safetensors::load(
            fixture("lpips/heads.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let w = dir.path().join("lpips.safetensors");
    candle_core::safetensors::save(&t, &w).unwrap();
    let o = hybridiff(&[
        "compare",
        s(&fixture("lpips/a")),
        s(&fixture("lpips/b")),
        "--lpips",
        s(&w),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = expected["distances"].as_object().unwrap();
    let mean = want.values().map(|x| x.as_f64().unwrap()).sum::<f64>() / want.len() as f64;
    let got = v["mean_lpips"].as_f64().unwrap();
    assert!((got - mean).abs() <= 1e-4 * mean + 1e-7, "{got} vs {mean}");
    let o = hybridiff(&[
        "compare",
        s(&fixture("lpips/a")),
        s(&fixture("lpips/b")),
        "--lpips",
        s(&dir.path().join("none")),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--lpips"),
        "{}",
        stderr(&o)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        // The fixture links some components to tiny-sdxl/: copy what they point to.
        if std::fs::metadata(e.path()).unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A bare denoiser folder as `hybridiff init` writes one (a model_index.json of `class`,
/// no text encoder or VAE) in `dir`, linking the fixture's denoiser and scheduler.
#[cfg(unix)]
fn bare_folder(dir: &Path, fixture_name: &str, denoiser: &str, class: &str) -> PathBuf {
    let model = dir.join("bare");
    std::fs::create_dir(&model).unwrap();
    for part in [denoiser, "scheduler"] {
        std::os::unix::fs::symlink(fixture(fixture_name).join(part), model.join(part)).unwrap();
    }
    let index = format!(r#"{{"_class_name": "{class}"}}"#);
    std::fs::write(model.join("model_index.json"), index).unwrap();
    model
}

/// A small tune of a bare denoiser folder: 8 steps, two candidates, no held-out seed.
fn bare_tune_args<'a>(model: &'a str, out: &'a str, report: &'a str) -> Vec<&'a str> {
    vec![
        "tune",
        "--model",
        model,
        "--steps",
        "8",
        "--l-slope",
        "2",
        "--eps-slope",
        "2e-2",
        "--k",
        "2",
        "--tau-cap",
        "3,4",
        "--pipelined-guidance",
        "none",
        "--holdout-seeds",
        "0",
        "--threads-per-rank",
        "1",
        "--min-psnr",
        "10",
        "--out",
        out,
        "--report",
        report,
    ]
}

/// A bare denoiser folder (as `hybridiff init` writes: a model_index.json but no text
/// encoder or VAE) is tuned in latent space on seeded random embeddings.
#[cfg(unix)]
#[test]
fn a_bare_denoiser_folder_is_tuned_on_latents() {
    let dir = tempfile::tempdir().unwrap();
    let model = bare_folder(dir.path(), "tiny-sdxl", "unet", "StableDiffusionXLPipeline");
    let (out, report) = (dir.path().join("h.json"), dir.path().join("r"));
    let o = hybridiff(&bare_tune_args(s(&model), s(&out), s(&report)));
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("latent space"), "{md}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("tune.json")).unwrap()).unwrap();
    assert_eq!(
        j["inputs"].as_array().unwrap().len(),
        3,
        "three random conditionings"
    );
    assert!(j["runs"][0]["quality"]["ssim"].is_null());
    assert!(out.is_file());
}

/// `tune --out` (JSON) and `plot --out` (PNG) follow the output rules of every command:
/// `-` is refused (nothing is written to standard output), a PNG plot must end in .png and
/// the JSON may not carry an image extension; refused before anything is read.
#[test]
fn tune_and_plot_outputs_refuse_dash_and_wrong_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.json");
    for (out, want) in [
        ("-", "nothing is written to standard output"),
        ("p.jpg", "PNG images only"),
        ("p.json", "PNG images only"),
    ] {
        let o = hybridiff(&["plot", s(&trace), "--out", out]);
        assert_eq!(o.status.code(), Some(1), "plot --out {out}");
        assert!(
            stderr(&o).contains(want),
            "plot --out {out}: {}",
            stderr(&o)
        );
    }
    for (out, want) in [
        ("-", "nothing is written to standard output"),
        ("t.png", "not an image"),
    ] {
        let report = dir.path().join("report");
        let o = hybridiff(&["tune", "--out", out, "--report", s(&report)]);
        assert_eq!(o.status.code(), Some(1), "tune --out {out}");
        assert!(
            stderr(&o).contains(want),
            "tune --out {out}: {}",
            stderr(&o)
        );
        assert!(!report.exists());
    }
    assert!(!std::path::Path::new("-").exists());
}

/// `--cache` joins the grid: every candidate runs with and without the cache, the cache
/// leaves the schedules predicted (no mismatch), cached steps cost less in the latency
/// model, and the choice's cache is what hybridiff.json recommends.
#[test]
fn tune_searches_a_step_cache_on_top_of_the_schedules() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts_file(dir.path());
    let model = fixture("tiny-sdxl-pipeline");
    let out = dir.path().join("hybridiff.json");
    let report = dir.path().join("report");
    let mut args = tune_args(s(&model), s(&prompts), s(&out), s(&report));
    args.extend([
        "--min-psnr",
        "5",
        "--cache",
        "teacache:threshold=0.5,warmup=1",
        "--cache",
        "deepcache:warmup=1",
    ]);
    let o = hybridiff(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("tune.json")).unwrap()).unwrap();
    // 16 switching candidates x (no cache, teacache 0.5, deepcache interval 2..=5).
    assert_eq!(j["grid_runs"].as_u64().unwrap(), 16 * 6 * 2);
    assert_eq!(
        j["schedules_mismatched"], 0,
        "the cache left every schedule predicted"
    );
    let candidates = j["candidates"].as_array().unwrap();
    let cache_of = |c: &serde_json::Value| c["knobs"]["cache"].as_str().map(str::to_string);
    let specs: std::collections::BTreeSet<String> =
        candidates.iter().filter_map(cache_of).collect();
    assert_eq!(
        specs.into_iter().collect::<Vec<_>>(),
        [
            "deepcache:interval=2,branch=0,warmup=1",
            "deepcache:interval=3,branch=0,warmup=1",
            "deepcache:interval=4,branch=0,warmup=1",
            "deepcache:interval=5,branch=0,warmup=1",
            "teacache:threshold=0.5,warmup=1",
        ]
    );
    // Each cached candidate has an uncached twin (same thresholds) and its own runs; the
    // runs of cached candidates skipped steps (the latency model's cached step costs are
    // checked in the engine's unit tests, without timing).
    let key = |c: &serde_json::Value| {
        format!(
            "{} {} {} {}",
            c["l_slope"], c["eps_slope"], c["k"], c["tau_cap"]
        )
    };
    for c in candidates.iter().filter(|c| cache_of(c).is_some()) {
        let twin = candidates
            .iter()
            .find(|u| cache_of(u).is_none() && key(u) == key(c))
            .unwrap();
        assert_ne!(c["runs"], twin["runs"], "{c}");
    }
    let runs = j["runs"].as_array().unwrap();
    assert!(
        runs.iter()
            .any(|r| r["knobs"]["cache"].is_string() && r["cached_steps"].as_u64().unwrap() > 0),
        "no cached run skipped a step"
    );
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let chosen = &candidates[j["chosen"].as_u64().unwrap() as usize];
    assert_eq!(
        rec["cache"].as_str().map(str::to_string),
        cache_of(chosen),
        "{rec}"
    );
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("cache teacache:threshold=0.5"), "{md}");
}

/// A cache method that does not fit the model is refused before any run.
#[cfg(unix)]
#[test]
fn tune_refuses_a_cache_that_does_not_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = bare_folder(
        dir.path(),
        "tiny-sd3",
        "transformer",
        "StableDiffusion3Pipeline",
    );
    let (out, report) = (dir.path().join("h.json"), dir.path().join("r"));
    let start = std::time::Instant::now();
    let o = hybridiff(&[
        "tune",
        "--model",
        s(&model),
        "--steps",
        "8",
        "--cache",
        "deepcache",
        "--threads-per-rank",
        "1",
        "--out",
        s(&out),
        "--report",
        s(&report),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("deepcache fits U-Nets") && err.contains("use --cache teacache"),
        "{err}"
    );
    assert!(start.elapsed().as_secs_f64() < 20.0);
    assert!(!out.exists() && !report.exists());
}

/// At 4 ranks the pipelined steps' layout is a knob: both layouts run, each keeps its
/// predicted schedule, and a per-branch choice is written to hybridiff.json.
#[cfg(unix)]
#[test]
fn tune_searches_the_pipeline_layout_at_four_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let model = bare_folder(dir.path(), "tiny-sdxl", "unet", "StableDiffusionXLPipeline");
    let (out, report) = (dir.path().join("h.json"), dir.path().join("r"));
    let o = hybridiff(&with(
        bare_tune_args(s(&model), s(&out), s(&report)),
        &[
            ("--world-size", "4"),
            ("--pipelined-guidance", "none,reuse"),
            ("--pipeline-layout", "across,per-branch"),
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("tune.json")).unwrap()).unwrap();
    assert_eq!(j["schedules_mismatched"], 0);
    let layouts: std::collections::BTreeSet<(String, String)> = j["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["knobs"]["pipeline_layout"].as_str().unwrap().to_string(),
                c["knobs"]["pipelined_guidance"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    // per-branch steps are guided already: no reuse with them.
    assert_eq!(
        layouts.into_iter().collect::<Vec<_>>(),
        [
            ("across".to_string(), "none".to_string()),
            ("across".to_string(), "reuse".to_string()),
            ("per-branch".to_string(), "none".to_string()),
        ]
    );
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let chosen = &j["candidates"][j["chosen"].as_u64().unwrap() as usize];
    assert_eq!(
        rec["pipeline_layout"], chosen["knobs"]["pipeline_layout"],
        "{rec}"
    );
}
