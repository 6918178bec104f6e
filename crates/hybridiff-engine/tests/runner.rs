//! The warm-rank runner: same results as `denoise`, no thread started per job, and a
//! failed job (a rank error mid-run) leaves it ready for the next one.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use candle_core::Tensor;
use common::setup;
use hybridiff_engine::{denoise, Job, RunOptions, Runner, StrategyKind, StrategyOptions};
use hybridiff_models::denoiser::{Conditioning, OutputRef, State};
use hybridiff_models::Denoiser;

fn opts(world: usize) -> RunOptions {
    RunOptions {
        world_size: world,
        threads_per_rank: 1,
        comm_timeout: Duration::from_secs(120),
        placement: Default::default(),
    }
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a == b
}

#[test]
fn warm_jobs_equal_fresh_ones_and_start_no_threads() {
    let s = setup();
    for (kind, world) in [
        (StrategyKind::Serial, 1),
        (StrategyKind::Cfg, 2),
        (StrategyKind::Hybrid, 2),
    ] {
        let strategy = kind.build(&StrategyOptions::default());
        let job = Job {
            model: s.model.denoiser.as_ref(),
            scheduler_config: &s.model.scheduler_config,
            scheduler: s.scheduler,
            steps: 20,
            guidance: s.guidance,
            inputs: &s.inputs,
            progress: None,
            sampling: Default::default(),
        };
        let fresh = denoise(&job, strategy.as_ref(), &opts(world)).unwrap();
        let runner = Runner::start(opts(world)).unwrap();
        let started = hybridiff_comm::threads_started();
        for _ in 0..3 {
            let warm = runner.denoise(&job, strategy.as_ref(), None).unwrap();
            assert!(same(&warm.latents, &fresh.latents), "{kind}: warm != fresh");
            assert_eq!(warm.trace.tau1, fresh.trace.tau1);
            assert_eq!(warm.trace.bytes_sent, fresh.trace.bytes_sent);
        }
        assert_eq!(
            hybridiff_comm::threads_started(),
            started,
            "{kind}: a warm job started threads"
        );
    }
}

/// The real denoiser, except that rank 1 fails in its first module while `armed`.
struct FailOnRank1<'a> {
    inner: &'a dyn Denoiser,
    armed: &'a AtomicBool,
}

impl Denoiser for FailOnRank1<'_> {
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
    fn band_dim(&self, idx: usize, index: usize) -> Option<usize> {
        self.inner.band_dim(idx, index)
    }
    fn begin(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<State> {
        self.inner.begin(sample, timestep, cond)
    }
    fn run_module(&self, idx: usize, state: &State) -> hybridiff_models::Result<Vec<Tensor>> {
        let name = std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string();
        if self.armed.load(Ordering::SeqCst) && name.starts_with("hybridiff-rank-1") {
            return Err(hybridiff_models::Error::Input(
                "injected failure on rank 1".into(),
            ));
        }
        self.inner.run_module(idx, state)
    }
    fn apply_module(
        &self,
        idx: usize,
        state: &mut State,
        output: Vec<Tensor>,
    ) -> hybridiff_models::Result<()> {
        self.inner.apply_module(idx, state, output)
    }
    fn end(&self, state: State) -> hybridiff_models::Result<Tensor> {
        self.inner.end(state)
    }
}

#[test]
fn a_rank_failure_fails_the_job_and_the_runner_serves_the_next() {
    let s = setup();
    let armed = AtomicBool::new(true);
    let model = FailOnRank1 {
        inner: s.model.denoiser.as_ref(),
        armed: &armed,
    };
    let strategy = StrategyKind::Cfg.build(&StrategyOptions::default());
    let job = Job {
        model: &model,
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps: 20,
        guidance: s.guidance,
        inputs: &s.inputs,
        progress: None,
        sampling: Default::default(),
    };
    let runner = Runner::start(opts(2)).unwrap();
    let err = runner.denoise(&job, strategy.as_ref(), None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("rank 1") && msg.contains("injected failure"),
        "the root cause, not rank 0's echo: {msg}"
    );
    armed.store(false, Ordering::SeqCst);
    let ok = runner.denoise(&job, strategy.as_ref(), None).unwrap();
    let fresh = denoise(&job, strategy.as_ref(), &opts(2)).unwrap();
    assert!(same(&ok.latents, &fresh.latents));
}

#[test]
fn bad_layouts_are_rejected_naming_the_flag() {
    let mut o = opts(2);
    o.threads_per_rank = 0;
    let err = Runner::start(o).unwrap_err().to_string();
    assert!(err.contains("--threads-per-rank"), "{err}");
    let err = Runner::start(opts(0)).unwrap_err().to_string();
    assert!(err.contains("--world-size"), "{err}");
}

#[test]
fn a_cancelled_job_stops_early_and_the_next_runs() {
    let s = setup();
    let cancel = AtomicBool::new(false);
    let last_step = std::sync::atomic::AtomicUsize::new(0);
    let progress = |done: usize, _total: usize| {
        last_step.store(done, Ordering::SeqCst);
        if done == 3 {
            cancel.store(true, Ordering::SeqCst);
        }
    };
    let strategy = StrategyKind::Hybrid.build(&StrategyOptions::default());
    let mut job = Job {
        model: s.model.denoiser.as_ref(),
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps: 20,
        guidance: s.guidance,
        inputs: &s.inputs,
        progress: Some(&progress),
        sampling: Default::default(),
    };
    let runner = Runner::start(opts(2)).unwrap();
    let err = runner
        .denoise(&job, strategy.as_ref(), Some(&cancel))
        .unwrap_err();
    assert!(matches!(err, hybridiff_engine::Error::Cancelled), "{err}");
    assert_eq!(last_step.load(Ordering::SeqCst), 3, "stopped in step 4");
    cancel.store(false, Ordering::SeqCst);
    job.progress = None;
    let ok = runner
        .denoise(&job, strategy.as_ref(), Some(&cancel))
        .unwrap();
    let fresh = denoise(&job, strategy.as_ref(), &opts(2)).unwrap();
    assert!(same(&ok.latents, &fresh.latents));
}
