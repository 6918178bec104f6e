//! Behaviours users rely on in diffusers: guidance <= 1 turns classifier-free guidance
//! off, any latent size works with every strategy, few-step runs get workable switching
//! thresholds, and NaN stops the run with an error instead of becoming the result.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::*;
use hybridiff_engine::stages::PlanKind;
use hybridiff_engine::switch::{self, PartialSwitch};
use hybridiff_engine::trace::StepMode;
use hybridiff_engine::{
    denoise, DenoiseInputs, DenoiseOutput, Job, RunOptions, StrategyKind, StrategyOptions,
};
use hybridiff_models::{Conditioning, Denoiser, OutputRef, State};

fn run_job(
    model: &dyn Denoiser,
    s: &Setup,
    inputs: &DenoiseInputs,
    steps: usize,
    guidance: f64,
    (kind, world, opts): &(StrategyKind, usize, StrategyOptions),
) -> hybridiff_engine::Result<DenoiseOutput> {
    let job = Job {
        model,
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps,
        guidance,
        inputs,
        progress: None,
        sampling: Default::default(),
    };
    let ro = RunOptions {
        world_size: *world,
        threads_per_rank: 1,
        comm_timeout: Duration::from_secs(60),
        placement: Default::default(),
    };
    denoise(&job, kind.build(opts).as_ref(), &ro)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn serial() -> (StrategyKind, usize, StrategyOptions) {
    (StrategyKind::Serial, 1, StrategyOptions::default())
}

/// Every strategy, with a world size it accepts, and options that pipeline early.
fn all_strategies(steps: usize) -> Vec<(StrategyKind, usize, StrategyOptions)> {
    let hybrid = StrategyOptions {
        switch: hybridiff_engine::switch::SwitchParams {
            l_slope: 2,
            eps_slope: 10.0,
            k: 2,
            tau_cap: 3.min(steps - 2),
        },
        stages: PlanKind::Reference,
        ..Default::default()
    };
    vec![
        (StrategyKind::Serial, 1, StrategyOptions::default()),
        (StrategyKind::Cfg, 2, StrategyOptions::default()),
        (StrategyKind::Cfg, 4, StrategyOptions::default()),
        (StrategyKind::Hybrid, 2, hybrid.clone()),
        (StrategyKind::Hybrid, 4, hybrid),
        (
            StrategyKind::Async,
            2,
            StrategyOptions {
                warmup: steps,
                ..Default::default()
            },
        ),
    ]
}

#[test]
fn guidance_at_most_1_runs_the_conditional_branch_alone_on_every_strategy() {
    let s = setup();
    let model = s.model.denoiser.as_ref();
    let steps = 6;
    let base = run_job(model, &s, &s.inputs, steps, 1.0, &serial()).unwrap();
    assert!(!base.trace.classifier_free_guidance);
    assert!(base.trace.rel_mae_log.iter().all(|m| *m == 0.0));
    // guidance 0 and 1 are the same run (no guidance); diffusers' eps_u + w (eps_c - eps_u)
    // would have used only the negative branch at 0.
    let zero = run_job(model, &s, &s.inputs, steps, 0.0, &serial()).unwrap();
    assert_eq!(bits(&zero.latents), bits(&base.latents));
    // The negative branch is never read; the positive one is.
    let mut other_uncond = s.inputs.clone();
    other_uncond.uncond.prompt_embeds = (&other_uncond.uncond.prompt_embeds * 3.0).unwrap();
    let o = run_job(model, &s, &other_uncond, steps, 0.0, &serial()).unwrap();
    assert_eq!(bits(&o.latents), bits(&base.latents));
    let mut other_cond = s.inputs.clone();
    other_cond.cond.prompt_embeds = (&other_cond.cond.prompt_embeds * 3.0).unwrap();
    let o = run_job(model, &s, &other_cond, steps, 0.0, &serial()).unwrap();
    assert_ne!(bits(&o.latents), bits(&base.latents));
    // With CFG at guidance 1, eps_u + (eps_c - eps_u) = eps_c up to rounding.
    let cfg1 = {
        let job_guidance = 1.0 + 1e-9;
        run_job(model, &s, &s.inputs, steps, job_guidance, &serial()).unwrap()
    };
    assert!(cfg1.trace.classifier_free_guidance);
    let d = max_abs(&(&cfg1.latents - &base.latents).unwrap());
    assert!(d < 1e-3, "no-CFG run differs from eps_c by {d}");
    // Every strategy gives the serial result, each step exact: bit for bit where one rank
    // computes each module on the whole image (serial, async's exact warm-up), up to float
    // rounding where the ranks split the conditional branch into bands (cfg, hybrid: no
    // rank idles, issue 25).
    let scale = max_abs(&base.latents);
    for (kind, world, opts) in all_strategies(steps) {
        let out = run_job(
            model,
            &s,
            &s.inputs,
            steps,
            1.0,
            &(kind, world, opts.clone()),
        )
        .unwrap();
        let what = format!("{kind} x{world}");
        if matches!(kind, StrategyKind::Cfg | StrategyKind::Hybrid) && world > 1 {
            let d = max_abs(&(&out.latents - &base.latents).unwrap());
            assert!(d < 1e-4 * scale, "{what}: off by {d} (scale {scale})");
        } else {
            assert_eq!(bits(&out.latents), bits(&base.latents), "{what}");
        }
        assert!(!out.trace.classifier_free_guidance, "{what}");
        assert!(
            out.trace
                .note
                .as_deref()
                .unwrap_or("")
                .contains("guidance <= 1"),
            "{what}"
        );
        assert!(
            out.trace.steps.iter().all(|st| st.mode == StepMode::Exact),
            "{what}"
        );
        if matches!(kind, StrategyKind::Cfg | StrategyKind::Hybrid) {
            // W bands of the conditional branch: every rank computes in every step, and the
            // band predictions ([1, 4, 16 / W, 16] f32 each) are all-gathered.
            for st in &out.trace.steps {
                assert!(st.rank_flops.iter().all(|&f| f > 0.0), "{what}: {st:?}");
                let gather = (world as u64 - 1) * 4 * (16 / world as u64) * 16 * 4;
                assert!(
                    st.rank_bytes_sent.iter().all(|&b| b > gather),
                    "{what}: the bands exchange halos, statistics and keys/values too"
                );
            }
            assert!(out
                .trace
                .note
                .as_deref()
                .unwrap()
                .contains("no branches to split"));
        }
    }
}

#[test]
fn async_without_cfg_pipelines_the_conditional_branch() {
    let s = setup();
    let model = s.model.denoiser.as_ref();
    let opts = StrategyOptions {
        warmup: 2,
        ..Default::default()
    };
    let out = run_job(
        model,
        &s,
        &s.inputs,
        6,
        1.0,
        &(StrategyKind::Async, 2, opts),
    )
    .unwrap();
    let modes: Vec<StepMode> = out.trace.steps.iter().map(|st| st.mode).collect();
    // The warm-up steps fill the caches, so pipelining starts right after them.
    assert_eq!(modes[..2], [StepMode::Exact, StepMode::Exact]);
    assert!(modes[2..].iter().all(|m| *m == StepMode::Pipelined));
    let serial = run_job(model, &s, &s.inputs, 6, 1.0, &serial()).unwrap();
    let d = max_abs(&(&out.latents - &serial.latents).unwrap());
    assert!(
        d.is_finite() && d > 0.0,
        "pipelined steps are approximate: {d}"
    );
}

#[test]
fn odd_and_non_square_latent_sizes_run_on_every_strategy() {
    let s = setup();
    let model = s.model.denoiser.as_ref();
    let steps = 4;
    for hw in [(9, 11), (13, 7)] {
        let inputs =
            hybridiff_engine::bench::random_inputs(&s.model.input_spec, hw, 8, 3, &Device::Cpu)
                .unwrap();
        let serial = run_job(model, &s, &inputs, steps, 5.0, &serial()).unwrap();
        assert_eq!(serial.latents.dims(), [1, 4, hw.0, hw.1]);
        for (kind, world, opts) in all_strategies(steps) {
            let plans: &[PlanKind] = if world == 2 {
                &[PlanKind::Reference, PlanKind::Auto]
            } else {
                &[PlanKind::Reference]
            };
            for &stages in plans {
                let mut opts = opts.clone();
                opts.stages = stages;
                let out =
                    run_job(model, &s, &inputs, steps, 5.0, &(kind, world, opts.clone())).unwrap();
                let what = format!("{kind} x{world} {stages:?} at {hw:?}");
                assert_eq!(out.latents.dims(), [1, 4, hw.0, hw.1], "{what}");
                let d = max_abs(&(&out.latents - &serial.latents).unwrap());
                if kind == StrategyKind::Hybrid {
                    assert!(
                        out.trace
                            .steps
                            .iter()
                            .any(|st| st.mode == StepMode::Pipelined),
                        "{what}: no pipelined step"
                    );
                    assert!(d.is_finite(), "{what}");
                } else {
                    // cfg, and async warmed up for every step, are exact.
                    assert!(d < 1e-4 * max_abs(&serial.latents).max(1.0), "{what}: {d}");
                }
            }
        }
    }
}

#[test]
fn few_step_runs_get_thresholds_that_fit_and_pipeline() {
    let s = setup();
    let model = s.model.denoiser.as_ref();
    for steps in [2, 3, 4, 6, 8] {
        let r = switch::resolve(
            PartialSwitch::default(),
            PartialSwitch::default(),
            None,
            steps,
        );
        let opts = StrategyOptions {
            switch: r.params,
            ..Default::default()
        };
        let out = run_job(
            model,
            &s,
            &s.inputs,
            steps,
            5.0,
            &(StrategyKind::Hybrid, 2, opts),
        )
        .unwrap_or_else(|e| panic!("{steps} steps with {:?}: {e}", r.params));
        let staged = out
            .trace
            .steps
            .iter()
            .filter(|st| st.mode != StepMode::Exact)
            .count();
        assert!(
            staged >= 1,
            "{steps} steps: nothing pipelined ({:?})",
            r.params
        );
    }
}

/// The tiny SDXL U-Net, but every forward after the first `clean` ones returns NaN.
struct PoisonedAfter<'a> {
    inner: &'a dyn Denoiser,
    clean: usize,
    calls: AtomicUsize,
}

impl Denoiser for PoisonedAfter<'_> {
    fn module_names(&self) -> &[String] {
        self.inner.module_names()
    }
    fn module_flops(&self, h: usize, w: usize) -> Vec<f64> {
        self.inner.module_flops(h, w)
    }
    fn module_output_count(&self, idx: usize) -> usize {
        self.inner.module_output_count(idx)
    }
    fn module_reads(&self, idx: usize) -> Vec<OutputRef> {
        self.inner.module_reads(idx)
    }
    fn begin(&self, x: &Tensor, t: f64, c: &Conditioning) -> hybridiff_models::Result<State> {
        self.inner.begin(x, t, c)
    }
    fn run_module(&self, idx: usize, st: &State) -> hybridiff_models::Result<Vec<Tensor>> {
        self.inner.run_module(idx, st)
    }
    fn apply_module(
        &self,
        idx: usize,
        st: &mut State,
        out: Vec<Tensor>,
    ) -> hybridiff_models::Result<()> {
        self.inner.apply_module(idx, st, out)
    }
    fn end(&self, st: State) -> hybridiff_models::Result<Tensor> {
        let y = self.inner.end(st)?;
        self.poison(y)
    }
    fn patch_alignment(&self) -> Option<(usize, usize)> {
        self.inner.patch_alignment()
    }
    fn band_dim(&self, idx: usize, index: usize) -> Option<usize> {
        self.inner.band_dim(idx, index)
    }
    fn forward_patch(
        &self,
        x: &Tensor,
        t: f64,
        c: &Conditioning,
        ctx: &dyn hybridiff_models::PatchContext,
    ) -> hybridiff_models::Result<Tensor> {
        let y = self.inner.forward_patch(x, t, c, ctx)?;
        self.poison(y)
    }
}

impl PoisonedAfter<'_> {
    fn poison(&self, y: Tensor) -> hybridiff_models::Result<Tensor> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.clean {
            Ok(y)
        } else {
            Ok((y * f64::NAN)?)
        }
    }
}

#[test]
fn nan_in_a_step_stops_every_strategy_with_the_step_named() {
    let s = setup();
    for (kind, world, opts) in all_strategies(8) {
        let model = PoisonedAfter {
            inner: s.model.denoiser.as_ref(),
            clean: 2 * world,
            calls: AtomicUsize::new(0),
        };
        let start = std::time::Instant::now();
        let err = run_job(&model, &s, &s.inputs, 8, 5.0, &(kind, world, opts.clone()))
            .expect_err("NaN must fail the run")
            .to_string();
        let what = format!("{kind} x{world}");
        assert!(
            err.contains("non-finite") && err.contains("at step"),
            "{what}: {err}"
        );
        assert!(err.contains(&format!("strategy {kind}")), "{what}: {err}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: took too long"
        );
    }
}

#[test]
fn guidance_that_can_only_overflow_is_refused_before_compute() {
    let s = setup();
    let model = s.model.denoiser.as_ref();
    for g in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e308, -5000.0] {
        let err = run_job(model, &s, &s.inputs, 2, g, &serial())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("--guidance"), "{g}: {err}");
    }
}
