//! The per-step record of a run, written as JSON by `--trace`.

use serde::{Deserialize, Serialize};

fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// How a step's prediction was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepMode {
    /// Computed exactly on current inputs (both CFG branches, or the conditional one
    /// when guidance is off).
    Exact,
    /// First pipelined step: every rank runs the whole denoiser to fill the caches.
    Fill,
    /// Stages run on one-step-stale inputs.
    Pipelined,
}

/// One step of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepTrace {
    pub index: usize,
    pub timestep: f64,
    pub mode: StepMode,
    /// `mean|eps_c - eps_u| / mean|eps_u|` (0 where one prediction stands for both).
    pub rel_mae: f64,
    /// Wall-clock seconds of the step on rank 0.
    pub wall_seconds: f64,
    /// Seconds each rank spent in denoiser compute during the step.
    pub rank_compute_seconds: Vec<f64>,
    /// FLOPs each rank computed during the step, counted where the denoiser was called
    /// (`engine/src/work.rs`).
    #[serde(default)]
    pub rank_flops: Vec<f64>,
    /// When the ranks computed one after another (a sequential fill or warm-up), the number
    /// of independent chains they formed (equal consecutive rank groups); 0 when they
    /// computed side by side. The latency model sums a chain's compute.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chain_groups: usize,
    /// Bytes sent by all ranks during the step.
    pub bytes_sent: u64,
    /// Bytes each rank sent during the step (index = rank; they sum to `bytes_sent`).
    #[serde(default)]
    pub rank_bytes_sent: Vec<u64>,
    /// Messages each rank sent during the step (one per destination).
    #[serde(default)]
    pub rank_messages_sent: Vec<u64>,
    /// The part of each rank's bytes and messages that the schedule lets overlap compute
    /// (stage outputs sent a step ahead, displaced patch activations).
    #[serde(default)]
    pub rank_overlapped_bytes: Vec<u64>,
    #[serde(default)]
    pub rank_overlapped_messages: Vec<u64>,
    /// What the reference implementation would have sent (every cache to every rank).
    pub reference_bytes_sent: u64,
    /// The switching slope, when one was computed after this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slope: Option<f64>,
    /// `tau1` and `tau2` once known.
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
    /// Sample-forwards all ranks computed during the step: each module's share of a whole
    /// forward's counted FLOPs, times the batch (serial's CFG batch counts 2), times the
    /// share of the rows (a patch band).
    #[serde(default)]
    pub forwards: f64,
    /// What the step cache did, with `--cache`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<StepCacheTrace>,
}

impl StepTrace {
    /// Whether the step cache marked the step cached (`--cache`).
    pub fn cached(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.decision == "cached")
    }
}

/// One step of the step cache (`--cache`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepCacheTrace {
    /// The step's decision, the same on every rank: `cached` (modules may be reused from
    /// the previous step) or `computed`.
    pub decision: String,
    /// The modules rank 0 took from an earlier step instead of computing (empty where a
    /// cached step found nothing to reuse on its path, e.g. a fill step).
    pub cached_modules: Vec<String>,
    /// Sample-forwards the cache saved all ranks this step.
    pub forwards_saved: f64,
    /// `teacache`: the accumulated relative L1 change of the modulated input that the
    /// decision compared with the threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<f64>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trace {
    pub strategy: String,
    pub world_size: usize,
    pub threads_per_rank: usize,
    /// Each rank's device (`cpu`, `cuda:N`), index = rank.
    #[serde(default)]
    pub rank_devices: Vec<String>,
    /// How tensors crossed between ranks: `host` (CPU ranks, host memory),
    /// `same device` (ranks sharing one GPU, no copy) or `device-to-device` (GPU to GPU).
    #[serde(default)]
    pub transfer: String,
    pub scheduler: String,
    /// `--karras` (Karras sigmas may also come from the scheduler config).
    #[serde(default)]
    pub karras: bool,
    /// diffusers' `guidance_rescale` (0: off).
    #[serde(default)]
    pub guidance_rescale: f64,
    /// The seed of a stochastic sampler's step noise (absent for deterministic samplers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_seed: Option<u64>,
    pub num_steps: usize,
    pub guidance: f64,
    /// Whether classifier-free guidance ran (`guidance > 1`, as in diffusers).
    pub classifier_free_guidance: bool,
    /// What the strategy did differently for this run (e.g. without CFG), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub total_seconds: f64,
    pub bytes_sent: u64,
    pub reference_bytes_sent: u64,
    /// The modules of each stage, for staged strategies.
    pub stage_plan: Option<serde_json::Value>,
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
    pub rel_mae_log: Vec<f64>,
    /// The step cache (`--cache METHOD:...`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// Sample-forwards all ranks computed over the run (see [`StepTrace::forwards`]).
    #[serde(default)]
    pub forwards: f64,
    /// Sample-forwards the step cache saved over the run.
    #[serde(default)]
    pub forwards_saved: f64,
    /// Steps whose decision was `cached`.
    #[serde(default)]
    pub cached_steps: usize,
    pub steps: Vec<StepTrace>,
}

/// The longest a trace's run or any of its times may claim (a year, in seconds): larger
/// values are edits or corruption, not measurements.
const MAX_SECONDS: f64 = 3.2e7;

impl Trace {
    /// Checks every field the latency model and `bench --from-trace`'s table read (issue 28):
    /// a known strategy and scheduler, 1 to [`crate::MAX_WORLD_SIZE`] ranks (1 for serial),
    /// per-rank lists as long as the world, steps numbered 0..num_steps, times finite, not
    /// negative and within the run's total (itself above 0), byte counts that add up, and
    /// device and transfer names as the engine writes them (they go into a Markdown table).
    ///
    /// # Errors
    /// The first field that is not possible, as `` `steps[3].rank_compute_seconds[1]` = -0.5:
    /// expected ... `` (the caller adds the file).
    pub fn check(&self) -> std::result::Result<(), String> {
        let bad = |field: String, value: String, expected: &str| {
            Err(format!("`{field}` = {value}: expected {expected}"))
        };
        let kind: crate::StrategyKind = match self.strategy.parse() {
            Ok(k) => k,
            Err(_) => {
                let all: Vec<String> = crate::StrategyKind::ALL
                    .iter()
                    .map(|k| k.to_string())
                    .collect();
                return bad(
                    "strategy".into(),
                    format!("{:?}", self.strategy),
                    &format!("one of {}", all.join(", ")),
                );
            }
        };
        let w = self.world_size;
        if w == 0 || w > crate::MAX_WORLD_SIZE {
            return bad(
                "world_size".into(),
                w.to_string(),
                &format!("1 to {}", crate::MAX_WORLD_SIZE),
            );
        }
        if kind == crate::StrategyKind::Serial && w != 1 {
            return bad("world_size".into(), w.to_string(), "1 for a serial trace");
        }
        if self.threads_per_rank == 0 {
            return bad("threads_per_rank".into(), "0".into(), "1 or more");
        }
        if self
            .scheduler
            .parse::<hybridiff_schedulers::SchedulerKind>()
            .is_err()
        {
            return bad(
                "scheduler".into(),
                format!("{:?}", self.scheduler),
                "a scheduler name as --scheduler takes it",
            );
        }
        if !self.rank_devices.is_empty() && self.rank_devices.len() != w {
            return bad(
                "rank_devices".into(),
                format!("{} entries", self.rank_devices.len()),
                &format!("one per rank ({w})"),
            );
        }
        for (r, d) in self.rank_devices.iter().enumerate() {
            let cuda = d.strip_prefix("cuda:").is_some_and(|n| {
                !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit())
            });
            if d != "cpu" && !cuda {
                return bad(
                    format!("rank_devices[{r}]"),
                    format!("{d:?}"),
                    "cpu or cuda:N",
                );
            }
        }
        if !matches!(
            self.transfer.as_str(),
            "" | "host" | "same device" | "device-to-device"
        ) {
            return bad(
                "transfer".into(),
                format!("{:?}", self.transfer),
                "host, same device or device-to-device",
            );
        }
        if !self.guidance.is_finite() {
            return bad(
                "guidance".into(),
                self.guidance.to_string(),
                "a finite number",
            );
        }
        let total = self.total_seconds;
        if !(total.is_finite() && total > 0.0 && total <= MAX_SECONDS) {
            return bad(
                "total_seconds".into(),
                total.to_string(),
                &format!("a time above 0 and at most {MAX_SECONDS:e} s"),
            );
        }
        if self.num_steps == 0 || self.steps.len() != self.num_steps {
            return bad(
                "num_steps".into(),
                self.num_steps.to_string(),
                &format!("1 or more, one per entry of `steps` ({})", self.steps.len()),
            );
        }
        if self.rel_mae_log.len() != self.num_steps {
            return bad(
                "rel_mae_log".into(),
                format!("{} entries", self.rel_mae_log.len()),
                &format!("one per step ({})", self.num_steps),
            );
        }
        for (name, t) in [("tau1", self.tau1), ("tau2", self.tau2)] {
            if let Some(t) = t.filter(|&t| t > self.num_steps) {
                return bad(
                    name.into(),
                    t.to_string(),
                    &format!("at most num_steps ({})", self.num_steps),
                );
            }
        }
        let mut per_rank = vec![0.0f64; w];
        let mut bytes = 0u64;
        for (i, s) in self.steps.iter().enumerate() {
            let f = |name: &str| format!("steps[{i}].{name}");
            if s.index != i {
                return bad(
                    f("index"),
                    s.index.to_string(),
                    &format!("{i} (steps in order)"),
                );
            }
            for (name, v) in [("timestep", s.timestep), ("rel_mae", s.rel_mae)] {
                if !v.is_finite() || (name == "rel_mae" && v < 0.0) {
                    return bad(f(name), v.to_string(), "a finite number (rel_mae >= 0)");
                }
            }
            if let Some(v) = s.slope.filter(|v| !v.is_finite()) {
                return bad(f("slope"), v.to_string(), "a finite number");
            }
            if !(s.wall_seconds.is_finite() && (0.0..=total).contains(&s.wall_seconds)) {
                return bad(
                    f("wall_seconds"),
                    s.wall_seconds.to_string(),
                    &format!("a time from 0 to the run's total_seconds ({total})"),
                );
            }
            if s.rank_compute_seconds.len() != w {
                return bad(
                    f("rank_compute_seconds"),
                    format!("{} entries", s.rank_compute_seconds.len()),
                    &format!("one per rank (world_size {w})"),
                );
            }
            for (r, &c) in s.rank_compute_seconds.iter().enumerate() {
                if !(c.is_finite() && (0.0..=total).contains(&c)) {
                    return bad(
                        format!("steps[{i}].rank_compute_seconds[{r}]"),
                        c.to_string(),
                        &format!("a time from 0 to the run's total_seconds ({total})"),
                    );
                }
                per_rank[r] += c;
            }
            let lists = [
                ("rank_bytes_sent", &s.rank_bytes_sent),
                ("rank_messages_sent", &s.rank_messages_sent),
                ("rank_overlapped_bytes", &s.rank_overlapped_bytes),
                ("rank_overlapped_messages", &s.rank_overlapped_messages),
            ];
            for (name, v) in lists {
                if v.len() != w && !(v.is_empty() && s.bytes_sent == 0) {
                    return bad(
                        f(name),
                        format!("{} entries", v.len()),
                        &format!("one per rank (world_size {w})"),
                    );
                }
            }
            if !s.rank_bytes_sent.is_empty()
                && s.rank_bytes_sent
                    .iter()
                    .try_fold(0u64, |a, &b| a.checked_add(b))
                    != Some(s.bytes_sent)
            {
                return bad(
                    f("bytes_sent"),
                    s.bytes_sent.to_string(),
                    "the sum of rank_bytes_sent",
                );
            }
            for r in 0..w {
                let at = |v: &[u64]| v.get(r).copied().unwrap_or(0);
                if at(&s.rank_overlapped_bytes) > at(&s.rank_bytes_sent)
                    || at(&s.rank_overlapped_messages) > at(&s.rank_messages_sent)
                {
                    return bad(
                        format!("steps[{i}].rank_overlapped_bytes[{r}]"),
                        at(&s.rank_overlapped_bytes).to_string(),
                        "no more than the rank sent in the step (bytes and messages)",
                    );
                }
            }
            bytes = bytes.saturating_add(s.bytes_sent);
        }
        if bytes != self.bytes_sent {
            return bad(
                "bytes_sent".into(),
                self.bytes_sent.to_string(),
                &format!("the sum over steps ({bytes})"),
            );
        }
        // A rank computes within the run: its compute seconds add up to no more than the
        // run took (a margin for clock granularity).
        for (r, c) in per_rank.iter().enumerate() {
            if *c > total * 1.05 + 0.01 {
                return bad(
                    format!("steps[*].rank_compute_seconds[{r}]"),
                    format!("{c} s in all"),
                    &format!("no more than the run's total_seconds ({total})"),
                );
            }
        }
        Ok(())
    }
}
