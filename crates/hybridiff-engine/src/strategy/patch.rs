//! `patch`: DistriFusion's displaced patch parallelism (Li et al., CVPR 2024, arXiv
//! 2402.19481). The CFG batch is split across two rank groups first (ranks `[0, P)`
//! uncond, `[P, 2P)` cond, as `cfg`); within a group each of the `P` ranks runs the whole
//! denoiser on one horizontal band of the latents ([`Denoiser::forward_patch`]). With
//! `--no-cfg-split` (or guidance <= 1) there is one group: `W = P`, each rank runs both
//! branches (or the conditional one) on its band.
//!
//! The model asks for other bands' data through [`PatchContext`], implemented here over
//! the communicator (models never see it). Each exchange goes to the same peers in the
//! same order every step, so with FIFO point-to-point messages no tags are needed:
//! - `sync`: send, then receive this step's values (exact, equals serial up to rounding);
//! - `displaced` (DistriFusion): the first `--warmup` steps are `sync`; afterwards a rank
//!   sends its fresh values right after computing them and uses the peers' values from the
//!   previous step, received when the layer next runs (they have long arrived), so
//!   communication overlaps compute. The warm-up steps keep what they received for the
//!   first displaced step; the last step sends nothing, so no message is left unread.
//!
//! With step caching (`--cache`) a cached step may skip modules, and every band skips the
//! same ones. Layer ids are numbered per module, so they stay put. A displaced layer whose
//! peers sent at the previous step reads those values; one that did not run then reads the
//! last values it kept. Values sent for a layer that this step skips are received all the
//! same, at the point the layer would have run (messages stay in send order), and kept for
//! the next step that runs it.
//!
//! Each step ends with an `all_gather` of every rank's band prediction (fresh, exact),
//! so every rank steps the same latents. Bytes: halos go to the two neighbours, GroupNorm
//! statistics and attention keys/values to every peer of the group, per layer per step.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Instant;

use candle_core::Tensor;
use hybridiff_comm::Communicator;
use hybridiff_models::{Band, Conditioning, PatchContext};

use super::layout::BandLayout;
use super::{Prediction, StepOutput, Strategy, Worker};
use crate::trace::StepMode;
use crate::{Error, Job, Result};

/// How other bands' activations are refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchMode {
    /// Every exchanged activation is this step's (exact).
    Sync,
    /// After the warm-up, other bands' activations are the previous step's (DistriFusion).
    Displaced,
}

impl FromStr for PatchMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sync" => Ok(Self::Sync),
            "displaced" => Ok(Self::Displaced),
            other => Err(Error::Options(format!(
                "--patch-mode: unknown mode `{other}`; expected sync or displaced"
            ))),
        }
    }
}

impl std::fmt::Display for PatchMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sync => "sync",
            Self::Displaced => "displaced",
        })
    }
}

/// Patch parallelism.
pub struct PatchParallel {
    pub mode: PatchMode,
    /// `displaced`: synchronous steps first (at least 1).
    pub warmup: usize,
    /// Split the CFG branches across two rank groups (when CFG is on).
    pub cfg_split: bool,
}

impl PatchParallel {
    fn layout(&self, job: &Job, world_size: usize) -> Result<BandLayout> {
        if job.model.patch_alignment().is_none() {
            return Err(Error::Options(
                "--strategy patch: this model does not support patch parallelism".into(),
            ));
        }
        let branches = if job.cfg() && self.cfg_split { 2 } else { 1 };
        BandLayout::new(job, world_size, branches, "patch").map_err(|e| {
            const HINT: &str = " (--no-cfg-split runs W bands with both branches on every rank)";
            match e {
                // The service's wording has no flags to suggest; the command line's gets the hint.
                Error::Refused(mut r) if branches == 2 => {
                    r.flags.push_str(HINT);
                    Error::Refused(r)
                }
                e if branches == 2 => Error::Options(format!("{e}{HINT}")),
                e => e,
            }
        })
    }

    fn describe_layout(&self, job: &Job, world_size: usize) -> String {
        match self.layout(job, world_size) {
            // One band per group exchanges nothing: it is `cfg` (or `serial`) by another name.
            Ok(l) if l.bands == 1 => format!(
                "1 band{} (no exchange)",
                if l.branches == 2 {
                    " x 2 CFG groups"
                } else {
                    ""
                }
            ),
            Ok(l) => format!(
                "{} {} bands{}{}",
                self.mode,
                l.bands,
                if l.branches == 2 {
                    " x 2 CFG groups"
                } else if job.cfg() {
                    ", CFG batched"
                } else {
                    ""
                },
                if self.mode == PatchMode::Displaced {
                    format!(", warmup {}", self.warmup)
                } else {
                    String::new()
                }
            ),
            Err(_) => self.mode.to_string(),
        }
    }
}

/// Refuses `--warmup 0` with displaced bands (the first step has nothing to displace).
pub(crate) fn check_warmup(mode: PatchMode, warmup: usize) -> Result<()> {
    if mode == PatchMode::Displaced && warmup == 0 {
        return Err(Error::Options(
            "--warmup 0: displaced patch parallelism needs at least 1 synchronous step (the first step has no earlier activations to reuse)".into(),
        ));
    }
    Ok(())
}

/// The layout as JSON for traces.
pub(crate) fn layout_json(
    l: &BandLayout,
    mode: PatchMode,
    warmup: usize,
    steps: usize,
) -> serde_json::Value {
    serde_json::json!({
        "patch_mode": mode.to_string(),
        "bands": l.bands,
        "band_rows": l.rows.iter().map(|&(r0, n)| [r0, n]).collect::<Vec<_>>(),
        "cfg_groups": l.branches,
        "warmup": if mode == PatchMode::Displaced { warmup } else { steps },
    })
}

impl Strategy for PatchParallel {
    fn name(&self) -> &'static str {
        "patch"
    }

    fn check(&self, job: &Job, world_size: usize) -> Result<()> {
        check_warmup(self.mode, self.warmup)?;
        self.layout(job, world_size).map(|_| ())
    }

    fn without_cfg(&self) -> &'static str {
        "guidance <= 1 turns classifier-free guidance off (as in diffusers): every rank runs the conditional branch on its band"
    }

    /// Mode, bands, CFG layout and warm-up, e.g. `displaced 2 bands x 2 CFG groups, warmup 1`.
    fn describe(&self, job: &Job, world_size: usize) -> String {
        self.describe_layout(job, world_size)
    }

    fn plan_summary(&self, job: &Job, world_size: usize) -> Result<Option<serde_json::Value>> {
        let l = self.layout(job, world_size)?;
        Ok(Some(layout_json(&l, self.mode, self.warmup, job.steps)))
    }

    fn worker<'a>(
        &'a self,
        job: &'a Job<'a>,
        rank: usize,
        world_size: usize,
    ) -> Result<Box<dyn Worker + 'a>> {
        let l = self.layout(job, world_size)?;
        Ok(Box::new(PatchWorker(BandStep::new(
            job,
            l,
            rank,
            self.mode,
            self.warmup,
        )?)))
    }
}

struct PatchWorker<'a>(BandStep<'a>);

impl Worker for PatchWorker<'_> {
    fn step(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput> {
        self.0.step(comm, i, x, t)
    }
}

/// One rank's share of band-parallel steps over a [`BandLayout`]: the mechanism `patch`,
/// `cfg` (sync) and `hybrid`'s exact steps share. Keeps what displaced steps carry from one
/// step to the next.
pub struct BandStep<'a> {
    job: &'a Job<'a>,
    layout: BandLayout,
    mode: PatchMode,
    warmup: usize,
    band: Band,
    /// First rank of this rank's group.
    base: usize,
    cond: Conditioning,
    /// Values kept for a later displaced step, keyed by (layer, peer rank): what the
    /// warm-up received, and what was sent for a layer that a cached step skipped.
    stash: HashMap<(usize, usize), Tensor>,
    /// Banded steps since the last start: the first `warmup` of a displaced run are sync.
    run: usize,
    /// The layers whose values peers sent ahead at the last displaced step, in send order,
    /// each with the peers that sent: what the next banded step reads (or, for layers a
    /// cached step skips, keeps), and what [`settle`](Self::settle) drains otherwise.
    pending: Vec<(usize, Vec<usize>)>,
}

impl<'a> BandStep<'a> {
    /// Rank `rank`'s share of `layout` in `mode` (`warmup` sync steps first when displaced).
    pub fn new(
        job: &'a Job<'a>,
        layout: BandLayout,
        rank: usize,
        mode: PatchMode,
        warmup: usize,
    ) -> Result<Self> {
        let group = layout.group_of(rank);
        let index = layout.band_of(rank);
        let cond = if !job.cfg() {
            job.inputs.cond.clone()
        } else if layout.branches == 2 {
            if group == 0 {
                job.inputs.uncond.clone()
            } else {
                job.inputs.cond.clone()
            }
        } else {
            Conditioning::cat(&job.inputs.uncond, &job.inputs.cond)?
        };
        let (row0, rows) = layout.rows[index];
        let full_rows = layout.rows.iter().map(|r| r.1).sum();

        Ok(Self {
            job,
            band: Band {
                index,
                count: layout.bands,
                row0,
                rows,
                full_rows,
            },
            base: group * layout.bands,
            layout,
            mode,
            warmup,
            cond,
            stash: HashMap::new(),
            run: 0,
            pending: Vec::new(),
        })
    }

    /// The layout this rank takes part in.
    pub fn layout(&self) -> &BandLayout {
        &self.layout
    }

    /// Before a step that is not banded (a pipelined one): receives and drops what the peers'
    /// last displaced step sent ahead (point-to-point channels are FIFO, and the next step's
    /// messages must not meet them), drops the stash, and makes the next banded step start
    /// its warm-up again (its displaced values would be many steps old).
    pub fn settle(&mut self, comm: &mut dyn Communicator) -> Result<()> {
        for (_, peers) in std::mem::take(&mut self.pending) {
            for peer in peers {
                comm.recv(peer)?;
            }
        }
        self.stash.clear();
        self.run = 0;
        Ok(())
    }

    /// Step `i` over the whole layout; every rank gets the whole prediction (both branches).
    pub fn step(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<StepOutput> {
        Ok(self.run(comm, i, x, t, false)?.0)
    }

    /// [`step`](Self::step), also returning this rank's band of every module's output
    /// (module order; see [`hybridiff_models::Denoiser::band_dim`]): what a stage pipeline
    /// starts from. Needs two or more bands.
    pub fn step_keeping_outputs(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
    ) -> Result<(StepOutput, Vec<Vec<Tensor>>)> {
        let (out, kept) = self.run(comm, i, x, t, true)?;
        let kept = kept.ok_or_else(|| {
            Error::Options("band outputs are kept only with two or more bands".into())
        })?;
        Ok((out, kept))
    }

    fn run(
        &mut self,
        comm: &mut dyn Communicator,
        i: usize,
        x: &Tensor,
        t: f64,
        keep_outputs: bool,
    ) -> Result<(StepOutput, Option<Vec<Vec<Tensor>>>)> {
        let job = self.job;
        // One band exchanges nothing, so there is nothing to displace.
        let displaced = self.mode == PatchMode::Displaced && self.band.count > 1;
        let c = self.run;
        let next = i + 1 < job.steps;
        let sync = !displaced || c < self.warmup;
        let plan = StepPlan {
            sync,
            keep: displaced && sync && next,
            send: next,
        };
        self.run += 1;
        let band = self.band;
        let batched = job.cfg() && self.layout.branches == 1;
        let start = Instant::now();
        let sent0 = super::Sent::so_far(&*comm);
        let mut kept = None;
        let eps = if band.count == 1 {
            // The whole image: the plain forward, exactly as `serial` and `cfg` run it.
            let xb = if batched {
                Tensor::cat(&[x, x], 0)?
            } else {
                x.clone()
            };
            job.model.forward(&xb, t, &self.cond)?
        } else {
            let xb = x.narrow(2, band.row0, band.rows)?;
            let xb = if batched {
                Tensor::cat(&[&xb, &xb], 0)?
            } else {
                xb
            };
            let ctx = Exchange {
                comm: &*comm,
                band,
                base: self.base,
                plan,
                stash: std::cell::RefCell::new(&mut self.stash),
                pending: std::cell::RefCell::new(std::mem::take(&mut self.pending).into()),
                sent: std::cell::RefCell::new(Vec::new()),
                kept: keep_outputs.then(|| std::cell::RefCell::new(Vec::new())),
            };
            let eps = job.model.forward_patch(&xb, t, &self.cond, &ctx)?;
            // Values sent a step ago for layers this step skipped (cached steps).
            ctx.drain_before(usize::MAX)?;
            kept = ctx.kept.map(|k| k.into_inner());
            self.pending = ctx.sent.into_inner();
            eps
        };
        // A GPU runs queued kernels after the call returns: wait for them before the clock.
        eps.device().synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        // Displaced activations are sent as soon as computed and read a step later, so they
        // overlap compute; sync ones and the gather below are waited for.
        let in_forward = super::Sent::so_far(&*comm).since(sent0);
        // Every rank's band prediction, fresh: rank r holds group r / P's band r % P.
        let all = comm.all_gather(&eps.contiguous()?)?;
        let p = band.count;
        let whole = |g: usize| -> Result<Tensor> {
            if p == 1 {
                return Ok(all[g].clone());
            }
            Ok(Tensor::cat(&all[g * p..(g + 1) * p], 2)?)
        };
        let mut out = if !job.cfg() {
            StepOutput::conditional(whole(0)?, secs)
        } else if self.layout.branches == 2 {
            StepOutput::exact(whole(0)?, whole(1)?, secs)?
        } else {
            let e = whole(0)?;
            StepOutput::exact(e.narrow(0, 0, 1)?, e.narrow(0, 1, 1)?, secs)?
        };
        if !sync {
            out.mode = StepMode::Pipelined;
            out.overlapped = in_forward;
        }
        if let Prediction::Guided(_) = out.prediction {
            out.rel_mae = 0.0;
        }
        Ok((out, kept))
    }
}

/// What this step does with the exchanged values.
#[derive(Debug, Clone, Copy)]
struct StepPlan {
    /// Receive this step's values (exact).
    sync: bool,
    /// Keep what is received for a later displaced step.
    keep: bool,
    /// Displaced: send fresh values (not in the last step: nobody would read them).
    send: bool,
}

/// The engine's side of [`PatchContext`]: one step of one rank.
struct Exchange<'s> {
    comm: &'s dyn Communicator,
    band: Band,
    base: usize,
    plan: StepPlan,
    stash: std::cell::RefCell<&'s mut HashMap<(usize, usize), Tensor>>,
    /// What peers sent at the previous step, not yet received (front first).
    pending: std::cell::RefCell<std::collections::VecDeque<(usize, Vec<usize>)>>,
    /// What this step sends for the next one to read.
    sent: std::cell::RefCell<Vec<(usize, Vec<usize>)>>,
    /// Every module's output on this band, when asked for.
    kept: Option<std::cell::RefCell<Vec<Vec<Tensor>>>>,
}

fn model_err(e: impl std::fmt::Display) -> hybridiff_models::Error {
    hybridiff_models::Error::Input(format!("patch exchange: {e}"))
}

impl Exchange<'_> {
    /// Receives what peers sent at the previous step for layers before `layer` that this
    /// step skipped (a cached step), and keeps it; with `layer` = `usize::MAX`, for every
    /// layer left (the end of the step).
    fn drain_before(&self, layer: usize) -> hybridiff_models::Result<()> {
        loop {
            let due = self
                .pending
                .borrow()
                .front()
                .is_some_and(|(l, _)| *l < layer);
            let Some((l, peers)) = due.then(|| self.pending.borrow_mut().pop_front()).flatten()
            else {
                return Ok(());
            };
            for peer in peers {
                let t = self.comm.recv(peer).map_err(model_err)?;
                self.stash.borrow_mut().insert((l, peer), t);
            }
        }
    }

    /// Sends `mine` to each of `peers` (when this step sends), then returns each peer's
    /// value for this layer: this step's (sync) or the previous step's (displaced: from the
    /// wire when the peers sent it then, else the last one kept).
    fn exchange(
        &self,
        layer: usize,
        out: &[(usize, Tensor)],
        from: &[usize],
    ) -> hybridiff_models::Result<Vec<Tensor>> {
        let p = self.plan;
        self.drain_before(layer)?;
        if p.sync || p.send {
            for (peer, t) in out {
                self.comm.send(t, *peer).map_err(model_err)?;
            }
        }
        if !p.sync && p.send {
            self.sent.borrow_mut().push((layer, from.to_vec()));
        }
        let on_wire = !p.sync
            && self
                .pending
                .borrow()
                .front()
                .is_some_and(|(l, _)| *l == layer);
        if on_wire {
            self.pending.borrow_mut().pop_front();
        }
        let mut got = Vec::with_capacity(from.len());
        for &peer in from {
            let t = if p.sync || on_wire {
                self.comm.recv(peer).map_err(model_err)?
            } else {
                self.stash
                    .borrow_mut()
                    .remove(&(layer, peer))
                    .ok_or_else(|| {
                        model_err(format!(
                            "no value of layer {layer} from rank {peer} kept from an earlier step"
                        ))
                    })?
            };
            if p.sync && p.keep {
                self.stash.borrow_mut().insert((layer, peer), t.clone());
            }
            got.push(t);
        }
        Ok(got)
    }
}

impl PatchContext for Exchange<'_> {
    fn band(&self) -> Band {
        self.band
    }

    fn keeps_outputs(&self) -> bool {
        self.kept.is_some()
    }

    fn module_output(&self, idx: usize, output: &[Tensor]) {
        if let Some(k) = &self.kept {
            let mut k = k.borrow_mut();
            debug_assert_eq!(k.len(), idx, "modules hand their outputs over in order");
            k.push(output.to_vec());
        }
    }

    fn halo(
        &self,
        layer: usize,
        x: &Tensor,
        top: usize,
        bottom: usize,
    ) -> hybridiff_models::Result<(Option<Tensor>, Option<Tensor>)> {
        let b = self.band;
        let h = x.dim(2)?;
        if top > h || bottom > h {
            return Err(hybridiff_models::Error::Input(format!(
                "band {} of {}: {h} rows at this level, fewer than the {} halo rows a convolution needs",
                b.index,
                b.count,
                top.max(bottom)
            )));
        }
        let above = (b.index > 0).then(|| self.base + b.index - 1);
        let below = (b.index + 1 < b.count).then(|| self.base + b.index + 1);
        let mut out = Vec::new();
        let mut from = Vec::new();
        // The band above needs my first `bottom` rows, the band below my last `top`.
        if let Some(a) = above.filter(|_| bottom > 0) {
            out.push((a, x.narrow(2, 0, bottom)?.contiguous()?));
        }
        if let Some(a) = above.filter(|_| top > 0) {
            from.push(a);
        }
        if let Some(c) = below.filter(|_| top > 0) {
            out.push((c, x.narrow(2, h - top, top)?.contiguous()?));
        }
        if let Some(c) = below.filter(|_| bottom > 0) {
            from.push(c);
        }
        let mut got = self.exchange(layer, &out, &from)?.into_iter();
        let up = above.filter(|_| top > 0).and_then(|_| got.next());
        let down = below.filter(|_| bottom > 0).and_then(|_| got.next());
        Ok((up, down))
    }

    fn gather(&self, layer: usize, x: &Tensor) -> hybridiff_models::Result<Vec<Tensor>> {
        let b = self.band;
        let peers: Vec<usize> = (0..b.count)
            .filter(|&i| i != b.index)
            .map(|i| self.base + i)
            .collect();
        let out: Vec<(usize, Tensor)> = peers.iter().map(|&p| (p, x.clone())).collect();
        let mut got = self.exchange(layer, &out, &peers)?.into_iter();
        Ok((0..b.count)
            .map(|i| {
                if i == b.index {
                    x.clone()
                } else {
                    got.next().expect("one per peer")
                }
            })
            .collect())
    }
}
