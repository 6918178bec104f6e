//! Hybridiff and AsyncDiff against the authors' code (`expected/hybrid.*`) and serial.

mod common;

use candle_core::Device;
use common::*;
use hybridiff_engine::stages::{balanced_contiguous, PlanKind, StagePlan};
use hybridiff_engine::switch::SwitchParams;
use hybridiff_engine::trace::StepMode;
use hybridiff_engine::{PipelinedGuidance, StrategyKind, StrategyOptions};
use hybridiff_models::Denoiser;

#[test]
fn hybrid_two_ranks_matches_the_authors_code() {
    let s = setup();
    let (v, t) = reference();
    assert_eq!(v["world_size"], 2);
    let out = run(&s, StrategyKind::Hybrid, 2, &fixture_options(&v)).unwrap();
    assert_eq!(out.trace.tau1, v["tau1"].as_u64().map(|x| x as usize));
    assert_eq!(out.trace.tau2, v["tau2"].as_u64().map(|x| x as usize));
    let log: Vec<f64> = v["rel_mae_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(out.trace.rel_mae_log.len(), log.len());
    for (i, (g, w)) in out.trace.rel_mae_log.iter().zip(&log).enumerate() {
        assert!((g - w).abs() < 1e-4, "rel_mae_log[{i}]: {g} vs {w}");
    }
    assert_steps_close(&out.step_latents, &t["step_latents"], "hybrid x2");
    let modes: Vec<StepMode> = out.trace.steps.iter().map(|s| s.mode).collect();
    assert_eq!(modes[3], StepMode::Exact);
    assert_eq!(modes[4], StepMode::Fill);
    assert_eq!(&modes[5..8], &[StepMode::Pipelined; 3]);
    assert_eq!(modes[8], StepMode::Exact);
    // Only stage boundaries and skips cross ranks: far less than every cache.
    let st = &out.trace.steps[5];
    assert!(
        st.bytes_sent > 0 && st.bytes_sent * 4 < st.reference_bytes_sent,
        "{st:?}"
    );
}

#[test]
fn hybrid_fallback_path_runs_when_nothing_flattens() {
    let s = setup();
    let opts = StrategyOptions {
        switch: SwitchParams {
            l_slope: 3,
            eps_slope: 1e-12,
            k: 4,
            tau_cap: 10,
        },
        ..Default::default()
    };
    let out = run(&s, StrategyKind::Hybrid, 2, &opts).unwrap();
    assert_eq!((out.trace.tau1, out.trace.tau2), (Some(10), Some(14)));
    let staged: Vec<usize> = out
        .trace
        .steps
        .iter()
        .filter(|s| s.mode != StepMode::Exact)
        .map(|s| s.index)
        .collect();
    assert_eq!(
        staged,
        (10..=14).collect::<Vec<_>>(),
        "k + 1 steps from tau_cap"
    );
    assert_eq!(out.trace.steps[10].mode, StepMode::Fill);
    assert!(out.trace.rel_mae_log[10..=14].iter().all(|m| *m == 0.0));
    assert!(out.trace.rel_mae_log[15] > 0.0);
}

#[test]
fn hybrid_four_ranks_reference_and_auto_plans_stay_close_to_serial() {
    let s = setup();
    let (v, _) = reference();
    let serial = candle_core::safetensors::load(
        fixture("tiny-sdxl/expected/serial.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for stages in [PlanKind::Reference, PlanKind::Auto] {
        let opts = StrategyOptions {
            stages,
            ..fixture_options(&v)
        };
        let out = run(&s, StrategyKind::Hybrid, 4, &opts).unwrap();
        assert_eq!(
            (out.trace.tau1, out.trace.tau2),
            (Some(3), Some(7)),
            "{stages:?}"
        );
        // Steps before the switch are exact and equal serial.
        assert_steps_close(
            &out.step_latents.narrow(0, 0, 4).unwrap(),
            &serial["step_latents"].narrow(0, 0, 4).unwrap(),
            "hybrid x4 exact phase",
        );
        let plan = out
            .trace
            .stage_plan
            .as_ref()
            .unwrap()
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(plan.len(), 4);
        let d = max_abs(&(&out.latents - &serial["latents"]).unwrap());
        let scale = max_abs(&serial["latents"]);
        assert!(
            d < 0.5 * scale,
            "{stages:?}: final latents off by {d} (scale {scale})"
        );
    }
}

#[test]
fn reuse_guidance_changes_pipelined_steps_only() {
    let s = setup();
    let (v, t) = reference();
    let opts = StrategyOptions {
        pipelined_guidance: PipelinedGuidance::Reuse,
        ..fixture_options(&v)
    };
    let out = run(&s, StrategyKind::Hybrid, 2, &opts).unwrap();
    let want = &t["step_latents"];
    assert_steps_close(
        &out.step_latents.narrow(0, 0, 4).unwrap(),
        &want.narrow(0, 0, 4).unwrap(),
        "before the switch",
    );
    let d = max_abs(&(out.step_latents.get(4).unwrap() - want.get(4).unwrap()).unwrap());
    assert!(
        d > 1e-2,
        "reuse must change the first pipelined step (diff {d})"
    );
}

#[test]
fn async_equals_serial_when_warmup_covers_all_steps() {
    let s = setup();
    let serial = candle_core::safetensors::load(
        fixture("tiny-sdxl/expected/serial.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let one = run(&s, StrategyKind::Serial, 1, &StrategyOptions::default()).unwrap();
    for world in [2, 4] {
        let opts = StrategyOptions {
            warmup: 20,
            ..Default::default()
        };
        let out = run(&s, StrategyKind::Async, world, &opts).unwrap();
        assert_steps_close(
            &out.step_latents,
            &serial["step_latents"],
            "async warm-up only",
        );
        // The exact steps run the stages one after another, each computed once (the
        // reference computes the whole forward on every rank): the ranks' FLOPs add up to
        // serial's, and only stage outputs and the prediction cross ranks.
        for (st, se) in out.trace.steps.iter().zip(&one.trace.steps) {
            assert_eq!(st.chain_groups, 1);
            let total: f64 = st.rank_flops.iter().sum();
            assert!((total - se.rank_flops[0]).abs() <= 1e-9 * total, "{st:?}");
            assert!(st.rank_flops.iter().all(|&f| f > 0.0 && f < total));
            assert!(st.bytes_sent > 0);
        }
    }
    // With pipelining it departs from serial, but stays in the same range.
    let out = run(&s, StrategyKind::Async, 2, &StrategyOptions::default()).unwrap();
    assert_eq!(out.trace.steps[1].mode, StepMode::Pipelined);
    assert!(out.trace.steps[1].bytes_sent > 0);
    let d = max_abs(&(&out.latents - &serial["latents"]).unwrap());
    assert!(d > 1e-3 && d < 0.5 * max_abs(&serial["latents"]), "{d}");
}

#[test]
fn auto_plans_own_every_module_once_and_balance_cost() {
    let s = setup();
    let model: &dyn Denoiser = s.model.denoiser.as_ref();
    let flops = model.module_flops(16, 16);
    let total: f64 = flops.iter().sum();
    let biggest = flops.iter().cloned().fold(0.0, f64::max);
    for n in 2..=6 {
        let plan = StagePlan::new(PlanKind::Auto, model, n, (16, 16)).unwrap();
        assert_eq!(plan.owner.len(), model.module_names().len());
        for st in 0..n {
            assert!(plan.owner.contains(&st), "stage {st} empty");
        }
        assert!(plan.owner.windows(2).all(|w| w[0] <= w[1]), "contiguous");
        let worst = plan.stage_flops.iter().cloned().fold(0.0, f64::max);
        // The optimal contiguous cut is never worse than the mean plus one module.
        assert!(
            worst <= total / n as f64 + biggest,
            "n={n}: {worst} > bound"
        );
        assert!((plan.stage_flops.iter().sum::<f64>() - total).abs() < 1e-6 * total);
    }
    // The DP is optimal on a small case.
    assert_eq!(
        balanced_contiguous(&[1.0, 1.0, 1.0, 3.0], 2),
        vec![0, 0, 0, 1]
    );
    assert_eq!(
        balanced_contiguous(&[5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2),
        vec![0, 1, 1, 1, 1, 1]
    );
}

#[test]
fn bad_plans_and_switch_parameters_fail_before_compute() {
    let s = setup();
    let model: &dyn Denoiser = s.model.denoiser.as_ref();
    let names = model.module_names();
    let flops = model.module_flops(16, 16);
    let mut owner = vec![1; names.len()];
    owner[0] = 0;
    owner[3] = 7;
    let err = StagePlan::from_owner(owner, 2, &flops, names)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("down_blocks.2") && err.contains("stage 7"),
        "{err}"
    );
    let err = StagePlan::from_owner(vec![1; names.len()], 2, &flops, names)
        .unwrap_err()
        .to_string();
    assert!(err.contains("stage 0 empty"), "{err}");
    let err = StagePlan::new(PlanKind::Reference, model, 3, (16, 16))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--stages auto"), "{err}");

    let opts = StrategyOptions {
        switch: SwitchParams {
            l_slope: 3,
            eps_slope: 0.05,
            k: 15,
            tau_cap: 10,
        },
        ..Default::default()
    };
    let err = run(&s, StrategyKind::Hybrid, 2, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--tau-cap 10") && err.contains("--steps 20"),
        "{err}"
    );
    let err = run(&s, StrategyKind::Hybrid, 3, &StrategyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--world-size 3"), "{err}");
    let err = run(&s, StrategyKind::Async, 1, &StrategyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--world-size 1"), "{err}");
}

#[test]
fn measured_plans_are_valid_and_shared_by_all_ranks() {
    let s = setup();
    let model: &dyn Denoiser = s.model.denoiser.as_ref();
    let x = &s.inputs.latents;
    for n in [2, 4] {
        let plan = StagePlan::measured(model, n, x, 500.0, &s.inputs.cond, 1).unwrap();
        assert_eq!(plan.owner.len(), model.module_names().len());
        assert!(plan.owner.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*plan.owner.last().unwrap(), n - 1);
    }
    let (v, _) = reference();
    let opts = StrategyOptions {
        stages: PlanKind::Measured,
        ..fixture_options(&v)
    };
    let out = run(&s, StrategyKind::Hybrid, 2, &opts).unwrap();
    assert_eq!((out.trace.tau1, out.trace.tau2), (Some(3), Some(7)));
}

#[test]
fn default_plan_is_the_reference_where_one_exists_else_auto() {
    let s = setup();
    let sdxl: &dyn Denoiser = s.model.denoiser.as_ref();
    for n in [2, 4] {
        assert_eq!(
            StagePlan::new(PlanKind::Default, sdxl, n, (16, 16)).unwrap(),
            StagePlan::new(PlanKind::Reference, sdxl, n, (16, 16)).unwrap()
        );
    }
    assert_eq!(
        StagePlan::new(PlanKind::Default, sdxl, 3, (16, 16)).unwrap(),
        StagePlan::new(PlanKind::Auto, sdxl, 3, (16, 16)).unwrap()
    );
    // An SD 1.5 layout has no `up_blocks.0.attentions.0`: no reference plan.
    let sd15 = hybridiff_models::unet::UNet2DConditionModel::load(
        &fixture("models/unet-sd15"),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(StagePlan::new(PlanKind::Reference, &sd15, 2, (16, 16)).is_err());
    assert_eq!(
        StagePlan::new(PlanKind::Default, &sd15, 2, (16, 16)).unwrap(),
        StagePlan::new(PlanKind::Auto, &sd15, 2, (16, 16)).unwrap()
    );
}
