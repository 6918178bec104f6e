//! Strategy flags shared by `denoise` and `bench`.

use anyhow::Result;
use hybridiff_engine::switch::{self, PartialSwitch};
use hybridiff_engine::{PipelinedGuidance, StrategyOptions};

/// Knobs of the staged strategies (`async`, `hybrid`) and of `patch`.
#[derive(clap::Args, Debug, Clone)]
pub struct StrategyArgs {
    /// async: exact steps before pipelining; patch (displaced): synchronous steps before
    /// other bands' activations are taken from the previous step.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// patch: `displaced` (DistriFusion: other bands' halos, GroupNorm statistics and
    /// keys/values from the previous step, exchanged asynchronously) or `sync` (exact).
    #[arg(long, default_value = "displaced")]
    pub patch_mode: String,
    /// patch: run both CFG branches on every rank (W = bands) instead of one rank group
    /// per branch (W = 2 x bands).
    #[arg(long)]
    pub no_cfg_split: bool,
    /// hybrid: window L of the rel-MAE slope [default: the model folder's hybridiff.json,
    /// else the paper's SDXL 12 for 50 steps; either scaled to --steps].
    #[arg(long)]
    pub l_slope: Option<usize>,
    /// hybrid: slope below which the rel-MAE curve counts as flat [default: hybridiff.json,
    /// else 0.4e-3 for 50 steps; either scaled to --steps].
    #[arg(long)]
    pub eps_slope: Option<f64>,
    /// hybrid: pipelined steps after tau1 [default: hybridiff.json, else 5 for 50 steps;
    /// either scaled to --steps and fitted into it].
    #[arg(long)]
    pub k: Option<usize>,
    /// hybrid: tau1 when no flattening is seen before this step [default: hybridiff.json,
    /// else 15 for 50 steps; either scaled to --steps and fitted into it].
    #[arg(long)]
    pub tau_cap: Option<usize>,
    /// async, hybrid: stage plan, `reference` (the authors' presets: SDXL n=2/4, even DiT
    /// splits), `auto` (balanced by counted FLOPs), `measured` (balanced by module times
    /// measured before the run), or `default` (reference where one exists, else auto).
    #[arg(long, default_value = "default")]
    pub stages: String,
    /// hybrid: prediction in pipelined steps, `none` (reference) or `reuse` (add the
    /// last exact step's guidance correction).
    #[arg(long, default_value = "none")]
    pub pipelined_guidance: String,
}

impl StrategyArgs {
    /// The engine's strategy options for a run of `steps` steps: flags first, then the
    /// model's recommendations, then the paper's values, the last two scaled to `steps`
    /// (see [`switch::resolve`]). Also returns the line that says which thresholds were
    /// derived, when any was.
    pub fn options(
        &self,
        defaults: &ModelDefaults,
        steps: usize,
    ) -> Result<(StrategyOptions, Option<String>)> {
        let flags = PartialSwitch {
            l_slope: self.l_slope,
            eps_slope: self.eps_slope,
            k: self.k,
            tau_cap: self.tau_cap,
        };
        let recommended = PartialSwitch {
            l_slope: defaults.l_slope,
            eps_slope: defaults.eps_slope,
            k: defaults.k,
            tau_cap: defaults.tau_cap,
        };
        let resolved = switch::resolve(flags, recommended, defaults.steps, steps);
        Ok((
            StrategyOptions {
                warmup: self.warmup,
                switch: resolved.params,
                stages: self.stages.parse()?,
                pipelined_guidance: self.pipelined_guidance.parse::<PipelinedGuidance>()?,
                patch_mode: self.patch_mode.parse()?,
                cfg_split: !self.no_cfg_split,
            },
            resolved.note,
        ))
    }
}

/// Recommended settings a model folder may carry in `hybridiff.json`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub l_slope: Option<usize>,
    pub eps_slope: Option<f64>,
    pub k: Option<usize>,
    pub tau_cap: Option<usize>,
}

impl ModelDefaults {
    /// Reads `<dir>/hybridiff.json`; none is no recommendation.
    pub fn read(dir: &std::path::Path) -> Result<Self> {
        use anyhow::Context;
        let p = dir.join("hybridiff.json");
        if !p.is_file() {
            return Ok(Self::default());
        }
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{steps, guidance, l_slope, eps_slope, k, tau_cap}}",
                p.display()
            )
        })
    }
}

/// How a job runs: strategy, ranks, threads, precision. Shared by `denoise` and `generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// serial (1 rank), cfg (2 or 4), async (2+), hybrid (2 or 4), patch (2 x bands, or
    /// bands with --no-cfg-split or guidance <= 1).
    #[arg(long, default_value = "serial")]
    pub strategy: String,
    /// Number of ranks [default: 1 for serial, 2 otherwise].
    #[arg(long)]
    pub world_size: Option<usize>,
    /// Compute threads per rank [default: cores / world size].
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// f32 or f16 (bf16 on CUDA builds).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// ddim, euler, dpmpp-2m or flow-euler [default: the model's scheduler_config.json]
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Seconds any rank waits for another before the job fails.
    #[arg(long, default_value_t = 600)]
    pub comm_timeout: u64,
    #[command(flatten)]
    pub strategy_args: StrategyArgs,
}

/// [`RunArgs`] checked and resolved.
pub struct Run {
    pub kind: hybridiff_engine::StrategyKind,
    pub strategy: Box<dyn hybridiff_engine::Strategy>,
    pub options: hybridiff_engine::RunOptions,
    pub dtype: candle_core::DType,
    pub scheduler: Option<hybridiff_schedulers::SchedulerKind>,
}

impl RunArgs {
    /// Resolves the flags for a run of `steps` steps and sets the per-rank thread budget.
    /// Says on stderr which hybrid thresholds were derived, when any was.
    pub fn resolve(
        &self,
        device: &candle_core::Device,
        defaults: &ModelDefaults,
        steps: usize,
    ) -> Result<Run> {
        use hybridiff_engine::StrategyKind;
        let kind: StrategyKind = self.strategy.parse()?;
        let world_size = self.world_size.unwrap_or(match kind {
            StrategyKind::Serial => 1,
            _ => 2,
        });
        if world_size == 0 {
            anyhow::bail!("--world-size must be at least 1");
        }
        let threads = self
            .threads_per_rank
            .unwrap_or_else(|| crate::default_threads(world_size));
        crate::set_compute_threads(threads);
        let scheduler = match &self.scheduler {
            Some(s) => Some(s.parse().map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?),
            None => None,
        };
        let (options, note) = self.strategy_args.options(defaults, steps)?;
        if let (StrategyKind::Hybrid, Some(note)) = (kind, note) {
            eprintln!("hybridiff: {note}");
        }
        Ok(Run {
            kind,
            strategy: kind.build(&options),
            options: hybridiff_engine::RunOptions {
                world_size,
                threads_per_rank: threads,
                comm_timeout: std::time::Duration::from_secs(self.comm_timeout),
            },
            dtype: crate::denoise::parse_dtype(&self.dtype, device)?,
            scheduler,
        })
    }
}
