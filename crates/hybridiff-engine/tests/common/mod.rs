//! Helpers shared by the engine's fixture tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use hybridiff_engine::stages::PlanKind;
use hybridiff_engine::switch::SwitchParams;
use hybridiff_engine::{
    denoise, DenoiseInputs, DenoiseOutput, Job, Model, RunOptions, SamplingOptions, StrategyKind,
    StrategyOptions,
};
use hybridiff_schedulers::SchedulerKind;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(name)
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

pub struct Setup {
    pub model: Model,
    pub inputs: DenoiseInputs,
    pub scheduler: SchedulerKind,
    pub guidance: f64,
    /// Karras sigmas, guidance rescale, step noise (default: none, 0, seed 0).
    pub sampling: SamplingOptions,
    pub name: &'static str,
}

/// The tiny SDXL fixture (DDIM, guidance 5) or the tiny SD3 one (flow Euler, guidance 7).
pub fn setup_named(name: &'static str) -> Setup {
    setup_with(name, DType::F32)
}

/// A fixture loaded in `dtype`.
pub fn setup_with(name: &'static str, dtype: DType) -> Setup {
    let dev = Device::Cpu;
    let root = fixture(name);
    let model = Model::load(&root, dtype, &dev).unwrap();
    let inputs =
        DenoiseInputs::load(&root.join("inputs.safetensors"), &model.input_spec, &dev).unwrap();
    let scheduler = model.scheduler_config.default_kind().unwrap();
    let guidance = if name == "tiny-sd3" { 7.0 } else { 5.0 };
    Setup {
        model,
        inputs,
        scheduler,
        guidance,
        sampling: SamplingOptions::default(),
        name,
    }
}

pub fn setup() -> Setup {
    setup_named("tiny-sdxl")
}

pub fn run(
    s: &Setup,
    kind: StrategyKind,
    world: usize,
    opts: &StrategyOptions,
) -> hybridiff_engine::Result<DenoiseOutput> {
    let job = Job {
        model: s.model.denoiser.as_ref(),
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps: 20,
        guidance: s.guidance,
        inputs: &s.inputs,
        progress: None,
        sampling: s.sampling,
    };
    let ro = RunOptions {
        world_size: world,
        threads_per_rank: 1,
        comm_timeout: Duration::from_secs(120),
        placement: Default::default(),
    };
    denoise(&job, kind.build(opts).as_ref(), &ro)
}

pub fn reference() -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    reference_of("tiny-sdxl")
}

/// `expected/hybrid.json` and `expected/hybrid.safetensors` of a fixture.
pub fn reference_of(name: &str) -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    let root = fixture(name).join("expected");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("hybrid.json")).unwrap()).unwrap();
    let t = candle_core::safetensors::load(root.join("hybrid.safetensors"), &Device::Cpu).unwrap();
    (v, t)
}

pub fn fixture_options(v: &serde_json::Value) -> StrategyOptions {
    StrategyOptions {
        switch: SwitchParams {
            l_slope: v["l_slope"].as_u64().unwrap() as usize,
            eps_slope: v["eps_slope"].as_f64().unwrap(),
            k: v["k"].as_u64().unwrap() as usize,
            tau_cap: v["tau_cap"].as_u64().unwrap() as usize,
        },
        stages: PlanKind::Reference,
        ..Default::default()
    }
}

pub fn assert_steps_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims());
    for i in 0..want.dim(0).unwrap() {
        let w = want.get(i).unwrap();
        let g = got.get(i).unwrap();
        let tol = 1e-3 * max_abs(&w).max(1.0);
        let d = max_abs(&(&g - &w).unwrap());
        assert!(d < tol, "{what}: step {i}: max abs diff {d} >= {tol}");
    }
}
