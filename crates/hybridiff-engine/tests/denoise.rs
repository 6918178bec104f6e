//! Whole 20-step runs against the diffusers reference (`expected/serial.safetensors`).

mod common;

use candle_core::{DType, Device};
use common::*;
use hybridiff_engine::{DenoiseOutput, StrategyKind, StrategyOptions};

fn serial_run(kind: StrategyKind, world: usize) -> DenoiseOutput {
    run(&setup(), kind, world, &StrategyOptions::default()).unwrap()
}

fn assert_matches_serial_fixture(out: &DenoiseOutput, what: &str) {
    let exp = candle_core::safetensors::load(
        fixture("tiny-sdxl").join("expected/serial.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_steps_close(&out.step_latents, &exp["step_latents"], what);
    let d = max_abs(&(&out.latents - &exp["latents"]).unwrap());
    assert!(
        d < 1e-3 * max_abs(&exp["latents"]).max(1.0),
        "{what}: final latents off by {d}"
    );
}

#[test]
fn serial_matches_diffusers_20_steps() {
    let out = serial_run(StrategyKind::Serial, 1);
    assert_matches_serial_fixture(&out, "serial");
    assert_eq!(out.trace.steps.len(), 20);
    assert_eq!(out.trace.steps[0].timestep, 951.0);
    assert_eq!(out.trace.bytes_sent, 0);
    assert!(out.trace.rel_mae_log.iter().all(|m| *m > 0.0));
}

#[test]
fn cfg_on_two_ranks_matches_serial_fixture() {
    let out = serial_run(StrategyKind::Cfg, 2);
    assert_matches_serial_fixture(&out, "cfg x2");
    // Each step both leaders send one [1, 4, 16, 16] f32 prediction.
    let per_step = 2 * 4 * 16 * 16 * 4;
    assert!(out.trace.steps.iter().all(|s| s.bytes_sent == per_step));
    assert_eq!(out.trace.steps[0].rank_compute_seconds.len(), 2);
}

#[test]
fn cfg_on_four_ranks_matches_serial_fixture() {
    let out = serial_run(StrategyKind::Cfg, 4);
    assert_matches_serial_fixture(&out, "cfg x4");
}

#[test]
fn rel_mae_log_matches_reference_exact_steps() {
    // The reference hybrid run logs the same rel-MAE as serial on its first exact steps.
    let out = serial_run(StrategyKind::Cfg, 2);
    let (v, _) = reference();
    let log: Vec<f64> = v["rel_mae_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for (i, (got, want)) in out.trace.rel_mae_log.iter().zip(&log).take(4).enumerate() {
        assert!(
            (got - want).abs() < 1e-4,
            "step {i}: rel-MAE {got} vs {want}"
        );
    }
}

#[test]
fn bad_world_sizes_are_rejected_before_compute() {
    let s = setup();
    for (kind, w) in [
        (StrategyKind::Cfg, 3),
        (StrategyKind::Cfg, 1),
        (StrategyKind::Serial, 2),
    ] {
        let err = run(&s, kind, w, &StrategyOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("--world-size {w}")), "{err}");
    }
}

#[test]
fn f16_run_stays_close_to_the_f32_reference() {
    let s = setup_with("tiny-sdxl", DType::F16);
    let out = run(&s, StrategyKind::Cfg, 2, &StrategyOptions::default()).unwrap();
    let exp = candle_core::safetensors::load(
        fixture("tiny-sdxl").join("expected/serial.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want = &exp["latents"];
    let got = out.latents.to_dtype(DType::F32).unwrap();
    let rel = max_abs(&(&got - want).unwrap()) / max_abs(want);
    eprintln!("f16 final latents: max abs diff / max abs = {rel}");
    assert!(rel < 0.02, "f16 drifted {rel} of the latents' range");
}
