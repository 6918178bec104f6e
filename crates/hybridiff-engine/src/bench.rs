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
        x.device().synchronize()?;
        let mut t = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            model.denoiser.forward(&x, 500.0, &cond)?;
            // A GPU runs queued kernels after the call returns: wait for them.
            x.device().synchronize()?;
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
    /// Where the ranks ran: `threads` of one process, or the processes of the external
    /// communicator (e.g. `mpi`).
    pub transport: String,
    pub seconds: f64,
    /// Serial seconds / this strategy's seconds, measured in the same process.
    pub speedup: f64,
    pub bytes_sent: u64,
    /// What the reference implementation would have sent.
    pub reference_bytes_sent: u64,
    /// Final latents against serial's.
    pub psnr_db: f64,
    pub max_abs_diff: f64,
    /// `max_abs_diff` over the largest magnitude of serial's final latents.
    pub max_rel_diff: f64,
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
    pub pipelined_steps: usize,
    /// Summed per-rank compute seconds over the run, per rank.
    pub rank_compute_seconds: Vec<f64>,
    /// Counted FLOPs over the run, per rank (`engine/src/work.rs`).
    pub rank_flops: Vec<f64>,
    /// The worst step's spread of work: `max_r |flops_r - mean| / mean` over the ranks of the
    /// step where it is largest (steps that compute nothing left out); 0 = perfectly even.
    pub flops_spread: f64,
    /// Each rank's device and how tensors crossed between ranks (see [`crate::Trace`]).
    pub rank_devices: Vec<String>,
    pub transfer: String,
    /// The step cache (`--cache`), or `-`.
    pub cache: String,
    /// Sample-forwards computed by all ranks (serial: 2 per step), and saved by the cache.
    pub forwards: f64,
    pub forwards_saved: f64,
    /// Steps the cache decided to cache.
    pub cached_steps: usize,
    /// Mean milliseconds per step outside the denoiser on rank 0: the step's wall time less
    /// rank 0's compute (scheduler, guidance, checks, waiting for other ranks).
    pub step_overhead_ms: f64,
    /// The latency model's prediction on `--simulate-link`, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted: Option<PredictedRow>,
}

/// A row's latency predicted by [`crate::latency`] on a link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictedRow {
    pub link: crate::latency::Link,
    /// Where the compute times came from (measured, or counted FLOPs at a throughput).
    pub compute: crate::latency::Compute,
    /// Predicted seconds of the run with its ranks on devices joined by `link`.
    pub seconds: f64,
    /// The slowest rank's compute summed over steps (the run on an infinitely fast link).
    pub compute_seconds: f64,
    /// Serial's predicted seconds / this row's.
    pub speedup: f64,
    /// Measured seconds / predicted seconds - 1 (how far the model is from this run when the
    /// link is the one the run used).
    pub error_vs_measured: f64,
}

/// The prediction for `trace` on `link`, with the speedup over `serial`'s.
pub fn predicted_row(
    trace: &crate::Trace,
    serial: &crate::Trace,
    link: &crate::latency::Link,
    compute: crate::latency::Compute,
) -> Result<PredictedRow> {
    let p = crate::latency::predict_trace_with(trace, link, compute)?;
    let base = crate::latency::predict_trace_with(serial, link, compute)?;
    Ok(PredictedRow {
        link: link.clone(),
        compute,
        seconds: p.seconds,
        compute_seconds: p.compute_seconds,
        speedup: base.seconds / p.seconds,
        error_vs_measured: p.seconds / trace.total_seconds - 1.0,
    })
}

/// The cost of the in-process transport measured on this machine: two ranks (threads) bounce
/// `round_trips` one-float messages and then as many `bytes`-byte ones. Returns it as a
/// [`crate::latency::Link`]: seconds per message from the small messages, bandwidth from the
/// extra time the large ones took (infinite when it is within the noise: an in-process send
/// hands over a reference to the tensor, it copies no bytes).
pub fn in_process_link(round_trips: usize, bytes: usize) -> Result<crate::latency::Link> {
    use hybridiff_comm::Communicator;
    let n = round_trips.max(1);
    let elems = (bytes / 4).max(1);
    let times = hybridiff_comm::run_ranks(2, 1, Duration::from_secs(600), |comm| {
        let comm: &mut dyn Communicator = comm;
        let mut out = Vec::new();
        for len in [1, elems] {
            let t = Tensor::zeros(len, candle_core::DType::F32, &Device::Cpu)?;
            comm.barrier()?;
            let start = Instant::now();
            for _ in 0..n {
                if comm.rank() == 0 {
                    comm.send(&t, 1)?;
                    comm.recv(1)?;
                } else {
                    let got = comm.recv(0)?;
                    comm.send(&got, 0)?;
                }
            }
            out.push(start.elapsed().as_secs_f64() / (2 * n) as f64);
        }
        Ok::<_, Error>(out)
    })
    .map_err(|e| Error::Options(e.to_string()))?;
    let t = &times[0];
    let (small, large) = (t[0], t[1]);
    let extra = large - small;
    let bytes_per_second = if extra > 0.1 * small {
        (elems * 4) as f64 / extra
    } else {
        f64::INFINITY
    };
    Ok(crate::latency::Link {
        name: "in-process (measured)".into(),
        bytes_per_second,
        seconds_per_message: small,
    })
}

/// One run of a comparison: a strategy, its rank count, and whether its ranks are the
/// processes of the external communicator (else threads of rank 0's process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchRun {
    pub kind: crate::StrategyKind,
    pub world_size: usize,
    pub on_processes: bool,
    /// With the options' step cache (`--cache`); else without.
    pub cached: bool,
}

/// Runs `serial` and each strategy on the same job, one after the other, and compares;
/// with a step cache in `options`, each strategy (serial included) also runs with it.
/// Returns the rows and each run's trace.
pub fn compare(
    job: &crate::Job,
    strategies: &[(crate::StrategyKind, usize)],
    options: &crate::StrategyOptions,
    threads_per_rank: usize,
) -> Result<Vec<(BenchRow, crate::Trace)>> {
    let variants: &[bool] = if options.cache.is_some() {
        &[false, true]
    } else {
        &[false]
    };
    let runs: Vec<BenchRun> = strategies
        .iter()
        .flat_map(|&(kind, world_size)| {
            variants.iter().map(move |&cached| BenchRun {
                kind,
                world_size,
                on_processes: false,
                cached,
            })
        })
        .collect();
    compare_on(
        job,
        &runs,
        options,
        threads_per_rank,
        &Default::default(),
        None,
        None,
    )
}

/// [`compare`] in a job of several processes: every process calls it with the same arguments
/// and `group = Some((comm, label))`. Runs with `on_processes` run with one rank per process
/// over `comm` ([`crate::denoise_rank`]); the others (and the serial baseline) run as threads
/// in rank 0's process while the other processes wait at a barrier, so both kinds are timed in
/// one run on the same machine. Rows are labelled `threads` or `label`. Rank 0 returns the
/// rows, the others an empty list.
///
/// In-process ranks run on `placement`'s devices; with `link` (a link and where compute
/// times come from), each row gets the latency model's prediction on it ([`predicted_row`]).
/// The serial baseline runs without a step cache; runs with `cached` take `options.cache`.
pub fn compare_on(
    job: &crate::Job,
    runs: &[BenchRun],
    options: &crate::StrategyOptions,
    threads_per_rank: usize,
    placement: &crate::device::Placement,
    link: Option<(&crate::latency::Link, crate::latency::Compute)>,
    mut group: Option<(&mut dyn hybridiff_comm::Communicator, &str)>,
) -> Result<Vec<(BenchRow, crate::Trace)>> {
    use crate::{denoise, denoise_rank, RunOptions, StrategyKind};
    let uncached = crate::StrategyOptions {
        cache: None,
        ..options.clone()
    };
    let options_of = |cached: bool| if cached { options } else { &uncached };
    let opts = |world_size| RunOptions {
        world_size,
        threads_per_rank,
        comm_timeout: Duration::from_secs(3600),
        placement: placement.clone(),
    };
    let root = group.as_ref().is_none_or(|(c, _)| c.rank() == 0);
    // On threads of rank 0's process, while the other processes wait at a barrier.
    let on_threads = |group: &mut Option<(&mut dyn hybridiff_comm::Communicator, &str)>,
                      run: BenchRun|
     -> Result<Option<crate::DenoiseOutput>> {
        let out = if root {
            let strategy = run.kind.build(options_of(run.cached));
            Some(denoise(job, strategy.as_ref(), &opts(run.world_size))?)
        } else {
            None
        };
        if let Some((comm, _)) = group.as_mut() {
            comm.barrier()?;
        }
        Ok(out)
    };
    let serial = on_threads(
        &mut group,
        BenchRun {
            kind: StrategyKind::Serial,
            world_size: 1,
            on_processes: false,
            cached: false,
        },
    )?;
    let mut outs = Vec::with_capacity(runs.len());
    for run in runs {
        let out = match (run.on_processes, group.as_mut()) {
            (true, Some((comm, _))) => denoise_rank(
                job,
                run.kind.build(options_of(run.cached)).as_ref(),
                &opts(run.world_size),
                *comm,
            )?,
            (true, None) => {
                return Err(Error::Options(
                    "a run on processes needs a communicator over the processes".into(),
                ))
            }
            (false, _) if run.kind == StrategyKind::Serial && !run.cached => serial.clone(),
            (false, _) => on_threads(&mut group, *run)?,
        };
        outs.push((run, out));
    }
    let Some(serial) = serial else {
        return Ok(Vec::new());
    };
    let label = group.as_ref().map_or("threads", |(_, l)| *l);
    let base = serial.trace.total_seconds;
    let mut rows = Vec::new();
    for (run, out) in outs {
        let out = out.ok_or_else(|| Error::Options("rank 0 got no output of a run".into()))?;
        let setup = run.kind.build(&uncached).describe(job, run.world_size);
        let t = &out.trace;
        let ranks = t
            .steps
            .first()
            .map(|s| s.rank_compute_seconds.len())
            .unwrap_or(0);
        let row = BenchRow {
            strategy: run.kind.to_string(),
            setup,
            world_size: run.world_size,
            transport: if run.on_processes { label } else { "threads" }.to_string(),
            seconds: t.total_seconds,
            speedup: base / t.total_seconds,
            bytes_sent: t.bytes_sent,
            reference_bytes_sent: t.reference_bytes_sent,
            psnr_db: crate::metrics::psnr(&out.latents, &serial.latents)?,
            max_abs_diff: crate::metrics::max_abs_diff(&out.latents, &serial.latents)?,
            max_rel_diff: crate::metrics::max_abs_diff(&out.latents, &serial.latents)?
                / serial
                    .latents
                    .abs()?
                    .max_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?
                    .max(f64::MIN_POSITIVE),
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
            rank_flops: (0..ranks)
                .map(|r| {
                    t.steps
                        .iter()
                        .map(|s| s.rank_flops.get(r).copied().unwrap_or(0.0))
                        .sum()
                })
                .collect(),
            flops_spread: crate::work::worst_imbalance(
                &t.steps
                    .iter()
                    .map(|s| s.rank_flops.clone())
                    .collect::<Vec<_>>(),
                &[],
            )
            .map_or(0.0, |(_, w)| w),
            rank_devices: t.rank_devices.clone(),
            transfer: t.transfer.clone(),
            cache: t.cache.clone().unwrap_or_else(|| "-".into()),
            forwards: t.forwards,
            forwards_saved: t.forwards_saved,
            cached_steps: t.cached_steps,
            step_overhead_ms: step_overhead_ms(t),
            predicted: match link {
                Some((l, compute)) => Some(predicted_row(t, &serial.trace, l, compute)?),
                None => None,
            },
        };
        rows.push((row, out.trace));
    }
    Ok(rows)
}

/// Mean milliseconds per step that rank 0 spent outside its denoiser compute.
pub fn step_overhead_ms(t: &crate::Trace) -> f64 {
    if t.steps.is_empty() {
        return 0.0;
    }
    let sum: f64 = t
        .steps
        .iter()
        .map(|s| s.wall_seconds - s.rank_compute_seconds.first().copied().unwrap_or(0.0))
        .sum();
    1e3 * sum / t.steps.len() as f64
}

/// The rows as a Markdown table (with the predicted columns when rows have predictions).
pub fn markdown_table(rows: &[BenchRow]) -> String {
    let link = rows
        .iter()
        .find_map(|r| r.predicted.as_ref())
        .map(|p| format!("{}{}", p.link.name, compute_label(p.compute)));
    let mut s = String::from(
        "| strategy | cache | ranks | transport | latency (s) | speedup | forwards | cached steps | step overhead (ms) | bytes sent | reference bytes | PSNR vs serial (dB) | max abs diff | tau1 | tau2 | staged steps | GFLOPs per rank | worst step's FLOPs spread | setup | devices |",
    );
    let mut rule = String::from(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    );
    if let Some(l) = &link {
        s.push_str(&format!(
            " predicted on {l} (s) | predicted speedup | predicted vs measured |"
        ));
        rule.push_str("---|---|---|");
    }
    s.push('\n');
    s.push_str(&rule);
    s.push('\n');
    let opt = |v: Option<usize>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:.2}x | {:.1} | {} | {:.2} | {} | {} | {:.2} | {:.3e} | {} | {} | {} | {} | {:.0}% | {} | {} |",
            r.strategy,
            r.cache,
            r.world_size,
            r.transport,
            r.seconds,
            r.speedup,
            r.forwards,
            r.cached_steps,
            r.step_overhead_ms,
            r.bytes_sent,
            r.reference_bytes_sent,
            r.psnr_db,
            r.max_abs_diff,
            opt(r.tau1),
            opt(r.tau2),
            r.pipelined_steps,
            flops_cell(&r.rank_flops),
            100.0 * r.flops_spread,
            if r.setup.is_empty() { "-" } else { &r.setup },
            devices_cell(&r.rank_devices, &r.transfer),
        ));
        if link.is_some() {
            match &r.predicted {
                Some(p) => s.push_str(&format!(
                    " {:.3} | {:.2}x | {:+.1}% |",
                    p.seconds,
                    p.speedup,
                    100.0 * p.error_vs_measured
                )),
                None => s.push_str(" - | - | - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// ` at 400 TFLOP/s` for FLOP-timed predictions, nothing for measured ones.
pub fn compute_label(c: crate::latency::Compute) -> String {
    match c {
        crate::latency::Compute::Measured => String::new(),
        crate::latency::Compute::Flops { per_second } => {
            format!(" at {} TFLOP/s", per_second / 1e12)
        }
    }
}

/// Per-rank GFLOPs in a few words: `12.1 x4` when equal, else the list.
fn flops_cell(flops: &[f64]) -> String {
    let g: Vec<String> = flops.iter().map(|f| format!("{:.1}", f / 1e9)).collect();
    match g.as_slice() {
        [] => "-".into(),
        [one] => one.clone(),
        _ if g.windows(2).all(|w| w[0] == w[1]) => format!("{} x{}", g[0], g.len()),
        _ => g.join(", "),
    }
}

/// `cpu x2 (host)`, `cuda:0, cuda:1 (device-to-device)`: the devices in a few words.
pub fn devices_cell(devices: &[String], transfer: &str) -> String {
    if devices.is_empty() {
        return "-".into();
    }
    let list = if devices.windows(2).all(|w| w[0] == w[1]) {
        if devices.len() == 1 {
            devices[0].clone()
        } else {
            format!("{} x{}", devices[0], devices.len())
        }
    } else {
        devices.join(", ")
    };
    if devices.len() == 1 || transfer.is_empty() {
        list
    } else {
        format!("{list} ({transfer})")
    }
}

/// The latency model over recorded traces (`bench --from-trace`): one row per trace (named by
/// its file), with the measured latency, the prediction on `link`, and the predicted speedup
/// over the trace of `serial` when there is one.
///
/// # Errors
/// A trace without the per-rank counts the model needs ([`crate::latency::costs_of`]).
pub fn trace_table(
    traces: &[(String, crate::Trace)],
    link: &crate::latency::Link,
    compute: crate::latency::Compute,
) -> Result<String> {
    let serial = traces
        .iter()
        .find(|(_, t)| t.strategy == "serial")
        .map(|(_, t)| crate::latency::predict_trace_with(t, link, compute))
        .transpose()?;
    let mut s = format!(
        "| trace | strategy | ranks | devices | measured (s) | bytes sent | staged steps | compute-bound (s) | link adds (ms) | predicted on {}{} (s) | predicted speedup | predicted vs measured |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        link.name,
        compute_label(compute)
    );
    for (name, t) in traces {
        let p = crate::latency::predict_trace_with(t, link, compute)?;
        let speedup = serial
            .as_ref()
            .map(|b| format!("{:.2}x", b.seconds / p.seconds))
            .unwrap_or_else(|| "- (no serial trace)".into());
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {:.3} | {} | {} | {:.3} | {:.3} | {:.3} | {speedup} | {:+.1}% |\n",
            t.strategy,
            t.world_size,
            devices_cell(&t.rank_devices, &t.transfer),
            t.total_seconds,
            t.bytes_sent,
            crate::latency::staged_steps(t),
            p.compute_seconds,
            1e3 * p.link_seconds,
            p.seconds,
            100.0 * (p.seconds / t.total_seconds - 1.0),
        ));
    }
    Ok(s)
}
