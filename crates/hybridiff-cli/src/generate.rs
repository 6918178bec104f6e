//! `hybridiff generate`: prompts in, PNGs out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use hybridiff_comm::Communicator;
use hybridiff_engine::io::{check_output_path, load_safetensors, save_png, write_bytes_atomic};
use hybridiff_engine::pipeline::{Pipeline, Request};
use hybridiff_engine::{RunOptions, Strategy};
use serde::Deserialize;

use crate::strategy_args::ModelDefaults;

/// Arguments of `hybridiff generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers pipeline folder (with model_index.json) [default: the model built
    /// into this binary: coloured shapes, see models/default/MODEL_CARD.md].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt (or use --prompts for a batch).
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// A batch: one prompt per line, or a JSON list of {prompt, negative_prompt, seed};
    /// --out is then a folder that gets one PNG per prompt and manifest.json.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Denoising steps [default: the model folder's hybridiff.json, else 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale [default: 7 for SD3, 5 otherwise].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Image height in pixels [default: the denoiser's sample size].
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels [default: the denoiser's sample size].
    #[arg(long)]
    pub width: Option<usize>,
    /// Seed of the starting noise (ChaCha8 + standard normal; the same on every machine
    /// and strategy). In a batch, prompt i without its own seed uses seed + i.
    #[arg(long, default_value_t = 0, conflicts_with = "latents")]
    pub seed: u64,
    /// Start from the `latents` tensor of this safetensors file instead.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Write the per-step JSON trace here (single image).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Output PNG (single prompt) or folder (--prompts).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub run: crate::strategy_args::RunArgs,
}

#[derive(Debug, Deserialize)]
struct BatchItem {
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
}

fn read_batch(path: &Path, negative: &str, base_seed: u64) -> Result<Vec<BatchItem>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--prompts {}: cannot read the file", path.display()))?;
    let mut items: Vec<BatchItem> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).with_context(|| {
            format!(
                "--prompts {}: expected a JSON list of {{prompt, negative_prompt, seed}}",
                path.display()
            )
        })?
    } else {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| BatchItem {
                prompt: l.to_string(),
                negative_prompt: None,
                seed: None,
            })
            .collect()
    };
    if items.is_empty() {
        bail!("--prompts {}: no prompts in the file", path.display());
    }
    for (i, it) in items.iter_mut().enumerate() {
        it.negative_prompt
            .get_or_insert_with(|| negative.to_string());
        it.seed.get_or_insert(base_seed + i as u64);
    }
    Ok(items)
}

pub fn run(args: GenerateArgs, launch: &crate::launch::Launch) -> Result<()> {
    let device = Device::Cpu;
    let model_dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let defaults = ModelDefaults::read(&model_dir)?;
    let run = args
        .run
        .resolve_in(&device, &defaults, launch.processes())?;
    // Only rank 0 writes, so only its paths are checked (other hosts may not even have them).
    let root = launch.is_root();
    let batch = match (&args.prompt, &args.prompts) {
        (Some(_), _) => None,
        (None, Some(p)) => Some(read_batch(p, &args.negative_prompt, args.seed)?),
        (None, None) => bail!("give --prompt TEXT or --prompts FILE"),
    };
    if root {
        match &batch {
            None => check_output_path(&args.out, "--out")?,
            Some(_) => std::fs::create_dir_all(&args.out).with_context(|| {
                format!("--out {}: cannot create the folder", args.out.display())
            })?,
        }
        if let Some(p) = &args.trace {
            check_output_path(p, "--trace")?;
        }
    }
    let steps = args.steps.or(defaults.steps).unwrap_or(50);
    let pipeline = Pipeline::load(&model_dir, run.dtype, &device)?;
    let latents = match &args.latents {
        Some(p) => Some(
            load_safetensors(p, &device)?
                .remove("latents")
                .with_context(|| format!("--latents {}: no tensor named `latents`", p.display()))?,
        ),
        None => None,
    };
    let opts = &run.options;
    let mut comm = launch.communicator(opts.comm_timeout)?;
    let scheduler = run.scheduler;
    let request = |prompt: &str, negative: &str, seed: u64| Request {
        prompt: prompt.to_string(),
        negative_prompt: negative.to_string(),
        steps,
        guidance: args.guidance.or(defaults.guidance),
        scheduler,
        height: args.height,
        width: args.width,
        latents: latents.clone(),
        seed,
    };
    match batch {
        None => {
            let prompt = args.prompt.as_deref().unwrap_or_default();
            let req = request(prompt, &args.negative_prompt, args.seed);
            let start = Instant::now();
            let img = generate_one(&pipeline, &req, run.strategy.as_ref(), opts, &mut comm)?;
            let Some(img) = img else {
                return Ok(()); // not rank 0: rank 0 writes the image
            };
            save_png(&args.out, img.width, img.height, img.rgb)?;
            if let Some(p) = &args.trace {
                write_bytes_atomic(p, serde_json::to_string_pretty(&img.trace)?.as_bytes())?;
            }
            println!(
                "wrote {} ({}x{}, {} steps, {} on {} rank(s), {:.2} s)",
                args.out.display(),
                img.width,
                img.height,
                steps,
                run.kind,
                opts.world_size,
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Some(items) => run_batch(&pipeline, &items, &request, &run, &args.out, &mut comm),
    }
}

/// One image, or `None` on a process other than rank 0 of a multi-process job.
fn generate_one(
    pipeline: &Pipeline,
    req: &Request,
    strategy: &dyn Strategy,
    opts: &RunOptions,
    comm: &mut Option<Box<dyn Communicator>>,
) -> Result<Option<hybridiff_engine::pipeline::Generated>> {
    let bar = crate::progress_bar(req.steps, comm.as_ref().is_none_or(|c| c.rank() == 0));
    let progress = |done: usize, _total: usize| bar.set_position(done as u64);
    let img = match comm {
        None => Some(pipeline.generate(req, strategy, opts, Some(&progress))?),
        Some(c) => pipeline.generate_on(req, strategy, opts, Some(&progress), c.as_mut())?,
    };
    bar.finish_and_clear();
    Ok(img)
}

fn run_batch(
    pipeline: &Pipeline,
    items: &[BatchItem],
    request: &dyn Fn(&str, &str, u64) -> Request,
    run: &crate::strategy_args::Run,
    out: &Path,
    comm: &mut Option<Box<dyn Communicator>>,
) -> Result<()> {
    let (strategy, opts, kind) = (run.strategy.as_ref(), &run.options, run.kind);
    let root = comm.as_ref().is_none_or(|c| c.rank() == 0);
    let mut manifest = Vec::new();
    let mut failed = 0;
    for (i, it) in items.iter().enumerate() {
        let file = format!("{i:04}.png");
        let seed = it.seed.unwrap_or_default();
        let negative = it.negative_prompt.clone().unwrap_or_default();
        let start = Instant::now();
        let result = generate_one(
            pipeline,
            &request(&it.prompt, &negative, seed),
            strategy,
            opts,
            comm,
        )
        .and_then(|img| match img {
            Some(img) => {
                save_png(&out.join(&file), img.width, img.height, img.rgb)?;
                Ok(Some(img.trace))
            }
            None => Ok(None),
        });
        let mut entry = serde_json::json!({
            "prompt": it.prompt,
            "negative_prompt": negative,
            "seed": seed,
            "strategy": kind.to_string(),
            "seconds": start.elapsed().as_secs_f64(),
        });
        match result {
            Ok(None) => continue, // not rank 0: rank 0 writes images and manifest
            Ok(Some(trace)) => {
                entry["file"] = file.clone().into();
                entry["tau1"] = serde_json::json!(trace.tau1);
                entry["tau2"] = serde_json::json!(trace.tau2);
                println!("{file}: {}", it.prompt);
            }
            Err(e) => {
                failed += 1;
                entry["error"] = format!("{e:#}").into();
                eprintln!("hybridiff: prompt {i} failed: {e:#}");
                if !root {
                    continue;
                }
            }
        }
        manifest.push(entry);
        // Rewritten after each prompt so an interrupted batch keeps its record.
        write_bytes_atomic(
            &out.join("manifest.json"),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
    }
    if failed > 0 {
        bail!(
            "{failed} of {} prompts failed; see {}",
            items.len(),
            out.join("manifest.json").display()
        );
    }
    Ok(())
}
