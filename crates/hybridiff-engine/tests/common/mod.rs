//! Helpers shared by the engine's fixture tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use hybridiff_engine::stages::PlanKind;
use hybridiff_engine::switch::SwitchParams;
use hybridiff_engine::{
    denoise, DenoiseInputs, DenoiseOutput, Job, Model, RunOptions, SamplingOptions, StrategyKind,
    StrategyOptions,
};
use hybridiff_schedulers::SchedulerKind;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(name)
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

pub struct Setup {
    pub model: Model,
    pub inputs: DenoiseInputs,
    pub scheduler: SchedulerKind,
    pub guidance: f64,
    /// Karras sigmas, guidance rescale, step noise (default: none, 0, seed 0).
    pub sampling: SamplingOptions,
    pub name: &'static str,
}

/// The tiny SDXL fixture (DDIM, guidance 5) or the tiny SD3 one (flow Euler, guidance 7).
pub fn setup_named(name: &'static str) -> Setup {
    setup_with(name, DType::F32)
}

/// A fixture loaded in `dtype`.
pub fn setup_with(name: &'static str, dtype: DType) -> Setup {
    let dev = Device::Cpu;
    let root = fixture(name);
    let model = Model::load(&root, dtype, &dev).unwrap();
    let inputs =
        DenoiseInputs::load(&root.join("inputs.safetensors"), &model.input_spec, &dev).unwrap();
    let scheduler = model.scheduler_config.default_kind().unwrap();
    let guidance = if name == "tiny-sd3" { 7.0 } else { 5.0 };
    Setup {
        model,
        inputs,
        scheduler,
        guidance,
        sampling: SamplingOptions::default(),
        name,
    }
}

pub fn setup() -> Setup {
    setup_named("tiny-sdxl")
}

pub fn run(
    s: &Setup,
    kind: StrategyKind,
    world: usize,
    opts: &StrategyOptions,
) -> hybridiff_engine::Result<DenoiseOutput> {
    let job = Job {
        model: s.model.denoiser.as_ref(),
        scheduler_config: &s.model.scheduler_config,
        scheduler: s.scheduler,
        steps: 20,
        guidance: s.guidance,
        inputs: &s.inputs,
        progress: None,
        sampling: s.sampling,
    };
    let ro = RunOptions {
        world_size: world,
        threads_per_rank: 1,
        comm_timeout: Duration::from_secs(120),
        placement: Default::default(),
    };
    denoise(&job, kind.build(opts).as_ref(), &ro)
}

pub fn reference() -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    reference_of("tiny-sdxl")
}

/// `expected/hybrid.json` and `expected/hybrid.safetensors` of a fixture.
pub fn reference_of(name: &str) -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    let root = fixture(name).join("expected");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("hybrid.json")).unwrap()).unwrap();
    let t = candle_core::safetensors::load(root.join("hybrid.safetensors"), &Device::Cpu).unwrap();
    (v, t)
}

pub fn fixture_options(v: &serde_json::Value) -> StrategyOptions {
    StrategyOptions {
        switch: SwitchParams {
            l_slope: v["l_slope"].as_u64().unwrap() as usize,
            eps_slope: v["eps_slope"].as_f64().unwrap(),
            k: v["k"].as_u64().unwrap() as usize,
            tau_cap: v["tau_cap"].as_u64().unwrap() as usize,
        },
        stages: PlanKind::Reference,
        ..Default::default()
    }
}

pub fn assert_steps_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims());
    for i in 0..want.dim(0).unwrap() {
        let w = want.get(i).unwrap();
        let g = got.get(i).unwrap();
        let tol = 1e-3 * max_abs(&w).max(1.0);
        let d = max_abs(&(&g - &w).unwrap());
        assert!(d < tol, "{what}: step {i}: max abs diff {d} >= {tol}");
    }
}

/// A denoiser that records, per calling thread (one per rank with one thread per rank),
/// every module it computes with a fingerprint of the data that module computes on, so a
/// test can find two ranks computing the same module on the same input. Module by module
/// (`run_module`, and the plain `forward`, which goes through it at one thread), and for a
/// band forward every module under a key of the band's rows and its inputs. Results are the
/// inner denoiser's.
pub struct Audit<'a> {
    pub inner: &'a dyn hybridiff_models::Denoiser,
    log: std::sync::Mutex<Vec<(std::thread::ThreadId, String)>>,
}

fn fingerprint(ts: &[&Tensor], extra: f64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    extra.to_bits().hash(&mut h);
    for t in ts {
        t.dims().hash(&mut h);
        let v: Vec<f32> = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for x in v {
            x.to_bits().hash(&mut h);
        }
    }
    h.finish()
}

fn cond_tensors(c: &hybridiff_models::Conditioning) -> Vec<&Tensor> {
    let mut v = vec![&c.prompt_embeds];
    v.extend(c.pooled.iter());
    v.extend(c.time_ids.iter());
    v
}

impl<'a> Audit<'a> {
    pub fn new(inner: &'a dyn hybridiff_models::Denoiser) -> Self {
        Self {
            inner,
            log: Default::default(),
        }
    }

    fn record(&self, key: String) {
        self.log
            .lock()
            .unwrap()
            .push((std::thread::current().id(), key));
    }

    /// Takes the record; returns the keys computed by more than one thread.
    pub fn duplicates(&self) -> Vec<String> {
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        let mut by_key: std::collections::HashMap<String, std::collections::HashSet<_>> =
            Default::default();
        for (thread, key) in log {
            by_key.entry(key).or_default().insert(thread);
        }
        let mut d: Vec<String> = by_key
            .into_iter()
            .filter(|(_, t)| t.len() > 1)
            .map(|(k, _)| k)
            .collect();
        d.sort();
        d
    }
}

impl hybridiff_models::Denoiser for Audit<'_> {
    fn module_names(&self) -> &[String] {
        self.inner.module_names()
    }
    fn module_flops(&self, h: usize, w: usize) -> Vec<f64> {
        self.inner.module_flops(h, w)
    }
    fn module_output_count(&self, idx: usize) -> usize {
        self.inner.module_output_count(idx)
    }
    fn module_reads(&self, idx: usize) -> Vec<hybridiff_models::OutputRef> {
        self.inner.module_reads(idx)
    }
    fn begin(
        &self,
        x: &Tensor,
        t: f64,
        c: &hybridiff_models::Conditioning,
    ) -> hybridiff_models::Result<hybridiff_models::State> {
        self.inner.begin(x, t, c)
    }
    fn run_module(
        &self,
        idx: usize,
        st: &hybridiff_models::State,
    ) -> hybridiff_models::Result<Vec<Tensor>> {
        // What a module can read: the activation, the embedding, the text and the skips.
        let mut ts = vec![&st.hidden, &st.temb, &st.context];
        ts.extend(st.skips.iter());
        self.record(format!("module {idx} on {:x}", fingerprint(&ts, 0.0)));
        self.inner.run_module(idx, st)
    }
    fn apply_module(
        &self,
        idx: usize,
        st: &mut hybridiff_models::State,
        out: Vec<Tensor>,
    ) -> hybridiff_models::Result<()> {
        self.inner.apply_module(idx, st, out)
    }
    fn end(&self, st: hybridiff_models::State) -> hybridiff_models::Result<Tensor> {
        self.inner.end(st)
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
        c: &hybridiff_models::Conditioning,
        ctx: &dyn hybridiff_models::PatchContext,
    ) -> hybridiff_models::Result<Tensor> {
        let b = ctx.band();
        let mut ts = vec![x];
        ts.extend(cond_tensors(c));
        let fp = fingerprint(&ts, t);
        for idx in 0..self.inner.module_names().len() {
            self.record(format!(
                "module {idx} of rows {}+{} on {fp:x}",
                b.row0, b.rows
            ));
        }
        self.inner.forward_patch(x, t, c, ctx)
    }
}
