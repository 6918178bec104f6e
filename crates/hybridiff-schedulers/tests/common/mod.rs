//! Helpers shared by this crate's tests: fixture paths and JSON reading.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// A path under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

/// A JSON file under `tests/fixtures/`.
pub fn load_json(rel: &str) -> Result<Value> {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// A JSON list of numbers.
pub fn floats(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .context("expected a list")?
        .iter()
        .map(|x| x.as_f64().context("expected a number"))
        .collect()
}
