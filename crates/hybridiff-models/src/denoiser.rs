//! The interface between a denoiser and whoever schedules its work: the forward pass
//! as a sequence of named modules over an explicit [`State`]. The engine may run a
//! module ([`Denoiser::run_module`]) or substitute an output computed elsewhere
//! (another rank, a previous step) and feed it in with [`Denoiser::apply_module`].

use candle_core::Tensor;

use crate::patch::{Band, Patch, PatchContext};
use crate::{Error, Result};

/// Per-branch conditioning, batched like the sample (`B` = 1 per branch, 2 for CFG).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[B, L, D]` text embeddings (`encoder_hidden_states`).
    pub prompt_embeds: Tensor,
    /// `[B, P]` pooled text embeddings (SDXL `text_embeds`, SD3 `pooled_projections`).
    pub pooled: Option<Tensor>,
    /// `[B, 6]` SDXL micro-conditioning (`time_ids`).
    pub time_ids: Option<Tensor>,
}

impl Conditioning {
    /// Samples `start..start + len` of the batch.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Conditioning> {
        let n = |x: &Tensor| x.narrow(0, start, len);
        Ok(Conditioning {
            prompt_embeds: n(&self.prompt_embeds)?,
            pooled: self.pooled.as_ref().map(n).transpose()?,
            time_ids: self.time_ids.as_ref().map(n).transpose()?,
        })
    }

    /// Whether every tensor has batch `b` (not a broadcast batch of 1).
    pub fn batch_is(&self, b: usize) -> bool {
        [
            Some(&self.prompt_embeds),
            self.pooled.as_ref(),
            self.time_ids.as_ref(),
        ]
        .into_iter()
        .flatten()
        .all(|t| t.dim(0).ok() == Some(b))
    }

    /// Stacks two conditionings along the batch (e.g. uncond then cond).
    pub fn cat(a: &Conditioning, b: &Conditioning) -> Result<Conditioning> {
        let cat = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0);
        Ok(Conditioning {
            prompt_embeds: cat(&a.prompt_embeds, &b.prompt_embeds)?,
            pooled: match (&a.pooled, &b.pooled) {
                (Some(x), Some(y)) => Some(cat(x, y)?),
                _ => None,
            },
            time_ids: match (&a.time_ids, &b.time_ids) {
                (Some(x), Some(y)) => Some(cat(x, y)?),
                _ => None,
            },
        })
    }
}

/// The state threaded through a denoiser's modules. Fields a model does not use stay
/// empty (`skips` for a DiT).
#[derive(Debug, Clone)]
pub struct State {
    /// The main activation (`hidden_states`).
    pub hidden: Tensor,
    /// The text context: fixed for a U-Net, updated block by block in an MMDiT.
    pub context: Tensor,
    /// The (time + added) embedding every block reads.
    pub temb: Tensor,
    /// A U-Net's skip residuals, pushed by down blocks, popped by up resnets.
    pub skips: Vec<Tensor>,
    /// Spatial size of the input sample, `(height, width)` in latent pixels.
    pub sample_hw: (usize, usize),
}

/// One output tensor of one module: `index` into the list `run_module(module)` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutputRef {
    pub module: usize,
    pub index: usize,
}

/// A denoiser whose forward pass is a fixed sequence of named modules.
///
/// Invariant: `forward` equals `begin`, then for every module in order
/// `apply_module(i, run_module(i))`, then `end`; substituting a module's output by a
/// tensor list of the same shapes keeps the state consistent.
pub trait Denoiser: Send + Sync {
    /// Module names in execution order; they equal diffusers' weight prefixes.
    fn module_names(&self) -> &[String];
    /// Rough cost of each module in FLOPs for a `[1, C, h, w]` sample, for stage planning.
    fn module_flops(&self, h: usize, w: usize) -> Vec<f64>;
    /// How many tensors module `idx` outputs.
    fn module_output_count(&self, idx: usize) -> usize;
    /// The earlier module outputs whose values module `idx` reads (its input activation,
    /// a skip residual, ...). Outputs not listed are only carried along, so a rank that
    /// substitutes them needs nothing but their shapes. The last module's last output is
    /// the prediction.
    fn module_reads(&self, idx: usize) -> Vec<OutputRef>;
    /// Runs the parts that are not modules (time and text embeddings) and sets up the state.
    fn begin(&self, sample: &Tensor, timestep: f64, cond: &Conditioning) -> Result<State>;
    /// Computes module `idx` on `state` without changing it.
    fn run_module(&self, idx: usize, state: &State) -> Result<Vec<Tensor>>;
    /// Feeds module `idx`'s output (computed here or elsewhere) into the state.
    fn apply_module(&self, idx: usize, state: &mut State, output: Vec<Tensor>) -> Result<()>;
    /// The prediction after the last module.
    fn end(&self, state: State) -> Result<Tensor>;

    /// Memory one forward needs beyond the weights, for `batch` samples of `h x w`
    /// latents and `ctx_len` text tokens; `None` when the model cannot tell.
    fn forward_memory(
        &self,
        batch: usize,
        hw: (usize, usize),
        ctx_len: usize,
    ) -> Option<crate::memory::ForwardMemory> {
        let _ = (batch, hw, ctx_len);
        None
    }

    /// The plain forward pass: `sample` `[B, C, h, w]`, `cond` with batch `B`; returns the
    /// prediction `[B, C, h, w]`.
    ///
    /// On the CPU with two or more pool threads, a batch of two or more runs as two halves
    /// side by side ([`rayon::join`]) on the same threads: the samples are independent, so
    /// while one half waits at a parallel op's join, or runs a serial op, the other half
    /// keeps the threads busy (issue 12; 1/5-width SDXL U-Net, 64x64 latents, batch 2, 2
    /// threads: 0.63-0.69 s as one forward, 0.48-0.49 s in halves; a pool per half was no
    /// faster). Every kernel computes a sample's rows the same way whatever the batch and
    /// the thread count, so the result is bit-identical to the whole batch's
    /// (`tests/batch_split.rs`).
    fn forward(&self, sample: &Tensor, timestep: f64, cond: &Conditioning) -> Result<Tensor> {
        let b = sample.dim(0)?;
        if b >= 2
            && sample.device().is_cpu()
            && rayon::current_num_threads() >= 2
            && cond.batch_is(b)
        {
            let h = b / 2;
            let (x0, x1) = (sample.narrow(0, 0, h)?, sample.narrow(0, h, b - h)?);
            let (c0, c1) = (cond.narrow(0, h)?, cond.narrow(h, b - h)?);
            let (e0, e1) = rayon::join(
                || forward_modules(self, &x0, timestep, &c0),
                || forward_modules(self, &x1, timestep, &c1),
            );
            return Ok(Tensor::cat(&[e0?, e1?], 0)?);
        }
        forward_modules(self, sample, timestep, cond)
    }

    /// Latent pixels per token side: a DiT's `patch_size` (SD3: 2), 1 for a U-Net. Flow
    /// schedulers with dynamic shifting read the image's token count from it, as
    /// diffusers' SD3 pipeline does. Wrappers must forward it.
    fn patch_size(&self) -> usize {
        1
    }

    /// Rows of the latents that band boundaries must be multiples of (`2^downsamples` for
    /// a U-Net, `patch_size` for a DiT), and the fewest rows a band may have; `None` when
    /// the model cannot run on bands.
    fn patch_alignment(&self) -> Option<(usize, usize)> {
        None
    }

    /// [`Self::begin`] for one horizontal band of the latents (DistriFusion's patch
    /// parallelism): `sample` is `[B, C, rows, W]`, the rows `band` names.
    ///
    /// # Errors
    /// [`Error::Input`] when the model does not support bands, or the band does not fit.
    fn begin_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        band: Band,
    ) -> Result<State> {
        let _ = (sample, timestep, cond, band);
        Err(Error::Input(
            "this model does not support patch parallelism".into(),
        ))
    }

    /// [`Self::run_module`] on one band: layers that need other bands' data ask `patch`.
    ///
    /// # Errors
    /// [`Error::Input`] when the model does not support bands.
    fn run_module_patch(&self, idx: usize, state: &State, patch: &Patch) -> Result<Vec<Tensor>> {
        let _ = (idx, state, patch);
        Err(Error::Input(
            "this model does not support patch parallelism".into(),
        ))
    }

    /// For a band forward ([`Self::forward_patch`]): the dimension along which output
    /// `index` of module `idx` is cut by the bands (the rows of a `[B, C, h, w]` activation,
    /// the tokens of a `[B, L, D]` one), so that the bands' outputs concatenated along it in
    /// band order are the whole image's; `None` when every band computes the output whole
    /// (an MMDiT's text stream). Required (no default) so that a wrapper cannot forget to
    /// forward it.
    fn band_dim(&self, idx: usize, index: usize) -> Option<usize>;

    /// The forward pass on one horizontal band of the latents (DistriFusion's patch
    /// parallelism): `sample` is `[B, C, rows, W]`, the rows `ctx.band()` names, and the
    /// result is the prediction for those rows. Layers that need other bands' data ask
    /// `ctx`, numbered by module ([`Patch::enter_module`]); with one band this equals
    /// [`Self::forward`].
    ///
    /// # Errors
    /// [`Error::Input`] when the model does not support bands, or the band does not fit.
    fn forward_patch(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        ctx: &dyn PatchContext,
    ) -> Result<Tensor> {
        let p = Patch::new(ctx);
        let mut state = self.begin_patch(sample, timestep, cond, p.band())?;
        for idx in 0..self.module_names().len() {
            p.enter_module(idx)?;
            let out = self.run_module_patch(idx, &state, &p)?;
            ctx.module_output(idx, &out);
            self.apply_module(idx, &mut state, out)?;
        }
        self.end(state)
    }

    /// TeaCache's indicator (Liu et al., arXiv 2411.19108, sec. 4.2): the first
    /// transformer block's timestep-modulated input, `[B, N, D]`, for `sample`
    /// (`[B, C, h, w]`) at `timestep` under `cond` (batch `B`). Its relative L1 change
    /// from step to step tracks how much the blocks' output changes, so a step whose
    /// indicator moved little may reuse the blocks' last residual. `Ok(None)` when the
    /// model has no such input (U-Nets).
    fn modulated_input(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> Result<Option<Tensor>> {
        let _ = (sample, timestep, cond);
        Ok(None)
    }
}

/// `begin`, every module in order, `end`: the forward on one batch, on the calling pool.
fn forward_modules<D: Denoiser + ?Sized>(
    d: &D,
    sample: &Tensor,
    timestep: f64,
    cond: &Conditioning,
) -> Result<Tensor> {
    let mut state = d.begin(sample, timestep, cond)?;
    for idx in 0..d.module_names().len() {
        let out = d.run_module(idx, &state)?;
        d.apply_module(idx, &mut state, out)?;
    }
    d.end(state)
}
