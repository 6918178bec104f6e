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
    /// hybrid: window L of the rel-MAE slope [paper SDXL: 12].
    #[arg(long, default_value_t = SwitchParams::SDXL.l_slope)]
    pub l_slope: usize,
    /// hybrid: slope below which the rel-MAE curve counts as flat [paper SDXL: 0.4e-3].
    #[arg(long, default_value_t = SwitchParams::SDXL.eps_slope)]
    pub eps_slope: f64,
    /// hybrid: pipelined steps after tau1 [paper: 5].
    #[arg(long, default_value_t = SwitchParams::SDXL.k)]
    pub k: usize,
    /// hybrid: tau1 when no flattening is seen before this step [paper SDXL: 15].
    #[arg(long, default_value_t = SwitchParams::SDXL.tau_cap)]
    pub tau_cap: usize,
    /// async, hybrid: stage plan, `reference` (SDXL presets), `auto` (balanced by counted
    /// FLOPs) or `measured` (balanced by module times measured before the run).
    #[arg(long, default_value = "reference")]
    pub stages: String,
    /// hybrid: prediction in pipelined steps, `none` (reference) or `reuse` (add the
    /// last exact step's guidance correction).
    #[arg(long, default_value = "none")]
    pub pipelined_guidance: String,
}

impl StrategyArgs {
    /// The engine's strategy options.
    pub fn options(&self) -> Result<StrategyOptions> {
        Ok(StrategyOptions {
            warmup: self.warmup,
            switch: SwitchParams {
                l_slope: self.l_slope,
                eps_slope: self.eps_slope,
                k: self.k,
                tau_cap: self.tau_cap,
            },
            stages: self.stages.parse()?,
            pipelined_guidance: self.pipelined_guidance.parse::<PipelinedGuidance>()?,
        })
    }
}
