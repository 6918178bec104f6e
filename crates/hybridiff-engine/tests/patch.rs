//! `patch` (DistriFusion) on the tiny SDXL U-Net and the tiny SD3 MMDiT: `sync` equals
//! serial within float rounding at 2 and 4 bands (also uneven heights, CFG batched and
//! guidance off), `displaced` with every step warm equals serial, displaced proper stays
//! close, and layouts that cannot work fail before compute.

mod common;

use std::time::Duration;

use common::*;
use hybridiff_engine::strategy::patch::PatchMode;
use hybridiff_engine::trace::StepMode;
use hybridiff_engine::{denoise, DenoiseOutput, Job, RunOptions, StrategyKind, StrategyOptions};

const STEPS: usize = 8;

fn run_with(
    s: &Setup,
    rows: usize,
    guidance: f64,
    kind: StrategyKind,
    world: usize,
    opts: &StrategyOptions,
) -> hybridiff_engine::Result<DenoiseOutput> {
    let mut inputs = s.inputs.clone();
    inputs.latents = inputs.latents.narrow(2, 0, rows).unwrap();
    let job = Job {
        model: s.model.denoiser.as_ref(),
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps: STEPS,
        guidance,
        inputs: &inputs,
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

fn patch_opts(mode: PatchMode, warmup: usize, cfg_split: bool) -> StrategyOptions {
    StrategyOptions {
        patch_mode: Some(mode),
        warmup,
        cfg_split,
        ..Default::default()
    }
}

fn max_diff(a: &DenoiseOutput, b: &DenoiseOutput) -> f32 {
    max_abs(&(&a.step_latents - &b.step_latents).unwrap())
}

/// `sync` against serial for every band count and layout, at `rows` latent rows.
fn sync_equals_serial(name: &'static str, rows: usize, bands: &[usize]) {
    let s = setup_named(name);
    for guidance in [s.guidance, 1.0] {
        let serial = run_with(
            &s,
            rows,
            guidance,
            StrategyKind::Serial,
            1,
            &Default::default(),
        )
        .unwrap();
        let scale = max_abs(&serial.step_latents);
        for &p in bands {
            for split in [true, false] {
                let world = if split && guidance > 1.0 { 2 * p } else { p };
                let out = run_with(
                    &s,
                    rows,
                    guidance,
                    StrategyKind::Patch,
                    world,
                    &patch_opts(PatchMode::Sync, 1, split),
                )
                .unwrap();
                let d = max_diff(&out, &serial);
                assert!(
                    d <= 1e-4 * scale.max(1.0),
                    "{name} {rows} rows, {p} bands, split {split}, guidance {guidance}: max diff {d} (scale {scale})"
                );
                assert!(out.trace.steps.iter().all(|s| s.mode == StepMode::Exact));
                if p > 1 {
                    assert!(out.trace.bytes_sent > 0);
                }
                let plan = out.trace.stage_plan.as_ref().unwrap();
                assert_eq!(plan["bands"], p);
                assert_eq!(plan["patch_mode"], "sync");
            }
        }
    }
}

#[test]
fn patch_sync_equals_serial_on_the_unet_at_2_and_4_bands() {
    sync_equals_serial("tiny-sdxl", 16, &[2, 4]);
}

#[test]
fn patch_sync_equals_serial_on_the_unet_with_uneven_heights() {
    // 14 rows: bands of 8 + 6 and 4 + 4 + 6 (the last takes the odd levels' extra row).
    sync_equals_serial("tiny-sdxl", 14, &[2, 3]);
}

#[test]
fn patch_sync_equals_serial_on_the_mmdit_at_2_and_4_bands() {
    sync_equals_serial("tiny-sd3", 16, &[2, 4]);
}

#[test]
fn patch_sync_equals_serial_on_the_mmdit_with_uneven_heights() {
    // 14 rows = 7 token rows: 8 + 6 and 4 + 4 + 4 + 2.
    sync_equals_serial("tiny-sd3", 14, &[2, 4]);
}

#[test]
fn patch_displaced_with_every_step_warm_equals_serial_and_stale_steps_stay_close() {
    for name in ["tiny-sdxl", "tiny-sd3"] {
        let s = setup_named(name);
        let serial = run_with(
            &s,
            16,
            s.guidance,
            StrategyKind::Serial,
            1,
            &Default::default(),
        )
        .unwrap();
        let scale = max_abs(&serial.step_latents);
        let warm = run_with(
            &s,
            16,
            s.guidance,
            StrategyKind::Patch,
            4,
            &patch_opts(PatchMode::Displaced, STEPS, true),
        )
        .unwrap();
        assert!(max_diff(&warm, &serial) <= 1e-4 * scale.max(1.0), "{name}");
        // One band per CFG group has nothing to displace: exact steps, as `cfg`.
        let one = run_with(
            &s,
            16,
            s.guidance,
            StrategyKind::Patch,
            2,
            &patch_opts(PatchMode::Displaced, 1, true),
        )
        .unwrap();
        assert!(one.trace.steps.iter().all(|s| s.mode == StepMode::Exact));
        assert!(max_diff(&one, &serial) <= 1e-4 * scale.max(1.0), "{name}");
        for (world, split) in [(4, true), (2, false)] {
            let out = run_with(
                &s,
                16,
                s.guidance,
                StrategyKind::Patch,
                world,
                &patch_opts(PatchMode::Displaced, 2, split),
            )
            .unwrap();
            let modes: Vec<StepMode> = out.trace.steps.iter().map(|s| s.mode).collect();
            assert_eq!(modes[..2], [StepMode::Exact, StepMode::Exact]);
            assert!(modes[2..].iter().all(|m| *m == StepMode::Pipelined));
            let d = max_diff(&out, &serial);
            // Stale halos and keys change the result, but not by much.
            assert!(d > 0.0, "{name}: displaced steps changed nothing");
            assert!(
                d < 0.5 * scale,
                "{name}: displaced drifted by {d} (scale {scale})"
            );
            // The last step sends no activations, only its band prediction.
            let last = out.trace.steps.last().unwrap().bytes_sent;
            assert!(last < out.trace.steps[STEPS - 2].bytes_sent);
        }
    }
}

#[test]
fn patch_rejects_layouts_that_cannot_work_before_compute() {
    let s = setup();
    let opts = patch_opts(PatchMode::Displaced, 1, true);
    // 16 rows at multiples of 4: at most 4 bands (guidance 1: one band per rank).
    let e = run_with(&s, 16, 1.0, StrategyKind::Patch, 5, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--world-size 5") && e.contains("5 bands"), "{e}");
    let e = run_with(&s, 16, 5.0, StrategyKind::Patch, 3, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("even number of ranks"), "{e}");
    let e = run_with(
        &s,
        16,
        5.0,
        StrategyKind::Patch,
        2,
        &patch_opts(PatchMode::Displaced, 0, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--warmup 0"), "{e}");
    // Three bands need 12 rows; 8 rows have two 4-row units.
    let e = run_with(
        &s,
        8,
        1.0,
        StrategyKind::Patch,
        3,
        &patch_opts(PatchMode::Sync, 1, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("3 bands"), "{e}");
    let s3 = setup_named("tiny-sd3");
    // 8 rows are 4 token rows of patch size 2.
    let e = run_with(&s3, 8, 1.0, StrategyKind::Patch, 5, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 bands"), "{e}");
}
