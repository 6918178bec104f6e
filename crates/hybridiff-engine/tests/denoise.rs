//! Whole 20-step runs against the diffusers reference (`expected/serial.safetensors`).

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use hybridiff_engine::{denoise, DenoiseInputs, Job, Model, RunOptions, StrategyKind};
use hybridiff_schedulers::SchedulerKind;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(name)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn run(strategy: StrategyKind, world_size: usize) -> hybridiff_engine::DenoiseOutput {
    let dev = Device::Cpu;
    let root = fixture("tiny-sdxl");
    let model = Model::load(&root, DType::F32, &dev).unwrap();
    let inputs =
        DenoiseInputs::load(&root.join("inputs.safetensors"), &model.input_spec, &dev).unwrap();
    let job = Job {
        model: model.denoiser.as_ref(),
        scheduler_config: &model.scheduler_config,
        scheduler: SchedulerKind::Ddim,
        steps: 20,
        guidance: 5.0,
        inputs: &inputs,
        progress: None,
    };
    let opts = RunOptions {
        world_size,
        threads_per_rank: 1,
        comm_timeout: Duration::from_secs(120),
    };
    denoise(&job, strategy.build(&Default::default()).as_ref(), &opts).unwrap()
}

fn assert_matches_serial_fixture(out: &hybridiff_engine::DenoiseOutput, what: &str) {
    let exp = candle_core::safetensors::load(
        fixture("tiny-sdxl").join("expected/serial.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want = &exp["step_latents"];
    assert_eq!(out.step_latents.dims(), want.dims());
    for i in 0..want.dim(0).unwrap() {
        let w = want.get(i).unwrap();
        let g = out.step_latents.get(i).unwrap();
        let tol = 1e-3 * max_abs(&w).max(1.0);
        let d = max_abs(&(&g - &w).unwrap());
        assert!(d < tol, "{what}: step {i}: max abs diff {d} >= {tol}");
    }
    let d = max_abs(&(&out.latents - &exp["latents"]).unwrap());
    assert!(
        d < 1e-3 * max_abs(&exp["latents"]).max(1.0),
        "{what}: final latents off by {d}"
    );
}

#[test]
fn serial_matches_diffusers_20_steps() {
    let out = run(StrategyKind::Serial, 1);
    assert_matches_serial_fixture(&out, "serial");
    assert_eq!(out.trace.steps.len(), 20);
    assert_eq!(out.trace.steps[0].timestep, 951.0);
    assert_eq!(out.trace.bytes_sent, 0);
    assert!(out.trace.rel_mae_log.iter().all(|m| *m > 0.0));
}

#[test]
fn cfg_on_two_ranks_matches_serial_fixture() {
    let out = run(StrategyKind::Cfg, 2);
    assert_matches_serial_fixture(&out, "cfg x2");
    // Each step both leaders send one [1, 4, 16, 16] f32 prediction.
    let per_step = 2 * 4 * 16 * 16 * 4;
    assert!(out.trace.steps.iter().all(|s| s.bytes_sent == per_step));
    assert_eq!(out.trace.steps[0].rank_compute_seconds.len(), 2);
}

#[test]
fn cfg_on_four_ranks_matches_serial_fixture() {
    let out = run(StrategyKind::Cfg, 4);
    assert_matches_serial_fixture(&out, "cfg x4");
}

#[test]
fn rel_mae_log_matches_reference_exact_steps() {
    // The reference hybrid run logs the same rel-MAE as serial on its first exact steps.
    let out = run(StrategyKind::Cfg, 2);
    let text = std::fs::read_to_string(fixture("tiny-sdxl").join("expected/hybrid.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
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
    let dev = Device::Cpu;
    let root = fixture("tiny-sdxl");
    let model = Model::load(&root, DType::F32, &dev).unwrap();
    let inputs =
        DenoiseInputs::load(&root.join("inputs.safetensors"), &model.input_spec, &dev).unwrap();
    let job = Job {
        model: model.denoiser.as_ref(),
        scheduler_config: &model.scheduler_config,
        scheduler: SchedulerKind::Ddim,
        steps: 20,
        guidance: 5.0,
        inputs: &inputs,
        progress: None,
    };
    for (kind, w) in [
        (StrategyKind::Cfg, 3),
        (StrategyKind::Cfg, 1),
        (StrategyKind::Serial, 2),
    ] {
        let opts = RunOptions {
            world_size: w,
            threads_per_rank: 1,
            comm_timeout: Duration::from_secs(5),
        };
        let err = denoise(&job, kind.build(&Default::default()).as_ref(), &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("--world-size {w}")), "{err}");
    }
}

#[test]
fn f16_run_stays_close_to_the_f32_reference() {
    let dev = Device::Cpu;
    let root = fixture("tiny-sdxl");
    let model = Model::load(&root, DType::F16, &dev).unwrap();
    let inputs =
        DenoiseInputs::load(&root.join("inputs.safetensors"), &model.input_spec, &dev).unwrap();
    let job = Job {
        model: model.denoiser.as_ref(),
        scheduler_config: &model.scheduler_config,
        scheduler: SchedulerKind::Ddim,
        steps: 20,
        guidance: 5.0,
        inputs: &inputs,
        progress: None,
    };
    let opts = RunOptions {
        world_size: 2,
        threads_per_rank: 1,
        comm_timeout: Duration::from_secs(120),
    };
    let out = denoise(
        &job,
        StrategyKind::Cfg.build(&Default::default()).as_ref(),
        &opts,
    )
    .unwrap();
    let exp =
        candle_core::safetensors::load(root.join("expected/serial.safetensors"), &dev).unwrap();
    let want = &exp["latents"];
    let got = out.latents.to_dtype(DType::F32).unwrap();
    let rel = max_abs(&(&got - want).unwrap()) / max_abs(want);
    eprintln!("f16 final latents: max abs diff / max abs = {rel}");
    assert!(rel < 0.02, "f16 drifted {rel} of the latents' range");
}
