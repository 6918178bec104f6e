//! Helpers shared by the models crate's fixture tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// The repository's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// Max |a - b| over all elements, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    max_abs(&d)
}

/// Max |a| over all elements, in f32.
pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The fixtures' single-forward tolerance: max abs diff < 1e-4 * max(1, max|expected|).
pub fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let tol = 1e-4 * max_abs(want).max(1.0);
    let d = max_abs_diff(got, want);
    println!(
        "{what}: max abs diff {d:e} (tolerance {tol:e}, max |expected| {})",
        max_abs(want)
    );
    assert!(d < tol, "{what}: max abs diff {d} >= tolerance {tol}");
}
