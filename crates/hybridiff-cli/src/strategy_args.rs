//! The run flags that `generate`, `denoise`, `bench` and `serve` share.

use anyhow::Result;
use hybridiff_engine::switch::{self, PartialSwitch, ResolvedSwitch};
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
    #[arg(long, allow_hyphen_values = true)]
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
    /// (see [`switch::resolve`]). Also returns the resolved thresholds, with the line that
    /// says where they came from. The flags' domains are checked whatever the strategy.
    pub fn options(
        &self,
        defaults: &ModelDefaults,
        steps: usize,
    ) -> Result<(StrategyOptions, ResolvedSwitch)> {
        let flags = PartialSwitch {
            l_slope: self.l_slope,
            eps_slope: self.eps_slope,
            k: self.k,
            tau_cap: self.tau_cap,
        };
        flags.check_domains(None)?;
        let resolved = switch::resolve(flags, defaults.switch(), defaults.steps, steps);
        Ok((
            StrategyOptions {
                warmup: self.warmup,
                switch: resolved.params,
                stages: self.stages.parse()?,
                pipelined_guidance: self.pipelined_guidance.parse::<PipelinedGuidance>()?,
                patch_mode: self.patch_mode.parse()?,
                cfg_split: !self.no_cfg_split,
            },
            resolved,
        ))
    }
}

/// Says on stderr what a run will do that the user may not expect, before it starts:
/// that `cfg`/`hybrid` have no branches to split without CFG (`guidance <= 1`), or which
/// hybrid thresholds were derived. Hybrid thresholds that cannot fit are an error that
/// names the values that were derived rather than given.
pub fn announce(
    kinds: &[hybridiff_engine::StrategyKind],
    strategies: &[&dyn hybridiff_engine::Strategy],
    switch: &ResolvedSwitch,
    guidance: f64,
    steps: usize,
    print: bool,
) -> Result<()> {
    use hybridiff_engine::StrategyKind;
    for (kind, strategy) in kinds.iter().zip(strategies) {
        let line = match kind {
            StrategyKind::Cfg | StrategyKind::Hybrid if guidance <= 1.0 => {
                Some(format!("{kind}: {}", strategy.without_cfg()))
            }
            StrategyKind::Hybrid => {
                switch.check(steps)?;
                Some(switch.note.clone())
            }
            _ => None,
        };
        if let (true, Some(line)) = (print, line) {
            eprintln!("hybridiff: {line}");
        }
    }
    Ok(())
}

/// Recommended settings a model folder may carry in `hybridiff.json`.
#[derive(Debug, Default, Clone, serde::Deserialize)]
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
        let text = hybridiff_models::weights::read_text_bounded(
            &p,
            hybridiff_models::weights::MAX_CONFIG_BYTES,
        )
        .with_context(|| format!("reading {}", p.display()))?;
        let d: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{steps, guidance, l_slope, eps_slope, k, tau_cap}}",
                p.display()
            )
        })?;
        if d.steps == Some(0) {
            anyhow::bail!("{}: `steps` = 0: expected 1 or more", p.display());
        }
        if let Some(g) = d.guidance {
            hybridiff_engine::check_guidance(g)
                .with_context(|| format!("{}: `guidance` = {g}", p.display()))?;
        }
        d.switch().check_domains(Some(&p))?;
        Ok(d)
    }

    /// The switching thresholds it recommends.
    pub fn switch(&self) -> PartialSwitch {
        PartialSwitch {
            l_slope: self.l_slope,
            eps_slope: self.eps_slope,
            k: self.k,
            tau_cap: self.tau_cap,
        }
    }
}

/// How a job runs: strategy, ranks, threads, precision. Shared by `denoise` and `generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// serial (1 rank), cfg (2 or 4), async (2+), hybrid (2 or 4), patch (2 x bands, or
    /// bands with --no-cfg-split or guidance <= 1).
    #[arg(long, default_value = "serial")]
    pub strategy: String,
    /// Number of ranks [default: 1 for serial, 2 otherwise]. Ranks are threads of this
    /// process: at most 64, and at most 4 threads per core in all.
    #[arg(long)]
    pub world_size: Option<usize>,
    /// Compute threads per rank, at most the machine's cores [default: cores / world size].
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// f32 or f16 (bf16 on CUDA builds).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// ddim, euler, dpmpp-2m or flow-euler [default: the model's scheduler_config.json]
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Seconds any rank waits for another before the job fails, 1 to 604800 [default: 600
    /// with ranks as threads, 60 with one rank per process].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub comm_timeout: Option<u64>,
    #[command(flatten)]
    pub strategy_args: StrategyArgs,
}

/// `--dtype`: f32 or f16, and bf16 where the device has bf16 kernels.
pub(crate) fn parse_dtype(s: &str, device: &candle_core::Device) -> Result<candle_core::DType> {
    use candle_core::DType;
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" if device.is_cpu() => anyhow::bail!(
            "--dtype bf16: candle's CPU backend has no bf16 matmul or conv2d; use f32 or f16 on CPU (bf16 runs on CUDA builds)"
        ),
        "bf16" => Ok(DType::BF16),
        other => anyhow::bail!("--dtype: unknown dtype `{other}`; expected f32, f16 or bf16"),
    }
}

/// [`RunArgs`] checked and resolved.
pub struct Run {
    pub kind: hybridiff_engine::StrategyKind,
    pub strategy: Box<dyn hybridiff_engine::Strategy>,
    pub options: hybridiff_engine::RunOptions,
    pub dtype: candle_core::DType,
    pub scheduler: Option<hybridiff_schedulers::SchedulerKind>,
    /// The hybrid thresholds and where they came from.
    pub switch: ResolvedSwitch,
}

impl Run {
    /// [`announce`] for this run's strategy.
    pub fn announce(&self, guidance: f64, steps: usize, print: bool) -> Result<()> {
        announce(
            &[self.kind],
            &[self.strategy.as_ref()],
            &self.switch,
            guidance,
            steps,
            print,
        )
    }
}

impl RunArgs {
    /// Resolves the flags for a run of `steps` steps and sets the per-rank thread budget.
    /// `processes`: this process is one rank of a job of that many processes (one rank per
    /// process): the world size is then the number of processes (`--world-size`, if given,
    /// must agree), and the default thread budget shares this machine's cores among its
    /// processes.
    pub fn resolve(
        &self,
        device: &candle_core::Device,
        defaults: &ModelDefaults,
        steps: usize,
        processes: Option<crate::launch::Processes>,
    ) -> Result<Run> {
        use hybridiff_engine::StrategyKind;
        let kind: StrategyKind = self.strategy.parse()?;
        let world_size = match (processes, self.world_size) {
            (Some(p), Some(w)) if w != p.size => anyhow::bail!(
                "--world-size {w}: this job was started as {} processes (one rank each); give \
                 --world-size {} or leave it out",
                p.size,
                p.size
            ),
            (Some(p), _) => p.size,
            (None, w) => w.unwrap_or(match kind {
                StrategyKind::Serial => 1,
                _ => 2,
            }),
        };
        let threads = self.threads_per_rank.unwrap_or_else(|| match processes {
            Some(p) => crate::default_threads(p.local_size),
            None => crate::default_threads(world_size),
        });
        let comm_timeout = self
            .comm_timeout
            .unwrap_or(if processes.is_some() { 60 } else { 600 });
        let run_options = hybridiff_engine::RunOptions {
            world_size,
            threads_per_rank: threads,
            comm_timeout: std::time::Duration::from_secs(comm_timeout),
        };
        // Before any pool exists: rayon panics when it cannot create its threads. Under MPI
        // this process holds one rank; the launcher places the others.
        hybridiff_engine::RunOptions {
            world_size: if processes.is_some() { 1 } else { world_size },
            ..run_options.clone()
        }
        .check(hybridiff_engine::cores())?;
        crate::set_compute_threads(threads);
        let scheduler = match &self.scheduler {
            Some(s) => Some(s.parse().map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?),
            None => None,
        };
        let (options, switch) = self.strategy_args.options(defaults, steps)?;
        Ok(Run {
            kind,
            strategy: kind.build(&options),
            options: run_options,
            dtype: parse_dtype(&self.dtype, device)?,
            scheduler,
            switch,
        })
    }
}
