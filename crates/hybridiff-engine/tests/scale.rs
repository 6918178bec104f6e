//! Issue 25: the strategies on 4 and 8 ranks (condition split x bands x stages), AsyncDiff's
//! stride 2, and the work accounting that shows no rank idles or repeats another's work.

mod common;

use std::time::Duration;

use candle_core::Tensor;
use common::*;
use hybridiff_engine::stages::PlanKind;
use hybridiff_engine::strategy::hybrid::PipelineLayout;
use hybridiff_engine::strategy::patch::PatchMode;
use hybridiff_engine::switch::SwitchParams;
use hybridiff_engine::trace::StepMode;
use hybridiff_engine::{denoise, DenoiseOutput, Job, RunOptions, StrategyKind, StrategyOptions};
use hybridiff_models::Denoiser;

fn run_on(
    model: &dyn Denoiser,
    s: &Setup,
    steps: usize,
    guidance: f64,
    kind: StrategyKind,
    world: usize,
    opts: &StrategyOptions,
) -> hybridiff_engine::Result<DenoiseOutput> {
    let job = Job {
        model,
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps,
        guidance,
        inputs: &s.inputs,
        progress: None,
        sampling: Default::default(),
    };
    let ro = RunOptions {
        world_size: world,
        threads_per_rank: 1,
        comm_timeout: Duration::from_secs(120),
        placement: Default::default(),
    };
    denoise(&job, kind.build(opts).as_ref(), &ro)
}

/// Switching that pipelines steps 3..=5 of 8 (the fallback tau_cap 3, k 2).
fn early() -> SwitchParams {
    SwitchParams {
        l_slope: 2,
        eps_slope: 1e-12,
        k: 2,
        tau_cap: 3,
    }
}

fn hybrid(layout: PipelineLayout, mode: PatchMode) -> StrategyOptions {
    StrategyOptions {
        switch: early(),
        stages: PlanKind::Auto,
        pipeline_layout: Some(layout),
        patch_mode: Some(mode),
        ..Default::default()
    }
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b)
}

#[test]
fn cfg_on_4_and_8_ranks_splits_each_branch_into_bands_and_equals_serial() {
    for name in ["tiny-sdxl", "tiny-sd3"] {
        let s = setup_named(name);
        let model = s.model.denoiser.as_ref();
        let serial = run_on(
            model,
            &s,
            6,
            s.guidance,
            StrategyKind::Serial,
            1,
            &Default::default(),
        )
        .unwrap();
        for world in [4, 8] {
            let out = run_on(
                model,
                &s,
                6,
                s.guidance,
                StrategyKind::Cfg,
                world,
                &Default::default(),
            )
            .unwrap();
            let d = rel_diff(&out.latents, &serial.latents);
            assert!(d < 1e-4, "{name} cfg x{world}: relative diff {d}");
            let plan = out.trace.stage_plan.as_ref().unwrap();
            assert_eq!(plan["bands"], world / 2, "{name} x{world}: {plan}");
            assert_eq!(plan["cfg_groups"], 2);
            assert!(out.trace.steps.iter().all(|st| st.mode == StepMode::Exact));
        }
    }
}

#[test]
fn hybrid_on_4_and_8_ranks_keeps_exact_steps_exact_and_pipelines_in_both_layouts() {
    let s = setup();
    let model = s.model.denoiser.as_ref();
    let steps = 8;
    let serial = run_on(
        model,
        &s,
        steps,
        s.guidance,
        StrategyKind::Serial,
        1,
        &Default::default(),
    )
    .unwrap();
    let scale = max_abs(&serial.latents);
    for world in [4, 8] {
        for layout in [PipelineLayout::Across, PipelineLayout::PerBranch] {
            let what = format!("hybrid x{world} {layout}");
            let out = run_on(
                model,
                &s,
                steps,
                s.guidance,
                StrategyKind::Hybrid,
                world,
                &hybrid(layout, PatchMode::Sync),
            )
            .unwrap();
            assert_eq!(
                (out.trace.tau1, out.trace.tau2),
                (Some(3), Some(5)),
                "{what}"
            );
            let modes: Vec<StepMode> = out.trace.steps.iter().map(|st| st.mode).collect();
            assert_eq!(
                modes,
                [
                    [StepMode::Exact; 3].as_slice(),
                    &[StepMode::Fill],
                    &[StepMode::Pipelined; 2],
                    &[StepMode::Exact; 2]
                ]
                .concat(),
                "{what}"
            );
            // The exact steps before the switch are serial's, up to rounding, and so is the
            // fill: an exact step whose band outputs fill the stages (not a chain).
            for i in 0..4 {
                let d = max_abs(
                    &(out.step_latents.get(i).unwrap() - serial.step_latents.get(i).unwrap())
                        .unwrap(),
                );
                assert!(d < 1e-4 * scale, "{what}: step {i} off by {d}");
            }
            assert_eq!(out.trace.steps[3].chain_groups, 0, "{what}");
            let d = rel_diff(&out.latents, &serial.latents);
            assert!(d > 1e-6 && d < 0.5, "{what}: final latents off by {d}");
            let plan = out
                .trace
                .stage_plan
                .as_ref()
                .unwrap()
                .as_array()
                .unwrap()
                .clone();
            assert_eq!(plan.len(), world, "{what}: one stage per rank");
        }
    }
}

#[test]
fn hybrid_with_displaced_bands_drains_them_around_the_pipelined_steps() {
    let s = setup();
    let model = s.model.denoiser.as_ref();
    let serial = run_on(
        model,
        &s,
        10,
        s.guidance,
        StrategyKind::Serial,
        1,
        &Default::default(),
    )
    .unwrap();
    let out = run_on(
        model,
        &s,
        10,
        s.guidance,
        StrategyKind::Hybrid,
        4,
        &hybrid(PipelineLayout::Across, PatchMode::Displaced),
    )
    .unwrap();
    let modes: Vec<StepMode> = out.trace.steps.iter().map(|st| st.mode).collect();
    // Step 0 is the sync warm-up, 1-2 displaced, 3 the fill, 4-5 pipelined, then step 6
    // warms up again (sync) before 7-9 are displaced.
    use StepMode::*;
    assert_eq!(
        modes,
        [
            Exact, Pipelined, Pipelined, Fill, Pipelined, Pipelined, Exact, Pipelined, Pipelined,
            Pipelined
        ]
    );
    let d = rel_diff(&out.latents, &serial.latents);
    assert!(d < 0.5, "displaced hybrid off by {d}");
}

/// The work-accounting check of issue 25: in every step each rank's counted FLOPs lie within
/// `BOUND` of the step's total / W, and no two ranks compute the same module on the same
/// input, for every strategy and rank count the engine accepts here. Exempt, and why:
/// `async`'s stride-2 round's second step computes nothing anywhere (its prediction was
/// computed a step ahead), and the extra rank of stride 2 (which mirrors the last stage) has
/// nothing to add in the exact warm-up (each stage is computed once, by its owner) and in a
/// lone last step.
/// Measured worst: 24% (the tiny SD3's 8-stage pipeline; its 24 blocks do not cut into 8
/// equal stages with the output layers); bands and branch groups split exactly.
const BOUND: f64 = 0.3;

#[test]
fn every_rank_does_distinct_work_in_every_step() {
    let steps = 8;
    let cases: Vec<(&str, StrategyKind, usize, StrategyOptions, f64)> = vec![
        ("tiny-sdxl", StrategyKind::Cfg, 2, Default::default(), 5.0),
        ("tiny-sdxl", StrategyKind::Cfg, 4, Default::default(), 5.0),
        ("tiny-sdxl", StrategyKind::Cfg, 8, Default::default(), 5.0),
        ("tiny-sdxl", StrategyKind::Cfg, 4, Default::default(), 1.0),
        ("tiny-sdxl", StrategyKind::Patch, 8, Default::default(), 5.0),
        (
            "tiny-sdxl",
            StrategyKind::Hybrid,
            2,
            hybrid(PipelineLayout::Across, PatchMode::Sync),
            5.0,
        ),
        (
            "tiny-sdxl",
            StrategyKind::Hybrid,
            4,
            hybrid(PipelineLayout::Across, PatchMode::Sync),
            5.0,
        ),
        (
            "tiny-sdxl",
            StrategyKind::Hybrid,
            8,
            hybrid(PipelineLayout::PerBranch, PatchMode::Displaced),
            5.0,
        ),
        (
            "tiny-sd3",
            StrategyKind::Hybrid,
            8,
            hybrid(PipelineLayout::Across, PatchMode::Sync),
            7.0,
        ),
        (
            "tiny-sd3",
            StrategyKind::Hybrid,
            4,
            hybrid(PipelineLayout::PerBranch, PatchMode::Sync),
            7.0,
        ),
        (
            "tiny-sdxl",
            StrategyKind::Hybrid,
            4,
            Default::default(),
            1.0,
        ),
        (
            "tiny-sdxl",
            StrategyKind::Async,
            4,
            StrategyOptions {
                stages: PlanKind::Auto,
                ..Default::default()
            },
            5.0,
        ),
        (
            "tiny-sdxl",
            StrategyKind::Async,
            4,
            StrategyOptions {
                stages: PlanKind::Auto,
                stride: 2,
                ..Default::default()
            },
            5.0,
        ),
        (
            "tiny-sd3",
            StrategyKind::Async,
            8,
            StrategyOptions {
                stages: PlanKind::Auto,
                stride: 2,
                warmup: 2,
                ..Default::default()
            },
            7.0,
        ),
    ];
    let mut fixtures = std::collections::HashMap::new();
    for (name, kind, world, opts, guidance) in cases {
        let s = fixtures.entry(name).or_insert_with(|| setup_named(name));
        let audit = Audit::new(s.model.denoiser.as_ref());
        let out = run_on(&audit, s, steps, guidance, kind, world, &opts).unwrap();
        let what = format!("{name} {kind} x{world} stride {} g {guidance}", opts.stride);
        let dups = audit.duplicates();
        assert!(
            dups.is_empty(),
            "{what}: ranks computed the same thing: {dups:?}"
        );
        for st in &out.trace.steps {
            assert_eq!(st.rank_flops.len(), world, "{what}");
            let total: f64 = st.rank_flops.iter().sum();
            let mirror_out = opts.stride == 2
                && (st.index + 1 == steps || st.mode != StepMode::Pipelined)
                && total > 0.0;
            if total == 0.0 {
                assert_eq!(opts.stride, 2, "{what}: step {} computed nothing", st.index);
                continue;
            }
            // With the extra rank out, the others share the step among W - 1.
            let sharing = if mirror_out { world - 1 } else { world };
            let mean = total / sharing as f64;
            for (r, &f) in st.rank_flops.iter().enumerate() {
                if mirror_out && r == world - 1 {
                    assert_eq!(f, 0.0, "{what}: step {}: the extra rank computed", st.index);
                    continue;
                }
                let dev = (f - mean).abs() / mean;
                let stated = BOUND;
                assert!(
                    dev <= stated,
                    "{what}: step {} ({:?}) rank {r}: {f:.3e} FLOPs, {:.0}% from the mean {mean:.3e} ({:?})",
                    st.index,
                    st.mode,
                    100.0 * dev,
                    st.rank_flops
                );
            }
        }
    }
}

/// AsyncDiff's stride 2 computed in one process, module by module, as its released code
/// schedules it (see `strategy/asyncdiff.rs`): the distributed run must equal it.
fn stride2_emulation(s: &Setup, steps: usize, warmup: usize, n: usize) -> Tensor {
    use hybridiff_engine::stages::StagePlan;
    use hybridiff_models::Conditioning;
    let model = s.model.denoiser.as_ref();
    let job = Job {
        model,
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps,
        guidance: s.guidance,
        inputs: &s.inputs,
        progress: None,
        sampling: Default::default(),
    };
    let (h, w) = (
        s.inputs.latents.dim(2).unwrap(),
        s.inputs.latents.dim(3).unwrap(),
    );
    let plan = StagePlan::new(PlanKind::Auto, model, n, (h, w)).unwrap();
    let cond = Conditioning::cat(&s.inputs.uncond, &s.inputs.cond).unwrap();
    let mut sampler = hybridiff_engine::Sampler::new(&job).unwrap();
    let m = model.module_names().len();
    // One forward where the modules of `own` compute and the others come from `cache`.
    let forward = |x: &Tensor, t: f64, cache: &[Vec<Tensor>], own: Option<usize>| {
        let mut state = model.begin(x, t, &cond).unwrap();
        let mut outs = Vec::with_capacity(m);
        for (i, &owner) in plan.owner.iter().enumerate() {
            let out = if own.is_none_or(|o| owner == o) {
                model.run_module(i, &state).unwrap()
            } else {
                cache[i].clone()
            };
            outs.push(out.clone());
            model.apply_module(i, &mut state, out).unwrap();
        }
        (model.end(state).unwrap(), outs)
    };
    let mut cache: Vec<Vec<Tensor>> = Vec::new();
    let mut ahead = None;
    let first = warmup.max(1);
    for i in 0..steps {
        let x = sampler.model_input(i).unwrap();
        let x = Tensor::cat(&[&x, &x], 0).unwrap();
        let t = sampler.timestep(i);
        let eps = if i < first {
            let (y, outs) = forward(&x, t, &cache, None);
            cache = outs;
            y
        } else if (i - first) % 2 == 1 {
            ahead.take().unwrap()
        } else if i + 1 == steps {
            // A lone last step: every stage at t_i on the stale cache.
            let mut last = None;
            for st in 0..n {
                let (y, _) = forward(&x, t, &cache, Some(st));
                last = Some(y);
            }
            last.unwrap()
        } else {
            let t_next = sampler.timestep(i + 1);
            let mut fresh = cache.clone();
            for st in 0..n {
                let (y, outs) = forward(&x, t_next, &cache, Some(st));
                for ((f, o), &owner) in fresh.iter_mut().zip(outs).zip(&plan.owner) {
                    if owner == st {
                        *f = o;
                    }
                }
                if st == n - 1 {
                    ahead = Some(y);
                }
            }
            // The extra rank: the last stage at t_i on the stale cache.
            let (y, _) = forward(&x, t, &cache, Some(n - 1));
            cache = fresh;
            y
        };
        sampler
            .step_guided(
                i,
                &eps.narrow(0, 0, 1).unwrap(),
                &eps.narrow(0, 1, 1).unwrap(),
            )
            .unwrap();
    }
    sampler.latents
}

#[test]
fn async_stride_2_follows_the_reference_schedule_next_to_stride_1() {
    let s = setup();
    let model = s.model.denoiser.as_ref();
    for (steps, world) in [(8, 4), (9, 3)] {
        let opts = StrategyOptions {
            stride: 2,
            stages: PlanKind::Auto,
            ..Default::default()
        };
        let out = run_on(
            model,
            &s,
            steps,
            s.guidance,
            StrategyKind::Async,
            world,
            &opts,
        )
        .unwrap();
        let want = stride2_emulation(&s, steps, 1, world - 1);
        let d = max_abs(&(&out.latents - &want).unwrap());
        assert!(
            d <= 1e-5 * max_abs(&want),
            "stride 2 x{world}, {steps} steps: off the emulation by {d}"
        );
        // Rounds of two after the warm-up: the first step computes, the second does not.
        for st in &out.trace.steps[1..] {
            let total: f64 = st.rank_flops.iter().sum();
            let computes = (st.index - 1) % 2 == 0;
            assert_eq!(total > 0.0, computes, "x{world} step {}", st.index);
        }
        assert_eq!(
            out.trace
                .stage_plan
                .as_ref()
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            world,
            "n = W - 1 stages and one mirror"
        );
        // Stride 1 on the same ranks computes every step.
        let one = run_on(
            model,
            &s,
            steps,
            s.guidance,
            StrategyKind::Async,
            world,
            &StrategyOptions {
                stages: PlanKind::Auto,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(one
            .trace
            .steps
            .iter()
            .all(|st| st.rank_flops.iter().sum::<f64>() > 0.0));
        let serial = run_on(
            model,
            &s,
            steps,
            s.guidance,
            StrategyKind::Serial,
            1,
            &Default::default(),
        )
        .unwrap();
        for o in [&out, &one] {
            let d = rel_diff(&o.latents, &serial.latents);
            assert!(d < 0.5, "x{world}: {d}");
        }
    }
}
