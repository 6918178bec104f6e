//! `--device`, `--devices` and `bench --simulate-link` / `--from-trace`, over the binary.

mod common;
use common::{fixture, hybridiff, s, stderr};

/// Every command that runs a model, with `extra` flags, on a model folder that does not exist
/// (so an error about the flags proves they were checked before anything was loaded).
fn every_command<'a>(missing: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<Vec<&'a str>> {
    let mut cmds = vec![
        vec![
            "denoise", "--model", missing, "--inputs", missing, "--out", out,
        ],
        vec![
            "generate", "--model", missing, "--prompt", "a cat", "--out", out,
        ],
        vec!["bench", "--model", missing],
        vec!["serve", "--model", missing, "--port", "0"],
    ];
    for c in &mut cmds {
        c.extend_from_slice(extra);
    }
    cmds
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_cpu_only_build_asked_for_cuda_fails_first_and_says_how_to_get_a_cuda_build() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let out = dir.path().join("out.png");
    for extra in [
        &["--device", "cuda"][..],
        &["--device", "cuda:1"],
        &["--device", "cuda", "--devices", "0,1"],
        &["--device", "auto", "--devices", "0"],
    ] {
        for args in every_command(s(&missing), s(&out), extra) {
            let o = hybridiff(&args);
            let err = stderr(&o);
            assert!(!o.status.success(), "{args:?} succeeded");
            assert!(!err.contains("panicked"), "{err}");
            for needle in [
                "built without CUDA",
                "tools/cuda-toolchain.sh",
                "cargo build --release -p hybridiff-cli --features cuda",
            ] {
                assert!(
                    err.contains(needle),
                    "{args:?}: stderr lacks {needle:?}: {err}"
                );
            }
            let flag = if extra.contains(&"--devices") {
                "--devices"
            } else {
                "--device cuda"
            };
            assert!(err.contains(flag), "{args:?}: names no flag: {err}");
            assert!(!err.contains("not found"), "loaded before checking: {err}");
            assert!(!out.exists());
        }
    }
}

#[test]
fn bad_device_values_name_the_flag_before_anything_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let out = dir.path().join("out.png");
    for (extra, needles) in [
        (
            &["--device", "gpu"][..],
            &["--device gpu:", "expected cpu, cuda, cuda:N"][..],
        ),
        (
            &["--device", "cuda:x"],
            &["--device cuda:x:", "not a number"],
        ),
        (
            &["--device", "cuda", "--devices", "0,,1"],
            &["--devices 0,,1: entry 2 is empty"],
        ),
        (
            &["--device", "cuda", "--devices", "1,1"],
            &["GPU 1 is listed twice"],
        ),
        (&["--devices", "0,1"], &["--devices", "--device is cpu"]),
        (&["--device", "cpu", "--devices", "0"], &["--device is cpu"]),
    ] {
        for args in every_command(s(&missing), s(&out), extra) {
            let o = hybridiff(&args);
            let err = stderr(&o);
            assert!(!o.status.success(), "{args:?} succeeded");
            assert!(!err.contains("panicked"), "{err}");
            for n in needles {
                assert!(err.contains(n), "{args:?}: stderr lacks {n:?}: {err}");
            }
            assert!(!err.contains("not found"), "loaded before checking: {err}");
        }
    }
}

#[test]
fn cpu_and_auto_run_and_the_trace_records_devices_and_per_rank_counts() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture("tiny-sdxl");
    let mut traces = Vec::new();
    for device in ["cpu", "auto"] {
        let out = dir.path().join(format!("{device}.safetensors"));
        let trace = dir.path().join(format!("{device}.json"));
        let o = hybridiff(&[
            "denoise",
            "--model",
            s(&root),
            "--inputs",
            s(&root.join("inputs.safetensors")),
            "--out",
            s(&out),
            "--steps",
            "4",
            "--strategy",
            "cfg",
            "--world-size",
            "2",
            "--threads-per-rank",
            "1",
            "--device",
            device,
            "--trace",
            s(&trace),
        ]);
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        if device == "auto" && !cfg!(feature = "cuda") {
            assert!(
                err.contains(
                    "--device auto: this binary was built without CUDA; running on the CPU"
                ),
                "{err}"
            );
        }
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
        traces.push((std::fs::read(&out).unwrap(), t));
    }
    let (cpu, auto) = (&traces[0], &traces[1]);
    if !cfg!(feature = "cuda") {
        assert_eq!(cpu.0, auto.0, "auto on a CPU-only build is the CPU run");
    }
    let t = &cpu.1;
    assert_eq!(t["rank_devices"], serde_json::json!(["cpu", "cpu"]));
    assert_eq!(t["transfer"], "host");
    for step in t["steps"].as_array().unwrap() {
        let per_rank: Vec<u64> = step["rank_bytes_sent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(
            per_rank.iter().sum::<u64>(),
            step["bytes_sent"].as_u64().unwrap()
        );
        // Each branch's prediction, [1, 4, 16, 16] f32, to the other leader.
        assert_eq!(per_rank, vec![4 * 16 * 16 * 4; 2], "{step}");
        assert_eq!(step["rank_messages_sent"], serde_json::json!([1, 1]));
    }
}

#[test]
fn bench_predicts_latency_on_a_link_and_from_traces() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture("tiny-sdxl");
    let traces = dir.path().join("traces");
    std::fs::create_dir(&traces).unwrap();
    let json = dir.path().join("b.json");
    let o = hybridiff(&[
        "bench",
        "--model",
        s(&root),
        "--inputs",
        s(&root.join("inputs.safetensors")),
        "--strategies",
        "serial,cfg,async,hybrid",
        "--steps",
        "10",
        "--repeats",
        "0",
        "--l-slope",
        "3",
        "--eps-slope",
        "0.05",
        "--k",
        "3",
        "--tau-cap",
        "5",
        "--simulate-link",
        "nvlink",
        "--trace-dir",
        s(&traces),
        "--json",
        s(&json),
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.contains("predicted on nvlink (s) | predicted speedup |"),
        "{out}"
    );
    assert!(out.contains("cpu x2 (host)"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(
        runs[0]["predicted"]["speedup"], 1.0,
        "serial against itself"
    );
    for r in runs {
        let p = &r["predicted"];
        let (secs, compute) = (
            p["seconds"].as_f64().unwrap(),
            p["compute_seconds"].as_f64().unwrap(),
        );
        assert!(secs >= compute && compute > 0.0, "{r}");
        assert_eq!(p["link"]["name"], "nvlink");
    }

    // The same traces read back, on a far slower link (10 MB/s, 100 us per message, so that
    // the tiny model's few kB per step show at the table's precision): every parallel run
    // predicts slower, serial the same.
    let from = |link: &str| {
        let o = hybridiff(&["bench", "--from-trace", s(&traces), "--simulate-link", link]);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let predicted = |table: &str, strategy: &str| -> f64 {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| {strategy} |")))
            .unwrap_or_else(|| panic!("no {strategy} row: {table}"));
        row.split('|').nth(10).unwrap().trim().parse().unwrap()
    };
    let (nv, p3) = (from("nvlink"), from("0.01/100"));
    assert!(p3.contains("predicted on 0.01 GB/s, 100 us (s)"), "{p3}");
    for strategy in ["cfg", "async", "hybrid"] {
        assert!(
            predicted(&p3, strategy) > predicted(&nv, strategy),
            "{strategy}\n{nv}\n{p3}"
        );
    }
    assert_eq!(predicted(&p3, "serial"), predicted(&nv, "serial"));
    // The JSON written by --json in the same folder is not a trace: skipped, said so.
    std::fs::copy(&json, traces.join("results.json")).unwrap();
    let o = hybridiff(&[
        "bench",
        "--from-trace",
        s(&traces),
        "--simulate-link",
        "1000/1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("results.json: not a trace"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_simulate_link_and_from_trace_uses_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    for (args, needle) in [
        (
            vec!["bench", "--model", s(&missing), "--simulate-link", "pcie9"],
            "--simulate-link pcie9:",
        ),
        (
            vec!["bench", "--model", s(&missing), "--simulate-link", "0"],
            "--simulate-link 0:",
        ),
        (
            vec!["bench", "--from-trace", s(dir.path())],
            "give --simulate-link",
        ),
        (
            vec![
                "bench",
                "--from-trace",
                s(dir.path()),
                "--simulate-link",
                "pcie4",
            ],
            "no traces",
        ),
        (
            vec![
                "bench",
                "--from-trace",
                s(&missing),
                "--simulate-link",
                "pcie4",
            ],
            "not a folder",
        ),
    ] {
        let o = hybridiff(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"));
    }
    // A broken trace names its file.
    std::fs::write(
        dir.path().join("cfg.json"),
        r#"{"strategy": "cfg", "steps": 3}"#,
    )
    .unwrap();
    let o = hybridiff(&[
        "bench",
        "--from-trace",
        s(dir.path()),
        "--simulate-link",
        "pcie4",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cfg.json: not a trace written by bench --trace-dir"),
        "{}",
        stderr(&o)
    );
}
