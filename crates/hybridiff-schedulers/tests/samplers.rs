//! Parity with diffusers 0.42.1 for the samplers of issue 23 (fixtures made by
//! `tools/make_scheduler_fixtures.py`): timesteps and sigmas for every step count 1..100
//! (every spacing, Karras sigmas, final sigma zero / sigma_min, flow shifts), 20-step runs
//! with a stand-in model output and, for the stochastic samplers, the same given noise
//! tensors; then the schedules' invariants and the refusals of what a sampler cannot run.

mod common;

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use common::{fixture, load_json};
use hybridiff_schedulers::{
    build, build_with, Error, ScheduleOptions, Scheduler, SchedulerConfig, SchedulerKind,
};
use serde_json::{json, Value};

fn config_of(v: &Value, name: &str) -> Result<SchedulerConfig> {
    let text = v["config"].to_string();
    Ok(SchedulerConfig::from_json_str(
        &text,
        format!("{name}.json"),
    )?)
}

fn kind_of(v: &Value) -> Result<SchedulerKind> {
    Ok(v["kind"].as_str().context("kind")?.parse()?)
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Whether a kind's timesteps are integers (compared exactly).
fn integer_timesteps(kind: SchedulerKind, karras: bool) -> bool {
    match kind {
        SchedulerKind::Euler => !karras,
        SchedulerKind::FlowEuler => false,
        _ => true,
    }
}

#[test]
fn schedules_match_diffusers_for_every_step_count() -> Result<()> {
    let meta = load_json("schedulers/schedules.json")?;
    let data =
        candle_core::safetensors::load(fixture("schedulers/schedules.safetensors"), &Device::Cpu)?;
    let variants = meta["variants"].as_array().context("variants")?;
    ensure!(variants.len() >= 30, "{} variants", variants.len());
    let mut checked = 0;
    for v in variants {
        let name = v["name"].as_str().context("name")?;
        let kind = kind_of(v)?;
        let base = config_of(v, name)?;
        let karras = v["config"]["use_karras_sigmas"].as_bool().unwrap_or(false);
        let max_steps = v["max_steps"].as_u64().context("max_steps")? as usize;
        let seq_len = v["image_seq_len"].as_u64().map(|n| n as usize);
        let opts = ScheduleOptions {
            karras: false,
            image_seq_len: seq_len,
        };
        let want_t = f32s(&data[&format!("{name}.timesteps")])?;
        let want_s = f32s(&data[&format!("{name}.sigmas")])?;
        let want_ins = f32s(&data[&format!("{name}.init_noise_sigma")])?;
        let order = v["config"]["solver_order"].as_u64().unwrap_or(1) as usize;
        let (mut t_off, mut s_off) = (0, 0);
        for n in 1..=max_steps {
            // A UniPC order above the step count is refused (tested below); the schedule
            // does not depend on it.
            let cfg = if kind == SchedulerKind::UniPc && n < order {
                base.with_value("solver_order", json!(n))
            } else {
                base.clone()
            };
            let sched =
                build_with(&cfg, kind, n, &opts).with_context(|| format!("{name} n={n}"))?;
            let what = format!("{name} with {n} steps");
            let got = sched.timesteps();
            let want = &want_t[t_off..t_off + n];
            ensure!(got.len() == n, "{what}: {} timesteps", got.len());
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                let w = w as f64;
                let ok = if integer_timesteps(kind, karras) {
                    g == w
                } else {
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0)
                };
                ensure!(ok, "{what}: timestep {i} is {g}, diffusers {w}");
            }
            match sched.sigmas() {
                Some(got) => {
                    let want = &want_s[s_off..s_off + n + 1];
                    ensure!(got.len() == n + 1, "{what}: {} sigmas", got.len());
                    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                        let w = w as f64;
                        ensure!(
                            (g - w).abs() <= 1e-6 * w.abs() + 1e-9,
                            "{what}: sigma {i} is {g}, diffusers {w}"
                        );
                    }
                    s_off += n + 1;
                    // Invariants: a noise level per model evaluation, strictly falling; the
                    // final level no higher (diffusers repeats the last Karras sigma as a
                    // sigma_min final one).
                    ensure!(
                        got[..n].windows(2).all(|w| w[1] < w[0]) && got[n] <= got[n - 1],
                        "{what}: sigmas not decreasing: {got:?}"
                    );
                }
                None => ensure!(kind == SchedulerKind::Lcm, "{what}: no sigmas"),
            }
            // Timesteps never rise (Karras schedules of 45+ steps repeat rounded ones, as
            // diffusers does: the sigmas still fall).
            ensure!(
                got.windows(2).all(|w| w[1] <= w[0]),
                "{what}: timesteps rise: {got:?}"
            );
            let ins = sched.init_noise_sigma();
            let w = want_ins[n - 1] as f64;
            ensure!(
                (ins - w).abs() <= 1e-6 * w.abs(),
                "{what}: init_noise_sigma {ins}, diffusers {w}"
            );
            t_off += n;
            checked += 1;
        }
        ensure!(t_off == want_t.len(), "{name}: fixture has more timesteps");
    }
    eprintln!("{checked} schedules checked");
    Ok(())
}

/// diffusers' trailing spacing gives 62 timesteps for 61 steps (the last -1): we run the 61
/// asked for, ending at the same final sigma.
#[test]
fn trailing_spacing_runs_the_steps_asked_for() -> Result<()> {
    let meta = load_json("schedulers/schedules.json")?;
    let mut seen = 0;
    for v in meta["variants"].as_array().context("variants")? {
        let extra: Vec<u64> = v["diffusers_extra_step"]
            .as_array()
            .context("diffusers_extra_step")?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        if extra.is_empty() {
            continue;
        }
        ensure!(v["config"]["timestep_spacing"] == "trailing");
        ensure!(extra == [61], "{}: {extra:?}", v["name"]);
        seen += 1;
    }
    ensure!(
        seen == 4,
        "euler, euler-a, dpmpp-2m and unipc trailing: {seen}"
    );
    // DDIM too (it used to refuse: "timestep -1 falls outside").
    let cfg = SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "timestep_spacing": "trailing"}"#,
        "ddim.json",
    )?;
    for kind in SchedulerKind::ALL {
        if kind == SchedulerKind::FlowEuler || kind == SchedulerKind::Lcm {
            continue;
        }
        let s = build(&cfg, kind, 61)?;
        ensure!(s.timesteps().len() == 61, "{kind}: {}", s.timesteps().len());
        ensure!(*s.timesteps().last().unwrap() >= 0.0, "{kind}");
    }
    Ok(())
}

#[test]
fn runs_match_diffusers_given_the_same_noise() -> Result<()> {
    let meta = load_json("schedulers/runs.json")?;
    let rule = meta["step_rule"].as_str().context("step_rule")?;
    ensure!(
        rule.contains("0.5*sin(0.7*scale_model_input(x_i, t_i) + i)") && rule.contains("noise[i]"),
        "the fixture's step rule changed: {rule}"
    );
    let data =
        candle_core::safetensors::load(fixture("schedulers/runs.safetensors"), &Device::Cpu)?;
    let init = &data["init"];
    let noise = &data["noise"];
    let runs = meta["runs"].as_array().context("runs")?;
    ensure!(runs.len() >= 20);
    let mut kinds_seen = HashMap::new();
    for r in runs {
        let name = r["name"].as_str().context("name")?;
        let kind = kind_of(r)?;
        *kinds_seen.entry(kind).or_insert(0) += 1;
        let cfg = config_of(r, name)?;
        let steps = r["steps"].as_u64().context("steps")? as usize;
        let opts = ScheduleOptions {
            karras: false,
            image_seq_len: r["image_seq_len"].as_u64().map(|n| n as usize),
        };
        let want = &data[&format!("{name}.step_latents")];
        let mut sched = build_with(&cfg, kind, steps, &opts)?;
        // diffusers' last step is NaN for bh1 with a zero final sigma; ours is not.
        let nan_last = name == "unipc-bh1-final-zero";
        let mut x = init.affine(sched.init_noise_sigma() as f32 as f64, 0.0)?;
        let mut worst = 0f32;
        for i in 0..steps {
            ensure!(
                sched.needs_noise(i) == expected_noise(kind, i, steps),
                "{name}: needs_noise({i})"
            );
            let input = sched.scale_model_input(&x, i)?;
            let model_output = input.affine(0.7, i as f64)?.sin()?.affine(0.5, 0.0)?;
            let n = noise.get(i)?;
            let given = sched.needs_noise(i).then_some(&n);
            x = sched.step(&model_output, i, &x, given)?;
            let w = want.get(i)?;
            if nan_last && i + 1 == steps {
                ensure!(
                    f32s(&w)?.iter().any(|v| v.is_nan()),
                    "{name}: diffusers fixed it"
                );
                ensure!(
                    f32s(&x)?.iter().all(|v| v.is_finite()),
                    "{name}: last step not finite"
                );
                continue;
            }
            let max_abs = w.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = (&x - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let tol = 1e-4 * max_abs.max(1.0);
            ensure!(
                err <= tol,
                "{name} step {i}: max abs err {err:e} > {tol:e} (max |expected| {max_abs})"
            );
            worst = worst.max(err / max_abs.max(1.0));
        }
        eprintln!("{name}: {steps} steps, max scaled err {worst:e}");
    }
    for kind in [
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2M,
        SchedulerKind::DpmPp2MSde,
        SchedulerKind::UniPc,
        SchedulerKind::Lcm,
        SchedulerKind::FlowEuler,
    ] {
        ensure!(kinds_seen.contains_key(&kind), "no run of {kind}");
    }
    Ok(())
}

/// Which steps diffusers draws noise at: every one for Euler Ancestral and the SDE solver
/// (the last too), all but the last for LCM, none for the ODE samplers.
fn expected_noise(kind: SchedulerKind, i: usize, steps: usize) -> bool {
    match kind {
        SchedulerKind::EulerAncestral | SchedulerKind::DpmPp2MSde => true,
        SchedulerKind::Lcm => i + 1 < steps,
        _ => false,
    }
}

fn sdxl_config() -> Result<SchedulerConfig> {
    Ok(SchedulerConfig::from_file(&fixture(
        "tiny-sdxl/scheduler/scheduler_config.json",
    ))?)
}

#[test]
fn karras_option_equals_the_config_key() -> Result<()> {
    let cfg = sdxl_config()?;
    let with_key = cfg.with_value("use_karras_sigmas", json!(true));
    let opts = ScheduleOptions {
        karras: true,
        image_seq_len: None,
    };
    for kind in [
        SchedulerKind::Euler,
        SchedulerKind::DpmPp2M,
        SchedulerKind::DpmPp2MSde,
        SchedulerKind::UniPc,
    ] {
        let a = build_with(&cfg, kind, 25, &opts)?;
        let b = build(&with_key, kind, 25)?;
        let plain = build(&cfg, kind, 25)?;
        ensure!(
            a.timesteps() == b.timesteps() && a.sigmas() == b.sigmas(),
            "{kind}"
        );
        ensure!(
            a.sigmas() != plain.sigmas(),
            "{kind}: --karras changed nothing"
        );
    }
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Lcm,
    ] {
        let err = build_with(&cfg, kind, 20, &opts)
            .err()
            .context("accepted")?;
        let msg = err.to_string();
        ensure!(
            msg.starts_with("--karras") && msg.contains(kind.class_name()),
            "{kind}: {msg}"
        );
    }
    Ok(())
}

#[test]
fn every_kind_parses_from_its_names_and_near_misses_get_a_suggestion() -> Result<()> {
    for kind in SchedulerKind::ALL {
        ensure!(kind.as_str().parse::<SchedulerKind>()? == kind);
        ensure!(kind.to_string() == kind.as_str());
        let from_class: SchedulerKind = kind.class_name().parse()?;
        ensure!(from_class.class_name() == kind.class_name());
        ensure!(SchedulerKind::names().contains(&kind.as_str()));
        ensure!(SchedulerKind::names().contains(&kind.class_name()));
    }
    for (typo, meant) in [
        ("euler_a", "euler-a"),
        ("Euler-A", "euler-a"),
        ("dpmpp_2m_sde", "dpmpp-2m-sde"),
        ("unpc", "unipc"),
        (
            "EulerAncestralDiscreteSchedular",
            "EulerAncestralDiscreteScheduler",
        ),
    ] {
        match typo.parse::<SchedulerKind>() {
            Err(Error::UnknownKind { suggestion, .. }) => {
                ensure!(suggestion == Some(meant), "{typo}: {suggestion:?}")
            }
            other => bail!("{typo}: {other:?}"),
        }
    }
    let msg = "pndm".parse::<SchedulerKind>().unwrap_err().to_string();
    for name in SchedulerKind::names() {
        ensure!(msg.contains(name), "{name} missing from: {msg}");
    }
    ensure!(!msg.contains("did you mean"), "{msg}");
    Ok(())
}

#[test]
fn dpm_class_name_takes_its_algorithm_from_the_config() -> Result<()> {
    let cfg = sdxl_config()?;
    let sde = cfg.with_value("algorithm_type", json!("sde-dpmsolver++"));
    let class = "DPMSolverMultistepScheduler";
    ensure!(SchedulerKind::resolve(class, &cfg)? == SchedulerKind::DpmPp2M);
    ensure!(SchedulerKind::resolve(class, &sde)? == SchedulerKind::DpmPp2MSde);
    // Our own names are explicit whatever the config says.
    ensure!(SchedulerKind::resolve("dpmpp-2m", &sde)? == SchedulerKind::DpmPp2M);
    ensure!(SchedulerKind::resolve("dpmpp-2m-sde", &cfg)? == SchedulerKind::DpmPp2MSde);
    let sde = sde.with_value("_class_name", json!(class));
    ensure!(sde.default_kind()? == SchedulerKind::DpmPp2MSde);
    for kind in SchedulerKind::ALL {
        let c = cfg.with_value("_class_name", json!(kind.class_name()));
        let want = if kind == SchedulerKind::DpmPp2MSde {
            SchedulerKind::DpmPp2M
        } else {
            kind
        };
        ensure!(c.default_kind()? == want, "{kind}");
    }
    Ok(())
}

#[test]
fn families_split_flow_matching_from_diffusion() {
    use hybridiff_schedulers::Family::*;
    for kind in SchedulerKind::ALL {
        let want = if kind == SchedulerKind::FlowEuler {
            FlowMatching
        } else {
            Diffusion
        };
        assert_eq!(kind.family(), want, "{kind}");
    }
}

/// The error of building `kind` from `cfg` with `steps` steps.
fn refused(cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> String {
    match build(cfg, kind, steps) {
        Ok(_) => panic!("{kind} with {steps} steps accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn step_counts_a_sampler_cannot_run_are_refused_naming_the_key() -> Result<()> {
    let cfg = sdxl_config()?;
    // LCM: at most original_inference_steps (50 by default).
    ensure!(build(&cfg, SchedulerKind::Lcm, 50).is_ok());
    let msg = refused(&cfg, SchedulerKind::Lcm, 51);
    ensure!(
        msg.contains("--steps 51") && msg.contains("original_inference_steps = 50"),
        "{msg}"
    );
    let small = cfg.with_value("original_inference_steps", json!(4));
    ensure!(build(&small, SchedulerKind::Lcm, 4).is_ok());
    let msg = refused(&small, SchedulerKind::Lcm, 5);
    ensure!(msg.contains("original_inference_steps = 4"), "{msg}");
    let msg = refused(
        &cfg.with_value("original_inference_steps", json!(0)),
        SchedulerKind::Lcm,
        1,
    );
    ensure!(msg.contains("`original_inference_steps`"), "{msg}");
    let msg = refused(
        &cfg.with_value("original_inference_steps", json!(2000)),
        SchedulerKind::Lcm,
        4,
    );
    ensure!(msg.contains("`original_inference_steps`"), "{msg}");
    // UniPC: an order above the steps, and orders beyond 3.
    let msg = refused(&cfg, SchedulerKind::UniPc, 1);
    ensure!(
        msg.contains("--steps 1") && msg.contains("solver_order 2"),
        "{msg}"
    );
    let o3 = cfg.with_value("solver_order", json!(3));
    ensure!(build(&o3, SchedulerKind::UniPc, 3).is_ok());
    let msg = refused(&o3, SchedulerKind::UniPc, 2);
    ensure!(msg.contains("solver_order 3"), "{msg}");
    let msg = refused(
        &cfg.with_value("solver_order", json!(4)),
        SchedulerKind::UniPc,
        20,
    );
    ensure!(msg.contains("`solver_order`"), "{msg}");
    Ok(())
}

#[test]
fn combinations_diffusers_refuses_or_that_give_nan_are_refused_by_key() -> Result<()> {
    let cfg = sdxl_config()?;
    // diffusers' __init__: only one of the sigma schedules.
    let both = cfg
        .with_value("use_karras_sigmas", json!(true))
        .with_value("use_exponential_sigmas", json!(true));
    for kind in [
        SchedulerKind::Euler,
        SchedulerKind::DpmPp2M,
        SchedulerKind::DpmPp2MSde,
        SchedulerKind::UniPc,
    ] {
        let msg = refused(&both, kind, 20);
        ensure!(
            msg.contains("use_karras_sigmas and use_exponential_sigmas")
                && msg.contains("diffusers refuses"),
            "{kind}: {msg}"
        );
    }
    // UniPC: shift_terminal without flow sigmas (diffusers' ValueError); the
    // noise-prediction form or a higher-order last step to a zero final sigma (NaN).
    let msg = refused(
        &cfg.with_value("shift_terminal", json!(0.1)),
        SchedulerKind::UniPc,
        20,
    );
    ensure!(msg.contains("`shift_terminal`"), "{msg}");
    let msg = refused(
        &cfg.with_value("predict_x0", json!(false)),
        SchedulerKind::UniPc,
        20,
    );
    ensure!(
        msg.contains("`predict_x0`") && msg.contains("sigma_min"),
        "{msg}"
    );
    ensure!(build(
        &cfg.with_value("predict_x0", json!(false))
            .with_value("final_sigmas_type", json!("sigma_min")),
        SchedulerKind::UniPc,
        20
    )
    .is_ok());
    let msg = refused(
        &cfg.with_value("lower_order_final", json!(false)),
        SchedulerKind::UniPc,
        20,
    );
    ensure!(msg.contains("`lower_order_final`"), "{msg}");
    // Flow: dynamic shifting needs the image size; an absurd shift range is refused.
    let sd3 = SchedulerConfig::from_file(&fixture("tiny-sd3/scheduler/scheduler_config.json"))?;
    let dynamic = sd3.with_value("use_dynamic_shifting", json!(true));
    let msg = refused(&dynamic, SchedulerKind::FlowEuler, 20);
    ensure!(msg.contains("use_dynamic_shifting"), "{msg}");
    let opts = ScheduleOptions {
        karras: false,
        image_seq_len: Some(1024),
    };
    ensure!(build_with(&dynamic, SchedulerKind::FlowEuler, 20, &opts).is_ok());
    let wild = dynamic.with_value("max_shift", json!(500.0));
    let err = build_with(&wild, SchedulerKind::FlowEuler, 20, &opts)
        .err()
        .context("accepted")?
        .to_string();
    ensure!(err.contains("mu"), "{err}");
    let same = dynamic.with_value("max_image_seq_len", json!(256));
    let err = build_with(&same, SchedulerKind::FlowEuler, 20, &opts)
        .err()
        .context("accepted")?
        .to_string();
    ensure!(err.contains("`max_image_seq_len`"), "{err}");
    Ok(())
}

#[test]
fn stochastic_steps_without_noise_are_errors_and_deterministic_ones_ignore_it() -> Result<()> {
    let cfg = sdxl_config()?;
    let x = Tensor::new(&[[0.3f32, -1.2, 2.0]], &Device::Cpu)?;
    let out = x.affine(0.5, 0.1)?;
    let wrong = Tensor::new(&[0.1f32, 0.2], &Device::Cpu)?;
    let noise = Tensor::new(&[[0.7f32, -0.4, 0.05]], &Device::Cpu)?;
    for kind in SchedulerKind::ALL {
        let cfg = if kind == SchedulerKind::FlowEuler {
            SchedulerConfig::from_file(&fixture("tiny-sd3/scheduler/scheduler_config.json"))?
        } else {
            cfg.clone()
        };
        let mut s = build(&cfg, kind, 4)?;
        ensure!(s.needs_noise(0) == kind.is_stochastic(), "{kind}");
        if kind.is_stochastic() {
            let msg = s.step(&out, 0, &x, None).unwrap_err().to_string();
            ensure!(msg.contains("noise"), "{kind}: {msg}");
            let msg = s.step(&out, 0, &x, Some(&wrong)).unwrap_err().to_string();
            ensure!(msg.contains("shape"), "{kind}: {msg}");
            let a = f32s(&s.step(&out, 0, &x, Some(&noise))?)?;
            let b = f32s(&s.step(&out, 0, &x, Some(&(&noise * 2.0)?))?)?;
            ensure!(a != b, "{kind}: the noise changed nothing");
        } else {
            let a = f32s(&s.step(&out, 0, &x, None)?)?;
            let b = f32s(&s.step(&out, 0, &x, Some(&noise))?)?;
            ensure!(a == b, "{kind}: a deterministic sampler used the noise");
        }
    }
    Ok(())
}

#[test]
fn multistep_histories_restart_at_step_zero() -> Result<()> {
    let cfg = sdxl_config()?;
    let x = Tensor::new(&[[0.3f32, -1.2, 2.0]], &Device::Cpu)?;
    let noise = Tensor::new(&[[0.7f32, -0.4, 0.05]], &Device::Cpu)?;
    for kind in [
        SchedulerKind::DpmPp2M,
        SchedulerKind::DpmPp2MSde,
        SchedulerKind::UniPc,
    ] {
        let mut sched = build(&cfg, kind, 20)?;
        let run = |sched: &mut Box<dyn Scheduler>| -> Result<Vec<f32>> {
            let mut x = x.clone();
            for i in 0..4 {
                let out = x.affine(0.7, i as f64)?.sin()?.affine(0.5, 0.0)?;
                x = sched.step(&out, i, &x, Some(&noise))?;
            }
            f32s(&x)
        };
        let first = run(&mut sched)?;
        let second = run(&mut sched)?;
        ensure!(first == second, "{kind}");
    }
    Ok(())
}
