//! Strategy flags shared by `denoise` and `bench`.

use anyhow::Result;
use hybridiff_engine::switch::SwitchParams;
use hybridiff_engine::{PipelinedGuidance, StrategyOptions};

/// Knobs of the staged strategies (`async`, `hybrid`).
#[derive(clap::Args, Debug, Clone)]
pub struct StrategyArgs {
    /// async: exact steps before pipelining.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// hybrid: window L of the rel-MAE slope [default: the model folder's hybridiff.json,
    /// else the paper's SDXL 12].
    #[arg(long)]
    pub l_slope: Option<usize>,
    /// hybrid: slope below which the rel-MAE curve counts as flat [default: hybridiff.json,
    /// else 0.4e-3].
    #[arg(long)]
    pub eps_slope: Option<f64>,
    /// hybrid: pipelined steps after tau1 [default: hybridiff.json, else 5].
    #[arg(long)]
    pub k: Option<usize>,
    /// hybrid: tau1 when no flattening is seen before this step [default: hybridiff.json,
    /// else 15].
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
    /// The engine's strategy options: flags first, then the model's recommendations.
    pub fn options(&self, defaults: &ModelDefaults) -> Result<StrategyOptions> {
        let paper = SwitchParams::SDXL;
        Ok(StrategyOptions {
            warmup: self.warmup,
            switch: SwitchParams {
                l_slope: self.l_slope.or(defaults.l_slope).unwrap_or(paper.l_slope),
                eps_slope: self
                    .eps_slope
                    .or(defaults.eps_slope)
                    .unwrap_or(paper.eps_slope),
                k: self.k.or(defaults.k).unwrap_or(paper.k),
                tau_cap: self.tau_cap.or(defaults.tau_cap).unwrap_or(paper.tau_cap),
            },
            stages: self.stages.parse()?,
            pipelined_guidance: self.pipelined_guidance.parse::<PipelinedGuidance>()?,
        })
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
    /// serial (1 rank), cfg (2 or 4), async (2+), hybrid (2 or 4).
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
    /// Seconds any rank waits for another before the job fails [default: 600 with ranks as
    /// threads, 60 with one rank per process].
    #[arg(long)]
    pub comm_timeout: Option<u64>,
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
    /// Resolves the flags and sets the per-rank thread budget (ranks as threads).
    // Kept for single-process front ends; denoise and generate use `resolve_in`.
    #[allow(dead_code)]
    pub fn resolve(&self, device: &candle_core::Device, defaults: &ModelDefaults) -> Result<Run> {
        self.resolve_in(device, defaults, None)
    }

    /// [`resolve`](Self::resolve) for one rank of a job of `processes` (one rank per
    /// process): the world size is the number of processes (`--world-size`, if given, must
    /// agree), and the default thread budget shares this machine's cores among its processes.
    pub fn resolve_in(
        &self,
        device: &candle_core::Device,
        defaults: &ModelDefaults,
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
        if world_size == 0 {
            anyhow::bail!("--world-size must be at least 1");
        }
        let threads = self.threads_per_rank.unwrap_or_else(|| match processes {
            Some(p) => crate::default_threads(p.local_size),
            None => crate::default_threads(world_size),
        });
        let comm_timeout = self
            .comm_timeout
            .unwrap_or(if processes.is_some() { 60 } else { 600 });
        crate::set_compute_threads(threads);
        let scheduler = match &self.scheduler {
            Some(s) => Some(s.parse().map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?),
            None => None,
        };
        Ok(Run {
            kind,
            strategy: kind.build(&self.strategy_args.options(defaults)?),
            options: hybridiff_engine::RunOptions {
                world_size,
                threads_per_rank: threads,
                comm_timeout: std::time::Duration::from_secs(comm_timeout),
            },
            dtype: crate::denoise::parse_dtype(&self.dtype, device)?,
            scheduler,
        })
    }
}
