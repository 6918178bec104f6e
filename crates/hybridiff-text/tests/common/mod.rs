//! Helpers shared by the parity tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// Bound on max |f16 encoding - f32 reference| / max(1, max |reference|) for the
/// fixtures' prompt encodings in f16 on the CPU (`PromptEncoder::load(.., DType::F16, ..)`:
/// every CLIP and the T5 of the pipeline in f16, T5's `wo` in f32 as transformers keeps
/// it). Measured on the 2-core x86-64 CPU test machine: at most 2.5e-3 (SD 1.5's
/// negative embeddings; SDXL 1.2e-3, SD3 1.6e-3). f16's unit roundoff is 2^-11 = 4.9e-4;
/// the weights and each layer's output (attention, MLP, LayerNorm, residual adds) are
/// rounded, and the errors add over the layers with partial cancellation: about 5
/// roundoffs here. 7.5e-3 is 3x the largest, so a correct half port passes on other
/// machines (other summation orders) while a wrong op (a mask, a scale, an overflow) is
/// off by order 1 and fails.
pub const TEXT_F16_REL: f32 = 7.5e-3;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

pub fn text_fixtures() -> PathBuf {
    fixtures().join("text")
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn get<'a>(m: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    m.get(name)
        .unwrap_or_else(|| panic!("expected tensor `{name}` missing from the fixture"))
}

/// The first row of an int64 `[1, S]` (or `[S]`) id tensor.
pub fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| u32::try_from(v).unwrap())
        .collect()
}

/// Max abs difference and the fixtures' bound `rel * max(1, max|expected|)`.
pub fn diff(actual: &Tensor, expected: &Tensor) -> (f32, f32) {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "shape mismatch: actual {:?} vs expected {:?}",
        actual.dims(),
        expected.dims()
    );
    let a = actual.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let e = expected
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let d = (a - &e)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let m = e.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    (d, m.max(1.0))
}

/// Asserts max|actual - expected| <= rel * max(1, max|expected|) and prints the numbers.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, rel: f32) {
    let (d, scale) = diff(actual, expected);
    println!(
        "{name}: max abs diff {d:.3e}, bound {:.3e} (shape {:?})",
        rel * scale,
        expected.dims()
    );
    assert!(
        d <= rel * scale,
        "{name}: max abs diff {d:e} exceeds {rel} * {scale}"
    );
}

/// Asserts that every element of `t` is zero.
pub fn assert_zeros(name: &str, t: &Tensor) {
    let m = t
        .to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(m, 0.0, "{name} should be all zeros");
}

/// A copy of a pipeline folder made of symbolic links to its entries, minus `skip`,
/// with `model_index.json` rewritten by `edit`.
pub fn linked_copy(
    src: &Path,
    skip: &[&str],
    edit: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if skip.contains(&name.as_str()) || name == "model_index.json" {
            continue;
        }
        let target = std::fs::canonicalize(entry.path()).unwrap();
        std::os::unix::fs::symlink(target, tmp.path().join(&name)).unwrap();
    }
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
            .unwrap();
    edit(&mut index);
    std::fs::write(
        tmp.path().join("model_index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    tmp
}
