//! `hybridiff serve` as a process on 127.0.0.1 with the embedded default model: the same
//! PNG as `hybridiff generate`, warm ranks (counted), SIGTERM, a bounded load test, the
//! official `openai` Python client and the web page in headless Chromium.
//!
//! The last two need what `.ci/run` installs (a venv with `openai` in `target/ci-venv`,
//! `playwright-core` in `target/ci-node`, Debian's `chromium`); without them they fail and
//! say how to install it.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// A running `hybridiff serve`; killed when dropped.
struct Served {
    child: Child,
    base: String,
    _cache: tempfile::TempDir,
    stderr: mpsc::Receiver<String>,
}

impl Served {
    fn start(args: &[&str]) -> Self {
        Self::start_with(args, &[])
    }

    fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridiff"));
        cmd.env("HYBRIDIFF_CACHE", cache.path())
            .env_remove("HYBRIDIFF_API_KEY")
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start hybridiff serve");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut s);
            let _ = err_tx.send(s);
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                let err = err_rx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_default();
                panic!("hybridiff serve printed no address; stderr:\n{err}")
            });
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Served {
            child,
            base: format!("http://{addr}"),
            _cache: cache,
            stderr: err_rx,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn health(&self) -> Value {
        reqwest::blocking::get(self.url("/health"))
            .unwrap()
            .json()
            .unwrap()
    }

    fn wait_health(&self, what: &str, f: impl Fn(&Value) -> bool) {
        let t0 = Instant::now();
        loop {
            let h = self.health();
            if f(&h) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "waited 60 s for {what}; /health: {h}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn metrics(&self) -> String {
        reqwest::blocking::get(self.url("/metrics"))
            .unwrap()
            .text()
            .unwrap()
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

fn generate_png(c: &reqwest::blocking::Client, s: &Served, body: Value) -> Vec<u8> {
    let r = c
        .post(s.url("/v1/images/generations"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().unwrap())
        .unwrap()
}

#[test]
fn serve_gives_generate_s_png_on_warm_ranks() {
    let run = [
        "--strategy",
        "hybrid",
        "--world-size",
        "2",
        "--threads-per-rank",
        "1",
    ];
    let s = Served::start(&run);
    let m0 = s.metrics();
    assert_eq!(sample(&m0, "hybridiff_model_loads"), 1.0);
    // 2 rank threads + 2 pools of 1 worker, started once.
    assert_eq!(sample(&m0, "hybridiff_rank_threads_started"), 4.0);
    let c = client();
    let prompt = "a blue square on a white background";
    let mut pngs = Vec::new();
    for _ in 0..3 {
        pngs.push(generate_png(
            &c,
            &s,
            json!({"prompt": prompt, "seed": 7, "size": "64x64"}),
        ));
    }
    assert!(pngs.windows(2).all(|w| w[0] == w[1]), "same seed, same PNG");
    let m1 = s.metrics();
    assert_eq!(sample(&m1, "hybridiff_model_loads"), 1.0, "no reload");
    assert_eq!(
        sample(&m1, "hybridiff_rank_threads_started"),
        4.0,
        "no thread started per request"
    );
    assert_eq!(sample(&m1, "hybridiff_images_generated_total"), 3.0);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.png");
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .env("HYBRIDIFF_CACHE", dir.path().join("cache"))
        .args(["generate", "--prompt", prompt, "--seed", "7", "--out"])
        .arg(&out)
        .args(run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = std::fs::read(&out).unwrap();
    assert_eq!(
        file, pngs[0],
        "the service's PNG equals generate's, byte for byte"
    );
    // Other step counts too: hybrid's thresholds are resolved for the request's count, as
    // `generate --steps 7` resolves them (with the 20-step ones, 7 steps cannot fit).
    let png7 = generate_png(
        &c,
        &s,
        json!({"prompt": prompt, "seed": 7, "num_inference_steps": 7}),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .env("HYBRIDIFF_CACHE", dir.path().join("cache"))
        .args([
            "generate", "--prompt", prompt, "--seed", "7", "--steps", "7",
        ])
        .arg("--out")
        .arg(dir.path().join("gen7.png"))
        .args(run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(dir.path().join("gen7.png")).unwrap(),
        png7,
        "7 steps: the service's PNG equals generate's"
    );

    // The hybridiff object of the same request.
    let v: Value = c
        .post(s.url("/v1/images/generations"))
        .json(&json!({"prompt": prompt, "seed": 7}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let h = &v["hybridiff"];
    assert_eq!(h["strategy"], "hybrid");
    assert_eq!(h["world_size"], 2);
    assert_eq!(h["steps"], 20, "the model's recommended steps");
    assert!(h["tau1"].is_u64() && h["tau2"].is_u64(), "{h}");
}

#[test]
fn serve_with_patch_gives_generate_s_png() {
    // The warm ranks wrap the model to stop cancelled jobs; the wrapper must still offer
    // the model's bands (it answered "does not support patch parallelism" to every request).
    let run = ["--strategy", "patch", "--world-size", "2"];
    let s = Served::start(&run);
    let c = client();
    let prompt = "a red circle";
    let body = json!({"prompt": prompt, "seed": 5, "num_inference_steps": 3});
    let r = c
        .post(s.url("/v1/images/generations"))
        .json(&body)
        .send()
        .unwrap();
    let status = r.status();
    let v: Value = r.json().unwrap();
    assert_eq!(status, 200, "{v}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.png");
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .env("HYBRIDIFF_CACHE", dir.path().join("cache"))
        .args([
            "generate", "--prompt", prompt, "--seed", "5", "--steps", "3",
        ])
        .arg("--out")
        .arg(&out)
        .args(run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        png,
        "the same PNG as generate"
    );
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_the_running_job_answers_the_queue_503_and_exits_0() {
    let mut s = Served::start(&[]);
    let url = s.url("/v1/images/generations");
    let post = |body: Value| {
        let url = url.clone();
        std::thread::spawn(move || {
            let r = client().post(&url).json(&body).send().unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().unwrap())
        })
    };
    let running = post(json!({"prompt": "a red circle", "num_inference_steps": 40}));
    s.wait_health("the long job to run", |h| h["running"] == true);
    let q1 = post(json!({"prompt": "a"}));
    let q2 = post(json!({"prompt": "b"}));
    s.wait_health("two queued", |h| h["queue_depth"] == 2);
    let rc = unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    for q in [q1, q2] {
        let (status, v) = q.join().unwrap();
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["error"]["code"], "shutting_down");
    }
    let (status, v) = running.join().unwrap();
    assert_eq!(status, 200, "the running job finishes: {v}");
    let t0 = Instant::now();
    let code = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code.code(), Some(0), "exit 0 after SIGTERM");
    let err = s.stderr.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(err.contains("stopping"), "{err}");
}

#[cfg(unix)]
#[test]
fn sigint_stops_an_idle_service_with_exit_0() {
    let mut s = Served::start(&[]);
    assert_eq!(s.health()["status"], "ok");
    let rc = unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let t0 = Instant::now();
    let code = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code.code(), Some(0));
}

#[test]
fn fifty_requests_from_ten_clients_get_an_image_or_a_429() {
    let s = Served::start(&["--max-queue", "2", "--threads-per-rank", "1"]);
    let url = s.url("/v1/images/generations");
    let round = || -> (usize, usize) {
        let handles: Vec<_> = (0..10)
            .map(|client_no| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let c = client();
                    let mut got = (0, 0);
                    for i in 0..5 {
                        let r = c
                            .post(&url)
                            .json(&json!({
                                "prompt": "a green triangle on a black background",
                                "seed": client_no * 10 + i,
                                "num_inference_steps": 4,
                            }))
                            .send()
                            .unwrap();
                        match r.status().as_u16() {
                            200 => {
                                let v: Value = r.json().unwrap();
                                let png = base64::engine::general_purpose::STANDARD
                                    .decode(v["data"][0]["b64_json"].as_str().unwrap())
                                    .unwrap();
                                let img = image::load_from_memory(&png).unwrap();
                                assert_eq!((img.width(), img.height()), (64, 64));
                                got.0 += 1;
                            }
                            429 => {
                                assert!(r.headers().contains_key("retry-after"));
                                got.1 += 1;
                            }
                            other => panic!("status {other}: {}", r.text().unwrap()),
                        }
                    }
                    got
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (ok1, busy1) = round();
    let rss1 = s.rss_kib();
    let (ok2, busy2) = round();
    let rss2 = s.rss_kib();
    let (ok, busy) = (ok1 + ok2, busy1 + busy2);
    assert_eq!(ok + busy, 100);
    assert!(ok1 >= 3 && busy1 >= 1, "{ok1} images, {busy1} 429s");
    assert_eq!(s.health()["status"], "ok", "still up");
    // Flat: once the first round has warmed allocators and caches, the second adds at most
    // 8 MiB (a leak of request bodies, images or events would grow with every request).
    eprintln!("RSS after rounds: {rss1} / {rss2} KiB; {ok} images, {busy} 429s");
    assert!(
        rss2 <= rss1 + 8 * 1024,
        "RSS grew from {rss1} to {rss2} KiB"
    );
    let m = s.metrics();
    let route = "route=\"/v1/images/generations\"";
    assert_eq!(
        sample(
            &m,
            &format!("hybridiff_http_requests_total{{{route},status=\"200\"}}")
        ),
        ok as f64
    );
    assert_eq!(
        sample(
            &m,
            &format!("hybridiff_http_requests_total{{{route},status=\"429\"}}")
        ),
        busy as f64
    );
    assert_eq!(sample(&m, "hybridiff_images_generated_total"), ok as f64);
    assert_eq!(
        sample(&m, "hybridiff_jobs_total{outcome=\"ok\"}"),
        ok as f64
    );
    assert_eq!(
        sample(
            &m,
            &format!("hybridiff_http_request_duration_seconds_count{{{route}}}")
        ),
        100.0
    );
    assert_eq!(sample(&m, "hybridiff_queue_depth"), 0.0);
    assert_eq!(sample(&m, "hybridiff_model_loads"), 1.0);
    assert_eq!(sample(&m, "hybridiff_rank_threads_started"), 2.0);
}

#[test]
fn api_key_from_the_environment_and_flag_checks() {
    let s = Served::start_with(&[], &[("HYBRIDIFF_API_KEY", "k-123")]);
    let c = client();
    let body = json!({"prompt": "a red circle", "num_inference_steps": 2});
    let r = c
        .post(s.url("/v1/images/generations"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(s.url("/v1/images/generations"))
        .bearer_auth("k-123")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        reqwest::blocking::get(s.url("/health")).unwrap().status(),
        200
    );
    drop(s);

    // Non-loopback without a key: served, with a warning, printed once.
    let mut s = Served::start(&["--host", "0.0.0.0"]);
    let _ = s.child.kill();
    let _ = s.child.wait();
    let err = s.stderr.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        err.contains("warning") && err.contains("--api-key"),
        "{err}"
    );
    let warnings = err
        .lines()
        .filter(|l| l.to_lowercase().contains("warn"))
        .count();
    assert_eq!(warnings, 1, "one warning:\n{err}");

    for (flags, needle) in [
        (&["--max-n", "0"][..], "--max-n"),
        (&["--steps", "500"][..], "--max-steps"),
        (
            &["--width", "62", "--height", "64"][..],
            "both must be positive multiples of 4",
        ),
        (&["--max-connections", "0"][..], "--max-connections"),
        (&["--header-timeout", "0"][..], "--header-timeout"),
        (&["--api-key", ""][..], "--api-key is empty"),
        (&["--api-key", "  "][..], "--api-key is empty"),
        (
            &["--host", "no-such-host.invalid"][..],
            "--host no-such-host.invalid",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
            .args(["serve", "--port", "0"])
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flags:?}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{err}");
    }
}

/// What `.ci/run` installs, or a failure that says how to get it.
fn ci_tool(env: &str, default: PathBuf, what: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
    assert!(
        p.exists(),
        "{} not found: {what} (run `bash .ci/run`, which installs it, or set {env})",
        p.display()
    );
    p
}

#[test]
fn the_official_openai_python_client_gets_an_image() {
    let python = ci_tool(
        "HYBRIDIFF_TEST_PYTHON",
        workspace().join("target/ci-venv/bin/python"),
        "a Python with the `openai` package: python3 -m venv target/ci-venv && \
         target/ci-venv/bin/pip install openai",
    );
    let s = Served::start_with(&[], &[("HYBRIDIFF_API_KEY", "py-key")]);
    let o = Command::new(&python)
        .arg(workspace().join("crates/hybridiff-cli/tests/openai_client.py"))
        .arg(s.url("/v1"))
        .arg("py-key")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "openai client failed:\n{out}\n{err}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["b64_size"], json!([64, 64]));
    assert_eq!(v["url_size"], json!([64, 64]));
    assert_eq!(v["models"], json!(["hybridiff-default"]));
    assert_eq!(v["auth_error"], 401);
    assert_eq!(v["bad_request_param"], "size");
}

#[test]
fn the_web_page_makes_an_image_in_headless_chromium() {
    let node = ci_tool("HYBRIDIFF_NODE", PathBuf::from("/usr/bin/node"), "Node.js");
    let pw = ci_tool(
        "HYBRIDIFF_PLAYWRIGHT_CORE",
        workspace().join("target/ci-node/node_modules/playwright-core"),
        "npm's playwright-core: npm install --prefix target/ci-node playwright-core",
    );
    let chromium = ci_tool(
        "HYBRIDIFF_CHROMIUM",
        PathBuf::from("/usr/bin/chromium"),
        "Debian's chromium: apt-get install chromium",
    );
    let s = Served::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let shot = std::env::var_os("HYBRIDIFF_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("page.png"));
    let o = Command::new(node)
        .arg(workspace().join("crates/hybridiff-cli/tests/serve_page.cjs"))
        .args([&s.base, pw.to_str().unwrap(), chromium.to_str().unwrap()])
        .arg(&shot)
        .arg(dir.path().join("profile"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "browser test failed:\n{out}\n{err}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["natural"], json!([64, 64]), "{v}");
    assert!(v["status"].as_str().unwrap().contains("serial"), "{v}");
    assert!(v["progress_seen"].as_u64().unwrap() >= 1, "{v}");
    let png = image::open(&shot).unwrap();
    assert!(png.width() >= 600, "a screenshot of the page");
    // The service counted the page's request.
    let m = s.metrics();
    assert_eq!(sample(&m, "hybridiff_images_generated_total"), 1.0);
}

#[test]
fn host_names_resolve_and_localhost_is_loopback() {
    let mut s = Served::start(&["--host", "localhost"]);
    assert!(
        s.base.starts_with("http://127.") || s.base.starts_with("http://[::1]"),
        "{}",
        s.base
    );
    assert_eq!(s.health()["status"], "ok");
    let _ = s.child.kill();
    let _ = s.child.wait();
    let err = s.stderr.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        !err.to_lowercase().contains("warn"),
        "localhost is loopback: no exposure warning\n{err}"
    );
}

/// Runs `hybridiff serve --port 0 ARGS` (with `env`) and returns its stderr once it has
/// exited non-zero; fails if it is still running after 60 s (it started serving).
fn refused_at_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridiff"));
    cmd.args(["serve", "--port", "0"])
        .args(args)
        .env_remove("HYBRIDIFF_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} {env:?}: still serving after 60 s instead of refusing to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{args:?} {env:?}: exit 0\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn an_api_key_no_client_could_send_and_absurd_limits_are_refused_at_start() {
    // An HTTP header carries printable ASCII only; the key sent is trimmed.
    for (args, env, needle) in [
        (
            &["--api-key", "cl\u{e9}"][..],
            &[][..],
            "--api-key: the key has the character '\u{e9}'",
        ),
        (
            &["--api-key", " k-123"][..],
            &[][..],
            "--api-key: the key starts or ends with a space",
        ),
        (
            &[][..],
            &[("HYBRIDIFF_API_KEY", "k-123\r")][..],
            "HYBRIDIFF_API_KEY: the key has the character '\\r'",
        ),
        (
            &[][..],
            &[("HYBRIDIFF_API_KEY", "k\u{1b}123")][..],
            "HYBRIDIFF_API_KEY: the key has the character",
        ),
        // Every image of a request is held in memory until it is answered.
        (
            &["--max-n", "100000000"][..],
            &[][..],
            "--max-n 100000000: at most",
        ),
        (&["--write-timeout", "0"][..], &[][..], "--write-timeout"),
        // Defaults every request that leaves the field out would fail with.
        (
            &["--strategy", "hybrid", "--world-size", "3"][..],
            &[][..],
            "a request with the defaults would fail: --world-size 3",
        ),
        (
            &["--guidance", "nan"][..],
            &[][..],
            "a request with the defaults would fail: --guidance NaN: expected a finite number",
        ),
        (&["--guidance", "80"][..], &[][..], "to --max-guidance 50"),
        (
            &["--width", "0", "--height", "0"][..],
            &[][..],
            "a request with the defaults would fail: --height 0 --width 0: both must be \
             positive multiples of 4",
        ),
        (
            &["--width", "256", "--height", "256", "--max-pixels", "4096"][..],
            &[][..],
            "above --max-pixels 4096",
        ),
        // A `url` answer of n images must fit in the store, or its first links are gone.
        (
            &["--max-n", "8", "--max-stored-images", "4"][..],
            &[][..],
            "--max-stored-images 4 is below --max-n 8",
        ),
        (
            &["--allowed-host", "http://images.example"][..],
            &[][..],
            "--allowed-host \"http://images.example\": expected a host name",
        ),
        (
            &["--max-steps", "20000"][..],
            &[][..],
            "--max-steps 20000: at most",
        ),
    ] {
        let err = refused_at_start(args, env);
        assert!(err.contains(needle), "{args:?} {env:?}: {err}");
    }
    // A key with a space inside is sent whole.
    let s = Served::start(&["--api-key", "k 123"]);
    let r = client()
        .post(s.url("/v1/images/generations"))
        .bearer_auth("k 123")
        .json(&json!({"prompt": "a red circle", "num_inference_steps": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn an_empty_api_key_variable_means_no_key() {
    let mut s = Served::start_with(&[], &[("HYBRIDIFF_API_KEY", "")]);
    let r = client()
        .post(s.url("/v1/images/generations"))
        .json(&json!({"prompt": "a red circle", "num_inference_steps": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "no key is asked for");
    let _ = s.child.kill();
    let _ = s.child.wait();
    let err = s.stderr.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        err.contains("HYBRIDIFF_API_KEY is empty") && err.contains("without an API key"),
        "{err}"
    );
}

#[test]
fn a_size_that_cannot_fit_in_memory_is_400_on_size_before_it_queues() {
    let s = Served::start_with(&[], &[("HYBRIDIFF_MEMORY_LIMIT", "8G")]);
    let c = client();
    // 1024x1024 is within the default --max-pixels, but not within 8 GiB on this model.
    let r = c
        .post(s.url("/v1/images/generations"))
        .json(&json!({"prompt": "a red circle", "size": "1024x1024"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["param"], "size", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`size` 1024x1024")
            && msg.contains("needs an estimated")
            && msg.contains("8.0 GiB (HYBRIDIFF_MEMORY_LIMIT)"),
        "{msg}"
    );
    let m = s.metrics();
    assert_eq!(
        sample(&m, "hybridiff_jobs_total{outcome=\"failed\"}"),
        0.0,
        "it never became a job"
    );
    assert_eq!(sample(&m, "hybridiff_queue_dropped_total"), 0.0);
    // What fits is served.
    let png = generate_png(
        &c,
        &s,
        json!({"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2}),
    );
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn a_half_sent_head_is_closed_after_header_timeout() {
    use std::io::Write;
    let s = Served::start(&["--header-timeout", "1"]);
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\n"
    )
    .unwrap();
    let t0 = Instant::now();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut got = Vec::new();
    let r = sock.read_to_end(&mut got);
    let after = t0.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "closed by the server, not by the read timeout: {r:?} after {after:?}"
    );
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    assert_eq!(s.health()["status"], "ok", "still serving");
}

#[test]
fn serve_takes_a_single_file_with_loras_and_torch_noise() {
    let fx = workspace().join("tests/fixtures");
    let (file, folder) = (
        fx.join("single-file/sdxl.safetensors"),
        fx.join("single-file/sdxl"),
    );
    let lora = format!("{}:-0.7", fx.join("lora/sdxl_peft.safetensors").display());
    let model = [
        "--model",
        file.to_str().unwrap(),
        "--config",
        folder.to_str().unwrap(),
        "--lora",
        &lora,
        "--steps",
        "3",
        "--width",
        "32",
        "--height",
        "32",
    ];
    let s = Served::start(&model);
    let c = client();
    let v: Value = c.get(s.url("/v1/models")).send().unwrap().json().unwrap();
    let h = &v["data"][0]["hybridiff"];
    assert!(
        h["model_source"]
            .as_str()
            .unwrap()
            .contains("SDXL base single file"),
        "{v}"
    );
    assert_eq!(h["loras"][0]["file"], "sdxl_peft.safetensors", "{v}");
    assert_eq!(h["loras"][0]["scale"], -0.7);
    assert_eq!(h["loras"][0]["modules"]["unet"], 4, "{v}");
    assert!(!v.to_string().contains("/lora/"), "no server paths: {v}");
    let png = generate_png(
        &c,
        &s,
        json!({"prompt": "a red circle", "seed": 5, "noise": "torch"}),
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g.png");
    let o = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .args([
            "generate",
            "--prompt",
            "a red circle",
            "--seed",
            "5",
            "--noise",
            "torch",
        ])
        .args(model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        png,
        "serve's PNG equals generate's"
    );
    let r = c
        .post(s.url("/v1/images/generations"))
        .json(&json!({"prompt": "x", "noise": "mt19937"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["param"], "noise", "{e}");
}

/// Posts `body` and returns the status and JSON answer.
fn post_json(s: &Served, body: Value) -> (u16, Value) {
    let r = client()
        .post(s.url("/v1/images/generations"))
        .json(&body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

#[test]
fn requests_the_strategy_or_model_would_refuse_are_400_naming_the_field_before_they_queue() {
    // The issue's example, and its siblings: with fixed thresholds hybrid needs
    // tau_cap + k = 20 steps; the size must be a multiple of the model's 4 and fit memory.
    let s = Served::start(&[
        "--strategy",
        "hybrid",
        "--world-size",
        "2",
        "--threads-per-rank",
        "1",
        "--k",
        "5",
        "--tau-cap",
        "15",
    ]);
    for (body, param, words) in [
        (
            json!({"prompt": "a", "num_inference_steps": 1}),
            "num_inference_steps",
            "at least 2 steps",
        ),
        (
            json!({"prompt": "a", "num_inference_steps": 10}),
            "num_inference_steps",
            "need at least 20 steps",
        ),
        (
            json!({"prompt": "a", "size": "62x64"}),
            "size",
            "multiples of 4",
        ),
        (
            json!({"prompt": "a", "size": "4096x256"}),
            "size",
            "needs an estimated",
        ),
    ] {
        let (status, v) = post_json(&s, body.clone());
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(param) && msg.contains(words), "{msg}");
        assert!(
            !msg.contains("--steps") && !msg.contains("--k") && !msg.contains("--tau-cap"),
            "worded for an API client, not as command-line flags: {msg}"
        );
    }
    let m = s.metrics();
    assert_eq!(
        sample(&m, "hybridiff_jobs_total{outcome=\"failed\"}"),
        0.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "hybridiff_images_generated_total"),
        0.0,
        "none ran"
    );
    // /v1/models says so.
    let v: Value = reqwest::blocking::get(s.url("/v1/models"))
        .unwrap()
        .json()
        .unwrap();
    let l = &v["data"][0]["hybridiff"]["limits"];
    assert_eq!(l["num_inference_steps"]["min"], 20, "{l}");
    assert_eq!(l["size"]["multiple"], 4, "{l}");
    // Without classifier-free guidance hybrid has nothing to switch: any step count runs.
    let (status, v) = post_json(
        &s,
        json!({"prompt": "a", "num_inference_steps": 2, "guidance_scale": 1}),
    );
    assert_eq!(status, 200, "{v}");
    drop(s);

    // The patch strategy: bands need rows, and an odd rank count cannot split CFG branches.
    let s = Served::start(&[
        "--strategy",
        "patch",
        "--world-size",
        "3",
        "--guidance",
        "1",
    ]);
    for (body, param) in [
        (
            json!({"prompt": "a", "guidance_scale": 5, "num_inference_steps": 2}),
            "guidance_scale",
        ),
        (
            json!({"prompt": "a", "size": "64x16", "num_inference_steps": 2}),
            "size",
        ),
    ] {
        let (status, v) = post_json(&s, body.clone());
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(
            !v["error"]["message"].as_str().unwrap().contains("--"),
            "{v}"
        );
    }
}

/// Waits for the process to exit (at most `limit`), returning its status.
fn wait_exit(s: &mut Served, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(st) = s.child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[cfg(unix)]
#[test]
fn ctrl_c_cancels_the_running_job_and_a_second_ctrl_c_exits_at_once() {
    let sigint = |s: &Served| {
        let rc = unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(rc, 0);
    };
    // A job of minutes: cancelled at its next step, answered 503, exit 0 in seconds.
    let mut s = Served::start(&[]);
    let url = s.url("/v1/images/generations");
    let running = std::thread::spawn(move || {
        let r = client()
            .post(&url)
            .json(&json!({"prompt": "a", "size": "256x256", "num_inference_steps": 150}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    });
    s.wait_health("the long job to run", |h| h["running"] == true);
    let t0 = Instant::now();
    sigint(&s);
    let (status, v) = running.join().unwrap();
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "shutting_down");
    let code = wait_exit(&mut s, Duration::from_secs(30)).expect("exits after Ctrl-C");
    assert_eq!(code.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let err = s.stderr.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(err.contains("cancelled at its next step"), "{err}");

    // A stop that has to wait (a request still sending its body, up to --body-timeout):
    // the second Ctrl-C exits at once.
    let mut s = Served::start(&["--body-timeout", "120"]);
    use std::io::Write;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\":"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sigint(&s);
    assert!(
        wait_exit(&mut s, Duration::from_millis(1500)).is_none(),
        "the first Ctrl-C waits for the request in flight"
    );
    let t0 = Instant::now();
    sigint(&s);
    let code = wait_exit(&mut s, Duration::from_secs(5)).expect("the second Ctrl-C exits at once");
    assert_eq!(code.code(), Some(130), "{code:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    drop(sock);
}

#[test]
fn the_service_corpus_runs_clean_against_the_binary() {
    // tools/hostile_service.py: Host/Origin/content types, repeated headers, request checks,
    // half-closed clients, HTTP-layer refusals, metrics and Ctrl-C, on loopback, bounded.
    let python = ci_tool(
        "HYBRIDIFF_TEST_PYTHON3",
        PathBuf::from("/usr/bin/python3"),
        "a python3 (the corpus uses its standard library only)",
    );
    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new(python)
        .arg(workspace().join("tools/hostile_service.py"))
        .args(["--bin", env!("CARGO_BIN_EXE_hybridiff"), "--deadline", "50"])
        .env("HYBRIDIFF_CACHE", cache.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the service corpus ran past 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "findings:\n{out}\n{err}");
    assert!(out.contains(", 0 finding(s)"), "{out}");
}
