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
    pub steps: Vec<StepTrace>,
}
