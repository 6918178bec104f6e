//! `tune`'s central claim, on real runs: the schedule of a hybrid run is predicted exactly
//! from serial's rel-MAE curve, and candidates that share a planned run produce the same
//! output, so one run stands for all of them.

mod common;

use common::*;
use hybridiff_engine::switch::SwitchParams;
use hybridiff_engine::trace::StepMode;
use hybridiff_engine::tune::{predict_schedule, step_mode, Grid, Knobs, Plan, Schedule};
use hybridiff_engine::{StrategyKind, StrategyOptions};

fn options(l: usize, eps: f64, k: usize, cap: usize) -> StrategyOptions {
    StrategyOptions {
        switch: SwitchParams {
            l_slope: l,
            eps_slope: eps,
            k,
            tau_cap: cap,
        },
        ..Default::default()
    }
}

/// Runs hybrid with each candidate and compares the schedule and every step's mode with
/// the prediction from serial's curve.
fn check_predictions(name: &'static str, candidates: &[(usize, f64, usize, usize)]) {
    let s = setup_named(name);
    let serial = run(&s, StrategyKind::Serial, 1, &Default::default()).unwrap();
    let curve = &serial.trace.rel_mae_log;
    assert!(
        curve.iter().all(|v| *v > 0.0),
        "{name}: serial records every step's rel-MAE"
    );
    let mut fallbacks = 0;
    let mut cached = 0;
    for &(l, eps, k, cap) in candidates {
        // Without and with a step cache that would skip most steps from step 1 on: the
        // detection steps compute (`Worker::detecting`), so the schedule stays predicted.
        for cache in [None, Some("teacache:threshold=0.5,warmup=1")] {
            let o = StrategyOptions {
                cache: cache.map(|c| c.parse().unwrap()),
                ..options(l, eps, k, cap)
            };
            let predicted = predict_schedule(curve, o.switch).unwrap();
            fallbacks += (cache.is_none() && predicted.fallback()) as usize;
            let out = run(&s, StrategyKind::Hybrid, 2, &o).unwrap();
            let actual = Schedule::of_trace(&out.trace).unwrap();
            assert_eq!(
                predicted, actual,
                "{name} L {l} eps {eps} k {k} tau_cap {cap} cache {cache:?}"
            );
            let p = predicted.pipelined(20);
            for st in &out.trace.steps {
                let want = step_mode(st.index, p);
                if cache.is_none() {
                    assert_eq!(st.mode, want, "{name}: step {}", st.index);
                } else {
                    // A step skipped whole (teacache on a U-Net) may move the fill into a
                    // later pipelined step; the pipelined range is the predicted one.
                    assert_eq!(
                        st.mode == StepMode::Exact,
                        want == StepMode::Exact,
                        "{name}: step {} with {cache:?}",
                        st.index
                    );
                }
                // Before the decision the exact steps are serial's, value for value.
                if st.index <= actual.decided_at {
                    assert_eq!(st.rel_mae, curve[st.index], "{name}: step {}", st.index);
                }
            }
            cached += out.trace.cached_steps;
        }
    }
    assert!(cached > 0, "{name}: the cache skipped no step");
    assert!(
        fallbacks > 0 && fallbacks < candidates.len(),
        "{name}: both paths covered"
    );
}

#[test]
fn predicted_schedules_are_those_of_real_hybrid_runs_sdxl() {
    check_predictions(
        "tiny-sdxl",
        &[
            (3, 0.05, 4, 10), // the authors' fixture: detection at 3
            (2, 1e-9, 3, 6),  // nothing flat enough: the tau_cap fallback
            (2, 0.02, 5, 12), // an early detection, another k
            (4, 5e-3, 2, 15), // a later detection or fallback
        ],
    );
}

#[test]
fn predicted_schedules_are_those_of_real_hybrid_runs_sd3() {
    check_predictions("tiny-sd3", &[(3, 0.05, 4, 10), (2, 1e-9, 3, 8)]);
}

#[test]
fn candidates_sharing_a_planned_run_give_the_same_output() {
    let s = setup();
    let serial = run(&s, StrategyKind::Serial, 1, &Default::default()).unwrap();
    let grid = Grid {
        l_slope: vec![2, 3, 4],
        eps_slope: vec![1e-9, 1e-3, 0.01, 0.05],
        k: vec![3],
        tau_cap: vec![8, 12],
        knobs: vec![Knobs::default()],
    };
    let plan = Plan::new(&grid, std::slice::from_ref(&serial.trace.rel_mae_log), 20).unwrap();
    assert!(
        plan.runs.len() < plan.candidates.len(),
        "{} runs",
        plan.runs.len()
    );
    // For each run shared by several candidates, the representative and another member
    // (different thresholds) give bit-identical latents.
    let mut checked = 0;
    for (r, spec) in plan.runs.iter().enumerate() {
        let Some(other) = (0..plan.candidates.len())
            .find(|&c| plan.run_of[c][0] == r && c != spec.representative)
        else {
            continue;
        };
        let a = plan.candidates[spec.representative].switch;
        let b = plan.candidates[other].switch;
        assert_ne!(a, b);
        let run_with = |p: SwitchParams| {
            run(
                &s,
                StrategyKind::Hybrid,
                2,
                &StrategyOptions {
                    switch: p,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let (x, y) = (run_with(a), run_with(b));
        assert_eq!(
            max_abs(&(&x.latents - &y.latents).unwrap()),
            0.0,
            "{a:?} vs {b:?}"
        );
        checked += 1;
        if checked == 2 {
            break;
        }
    }
    assert_eq!(checked, 2, "the grid has shared runs");
}
