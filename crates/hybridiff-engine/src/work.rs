//! Work accounting: the FLOPs each rank computes, counted where the denoiser is called, so
//! that no strategy reports its own work. Every rank's model is wrapped in [`Counted`] by
//! [`crate::strategy::run_rank`]; after each step the count goes to the trace
//! (`rank_flops`), where the work-balance checks and `bench` read it and the latency model
//! can turn it into GPU time (`bench --gpu-tflops`).
//!
//! What is counted (the model's own per-module estimate, [`Denoiser::module_flops`], at the
//! job's latent size, times the batch): a module run on its own (staged strategies) counts
//! that module; a whole forward counts every module; a band forward counts every module times
//! the band's share of the rows (a band's convolutions, norms and linear layers scale with its
//! rows, and its attention queries attend to every band's keys, which is also the band's share
//! of the attention products). Not counted: the embeddings a forward starts with and the
//! halo rows a band recomputes (a few percent), and the text stream of an MMDiT's joint
//! attention, which every band carries whole.

use std::sync::Mutex;

use candle_core::Tensor;
use hybridiff_models::{Conditioning, Denoiser, OutputRef, PatchContext, State};

/// A denoiser that counts the FLOPs of everything run through it (see the module docs).
/// Results are the wrapped denoiser's, bit for bit.
pub struct Counted<'a> {
    inner: &'a dyn Denoiser,
    flops: Mutex<f64>,
    /// `module_flops` at the last latent size asked for.
    table: Mutex<Option<FlopTable>>,
}

/// Per-module FLOPs of one sample and the latent size they are for.
type FlopTable = ((usize, usize), Vec<f64>);

impl<'a> Counted<'a> {
    pub fn new(inner: &'a dyn Denoiser) -> Self {
        Self {
            inner,
            flops: Mutex::new(0.0),
            table: Mutex::new(None),
        }
    }

    /// FLOPs counted since the last call, and resets the count.
    pub fn take(&self) -> f64 {
        std::mem::take(&mut *self.flops.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn add(&self, f: f64) {
        *self.flops.lock().unwrap_or_else(|e| e.into_inner()) += f;
    }

    /// Per-module FLOPs of one sample at latent size `hw`.
    fn table(&self, hw: (usize, usize)) -> Vec<f64> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.as_ref() {
            Some((at, v)) if *at == hw => v.clone(),
            _ => {
                let v = self.inner.module_flops(hw.0, hw.1);
                *t = Some((hw, v.clone()));
                v
            }
        }
    }
}

impl Denoiser for Counted<'_> {
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
    fn begin(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<State> {
        self.inner.begin(sample, timestep, cond)
    }
    fn run_module(&self, idx: usize, state: &State) -> hybridiff_models::Result<Vec<Tensor>> {
        let batch = state.hidden.dim(0)? as f64;
        self.add(self.table(state.sample_hw).get(idx).copied().unwrap_or(0.0) * batch);
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
    fn forward_memory(
        &self,
        batch: usize,
        hw: (usize, usize),
        ctx_len: usize,
    ) -> Option<hybridiff_models::memory::ForwardMemory> {
        self.inner.forward_memory(batch, hw, ctx_len)
    }
    fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        self.add(self.table((h, w)).iter().sum::<f64>() * b as f64);
        self.inner.forward(sample, timestep, cond)
    }
    fn patch_alignment(&self) -> Option<(usize, usize)> {
        self.inner.patch_alignment()
    }
    fn band_dim(&self, idx: usize, index: usize) -> Option<usize> {
        self.inner.band_dim(idx, index)
    }
    fn begin_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        band: hybridiff_models::Band,
    ) -> hybridiff_models::Result<State> {
        self.inner.begin_patch(sample, timestep, cond, band)
    }
    /// A module on one band (a step cache's band forward): the module's FLOPs times the
    /// band's share of the rows.
    fn run_module_patch(
        &self,
        idx: usize,
        state: &State,
        patch: &hybridiff_models::patch::Patch,
    ) -> hybridiff_models::Result<Vec<Tensor>> {
        let band = patch.band();
        let batch = state.hidden.dim(0)? as f64;
        let w = state.sample_hw.1;
        let share = band.rows as f64 / band.full_rows.max(1) as f64;
        let whole = self
            .table((band.full_rows, w))
            .get(idx)
            .copied()
            .unwrap_or(0.0);
        self.add(whole * share * batch);
        self.inner.run_module_patch(idx, state, patch)
    }
    fn modulated_input(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> hybridiff_models::Result<Option<Tensor>> {
        self.inner.modulated_input(sample, timestep, cond)
    }
    fn forward_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        ctx: &dyn PatchContext,
    ) -> hybridiff_models::Result<Tensor> {
        let (b, _, rows, w) = sample.dims4()?;
        let band = ctx.band();
        let whole: f64 = self.table((band.full_rows, w)).iter().sum();
        let share = rows as f64 / band.full_rows.max(1) as f64;
        self.add(whole * share * b as f64);
        self.inner.forward_patch(sample, timestep, cond, ctx)
    }
}

/// Checks that a run's steps share work evenly: in every step where anything was computed,
/// each rank's FLOPs lie within `tolerance` (a fraction) of the step's total / W. Returns the
/// worst step's `(index, max_r |flops_r - mean| / mean)`; skipped steps (no FLOPs at all,
/// AsyncDiff stride 2's reuse steps) and those listed in `except` are left out.
pub fn worst_imbalance(rank_flops: &[Vec<f64>], except: &[usize]) -> Option<(usize, f64)> {
    rank_flops
        .iter()
        .enumerate()
        .filter(|(i, _)| !except.contains(i))
        .filter_map(|(i, f)| {
            let total: f64 = f.iter().sum();
            if total <= 0.0 || f.is_empty() {
                return None;
            }
            let mean = total / f.len() as f64;
            let worst = f
                .iter()
                .map(|x| (x - mean).abs() / mean)
                .fold(0.0, f64::max);
            Some((i, worst))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}
