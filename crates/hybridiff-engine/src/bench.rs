//! Measurements behind `hybridiff bench`: denoiser forward times and whole runs per
//! strategy, all in one process so the ratios compare like with like.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hybridiff_models::Conditioning;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::io::InputSpec;
use crate::{DenoiseInputs, Error, Model, Result};

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Seeded standard-normal latents and embeddings of the shapes `spec` asks for, with
/// `ctx_len` text tokens: stand-ins for a real prompt when only speed matters.
pub fn random_inputs(
    spec: &InputSpec,
    latent_hw: (usize, usize),
    ctx_len: usize,
    seed: u64,
    device: &Device,
) -> Result<DenoiseInputs> {
    let (h, w) = latent_hw;
    if h == 0 || w == 0 {
        return Err(Error::Options(format!(
            "--latent-size {h}x{w}: latents need at least one pixel"
        )));
    }
    if ctx_len == 0 || ctx_len > crate::memory::MAX_CONTEXT_LEN {
        return Err(Error::Options(format!(
            "--context-len {ctx_len}: expected 1 to {}",
            crate::memory::MAX_CONTEXT_LEN
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let latents = randn(&mut rng, &[1, spec.latent_channels, h, w], device)?;
    let branch = |rng: &mut ChaCha8Rng| -> Result<Conditioning> {
        let time_ids = if spec.time_ids {
            let (ph, pw) = ((h * spec.vae_factor) as f32, (w * spec.vae_factor) as f32);
            Some(Tensor::new(&[[ph, pw, 0.0, 0.0, ph, pw]], device)?)
        } else {
            None
        };
        Ok(Conditioning {
            prompt_embeds: randn(rng, &[1, ctx_len, spec.context_dim], device)?,
            pooled: match spec.pooled_dim {
                Some(p) => Some(randn(rng, &[1, p], device)?),
                None => None,
            },
            time_ids,
        })
    };
    let uncond = branch(&mut rng)?;
    let cond = branch(&mut rng)?;
    Ok(DenoiseInputs {
        latents,
        cond,
        uncond,
    })
}

/// Median seconds of `repeats` denoiser forwards at `batch` (after one warm-up), run on
/// a pool of `threads` threads.
pub fn forward_seconds(
    model: &Model,
    inputs: &DenoiseInputs,
    batch: usize,
    repeats: usize,
    threads: usize,
) -> Result<f64> {
    let x = Tensor::cat(&vec![&inputs.latents; batch], 0)?;
    let mut cond = inputs.cond.clone();
    for _ in 1..batch {
        cond = Conditioning::cat(&cond, &inputs.cond)?;
    }
    let times = hybridiff_comm::run_ranks(1, threads, Duration::from_secs(3600), |_comm| {
        model.denoiser.forward(&x, 500.0, &cond)?;
        let mut t = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            model.denoiser.forward(&x, 500.0, &cond)?;
            t.push(start.elapsed().as_secs_f64());
        }
        Ok::<_, Error>(t)
    })
    .map_err(|e| Error::Options(e.to_string()))?;
    let mut t = times.into_iter().next().unwrap_or_default();
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// One strategy's row of the comparison table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub strategy: String,
    /// The strategy's layout in a few words (`patch`: mode and bands), else empty.
    pub setup: String,
    pub world_size: usize,
    pub seconds: f64,
    /// Serial seconds / this strategy's seconds, measured in the same process.
    pub speedup: f64,
    pub bytes_sent: u64,
    /// What the reference implementation would have sent.
    pub reference_bytes_sent: u64,
    /// Final latents against serial's.
    pub psnr_db: f64,
    pub max_abs_diff: f64,
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
    pub pipelined_steps: usize,
    /// Summed per-rank compute seconds over the run, per rank.
    pub rank_compute_seconds: Vec<f64>,
}

/// Runs `serial` and each strategy on the same job, one after the other, and compares.
/// Returns the rows and each run's trace.
pub fn compare(
    job: &crate::Job,
    strategies: &[(crate::StrategyKind, usize)],
    options: &crate::StrategyOptions,
    threads_per_rank: usize,
) -> Result<Vec<(BenchRow, crate::Trace)>> {
    use crate::{denoise, RunOptions, StrategyKind};
    let run = |kind: StrategyKind, world: usize| {
        let opts = RunOptions {
            world_size: world,
            threads_per_rank,
            comm_timeout: Duration::from_secs(3600),
        };
        denoise(job, kind.build(options).as_ref(), &opts)
    };
    let serial = run(StrategyKind::Serial, 1)?;
    let base = serial.trace.total_seconds;
    let mut rows = Vec::new();
    for &(kind, world) in strategies {
        let setup = kind.build(options).describe(job, world);
        let out = if kind == StrategyKind::Serial {
            serial.clone()
        } else {
            run(kind, world)?
        };
        let t = &out.trace;
        let ranks = t
            .steps
            .first()
            .map(|s| s.rank_compute_seconds.len())
            .unwrap_or(0);
        let row = BenchRow {
            strategy: kind.to_string(),
            setup,
            world_size: world,
            seconds: t.total_seconds,
            speedup: base / t.total_seconds,
            bytes_sent: t.bytes_sent,
            reference_bytes_sent: t.reference_bytes_sent,
            psnr_db: crate::metrics::psnr(&out.latents, &serial.latents)?,
            max_abs_diff: crate::metrics::max_abs_diff(&out.latents, &serial.latents)?,
            tau1: t.tau1,
            tau2: t.tau2,
            pipelined_steps: t
                .steps
                .iter()
                .filter(|s| s.mode != crate::trace::StepMode::Exact)
                .count(),
            rank_compute_seconds: (0..ranks)
                .map(|r| t.steps.iter().map(|s| s.rank_compute_seconds[r]).sum())
                .collect(),
        };
        rows.push((row, out.trace));
    }
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn markdown_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| strategy | ranks | latency (s) | speedup | bytes sent | reference bytes | PSNR vs serial (dB) | max abs diff | tau1 | tau2 | staged steps | setup |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let opt = |v: Option<usize>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.3} | {:.2}x | {} | {} | {:.2} | {:.3e} | {} | {} | {} | {} |\n",
            r.strategy,
            r.world_size,
            r.seconds,
            r.speedup,
            r.bytes_sent,
            r.reference_bytes_sent,
            r.psnr_db,
            r.max_abs_diff,
            opt(r.tau1),
            opt(r.tau2),
            r.pipelined_steps,
            if r.setup.is_empty() { "-" } else { &r.setup },
        ));
    }
    s
}
