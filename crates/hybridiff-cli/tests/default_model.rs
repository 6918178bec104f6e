//! The embedded default model (models/default): `hybridiff generate` with no `--model`
//! draws what the prompt says, checked with simple pixel statistics.

use std::path::Path;
use std::process::Command;

fn generate(cache: &Path, out: &Path, prompts_json: &str, extra: &[&str]) {
    let prompts = out.with_extension("json");
    std::fs::write(&prompts, prompts_json).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .env("HYBRIDIFF_CACHE", cache)
        .args([
            "generate",
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn mean_channel(img: &image::RgbImage, c: usize) -> f64 {
    img.pixels().map(|p| p.0[c] as f64 / 255.0).sum::<f64>() / (img.width() * img.height()) as f64
}

fn is_red(p: &image::Rgb<u8>) -> bool {
    p.0[0] as f64 > 0.55 * 255.0 && (p.0[1] as f64) < 0.35 * 255.0 && (p.0[2] as f64) < 0.35 * 255.0
}

fn is_blue(p: &image::Rgb<u8>) -> bool {
    p.0[2] as f64 > 0.55 * 255.0 && (p.0[0] as f64) < 0.35 * 255.0 && (p.0[1] as f64) < 0.5 * 255.0
}

/// Drawn (farther than 60/255 from the white background) pixels over the area of their
/// bounding box: the training shapes give circle 0.78, square 1.0, triangle 0.52.
fn fill_ratio(img: &image::RgbImage) -> Option<f64> {
    let drawn = |p: &image::Rgb<u8>| {
        p.0.iter()
            .map(|&c| (255.0 - c as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            > 60.0
    };
    let pts: Vec<(u32, u32)> = img
        .enumerate_pixels()
        .filter(|(_, _, p)| drawn(p))
        .map(|(x, y, _)| (x, y))
        .collect();
    if pts.len() < 8 {
        return None;
    }
    let (x0, x1) = (
        pts.iter().map(|p| p.0).min()?,
        pts.iter().map(|p| p.0).max()?,
    );
    let (y0, y1) = (
        pts.iter().map(|p| p.1).min()?,
        pts.iter().map(|p| p.1).max()?,
    );
    Some(pts.len() as f64 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64)
}

fn batch(prompt: &str) -> String {
    let items: Vec<String> = (0..4)
        .map(|s| format!(r#"{{"prompt": "{prompt}", "seed": {s}}}"#))
        .collect();
    format!("[{}]", items.join(","))
}

#[test]
fn colour_shape_and_guidance_change_the_picture() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut runs = Vec::new();
    for (name, prompt) in [
        ("red_circle", "a red circle on a white background"),
        ("blue_circle", "a blue circle on a white background"),
        ("red_square", "a red square on a white background"),
        ("red_triangle", "a red triangle on a white background"),
    ] {
        let out = dir.path().join(name);
        generate(&cache, &out, &batch(prompt), &[]);
        let imgs: Vec<image::RgbImage> = (0..4)
            .map(|i| rgb(&out.join(format!("{i:04}.png"))))
            .collect();
        assert!(imgs.iter().all(|i| i.dimensions() == (64, 64)));
        runs.push(imgs);
    }
    let mean = |imgs: &[image::RgbImage], c: usize| {
        imgs.iter().map(|i| mean_channel(i, c)).sum::<f64>() / imgs.len() as f64
    };
    let count = |imgs: &[image::RgbImage], f: fn(&image::Rgb<u8>) -> bool| {
        imgs.iter()
            .map(|i| i.pixels().filter(|p| f(p)).count())
            .sum::<usize>()
    };
    // Colour words: "red" raises the red channel and draws red pixels, "blue" the blue.
    let (r_red, r_blue) = (mean(&runs[0], 0), mean(&runs[1], 0));
    assert!(
        r_red - r_blue > 0.05,
        "mean R: red {r_red:.3} vs blue {r_blue:.3}"
    );
    let (b_red, b_blue) = (mean(&runs[0], 2), mean(&runs[1], 2));
    assert!(
        b_blue - b_red > 0.05,
        "mean B: blue {b_blue:.3} vs red {b_red:.3}"
    );
    let (red_in_red, red_in_blue) = (count(&runs[0], is_red), count(&runs[1], is_red));
    assert!(
        red_in_red > 10 * red_in_blue.max(1),
        "red pixels: {red_in_red} for red, {red_in_blue} for blue"
    );
    let (blue_in_blue, blue_in_red) = (count(&runs[1], is_blue), count(&runs[0], is_blue));
    assert!(
        blue_in_blue > 10 * blue_in_red.max(1),
        "blue pixels: {blue_in_blue} for blue, {blue_in_red} for red"
    );
    // Shape words: a square fills its bounding box more than a circle, a circle more than a
    // triangle (the training shapes: 1.0, 0.78, 0.52).
    let fill = |imgs: &[image::RgbImage]| {
        let v: Vec<f64> = imgs.iter().filter_map(fill_ratio).collect();
        assert!(!v.is_empty(), "no shape drawn");
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (ci, sq, tri) = (fill(&runs[0]), fill(&runs[2]), fill(&runs[3]));
    assert!(
        tri + 0.1 < ci && ci + 0.08 < sq,
        "fill ratio: triangle {tri:.3}, circle {ci:.3}, square {sq:.3}"
    );
    eprintln!(
        "mean R red/blue {r_red:.3}/{r_blue:.3}, mean B {b_red:.3}/{b_blue:.3}, red px {red_in_red}/{red_in_blue}, \
         blue px {blue_in_blue}/{blue_in_red}, fill circle {ci:.3} square {sq:.3} triangle {tri:.3}"
    );

    // Guidance 1 and 5 give different pictures for the same seed.
    let g1 = dir.path().join("g1");
    generate(
        &cache,
        &g1,
        &batch("a red circle on a white background"),
        &["--guidance", "1"],
    );
    let d: f64 = (0..4)
        .map(|i| {
            let (a, b) = (rgb(&g1.join(format!("{i:04}.png"))), &runs[0][i]);
            a.as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(x, y)| x.abs_diff(*y) as f64)
                .sum::<f64>()
                / a.as_raw().len() as f64
        })
        .sum::<f64>()
        / 4.0;
    eprintln!("guidance 1 vs 5: mean abs pixel difference {d:.2}");
    assert!(d > 3.0, "guidance 1 vs 5: mean abs pixel difference {d:.2}");
}

#[test]
fn hybrid_on_the_default_model_uses_its_switching_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.json");
    let out = dir.path().join("h.png");
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .env("HYBRIDIFF_CACHE", dir.path().join("cache"))
        .args([
            "generate",
            "--prompt",
            "a red circle on a white background",
            "--seed",
            "1",
        ])
        .args([
            "--strategy",
            "hybrid",
            "--world-size",
            "2",
            "--threads-per-rank",
            "1",
        ])
        .args([
            "--trace",
            trace.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    // The thresholds come from models/default/hybridiff.json when no flag overrides them.
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default/hybridiff.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let field = |k: &str| rec[k].as_u64().unwrap();
    assert_eq!(t["num_steps"].as_u64().unwrap(), field("steps"));
    // The first slope is computed once more than L rel-MAE values are logged.
    let first_slope = t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["slope"].is_f64())
        .unwrap() as u64;
    assert_eq!(first_slope, field("l_slope"));
    let tau1 = t["tau1"].as_u64().unwrap();
    // The detector needs more than L values; the fallback is tau_cap.
    assert!(
        (field("l_slope")..=field("tau_cap")).contains(&tau1),
        "tau1 {tau1}"
    );
    assert_eq!(t["tau2"].as_u64().unwrap(), tau1 + field("k"));
}

#[test]
fn guidance_0_follows_the_prompt() {
    // guidance <= 1 turns CFG off (diffusers): the conditional branch alone, so the prompt
    // still decides the picture (it used to be ignored: eps_u + 0 (eps_c - eps_u)).
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut runs = Vec::new();
    for (name, prompt) in [
        ("red", "a red circle on a white background"),
        ("blue", "a blue square on a white background"),
    ] {
        let out = dir.path().join(name);
        generate(&cache, &out, &batch(prompt), &["--guidance", "0"]);
        runs.push(
            (0..4)
                .map(|i| rgb(&out.join(format!("{i:04}.png"))))
                .collect::<Vec<_>>(),
        );
    }
    let mean = |imgs: &[image::RgbImage], c: usize| {
        imgs.iter().map(|i| mean_channel(i, c)).sum::<f64>() / imgs.len() as f64
    };
    let (r_red, r_blue) = (mean(&runs[0], 0), mean(&runs[1], 0));
    let (b_red, b_blue) = (mean(&runs[0], 2), mean(&runs[1], 2));
    eprintln!("guidance 0: mean R red/blue {r_red:.3}/{r_blue:.3}, mean B {b_red:.3}/{b_blue:.3}");
    assert!(
        r_red - r_blue > 0.02,
        "mean R: red {r_red:.3} vs blue {r_blue:.3}"
    );
    assert!(
        b_blue - b_red > 0.02,
        "mean B: blue {b_blue:.3} vs red {b_red:.3}"
    );
}

#[test]
fn hybrid_with_few_steps_derives_thresholds_that_fit() {
    let dir = tempfile::tempdir().unwrap();
    for steps in ["4", "8"] {
        let trace = dir.path().join(format!("t{steps}.json"));
        let out = dir.path().join(format!("h{steps}.png"));
        let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
            .env("HYBRIDIFF_CACHE", dir.path().join("cache"))
            .args(["generate", "--prompt", "a red circle", "--steps", steps])
            .args(["--strategy", "hybrid", "--threads-per-rank", "1"])
            .args(["--trace", trace.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{steps} steps: {err}");
        assert!(
            err.contains(&format!("hybrid thresholds for {steps} steps")),
            "{err}"
        );
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
        let staged = t["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["mode"] != "exact")
            .count();
        assert!(staged >= 1, "{steps} steps: no pipelined step");
    }
    // Flags that cannot fit are kept and reported with the value that would fit.
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .env("HYBRIDIFF_CACHE", dir.path().join("cache"))
        .args(["generate", "--prompt", "a red circle", "--steps", "6"])
        .args(["--strategy", "hybrid", "--k", "2", "--tau-cap", "15"])
        .args(["--out", dir.path().join("x.png").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("use --tau-cap 4 or lower"), "{err}");
    assert!(!dir.path().join("x.png").exists());
}
