//! Staged execution: a denoiser's modules cut into stages owned by ranks, each rank
//! computing its own stage on inputs that are one step stale (AsyncDiff). Generic over
//! [`Denoiser`]: it needs only module names, costs and the outputs each module reads.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Instant;

use candle_core::Tensor;
use hybridiff_comm::{tensor_bytes, Communicator};
use hybridiff_models::{Conditioning, Denoiser, OutputRef};

use crate::{Error, Result};

/// How a stage plan is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PlanKind {
    /// `Reference` where the model has a reference preset for the stage count, else `Auto`.
    Default,
    /// The hand-picked plans of the reference code (SDXL U-Net, n = 2 or 4).
    Reference,
    /// Contiguous stages balanced by the denoiser's counted FLOPs.
    Auto,
    /// Contiguous stages balanced by module times measured on this machine before the
    /// run (one timed forward on the job's inputs).
    Measured,
}

impl FromStr for PlanKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "default" => Ok(Self::Default),
            "reference" => Ok(Self::Reference),
            "auto" => Ok(Self::Auto),
            "measured" => Ok(Self::Measured),
            other => Err(Error::Options(format!(
                "--stages: unknown plan `{other}`; expected default, reference, auto or measured"
            ))),
        }
    }
}

impl std::fmt::Display for PlanKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::Reference => "reference",
            Self::Auto => "auto",
            Self::Measured => "measured",
        })
    }
}

/// Which rank owns each module. Stage `j` is owned by rank `j`; the last stage owns the
/// output layer, so its rank produces the pipelined prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    pub n: usize,
    /// `owner[m]` is the stage of module `m`.
    pub owner: Vec<usize>,
    /// Counted FLOPs per stage, for reporting balance.
    pub stage_flops: Vec<f64>,
}

const SDXL_N2_STAGE0: &[&str] = &[
    "down_blocks.2",
    "mid_block",
    "up_blocks.0.resnets.0",
    "up_blocks.0.attentions.0",
    "up_blocks.0.resnets.1",
    "up_blocks.0.attentions.1",
];

const SDXL_N4: [&[&str]; 3] = [
    &["down_blocks.1", "down_blocks.2"],
    &[
        "mid_block",
        "up_blocks.0.resnets.0",
        "up_blocks.0.attentions.0",
    ],
    &[
        "up_blocks.0.resnets.1",
        "up_blocks.0.attentions.1",
        "up_blocks.0.resnets.2",
        "up_blocks.0.attentions.2",
        "up_blocks.0.upsamplers",
    ],
];

impl StagePlan {
    /// Builds and validates a plan for `model` at latent size `hw`.
    pub fn new(kind: PlanKind, model: &dyn Denoiser, n: usize, hw: (usize, usize)) -> Result<Self> {
        let names = model.module_names();
        check_stage_count(names.len(), n)?;
        let flops = model.module_flops(hw.0, hw.1);
        let owner = match kind {
            PlanKind::Auto => balanced_contiguous(&flops, n),
            PlanKind::Reference => reference_owner(names, n)?,
            PlanKind::Default => {
                reference_owner(names, n).unwrap_or_else(|_| balanced_contiguous(&flops, n))
            }
            PlanKind::Measured => {
                return Err(Error::Options(
                    "a measured plan needs inputs to time: use StagePlan::measured".into(),
                ))
            }
        };
        Self::from_owner(owner, n, &flops, names)
    }

    /// Contiguous stages balanced by each module's measured time on `x` (median of
    /// `repeats` timed passes after a warm-up).
    pub fn measured(
        model: &dyn Denoiser,
        n: usize,
        x: &Tensor,
        t: f64,
        cond: &Conditioning,
        repeats: usize,
    ) -> Result<Self> {
        let names = model.module_names();
        check_stage_count(names.len(), n)?;
        let mut samples = vec![Vec::new(); names.len()];
        for pass in 0..=repeats.max(1) {
            let mut state = model.begin(x, t, cond)?;
            for (m, s) in samples.iter_mut().enumerate() {
                let start = Instant::now();
                let out = model.run_module(m, &state)?;
                x.device().synchronize()?;
                if pass > 0 {
                    s.push(start.elapsed().as_secs_f64());
                }
                model.apply_module(m, &mut state, out)?;
            }
        }
        let secs: Vec<f64> = samples
            .into_iter()
            .map(|mut v| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            })
            .collect();
        let owner = balanced_contiguous(&secs, n);
        let (h, w) = (x.dim(2)?, x.dim(3)?);
        Self::from_owner(owner, n, &model.module_flops(h, w), names)
    }

    /// A plan from an explicit owner list; checks every module is owned by a stage in
    /// `0..n`, every stage owns something, and the last stage owns the output layer.
    pub fn from_owner(
        owner: Vec<usize>,
        n: usize,
        flops: &[f64],
        names: &[String],
    ) -> Result<Self> {
        if owner.len() != names.len() {
            return Err(Error::Options(format!(
                "stage plan covers {} modules, the denoiser has {}",
                owner.len(),
                names.len()
            )));
        }
        if let Some((m, s)) = owner.iter().enumerate().find(|(_, s)| **s >= n) {
            return Err(Error::Options(format!(
                "stage plan puts `{}` on stage {s}, but there are only {n} stages",
                names[m]
            )));
        }
        for s in 0..n {
            if !owner.contains(&s) {
                return Err(Error::Options(format!("stage plan leaves stage {s} empty")));
            }
        }
        if owner.last() != Some(&(n - 1)) {
            return Err(Error::Options(format!(
                "the last stage ({}) must own the output layer `{}`",
                n - 1,
                names[names.len() - 1]
            )));
        }
        let mut stage_flops = vec![0.0; n];
        for (m, s) in owner.iter().enumerate() {
            stage_flops[*s] += flops[m];
        }
        Ok(Self {
            n,
            owner,
            stage_flops,
        })
    }

    /// The module outputs that stage `rank` reads but another stage computes, sorted.
    pub fn needs(&self, model: &dyn Denoiser, rank: usize) -> Vec<OutputRef> {
        let mut set = BTreeSet::new();
        for (m, &s) in self.owner.iter().enumerate() {
            if s == rank {
                for r in model.module_reads(m) {
                    if self.owner[r.module] != rank {
                        set.insert(r);
                    }
                }
            }
        }
        set.into_iter().collect()
    }
}

/// Refuses `n` stages for a denoiser of `modules` modules unless `2 <= n <= modules`.
fn check_stage_count(modules: usize, n: usize) -> Result<()> {
    if n < 2 || n > modules {
        return Err(Error::Options(format!(
            "{n} stages do not fit a denoiser of {modules} modules (need 2..={modules})"
        )));
    }
    Ok(())
}

fn reference_owner(names: &[String], n: usize) -> Result<Vec<usize>> {
    let blocks = names
        .iter()
        .filter(|m| m.starts_with("transformer_blocks."))
        .count();
    if blocks > 0 {
        return dit_reference_owner(names, blocks, n);
    }
    let groups: Vec<&[&str]> = match n {
        2 => vec![SDXL_N2_STAGE0],
        4 => SDXL_N4.to_vec(),
        _ => {
            return Err(Error::Options(format!(
                "--stages reference: the reference has plans for 2 and 4 stages, not {n}; use --stages auto"
            )))
        }
    };
    // Modules not listed go to the last stage (the outer layers, with the output).
    let mut owner = vec![n - 1; names.len()];
    for (stage, list) in groups.iter().enumerate() {
        for want in *list {
            let m = names.iter().position(|x| x == want).ok_or_else(|| {
                Error::Options(format!(
                    "--stages reference: this denoiser has no module `{want}` (the reference plans are for the SDXL U-Net); use --stages auto"
                ))
            })?;
            owner[m] = stage;
        }
    }
    Ok(owner)
}

/// The reference's DiT plans: the transformer blocks split evenly and in order (SD3 n=2:
/// blocks 0-11 | 12-23), the output layers with the last stage.
fn dit_reference_owner(names: &[String], blocks: usize, n: usize) -> Result<Vec<usize>> {
    if !blocks.is_multiple_of(n) {
        return Err(Error::Options(format!(
            "--stages reference: {blocks} transformer blocks do not split evenly into {n} stages; use --stages auto"
        )));
    }
    let per = blocks / n;
    Ok(names
        .iter()
        .map(|m| match m.strip_prefix("transformer_blocks.") {
            Some(i) => i.parse::<usize>().map(|i| i / per).unwrap_or(n - 1),
            None => n - 1,
        })
        .collect())
}

/// Cuts the module sequence into `n` contiguous stages minimising the most expensive
/// stage (exact linear-partition DP); every stage gets at least one module.
pub fn balanced_contiguous(cost: &[f64], n: usize) -> Vec<usize> {
    let m = cost.len();
    let mut prefix = vec![0.0; m + 1];
    for i in 0..m {
        prefix[i + 1] = prefix[i] + cost[i];
    }
    // best[k][i]: minimal max-stage cost splitting the first i modules into k stages.
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; m + 1]; n + 1];
    let mut cut = vec![vec![0usize; m + 1]; n + 1];
    best[0][0] = 0.0;
    for k in 1..=n {
        for i in k..=m {
            for j in (k - 1)..i {
                let v = best[k - 1][j].max(prefix[i] - prefix[j]);
                if v < best[k][i] {
                    best[k][i] = v;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut owner = vec![0; m];
    let mut i = m;
    for k in (1..=n).rev() {
        let j = cut[k][i];
        for o in owner.iter_mut().take(i).skip(j) {
            *o = k - 1;
        }
        i = j;
    }
    owner
}

/// Computes a job's plan once and hands the same plan to every rank (a measured plan
/// timed separately on each rank could differ, and ranks must agree).
pub struct PlanCache {
    kind: PlanKind,
    cell: std::sync::Mutex<Option<CachedPlan>>,
}

/// A plan with the world size and latent size it was made for.
type CachedPlan = (usize, (usize, usize), StagePlan);

impl PlanCache {
    pub fn new(kind: PlanKind) -> Self {
        Self {
            kind,
            cell: std::sync::Mutex::new(None),
        }
    }

    /// Refuses `job` on `world_size` ranks when no plan of this kind can be made for it,
    /// without compute: a measured plan is measured only when first asked for with
    /// [`PlanCache::get`] (its stage count is checked here), the others are planned (and
    /// kept) now.
    pub fn check(&self, job: &crate::Job, world_size: usize) -> Result<()> {
        match self.kind {
            PlanKind::Measured => check_stage_count(job.model.module_names().len(), world_size),
            _ => self.get(job, world_size).map(|_| ()),
        }
    }

    /// The plan for `job` on `world_size` ranks, one stage each.
    pub fn get(&self, job: &crate::Job, world_size: usize) -> Result<StagePlan> {
        let hw = (job.inputs.latents.dim(2)?, job.inputs.latents.dim(3)?);
        let mut cell = self.cell.lock().expect("no panic while planning");
        if let Some((w, h, plan)) = cell.as_ref() {
            if *w == world_size && *h == hw {
                return Ok(plan.clone());
            }
        }
        let plan = match self.kind {
            PlanKind::Measured => StagePlan::measured(
                job.model,
                world_size,
                &job.inputs.latents,
                500.0,
                &job.inputs.cond,
                3,
            )?,
            kind => StagePlan::new(kind, job.model, world_size, hw)?,
        };
        *cell = Some((world_size, hw, plan.clone()));
        Ok(plan)
    }
}

/// Which ranks run a plan's stages: the owner of each stage, and the ranks that compute the
/// last stage again without owning it (AsyncDiff's stride 2: the extra rank of
/// `n + stride - 1`). Owners send what other stages read; mirrors only receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRanks {
    /// Global rank of each stage's owner, stage order.
    pub owners: Vec<usize>,
    /// Global ranks mirroring the last stage.
    pub mirrors: Vec<usize>,
}

impl StageRanks {
    /// Stage `s` on rank `first + s`, no mirrors.
    pub fn consecutive(first: usize, n: usize) -> Self {
        Self {
            owners: (first..first + n).collect(),
            mirrors: Vec::new(),
        }
    }

    /// Every rank taking part, owners then mirrors.
    pub fn all(&self) -> impl Iterator<Item = usize> + '_ {
        self.owners.iter().chain(&self.mirrors).copied()
    }

    /// The stage `rank` computes and whether it only mirrors it.
    pub fn stage_of(&self, rank: usize) -> Option<(usize, bool)> {
        if let Some(s) = self.owners.iter().position(|&r| r == rank) {
            return Some((s, false));
        }
        self.mirrors
            .contains(&rank)
            .then(|| (self.owners.len() - 1, true))
    }
}

/// The shape message a fill sends for an output the receiver only carries along.
fn shape_message(t: &Tensor) -> Result<Tensor> {
    let dims: Vec<u32> = t.dims().iter().map(|&d| d as u32).collect();
    Ok(Tensor::new(dims.as_slice(), &candle_core::Device::Cpu)?)
}

/// A stand-in of the shape `msg` names: zeros that take no memory (a broadcast view), for an
/// output that is only carried along (the module-reads contract: its values are never read).
fn placeholder(msg: &Tensor, like: &Tensor) -> Result<Tensor> {
    let dims: Vec<usize> = msg
        .to_vec1::<u32>()?
        .into_iter()
        .map(|d| d as usize)
        .collect();
    Ok(Tensor::zeros((), like.dtype(), like.device())?.broadcast_as(dims)?)
}

/// One rank's side of staged execution: the module output cache and the exchange.
pub struct StagedRunner<'a> {
    model: &'a dyn Denoiser,
    plan: StagePlan,
    ranks: StageRanks,
    /// The stage this rank computes.
    stage: usize,
    /// Whether this rank only mirrors `stage` (computes it, sends nothing).
    mirror: bool,
    /// Per stage: the outputs it needs from others (sorted; both sides agree).
    needs: Vec<Vec<OutputRef>>,
    cache: Vec<Vec<Tensor>>,
    /// Seconds of denoiser compute in the last call.
    pub compute_seconds: f64,
    /// What the last [`exchange`](Self::exchange) sent: stage outputs of the previous step,
    /// which a real link carries while the step is still computing (they are produced
    /// module by module), so a latency model overlaps them with compute.
    pub exchanged: crate::strategy::Sent,
}

impl<'a> StagedRunner<'a> {
    /// A runner for stage `rank` of `plan`, stages on ranks `0..n`.
    pub fn new(model: &'a dyn Denoiser, plan: StagePlan, rank: usize) -> Self {
        let n = plan.n;
        Self::on(model, plan, StageRanks::consecutive(0, n), rank)
            .expect("rank is one of the plan's stages")
    }

    /// A runner for global rank `rank`, which must be one of `ranks`.
    pub fn on(
        model: &'a dyn Denoiser,
        plan: StagePlan,
        ranks: StageRanks,
        rank: usize,
    ) -> Result<Self> {
        if ranks.owners.len() != plan.n {
            return Err(Error::Options(format!(
                "a plan of {} stages placed on {} ranks",
                plan.n,
                ranks.owners.len()
            )));
        }
        let (stage, mirror) = ranks.stage_of(rank).ok_or_else(|| {
            Error::Options(format!("rank {rank} runs none of the stages of {ranks:?}"))
        })?;
        let needs = (0..plan.n).map(|r| plan.needs(model, r)).collect();
        Ok(Self {
            model,
            plan,
            ranks,
            stage,
            mirror,
            needs,
            cache: Vec::new(),
            compute_seconds: 0.0,
            exchanged: Default::default(),
        })
    }

    /// The plan this runner follows.
    pub fn plan(&self) -> &StagePlan {
        &self.plan
    }

    /// Where the stages run.
    pub fn ranks(&self) -> &StageRanks {
        &self.ranks
    }

    /// The global rank that owns the last stage (the output layer).
    pub fn last_stage_rank(&self) -> usize {
        self.ranks.owners[self.plan.n - 1]
    }

    /// Whether the cache holds a full forward's outputs.
    pub fn is_filled(&self) -> bool {
        !self.cache.is_empty()
    }

    /// Drops the cache (back to exact steps).
    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// Runs the whole denoiser, caching every module's output (the reference's fill step:
    /// every rank computes everything).
    pub fn fill(&mut self, x: &Tensor, t: f64, cond: &Conditioning) -> Result<Tensor> {
        let start = Instant::now();
        let mut state = self.model.begin(x, t, cond)?;
        self.cache.clear();
        for m in 0..self.plan.owner.len() {
            let out = self.model.run_module(m, &state)?;
            self.cache.push(out.clone());
            self.model.apply_module(m, &mut state, out)?;
        }
        let y = self.model.end(state)?;
        // A GPU runs queued kernels after the calls return: wait for them before the clock.
        y.device().synchronize()?;
        self.compute_seconds = start.elapsed().as_secs_f64();
        Ok(y)
    }

    /// The outputs stage `s` reads from other stages.
    fn needs_of_rank(&self, rank: usize) -> &[OutputRef] {
        match self.ranks.stage_of(rank) {
            Some((s, _)) => &self.needs[s],
            None => &[],
        }
    }

    /// A fresh forward computed once, stage after stage (the pipeline's fill without
    /// duplicated work): walking the modules in order, each module's owner computes it on its
    /// own state and sends each output to every other rank of the stages, as the tensor when
    /// that rank's stage reads it, else as its shape (the receiver keeps a stand-in: the
    /// output is only carried along). Every rank ends with a full cache for the pipelined
    /// steps. Bit for bit the plain forward when every rank has the same `x`, `t` and `cond`
    /// (AsyncDiff's exact warm-up); with per-rank conditioning (Hybridiff) each stage runs on
    /// its rank's branch, as in pipelined steps.
    ///
    /// Returns the prediction on the last stage's owner (`None` elsewhere). Its latency is
    /// the sum of the stages' compute (each waits for the one before): the trace marks such
    /// steps as chained.
    pub fn fill_sequential(
        &mut self,
        comm: &mut dyn Communicator,
        x: &Tensor,
        t: f64,
        cond: &Conditioning,
    ) -> Result<Option<Tensor>> {
        let me = comm.rank();
        let mut compute = 0.0;
        let mut state = if self.mirror {
            None
        } else {
            let start = Instant::now();
            let st = self.model.begin(x, t, cond)?;
            compute += start.elapsed().as_secs_f64();
            Some(st)
        };
        let others: Vec<usize> = self.ranks.all().filter(|&r| r != me).collect();
        let mine = self.needs_of_rank(me).to_vec();
        self.cache.clear();
        for m in 0..self.plan.owner.len() {
            let owner_stage = self.plan.owner[m];
            let out = match &mut state {
                Some(st) if owner_stage == self.stage => {
                    let start = Instant::now();
                    let out = self.model.run_module(m, st)?;
                    if let Some(o) = out.first() {
                        o.device().synchronize()?;
                    }
                    compute += start.elapsed().as_secs_f64();
                    for &q in &others {
                        let wants = self.needs_of_rank(q);
                        for (index, o) in out.iter().enumerate() {
                            if wants.contains(&OutputRef { module: m, index }) {
                                comm.send(o, q)?;
                            } else {
                                comm.send(&shape_message(o)?, q)?;
                            }
                        }
                    }
                    out
                }
                _ => {
                    let src = self.ranks.owners[owner_stage];
                    (0..self.model.module_output_count(m))
                        .map(|index| {
                            let got = comm.recv(src)?;
                            if mine.contains(&OutputRef { module: m, index }) {
                                Ok(got)
                            } else {
                                placeholder(&got, x)
                            }
                        })
                        .collect::<Result<Vec<_>>>()?
                }
            };
            if let Some(st) = &mut state {
                self.model.apply_module(m, st, out.clone())?;
            }
            self.cache.push(out);
        }
        let last = self.plan.n - 1;
        let y = match state {
            Some(st) if self.stage == last && !self.mirror => {
                let start = Instant::now();
                let y = self.model.end(st)?;
                y.device().synchronize()?;
                compute += start.elapsed().as_secs_f64();
                Some(y)
            }
            _ => None,
        };
        self.compute_seconds = compute;
        Ok(y)
    }

    /// Fills the cache from an exact banded step (stages x bands): `kept` is this rank's band
    /// of every module's output ([`crate::strategy::patch::BandStep::step_keeping_outputs`])
    /// and `group` its band group, in band order, every rank of which runs a stage of this
    /// plan. Each rank collects from the others of its group their bands of the outputs its
    /// own stage computes and other stages read, and joins them along the model's band
    /// dimension ([`Denoiser::band_dim`]); every other output is a stand-in of the whole
    /// image's shape (the module-reads contract: only carried along until its owner sends
    /// it). So one exact step's work, split `W` ways, fills the pipeline, where the
    /// reference's fill runs the whole denoiser on every rank.
    pub fn fill_from_bands(
        &mut self,
        comm: &mut dyn Communicator,
        group: &hybridiff_comm::Group,
        kept: Vec<Vec<Tensor>>,
    ) -> Result<()> {
        let me = comm.rank();
        let modules = self.plan.owner.len();
        if kept.len() != modules {
            return Err(Error::Options(format!(
                "a banded step kept {} module outputs, the plan has {modules} modules",
                kept.len()
            )));
        }
        let read: BTreeSet<OutputRef> = self
            .ranks
            .all()
            .flat_map(|r| self.needs_of_rank(r).iter().copied())
            .collect();
        let owned_read = |rank: usize| -> Vec<OutputRef> {
            match self.ranks.stage_of(rank) {
                Some((stage, false)) => read
                    .iter()
                    .filter(|r| self.plan.owner[r.module] == stage)
                    .copied()
                    .collect(),
                _ => Vec::new(),
            }
        };
        let outputs: Vec<OutputRef> = (0..modules)
            .flat_map(|module| {
                (0..kept[module].len()).map(move |index| OutputRef { module, index })
            })
            .collect();
        // Every band's extent along the band dimension of every output, for the stand-ins.
        let extent: Vec<i64> = outputs
            .iter()
            .map(|r| match self.model.band_dim(r.module, r.index) {
                Some(d) => kept[r.module][r.index].dim(d).map(|v| v as i64),
                None => Ok(-1),
            })
            .collect::<candle_core::Result<_>>()?;
        let extents = comm.all_gather_in(
            group,
            &Tensor::new(extent.as_slice(), &candle_core::Device::Cpu)?,
        )?;
        let extents: Vec<Vec<i64>> = extents
            .iter()
            .map(|t| t.to_vec1::<i64>())
            .collect::<candle_core::Result<_>>()?;
        let before = crate::strategy::Sent::so_far(comm);
        for &q in group.ranks().iter().filter(|&&q| q != me) {
            for r in owned_read(q) {
                if self.model.band_dim(r.module, r.index).is_some() {
                    comm.send(&kept[r.module][r.index].contiguous()?, q)?;
                }
            }
        }
        let mine: BTreeSet<OutputRef> = owned_read(me).into_iter().collect();
        let mut cache: Vec<Vec<Tensor>> = Vec::with_capacity(modules);
        for (k, r) in outputs.iter().enumerate() {
            if r.index == 0 {
                cache.push(Vec::with_capacity(kept[r.module].len()));
            }
            let piece = &kept[r.module][r.index];
            let whole = match self.model.band_dim(r.module, r.index) {
                None => piece.clone(),
                Some(d) if mine.contains(r) => {
                    let mut parts = Vec::with_capacity(group.len());
                    for &q in group.ranks() {
                        parts.push(if q == me {
                            piece.clone()
                        } else {
                            comm.recv(q)?
                        });
                    }
                    Tensor::cat(&parts, d)?
                }
                Some(d) => {
                    let mut dims = piece.dims().to_vec();
                    dims[d] = extents.iter().map(|e| e[k].max(0) as usize).sum();
                    Tensor::zeros((), piece.dtype(), piece.device())?.broadcast_as(dims)?
                }
            };
            cache.last_mut().expect("pushed above").push(whole);
        }
        self.cache = cache;
        self.exchanged = crate::strategy::Sent::so_far(comm).since(before);
        Ok(())
    }

    /// Sends this rank's cached outputs that other stages read, and receives the ones it
    /// reads from their owners: the start of a pipelined step.
    pub fn exchange(&mut self, comm: &mut dyn Communicator) -> Result<()> {
        let before = crate::strategy::Sent::so_far(comm);
        let me = comm.rank();
        if !self.mirror {
            let receivers: Vec<usize> = self.ranks.all().filter(|&r| r != me).collect();
            for dst in receivers {
                for r in self
                    .needs_of_rank(dst)
                    .iter()
                    .filter(|r| self.plan.owner[r.module] == self.stage)
                {
                    comm.send(&self.cache[r.module][r.index], dst)?;
                }
            }
        }
        for r in self.needs[self.stage].clone() {
            let src = self.ranks.owners[self.plan.owner[r.module]];
            self.cache[r.module][r.index] = comm.recv(src)?;
        }
        self.exchanged = crate::strategy::Sent::so_far(comm).since(before);
        Ok(())
    }

    /// A pipelined forward: own modules compute and refresh their cache, the others
    /// return the cached (owner's, one step old) output. Returns this rank's output.
    pub fn pipelined(&mut self, x: &Tensor, t: f64, cond: &Conditioning) -> Result<Tensor> {
        let start = Instant::now();
        let mut state = self.model.begin(x, t, cond)?;
        for m in 0..self.plan.owner.len() {
            let out = if self.plan.owner[m] == self.stage {
                let out = self.model.run_module(m, &state)?;
                self.cache[m] = out.clone();
                out
            } else {
                self.cache[m].clone()
            };
            self.model.apply_module(m, &mut state, out)?;
        }
        let y = self.model.end(state)?;
        // A GPU runs queued kernels after the calls return: wait for them before the clock.
        y.device().synchronize()?;
        self.compute_seconds = start.elapsed().as_secs_f64();
        Ok(y)
    }

    /// A whole pipelined step: exchange, this rank's stage, and the last stage's output
    /// given to every rank. Returns the prediction and, on rank 0, how many more bytes the
    /// reference's exchange would have sent (0 elsewhere).
    pub fn pipelined_step(
        &mut self,
        comm: &mut dyn Communicator,
        x: &Tensor,
        t: f64,
        cond: &Conditioning,
    ) -> Result<(Tensor, u64)> {
        let extra = self.reference_extra(comm.rank());
        self.exchange(comm)?;
        let y = self.pipelined(x, t, cond)?;
        Ok((self.from_last_stage(comm, &y)?, extra))
    }

    /// On rank 0, how many more bytes the reference's exchange would send than ours (0
    /// elsewhere, so the step's sum counts it once).
    pub fn reference_extra(&self, rank: usize) -> u64 {
        if rank == 0 {
            self.reference_exchange_bytes()
                .saturating_sub(self.exchange_bytes())
        } else {
            0
        }
    }

    /// The last stage's `y` on every rank of the world.
    pub fn from_last_stage(&self, comm: &mut dyn Communicator, y: &Tensor) -> Result<Tensor> {
        let root = self.last_stage_rank();
        Ok(comm.broadcast((comm.rank() == root).then_some(y), root)?)
    }

    /// Bytes one pipelined step's exchange sends in all (every rank together).
    pub fn exchange_bytes(&self) -> u64 {
        self.ranks
            .all()
            .flat_map(|r| self.needs_of_rank(r).iter())
            .map(|r| tensor_bytes(&self.cache[r.module][r.index]))
            .sum()
    }

    /// Bytes the reference's exchange would send: every module's cached outputs from its
    /// owner to every other rank.
    pub fn reference_exchange_bytes(&self) -> u64 {
        let per_copy: u64 = self.cache.iter().flatten().map(tensor_bytes).sum();
        per_copy * (self.ranks.all().count() as u64 - 1)
    }
}
