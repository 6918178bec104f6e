//! Helpers the CLI test files share (each test file is its own crate and uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
