//! Helpers the CLI test files share (each test file is its own crate and uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `tests/fixtures/NAME` at the repository root.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(name)
}

/// Runs the `hybridiff` binary under test with `args`, output captured.
pub fn hybridiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .args(args)
        .output()
        .expect("run hybridiff")
}

/// A path as a command-line argument (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The process's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `hybridiff` with `env`, killing it after `limit` (a hang fails the test).
pub fn run_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybridiff"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run hybridiff");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "hybridiff {args:?} still running after {limit:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(args: &[&str]) -> Output {
    run_env(args, &[], Duration::from_secs(60))
}

/// Asserts a clean failure (exit 1, no panic, no abort) whose message has every needle.
#[track_caller]
pub fn fails_with(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!err.contains("memory allocation"), "abort: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    err
}

#[track_caller]
pub fn succeeds(o: &Output) -> String {
    let err = stderr(o);
    assert!(o.status.success(), "{err}");
    err
}

/// A copy of a fixture folder made of real folders and symbolic links to the fixture's
/// files, so one file can be replaced without copying the weights.
pub fn linked_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let from = e.path().canonicalize().unwrap();
        let to = dst.join(e.file_name());
        if from.is_dir() {
            linked_copy(&from, &to);
        } else {
            std::os::unix::fs::symlink(&from, &to).unwrap();
        }
    }
}

/// Replaces the JSON file `rel` of a linked copy by `edit` applied to it.
pub fn edit_json(root: &Path, rel: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = root.join(rel);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, v.to_string()).unwrap();
}

pub fn mkfifo(p: &Path) {
    let o = Command::new("mkfifo").arg(p).output().expect("mkfifo");
    assert!(o.status.success());
}
