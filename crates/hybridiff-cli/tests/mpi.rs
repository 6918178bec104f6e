//! One rank per process: the `hybridiff` binary under `mpirun` (Open MPI, loopback), against the
//! same job with ranks as threads of one process, and how a failing rank stops the job.
//!
//! Needs the `mpi` feature and `mpirun` on PATH (`.ci/run` installs Debian's Open MPI):
//! `cargo nextest run -p hybridiff-cli --features mpi --test mpi`. Every mpirun runs under a
//! hard wall-clock limit, so a hang fails the test instead of stalling CI.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;

mod common;
use common::{fixture, s};

/// Far above any run here; reaching it means something hung.
const HARD_LIMIT: Duration = Duration::from_secs(180);

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    seconds: f64,
}

/// Runs `cmd` with its output in files (no pipe can fill up), killing it past [`HARD_LIMIT`].
fn run_limited(mut cmd: Command, scratch: &Path) -> Run {
    let (out_p, err_p) = (scratch.join("stdout.txt"), scratch.join("stderr.txt"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_p).unwrap())
        .stderr(File::create(&err_p).unwrap());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("start the command");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > HARD_LIMIT {
            // SIGTERM first so mpirun takes its processes down with it.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {HARD_LIMIT:?}: a hang\nstderr: {}",
                std::fs::read_to_string(&err_p).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        ok: status.success(),
        stdout: std::fs::read_to_string(&out_p).unwrap(),
        stderr: std::fs::read_to_string(&err_p).unwrap(),
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// `hybridiff ARGS` as `np` processes under mpirun, with `env` passed to every process.
fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)], scratch: &Path) -> Run {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ]);
    for (k, v) in env {
        cmd.env(k, v).args(["-x", k]);
    }
    // Its own session folder under the test's scratch: concurrent mpiruns sharing /tmp race
    // to create /tmp/ompi.HOST.UID ("mkdir ... File exists", orte_init fails).
    let session = scratch.join("ompi-session");
    std::fs::create_dir_all(&session).unwrap();
    cmd.env("TMPDIR", &session);
    cmd.arg(env!("CARGO_BIN_EXE_hybridiff")).args(args);
    run_limited(cmd, scratch)
}

/// `hybridiff ARGS` as one process (ranks as threads).
fn alone(args: &[&str], scratch: &Path) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridiff"));
    cmd.args(args);
    run_limited(cmd, scratch)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The trace without what depends on timing.
fn trace_facts(t: &serde_json::Value) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            serde_json::json!({
                "index": s["index"], "timestep": s["timestep"], "mode": s["mode"],
                "rel_mae": s["rel_mae"], "bytes_sent": s["bytes_sent"],
                "reference_bytes_sent": s["reference_bytes_sent"], "slope": s["slope"],
                "tau1": s["tau1"], "tau2": s["tau2"],
                "ranks": s["rank_compute_seconds"].as_array().unwrap().len(),
                "rank_bytes_sent": s["rank_bytes_sent"],
                "rank_messages_sent": s["rank_messages_sent"],
                "rank_overlapped_bytes": s["rank_overlapped_bytes"],
                "rank_overlapped_messages": s["rank_overlapped_messages"],
                "forwards": s["forwards"], "cache": s["cache"],
            })
        })
        .collect();
    serde_json::json!({
        "strategy": t["strategy"], "world_size": t["world_size"], "scheduler": t["scheduler"],
        "num_steps": t["num_steps"], "guidance": t["guidance"], "bytes_sent": t["bytes_sent"],
        "reference_bytes_sent": t["reference_bytes_sent"], "stage_plan": t["stage_plan"],
        "tau1": t["tau1"], "tau2": t["tau2"], "rel_mae_log": t["rel_mae_log"], "steps": steps,
        "rank_devices": t["rank_devices"], "transfer": t["transfer"],
        "cache": t["cache"], "forwards": t["forwards"], "forwards_saved": t["forwards_saved"],
        "cached_steps": t["cached_steps"],
    })
}

/// Denoises the tiny SDXL with `extra` flags both ways; latents must agree bit for bit and the
/// traces in everything but timings.
fn same_as_in_process(np: usize, extra: &[&str]) -> serde_json::Value {
    same_as_in_process_on("tiny-sdxl", np, extra)
}

/// [`same_as_in_process`] on fixture `model`; returns the trace of the run on processes.
fn same_as_in_process_on(model: &str, np: usize, extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture(model);
    let inputs = root.join("inputs.safetensors");
    let mut outs = Vec::new();
    for mode in ["threads", "mpi"] {
        let out = dir.path().join(format!("{mode}.safetensors"));
        let trace = dir.path().join(format!("{mode}.json"));
        let np_s = np.to_string();
        let mut args = vec![
            "denoise",
            "--model",
            s(&root),
            "--inputs",
            s(&inputs),
            "--out",
            s(&out),
            "--steps",
            "12",
            "--threads-per-rank",
            "1",
            "--trace",
            s(&trace),
        ];
        args.extend_from_slice(extra);
        let r = if mode == "threads" {
            args.extend_from_slice(&["--world-size", &np_s]);
            alone(&args, dir.path())
        } else {
            mpirun(np, &args, &[], dir.path())
        };
        assert!(r.ok, "{mode} {extra:?}: {}", r.stderr);
        // Rank 0 alone prints the summary.
        assert_eq!(
            r.stdout.matches(" steps in ").count(),
            1,
            "{mode}: {}",
            r.stdout
        );
        outs.push((out, trace));
    }
    let load = |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (a, b) = (load(&outs[0].0), load(&outs[1].0));
    for name in ["latents", "step_latents"] {
        let bits = |t: &candle_core::Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&a[name]), bits(&b[name]), "{extra:?}: {name} differ");
    }
    let (ta, tb) = (json(&outs[0].1), json(&outs[1].1));
    assert_eq!(
        trace_facts(&ta),
        trace_facts(&tb),
        "{extra:?}: traces differ"
    );
    assert!(ta["bytes_sent"].as_u64().unwrap() > 0);
    // Every rank's compute time is in rank 0's trace: the other ranks' is not all zero.
    let others: f64 = tb["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["rank_compute_seconds"].as_array().unwrap()[1..].to_vec())
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!(
        others > 0.0,
        "the other ranks' compute seconds are missing from the trace"
    );
    tb
}

#[test]
fn hybrid_on_two_processes_equals_two_threads_bit_for_bit() {
    same_as_in_process(
        2,
        &[
            "--strategy",
            "hybrid",
            "--l-slope",
            "3",
            "--eps-slope",
            "0.05",
            "--k",
            "4",
            "--tau-cap",
            "8",
        ],
    );
}

#[test]
fn step_caching_on_processes_equals_threads_bit_for_bit() {
    // deepcache's decisions come from the step index; the forwards counted and saved on
    // every rank reach rank 0's trace.
    let t = same_as_in_process(
        2,
        &[
            "--strategy",
            "hybrid",
            "--l-slope",
            "3",
            "--eps-slope",
            "0.05",
            "--k",
            "4",
            "--tau-cap",
            "8",
            "--cache",
            "deepcache:interval=2",
        ],
    );
    assert!(t["cached_steps"].as_u64().unwrap() > 0 && t["forwards_saved"].as_f64().unwrap() > 0.0);
    // teacache's come from rank 0's indicator, broadcast to the other processes.
    let t = same_as_in_process_on(
        "tiny-sd3",
        2,
        &["--strategy", "cfg", "--cache", "teacache:threshold=0.3"],
    );
    assert!(
        t["cached_steps"].as_u64().unwrap() > 0,
        "{}",
        t["cached_steps"]
    );
}

#[test]
fn cfg_on_two_and_four_processes_equals_threads_bit_for_bit() {
    same_as_in_process(2, &["--strategy", "cfg"]);
    same_as_in_process(4, &["--strategy", "cfg"]);
}

#[test]
fn async_on_two_processes_equals_two_threads_bit_for_bit() {
    same_as_in_process(2, &["--strategy", "async", "--warmup", "2"]);
}

#[test]
fn hybrid_on_four_processes_equals_four_threads_bit_for_bit() {
    same_as_in_process(
        4,
        &[
            "--strategy",
            "hybrid",
            "--l-slope",
            "3",
            "--eps-slope",
            "0.05",
            "--k",
            "4",
            "--tau-cap",
            "8",
        ],
    );
}

/// Stochastic samplers (issue 23): every process draws step i's noise from the seed and i
/// alone (or replays the torch generator from the seed), so processes give the threads'
/// latents bit for bit (and threads give serial's,
/// engine/tests/samplers.rs).
#[test]
fn stochastic_samplers_on_processes_equal_threads_bit_for_bit() {
    same_as_in_process(
        2,
        &["--strategy", "cfg", "--scheduler", "euler-a", "--seed", "9"],
    );
    // Torch noise: every process replays the generator from the seed.
    same_as_in_process(
        2,
        &[
            "--strategy",
            "async",
            "--scheduler",
            "euler-a",
            "--noise",
            "torch",
            "--seed",
            "9",
        ],
    );
    same_as_in_process(
        2,
        &[
            "--strategy",
            "hybrid",
            "--l-slope",
            "3",
            "--eps-slope",
            "0.05",
            "--k",
            "4",
            "--tau-cap",
            "8",
            "--scheduler",
            "dpmpp-2m-sde",
            "--karras",
            "--guidance-rescale",
            "0.7",
            "--seed",
            "3",
        ],
    );
    same_as_in_process(
        4,
        &[
            "--strategy",
            "patch",
            "--patch-mode",
            "sync",
            "--scheduler",
            "lcm",
            "--seed",
            "4",
        ],
    );
}

/// Issue 25's layouts on four processes: hybrid's exact steps as 2 branch groups x 2 bands
/// (sync and displaced) with either pipelined layout, and AsyncDiff's stride 2 (3 stages and
/// a rank mirroring the last), bit for bit and byte for byte as on threads.
#[test]
fn scale_out_layouts_on_four_processes_equal_four_threads_bit_for_bit() {
    let switch = [
        "--l-slope",
        "3",
        "--eps-slope",
        "0.05",
        "--k",
        "3",
        "--tau-cap",
        "5",
    ];
    for extra in [
        &["--strategy", "hybrid", "--pipeline-layout", "per-branch"][..],
        &[
            "--strategy",
            "hybrid",
            "--pipeline-layout",
            "across",
            "--patch-mode",
            "displaced",
        ][..],
        &["--strategy", "async", "--stride", "2", "--stages", "auto"][..],
    ] {
        let mut args = extra.to_vec();
        // The switching thresholds only where a strategy reads them (others refuse them).
        if extra[1] == "hybrid" {
            args.extend_from_slice(&switch);
        }
        same_as_in_process(4, &args);
    }
}

/// Bands of unequal heights (14 latent rows: 8 + 6 per branch group) in the new layouts'
/// all-gathers and halos across processes: results and bytes equal the threads'.
#[test]
fn scale_out_layouts_with_uneven_bands_on_processes_equal_threads() {
    let dir = tempfile::tempdir().unwrap();
    let js = dir.path().join("b.json");
    let model = fixture("tiny-sdxl");
    let r = mpirun(
        4,
        &[
            "bench",
            "--model",
            s(&model),
            "--strategies",
            "serial,cfg,hybrid",
            "--transport",
            "threads,mpi",
            "--latent-size",
            "14",
            "--steps",
            "7",
            "--tau-cap",
            "3",
            "--k",
            "2",
            "--l-slope",
            "2",
            "--repeats",
            "0",
            "--world-size",
            "4",
            "--json",
            s(&js),
        ],
        &[],
        dir.path(),
    );
    assert!(r.ok, "{}", r.stderr);
    let rows = json(&js)["runs"].as_array().unwrap().clone();
    for strategy in ["cfg", "hybrid"] {
        let pick = |t: &str| {
            rows.iter()
                .find(|r| r["strategy"] == strategy && r["transport"] == t)
                .unwrap_or_else(|| panic!("no {strategy} row on {t}: {rows:?}"))
                .clone()
        };
        let (a, b) = (pick("threads"), pick("mpi"));
        for k in [
            "bytes_sent",
            "max_abs_diff",
            "psnr_db",
            "rank_flops",
            "pipelined_steps",
        ] {
            assert_eq!(a[k], b[k], "{strategy}: {k}");
        }
        assert!(
            a["setup"]
                .as_str()
                .unwrap()
                .contains("2 CFG groups x 2 bands"),
            "{a}"
        );
    }
    let cfg = rows.iter().find(|r| r["strategy"] == "cfg").unwrap();
    assert!(
        cfg["max_abs_diff"].as_f64().unwrap() < 1e-3,
        "cfg is exact: {cfg}"
    );
}

/// A rank killed mid-run in a four-process hybrid job (bands, then stages) stops every rank,
/// and the job names it.
#[test]
fn rank_killed_in_a_four_process_hybrid_stops_every_rank_naming_it() {
    failing_rank_stops(4, "2:150", &["--world-size", "4"], "kill", &["rank 2"]);
    failing_rank_stops(
        4,
        "3:300",
        &["--world-size", "4"],
        "error",
        &["rank 3", "injected error"],
    );
}

#[test]
fn generate_on_two_processes_writes_the_same_png() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl-pipeline");
    let (a, b) = (dir.path().join("threads.png"), dir.path().join("mpi.png"));
    let args = |out: &Path| -> Vec<String> {
        [
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "a red circle",
            "--steps",
            "6",
            "--strategy",
            "hybrid",
            "--threads-per-rank",
            "1",
            "--tau-cap",
            "2",
            "--k",
            "2",
            "--out",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let mut ta = args(&a);
    ta.extend(["--world-size".to_string(), "2".to_string()]);
    let ta: Vec<&str> = ta.iter().map(String::as_str).collect();
    let r = alone(&ta, dir.path());
    assert!(r.ok, "{}", r.stderr);
    let tb = args(&b);
    let tb: Vec<&str> = tb.iter().map(String::as_str).collect();
    let r = mpirun(2, &tb, &[], dir.path());
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout.matches("wrote ").count(), 1, "{}", r.stdout);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

    // A batch: rank 0 writes every image and the manifest.
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\na blue square\n").unwrap();
    let batch = dir.path().join("batch");
    let r = mpirun(
        2,
        &[
            "generate",
            "--model",
            s(&model),
            "--prompts",
            s(&prompts),
            "--steps",
            "6",
            "--strategy",
            "cfg",
            "--threads-per-rank",
            "1",
            "--out",
            s(&batch),
        ],
        &[],
        dir.path(),
    );
    assert!(r.ok, "{}", r.stderr);
    let manifest = json(&batch.join("manifest.json"));
    assert_eq!(manifest.as_array().unwrap().len(), 2);
    assert!(batch.join("0000.png").is_file() && batch.join("0001.png").is_file());
}

#[test]
fn bench_times_threads_and_processes_in_one_run_with_equal_results() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let (js, md, traces) = (
        dir.path().join("b.json"),
        dir.path().join("b.md"),
        dir.path().join("traces"),
    );
    std::fs::create_dir(&traces).unwrap();
    let r = mpirun(
        2,
        &[
            "bench",
            "--model",
            s(&model),
            "--strategies",
            "serial,cfg,async,hybrid",
            "--transport",
            "threads,mpi",
            "--steps",
            "8",
            "--repeats",
            "1",
            "--tau-cap",
            "3",
            "--k",
            "3",
            "--json",
            s(&js),
            "--markdown",
            s(&md),
            "--trace-dir",
            s(&traces),
        ],
        &[],
        dir.path(),
    );
    assert!(r.ok, "{}", r.stderr);
    // Rank 0 alone prints the table.
    assert_eq!(r.stdout.matches("| strategy |").count(), 1, "{}", r.stdout);
    let rows = json(&js)["runs"].as_array().unwrap().clone();
    assert_eq!(
        rows.len(),
        7,
        "serial + 3 strategies x 2 transports: {rows:?}"
    );
    for kind in ["cfg", "async", "hybrid"] {
        let pick = |t: &str| {
            rows.iter()
                .find(|r| r["strategy"] == kind && r["transport"] == t)
                .unwrap_or_else(|| panic!("no {kind} row on {t}"))
                .clone()
        };
        let (a, b) = (pick("threads"), pick("mpi"));
        for k in [
            "bytes_sent",
            "reference_bytes_sent",
            "max_abs_diff",
            "tau1",
            "tau2",
        ] {
            assert_eq!(a[k], b[k], "{kind}: {k}");
        }
        assert!(traces.join(format!("{kind}.json")).is_file());
        assert!(traces.join(format!("{kind}-mpi.json")).is_file());
    }
    assert!(std::fs::read_to_string(&md).unwrap().contains("| mpi |"));
}

/// DistriFusion's bands on processes: heights that do not divide into equal bands make the
/// final all-gather (and the halos) carry tensors of different sizes per rank; the MPI
/// transport's results and bytes must equal the threads'.
#[test]
fn patch_with_uneven_bands_on_processes_equals_threads() {
    for (np, extra) in [
        (2, vec!["--no-cfg-split"]),
        (3, vec!["--no-cfg-split", "--patch-mode", "sync"]),
        (4, vec![]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let js = dir.path().join("b.json");
        let model = fixture("tiny-sdxl");
        let np_s = np.to_string();
        let mut args = vec![
            "bench",
            "--model",
            s(&model),
            "--strategies",
            "serial,patch",
            "--transport",
            "threads,mpi",
            // 14 latent rows in bands of whole 4-row units (the U-Net downsamples twice):
            // 8 + 6 rows, 4 + 4 + 6, and 8 + 6 per CFG group.
            "--latent-size",
            "14",
            "--steps",
            "6",
            "--repeats",
            "0",
            "--world-size",
            &np_s,
            "--json",
            s(&js),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|e| e.to_string()));
        // Only displaced patch reads --warmup (sync refuses it rather than ignore it).
        if !extra.contains(&"sync") {
            args.extend(["--warmup".to_string(), "1".to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = mpirun(np, &args, &[], dir.path());
        assert!(r.ok, "{np} processes {extra:?}: {}", r.stderr);
        let rows = json(&js)["runs"].as_array().unwrap().clone();
        let pick = |t: &str| {
            rows.iter()
                .find(|r| r["strategy"] == "patch" && r["transport"] == t)
                .unwrap_or_else(|| panic!("{np} {extra:?}: no patch row on {t}: {rows:?}"))
                .clone()
        };
        let (a, b) = (pick("threads"), pick("mpi"));
        for k in ["bytes_sent", "max_abs_diff", "psnr_db"] {
            assert_eq!(a[k], b[k], "{np} processes {extra:?}: {k}");
        }
        assert!(a["bytes_sent"].as_u64().unwrap() > 0, "{a:?}");
        if extra.contains(&"sync") {
            // sync is exact: equal to serial up to GEMM rounding
            let d = a["max_abs_diff"].as_f64().unwrap();
            assert!(d < 1e-3, "{np} processes sync: max abs diff {d}");
        }
    }
}

/// Runs a 2-process hybrid job whose rank 1 fails at its 3rd send as `mode` says, and checks
/// that the job stops well within `--comm-timeout` plus slack, names rank 1, and leaves no file.
fn failing_rank_stops_the_job(mode: &str, needles: &[&str]) {
    failing_rank_stops(2, "1:3", &[], mode, needles);
}

/// [`failing_rank_stops_the_job`] on `np` processes with `extra` flags; `at` is
/// `RANK:SEND` of the fault.
fn failing_rank_stops(np: usize, at: &str, extra: &[&str], mode: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture("tiny-sdxl");
    let out = dir.path().join("out.safetensors");
    let trace = dir.path().join("trace.json");
    let fault = format!("{at}:{mode}");
    let inputs = root.join("inputs.safetensors");
    let mut args = vec![
        "denoise",
        "--model",
        s(&root),
        "--inputs",
        s(&inputs),
        "--out",
        s(&out),
        "--trace",
        s(&trace),
        "--steps",
        "10",
        "--strategy",
        "hybrid",
        "--tau-cap",
        "4",
        "--k",
        "3",
        "--threads-per-rank",
        "1",
        "--comm-timeout",
        "8",
    ];
    args.extend_from_slice(extra);
    let r = mpirun(np, &args, &[("HYBRIDIFF_TEST_FAULT", &fault)], dir.path());
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(!r.ok, "{mode}: the job succeeded: {all}");
    // The timeout (8 s) plus process start-up and the abort's grace.
    assert!(r.seconds < 40.0, "{mode}: took {:.1} s: {all}", r.seconds);
    for n in needles {
        assert!(all.contains(n), "{mode}: output lacks {n:?}: {all}");
    }
    assert!(
        !out.exists() && !trace.exists(),
        "{mode}: an output file was left behind"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".txt") && n != "ompi-session")
        .collect();
    assert!(left.is_empty(), "{mode}: files left behind: {left:?}");
}

#[test]
fn rank_returning_an_error_stops_every_rank_naming_it() {
    failing_rank_stops_the_job("error", &["rank 1", "injected error"]);
}

#[test]
fn rank_panicking_stops_every_rank_naming_it() {
    failing_rank_stops_the_job("panic", &["rank 1 panicked", "injected panic"]);
}

/// Open MPI's mpirun ends the job itself when a process exits with an error, naming it as
/// `Process name: [[JOB,1],RANK]`.
#[test]
fn rank_exiting_stops_every_rank_naming_it() {
    failing_rank_stops_the_job("exit", &["Process name: [[", ",1],1]", "Exit code:    3"]);
}

#[test]
fn rank_killed_by_sigkill_stops_every_rank_naming_it() {
    failing_rank_stops_the_job("kill", &["rank 1"]);
}

#[test]
fn stuck_rank_times_out_on_its_peer_naming_it() {
    failing_rank_stops_the_job("hang", &["waited 8s for rank 1"]);
}

#[test]
fn world_size_must_agree_with_the_process_count() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture("tiny-sdxl");
    let out = dir.path().join("out.safetensors");
    let r = mpirun(
        2,
        &[
            "denoise",
            "--model",
            s(&root),
            "--inputs",
            s(&root.join("inputs.safetensors")),
            "--out",
            s(&out),
            "--strategy",
            "cfg",
            "--world-size",
            "4",
        ],
        &[],
        dir.path(),
    );
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("--world-size 4: this job was started as 2 processes"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
}

/// A rank that exits with status 0 mid-job (a bug, say) still ends the job, named by mpirun.
#[test]
fn rank_exiting_cleanly_mid_job_stops_every_rank_naming_it() {
    failing_rank_stops_the_job("exit0", &["process rank 1", "exiting improperly"]);
}
