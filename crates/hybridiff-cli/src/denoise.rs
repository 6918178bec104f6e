//! `hybridiff denoise`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use hybridiff_engine::io::{encode_png, save_safetensors, write_bytes_atomic};
use hybridiff_engine::{denoise, denoise_rank, DenoiseInputs, Job, Model};
use hybridiff_schedulers::SchedulerKind;

use crate::outputs::{Format, Plan};

/// Arguments of `hybridiff denoise`.
#[derive(clap::Args, Debug)]
pub struct DenoiseArgs {
    /// A diffusers model folder (with unet/ and scheduler/; vae/ for --decode), or a
    /// single-file SD 1.x / 2.x / SDXL base .safetensors checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub model_args: crate::strategy_args::ModelArgs,
    /// safetensors with `latents`, `prompt_embeds`, `negative_prompt_embeds`,
    /// `pooled_prompt_embeds`, `negative_pooled_prompt_embeds` (and optionally `time_ids`).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write `latents` and `step_latents` (safetensors; not an image name).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off (one conditional
    /// forward per step, as in diffusers).
    #[arg(long, default_value_t = 5.0, allow_hyphen_values = true)]
    pub guidance: f64,
    /// Write a per-step JSON trace here.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Decode the final latents with the model's VAE and write this PNG (the name ends in
    /// .png).
    #[arg(long)]
    pub decode: Option<PathBuf>,
    /// Seed of the step noise of stochastic samplers (euler-a, dpmpp-2m-sde, lcm), drawn by
    /// --noise: the same on every strategy and rank (the starting latents are the inputs
    /// file's).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The generator of that step noise: `chacha8` (default) or `torch` (diffusers'
    /// `torch.Generator("cpu").manual_seed(SEED)` as its schedulers draw from it after given
    /// latents: the first noisy step starts the generator).
    #[arg(long, default_value = "chacha8", value_name = "chacha8|torch")]
    pub noise: String,
    #[command(flatten)]
    pub run: crate::strategy_args::RunArgs,
}

/// `--scheduler` (ours or a diffusers class name, read against the model's config, which
/// picks DPMSolverMultistepScheduler's algorithm; else the model's own), checked against the
/// model's training objective and for a schedule of `steps` steps at the model's sample
/// size (see [`Model::scheduler`]).
pub(crate) fn parse_scheduler(
    s: Option<&str>,
    model: &Model,
    steps: usize,
) -> Result<SchedulerKind> {
    let requested = match s {
        Some(s) => Some(
            SchedulerKind::resolve(s, &model.scheduler_config)
                .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?,
        ),
        None => None,
    };
    Ok(model.scheduler(requested, steps, &model.schedule_options(false, None))?)
}

pub fn run(args: DenoiseArgs, launch: &crate::launch::Launch) -> Result<()> {
    args.run.devices.precheck()?;
    hybridiff_engine::check_guidance(args.guidance)?;
    let noise: hybridiff_engine::NoiseKind = args
        .noise
        .parse()
        .map_err(|e| anyhow::anyhow!("--noise {e}"))?;
    let mut run = args.run.resolve(
        &crate::strategy_args::ModelDefaults::read(&args.model)?,
        args.steps,
        launch.processes(),
    )?;
    // Only rank 0 writes, so only its paths are checked (other hosts may not even have them).
    let root = launch.is_root();
    run.announce(args.guidance, args.steps, root)?;
    let mut plan = Plan::new();
    plan.file("--out", &args.out, Format::Safetensors)
        .input("--inputs", &args.inputs);
    if let Some(p) = &args.trace {
        plan.file("--trace", p, Format::Json);
    }
    if let Some(p) = &args.decode {
        plan.file("--decode", p, Format::Png);
    }
    // Nothing may land in or on the model or a file its flags name.
    let model_inputs = args.model_args.inputs();
    let mut spare: Vec<(&str, &std::path::Path)> = vec![("--model", args.model.as_path())];
    spare.extend(model_inputs.iter().map(|(f, p)| (*f, p.as_path())));
    let ready = match root {
        true => Some(plan.check(&spare)?),
        false => None,
    };
    let device = run.device.clone();
    // The text encoders are not used here: text-encoder LoRA modules are left out.
    let resolved = args.model_args.spec(&args.model)?.resolve(false)?;
    if let (true, Some(line)) = (root, resolved.summary()) {
        eprintln!("hybridiff: {line}");
    }
    let model = Model::load_resolved(&resolved, run.dtype, &device)?;
    run.check_cache_fits(model.denoiser.as_ref())?;
    run.options.placement = crate::strategy_args::load_replicas(
        std::mem::take(&mut run.options.placement),
        &resolved,
        run.dtype,
    )?;
    let inputs = DenoiseInputs::load(&args.inputs, &model.input_spec, &device)?;
    let latent = (inputs.latents.dim(2)?, inputs.latents.dim(3)?);
    let scheduler = model.scheduler(
        run.scheduler_kind(&model.scheduler_config)?,
        args.steps,
        &model.schedule_options(run.karras, Some(latent)),
    )?;
    let vae = match &args.decode {
        Some(_) if root => {
            let (h, w) = (inputs.latents.dim(2)?, inputs.latents.dim(3)?);
            model.check_decode_memory((h, w))?;
            Some(model.load_vae()?)
        }
        _ => None,
    };

    let bar = crate::progress_bar(args.steps, root);
    let progress = |done: usize, _total: usize| bar.set_position(done as u64);
    let job = Job {
        model: model.denoiser.as_ref(),
        scheduler_config: &model.scheduler_config,
        scheduler,
        steps: args.steps,
        guidance: args.guidance,
        inputs: &inputs,
        progress: Some(&progress),
        sampling: hybridiff_engine::SamplingOptions {
            karras: run.karras,
            guidance_rescale: run.guidance_rescale,
            noise: hybridiff_engine::Noise::new(noise, args.seed),
        },
    };
    let opts = &run.options;
    let out = match launch.communicator_for(opts.comm_timeout, run.nccl, &run.device)? {
        None => Some(denoise(&job, run.strategy.as_ref(), opts)?),
        Some(mut comm) => denoise_rank(&job, run.strategy.as_ref(), opts, comm.as_mut())?,
    };
    bar.finish_and_clear();
    let Some(out) = out else {
        return Ok(()); // not rank 0: rank 0 writes the outputs
    };

    // Everything is computed before anything is written, so a failed decode (or trace)
    // leaves no output behind.
    let png = match (&args.decode, vae) {
        (Some(path), Some(vae)) => {
            let image = vae.decode_latents(&out.latents.to_dtype(DType::F32)?)?;
            let (w, h, rgb) = hybridiff_models::vae::to_rgb8(&image)?;
            Some(encode_png(path, w, h, rgb)?)
        }
        _ => None,
    };
    let trace_json = match &args.trace {
        Some(_) => Some(serde_json::to_string_pretty(&out.trace).context("serialising the trace")?),
        None => None,
    };
    let mut tensors = HashMap::new();
    tensors.insert("latents".to_string(), out.latents.to_dtype(DType::F32)?);
    tensors.insert(
        "step_latents".to_string(),
        out.step_latents.to_dtype(DType::F32)?,
    );
    if let Some(r) = &ready {
        r.prepare()?;
    }
    save_safetensors(&args.out, &tensors)?;
    if let (Some(path), Some(json)) = (&args.trace, &trace_json) {
        write_bytes_atomic(path, json.as_bytes())?;
    }
    if let (Some(path), Some(png)) = (&args.decode, &png) {
        write_bytes_atomic(path, png)?;
    }
    println!(
        "{} on {} rank(s) x {} thread(s): {} steps in {:.3} s, {} bytes sent; wrote {}",
        out.trace.strategy,
        opts.world_size,
        opts.threads_per_rank,
        args.steps,
        out.trace.total_seconds,
        out.trace.bytes_sent,
        args.out.display()
    );
    Ok(())
}
