//! `hybridiff tune`: chooses Hybridiff's switching thresholds, `k` and run knobs for a model
//! (the search is `hybridiff_engine::tune`; this file runs it, measures, and writes
//! `hybridiff.json` and the report).
//!
//! Order of work: every flag, output path and the model are checked first; then serial runs
//! once per tuning input (the references and their rel-MAE curves); the grid's schedules are
//! predicted from the curves and hybrid runs once per distinct (input, pipelined steps,
//! knobs); latency is predicted from the measured exact, fill and pipelined step costs;
//! the fastest candidate meeting the floor is validated on held-out seeds; the report folder
//! (assembled under a temporary name) and `hybridiff.json` (temporary file) are renamed into
//! place at the end, so a failed or interrupted tune leaves neither half-written.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use hybridiff_engine::cache::CacheSpec;
use hybridiff_engine::io::{
    check_distinct_paths, check_output_path, check_outside_folder, check_writable_folder,
    write_bytes_atomic,
};
use hybridiff_engine::latency::Link;
use hybridiff_engine::pipeline::{Pipeline, Request};
use hybridiff_engine::stages::PlanKind;
use hybridiff_engine::strategy::hybrid::PipelineLayout;
use hybridiff_engine::switch::SwitchParams;
use hybridiff_engine::tune::{
    self, CacheKnob, Floor, FloorOn, Grid, Knobs, Outcome, Plan, Quality, Schedule, StepCosts,
};
use hybridiff_engine::{
    DenoiseInputs, Job, Model, PipelinedGuidance, RunOptions, Runner, StrategyKind,
    StrategyOptions, Trace,
};
use hybridiff_models::lpips::Lpips;

use crate::strategy_args::ModelDefaults;

/// Arguments of `hybridiff tune`.
#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    /// A diffusers pipeline folder or a single-file checkpoint (quality is measured on
    /// decoded images), or a bare denoiser folder such as `hybridiff init` writes (quality
    /// is the PSNR of the final latents, on seeded random prompt embeddings) [default: the
    /// built-in model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts to tune on: one per line, or a .json / .jsonl list of {prompt,
    /// negative_prompt} as `generate --prompts` reads [default: a built-in varied set: the
    /// built-in model's five README prompts, or six general ones for other pipelines].
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Seeds per prompt used for tuning (seed, seed + 1, ...), 1 to 100.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub seeds: u64,
    /// Held-out seeds per prompt (after the tuning seeds) on which the choice is validated,
    /// 0 to 100.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub holdout_seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ranks of the hybrid runs (those the hybrid strategy takes: 2 or 4).
    #[arg(long, default_value_t = 2)]
    pub world_size: usize,
    /// Compute threads per rank; serial runs on one rank with as many [default: cores /
    /// world size].
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// Denoising steps [default: the model folder's hybridiff.json, else 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale, above 1 (hybrid splits the CFG branches) [default: hybridiff.json,
    /// else 7 for SD3, 5 otherwise].
    #[arg(long, allow_hyphen_values = true)]
    pub guidance: Option<f64>,
    /// The sampler, as `generate --scheduler` takes it (our name or diffusers' class name;
    /// see README, "Samplers") [default: the model's scheduler_config.json]
    #[arg(long)]
    pub scheduler: Option<String>,
    /// f32 or f16 (bf16 on CUDA builds).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Latent height and width of a bare denoiser folder's random inputs [default: its
    /// sample_size].
    #[arg(long)]
    pub latent_size: Option<usize>,
    /// Quality floor: PSNR against serial in dB (the default floor is 30 dB).
    #[arg(long, group = "floor", allow_hyphen_values = true)]
    pub min_psnr: Option<f64>,
    /// Quality floor: SSIM against serial (pipelines only).
    #[arg(long, group = "floor", allow_hyphen_values = true)]
    pub min_ssim: Option<f64>,
    /// Quality floor: LPIPS distance to serial (pipelines only; needs --lpips).
    #[arg(long, group = "floor", requires = "lpips", allow_hyphen_values = true)]
    pub max_lpips: Option<f64>,
    /// LPIPS weights (see `compare --lpips`); with them LPIPS is measured and reported
    /// whatever the floor.
    #[arg(long)]
    pub lpips: Option<PathBuf>,
    /// Apply the floor to every prompt and seed, or to their mean.
    #[arg(long, default_value = "every", value_parser = ["every", "average"])]
    pub floor_on: String,
    /// Predict latency with the ranks on devices joined by this link (pcie3, pcie4, nvlink,
    /// GB/s[/us], as bench) [default: compute only, for ranks whose exchanges are free].
    #[arg(long)]
    pub simulate_link: Option<String>,
    /// Grid: windows L, comma-separated [default: 2,3,4,6,8,12 below --steps].
    #[arg(long, value_delimiter = ',')]
    pub l_slope: Option<Vec<usize>>,
    /// Grid: flatness slopes [default: 1e-4,2e-4,5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2].
    #[arg(long, value_delimiter = ',')]
    pub eps_slope: Option<Vec<f64>>,
    /// Grid: pipelined steps k [default: 10, 15, 25 and 35% of --steps].
    #[arg(long, value_delimiter = ',')]
    pub k: Option<Vec<usize>>,
    /// Grid: fallback steps tau_cap [default: 30, 45, 60 and 75% of --steps].
    #[arg(long, value_delimiter = ',')]
    pub tau_cap: Option<Vec<usize>>,
    /// Grid: stage plans (default, reference, auto, measured).
    #[arg(long, value_delimiter = ',', default_value = "default")]
    pub stages: Vec<String>,
    /// Grid: pipelined-step predictions (none, reuse).
    #[arg(long, value_delimiter = ',', default_value = "none,reuse")]
    pub pipelined_guidance: Vec<String>,
    /// Grid: pipelined steps' layouts at --world-size 4 or 8 (across, per-branch; see
    /// README, "Which strategy for 2, 4 and 8 devices"); per-branch runs with
    /// --pipelined-guidance none only [default: the default layout].
    #[arg(long, value_delimiter = ',')]
    pub pipeline_layout: Option<Vec<String>>,
    /// Grid: a step cache on top of each candidate, as `generate --cache` takes it
    /// (repeatable; every candidate also runs without a cache). Leave the method's first
    /// parameter out to try several values: `teacache` tries threshold 0.05, 0.1, 0.15,
    /// 0.2, 0.25, 0.3; `deepcache` interval 2 to 5. Hybridiff's detection steps always
    /// compute, so the schedules stay predicted from serial's curve.
    #[arg(long, value_name = "METHOD[:KEY=VALUE,...]")]
    pub cache: Vec<String>,
    /// Where to write the chosen values (the `hybridiff.json` that generate, denoise, bench
    /// and serve read from a model folder; `--model DIR --out DIR/hybridiff.json` writes the
    /// model's own).
    #[arg(long)]
    pub out: PathBuf,
    /// The report folder to create (must not exist, or be empty): report.md, tune.json and
    /// the PNG plots.
    #[arg(long)]
    pub report: PathBuf,
    #[command(flatten)]
    pub model_args: crate::strategy_args::ModelArgs,
    #[command(flatten)]
    pub devices: crate::strategy_args::DeviceArgs,
}

/// The default model's prompts (the README's picture).
const DEFAULT_MODEL_PROMPTS: [&str; 5] = [
    "a red circle on a white background",
    "a blue square on a white background",
    "a purple circle on a white background",
    "a yellow square on a gray background",
    "a green triangle on a black background",
];

/// Prompts for other pipelines: a portrait, a landscape, an object, text, an interior and
/// an abstract picture (their rel-MAE curves differ most).
const GENERAL_PROMPTS: [&str; 6] = [
    "a portrait photo of an old fisherman, soft window light",
    "a wide mountain landscape at sunrise with a lake",
    "a red sports car on a wet street at night, neon reflections",
    "a wooden sign with the word OPEN painted in white",
    "a cozy living room with a fireplace and bookshelves",
    "an abstract painting of blue and orange swirls",
];

/// Random conditionings of a bare denoiser folder (no text encoder).
const BARE_PROMPTS: usize = 3;

/// What is denoised: prompts through a pipeline, or random embeddings for a bare denoiser.
enum Subject {
    Pipeline(Box<Pipeline>),
    Bare { model: Box<Model>, latent: usize },
}

impl Subject {
    fn model(&self) -> &Model {
        match self {
            Self::Pipeline(p) => &p.model,
            Self::Bare { model, .. } => model,
        }
    }
}

/// One prompt (or random conditioning) and seed.
#[derive(Debug, Clone)]
struct Input {
    prompt_index: usize,
    label: String,
    prompt: Option<(String, Option<String>)>,
    seed: u64,
}

/// A run's output to compare: an RGB image or latents.
enum Output {
    Image {
        width: usize,
        height: usize,
        rgb: Vec<u8>,
    },
    Latents(Tensor),
}

/// Everything a run needs that does not change between runs.
struct Ctx<'a> {
    subject: &'a Subject,
    steps: usize,
    guidance: f64,
    scheduler: hybridiff_schedulers::SchedulerKind,
    lpips: Option<&'a Lpips>,
}

impl Ctx<'_> {
    fn inputs(&self, input: &Input) -> Result<DenoiseInputs> {
        Ok(match self.subject {
            Subject::Pipeline(p) => {
                let (prompt, negative) = input.prompt.clone().unwrap_or_default();
                p.prepare(&self.request(&prompt, negative.as_deref(), input.seed))?
            }
            Subject::Bare { model, latent } => hybridiff_engine::bench::random_inputs(
                &model.input_spec,
                (*latent, *latent),
                77,
                // Embeddings from the prompt's index, latents from the seed: one stream.
                input
                    .seed
                    .wrapping_mul(1000)
                    .wrapping_add(input.prompt_index as u64),
                &model.device,
            )?,
        })
    }

    fn request(&self, prompt: &str, negative: Option<&str>, seed: u64) -> Request {
        Request {
            prompt: prompt.to_string(),
            negative_prompt: negative.map(str::to_string),
            steps: self.steps,
            guidance: Some(self.guidance),
            scheduler: Some(self.scheduler),
            karras: false,
            guidance_rescale: 0.0,
            height: None,
            width: None,
            latents: None,
            seed,
            noise: Default::default(),
        }
    }

    /// Runs `kind` with `options` on `runner` for `input`; returns the output and trace.
    fn run(
        &self,
        runner: &Runner,
        input: &Input,
        kind: StrategyKind,
        options: &StrategyOptions,
    ) -> Result<(Output, Trace)> {
        let inputs = self.inputs(input)?;
        let model = self.subject.model();
        let job = Job {
            model: model.denoiser.as_ref(),
            scheduler_config: &model.scheduler_config,
            scheduler: self.scheduler,
            steps: self.steps,
            guidance: self.guidance,
            inputs: &inputs,
            progress: None,
            sampling: Default::default(),
        };
        let strategy = kind.build(options);
        let out = runner
            .denoise(&job, strategy.as_ref(), None)
            .with_context(|| format!("{kind} on {}", input.label))?;
        let output = match self.subject {
            Subject::Pipeline(p) => {
                let image = p.vae.decode_latents(&out.latents.to_dtype(DType::F32)?)?;
                let (w, h, rgb) = hybridiff_models::vae::to_rgb8(&image)?;
                Output::Image {
                    width: w as usize,
                    height: h as usize,
                    rgb,
                }
            }
            Subject::Bare { .. } => Output::Latents(out.latents.to_dtype(DType::F32)?),
        };
        Ok((output, out.trace))
    }

    fn quality(&self, reference: &Output, out: &Output) -> Result<Quality> {
        Ok(match (reference, out) {
            (
                Output::Image {
                    width,
                    height,
                    rgb: a,
                },
                Output::Image { rgb: b, .. },
            ) => {
                let (psnr_db, ssim, lpips) =
                    hybridiff_engine::metrics::image_quality(a, b, *width, *height, self.lpips)?;
                Quality {
                    psnr_db,
                    ssim: Some(ssim),
                    lpips,
                }
            }
            (Output::Latents(a), Output::Latents(b)) => Quality {
                psnr_db: hybridiff_engine::metrics::psnr(b, a)?,
                ssim: None,
                lpips: None,
            },
            _ => bail!("a run's output differs in kind from serial's"),
        })
    }
}

fn floor_of(args: &TuneArgs) -> Result<Floor> {
    let bad =
        |flag: &str, v: f64, expected: &str| anyhow::anyhow!("--{flag} {v}: expected {expected}");
    Ok(match (args.min_psnr, args.min_ssim, args.max_lpips) {
        (Some(v), _, _) => {
            if !v.is_finite() || v <= 0.0 || v > tune::PSNR_CAP_DB {
                return Err(bad("min-psnr", v, "a PSNR in dB above 0 and at most 100"));
            }
            Floor::MinPsnr(v)
        }
        (_, Some(v), _) => {
            if !v.is_finite() || v <= -1.0 || v > 1.0 {
                return Err(bad("min-ssim", v, "an SSIM above -1 and at most 1"));
            }
            Floor::MinSsim(v)
        }
        (_, _, Some(v)) => {
            if !v.is_finite() || v < 0.0 {
                return Err(bad("max-lpips", v, "a distance of 0 or more"));
            }
            Floor::MaxLpips(v)
        }
        _ => Floor::MinPsnr(30.0),
    })
}

fn grid_of(args: &TuneArgs, steps: usize) -> Result<Grid> {
    let mut grid = Grid::default_for(steps);
    if let Some(v) = &args.l_slope {
        grid.l_slope = v.clone();
    }
    if let Some(v) = &args.eps_slope {
        grid.eps_slope = v.clone();
    }
    if let Some(v) = &args.k {
        grid.k = v.clone();
    }
    if let Some(v) = &args.tau_cap {
        grid.tau_cap = v.clone();
    }
    let stages = args
        .stages
        .iter()
        .map(|s| s.trim().parse::<PlanKind>())
        .collect::<Result<Vec<_>, _>>()?;
    let guidance = args
        .pipelined_guidance
        .iter()
        .map(|s| s.trim().parse::<PipelinedGuidance>())
        .collect::<Result<Vec<_>, _>>()?;
    let layouts: Vec<Option<PipelineLayout>> = match &args.pipeline_layout {
        None => vec![None],
        Some(v) => v
            .iter()
            .map(|s| s.trim().parse::<PipelineLayout>().map(Some))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let caches = cache_grid(&args.cache)?;
    let mut knobs = Vec::new();
    for &stages in &stages {
        for &pipelined_guidance in &guidance {
            for &pipeline_layout in &layouts {
                // per-branch pipelined steps are guided already: reuse does not apply.
                if pipeline_layout == Some(PipelineLayout::PerBranch)
                    && pipelined_guidance == PipelinedGuidance::Reuse
                {
                    continue;
                }
                for &cache in &caches {
                    knobs.push(Knobs {
                        stages,
                        pipelined_guidance,
                        pipeline_layout,
                        cache,
                    });
                }
            }
        }
    }
    knobs.sort();
    knobs.dedup();
    if knobs.is_empty() && !guidance.is_empty() && !layouts.is_empty() {
        bail!("--pipeline-layout per-branch runs with --pipelined-guidance none only (its pipelined steps compute both branches); add none to --pipelined-guidance");
    }
    grid.knobs = knobs;
    grid.check()?;
    Ok(grid)
}

/// `--cache` values: no cache, then each spec, the ones without their method's first
/// parameter swept over [`tune::cache_sweep`].
fn cache_grid(specs: &[String]) -> Result<Vec<Option<CacheKnob>>> {
    let mut out = vec![None];
    for s in specs {
        if matches!(s.trim(), "default" | "none") {
            bail!(
                "--cache {}: tune searches step caches, so it takes a method to try: teacache (its thresholds swept) or deepcache (its intervals), or METHOD:KEY=VALUE for one setting; every candidate also runs without a cache",
                s.trim()
            );
        }
        let spec = CacheSpec::parse(s, "--cache")?;
        let first = spec.knobs()[0].name;
        let given = s.split_once(':').is_some_and(|(_, params)| {
            params
                .split(',')
                .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == first))
        });
        if given {
            out.push(Some(CacheKnob(spec)));
        } else {
            out.extend(
                tune::cache_sweep(spec)
                    .into_iter()
                    .map(|c| Some(CacheKnob(c))),
            );
        }
    }
    Ok(out)
}

/// Refuses a --report that exists and is not an empty folder, or whose parent cannot take
/// a new folder.
fn check_report_dir(report: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(report);
    if let Ok(m) = &meta {
        if m.file_type().is_symlink() {
            bail!(
                "--report {}: is a symbolic link; give a new folder's path",
                report.display()
            );
        }
        if !m.is_dir() {
            bail!(
                "--report {}: exists and is not a folder; give a new folder's path",
                report.display()
            );
        }
        let mut entries =
            std::fs::read_dir(report).with_context(|| format!("--report {}", report.display()))?;
        if entries.next().is_some() {
            bail!(
                "--report {}: the folder is not empty; give a new folder (the report replaces it whole) or empty it",
                report.display()
            );
        }
    }
    let parent = match report.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--report {}: the folder {} does not exist; create it first",
            report.display(),
            parent.display()
        );
    }
    check_writable_folder(parent, report, "--report")?;
    Ok(())
}

/// Whether `out` names `<model>/hybridiff.json` (the one file tune may write in a model's
/// folder: what it is for).
fn is_model_recommendation(out: &Path, model: &Path) -> bool {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else {
        return false;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    name == "hybridiff.json"
        && matches!((parent.canonicalize(), model.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

fn read_prompts(args: &TuneArgs, default_model: bool) -> Result<Vec<(String, Option<String>)>> {
    Ok(match &args.prompts {
        Some(p) => crate::generate::read_batch(p, None, None, 0)?
            .into_iter()
            .map(|it| (it.prompt, it.negative_prompt))
            .collect(),
        None if default_model => DEFAULT_MODEL_PROMPTS
            .iter()
            .map(|p| (p.to_string(), None))
            .collect(),
        None => GENERAL_PROMPTS
            .iter()
            .map(|p| (p.to_string(), None))
            .collect(),
    })
}

/// Whether `path` lies inside the folder `dir` (both made absolute, symbolic links of
/// existing folders resolved).
fn is_inside(path: &Path, dir: &Path) -> bool {
    let abs = |p: &Path| {
        let a = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        a.canonicalize().unwrap_or(a)
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    abs(parent).starts_with(abs(dir))
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n - 3).collect::<String>())
    }
}

/// One hybrid run's measurements.
#[derive(Debug, Clone)]
struct RunResult {
    quality: Quality,
    /// The schedule the run took (`None` if it never switched: a bug).
    schedule: Option<Schedule>,
    measured_seconds: f64,
    predicted_seconds: f64,
    /// Steps the step cache skipped (`--cache`).
    cached_steps: usize,
}

/// The held-out check of the chosen candidate.
#[derive(Debug, Clone, serde::Serialize)]
struct Validation {
    inputs: Vec<String>,
    values: Vec<f64>,
    worst: f64,
    mean: f64,
    meets: bool,
    predicted_seconds: f64,
    speedup: f64,
    measured_serial_seconds: f64,
    measured_hybrid_seconds: f64,
    tau1: Vec<Option<usize>>,
    tau2: Vec<Option<usize>>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

pub fn run(args: TuneArgs) -> Result<()> {
    let started = Instant::now();
    // Flags first: nothing is read or loaded before they are known good.
    args.devices.precheck()?;
    let floor = floor_of(&args)?;
    let floor_on = if args.floor_on == "average" {
        FloorOn::Average
    } else {
        FloorOn::Every
    };
    let link: Link = match &args.simulate_link {
        Some(l) => l.parse()?,
        None => tune::free_link(),
    };
    // The world sizes hybrid takes are its own check's (on the first input, before any run).
    let world = args.world_size;
    let threads = args
        .threads_per_rank
        .unwrap_or_else(|| crate::default_threads(world));
    let run_opts = |w: usize| RunOptions {
        world_size: w,
        threads_per_rank: threads,
        comm_timeout: std::time::Duration::from_secs(3600),
        placement: Default::default(),
    };
    run_opts(world).check(hybridiff_engine::cores())?;
    if let Some(s) = args.latent_size {
        if s == 0 || s > 1024 {
            bail!("--latent-size {s}: expected 1 to 1024");
        }
    }
    // Outputs before any compute.
    if is_inside(&args.out, &args.report) {
        bail!(
            "--out {} is inside --report {}: the report folder is replaced whole; put hybridiff.json elsewhere",
            args.out.display(),
            args.report.display()
        );
    }
    crate::outputs::check_name("--out", &args.out, crate::outputs::Format::Json)?;
    check_output_path(&args.out, "--out")?;
    check_report_dir(&args.report)?;
    let mut inputs_flags: Vec<(&str, &Path)> = Vec::new();
    if let Some(p) = &args.prompts {
        inputs_flags.push(("--prompts", p));
    }
    if let Some(p) = &args.lpips {
        inputs_flags.push(("--lpips", p));
    }
    check_distinct_paths(
        &[("--out", &args.out), ("--report", &args.report)],
        &inputs_flags,
    )?;
    let default_model = args.model.is_none();
    let model_dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let model_flag = if default_model {
        "the default model's cache folder"
    } else {
        "--model"
    };
    let mut outputs: Vec<(&str, &Path)> = vec![("--report", &args.report)];
    if default_model || !is_model_recommendation(&args.out, &model_dir) {
        outputs.push(("--out", &args.out));
    } else {
        // Only the model's own hybridiff.json; the other model flags' files are spared.
        for (flag, p) in args.model_args.inputs() {
            check_outside_folder(&[("--out", &args.out)], &p, flag)?;
        }
    }
    // No output inside the model's folder or over another model flag's file.
    check_outside_folder(&outputs, &model_dir, model_flag)?;
    for (flag, p) in args.model_args.inputs() {
        check_outside_folder(&outputs, &p, flag)?;
    }

    let defaults = ModelDefaults::read(&model_dir)?;
    let steps = args.steps.or(defaults.steps).unwrap_or(50);
    hybridiff_engine::memory::check_counts(steps, 77)?;
    if steps < 3 {
        bail!(
            "--steps {steps}: too few to tune; hybrid needs an exact step, a fill step and a pipelined one (3 or more steps)"
        );
    }
    let grid = grid_of(&args, steps)?;
    let (fitting, _) = grid.candidates(steps);
    if fitting.is_empty() {
        // Plan::new says which step count would fit; ask it with a placeholder curve.
        Plan::new(&grid, &[vec![0.0; steps]], steps)?;
    }
    if let Some(g) = args.guidance {
        hybridiff_engine::check_guidance(g)?;
    }
    crate::set_compute_threads(threads);
    let devices = args.devices.resolve(world, None, true)?;
    let device = devices.device.clone();
    let dtype = crate::strategy_args::parse_dtype(&args.dtype, &device)?;
    let lpips = match &args.lpips {
        Some(p) => Some(
            Lpips::load(p, &candle_core::Device::Cpu)
                .map_err(|e| anyhow::anyhow!("--lpips: {e}"))?,
        ),
        None => None,
    };
    // A pipeline has text encoders and a VAE (a single file always does); `hybridiff init`
    // folders carry a model_index.json but only the denoiser.
    let is_pipeline = !model_dir.is_dir()
        || (model_dir.join("model_index.json").is_file()
            && model_dir.join("vae").join("config.json").is_file()
            && ["text_encoder", "text_encoder_2", "text_encoder_3"]
                .iter()
                .any(|t| model_dir.join(t).is_dir()));
    // Headers, configs and LoRA files are read and matched before any weight loads.
    let resolved = args.model_args.spec(&model_dir)?.resolve(is_pipeline)?;
    if let Some(line) = resolved.summary() {
        eprintln!("hybridiff: {line}");
    }
    let subject = if is_pipeline {
        if args.latent_size.is_some() {
            bail!("--latent-size: only for a bare denoiser folder; {} is a pipeline (its images have the denoiser's sample size)", model_dir.display());
        }
        Subject::Pipeline(Box::new(Pipeline::load_resolved(
            &resolved, dtype, &device,
        )?))
    } else {
        if args.prompts.is_some() {
            bail!(
                "--prompts: {} has no text encoder or VAE (a bare denoiser folder); it is tuned on {BARE_PROMPTS} seeded random prompt embeddings",
                model_dir.display()
            );
        }
        if !matches!(floor, Floor::MinPsnr(_)) || lpips.is_some() {
            bail!(
                "{}: a bare denoiser folder has no VAE to decode images with; its quality is the PSNR of the final latents (--min-psnr), not SSIM or LPIPS",
                model_dir.display()
            );
        }
        let model = Model::load_resolved(&resolved, dtype, &device)?;
        let latent = args.latent_size.or(model.sample_size()).unwrap_or(64);
        Subject::Bare {
            model: Box::new(model),
            latent,
        }
    };
    let model = subject.model();
    let guidance = args
        .guidance
        .or(defaults.guidance)
        .unwrap_or(match &subject {
            Subject::Pipeline(p) => p.default_guidance(),
            Subject::Bare { .. } => 5.0,
        });
    hybridiff_engine::check_guidance(guidance)?;
    if guidance <= 1.0 {
        bail!(
            "--guidance {guidance}: hybrid needs classifier-free guidance (above 1) to split and to switch on; at {guidance} it runs as serial and there is nothing to tune"
        );
    }
    let scheduler = crate::denoise::parse_scheduler(args.scheduler.as_deref(), model, steps)?;
    hybridiff_schedulers::build(&model.scheduler_config, scheduler, steps)?;
    let ctx = Ctx {
        subject: &subject,
        steps,
        guidance,
        scheduler,
        lpips: lpips.as_ref(),
    };

    // Inputs: prompts x seeds for tuning, then held-out seeds.
    let prompts: Vec<(String, Option<String>)> = match &subject {
        Subject::Pipeline(_) => read_prompts(&args, default_model)?,
        Subject::Bare { .. } => (0..BARE_PROMPTS)
            .map(|i| (format!("random embeddings {i}"), None))
            .collect(),
    };
    let make_inputs = |seeds: std::ops::Range<u64>| -> Vec<Input> {
        let mut v = Vec::new();
        for (pi, (p, n)) in prompts.iter().enumerate() {
            for s in seeds.clone() {
                let seed = args.seed.wrapping_add(s);
                v.push(Input {
                    prompt_index: pi,
                    label: format!("{} / seed {seed}", shorten(p, 48)),
                    prompt: matches!(subject, Subject::Pipeline(_)).then(|| (p.clone(), n.clone())),
                    seed,
                });
            }
        }
        v
    };
    let tuning = make_inputs(0..args.seeds);
    let holdout = make_inputs(args.seeds..args.seeds + args.holdout_seeds);

    // What needs the first input prepared (sizes, memory, the strategy's layout), before
    // any run.
    let first = ctx.inputs(&tuning[0])?;
    if let Subject::Pipeline(p) = &subject {
        let (_, _, lh, lw) = first.latents.dims4()?;
        let (h, w) = (lh * p.vae_factor(), lw * p.vae_factor());
        let min = match floor {
            Floor::MaxLpips(_) => hybridiff_models::lpips::MIN_SIDE,
            _ if lpips.is_some() => hybridiff_models::lpips::MIN_SIDE,
            _ => hybridiff_engine::metrics::SSIM_WINDOW,
        };
        if h < min || w < min {
            bail!(
                "{}: its images are {w}x{h} pixels, smaller than the {min}x{min} that {} needs",
                model_dir.display(),
                if min == hybridiff_engine::metrics::SSIM_WINDOW {
                    "SSIM"
                } else {
                    "LPIPS"
                }
            );
        }
        for (kind, w) in [(StrategyKind::Serial, 1), (StrategyKind::Hybrid, world)] {
            p.check_memory(
                &ctx.request("", None, 0),
                kind.build(&Default::default()).as_ref(),
                &run_opts(w),
            )?;
        }
    }
    let probe_job = Job {
        model: model.denoiser.as_ref(),
        scheduler_config: &model.scheduler_config,
        scheduler,
        steps,
        guidance,
        inputs: &first,
        progress: None,
        sampling: Default::default(),
    };
    for knobs in &grid.knobs {
        // With a cache, the strategy's check also fits the method to the model.
        let strategy = StrategyKind::Hybrid.build(&options_for(&fitting[0].switch, knobs));
        strategy
            .check(&probe_job, world)
            .with_context(|| format!("hybrid on {world} ranks with {knobs}"))?;
        if let Some(c) = knobs.cache {
            c.0.check_steps(steps)?;
            if let Subject::Pipeline(p) = &subject {
                p.check_memory(
                    &ctx.request("", None, 0),
                    strategy.as_ref(),
                    &run_opts(world),
                )?;
            }
        }
    }
    drop(first);

    let placement = crate::strategy_args::load_replicas(devices.placement, &resolved, dtype)?;
    let serial_runner = Runner::start(RunOptions {
        placement: placement.clone(),
        ..run_opts(1)
    })?;
    let hybrid_runner = Runner::start(RunOptions {
        placement,
        ..run_opts(world)
    })?;

    eprintln!(
        "hybridiff: tuning {} on {} prompt(s) x {} seed(s) ({} held out), {steps} steps, guidance {guidance}, {world} ranks x {threads} thread(s); floor {} on {}",
        model_dir.display(),
        prompts.len(),
        args.seeds,
        args.holdout_seeds,
        floor.flag(),
        if floor_on == FloorOn::Every { "every prompt and seed" } else { "average" },
    );
    let bar = run_bar(tuning.len() as u64);
    bar.set_message("serial references");

    // 1. Serial references.
    let t_serial = Instant::now();
    let mut references = Vec::with_capacity(tuning.len());
    let mut serial_traces = Vec::with_capacity(tuning.len());
    for input in &tuning {
        let (out, trace) = ctx.run(
            &serial_runner,
            input,
            StrategyKind::Serial,
            &Default::default(),
        )?;
        references.push(out);
        serial_traces.push(trace);
        bar.inc(1);
    }
    let curves: Vec<Vec<f64>> = serial_traces
        .iter()
        .map(|t| t.rel_mae_log.clone())
        .collect();
    let serial_secs = t_serial.elapsed().as_secs_f64();

    // 2. The plan: one run per distinct schedule.
    let plan = Plan::new(&grid, &curves, steps)?;
    let validation_runs = if args.holdout_seeds > 0 {
        2 * holdout.len()
    } else {
        0
    };
    bar.set_length((tuning.len() + plan.runs.len() + validation_runs) as u64);
    let summary_line = format!(
        "{} candidates ({} grid points did not fit {steps} steps) on {} input(s): the grid would cost {} hybrid runs; {} distinct runs made",
        plan.candidates.len(),
        plan.skipped,
        tuning.len(),
        plan.grid_runs(),
        plan.runs.len()
    );
    bar.suspend(|| eprintln!("hybridiff: {summary_line}"));
    bar.set_message("hybrid runs");

    // 3. Hybrid runs.
    let t_hybrid = Instant::now();
    let mut results: Vec<RunResult> = Vec::with_capacity(plan.runs.len());
    let mut hybrid_traces: Vec<(Knobs, Trace)> = Vec::with_capacity(plan.runs.len());
    let mut mismatched = Vec::new();
    for (ri, spec) in plan.runs.iter().enumerate() {
        let rep = &plan.candidates[spec.representative];
        let (out, trace) = ctx.run(
            &hybrid_runner,
            &tuning[spec.input],
            StrategyKind::Hybrid,
            &options_for(&rep.switch, &rep.knobs),
        )?;
        let quality = ctx.quality(&references[spec.input], &out)?;
        let schedule = Schedule::of_trace(&trace);
        if schedule != Some(spec.schedule) {
            mismatched.push(ri);
        }
        results.push(RunResult {
            quality,
            schedule,
            measured_seconds: trace.total_seconds,
            predicted_seconds: f64::NAN,
            cached_steps: trace.cached_steps,
        });
        hybrid_traces.push((spec.knobs, trace));
        bar.inc(1);
    }
    let hybrid_secs = t_hybrid.elapsed().as_secs_f64();
    if !mismatched.is_empty() {
        bar.suspend(|| {
            eprintln!(
                "hybridiff: warning: {} of {} runs took another schedule than serial's curve predicted (nondeterministic device kernels?); their measured schedules are used",
                mismatched.len(),
                plan.runs.len()
            )
        });
    }

    // 4. Latency from measured step costs.
    let serial_refs: Vec<&Trace> = serial_traces.iter().collect();
    let serial_costs = StepCosts::measure(&serial_refs)?;
    let serial_seconds = serial_costs.predict(steps, None, &link)?;
    let mut costs: Vec<(Knobs, StepCosts)> = Vec::new();
    for knobs in &grid.knobs {
        let traces: Vec<&Trace> = hybrid_traces
            .iter()
            .filter(|(k, _)| k == knobs)
            .map(|(_, t)| t)
            .collect();
        if !traces.is_empty() {
            costs.push((*knobs, StepCosts::measure(&traces)?));
        }
    }
    let costs_of = |k: &Knobs| -> &StepCosts {
        &costs
            .iter()
            .find(|(c, _)| c == k)
            .expect("every knob set ran")
            .1
    };
    for ((spec, r), (_, trace)) in plan.runs.iter().zip(results.iter_mut()).zip(&hybrid_traces) {
        r.predicted_seconds = costs_of(&spec.knobs).predict_trace(trace, &link)?;
    }
    let run_quality: Vec<Quality> = results.iter().map(|r| r.quality).collect();
    let run_seconds: Vec<f64> = results.iter().map(|r| r.predicted_seconds).collect();
    let outcome = tune::evaluate(
        &plan,
        &run_quality,
        &run_seconds,
        serial_seconds,
        floor,
        floor_on,
    )?;

    // 5. Validation on held-out seeds.
    let t_valid = Instant::now();
    let validation = match outcome.chosen {
        Some(ci) if !holdout.is_empty() => {
            bar.set_message("held-out validation");
            let c = plan.candidates[ci];
            let opts = options_for(&c.switch, &c.knobs);
            let mut values = Vec::new();
            let (mut pred, mut ms, mut mh) = (Vec::new(), Vec::new(), Vec::new());
            let (mut tau1, mut tau2) = (Vec::new(), Vec::new());
            for input in &holdout {
                let (reference, st) = ctx.run(
                    &serial_runner,
                    input,
                    StrategyKind::Serial,
                    &Default::default(),
                )?;
                bar.inc(1);
                let (out, ht) = ctx.run(&hybrid_runner, input, StrategyKind::Hybrid, &opts)?;
                bar.inc(1);
                let q = ctx.quality(&reference, &out)?;
                values.push(floor.value(&q).unwrap_or(f64::NAN));
                pred.push(costs_of(&c.knobs).predict_trace(&ht, &link)?);
                ms.push(st.total_seconds);
                mh.push(ht.total_seconds);
                tau1.push(ht.tau1);
                tau2.push(ht.tau2);
            }
            let worst =
                values
                    .iter()
                    .copied()
                    .fold(values[0], |a, b| if floor.better(a, b) { b } else { a });
            let m = mean(&values);
            let predicted = mean(&pred);
            Some(Validation {
                inputs: holdout.iter().map(|i| i.label.clone()).collect(),
                meets: floor.meets(if floor_on == FloorOn::Every { worst } else { m }),
                values,
                worst,
                mean: m,
                predicted_seconds: predicted,
                speedup: serial_seconds / predicted,
                measured_serial_seconds: mean(&ms),
                measured_hybrid_seconds: mean(&mh),
                tau1,
                tau2,
            })
        }
        _ => None,
    };
    let valid_secs = t_valid.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let total_secs = started.elapsed().as_secs_f64();

    // 6. The report (complete, renamed into place), then hybridiff.json.
    let info = ReportInfo {
        model_dir: &model_dir,
        is_pipeline,
        steps,
        guidance,
        scheduler: scheduler.to_string(),
        world,
        threads,
        dtype: &args.dtype,
        floor,
        floor_on,
        link: &link,
        grid: &grid,
        plan: &plan,
        tuning: &tuning,
        curves: &curves,
        results: &results,
        mismatched: mismatched.len(),
        outcome: &outcome,
        serial_seconds,
        serial_costs: &serial_costs,
        costs: &costs,
        validation: validation.as_ref(),
        times: [serial_secs, hybrid_secs, valid_secs, total_secs],
        lpips: lpips.is_some(),
    };
    write_report(&args.report, &info)?;
    let Some(ci) = outcome.chosen else {
        let (b, v, input) =
            tune::best_reached(&outcome, floor_on, floor).expect("there is at least one candidate");
        bail!(
            "no candidate meets {} on {}: the best reached {} {v:.4} ({}), worst on {}; lower the floor, widen the grid (smaller --k, larger --tau-cap), or run --strategy cfg (exact, the condition split alone). The report is in {}; no hybridiff.json was written",
            floor.flag(),
            if floor_on == FloorOn::Every { "every prompt and seed" } else { "average" },
            floor.metric(),
            plan.candidates[b],
            tuning[input].label,
            args.report.display()
        );
    };
    let c = plan.candidates[ci];
    let e = &outcome.evaluations[ci];
    let rec = ModelDefaults {
        steps: Some(steps),
        guidance: Some(guidance),
        l_slope: Some(c.switch.l_slope),
        eps_slope: Some(c.switch.eps_slope),
        k: Some(c.switch.k),
        tau_cap: Some(c.switch.tau_cap),
        stages: Some(c.knobs.stages.to_string()),
        pipelined_guidance: Some(c.knobs.pipelined_guidance.to_string()),
        pipeline_layout: c.knobs.pipeline_layout.map(|l| l.to_string()),
        // Tuned only with --cache (the choice may be none); otherwise the model's
        // recommendation is kept as it was.
        cache: if args.cache.is_empty() {
            defaults.cache
        } else {
            c.knobs.cache.map(|k| k.0)
        },
        path: None,
        tune: Some(serde_json::json!({
            "world_size": world,
            "scheduler": scheduler.to_string(),
            "floor": format!("{} on {}", floor.flag(), if floor_on == FloorOn::Every { "every prompt and seed" } else { "the average" }),
            "quality_metric": floor.metric(),
            "tuning": {"inputs": tuning.len(), "worst": e.worst, "mean": e.mean,
                       "predicted_seconds": e.seconds, "predicted_speedup": e.speedup},
            "validation": validation.as_ref().map(|v| serde_json::json!({
                "inputs": v.values.len(), "worst": v.worst, "mean": v.mean, "meets_floor": v.meets,
                "predicted_speedup": v.speedup})),
            "latency_link": link.name,
            "report": args.report.display().to_string(),
        })),
    };
    write_bytes_atomic(
        &args.out,
        (serde_json::to_string_pretty(&rec)? + "\n").as_bytes(),
    )?;
    if e.speedup < 1.0 {
        eprintln!(
            "hybridiff: warning: the choice is predicted {:.2}x serial, slower than serial on one rank: at this model size the exchanges and per-step costs outweigh the split (see the report's step costs); serial or --strategy cfg may serve better",
            e.speedup
        );
    }
    println!(
        "chose {} ({} class member(s)): {} worst {:.4}, mean {:.4}, predicted {:.3} s ({:.2}x serial){}",
        c,
        outcome.classes[e.class].len(),
        floor.metric(),
        e.worst,
        e.mean,
        e.seconds,
        e.speedup,
        match &validation {
            Some(v) => format!(
                "; held out: worst {:.4}, mean {:.4}, {:.2}x{}",
                v.worst,
                v.mean,
                v.speedup,
                if v.meets { "" } else { " (BELOW THE FLOOR)" }
            ),
            None => String::new(),
        }
    );
    println!("{summary_line}; {total_secs:.1} s in all");
    println!("wrote {} and {}", args.out.display(), args.report.display());
    if let Some(v) = &validation {
        if !v.meets {
            eprintln!(
                "hybridiff: warning: on the held-out seeds the choice misses {} ({} worst {:.4}); tune on more seeds (--seeds) or raise the floor",
                floor.flag(),
                floor.metric(),
                v.worst
            );
        }
    }
    Ok(())
}

fn options_for(switch: &SwitchParams, knobs: &Knobs) -> StrategyOptions {
    StrategyOptions {
        switch: *switch,
        stages: knobs.stages,
        pipelined_guidance: knobs.pipelined_guidance,
        pipeline_layout: knobs.pipeline_layout,
        cache: knobs.cache.map(|c| c.0),
        ..Default::default()
    }
}

/// Runs done / planned with the time left, on a terminal (hidden otherwise).
fn run_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// What the report shows.
struct ReportInfo<'a> {
    model_dir: &'a Path,
    is_pipeline: bool,
    steps: usize,
    guidance: f64,
    scheduler: String,
    world: usize,
    threads: usize,
    dtype: &'a str,
    floor: Floor,
    floor_on: FloorOn,
    link: &'a Link,
    grid: &'a Grid,
    plan: &'a Plan,
    tuning: &'a [Input],
    curves: &'a [Vec<f64>],
    results: &'a [RunResult],
    mismatched: usize,
    outcome: &'a Outcome,
    serial_seconds: f64,
    serial_costs: &'a StepCosts,
    costs: &'a [(Knobs, StepCosts)],
    validation: Option<&'a Validation>,
    /// Serial, hybrid, validation and total seconds.
    times: [f64; 4],
    lpips: bool,
}

fn fmt_list<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_q(floor: Floor, v: f64) -> String {
    match floor {
        Floor::MinPsnr(_) if v >= tune::PSNR_CAP_DB => "identical".into(),
        Floor::MinPsnr(_) => format!("{v:.2}"),
        _ => format!("{v:.4}"),
    }
}

fn step_costs_line(c: &StepCosts) -> String {
    let slowest = |v: &[hybridiff_engine::latency::RankCost]| {
        v.iter().map(|r| r.compute_seconds).fold(0.0, f64::max)
    };
    let mut s = format!("exact {:.4} s", slowest(&c.exact.ranks));
    if let Some(f) = &c.fill {
        s += &format!(", fill {:.4} s", slowest(&f.ranks));
    }
    if let Some(p) = &c.pipelined {
        s += &format!(", pipelined {:.4} s", slowest(&p.ranks));
    }
    for (name, cost) in [
        ("cached exact", &c.exact_cached),
        ("cached fill", &c.fill_cached),
        ("cached pipelined", &c.pipelined_cached),
    ] {
        if let Some(x) = cost {
            s += &format!(", {name} {:.4} s", slowest(&x.ranks));
        }
    }
    s
}

/// The schedules of a candidate per input, as `tau1-tau2` (`*` marks the tau_cap fallback).
fn schedules_cell(info: &ReportInfo, ci: usize) -> String {
    info.plan.run_of[ci]
        .iter()
        .map(|&r| {
            let s = info.plan.runs[r].schedule;
            format!(
                "{}-{}{}",
                s.tau1,
                s.tau2,
                if s.fallback() { "*" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn markdown(info: &ReportInfo) -> String {
    let o = info.outcome;
    let f = info.floor;
    let mut s = format!("# hybridiff tune: {}\n\n", info.model_dir.display());
    let quality_space = if info.is_pipeline {
        format!(
            "image space: PSNR and SSIM{} of the decoded images against serial's",
            if info.lpips { " and LPIPS" } else { "" }
        )
    } else {
        "latent space: PSNR of the final latents against serial's (a bare denoiser folder has no VAE; inputs are seeded random prompt embeddings)".into()
    };
    s += &format!(
        "- {} steps, {} scheduler, guidance {}, hybrid on {} ranks x {} thread(s), {}\n- quality: {quality_space}; floor {} on {}\n",
        info.steps,
        info.scheduler,
        info.guidance,
        info.world,
        info.threads,
        info.dtype,
        f.flag(),
        match info.floor_on {
            FloorOn::Every => "every prompt and seed",
            FloorOn::Average => "the average over prompts and seeds",
        }
    );
    s += &format!(
        "- latency: predicted from the median measured step costs (slowest rank per step; serial {}; hybrid {}) on link `{}`; serial predicted {:.3} s\n",
        step_costs_line(info.serial_costs),
        info.costs
            .iter()
            .map(|(k, c)| format!("[{k}] {}", step_costs_line(c)))
            .collect::<Vec<_>>()
            .join("; "),
        info.link.name,
        info.serial_seconds
    );
    s += &format!(
        "- grid: L {{{}}}, eps {{{}}}, k {{{}}}, tau_cap {{{}}}, knobs {{{}}}: {} points, {} fit {} steps\n",
        fmt_list(&info.grid.l_slope),
        info.grid.eps_slope.iter().map(|e| format!("{e:.1e}")).collect::<Vec<_>>().join(", "),
        fmt_list(&info.grid.k),
        fmt_list(&info.grid.tau_cap),
        info.grid.knobs.iter().map(|k| k.to_string()).collect::<Vec<_>>().join("; "),
        info.grid.size(),
        info.plan.candidates.len(),
        info.steps
    );
    s += &format!(
        "- runs: the grid would cost {} hybrid runs on {} input(s); {} distinct runs were made ({} candidates share {} classes of identical runs), plus {} serial; {} of {} runs took the schedule predicted from serial's curve\n",
        info.plan.grid_runs(),
        info.tuning.len(),
        info.plan.runs.len(),
        info.plan.candidates.len(),
        o.classes.len(),
        info.tuning.len(),
        info.plan.runs.len() - info.mismatched,
        info.plan.runs.len()
    );
    s += &format!(
        "- time: serial {:.1} s, hybrid {:.1} s, validation {:.1} s, {:.1} s in all\n\n",
        info.times[0], info.times[1], info.times[2], info.times[3]
    );
    s += "Inputs (tuning):\n\n";
    for (i, input) in info.tuning.iter().enumerate() {
        s += &format!("{i}. {}\n", input.label);
    }
    s += "\n## Choice\n\n";
    match o.chosen {
        Some(ci) => {
            let c = info.plan.candidates[ci];
            let e = &o.evaluations[ci];
            s += &format!(
                "`--l-slope {} --eps-slope {:e} --k {} --tau-cap {} --stages {} --pipelined-guidance {}{}{}` (one of {} candidates with identical runs; its schedules tau1-tau2 per input: {})\n\n",
                c.switch.l_slope, c.switch.eps_slope, c.switch.k, c.switch.tau_cap,
                c.knobs.stages, c.knobs.pipelined_guidance,
                c.knobs.pipeline_layout.map(|l| format!(" --pipeline-layout {l}")).unwrap_or_default(),
                c.knobs.cache.map(|k| format!(" --cache {}", k.0)).unwrap_or_default(),
                o.classes[e.class].len(),
                schedules_cell(info, ci)
            );
            s += &format!(
                "| set | inputs | worst {m} | mean {m} | predicted (s) | predicted speedup |\n|---|---|---|---|---|---|\n| tuning | {} | {} | {} | {:.3} | {:.2}x |\n",
                info.tuning.len(),
                fmt_q(f, e.worst),
                fmt_q(f, e.mean),
                e.seconds,
                e.speedup,
                m = f.metric()
            );
            if let Some(v) = info.validation {
                s += &format!(
                    "| held out | {} | {} | {} | {:.3} | {:.2}x |\n\nHeld out: {} the floor; measured on this machine {:.3} s serial, {:.3} s hybrid per run (wall time, noisy); tau1 {}.\n",
                    v.values.len(),
                    fmt_q(f, v.worst),
                    fmt_q(f, v.mean),
                    v.predicted_seconds,
                    v.speedup,
                    if v.meets { "meets" } else { "**misses**" },
                    v.measured_serial_seconds,
                    v.measured_hybrid_seconds,
                    v.tau1.iter().map(|t| t.map_or("-".into(), |t| t.to_string())).collect::<Vec<_>>().join(", ")
                );
            }
        }
        None => {
            let (b, v, input) = tune::best_reached(o, info.floor_on, f).expect("candidates");
            s += &format!(
                "**No candidate meets {}.** The best reached {} {} ({}), worst on input {input} ({}).\n",
                f.flag(),
                f.metric(),
                fmt_q(f, v),
                info.plan.candidates[b],
                info.tuning[input].label
            );
        }
    }
    s += "\n![latency vs quality](latency-quality.png)\n\n![rel-MAE curves](rel-mae.png)\n\n";
    // Classes, fastest first; the front and the choice marked.
    let mut classes: Vec<usize> = (0..o.classes.len()).collect();
    let head = |c: usize| &o.evaluations[o.classes[c][0]];
    classes.sort_by(|&a, &b| head(a).seconds.total_cmp(&head(b).seconds));
    let table_head = format!(
        "| class | members | e.g. L, eps, k, tau_cap | knobs | tau1-tau2 per input (* fallback) | worst {m} | mean {m} | predicted (s) | speedup | meets | front |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        m = f.metric()
    );
    let row = |c: usize| -> String {
        let members = &o.classes[c];
        let ci = match o.chosen {
            Some(ch) if members.contains(&ch) => ch,
            _ => members[members.len() / 2],
        };
        let cand = info.plan.candidates[ci];
        let e = &o.evaluations[ci];
        let chosen = o.chosen.is_some_and(|ch| members.contains(&ch));
        format!(
            "| {}{} | {} | {}, {:.1e}, {}, {} | {} | {} | {} | {} | {:.3} | {:.2}x | {} | {} |\n",
            c,
            if chosen { " (chosen)" } else { "" },
            members.len(),
            cand.switch.l_slope,
            cand.switch.eps_slope,
            cand.switch.k,
            cand.switch.tau_cap,
            cand.knobs,
            schedules_cell(info, ci),
            fmt_q(f, e.worst),
            fmt_q(f, e.mean),
            e.seconds,
            e.speedup,
            if e.meets { "yes" } else { "no" },
            if o.on_front[c] { "yes" } else { "" }
        )
    };
    s += "\n## Pareto front\n\nClasses no other class beats on both predicted latency and scored quality.\n\n";
    s += &table_head;
    for &c in classes.iter().filter(|&&c| o.on_front[c]) {
        s += &row(c);
    }
    const MAX_ROWS: usize = 80;
    s += &format!(
        "\n## Candidates\n\n{} classes of candidates with identical runs, fastest first{}; every candidate is in tune.json.\n\n",
        classes.len(),
        if classes.len() > MAX_ROWS {
            format!(" (the first {MAX_ROWS})")
        } else {
            String::new()
        }
    );
    s += &table_head;
    for &c in classes.iter().take(MAX_ROWS) {
        s += &row(c);
    }
    s
}

fn tune_json(info: &ReportInfo) -> serde_json::Value {
    let o = info.outcome;
    let knobs_json = |k: &Knobs| {
        serde_json::json!({
            "stages": k.stages.to_string(),
            "pipelined_guidance": k.pipelined_guidance.to_string(),
            "pipeline_layout": k.pipeline_layout.map(|l| l.to_string()),
            "cache": k.cache.map(|c| c.0.to_string()),
        })
    };
    let candidates: Vec<serde_json::Value> = info
        .plan
        .candidates
        .iter()
        .zip(&o.evaluations)
        .zip(&info.plan.run_of)
        .map(|((c, e), runs)| {
            serde_json::json!({
                "l_slope": c.switch.l_slope, "eps_slope": c.switch.eps_slope, "k": c.switch.k,
                "tau_cap": c.switch.tau_cap, "knobs": knobs_json(&c.knobs), "class": e.class,
                "runs": runs, "values": e.values, "worst": e.worst, "worst_input": e.worst_input,
                "mean": e.mean, "predicted_seconds": e.seconds, "speedup": e.speedup,
                "meets": e.meets, "on_front": o.on_front[e.class],
            })
        })
        .collect();
    let runs: Vec<serde_json::Value> = info
        .plan
        .runs
        .iter()
        .zip(info.results)
        .map(|(r, m)| {
            serde_json::json!({
                "input": r.input, "predicted_schedule": r.schedule, "schedule": m.schedule,
                "pipelined": r.pipelined, "knobs": knobs_json(&r.knobs),
                "representative": r.representative, "quality": m.quality,
                "predicted_seconds": m.predicted_seconds, "measured_seconds": m.measured_seconds,
                "cached_steps": m.cached_steps,
            })
        })
        .collect();
    serde_json::json!({
        "model": info.model_dir.display().to_string(),
        "steps": info.steps, "guidance": info.guidance, "scheduler": info.scheduler,
        "world_size": info.world, "threads_per_rank": info.threads, "dtype": info.dtype,
        "floor": info.floor.flag(), "floor_on": match info.floor_on { FloorOn::Every => "every", FloorOn::Average => "average" },
        "metric": info.floor.metric(), "link": info.link,
        "serial_predicted_seconds": info.serial_seconds,
        "inputs": info.tuning.iter().map(|i| &i.label).collect::<Vec<_>>(),
        "serial_rel_mae": info.curves,
        "grid_runs": info.plan.grid_runs(), "runs_made": info.plan.runs.len(),
        "schedules_mismatched": info.mismatched,
        "chosen": o.chosen, "candidates": candidates, "runs": runs,
        "validation": info.validation,
        "seconds": {"serial": info.times[0], "hybrid": info.times[1], "validation": info.times[2], "total": info.times[3]},
    })
}

/// Writes the whole report into a temporary folder next to `dir`, then renames it to `dir`
/// (an empty `dir` is replaced), so no half-written report is ever left.
fn write_report(dir: &Path, info: &ReportInfo) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".hybridiff-report-")
        .tempdir_in(parent)
        .with_context(|| {
            format!(
                "--report {}: cannot create a folder next to it",
                dir.display()
            )
        })?;
    let t = tmp.path();
    std::fs::write(t.join("report.md"), markdown(info))
        .with_context(|| format!("--report {}", dir.display()))?;
    std::fs::write(
        t.join("tune.json"),
        serde_json::to_string_pretty(&tune_json(info))? + "\n",
    )
    .with_context(|| format!("--report {}", dir.display()))?;
    plot_report(t, info)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        anyhow::anyhow!(
            "--report {}: cannot move the finished report into place: {e}",
            dir.display()
        )
    })?;
    Ok(())
}

fn plot_report(dir: &Path, info: &ReportInfo) -> Result<()> {
    let o = info.outcome;
    let points: Vec<crate::plot::FrontPoint> = o
        .classes
        .iter()
        .enumerate()
        .map(|(c, members)| {
            let e = &o.evaluations[members[0]];
            crate::plot::FrontPoint {
                seconds: e.seconds,
                quality: e.scored(info.floor_on),
                on_front: o.on_front[c],
                chosen: o.chosen.is_some_and(|ch| members.contains(&ch)),
                meets: e.meets,
            }
        })
        .collect();
    let floor_value = match info.floor {
        Floor::MinPsnr(v) | Floor::MinSsim(v) | Floor::MaxLpips(v) => v,
    };
    crate::plot::latency_quality(
        &dir.join("latency-quality.png"),
        &points,
        &format!(
            "{} {} vs serial",
            match info.floor_on {
                FloorOn::Every => "worst",
                FloorOn::Average => "mean",
            },
            info.floor.metric()
        ),
        floor_value,
        info.serial_seconds,
        &format!(
            "{} candidates in {} classes; predicted latency on link `{}`",
            info.plan.candidates.len(),
            o.classes.len(),
            info.link.name
        ),
    )?;
    let panels: Vec<crate::plot::CurvePanel> = info
        .tuning
        .iter()
        .enumerate()
        .map(|(i, input)| crate::plot::CurvePanel {
            title: input.label.clone(),
            curve: info.curves[i].clone(),
            schedule: o
                .chosen
                .map(|ch| info.plan.runs[info.plan.run_of[ch][i]].schedule),
        })
        .collect();
    crate::plot::rel_mae_panels(&dir.join("rel-mae.png"), &panels, info.steps)?;
    Ok(())
}
