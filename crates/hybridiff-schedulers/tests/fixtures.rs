//! Parity with diffusers 0.42.1: timesteps, sigmas and whole 20-step runs
//! from the reference fixtures in `tests/fixtures/`.

mod common;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use common::{fixture, floats, load_json};
use hybridiff_schedulers::{build, SchedulerConfig, SchedulerKind};

/// Fails on a length mismatch or any entry off by more than `rel * max(1, |expected|)`.
fn check_close(what: &str, got: &[f64], expected: &[f64], rel: f64) -> Result<()> {
    ensure!(
        got.len() == expected.len(),
        "{what}: {} values, expected {}",
        got.len(),
        expected.len()
    );
    let mut worst = 0f64;
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let err = (g - e).abs() / e.abs().max(1.0);
        ensure!(
            err <= rel,
            "{what}[{i}]: got {g}, expected {e} (rel err {err:e})"
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: max rel err {worst:e}");
    Ok(())
}

/// Checks timesteps and sigmas for every step count the fixture holds.
fn check_schedules(config: &str, expected: &str, kind: SchedulerKind) -> Result<()> {
    let cfg = SchedulerConfig::from_file(&fixture(config))?;
    let exp = load_json(expected)?;
    let mut checked = 0;
    for steps in [1usize, 5, 20, 50] {
        let entry = &exp[steps.to_string()];
        ensure!(
            entry.is_object(),
            "{expected} has no entry for {steps} steps"
        );
        let sched = build(&cfg, kind, steps)?;
        check_close(
            &format!("{kind} {steps} timesteps"),
            sched.timesteps(),
            &floats(&entry["timesteps"])?,
            1e-5,
        )?;
        ensure!(
            (0..steps).all(|i| sched.timestep(i) == sched.timesteps()[i]),
            "timestep(i) disagrees with timesteps()"
        );
        match (sched.sigmas(), entry.get("sigmas")) {
            (Some(got), Some(want)) => {
                check_close(&format!("{kind} {steps} sigmas"), got, &floats(want)?, 1e-5)?
            }
            (None, None) => {}
            (got, want) => anyhow::bail!(
                "{kind}: sigmas present here: {}, in the fixture: {}",
                got.is_some(),
                want.is_some()
            ),
        }
        // The fixture records init_noise_sigma for its 20-step run only.
        if steps == 20 {
            let ins = exp["init_noise_sigma"]
                .as_f64()
                .context("init_noise_sigma")?;
            check_close(
                &format!("{kind} {steps} init_noise_sigma"),
                &[sched.init_noise_sigma()],
                &[ins],
                1e-6,
            )?;
        }
        checked += 1;
    }
    ensure!(checked == 4);
    Ok(())
}

/// Replays the fixture's `step_rule` for 20 steps and compares every step's latents.
fn check_run(config: &str, expected: &str, tensors: &str, kind: SchedulerKind) -> Result<()> {
    let cfg = SchedulerConfig::from_file(&fixture(config))?;
    let exp = load_json(expected)?;
    let rule = exp["step_rule"].as_str().context("step_rule")?;
    ensure!(
        rule.contains("0.5*sin(0.7*scale_model_input(x_i, t_i) + i)") && rule.contains("steps=20"),
        "the fixture's step rule changed: {rule}"
    );
    let dev = Device::Cpu;
    let data = candle_core::safetensors::load(fixture(tensors), &dev)?;
    let init = data.get("init").context("no `init` tensor")?;
    let step_latents = data
        .get("step_latents")
        .context("no `step_latents` tensor")?;
    let steps = 20;
    ensure!(step_latents.dim(0)? == steps);

    let mut sched = build(&cfg, kind, steps)?;
    let mut x = init.affine(sched.init_noise_sigma() as f32 as f64, 0.0)?;
    let mut worst = 0f32;
    for i in 0..steps {
        let input = sched.scale_model_input(&x, i)?;
        let model_output = input.affine(0.7, i as f64)?.sin()?.affine(0.5, 0.0)?;
        x = sched.step(&model_output, i, &x, None)?;
        let want = step_latents.get(i)?.unsqueeze(0)?;
        ensure!(x.dims() == want.dims(), "step {i}: shape {:?}", x.dims());
        let max_abs = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let err = (&x - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let tol = 1e-3 * max_abs.max(1.0);
        ensure!(
            err <= tol,
            "{kind} step {i}: max abs err {err:e} > {tol:e} (max |expected| {max_abs})"
        );
        worst = worst.max(err / max_abs.max(1.0));
    }
    eprintln!("{kind} 20-step run: max scaled err {worst:e}");
    Ok(())
}

const SDXL_CONFIG: &str = "tiny-sdxl/scheduler/scheduler_config.json";
const SD3_CONFIG: &str = "tiny-sd3/scheduler/scheduler_config.json";

#[test]
fn ddim_schedules_match_diffusers() -> Result<()> {
    check_schedules(
        SDXL_CONFIG,
        "tiny-sdxl/expected/scheduler_ddim.json",
        SchedulerKind::Ddim,
    )
}

#[test]
fn ddim_run_matches_diffusers() -> Result<()> {
    check_run(
        SDXL_CONFIG,
        "tiny-sdxl/expected/scheduler_ddim.json",
        "tiny-sdxl/expected/scheduler_ddim.safetensors",
        SchedulerKind::Ddim,
    )
}

#[test]
fn euler_schedules_match_diffusers() -> Result<()> {
    check_schedules(
        SDXL_CONFIG,
        "tiny-sdxl/expected/scheduler_euler.json",
        SchedulerKind::Euler,
    )
}

#[test]
fn euler_run_matches_diffusers() -> Result<()> {
    check_run(
        SDXL_CONFIG,
        "tiny-sdxl/expected/scheduler_euler.json",
        "tiny-sdxl/expected/scheduler_euler.safetensors",
        SchedulerKind::Euler,
    )
}

#[test]
fn dpmpp_2m_schedules_match_diffusers() -> Result<()> {
    check_schedules(
        SDXL_CONFIG,
        "tiny-sdxl/expected/scheduler_dpmpp_2m.json",
        SchedulerKind::DpmPp2M,
    )
}

#[test]
fn dpmpp_2m_run_matches_diffusers() -> Result<()> {
    check_run(
        SDXL_CONFIG,
        "tiny-sdxl/expected/scheduler_dpmpp_2m.json",
        "tiny-sdxl/expected/scheduler_dpmpp_2m.safetensors",
        SchedulerKind::DpmPp2M,
    )
}

#[test]
fn flow_euler_schedules_match_diffusers() -> Result<()> {
    check_schedules(
        SD3_CONFIG,
        "tiny-sd3/expected/scheduler_flow_match_euler.json",
        SchedulerKind::FlowEuler,
    )
}

#[test]
fn flow_euler_run_matches_diffusers() -> Result<()> {
    check_run(
        SD3_CONFIG,
        "tiny-sd3/expected/scheduler_flow_match_euler.json",
        "tiny-sd3/expected/scheduler_flow_match_euler.safetensors",
        SchedulerKind::FlowEuler,
    )
}

#[test]
fn fixture_configs_pick_their_class() -> Result<()> {
    let sdxl = SchedulerConfig::from_file(&fixture(SDXL_CONFIG))?;
    assert_eq!(sdxl.default_kind()?, SchedulerKind::Ddim);
    let sd3 = SchedulerConfig::from_file(&fixture(SD3_CONFIG))?;
    assert_eq!(sd3.default_kind()?, SchedulerKind::FlowEuler);
    Ok(())
}

#[test]
fn dpm_history_restarts_at_step_zero() -> Result<()> {
    let cfg = SchedulerConfig::from_file(&fixture(SDXL_CONFIG))?;
    let mut sched = build(&cfg, SchedulerKind::DpmPp2M, 20)?;
    let x = Tensor::new(&[[0.3f32, -1.2, 2.0]], &Device::Cpu)?;
    let run = |sched: &mut Box<dyn hybridiff_schedulers::Scheduler>| -> Result<Vec<f32>> {
        let mut x = x.clone();
        for i in 0..3 {
            let out = x.affine(0.7, i as f64)?.sin()?.affine(0.5, 0.0)?;
            x = sched.step(&out, i, &x, None)?;
        }
        Ok(x.flatten_all()?.to_vec1()?)
    };
    let first = run(&mut sched)?;
    let second = run(&mut sched)?;
    assert_eq!(first, second);
    Ok(())
}
