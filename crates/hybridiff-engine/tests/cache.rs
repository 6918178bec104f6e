//! Step caching (`--cache`) on the tiny SDXL U-Net (deepcache, teacache) and the tiny SD3
//! MMDiT (teacache): off, nothing changes; on, every strategy takes the same decisions, the
//! condition split equals serial bit for bit, band parallelism (sync) equals it within
//! rounding, displaced bands and pipelined stages run and reuse the same modules, the
//! steps before the first cached one equal the uncached run's, Hybridiff's detection steps
//! always compute (so tau1 / tau2 stay put whatever the warm-up), and specs that do not fit
//! are refused before compute.

mod common;

use std::time::Duration;

use candle_core::Tensor;
use common::*;
use hybridiff_engine::cache::CacheSpec;
use hybridiff_engine::strategy::patch::PatchMode;
use hybridiff_engine::{
    denoise, DenoiseOutput, Job, RunOptions, Sampler, StrategyKind, StrategyOptions,
};

const STEPS: usize = 12;

fn run_steps(
    s: &Setup,
    steps: usize,
    kind: StrategyKind,
    world: usize,
    opts: &StrategyOptions,
) -> hybridiff_engine::Result<DenoiseOutput> {
    let job = Job {
        model: s.model.denoiser.as_ref(),
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps,
        guidance: s.guidance,
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

/// Hybrid thresholds that fit 12 steps (the paper's are for 50).
fn short() -> StrategyOptions {
    StrategyOptions {
        switch: hybridiff_engine::switch::SwitchParams {
            l_slope: 3,
            eps_slope: 4e-3,
            k: 3,
            tau_cap: 6,
        },
        ..Default::default()
    }
}

fn with_cache(spec: &str) -> StrategyOptions {
    StrategyOptions {
        cache: Some(spec.parse().unwrap()),
        ..short()
    }
}

/// cfg on 2 ranks equals serial bit for bit (each branch at batch 1, as serial's batch of
/// two runs sample by sample); on 4 and 8, branch groups of 2 and 4 sync bands, within
/// rounding; the same cache decisions everywhere.
fn cfg_matches_serial(
    s: &Setup,
    opts: &StrategyOptions,
    want: &[bool],
    serial: &DenoiseOutput,
    what: &str,
) {
    let scale = max_abs(&serial.step_latents).max(1.0);
    for world in [2, 4, 8] {
        let cfg = run_steps(s, STEPS, StrategyKind::Cfg, world, opts).unwrap();
        assert_eq!(decisions(&cfg), want, "cfg on {world} ranks + {what}");
        if world == 2 {
            assert!(
                same_bits(&cfg.step_latents, &serial.step_latents),
                "cfg on 2 ranks + {what} differs from serial + {what}"
            );
        } else {
            let d = max_abs(&(&cfg.step_latents - &serial.step_latents).unwrap());
            assert!(d <= 1e-4 * scale, "cfg on {world} ranks + {what}: {d}");
        }
    }
}

fn decisions(out: &DenoiseOutput) -> Vec<bool> {
    out.trace
        .steps
        .iter()
        .map(|s| s.cache.as_ref().unwrap().decision == "cached")
        .collect()
}

/// The step at whose end a hybrid run decided tau1: it and every step before it feed the
/// detector, so they compute whatever the cache says ([`hybridiff_engine::strategy::Worker::detecting`]).
fn detection_end(out: &DenoiseOutput) -> usize {
    out.trace
        .steps
        .iter()
        .position(|s| s.tau1.is_some())
        .expect("hybrid decides tau1")
}

/// `want` with hybrid's detection steps (through `d`) computed.
fn held(want: &[bool], d: usize) -> Vec<bool> {
    want.iter().enumerate().map(|(i, &c)| c && i > d).collect()
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn without_a_cache_the_run_is_the_plain_sampling_loop_bit_for_bit() {
    // The sampling loop written out with the model's own forward: what every run was before
    // step caching. A run without --cache goes through the rank's cache wrapper, which must
    // change nothing.
    let s = setup();
    let job = Job {
        model: s.model.denoiser.as_ref(),
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps: STEPS,
        guidance: s.guidance,
        inputs: &s.inputs,
        progress: None,
        sampling: Default::default(),
    };
    let mut sampler = Sampler::new(&job).unwrap();
    let cond = hybridiff_models::Conditioning::cat(&s.inputs.uncond, &s.inputs.cond).unwrap();
    for i in 0..STEPS {
        let x = sampler.model_input(i).unwrap();
        let eps = s
            .model
            .denoiser
            .forward(
                &Tensor::cat(&[&x, &x], 0).unwrap(),
                sampler.timestep(i),
                &cond,
            )
            .unwrap();
        let (u, c) = (eps.narrow(0, 0, 1).unwrap(), eps.narrow(0, 1, 1).unwrap());
        sampler.step_guided(i, &u, &c).unwrap();
    }
    for (kind, world) in [(StrategyKind::Serial, 1), (StrategyKind::Cfg, 2)] {
        let out = run_steps(&s, STEPS, kind, world, &Default::default()).unwrap();
        assert!(
            same_bits(&out.latents, &sampler.latents),
            "{kind} without a cache differs from the plain loop"
        );
        let t = &out.trace;
        assert!(t.cache.is_none() && t.cached_steps == 0 && t.forwards_saved == 0.0);
        assert!(t.steps.iter().all(|s| s.cache.is_none()));
        // Both branches every step: 2 sample-forwards per step.
        assert!(
            (t.forwards - 2.0 * STEPS as f64).abs() < 1e-9,
            "{}",
            t.forwards
        );
    }
}

#[test]
fn deepcache_takes_the_same_decisions_under_every_strategy() {
    let s = setup();
    let spec = "deepcache:interval=3,branch=0,warmup=2";
    let opts = with_cache(spec);
    let uncached = run_steps(&s, STEPS, StrategyKind::Serial, 1, &Default::default()).unwrap();
    let serial = run_steps(&s, STEPS, StrategyKind::Serial, 1, &opts).unwrap();
    // Full at 0, 1 (warmup) and every 3rd step from 2; the rest cached.
    let want: Vec<bool> = (0..STEPS).map(|i| i >= 2 && (i - 2) % 3 != 0).collect();
    assert_eq!(decisions(&serial), want);
    assert_eq!(serial.trace.cache.as_deref(), Some(spec));
    assert_eq!(
        serial.trace.cached_steps,
        want.iter().filter(|c| **c).count()
    );
    // The steps before the first cached one are the uncached run's, bit for bit; the cached
    // ones are not (the test would pass with a cache that did nothing otherwise).
    for i in 0..3 {
        assert!(same_bits(
            &serial.step_latents.get(i).unwrap(),
            &uncached.step_latents.get(i).unwrap()
        ));
    }
    assert!(!same_bits(&serial.latents, &uncached.latents));
    // A cached step skips down_blocks.1 .. up_blocks.1 (branch 0 of a 3-block U-Net) on
    // both CFG samples, and the cache only removes compute.
    let names = s.model.denoiser.module_names();
    let first = names.iter().position(|n| n == "down_blocks.1").unwrap();
    let last = names
        .iter()
        .position(|n| n.starts_with("up_blocks.2."))
        .unwrap();
    for (st, cached) in serial.trace.steps.iter().zip(&want) {
        let c = st.cache.as_ref().unwrap();
        if *cached {
            assert_eq!(c.cached_modules, names[first..last].to_vec());
            assert!(c.forwards_saved > 0.5 && st.forwards < 2.0, "{c:?}");
        } else {
            assert!(c.cached_modules.is_empty());
            assert!((st.forwards - 2.0).abs() < 1e-9);
        }
        assert!((st.forwards + c.forwards_saved - 2.0).abs() < 1e-9);
    }
    assert!(
        (serial.trace.forwards + serial.trace.forwards_saved - 2.0 * STEPS as f64).abs() < 1e-9
    );

    // The condition split runs each branch at batch 1, as serial's batch of two does
    // sample by sample: the same bits, cache included, at 2 ranks; at 4 and 8 each branch
    // group cuts its branch into 2 and 4 bands exchanged fresh (exact within rounding).
    cfg_matches_serial(&s, &opts, &want, &serial, "deepcache");
    // Bands, exchanged fresh: serial within rounding.
    let scale = max_abs(&serial.step_latents).max(1.0);
    for (world, split) in [(4, true), (2, false)] {
        let o = StrategyOptions {
            patch_mode: Some(PatchMode::Sync),
            cfg_split: split,
            ..opts.clone()
        };
        let p = run_steps(&s, STEPS, StrategyKind::Patch, world, &o).unwrap();
        assert_eq!(decisions(&p), want);
        let d = max_abs(&(&p.step_latents - &serial.step_latents).unwrap());
        assert!(d <= 1e-4 * scale, "patch sync {world} ranks: {d}");
        assert_eq!(
            p.trace.steps[3].cache.as_ref().unwrap().cached_modules,
            names[first..last].to_vec()
        );
    }
    // Displaced bands (skipped layers' messages drained, stale values kept), pipelined
    // stages (async), and Hybridiff: the same decisions, no hang, close to serial + cache.
    let displaced = StrategyOptions {
        patch_mode: Some(PatchMode::Displaced),
        ..opts.clone()
    };
    for (kind, world, o) in [
        (StrategyKind::Patch, 4, &displaced),
        (StrategyKind::Patch, 2, &displaced),
        (StrategyKind::Async, 2, &opts),
        (StrategyKind::Async, 3, &opts),
        (StrategyKind::Hybrid, 2, &opts),
        (StrategyKind::Hybrid, 4, &opts),
    ] {
        let out = run_steps(&s, STEPS, kind, world, o).unwrap();
        let expected = match kind {
            StrategyKind::Hybrid => held(&want, detection_end(&out)),
            _ => want.clone(),
        };
        assert_eq!(decisions(&out), expected, "{kind} {world}");
        let psnr = hybridiff_engine::metrics::psnr(&out.latents, &serial.latents).unwrap();
        assert!(
            psnr > 15.0,
            "{kind} on {world} ranks + deepcache: {psnr} dB vs serial + deepcache"
        );
        assert!(
            out.trace.forwards_saved > 0.0,
            "{kind} {world}: nothing saved"
        );
    }
}

/// Teacache's decisions for `kind`: serial's (`want`), except on hybrid, whose detection
/// steps compute and so restart the accumulated change: those of serial with the warm-up
/// running through the detection.
fn teacache_expected(
    s: &Setup,
    spec: &str,
    kind: StrategyKind,
    out: &DenoiseOutput,
    want: &[bool],
) -> Vec<bool> {
    if kind != StrategyKind::Hybrid {
        return want.to_vec();
    }
    let d = detection_end(out);
    let CacheSpec::TeaCache { threshold, warmup } = spec.parse().unwrap() else {
        panic!("{spec} is not teacache");
    };
    let longer = format!(
        "teacache:threshold={threshold},warmup={}",
        warmup.max(d + 1)
    );
    let serial = run_steps(s, STEPS, StrategyKind::Serial, 1, &with_cache(&longer)).unwrap();
    decisions(&serial)
}

#[test]
fn teacache_takes_the_same_decisions_under_every_strategy() {
    let s = setup_named("tiny-sd3");
    let spec = "teacache:threshold=0.3,warmup=2";
    let opts = with_cache(spec);
    let uncached = run_steps(&s, STEPS, StrategyKind::Serial, 1, &Default::default()).unwrap();
    let serial = run_steps(&s, STEPS, StrategyKind::Serial, 1, &opts).unwrap();
    let want = decisions(&serial);
    let cached = want.iter().filter(|c| **c).count();
    assert!(
        (2..STEPS - 3).contains(&cached),
        "threshold 0.3 should cache some steps: {want:?}"
    );
    assert!(
        !want[0] && !want[1] && !want[STEPS - 1],
        "warmup and last step compute"
    );
    let first_cached = want.iter().position(|c| *c).unwrap();
    for i in 0..first_cached {
        assert!(same_bits(
            &serial.step_latents.get(i).unwrap(),
            &uncached.step_latents.get(i).unwrap()
        ));
    }
    // The accumulated change is below the threshold exactly on cached steps.
    for (st, c) in serial.trace.steps.iter().zip(&want).skip(2).take(STEPS - 3) {
        let signal = st.cache.as_ref().unwrap().signal.unwrap();
        assert_eq!(signal < 0.3, *c, "{signal}");
    }
    let names = s.model.denoiser.module_names();
    let blocks: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("transformer_blocks."))
        .cloned()
        .collect();
    assert_eq!(
        serial.trace.steps[first_cached]
            .cache
            .as_ref()
            .unwrap()
            .cached_modules,
        blocks
    );
    cfg_matches_serial(&s, &opts, &want, &serial, "teacache");
    // The decision is broadcast from rank 0: one 1-byte message to each other rank per step.
    let cfg = run_steps(&s, STEPS, StrategyKind::Cfg, 2, &opts).unwrap();
    let plain = run_steps(&s, STEPS, StrategyKind::Cfg, 2, &Default::default()).unwrap();
    assert_eq!(cfg.trace.bytes_sent, plain.trace.bytes_sent + STEPS as u64);
    // With bands, a cached step also skips the skipped blocks' exchanges.
    let cfg = run_steps(&s, STEPS, StrategyKind::Cfg, 4, &opts).unwrap();
    let plain = run_steps(&s, STEPS, StrategyKind::Cfg, 4, &Default::default()).unwrap();
    assert!(cfg.trace.bytes_sent < plain.trace.bytes_sent);
    let scale = max_abs(&serial.step_latents).max(1.0);
    let sync = StrategyOptions {
        patch_mode: Some(PatchMode::Sync),
        ..opts.clone()
    };
    let p = run_steps(&s, STEPS, StrategyKind::Patch, 4, &sync).unwrap();
    assert_eq!(decisions(&p), want);
    let d = max_abs(&(&p.step_latents - &serial.step_latents).unwrap());
    assert!(d <= 1e-4 * scale, "patch sync + teacache: {d}");
    let displaced = StrategyOptions {
        patch_mode: Some(PatchMode::Displaced),
        ..opts.clone()
    };
    let stride2 = StrategyOptions {
        stride: 2,
        ..opts.clone()
    };
    for (kind, world, o) in [
        (StrategyKind::Patch, 4, &displaced),
        (StrategyKind::Async, 2, &opts),
        (StrategyKind::Async, 3, &stride2),
        (StrategyKind::Hybrid, 2, &opts),
        (StrategyKind::Hybrid, 4, &opts),
    ] {
        let out = run_steps(&s, STEPS, kind, world, o).unwrap();
        assert_eq!(
            decisions(&out),
            teacache_expected(&s, spec, kind, &out, &want),
            "{kind} {world}"
        );
        let psnr = hybridiff_engine::metrics::psnr(&out.latents, &serial.latents).unwrap();
        assert!(psnr > 15.0, "{kind} on {world} ranks + teacache: {psnr} dB");
    }
}

#[test]
fn teacache_on_a_unet_reuses_the_whole_prediction_under_every_strategy() {
    let s = setup();
    let spec = "teacache:threshold=0.2,warmup=2";
    let opts = with_cache(spec);
    let serial = run_steps(&s, STEPS, StrategyKind::Serial, 1, &opts).unwrap();
    let want = decisions(&serial);
    let cached: Vec<usize> = (0..STEPS).filter(|&i| want[i]).collect();
    assert!(!cached.is_empty() && cached.len() < STEPS - 3, "{want:?}");
    // A cached step reuses the last computed step's prediction: no module runs.
    let names = s.model.denoiser.module_names();
    for &i in &cached {
        let st = &serial.trace.steps[i];
        assert_eq!(st.forwards, 0.0);
        assert_eq!(st.cache.as_ref().unwrap().cached_modules.len(), names.len());
    }
    cfg_matches_serial(&s, &opts, &want, &serial, "teacache on a U-Net");
    let displaced = StrategyOptions {
        patch_mode: Some(PatchMode::Displaced),
        ..opts.clone()
    };
    let stride2 = StrategyOptions {
        stride: 2,
        ..opts.clone()
    };
    for (kind, world, o) in [
        (StrategyKind::Patch, 4, &displaced),
        (StrategyKind::Async, 2, &opts),
        (StrategyKind::Async, 3, &stride2),
        (StrategyKind::Hybrid, 2, &opts),
        (StrategyKind::Hybrid, 4, &opts),
    ] {
        let out = run_steps(&s, STEPS, kind, world, o).unwrap();
        assert_eq!(
            decisions(&out),
            teacache_expected(&s, spec, kind, &out, &want),
            "{kind} {world}"
        );
        let psnr = hybridiff_engine::metrics::psnr(&out.latents, &serial.latents).unwrap();
        assert!(psnr > 15.0, "{kind} on {world} ranks + teacache: {psnr} dB");
    }
}

#[test]
fn hybrid_keeps_tau1_and_tau2_with_any_cache_warmup() {
    let s = setup();
    let (v, _) = reference();
    let base = fixture_options(&v);
    let steps = 20;
    let plain = run_steps(&s, steps, StrategyKind::Hybrid, 2, &base).unwrap();
    let (tau1, tau2) = (plain.trace.tau1.unwrap(), plain.trace.tau2.unwrap());
    // The step at whose end tau1 became known.
    let d = plain
        .trace
        .steps
        .iter()
        .position(|s| s.tau1.is_some())
        .unwrap();
    assert!(
        d >= 2,
        "the fixture decides tau1 at step {d}: too early to test"
    );
    // Warm-ups before, at and after the detection: the cache holds off while the detector
    // runs (a cached step's predictions would repeat the last ones and read as flat).
    for spec in [
        "deepcache:interval=2,warmup=1".to_string(),
        format!("deepcache:interval=2,warmup={}", d + 1),
        "teacache:threshold=10,warmup=1".to_string(),
    ] {
        let cached = run_steps(
            &s,
            steps,
            StrategyKind::Hybrid,
            2,
            &StrategyOptions {
                cache: Some(spec.parse().unwrap()),
                ..base.clone()
            },
        )
        .unwrap();
        assert_eq!(
            (cached.trace.tau1, cached.trace.tau2),
            (Some(tau1), Some(tau2)),
            "{spec}"
        );
        for i in 0..=d {
            assert_eq!(
                cached.trace.rel_mae_log[i].to_bits(),
                plain.trace.rel_mae_log[i].to_bits(),
                "{spec}: rel-MAE of step {i}"
            );
            assert_eq!(
                cached.trace.steps[i].cache.as_ref().unwrap().decision,
                "computed",
                "{spec}: step {i} is a detection step"
            );
        }
        assert!(cached.trace.cached_steps > 0, "{spec}: nothing cached");
    }
}

#[test]
fn caches_that_do_not_fit_the_model_are_refused_before_compute() {
    let unet = setup();
    let dit = setup_named("tiny-sd3");
    let cases: [(&Setup, &str, &str); 3] = [
        (&dit, "deepcache", "use --cache teacache for this MMDiT"),
        (
            &unet,
            "deepcache:branch=3",
            "this U-Net has 3 down blocks; branch is 0 to 2",
        ),
        (&unet, "deepcache:branch=7", "branch is 0 to 2"),
    ];
    for (s, spec, want) in cases {
        for (kind, world) in [(StrategyKind::Serial, 1), (StrategyKind::Cfg, 2)] {
            let steps_done = std::sync::atomic::AtomicUsize::new(0);
            let progress = |_: usize, _: usize| {
                steps_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            };
            let job = Job {
                model: s.model.denoiser.as_ref(),
                scheduler_config: &s.model.scheduler_config,
                scheduler: s.scheduler,
                steps: 6,
                guidance: s.guidance,
                inputs: &s.inputs,
                progress: Some(&progress),
                sampling: Default::default(),
            };
            let ro = RunOptions {
                world_size: world,
                threads_per_rank: 1,
                comm_timeout: Duration::from_secs(120),
                placement: Default::default(),
            };
            let e = denoise(&job, kind.build(&with_cache(spec)).as_ref(), &ro)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--cache") && e.contains(want), "{spec}: {e}");
            assert_eq!(steps_done.load(std::sync::atomic::Ordering::SeqCst), 0);
        }
    }
    // async at stride 2 never computes a stage's output of the previous step: deepcache is
    // refused there (teacache runs).
    let stride2 = StrategyOptions {
        stride: 2,
        ..with_cache("deepcache")
    };
    let e = run_steps(&unet, 6, StrategyKind::Async, 3, &stride2)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--cache deepcache") && e.contains("--stride 1"),
        "{e}"
    );
    // branch 2 of 3 skips only the mid block: it fits.
    let out = run_steps(
        &unet,
        6,
        StrategyKind::Serial,
        1,
        &with_cache("deepcache:branch=2"),
    )
    .unwrap();
    assert_eq!(
        out.trace.steps[2].cache.as_ref().unwrap().cached_modules,
        vec!["mid_block".to_string()]
    );
}

/// teacache on a U-Net reuses the prediction the sampler took, whatever layout made it: on
/// hybrid a cached fill step and a cached first exact step after pipelining compute
/// nothing on any rank (the stages fill at the next computed pipelined step), and the
/// cached step's latents are the sampler's step with the last prediction.
#[test]
fn a_whole_prediction_cache_skips_hybrid_steps_of_every_mode() {
    let s = setup();
    let steps = 16;
    let o = StrategyOptions {
        cache: Some("teacache:threshold=10,warmup=1".parse().unwrap()),
        ..short()
    };
    for world in [2, 4] {
        let out = run_steps(&s, steps, StrategyKind::Hybrid, world, &o).unwrap();
        let d = detection_end(&out);
        let want: Vec<bool> = (0..steps).map(|i| i > d && i + 1 < steps).collect();
        assert_eq!(decisions(&out), want, "{world} ranks");
        let (tau1, tau2) = (out.trace.tau1.unwrap(), out.trace.tau2.unwrap());
        for (i, st) in out.trace.steps.iter().enumerate() {
            if want[i] {
                assert_eq!(st.forwards, 0.0, "{world} ranks: step {i} computed");
                assert!(
                    st.cache.as_ref().unwrap().forwards_saved > 0.0,
                    "{world} ranks: step {i} saved nothing"
                );
            }
        }
        // The pipelined phase is there, its steps all skipped: no fill ran.
        let first = tau1.max(d + 1);
        assert!(
            first <= tau2 && want[first],
            "{world} ranks: {first}..={tau2}"
        );
        assert!(out
            .trace
            .steps
            .iter()
            .all(|st| st.mode != hybridiff_engine::trace::StepMode::Fill));
        // Each skipped step is the scheduler's step with the last prediction: the
        // latents move on (a repeated prediction still steps them).
        for i in (d + 1)..steps - 1 {
            let (a, b) = (
                out.step_latents.get(i - 1).unwrap(),
                out.step_latents.get(i).unwrap(),
            );
            assert!(!same_bits(&a, &b), "{world} ranks: step {i} did not step");
        }
    }
}
