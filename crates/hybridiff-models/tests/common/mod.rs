//! Helpers shared by the models crate's fixture tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use hybridiff_models::{Conditioning, Denoiser, OutputRef, State};

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

/// Prints every parity row and fails on the first that is over its bound; at least one
/// row, or the check could not fail.
pub fn assert_rows_pass(rows: &[hybridiff_models::parity::ParityCheck]) {
    assert!(!rows.is_empty(), "no parity rows");
    for r in rows {
        println!(
            "{} ({}): max abs diff {:e} (bound {:e}, max |expected| {})",
            r.name, r.dtype, r.max_abs_diff, r.bound, r.max_abs_expected
        );
    }
    for r in rows {
        assert!(
            r.pass,
            "{}: max abs diff {} >= bound {}",
            r.name, r.max_abs_diff, r.bound
        );
    }
}

/// Runs `model` module by module, checking each output count; returns every module's
/// outputs and the state after the last module.
pub fn run_modules(
    model: &dyn Denoiser,
    x: &Tensor,
    t: f64,
    cond: &Conditioning,
) -> (Vec<Vec<Tensor>>, State) {
    let mut state = model.begin(x, t, cond).unwrap();
    let mut outs = Vec::new();
    for i in 0..model.module_names().len() {
        let out = model.run_module(i, &state).unwrap();
        assert_eq!(out.len(), model.module_output_count(i), "module {i}");
        outs.push(out.clone());
        model.apply_module(i, &mut state, out).unwrap();
    }
    (outs, state)
}

/// Substituting every odd module's output from `cache` (as a pipelined rank does with the
/// modules it does not own) reproduces `expected` exactly.
pub fn assert_substitution_reproduces(
    model: &dyn Denoiser,
    x: &Tensor,
    t: f64,
    cond: &Conditioning,
    cache: Vec<Vec<Tensor>>,
    expected: &Tensor,
) {
    let mut state = model.begin(x, t, cond).unwrap();
    for (i, cached) in cache.into_iter().enumerate() {
        let out = if i % 2 == 1 {
            cached
        } else {
            model.run_module(i, &state).unwrap()
        };
        model.apply_module(i, &mut state, out).unwrap();
    }
    let got = model.end(state).unwrap();
    assert_eq!(max_abs_diff(&got, expected), 0.0);
}

/// For each module, feeds true values only for the outputs it declares it reads and
/// zeros for every other earlier output: its result must not change. This is what lets
/// a pipelined rank receive only the outputs it reads.
pub fn assert_reads_suffice(model: &dyn Denoiser, x: &Tensor, t: f64, cond: &Conditioning) {
    let (truth, _) = run_modules(model, x, t, cond);
    for (i, want) in truth.iter().enumerate() {
        let reads = model.module_reads(i);
        let mut s = model.begin(x, t, cond).unwrap();
        for (j, outs) in truth.iter().enumerate().take(i) {
            let masked = outs
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    if reads.contains(&OutputRef {
                        module: j,
                        index: k,
                    }) {
                        t.clone()
                    } else {
                        t.zeros_like().unwrap()
                    }
                })
                .collect();
            model.apply_module(j, &mut s, masked).unwrap();
        }
        let got = model.run_module(i, &s).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert_eq!(
                max_abs_diff(g, w),
                0.0,
                "module {}",
                model.module_names()[i]
            );
        }
    }
}
