//! SD3 (MMDiT, flow matching) through every strategy, against diffusers and the
//! authors' code on the tiny SD3 fixture.

mod common;

use candle_core::Device;
use common::*;
use hybridiff_engine::stages::{PlanKind, StagePlan};
use hybridiff_engine::trace::StepMode;
use hybridiff_engine::{StrategyKind, StrategyOptions};
use hybridiff_schedulers::SchedulerKind;

fn serial_expected() -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        fixture("tiny-sd3/expected/serial.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn sd3_serial_and_cfg_match_diffusers_20_flow_steps() {
    let s = setup_named("tiny-sd3");
    assert_eq!(s.scheduler, SchedulerKind::FlowEuler);
    let want = serial_expected();
    for (kind, world) in [(StrategyKind::Serial, 1), (StrategyKind::Cfg, 2)] {
        let out = run(&s, kind, world, &StrategyOptions::default()).unwrap();
        assert_steps_close(&out.step_latents, &want["step_latents"], &format!("{kind}"));
        assert_eq!(out.trace.steps[0].timestep, 1000.0);
    }
}

#[test]
fn sd3_hybrid_two_ranks_matches_the_authors_code() {
    let s = setup_named("tiny-sd3");
    let (v, t) = reference_of("tiny-sd3");
    assert_eq!(v["guidance_scale"], 7.0);
    let out = run(&s, StrategyKind::Hybrid, 2, &fixture_options(&v)).unwrap();
    assert_eq!(out.trace.tau1, v["tau1"].as_u64().map(|x| x as usize));
    assert_eq!(out.trace.tau2, v["tau2"].as_u64().map(|x| x as usize));
    let log = v["rel_mae_log"].as_array().unwrap();
    for (i, (g, w)) in out.trace.rel_mae_log.iter().zip(log).enumerate() {
        let w = w.as_f64().unwrap();
        assert!((g - w).abs() < 1e-4, "rel_mae_log[{i}]: {g} vs {w}");
    }
    assert_steps_close(&out.step_latents, &t["step_latents"], "sd3 hybrid x2");
    assert_eq!(out.trace.steps[4].mode, StepMode::Fill);
    // The plan is the reference's: blocks 0-11 | 12-23 + norm_out + proj_out.
    let plan = out.trace.stage_plan.unwrap();
    let first: Vec<&str> = plan[0]["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(first.len(), 12);
    assert_eq!(first[11], "transformer_blocks.11");
    // Only the block-to-block boundary crosses ranks in a pipelined step.
    let st = &out.trace.steps[6];
    assert!(st.bytes_sent * 5 < st.reference_bytes_sent, "{st:?}");
}

#[test]
fn sd3_reference_plans_for_two_three_and_four_stages() {
    let s = setup_named("tiny-sd3");
    let model = s.model.denoiser.as_ref();
    for (n, per) in [(2, 12), (3, 8), (4, 6)] {
        let plan = StagePlan::new(PlanKind::Reference, model, n, (16, 16)).unwrap();
        for (m, name) in model.module_names().iter().enumerate() {
            let want = match name.strip_prefix("transformer_blocks.") {
                Some(i) => i.parse::<usize>().unwrap() / per,
                None => n - 1,
            };
            assert_eq!(plan.owner[m], want, "n={n} {name}");
        }
    }
    assert!(StagePlan::new(PlanKind::Reference, model, 5, (16, 16)).is_err());
}

#[test]
fn sd3_async_and_four_rank_hybrid_run() {
    let s = setup_named("tiny-sd3");
    let want = serial_expected();
    let (v, _) = reference_of("tiny-sd3");
    let opts = StrategyOptions {
        warmup: 20,
        ..Default::default()
    };
    let out = run(&s, StrategyKind::Async, 3, &opts).unwrap();
    assert_steps_close(
        &out.step_latents,
        &want["step_latents"],
        "async warm-up only",
    );
    let out = run(&s, StrategyKind::Hybrid, 4, &fixture_options(&v)).unwrap();
    assert_eq!((out.trace.tau1, out.trace.tau2), (Some(3), Some(7)));
    assert_steps_close(
        &out.step_latents.narrow(0, 0, 4).unwrap(),
        &want["step_latents"].narrow(0, 0, 4).unwrap(),
        "sd3 hybrid x4 exact phase",
    );
}
