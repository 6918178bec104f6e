//! The search behind `hybridiff tune`, without I/O: the grid of Hybridiff's switching
//! parameters and run knobs, the schedule each candidate gives an input (prompt and seed)
//! predicted from serial's rel-MAE curve without running it, the distinct runs that cover
//! the whole grid, a latency model of a schedule, and the choice (the fastest candidate that
//! meets a quality floor) with its Pareto front.
//!
//! Why a schedule can be predicted: Hybridiff decides `tau1` only from the rel-MAE of its
//! exact warm-up steps ([`crate::switch::Switcher`]), and until `tau1` is known every step is
//! exact, with the inputs and per-branch predictions of serial (a branch predicts the same on
//! its own rank as inside serial's batch of two; see ARCHITECTURE.md). Feeding serial's curve
//! to the same `Switcher` therefore gives the run's `tau1`, `tau2` and the step at which
//! `tau1` was decided, hence which steps it pipelines. Candidates that give an input the same
//! pipelined steps and the same knobs make the same run, so one run serves them all; the run
//! itself uses one of those candidates' own parameters (its `representative`), through the
//! unchanged switching code, and `tune` checks that it took the predicted schedule.
//!
//! This answers the paper's second limitation (L, eps, k and tau_cap tuned by hand per model;
//! arXiv 2602.21760, "Limitations" and "Future work").

use std::collections::HashMap;

use crate::cache::CacheSpec;
use crate::latency::{Link, RankCost, StepCost};
use crate::stages::PlanKind;
use crate::strategy::hybrid::PipelineLayout;
use crate::strategy::PipelinedGuidance;
use crate::switch::{PartialSwitch, SwitchParams, Switcher};
use crate::trace::{StepMode, Trace};
use crate::{Error, Result};

/// The run knobs besides the switching thresholds. A new knob is a field here: it then joins
/// the grid ([`Grid::knobs`]), the run key (two candidates share a run only when their
/// knobs are equal), the report and `hybridiff.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Knobs {
    /// `--stages`: how the pipelined steps' stages are planned.
    pub stages: PlanKind,
    /// `--pipelined-guidance`: the prediction of pipelined steps.
    pub pipelined_guidance: PipelinedGuidance,
    /// `--pipeline-layout`: the pipelined steps' rank layout (`None`: the default at the
    /// run's world size).
    pub pipeline_layout: Option<PipelineLayout>,
    /// `--cache`: a step cache on top of the schedule (`None`: off). Hybridiff's detection
    /// steps compute whatever the cache ([`crate::strategy::Worker::detecting`]), so a
    /// cached run keeps the schedule predicted from serial's curve.
    pub cache: Option<CacheKnob>,
}

impl std::fmt::Display for Knobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stages {}, pipelined guidance {}",
            self.stages, self.pipelined_guidance
        )?;
        if let Some(l) = self.pipeline_layout {
            write!(f, ", layout {l}")?;
        }
        match self.cache {
            Some(c) => write!(f, ", cache {}", c.0),
            None => Ok(()),
        }
    }
}

impl Default for Knobs {
    /// The default stage plan, unguided pipelined steps, the default layout, no cache.
    fn default() -> Self {
        Self {
            stages: PlanKind::Default,
            pipelined_guidance: PipelinedGuidance::None,
            pipeline_layout: None,
            cache: None,
        }
    }
}

/// A step cache as a knob: a [`CacheSpec`] with the equality, hash and order a run key
/// needs (a threshold compared by its bits: tune's values are parsed, never computed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheKnob(pub CacheSpec);

impl CacheKnob {
    fn key(&self) -> (u8, [u64; 3]) {
        match self.0 {
            CacheSpec::DeepCache {
                interval,
                branch,
                warmup,
            } => (0, [interval as u64, branch as u64, warmup as u64]),
            CacheSpec::TeaCache { threshold, warmup } => {
                (1, [threshold.to_bits(), warmup as u64, 0])
            }
        }
    }
}

impl Eq for CacheKnob {}

impl std::hash::Hash for CacheKnob {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialOrd for CacheKnob {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for CacheKnob {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// The values `tune` tries for a cache method's speed knob when `--cache METHOD` leaves it
/// out: teacache's threshold (raw relative L1, as `docs/benchmarks/cache.md` measured it)
/// and deepcache's interval.
pub fn cache_sweep(spec: CacheSpec) -> Vec<CacheSpec> {
    match spec {
        CacheSpec::TeaCache { warmup, .. } => [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
            .into_iter()
            .map(|threshold| CacheSpec::TeaCache { threshold, warmup })
            .collect(),
        CacheSpec::DeepCache { branch, warmup, .. } => (2..=5)
            .map(|interval| CacheSpec::DeepCache {
                interval,
                branch,
                warmup,
            })
            .collect(),
    }
}

/// One point of the grid: switching thresholds and knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub switch: SwitchParams,
    pub knobs: Knobs,
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.switch;
        write!(
            f,
            "L {} eps {:.1e} k {} tau_cap {} ({})",
            p.l_slope, p.eps_slope, p.k, p.tau_cap, self.knobs
        )
    }
}

/// The values each parameter takes; candidates are every combination that fits the steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub l_slope: Vec<usize>,
    pub eps_slope: Vec<f64>,
    pub k: Vec<usize>,
    pub tau_cap: Vec<usize>,
    pub knobs: Vec<Knobs>,
}

fn dedup_sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

impl Grid {
    /// The default grid for a run of `steps` steps: L in {2, 3, 4, 6, 8, 12} (below `steps`),
    /// eps from 1e-4 to 1.6e-2 in about doublings (the paper's SDXL value, 0.4e-3 at 50
    /// steps, and the default model's, 4e-3 at 20, lie inside), k at 10, 15, 25 and 35% of
    /// the steps, tau_cap at 30, 45, 60 and 75% of them, the default stage plan, and both
    /// pipelined-guidance modes.
    pub fn default_for(steps: usize) -> Self {
        let frac = |f: f64| ((steps as f64 * f).round() as usize).max(1);
        Self {
            l_slope: [2, 3, 4, 6, 8, 12]
                .into_iter()
                .filter(|&l| l < steps.max(3))
                .collect(),
            eps_slope: vec![1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
            k: dedup_sorted([0.1, 0.15, 0.25, 0.35].map(frac).to_vec()),
            tau_cap: dedup_sorted([0.3, 0.45, 0.6, 0.75].map(frac).to_vec()),
            knobs: [PipelinedGuidance::None, PipelinedGuidance::Reuse]
                .into_iter()
                .map(|g| Knobs {
                    pipelined_guidance: g,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// Every combination, whether or not it fits a step count.
    pub fn size(&self) -> usize {
        self.l_slope.len()
            * self.eps_slope.len()
            * self.k.len()
            * self.tau_cap.len()
            * self.knobs.len()
    }

    /// Refuses an empty list or a value outside its domain, naming the flag.
    pub fn check(&self) -> Result<()> {
        for (flag, empty) in [
            ("--l-slope", self.l_slope.is_empty()),
            ("--eps-slope", self.eps_slope.is_empty()),
            ("--k", self.k.is_empty()),
            ("--tau-cap", self.tau_cap.is_empty()),
            (
                "--stages / --pipelined-guidance / --pipeline-layout / --cache",
                self.knobs.is_empty(),
            ),
        ] {
            if empty {
                return Err(Error::Options(format!(
                    "{flag}: the grid needs at least one value"
                )));
            }
        }
        for &l in &self.l_slope {
            PartialSwitch {
                l_slope: Some(l),
                ..Default::default()
            }
            .check_domains(None)?;
        }
        for &e in &self.eps_slope {
            PartialSwitch {
                eps_slope: Some(e),
                ..Default::default()
            }
            .check_domains(None)?;
        }
        for &k in &self.k {
            PartialSwitch {
                k: Some(k),
                ..Default::default()
            }
            .check_domains(None)?;
        }
        for &c in &self.tau_cap {
            PartialSwitch {
                tau_cap: Some(c),
                ..Default::default()
            }
            .check_domains(None)?;
        }
        Ok(())
    }

    /// The combinations that fit `steps` ([`SwitchParams::check`]: `tau_cap + k <= steps`),
    /// and how many did not.
    pub fn candidates(&self, steps: usize) -> (Vec<Candidate>, usize) {
        let mut out = Vec::new();
        let mut skipped = 0;
        for &knobs in &self.knobs {
            for &k in &self.k {
                for &tau_cap in &self.tau_cap {
                    for &l_slope in &self.l_slope {
                        for &eps_slope in &self.eps_slope {
                            let switch = SwitchParams {
                                l_slope,
                                eps_slope,
                                k,
                                tau_cap,
                            };
                            if switch.check(steps).is_ok() {
                                out.push(Candidate { switch, knobs });
                            } else {
                                skipped += 1;
                            }
                        }
                    }
                }
            }
        }
        (out, skipped)
    }
}

/// When a hybrid run switches: `tau1`, `tau2` and the step at whose end `tau1` became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Schedule {
    pub tau1: usize,
    pub tau2: usize,
    pub decided_at: usize,
}

impl Schedule {
    /// The first and last pipelined step of a run of `steps` steps (the first fills the
    /// stage caches): `max(tau1, decided_at + 1) ..= min(tau2, steps - 1)`, the rule of
    /// [`Switcher::phase`]; `None` when that is empty.
    pub fn pipelined(&self, steps: usize) -> Option<(usize, usize)> {
        let first = self.tau1.max(self.decided_at + 1);
        let last = self.tau2.min(steps.checked_sub(1)?);
        (first <= last).then_some((first, last))
    }

    /// Whether `tau1` came from the `tau_cap` fallback (no flattening seen before it).
    pub fn fallback(&self) -> bool {
        self.tau1 > self.decided_at
    }

    /// The schedule a finished run's trace records, if it switched.
    pub fn of_trace(trace: &Trace) -> Option<Self> {
        let (tau1, tau2) = (trace.tau1?, trace.tau2?);
        let decided_at = trace.steps.iter().position(|s| s.tau1.is_some())?;
        Some(Self {
            tau1,
            tau2,
            decided_at,
        })
    }
}

/// The mode of step `i` of a run of `steps` steps that pipelines `pipelined`.
pub fn step_mode(i: usize, pipelined: Option<(usize, usize)>) -> StepMode {
    match pipelined {
        Some((first, _)) if i == first => StepMode::Fill,
        Some((first, last)) if i > first && i <= last => StepMode::Pipelined,
        _ => StepMode::Exact,
    }
}

/// The schedule of a hybrid run with `params` whose exact steps have the rel-MAE values
/// `curve` (serial's curve of the same input: equal up to the decision, see the module
/// docs). `None` when `tau1` is not decided within the curve (a curve shorter than
/// `tau_cap`).
pub fn predict_schedule(curve: &[f64], params: SwitchParams) -> Option<Schedule> {
    let mut s = Switcher::new(params);
    for (i, &m) in curve.iter().enumerate() {
        s.record(i, m);
        if s.tau1.is_some() {
            break;
        }
    }
    Some(Schedule {
        tau1: s.tau1?,
        tau2: s.tau2?,
        decided_at: s.decided_at()?,
    })
}

/// One hybrid run to make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSpec {
    /// Which input (prompt and seed) it denoises.
    pub input: usize,
    /// The predicted schedule of its representative.
    pub schedule: Schedule,
    /// First and last pipelined step.
    pub pipelined: (usize, usize),
    pub knobs: Knobs,
    /// A candidate whose own parameters give this schedule on this input; the run is made
    /// with them.
    pub representative: usize,
}

/// The candidates and the runs that cover them.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: usize,
    pub candidates: Vec<Candidate>,
    /// Grid points that did not fit the steps.
    pub skipped: usize,
    pub runs: Vec<RunSpec>,
    /// `run_of[c][i]`: the run that candidate `c` makes on input `i`.
    pub run_of: Vec<Vec<usize>>,
}

impl Plan {
    /// Plans the runs of `grid` for inputs whose serial rel-MAE curves are `curves`
    /// (index = input), `steps` steps each.
    ///
    /// # Errors
    /// No grid point fits `steps` (too few steps for any `k` and `tau_cap`), naming the
    /// smallest step count that would fit one; or a curve shorter than `steps`.
    pub fn new(grid: &Grid, curves: &[Vec<f64>], steps: usize) -> Result<Self> {
        grid.check()?;
        let (candidates, skipped) = grid.candidates(steps);
        if candidates.is_empty() {
            let need = grid.k.iter().min().copied().unwrap_or(1)
                + grid.tau_cap.iter().min().copied().unwrap_or(1);
            return Err(Error::Options(format!(
                "--steps {steps}: no candidate fits (every one needs tau_cap + k <= steps, and hybrid at least 2 steps); the smallest --k and --tau-cap of the grid need --steps {} or more, or give smaller --k / --tau-cap values",
                need.max(2)
            )));
        }
        if let Some((i, c)) = curves.iter().enumerate().find(|(_, c)| c.len() < steps) {
            return Err(Error::Input(format!(
                "input {i}: serial's rel-MAE curve has {} values, expected {steps}",
                c.len()
            )));
        }
        let mut runs: Vec<RunSpec> = Vec::new();
        let mut key_to_run: HashMap<(usize, (usize, usize), Knobs), usize> = HashMap::new();
        let mut run_of = vec![Vec::with_capacity(curves.len()); candidates.len()];
        for (input, curve) in curves.iter().enumerate() {
            for (ci, c) in candidates.iter().enumerate() {
                let schedule = predict_schedule(&curve[..steps], c.switch).ok_or_else(|| {
                    Error::Options(format!(
                        "{c}: tau1 is not decided within {steps} steps (tau_cap beyond the steps)"
                    ))
                })?;
                let pipelined = schedule.pipelined(steps).ok_or_else(|| {
                    Error::Options(format!("{c}: no step would be pipelined in {steps} steps"))
                })?;
                let key = (input, pipelined, c.knobs);
                let run = *key_to_run.entry(key).or_insert_with(|| {
                    runs.push(RunSpec {
                        input,
                        schedule,
                        pipelined,
                        knobs: c.knobs,
                        representative: ci,
                    });
                    runs.len() - 1
                });
                run_of[ci].push(run);
            }
        }
        Ok(Self {
            steps,
            candidates,
            skipped,
            runs,
            run_of,
        })
    }

    /// Runs a full evaluation of the grid would make: every candidate on every input.
    pub fn grid_runs(&self) -> usize {
        self.candidates.len() * self.run_of.first().map_or(0, Vec::len)
    }
}

/// The median per-rank cost of each kind of step, measured from traces, to predict the
/// latency of any schedule (`tune`'s latency model; [`crate::latency`] adds the link).
#[derive(Debug, Clone, PartialEq)]
pub struct StepCosts {
    pub exact: StepCost,
    pub fill: Option<StepCost>,
    pub pipelined: Option<StepCost>,
    /// Steps the step cache marked cached (`--cache`), by mode; `None` where none was
    /// measured. (A cached fill step of a module-level cache still computes; one of a
    /// whole-prediction cache is skipped whole.)
    pub exact_cached: Option<StepCost>,
    pub fill_cached: Option<StepCost>,
    pub pipelined_cached: Option<StepCost>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Per rank, the median of each field; the chaining of the first step (steps of one mode
/// in one layout chain alike).
fn median_cost(steps: &[StepCost]) -> Option<StepCost> {
    let first = steps.first()?;
    let ranks = first.ranks.len();
    Some(StepCost {
        chain_groups: first.chain_groups,
        ranks: (0..ranks)
            .map(|r| {
                let field = |f: &dyn Fn(&RankCost) -> f64| {
                    median(steps.iter().filter_map(|s| s.ranks.get(r)).map(f).collect())
                };
                RankCost {
                    compute_seconds: field(&|c| c.compute_seconds),
                    flops: field(&|c| c.flops),
                    bytes: field(&|c| c.bytes as f64).round() as u64,
                    messages: field(&|c| c.messages as f64).round() as u64,
                    overlapped_bytes: field(&|c| c.overlapped_bytes as f64).round() as u64,
                    overlapped_messages: field(&|c| c.overlapped_messages as f64).round() as u64,
                }
            })
            .collect(),
    })
}

impl StepCosts {
    /// Medians over every step of `traces` (runs of one layout), by step mode and whether
    /// the step cache marked the step cached.
    ///
    /// # Errors
    /// No exact step in the traces, traces of different rank counts, or traces without
    /// per-rank counts ([`crate::latency::costs_of`]).
    pub fn measure(traces: &[&Trace]) -> Result<Self> {
        let mut by_mode: [Vec<StepCost>; 6] = Default::default();
        let mut ranks = None;
        for t in traces {
            let costs = crate::latency::costs_of(t)?;
            for (s, c) in t.steps.iter().zip(costs) {
                if *ranks.get_or_insert(c.ranks.len()) != c.ranks.len() {
                    return Err(Error::Input(format!(
                        "trace of {}: steps of {} ranks among steps of {}",
                        t.strategy,
                        c.ranks.len(),
                        ranks.unwrap_or(0)
                    )));
                }
                let m = match s.mode {
                    StepMode::Exact => 0,
                    StepMode::Fill => 1,
                    StepMode::Pipelined => 2,
                };
                by_mode[m + 3 * usize::from(s.cached())].push(c);
            }
        }
        let [exact, fill, pipelined, exact_cached, fill_cached, pipelined_cached] = by_mode;
        Ok(Self {
            exact: median_cost(&exact)
                .ok_or_else(|| Error::Input("no exact step in the traces".into()))?,
            fill: median_cost(&fill),
            pipelined: median_cost(&pipelined),
            exact_cached: median_cost(&exact_cached),
            fill_cached: median_cost(&fill_cached),
            pipelined_cached: median_cost(&pipelined_cached),
        })
    }

    /// The predicted seconds of a run of `steps` steps that pipelines `pipelined` (first,
    /// last), on `link`, every step computed.
    ///
    /// # Errors
    /// The schedule needs a fill or pipelined step and none was measured.
    pub fn predict(
        &self,
        steps: usize,
        pipelined: Option<(usize, usize)>,
        link: &Link,
    ) -> Result<f64> {
        let modes: Vec<StepMode> = (0..steps).map(|i| step_mode(i, pipelined)).collect();
        self.predict_modes(&modes, &[], link)
    }

    /// The predicted seconds of the run `trace` records, on `link`: its own step modes (a
    /// whole-prediction cache may move the fill) and cache decisions.
    ///
    /// # Errors
    /// As [`StepCosts::predict_modes`].
    pub fn predict_trace(&self, trace: &Trace, link: &Link) -> Result<f64> {
        let modes: Vec<StepMode> = trace.steps.iter().map(|s| s.mode).collect();
        let cached: Vec<bool> = trace.steps.iter().map(|s| s.cached()).collect();
        self.predict_modes(&modes, &cached, link)
    }

    /// The predicted seconds of a run whose steps have `modes` and `cached` decisions
    /// (missing entries: computed), on `link`. A cached step of a kind never measured
    /// cached costs what it costs computed.
    ///
    /// # Errors
    /// A fill or pipelined step and none was measured.
    pub fn predict_modes(&self, modes: &[StepMode], cached: &[bool], link: &Link) -> Result<f64> {
        let mut run = Vec::with_capacity(modes.len());
        for (i, &mode) in modes.iter().enumerate() {
            let skipped = cached.get(i).copied().unwrap_or(false);
            let computed = match mode {
                StepMode::Exact => Some(&self.exact),
                StepMode::Fill => self.fill.as_ref(),
                StepMode::Pipelined => self.pipelined.as_ref(),
            };
            let cost = match (mode, skipped) {
                (_, false) => computed,
                (StepMode::Exact, true) => self.exact_cached.as_ref().or(computed),
                (StepMode::Fill, true) => self.fill_cached.as_ref().or(computed),
                (StepMode::Pipelined, true) => self.pipelined_cached.as_ref().or(computed),
            };
            run.push(
                cost.ok_or_else(|| {
                    Error::Input(format!(
                        "step {i} of the schedule is {mode:?} but no such step was measured"
                    ))
                })?
                .clone(),
            );
        }
        Ok(crate::latency::predict_with(&run, link, crate::latency::Compute::Measured).seconds)
    }
}

/// A link that costs nothing: the latency of ranks whose exchanges are free (in-process
/// threads), i.e. the slowest rank's compute per step.
pub fn free_link() -> Link {
    Link {
        name: "none (compute only)".into(),
        bytes_per_second: f64::INFINITY,
        seconds_per_message: 0.0,
    }
}

/// Quality of one run's output against serial's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Quality {
    /// PSNR in dB; infinite for identical outputs.
    pub psnr_db: f64,
    /// SSIM of the decoded images (`None` without a VAE).
    pub ssim: Option<f64>,
    /// LPIPS distance of the decoded images (`None` without LPIPS weights).
    pub lpips: Option<f64>,
}

/// PSNR above this counts as this (identical outputs have infinite PSNR) in means and plots.
pub const PSNR_CAP_DB: f64 = 100.0;

/// The quality floor every chosen candidate must meet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Floor {
    /// `--min-psnr DB`.
    MinPsnr(f64),
    /// `--min-ssim S`.
    MinSsim(f64),
    /// `--max-lpips D`.
    MaxLpips(f64),
}

impl Floor {
    /// The floor's metric of `q` (PSNR capped at [`PSNR_CAP_DB`]); `None` when `q` lacks it.
    pub fn value(&self, q: &Quality) -> Option<f64> {
        match self {
            Self::MinPsnr(_) => Some(q.psnr_db.min(PSNR_CAP_DB)),
            Self::MinSsim(_) => q.ssim,
            Self::MaxLpips(_) => q.lpips,
        }
    }

    /// Whether `v` meets the floor.
    pub fn meets(&self, v: f64) -> bool {
        match *self {
            Self::MinPsnr(f) | Self::MinSsim(f) => v >= f,
            Self::MaxLpips(f) => v <= f,
        }
    }

    /// Whether `a` is better quality than `b`.
    pub fn better(&self, a: f64, b: f64) -> bool {
        match self {
            Self::MaxLpips(_) => a < b,
            _ => a > b,
        }
    }

    /// The metric's name for tables.
    pub fn metric(&self) -> &'static str {
        match self {
            Self::MinPsnr(_) => "PSNR (dB)",
            Self::MinSsim(_) => "SSIM",
            Self::MaxLpips(_) => "LPIPS",
        }
    }

    /// The flag as the user gave it.
    pub fn flag(&self) -> String {
        match self {
            Self::MinPsnr(v) => format!("--min-psnr {v}"),
            Self::MinSsim(v) => format!("--min-ssim {v}"),
            Self::MaxLpips(v) => format!("--max-lpips {v}"),
        }
    }
}

/// How the floor is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorOn {
    /// Every input must meet it (the default).
    Every,
    /// The mean over inputs must meet it.
    Average,
}

/// One candidate's results.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The floor's metric on each input.
    pub values: Vec<f64>,
    /// The worst value and its input.
    pub worst: f64,
    pub worst_input: usize,
    pub mean: f64,
    /// Mean predicted seconds over the inputs.
    pub seconds: f64,
    /// Serial's predicted seconds / `seconds`.
    pub speedup: f64,
    pub meets: bool,
    /// Candidates with the same runs on every input share a class (and every result).
    pub class: usize,
}

impl Evaluation {
    /// The value the floor is applied to: the worst input's, or the mean.
    pub fn scored(&self, on: FloorOn) -> f64 {
        match on {
            FloorOn::Every => self.worst,
            FloorOn::Average => self.mean,
        }
    }
}

/// The search's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub evaluations: Vec<Evaluation>,
    /// Each class's members (candidate indices, in grid order).
    pub classes: Vec<Vec<usize>>,
    /// Whether each class is on the Pareto front of (seconds, scored quality).
    pub on_front: Vec<bool>,
    /// The chosen candidate, if any meets the floor.
    pub chosen: Option<usize>,
}

/// Scores every candidate of `plan` from each run's quality (`run_quality`, index = run)
/// and predicted seconds (`run_seconds`), against serial's predicted seconds, and chooses
/// the fastest candidate that meets `floor` (`on` every input, or on average). Ties go to
/// better scored quality, then better mean; within a class (candidates with identical runs)
/// to its middle member by (L, eps, tau_cap), whose neighbours on either side give the
/// same schedules, so a prompt whose curve differs slightly is least likely to change it.
///
/// # Errors
/// A run's quality without the floor's metric (e.g. `--max-lpips` without LPIPS values).
pub fn evaluate(
    plan: &Plan,
    run_quality: &[Quality],
    run_seconds: &[f64],
    serial_seconds: f64,
    floor: Floor,
    on: FloorOn,
) -> Result<Outcome> {
    let mut class_of_runs: HashMap<&[usize], usize> = HashMap::new();
    let mut classes: Vec<Vec<usize>> = Vec::new();
    let mut evaluations = Vec::with_capacity(plan.candidates.len());
    for (ci, runs) in plan.run_of.iter().enumerate() {
        let values = runs
            .iter()
            .map(|&r| {
                floor.value(&run_quality[r]).ok_or_else(|| {
                    Error::Options(format!(
                        "{}: the runs were measured without {}",
                        floor.flag(),
                        floor.metric()
                    ))
                })
            })
            .collect::<Result<Vec<f64>>>()?;
        let n = values.len().max(1) as f64;
        let mut worst_input = 0;
        for (i, v) in values.iter().enumerate() {
            if floor.better(values[worst_input], *v) {
                worst_input = i;
            }
        }
        let worst = values.get(worst_input).copied().unwrap_or(f64::NAN);
        let mean = values.iter().sum::<f64>() / n;
        let seconds = runs.iter().map(|&r| run_seconds[r]).sum::<f64>() / n;
        let next = classes.len();
        let class = *class_of_runs.entry(runs.as_slice()).or_insert(next);
        if class == classes.len() {
            classes.push(Vec::new());
        }
        classes[class].push(ci);
        let scored = match on {
            FloorOn::Every => worst,
            FloorOn::Average => mean,
        };
        evaluations.push(Evaluation {
            meets: floor.meets(scored),
            values,
            worst,
            worst_input,
            mean,
            seconds,
            speedup: serial_seconds / seconds,
            class,
        });
    }
    // The front over classes (members of a class share every number).
    let head: Vec<&Evaluation> = classes.iter().map(|m| &evaluations[m[0]]).collect();
    let on_front: Vec<bool> = head
        .iter()
        .map(|a| {
            !head.iter().any(|b| {
                let (qa, qb) = (a.scored(on), b.scored(on));
                let faster = seconds_order(b.seconds, a.seconds);
                let no_worse = faster.is_le() && !floor.better(qa, qb);
                let strictly = faster.is_lt() || floor.better(qb, qa);
                no_worse && strictly
            })
        })
        .collect();
    let best_class = (0..classes.len())
        .filter(|&c| head[c].meets)
        .min_by(|&a, &b| {
            let (x, y) = (head[a], head[b]);
            seconds_order(x.seconds, y.seconds)
                .then_with(|| order(floor, y.scored(on), x.scored(on)))
                .then_with(|| order(floor, y.mean, x.mean))
                .then(a.cmp(&b))
        });
    let chosen = best_class.map(|c| {
        let mut members = classes[c].clone();
        members.sort_by(|&a, &b| {
            let (p, q) = (plan.candidates[a].switch, plan.candidates[b].switch);
            (p.l_slope, p.tau_cap)
                .cmp(&(q.l_slope, q.tau_cap))
                .then(p.eps_slope.total_cmp(&q.eps_slope))
        });
        members[members.len() / 2]
    });
    Ok(Outcome {
        evaluations,
        classes,
        on_front,
        chosen,
    })
}

/// Predicted seconds compared with a relative tolerance of 1e-9: schedules with the same
/// numbers of exact, fill and pipelined steps cost the same, and only the order of the sum
/// differs.
fn seconds_order(a: f64, b: f64) -> std::cmp::Ordering {
    if (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) {
        std::cmp::Ordering::Equal
    } else {
        a.total_cmp(&b)
    }
}

/// `Less` when `a` is better than `b` under `floor`.
fn order(floor: Floor, a: f64, b: f64) -> std::cmp::Ordering {
    if floor.better(a, b) {
        std::cmp::Ordering::Greater
    } else if floor.better(b, a) {
        std::cmp::Ordering::Less
    } else {
        std::cmp::Ordering::Equal
    }
}

/// Why no candidate met the floor: the best score reached, by which candidate, and the
/// input where that candidate is worst.
pub fn best_reached(outcome: &Outcome, on: FloorOn, floor: Floor) -> Option<(usize, f64, usize)> {
    let mut best: Option<usize> = None;
    for (i, e) in outcome.evaluations.iter().enumerate() {
        match best {
            Some(b) if !floor.better(e.scored(on), outcome.evaluations[b].scored(on)) => {}
            _ => best = Some(i),
        }
    }
    best.map(|b| {
        let e = &outcome.evaluations[b];
        (b, e.scored(on), e.worst_input)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(l: usize, eps: f64, k: usize, cap: usize) -> SwitchParams {
        SwitchParams {
            l_slope: l,
            eps_slope: eps,
            k,
            tau_cap: cap,
        }
    }

    /// A falling curve that flattens after step 8.
    fn curve(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| {
                if i < 8 {
                    0.5 - 0.05 * i as f64
                } else {
                    0.1 - 0.0001 * i as f64
                }
            })
            .collect()
    }

    #[test]
    fn predicted_schedule_is_the_switchers_and_the_phase_rule() {
        let c = curve(20);
        // Detection: the slope over L = 2 first drops below 1e-3 at step 9.
        let s = predict_schedule(&c, params(2, 1e-3, 4, 15)).unwrap();
        assert_eq!(
            s,
            Schedule {
                tau1: 9,
                tau2: 13,
                decided_at: 9
            }
        );
        assert!(!s.fallback());
        assert_eq!(s.pipelined(20), Some((10, 13)));
        // Fallback: nothing flat enough, tau1 = tau_cap, decided one step before.
        let s = predict_schedule(&c, params(2, 1e-9, 4, 6)).unwrap();
        assert_eq!(
            s,
            Schedule {
                tau1: 6,
                tau2: 10,
                decided_at: 5
            }
        );
        assert!(s.fallback());
        assert_eq!(s.pipelined(20), Some((6, 10)));
        // The run's phases are the Switcher's.
        let mut sw = Switcher::new(params(2, 1e-3, 4, 15));
        let mut modes = Vec::new();
        for (i, m) in c.iter().enumerate() {
            let phase = sw.phase(i);
            modes.push(phase == crate::switch::Phase::Pipelined);
            sw.record(i, if modes[i] { 0.0 } else { *m });
        }
        let p = predict_schedule(&c, params(2, 1e-3, 4, 15))
            .unwrap()
            .pipelined(20);
        for (i, pipelined) in modes.iter().enumerate() {
            assert_eq!(*pipelined, step_mode(i, p) != StepMode::Exact, "step {i}");
        }
        // The tail is clamped to the steps.
        let s = Schedule {
            tau1: 17,
            tau2: 20,
            decided_at: 16,
        };
        assert_eq!(s.pipelined(20), Some((17, 19)));
    }

    #[test]
    fn the_plan_makes_one_run_per_distinct_schedule_and_knobs() {
        let grid = Grid {
            l_slope: vec![2, 3],
            eps_slope: vec![1e-9, 1e-3, 1e-2],
            k: vec![3, 4],
            tau_cap: vec![6, 15, 18],
            knobs: vec![Knobs::default()],
        };
        let curves = vec![curve(20), curve(20)];
        let plan = Plan::new(&grid, &curves, 20).unwrap();
        // tau_cap 18 + k 3 or 4 > 20: skipped.
        assert_eq!(plan.skipped, 2 * 3 * 2);
        assert_eq!(plan.candidates.len(), 2 * 3 * 2 * 2);
        assert_eq!(plan.grid_runs(), plan.candidates.len() * 2);
        assert!(
            plan.runs.len() < plan.grid_runs() / 2,
            "{}",
            plan.runs.len()
        );
        // Every candidate's run has its predicted pipelined steps, and the representative
        // predicts the same schedule.
        for (ci, c) in plan.candidates.iter().enumerate() {
            for (input, &r) in plan.run_of[ci].iter().enumerate() {
                let run = &plan.runs[r];
                assert_eq!(run.input, input);
                let own = predict_schedule(&curves[input], c.switch).unwrap();
                assert_eq!(own.pipelined(20), Some(run.pipelined));
                let rep = plan.candidates[run.representative].switch;
                assert_eq!(predict_schedule(&curves[input], rep).unwrap(), run.schedule);
            }
        }
        // Identical inputs: the second input's runs mirror the first's.
        let per_input = plan.runs.iter().filter(|r| r.input == 0).count();
        assert_eq!(per_input * 2, plan.runs.len());
    }

    #[test]
    fn too_few_steps_and_bad_grids_are_refused_naming_the_flag() {
        let g = Grid::default_for(20);
        let err = Plan::new(
            &Grid {
                k: vec![5],
                tau_cap: vec![6],
                ..g.clone()
            },
            &[curve(8)],
            8,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--steps 8") && err.contains("--steps 11"),
            "{err}"
        );
        let err = Plan::new(
            &Grid {
                k: vec![],
                ..g.clone()
            },
            &[curve(20)],
            20,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--k:"), "{err}");
        let err = Plan::new(
            &Grid {
                l_slope: vec![1],
                ..g
            },
            &[curve(20)],
            20,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--l-slope 1"), "{err}");
    }

    #[test]
    fn default_grids_fit_their_steps() {
        for steps in [8, 20, 50] {
            let g = Grid::default_for(steps);
            let (c, _) = g.candidates(steps);
            assert!(!c.is_empty(), "{steps}");
            assert!(g.k.iter().all(|&k| k >= 1 && k < steps));
        }
        let g = Grid::default_for(50);
        assert_eq!(g.k, vec![5, 8, 13, 18]);
        assert_eq!(g.tau_cap, vec![15, 23, 30, 38]);
    }

    fn side_by_side(ranks: Vec<RankCost>) -> StepCost {
        StepCost {
            ranks,
            chain_groups: 0,
        }
    }

    fn rank(c: f64) -> RankCost {
        RankCost {
            compute_seconds: c,
            ..Default::default()
        }
    }

    #[test]
    fn latency_of_a_schedule_adds_its_steps_costs() {
        let costs = StepCosts {
            exact: side_by_side(vec![rank(1.0), rank(1.0)]),
            fill: Some(side_by_side(vec![rank(2.0), rank(2.0)])),
            pipelined: Some(side_by_side(vec![rank(0.5), rank(0.6)])),
            exact_cached: None,
            fill_cached: None,
            pipelined_cached: None,
        };
        let l = free_link();
        assert_eq!(costs.predict(10, None, &l).unwrap(), 10.0);
        // 6 exact, 1 fill, 3 pipelined (the slower rank sets each step).
        let s = costs.predict(10, Some((4, 7)), &l).unwrap();
        assert!((s - (6.0 + 2.0 + 3.0 * 0.6)).abs() < 1e-12, "{s}");
        // Cached steps: their own cost where measured, else the computed step's.
        let mut cached = vec![false; 10];
        for i in [1, 4, 5, 9] {
            cached[i] = true;
        }
        let modes: Vec<StepMode> = (0..10).map(|i| step_mode(i, Some((4, 7)))).collect();
        assert!((costs.predict_modes(&modes, &cached, &l).unwrap() - s).abs() < 1e-12);
        let with_cached = StepCosts {
            exact_cached: Some(side_by_side(vec![rank(0.1), rank(0.2)])),
            pipelined_cached: Some(side_by_side(vec![rank(0.05), rank(0.05)])),
            ..costs.clone()
        };
        let c = with_cached.predict_modes(&modes, &cached, &l).unwrap();
        let want = 4.0 + 2.0 * 0.2 + 2.0 + 2.0 * 0.6 + 0.05;
        assert!((c - want).abs() < 1e-12, "{c} vs {want}");
        // A fill skipped whole (a whole-prediction cache), and the fill it moved to the
        // next pipelined step (the modes of the run's trace).
        let skips_fill = StepCosts {
            fill_cached: Some(side_by_side(vec![rank(0.01), rank(0.01)])),
            ..with_cached.clone()
        };
        let c = skips_fill.predict_modes(&modes, &cached, &l).unwrap();
        assert!((c - (want - 2.0 + 0.01)).abs() < 1e-12, "{c}");
        let mut modes = modes;
        modes[4] = StepMode::Pipelined;
        modes[6] = StepMode::Fill;
        let c = skips_fill.predict_modes(&modes, &cached, &l).unwrap();
        let moved = 4.0 + 2.0 * 0.2 + 0.05 + 0.05 + 2.0 + 0.6;
        assert!((c - moved).abs() < 1e-12, "{c} vs {moved}");
        let none = StepCosts {
            pipelined: None,
            ..costs
        };
        assert!(none.predict(10, Some((4, 7)), &l).is_err());
        assert_eq!(none.predict(10, Some((4, 4)), &l).unwrap(), 9.0 + 2.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    fn plan_of(curves: usize, runs: &[&[usize]]) -> Plan {
        let c = Candidate {
            switch: params(2, 1e-3, 2, 4),
            knobs: Knobs::default(),
        };
        Plan {
            steps: 10,
            candidates: vec![c; runs.len()],
            skipped: 0,
            runs: Vec::new(),
            run_of: runs
                .iter()
                .map(|r| {
                    assert_eq!(r.len(), curves);
                    r.to_vec()
                })
                .collect(),
        }
    }

    fn q(psnr: f64) -> Quality {
        Quality {
            psnr_db: psnr,
            ssim: None,
            lpips: None,
        }
    }

    #[test]
    fn the_fastest_candidate_meeting_the_floor_on_every_input_is_chosen() {
        // Runs: 0..4 with these PSNRs and seconds.
        let quality = [q(40.0), q(31.0), q(35.0), q(28.0), q(f64::INFINITY)];
        let seconds = [5.0, 3.0, 4.0, 2.0, 10.0];
        // Candidate 0: runs 0, 2 (40, 35; 4.5 s); 1: runs 1, 2 (31, 35; 3.5 s);
        // 2: runs 3, 0 (28, 40; 3.5 s); 3: runs 4, 4 (identical; 10 s); 4 = 1 (same class).
        let plan = plan_of(2, &[&[0, 2], &[1, 2], &[3, 0], &[4, 4], &[1, 2]]);
        let floor = Floor::MinPsnr(30.0);
        let o = evaluate(&plan, &quality, &seconds, 10.0, floor, FloorOn::Every).unwrap();
        assert_eq!(o.classes, vec![vec![0], vec![1, 4], vec![2], vec![3]]);
        assert_eq!(o.chosen, Some(4), "class 1's middle member");
        assert_eq!(o.evaluations[1].worst, 31.0);
        assert_eq!(o.evaluations[2].worst_input, 0);
        assert_eq!(o.evaluations[3].worst, PSNR_CAP_DB);
        assert!((o.evaluations[1].speedup - 10.0 / 3.5).abs() < 1e-12);
        // Front: class 1 (3.5 s, 31) and class 2 (3.5 s, 28) -> 2 is dominated by 1; class 0
        // (4.5 s, 35) and class 3 (10 s, 100) are on it.
        assert_eq!(o.on_front, vec![true, true, false, true]);
        // Seconds equal up to the order of a sum tie, and quality decides.
        let near = [5.0, 3.0 + 1e-15, 4.0, 2.0, 10.0];
        let o = evaluate(&plan, &quality, &near, 10.0, floor, FloorOn::Every).unwrap();
        assert_eq!(o.chosen, Some(4));
        // On average, class 2 (mean 34) is as fast as class 1 (mean 33) and better.
        let o = evaluate(&plan, &quality, &seconds, 10.0, floor, FloorOn::Average).unwrap();
        assert_eq!(o.chosen, Some(2));
        // A floor nobody meets: none chosen; the best reached is class 3's.
        let hard = Floor::MinPsnr(200.0);
        let o = evaluate(&plan, &quality, &seconds, 10.0, hard, FloorOn::Every).unwrap();
        assert_eq!(o.chosen, None);
        let (c, v, _) = best_reached(&o, FloorOn::Every, hard).unwrap();
        assert_eq!((c, v), (3, PSNR_CAP_DB));
        // LPIPS: lower is better, and runs without it are an error naming the flag.
        let err = evaluate(
            &plan,
            &quality,
            &seconds,
            10.0,
            Floor::MaxLpips(0.1),
            FloorOn::Every,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--max-lpips 0.1"), "{err}");
        let lp = [0.05, 0.2, 0.1, 0.3, 0.0].map(|l| Quality {
            lpips: Some(l),
            ..q(30.0)
        });
        let o = evaluate(
            &plan,
            &lp,
            &seconds,
            10.0,
            Floor::MaxLpips(0.15),
            FloorOn::Every,
        )
        .unwrap();
        assert_eq!(o.chosen, Some(0));
        assert_eq!(o.evaluations[1].worst, 0.2);
    }
}
