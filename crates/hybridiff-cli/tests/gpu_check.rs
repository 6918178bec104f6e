//! `hybridiff parity` and the prepared device script `tools/gpu-check.sh`, dry-run on the
//! CPU (`--device cpu --small`: the tiny fixture configs, 16x16 latents, 8 steps), as CI
//! can run them. The lines of the script that only a GPU run takes are marked `GPU-UNRUN`
//! in it.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::hybridiff;

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn parity_passes_on_the_cpu_in_f32_f16_and_on_the_device_generic_path() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = repo().join("tests/fixtures");
    for (dtype, generic) in [("f32", false), ("f16", false), ("f32", true)] {
        let json = tmp.path().join(format!("p-{dtype}-{generic}.json"));
        let mut args = vec![
            "parity",
            "--fixtures",
            fixtures.to_str().unwrap(),
            "--dtype",
            dtype,
            "--json",
            json.to_str().unwrap(),
        ];
        if generic {
            args.push("--device-generic");
        }
        let o = hybridiff(&args);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{args:?}: {}{stdout}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(stdout.contains("tiny-sd3 transformer out_cond"), "{stdout}");
        let v = read_json(&json);
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 6);
        assert!(rows.iter().all(|r| r["pass"] == true), "{v}");
        assert_eq!(v["dtype"], dtype);
        let kernels = v["cpu_kernel_calls"].as_u64().unwrap();
        // The CPU path runs the im2col kernel; the device-generic one (CUDA's) never.
        assert_eq!(kernels == 0, generic, "{v}");
    }
}

#[test]
fn hybridiff_device_generic_puts_the_whole_process_on_the_gpu_code_path() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("p.json");
    let fixtures = repo().join("tests/fixtures");
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .args(["parity", "--fixtures", fixtures.to_str().unwrap(), "--json"])
        .arg(&json)
        .env("HYBRIDIFF_DEVICE_GENERIC", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = read_json(&json);
    assert_eq!(v["cpu_kernel_calls"], 0, "{v}");
    assert!(v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["pass"] == true));
}

#[test]
fn parity_refuses_a_folder_without_the_fixtures_and_cuda_on_a_cpu_build() {
    let tmp = tempfile::tempdir().unwrap();
    let o = hybridiff(&["parity", "--fixtures", tmp.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--fixtures") && err.contains("tiny-sdxl"),
        "{err}"
    );
    if !cfg!(feature = "cuda") {
        let fixtures = repo().join("tests/fixtures");
        let o = hybridiff(&[
            "parity",
            "--fixtures",
            fixtures.to_str().unwrap(),
            "--device",
            "cuda",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains("cuda-toolchain.sh"), "{err}");
    }
}

/// `tools/gpu-check.sh --device cpu --small` on the binary under test, writing to `out`.
fn dry_run(out: &Path, work: &Path) -> Command {
    let mut c = Command::new("bash");
    c.arg(repo().join("tools/gpu-check.sh"))
        .args([
            "--device",
            "cpu",
            "--small",
            "--bin",
            env!("CARGO_BIN_EXE_hybridiff"),
        ])
        .arg("--out")
        .arg(out)
        .arg("--work")
        .arg(work);
    c
}

/// The whole script on the CPU: every step ok, the files it promises, and what they hold.
/// diffusers' timings run when `python3` can import diffusers and torch (else the script
/// says they are skipped, which is checked too).
#[test]
fn gpu_check_dry_run_on_the_cpu_writes_every_result() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let work = tmp.path().join("work");
    let o = dry_run(&out, &work).output().expect("run bash");
    let log = std::fs::read_to_string(out.join("gpu-check.log")).unwrap_or_default();
    assert!(
        o.status.success(),
        "gpu-check.sh failed: {}\n{log}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(log.contains("failed steps: none"), "{log}");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "forward.json",
            "gpu-check.log",
            "parity-f16.json",
            "parity-f32.json",
            "stages.json",
            "strategies.json",
            "summary.md",
            "traces.tar.gz"
        ],
        "the device tool brings back at most 8 files"
    );
    for dt in ["f32", "f16"] {
        let v = read_json(&out.join(format!("parity-{dt}.json")));
        assert!(v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["pass"] == true));
    }
    let strategies = read_json(&out.join("strategies.json"));
    let stages = read_json(&out.join("stages.json"));
    let forward = read_json(&out.join("forward.json"));
    for m in ["unet", "mmdit"] {
        let runs = strategies[m].as_array().unwrap();
        let names: Vec<&str> = runs
            .iter()
            .map(|r| r["strategy"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["serial", "cfg", "async", "hybrid"], "{m}");
        for r in &runs[1..] {
            assert_eq!(r["world_size"], 2);
            // Close to serial (cfg is exact; async and hybrid approximate a few steps).
            let psnr = r["psnr_db"].as_f64().unwrap_or(f64::INFINITY);
            assert!(psnr > 25.0, "{m} {}: PSNR {psnr}", r["strategy"]);
            assert!(r["bytes_sent"].as_u64().unwrap() > 0);
        }
        for s in ["serial", "cfg", "async", "hybrid"] {
            let steps = stages[m][s]["steps"].as_array().unwrap();
            assert_eq!(steps.len(), 8, "{m} {s}");
            for st in steps {
                let secs = st["rank_compute_seconds"].as_array().unwrap();
                assert!(
                    secs.iter().all(|x| x.as_f64().unwrap() > 0.0),
                    "{m} {s}: {st}"
                );
            }
        }
        let ours = forward[m]["rows"]["batch2"]["ours_seconds"]
            .as_f64()
            .unwrap();
        assert!(ours > 0.0);
    }
    let has_diffusers = Command::new("python3")
        .args(["-c", "import diffusers, torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_diffusers {
        assert!(
            forward["unet"]["rows"]["batch1"]["diffusers_seconds"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    } else {
        assert!(log.contains("diffusers timings are SKIPPED"), "{log}");
        assert!(forward["unet"]["rows"]["batch1"]["diffusers_seconds"].is_null());
    }
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| unet | hybrid | 2 |"), "{summary}");
}

/// The script keeps to its time budget: with none left, every step is skipped and recorded
/// as failed (exit non-zero), rather than running past the device lease.
#[test]
fn gpu_check_skips_steps_once_its_budget_is_spent() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = dry_run(&out, &tmp.path().join("work"))
        .env("GPU_CHECK_BUDGET_S", "1")
        .output()
        .expect("run bash");
    let log = std::fs::read_to_string(out.join("gpu-check.log")).unwrap();
    assert!(!o.status.success(), "{log}");
    assert!(
        log.contains("parity-f32: SKIPPED (the 1 s budget is spent)"),
        "{log}"
    );
    assert!(log.contains("failed steps: parity-f32 parity-f16"), "{log}");
}
