//! `hybridiff bench`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use candle_core::Device;
use hybridiff_engine::bench::{forward_seconds, random_inputs};
use hybridiff_engine::io::{check_output_path, write_bytes_atomic};
use hybridiff_engine::{denoise, Job, Model, RunOptions, StrategyKind};

/// Arguments of `hybridiff bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A diffusers model folder (see `hybridiff init` for random-weight ones).
    #[arg(long)]
    pub model: PathBuf,
    /// Latent height and width [default: the U-Net's sample_size].
    #[arg(long)]
    pub latent_size: Option<usize>,
    /// Text tokens in the stand-in prompt embeddings.
    #[arg(long, default_value_t = 77)]
    pub context_len: usize,
    /// Steps of the whole-run comparison.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Compute threads per rank (serial gets the same, on one rank).
    #[arg(long, default_value_t = 1)]
    pub threads_per_rank: usize,
    /// Timed forwards per batch size (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(p) = &args.json {
        check_output_path(p, "--json")?;
    }
    crate::set_compute_threads(args.threads_per_rank);
    let device = Device::Cpu;
    let dtype = crate::denoise::parse_dtype(&args.dtype, &device)?;
    let model = Model::load(&args.model, dtype, &device)?;
    let size = args.latent_size.or(model.sample_size()).unwrap_or(64);
    let inputs = random_inputs(
        &model.input_spec,
        (size, size),
        args.context_len,
        0,
        &device,
    )?;
    let scheduler = crate::denoise::parse_scheduler(None, &model)?;
    let tpr = args.threads_per_rank;

    println!(
        "model {} | latents {size}x{size} | {} | {tpr} thread(s) per rank",
        args.model.display(),
        args.dtype
    );
    let f1 = forward_seconds(&model, &inputs, 1, args.repeats, tpr)?;
    let f2 = forward_seconds(&model, &inputs, 2, args.repeats, tpr)?;
    println!("denoiser forward, batch 1: {f1:.4} s");
    println!(
        "denoiser forward, batch 2: {f2:.4} s  ({:.2}x batch 1)",
        f2 / f1
    );

    let job = Job {
        model: model.denoiser.as_ref(),
        scheduler_config: &model.scheduler_config,
        scheduler,
        steps: args.steps,
        guidance: args.guidance,
        inputs: &inputs,
        progress: None,
    };
    let mut rows = Vec::new();
    let mut serial_seconds = None;
    for (kind, world) in [(StrategyKind::Serial, 1), (StrategyKind::Cfg, 2)] {
        let opts = RunOptions {
            world_size: world,
            threads_per_rank: tpr,
            comm_timeout: Duration::from_secs(3600),
        };
        let out = denoise(&job, kind.build().as_ref(), &opts)?;
        let secs = out.trace.total_seconds;
        let base = *serial_seconds.get_or_insert(secs);
        rows.push(serde_json::json!({
            "strategy": kind.to_string(),
            "world_size": world,
            "seconds": secs,
            "speedup": base / secs,
            "bytes_sent": out.trace.bytes_sent,
        }));
    }
    println!();
    println!(
        "| strategy | ranks | {} steps (s) | speedup | bytes sent |",
        args.steps
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.2}x | {} |",
            r["strategy"].as_str().unwrap_or(""),
            r["world_size"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["speedup"].as_f64().unwrap_or(0.0),
            r["bytes_sent"]
        );
    }
    if let Some(p) = &args.json {
        let v = serde_json::json!({
            "model": args.model.display().to_string(),
            "latent_size": size,
            "threads_per_rank": tpr,
            "dtype": args.dtype,
            "forward_seconds": { "batch1": f1, "batch2": f2 },
            "runs": rows,
        });
        write_bytes_atomic(p, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}
