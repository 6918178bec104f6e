//! `hybridiff generate`: prompts in, PNGs out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hybridiff_comm::Communicator;
use hybridiff_engine::io::{
    check_finite, encode_png, load_safetensors_named, save_png, stage_bytes, write_bytes_atomic,
    OutputFolder,
};
use hybridiff_engine::pipeline::{Pipeline, Request};
use hybridiff_engine::{RunOptions, Runner, Strategy};
use serde::Deserialize;

use crate::outputs::{Format, Plan};
use crate::strategy_args::ModelDefaults;

/// The batch's record of its prompts, in its `--out` folder.
const MANIFEST: &str = "manifest.json";

/// The file of prompt `i` in a batch: `0000.png`, `0001.png`, ... (more digits past 9999).
fn image_name(i: usize) -> String {
    format!("{i:04}.png")
}

/// Whether an entry of a batch's `--out` folder is one a batch writes: a regular file named
/// `manifest.json` or `NNNN.png` (four or more digits).
fn written_by_batch(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let numbered = name
        .strip_suffix(".png")
        .is_some_and(|d| d.len() >= 4 && d.bytes().all(|b| b.is_ascii_digit()));
    (numbered || name == MANIFEST) && std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
}

/// Arguments of `hybridiff generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers pipeline folder (with model_index.json), or a single-file SD 1.x /
    /// 2.x / SDXL base .safetensors checkpoint (original layout, as A1111 and ComfyUI
    /// load; family found from its tensor names and shapes) [default: the model built
    /// into this binary: coloured shapes, see models/default/MODEL_CARD.md].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub model_args: crate::strategy_args::ModelArgs,
    /// The prompt (or use --prompts for a batch); may start with `-`.
    #[arg(long, conflicts_with = "prompts", allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// What to steer away from. As in diffusers, leaving it out differs from
    /// `--negative-prompt ""` on SDXL pipelines whose model_index.json sets
    /// force_zeros_for_empty_prompt: left out, the negative embeddings are zeros; given,
    /// even empty, the text is encoded. Other pipelines encode "" when it is left out.
    #[arg(long, allow_hyphen_values = true)]
    pub negative_prompt: Option<String>,
    /// A batch file; --out is then a folder that gets one PNG per prompt and
    /// manifest.json. Its format comes from --prompts-format, else from the extension:
    /// `.json` a JSON list of {prompt, negative_prompt, seed}, `.jsonl` one such object
    /// per line, anything else plain text with one prompt per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The format of --prompts: text, json or jsonl [default: from the extension].
    #[arg(long, requires = "prompts")]
    pub prompts_format: Option<String>,
    /// Denoising steps [default: the model folder's hybridiff.json, else 50].
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Guidance scale [default: the model folder's hybridiff.json, else 7 for SD3, 5
    /// otherwise]. 1 or less turns classifier-free guidance off, as in diffusers: one
    /// conditional forward per step and no negative branch (guidance-distilled "turbo"
    /// checkpoints are run so, with --guidance 0 and 1 to 4 --steps).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance: Option<f64>,
    /// Image height in pixels, a multiple of the VAE factor (8 for SD, SDXL; 16 for SD3,
    /// whose transformer also patches by 2) [default: that of --latents, else the
    /// denoiser's sample size].
    #[arg(long, allow_negative_numbers = true)]
    pub height: Option<usize>,
    /// Image width in pixels, as --height [default: that of --latents, else the denoiser's
    /// sample size].
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<usize>,
    /// Seed of the starting noise (drawn by --noise; the same on every machine and
    /// strategy) and of the step noise of stochastic samplers (euler-a, dpmpp-2m-sde, lcm).
    /// In a batch, prompt i without its own seed uses seed + i, and makes the image its own
    /// run with that seed makes.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// The generator --seed draws the noise with: `chacha8` (default: ChaCha8 and
    /// rand_distr's standard normal, step i's noise on its own stream; kept the default so
    /// that a seed keeps giving the image it gave before) or `torch` (PyTorch's CPU
    /// generator as diffusers uses it: the latents of `torch.randn(shape,
    /// generator=torch.Generator("cpu").manual_seed(SEED))`, bit for bit, then each noisy
    /// step's noise from the same generator, so --seed S reproduces the image diffusers
    /// makes with that generator, stochastic samplers included).
    #[arg(long, default_value = "chacha8", value_name = "chacha8|torch")]
    pub noise: String,
    /// Start from the `latents` tensor of this safetensors file instead (stochastic
    /// samplers still draw their step noise from --seed and --noise; a torch generator then
    /// starts at the step noise, as diffusers' given latents draw nothing).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Write the per-step JSON trace here (single image).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Output PNG (single prompt; the name ends in .png), or with --prompts the batch's
    /// folder: new or empty (created if missing), or with --force one a previous batch wrote.
    #[arg(long)]
    pub out: PathBuf,
    /// With --prompts: use an --out folder that a previous batch wrote, removing its
    /// NNNN.png and manifest.json first (anything else in it is refused, never deleted), so
    /// the folder only ever holds one run's images.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub run: crate::strategy_args::RunArgs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchItem {
    pub(crate) prompt: String,
    #[serde(default)]
    pub(crate) negative_prompt: Option<String>,
    #[serde(default)]
    pub(crate) seed: Option<u64>,
}

/// Largest --prompts file read.
const MAX_PROMPTS_BYTES: u64 = 64 << 20;
/// Most prompts in one batch.
const MAX_PROMPTS: usize = 100_000;

/// How a --prompts file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PromptsFormat {
    Text,
    Json,
    JsonLines,
}

impl PromptsFormat {
    /// The flag's value, else the extension (never the content: a plain prompt may start
    /// with `[`, and a JSON object is not a prompt).
    fn of(path: &Path, flag: Option<&str>) -> Result<Self> {
        Ok(match flag {
            Some("text") => Self::Text,
            Some("json") => Self::Json,
            Some("jsonl") => Self::JsonLines,
            Some(other) => bail!("--prompts-format {other}: expected text, json or jsonl"),
            None => match path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("json") => Self::Json,
                Some("jsonl" | "ndjson") => Self::JsonLines,
                _ => Self::Text,
            },
        })
    }
}

pub(crate) fn read_batch(
    path: &Path,
    format: Option<&str>,
    negative: Option<&str>,
    base_seed: u64,
) -> Result<Vec<BatchItem>> {
    let format = PromptsFormat::of(path, format)?;
    let text = hybridiff_models::weights::read_text_bounded(path, MAX_PROMPTS_BYTES)
        .with_context(|| format!("--prompts {}: cannot read the file", path.display()))?;
    let what = "{prompt, negative_prompt, seed}";
    let mut items: Vec<BatchItem> = match format {
        PromptsFormat::Json => serde_json::from_str(&text).with_context(|| {
            format!(
                "--prompts {}: expected a JSON list of {what} (the .json extension or --prompts-format json says JSON; use --prompts-format text for plain lines)",
                path.display()
            )
        })?,
        PromptsFormat::JsonLines => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| {
                    format!(
                        "--prompts {} line {}: expected a JSON object {what}",
                        path.display(),
                        i + 1
                    )
                })
            })
            .collect::<Result<_>>()?,
        PromptsFormat::Text => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| BatchItem {
                prompt: l.to_string(),
                negative_prompt: None,
                seed: None,
            })
            .collect(),
    };
    if items.is_empty() {
        bail!("--prompts {}: no prompts in the file", path.display());
    }
    if items.len() > MAX_PROMPTS {
        bail!(
            "--prompts {}: {} prompts; at most {MAX_PROMPTS} in one batch",
            path.display(),
            items.len()
        );
    }
    // A flag that every prompt overrides would be ignored: refused instead.
    let given = crate::strategy_args::Given::get();
    if given.has("seed") && items.iter().all(|it| it.seed.is_some()) {
        bail!(
            "--seed: every prompt in {} sets its own `seed`, so the flag would not be used; leave it out",
            path.display()
        );
    }
    if given.has("negative_prompt") && items.iter().all(|it| it.negative_prompt.is_some()) {
        bail!(
            "--negative-prompt: every prompt in {} sets its own `negative_prompt`, so the flag would not be used; leave it out",
            path.display()
        );
    }
    for (i, it) in items.iter_mut().enumerate() {
        if it.negative_prompt.is_none() {
            it.negative_prompt = negative.map(str::to_string);
        }
        it.seed.get_or_insert(base_seed.wrapping_add(i as u64));
    }
    Ok(items)
}

pub fn run(args: GenerateArgs, launch: &crate::launch::Launch) -> Result<()> {
    args.run.devices.precheck()?;
    let model_dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let defaults = ModelDefaults::read(&model_dir)?;
    let steps = args.steps.or(defaults.steps).unwrap_or(50);
    if let Some(g) = args.guidance.or(defaults.guidance) {
        hybridiff_engine::check_guidance(g)?;
        if g <= 1.0 && args.negative_prompt.is_some() {
            let from = if args.guidance.is_some() {
                "--guidance".to_string()
            } else {
                format!("the model's hybridiff.json (`guidance` {g})")
            };
            bail!(
                "--negative-prompt: guidance {g} (from {from}) turns classifier-free guidance off, so the negative prompt would not be used (as in diffusers); leave it out, or give --guidance above 1"
            );
        }
        if g <= 1.0 && args.run.guidance_rescale > 0.0 {
            bail!(
                "--guidance-rescale {}: guidance {g} turns classifier-free guidance off, and the rescale acts on the guided prediction only (as in diffusers); leave it out, or give --guidance above 1",
                args.run.guidance_rescale
            );
        }
    }
    let mut run = args.run.resolve(&defaults, steps, launch.processes())?;
    let device = run.device.clone();
    // Only rank 0 writes, so only its paths are checked (other hosts may not even have them).
    let root = launch.is_root();
    // Every pipeline's own default guidance (5 or 7) turns CFG on.
    run.announce(
        args.guidance.or(defaults.guidance).unwrap_or(5.0),
        steps,
        root,
    )?;
    let batch = match (&args.prompt, &args.prompts) {
        (Some(_), _) => None,
        (None, Some(p)) => Some(read_batch(
            p,
            args.prompts_format.as_deref(),
            args.negative_prompt.as_deref(),
            args.seed,
        )?),
        (None, None) => bail!("give --prompt TEXT or --prompts FILE"),
    };
    // The default model's cache folder is a model folder like any other.
    let model_flag = if args.model.is_some() {
        "--model"
    } else {
        "the default model's cache folder"
    };
    let mut plan = Plan::new();
    if let Some(p) = &args.latents {
        plan.input("--latents", p);
    }
    if let Some(p) = &args.prompts {
        plan.input("--prompts", p);
    }
    let spec = args.model_args.spec(&model_dir)?;
    let noise: hybridiff_engine::pipeline::NoiseKind = args
        .noise
        .parse()
        .map_err(|e| anyhow::anyhow!("--noise {e}"))?;
    match &batch {
        None => {
            if args.force {
                bail!("--force: empties a batch's --out folder (--prompts); a single image replaces its --out file anyway, so leave it out");
            }
            plan.file("--out", &args.out, Format::Png);
            if let Some(p) = &args.trace {
                plan.file("--trace", p, Format::Json);
            }
        }
        Some(items) => {
            if args.trace.is_some() {
                bail!("--trace writes one image's trace; it does not go with --prompts (the manifest records tau1 and tau2)");
            }
            // Every name the batch writes, checked before the first prompt runs.
            let mut files: Vec<(String, PathBuf, Format)> = (0..items.len())
                .map(|i| {
                    let name = image_name(i);
                    (format!("--out ({name})"), args.out.join(&name), Format::Png)
                })
                .collect();
            files.push((
                "--out (manifest.json)".into(),
                args.out.join(MANIFEST),
                Format::Json,
            ));
            plan.folder(
                OutputFolder {
                    flag: "--out",
                    path: &args.out,
                    force: args.force,
                    ours: written_by_batch,
                    kinds: "NNNN.png and manifest.json",
                },
                files,
            );
        }
    }
    // Only rank 0 writes, so only its paths are checked (other hosts may not even have
    // them). Nothing may land in or on the model or a file its flags name.
    let model_inputs = args.model_args.inputs();
    let mut spare: Vec<(&str, &Path)> = vec![(model_flag, model_dir.as_path())];
    spare.extend(model_inputs.iter().map(|(f, p)| (*f, p.as_path())));
    let ready = match root {
        true => Some(plan.check(&spare)?),
        false => None,
    };
    // Headers, configs and LoRA files are read and matched before any weight loads.
    let resolved = spec.resolve(true)?;
    if let (true, Some(line)) = (root, resolved.summary()) {
        eprintln!("hybridiff: {line}");
    }
    let pipeline = Pipeline::load_resolved(&resolved, run.dtype, &device)?;
    run.check_cache_fits(pipeline.model.denoiser.as_ref())?;
    run.options.placement = crate::strategy_args::load_replicas(
        std::mem::take(&mut run.options.placement),
        &resolved,
        run.dtype,
    )?;
    let latents = match &args.latents {
        Some(p) => {
            let l = load_safetensors_named(p, &device, &["latents"])?
                .0
                .remove("latents")
                .with_context(|| format!("--latents {}: no tensor named `latents`", p.display()))?;
            let l = hybridiff_engine::io::float_tensor(p, "latents", &l)?;
            check_finite(p, "latents", &l)?;
            Some(l)
        }
        None => None,
    };
    let opts = &run.options;
    let mut comm = launch.communicator_for(opts.comm_timeout, run.nccl, &run.device)?;
    // Ranks as threads are started once: a batch runs every prompt on the same ranks.
    let runner = match comm {
        None => Some(Runner::start(opts.clone())?),
        Some(_) => None,
    };
    let scheduler = run.scheduler_kind(&pipeline.model.scheduler_config)?;
    let (karras, guidance_rescale) = (run.karras, run.guidance_rescale);
    let request = |prompt: &str, negative: Option<&str>, seed: u64| Request {
        prompt: prompt.to_string(),
        negative_prompt: negative.map(str::to_string),
        steps,
        guidance: args.guidance.or(defaults.guidance),
        scheduler,
        karras,
        guidance_rescale,
        height: args.height,
        width: args.width,
        latents: latents.clone(),
        seed,
        noise,
    };
    match batch {
        None => {
            if let Some(r) = &ready {
                r.prepare()?;
            }
            let prompt = args.prompt.as_deref().unwrap_or_default();
            let req = request(prompt, args.negative_prompt.as_deref(), args.seed);
            let start = Instant::now();
            let img = generate_one(
                &pipeline,
                &req,
                run.strategy.as_ref(),
                opts,
                runner.as_ref(),
                &mut comm,
                None,
            )?;
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
        Some(items) => {
            // A request-wide error (size, memory, steps, layout) is reported once, here,
            // rather than once per prompt, and before --out is created.
            let first = &items[0];
            pipeline.check_request(
                &request(
                    &first.prompt,
                    first.negative_prompt.as_deref(),
                    first.seed.unwrap_or_default(),
                ),
                run.strategy.as_ref(),
                opts,
            )?;
            if let Some(r) = &ready {
                r.prepare()?;
            }
            run_batch(
                &pipeline,
                &items,
                &request,
                &run,
                runner.as_ref(),
                &args.out,
                &mut comm,
            )
        }
    }
}

/// One image, or `None` on a process other than rank 0 of a multi-process job.
fn generate_one(
    pipeline: &Pipeline,
    req: &Request,
    strategy: &dyn Strategy,
    opts: &RunOptions,
    runner: Option<&Runner>,
    comm: &mut Option<Box<dyn Communicator>>,
    cancel: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Option<hybridiff_engine::pipeline::Generated>> {
    let bar = crate::progress_bar(req.steps, comm.as_ref().is_none_or(|c| c.rank() == 0));
    let progress = |done: usize, _total: usize| bar.set_position(done as u64);
    let img = match (comm, runner) {
        (None, Some(r)) => Some(pipeline.generate_on(r, req, strategy, Some(&progress), cancel)?),
        (None, None) => Some(pipeline.generate(req, strategy, opts, Some(&progress))?),
        (Some(c), _) => pipeline.generate_rank(req, strategy, opts, Some(&progress), c.as_mut())?,
    };
    bar.finish_and_clear();
    Ok(img)
}

/// Most characters of a prompt echoed on stdout; longer ones are shortened as the
/// truncation warning does (the manifest keeps the whole prompt).
const MAX_ECHO_CHARS: usize = 120;

fn echo_prompt(prompt: &str) -> String {
    if prompt.chars().count() <= MAX_ECHO_CHARS && !prompt.contains(['\n', '\r']) {
        prompt.to_string()
    } else {
        hybridiff_text::tokenizer::shorten(prompt, MAX_ECHO_CHARS)
    }
}

/// A batch's `manifest.json`: a JSON list with one entry per prompt run, kept valid and in
/// agreement with the folder after every prompt without being rewritten. It starts as `[]`
/// (written atomically); each entry is one positioned write that replaces the closing `]`
/// with `,{entry}]`, so a process killed at any moment leaves a complete list, and the cost
/// per prompt does not grow with the batch (rewriting and syncing the whole list after each
/// prompt made a 3000-prompt batch's last images cost more than its first). Synced to disk
/// once, when the batch ends or is interrupted.
struct Manifest {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    entries: usize,
}

impl Manifest {
    fn create(folder: &Path) -> Result<Self> {
        let path = folder.join(MANIFEST);
        write_bytes_atomic(&path, b"[]\n")?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open it to add entries", path.display()))?;
        Ok(Self {
            path,
            file,
            len: 3,
            entries: 0,
        })
    }

    fn append(&mut self, entry: &serde_json::Value) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let body = serde_json::to_string_pretty(entry)?.replace('\n', "\n  ");
        let (at, chunk) = match self.entries {
            0 => (0, format!("[\n  {body}\n]\n")),
            _ => (self.len - 3, format!(",\n  {body}\n]\n")),
        };
        if let Err(e) = self.file.write_all_at(chunk.as_bytes(), at) {
            // Put the closing bracket back so the list stays valid (disk full, ...).
            let _ = self.file.set_len(self.len);
            let tail: &[u8] = if self.entries == 0 { b"[]\n" } else { b"\n]\n" };
            let _ = self.file.write_all_at(tail, self.len - tail.len() as u64);
            return Err(e).with_context(|| format!("{}: cannot add an entry", self.path.display()));
        }
        self.len = at + chunk.len() as u64;
        self.entries += 1;
        Ok(())
    }

    fn finish(self) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("{}: cannot sync it to disk", self.path.display()))
    }
}

fn run_batch(
    pipeline: &Pipeline,
    items: &[BatchItem],
    request: &dyn Fn(&str, Option<&str>, u64) -> Request,
    run: &crate::strategy_args::Run,
    runner: Option<&Runner>,
    out: &Path,
    comm: &mut Option<Box<dyn Communicator>>,
) -> Result<()> {
    let (strategy, opts, kind) = (run.strategy.as_ref(), &run.options, run.kind);
    let root = comm.as_ref().is_none_or(|c| c.rank() == 0);
    // Ranks as threads of this process: Ctrl-C cancels the running image and keeps the
    // folder and manifest in agreement. Under mpirun the launcher handles signals.
    let cancel = match runner {
        Some(_) => {
            crate::interrupt::install()?;
            Some(&crate::interrupt::CANCEL)
        }
        None => None,
    };
    let mut manifest = match root {
        true => Some(Manifest::create(out)?),
        false => None,
    };
    let mut failed = 0;
    let mut done = 0;
    let mut stopped = None;
    for (i, it) in items.iter().enumerate() {
        if cancel.is_some() && crate::interrupt::requested() {
            stopped = Some(i);
            break;
        }
        let file = image_name(i);
        let seed = it.seed.unwrap_or_default();
        let negative = it.negative_prompt.as_deref();
        let start = Instant::now();
        let req = request(&it.prompt, negative, seed);
        let noise = req.noise;
        let result =
            generate_one(pipeline, &req, strategy, opts, runner, comm, cancel).and_then(|img| {
                match img {
                    Some(img) => {
                        // Encoded and synced before the commit, which is two renames' worth.
                        let png = encode_png(&out.join(&file), img.width, img.height, img.rgb)?;
                        let staged = stage_bytes(&out.join(&file), &png)?;
                        Ok(Some((img.trace, staged)))
                    }
                    None => Ok(None),
                }
            });
        let mut entry = serde_json::json!({
            "prompt": it.prompt,
            "negative_prompt": negative,
            "seed": seed,
            "noise": noise.to_string(),
            "strategy": kind.to_string(),
            "seconds": start.elapsed().as_secs_f64(),
        });
        let staged = match result {
            Ok(None) => continue, // not rank 0: rank 0 writes images and manifest
            Ok(Some((trace, staged))) => {
                entry["file"] = file.clone().into();
                entry["guidance"] = serde_json::json!(trace.guidance);
                entry["classifier_free_guidance"] = trace.classifier_free_guidance.into();
                entry["tau1"] = serde_json::json!(trace.tau1);
                entry["tau2"] = serde_json::json!(trace.tau2);
                entry["denoise_seconds"] = trace.total_seconds.into();
                entry["step_overhead_ms"] =
                    hybridiff_engine::bench::step_overhead_ms(&trace).into();
                entry["forwards"] = trace.forwards.into();
                if let Some(c) = &trace.cache {
                    entry["cache"] = c.clone().into();
                    entry["cached_steps"] = trace.cached_steps.into();
                    entry["forwards_saved"] = trace.forwards_saved.into();
                }
                Some(staged)
            }
            Err(_) if cancel.is_some() && crate::interrupt::requested() => {
                // Cancelled part way: not listed, nothing of it kept.
                stopped = Some(i);
                break;
            }
            Err(e) => {
                failed += 1;
                entry["error"] = format!("{e:#}").into();
                eprintln!("hybridiff: prompt {i} failed: {e:#}");
                if !root {
                    continue;
                }
                None
            }
        };
        let Some(manifest) = manifest.as_mut() else {
            continue;
        };
        // The image appears and is listed together: a second Ctrl-C waits for both.
        let commit = crate::interrupt::Commit::begin();
        if let Some(staged) = staged {
            staged.commit()?;
            done += 1;
            println!("{file}: {}", echo_prompt(&it.prompt));
        }
        manifest.append(&entry)?;
        drop(commit);
    }
    if let Some(m) = manifest {
        m.finish()?;
    }
    let listed = out.join(MANIFEST);
    if let Some(i) = stopped {
        return Err(crate::interrupt::Interrupted(format!(
            "interrupted (Ctrl-C) at prompt {i} of {}: {done} image(s) written, {failed} failed; {} lists them, and the folder holds nothing else",
            items.len(),
            listed.display()
        ))
        .into());
    }
    if failed > 0 {
        bail!(
            "{failed} of {} prompts failed; see {}",
            items.len(),
            listed.display()
        );
    }
    Ok(())
}
