//! `hybridiff bench`.

use std::path::PathBuf;

use anyhow::Result;
use hybridiff_engine::bench::{
    compare_on, forward_seconds, markdown_table, random_inputs, BenchRun,
};
use hybridiff_engine::io::{write_bytes_atomic, OutputFolder};
use hybridiff_engine::memory::{estimate_job, JobShape};
use hybridiff_engine::{DenoiseInputs, Job, Model, StrategyKind};

use crate::outputs::{Format, Plan};

/// The trace file of a strategy's row in `--trace-dir`: `<strategy>.json` for ranks as
/// threads, `<strategy>-<transport>.json` otherwise; a run with the step cache `method`
/// (`--cache`) inserts `-<method>` after the strategy (`hybrid-deepcache-mpi.json`).
fn trace_name(kind: StrategyKind, cache: Option<&str>, transport: &str) -> String {
    let cached = cache.map(|m| format!("-{m}")).unwrap_or_default();
    match transport {
        "threads" => format!("{kind}{cached}.json"),
        t => format!("{kind}{cached}-{t}.json"),
    }
}

/// Whether an entry of `--trace-dir` is one a bench run writes there: a regular `*.json`
/// (traces, a `--json` summary) or `*.md` file (a `--markdown` table).
fn written_by_bench(p: &std::path::Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    (name.ends_with(".json") || name.ends_with(".md"))
        && std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
}

/// Arguments of `hybridiff bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A diffusers model folder (see `hybridiff init` for random-weight ones), or a
    /// single-file SD 1.x / 2.x / SDXL base .safetensors checkpoint.
    #[arg(long, required_unless_present = "from_trace")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub model_args: crate::strategy_args::ModelArgs,
    /// Start from this inputs file (as for `denoise`) instead of seeded random inputs.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Latent height and width of random inputs [default: the U-Net's sample_size].
    #[arg(long, allow_negative_numbers = true)]
    pub latent_size: Option<usize>,
    /// Text tokens in random prompt embeddings.
    #[arg(long, default_value_t = 77, allow_negative_numbers = true)]
    pub context_len: usize,
    /// Comma-separated strategies to compare (serial always runs as the baseline).
    #[arg(long, default_value = "serial,cfg")]
    pub strategies: String,
    /// Ranks of the parallel strategies (serial uses 1).
    #[arg(long, default_value_t = 2, allow_negative_numbers = true)]
    pub world_size: usize,
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    pub steps: usize,
    #[arg(long, default_value_t = 5.0, allow_hyphen_values = true)]
    pub guidance: f64,
    /// The sampler, by our name or diffusers' class name (as for generate) [default: the
    /// model's scheduler_config.json]; stochastic ones draw their step noise from seed 0.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(hybridiff_schedulers::SchedulerKind::names()))]
    pub scheduler: Option<String>,
    /// Compute threads per rank (serial gets the same, on one rank).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub threads_per_rank: usize,
    /// Timed forwards per batch size (the median is reported; at most 1000); 0 skips them.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1000), allow_negative_numbers = true)]
    pub repeats: usize,
    /// Time only this batch size's forwards, 1 or 2 (for profilers such as
    /// tools/profile_ops.py) [default: both]
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=2))]
    pub only_batch: Option<usize>,
    /// f32 or f16 (bf16 on CUDA builds).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the table as Markdown here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write each strategy's per-step trace here as `<strategy>.json` (`<strategy>-mpi.json`
    /// for rows on processes): a new or empty folder (created if missing), or with --force one
    /// a previous run wrote.
    #[arg(long)]
    pub trace_dir: Option<PathBuf>,
    /// Use a --trace-dir that a previous run wrote, removing its *.json and *.md files first
    /// (anything else in it is refused, never deleted), so it only ever holds one run's
    /// traces.
    #[arg(long)]
    pub force: bool,
    /// Where the ranks of the parallel strategies run, comma-separated: `threads` (of one
    /// process) and, when started by mpirun, `mpi` (one rank per process) [default: mpi
    /// under mpirun, else threads]. `threads,mpi` times both in one run.
    #[arg(long)]
    pub transport: Option<String>,
    /// Predict each strategy's latency with its ranks on devices joined by this link, from
    /// the run's per-rank compute times and counted bytes and messages: pcie3, pcie4, nvlink,
    /// in-process (this process's transport, measured first), or GB/s with an optional
    /// per-message latency in microseconds (25, 25/10). See docs/benchmarks/latency-model.md.
    #[arg(long)]
    pub simulate_link: Option<String>,
    /// With --simulate-link: time each rank's compute by its counted FLOPs at this many
    /// TFLOP/s (the sustained rate of the GPU to predict for, e.g. about 400 for an H100 on
    /// SDXL's U-Net in f16) instead of the compute this machine measured.
    #[arg(long, requires = "simulate_link")]
    pub gpu_tflops: Option<f64>,
    /// Predict from the traces in this folder (as `--trace-dir` writes them, e.g. measured
    /// on GPUs) instead of running anything; needs --simulate-link.
    #[arg(long, conflicts_with_all = ["model", "inputs", "json", "markdown", "trace_dir"])]
    pub from_trace: Option<PathBuf>,
    #[command(flatten)]
    pub devices: crate::strategy_args::DeviceArgs,
    #[command(flatten)]
    pub strategy_args: crate::strategy_args::StrategyArgs,
}

/// `--simulate-link`: a named or numeric link, or the in-process transport measured here.
fn parse_link(s: &str) -> Result<hybridiff_engine::latency::Link> {
    if s == "in-process" {
        let link = hybridiff_engine::bench::in_process_link(2000, 4 << 20)?;
        println!(
            "in-process transport, measured: {:.2} us per message, {} (sends hand over a reference)",
            link.seconds_per_message * 1e6,
            if link.bytes_per_second.is_finite() {
                format!("{:.1} GB/s", link.bytes_per_second / 1e9)
            } else {
                "no per-byte cost".to_string()
            }
        );
        return Ok(link);
    }
    Ok(s.parse()?)
}

/// `--gpu-tflops`: FLOP-timed compute, or the measured one without it.
fn parse_compute(tflops: Option<f64>) -> Result<hybridiff_engine::latency::Compute> {
    use hybridiff_engine::latency::Compute;
    match tflops {
        None => Ok(Compute::Measured),
        Some(t) if t.is_finite() && t > 0.0 && t <= 1e6 => Ok(Compute::Flops {
            per_second: t * 1e12,
        }),
        Some(t) => {
            anyhow::bail!("--gpu-tflops {t}: expected a throughput above 0 and at most 1e6 TFLOP/s")
        }
    }
}

/// `bench --from-trace DIR --simulate-link L`: the latency model over traces already written.
fn run_from_trace(
    dir: &std::path::Path,
    link: Option<&str>,
    compute: hybridiff_engine::latency::Compute,
) -> Result<()> {
    use anyhow::Context;
    let Some(link) = link else {
        anyhow::bail!(
            "--from-trace {}: give --simulate-link pcie3|pcie4|nvlink|in-process|GBPS to say which link to predict for",
            dir.display()
        );
    };
    if !dir.is_dir() {
        anyhow::bail!("--from-trace {}: not a folder", dir.display());
    }
    let link = parse_link(link)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--from-trace {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json") && p.is_file())
        .collect();
    files.sort();
    let mut traces = Vec::new();
    for p in &files {
        let text = hybridiff_models::weights::read_text_bounded(p, 64 << 20)
            .with_context(|| format!("reading {}", p.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
        if v.get("steps").is_none() || v.get("strategy").is_none() {
            eprintln!(
                "hybridiff: skipping {}: not a trace (no `strategy` and `steps`)",
                p.display()
            );
            continue;
        }
        let t: hybridiff_engine::Trace = serde_json::from_value(v).with_context(|| {
            format!("{}: not a trace written by bench --trace-dir", p.display())
        })?;
        // Every number the table is made of must be one a run could have measured.
        t.check()
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        let name = p
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The name is a cell of a Markdown table.
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | ' '))
        {
            anyhow::bail!(
                "{}: the file name becomes a cell of the Markdown table; rename the file with letters, digits, spaces and . - _ + only",
                p.display()
            );
        }
        traces.push((name, p.clone(), t));
    }
    if traces.is_empty() {
        anyhow::bail!(
            "--from-trace {}: no traces (*.json written by bench --trace-dir) in the folder",
            dir.display()
        );
    }
    // The speedups divide by one serial baseline of the same run.
    let serial: Vec<&PathBuf> = traces
        .iter()
        .filter(|(_, _, t)| t.strategy == "serial")
        .map(|(_, p, _)| p)
        .collect();
    match serial.as_slice() {
        [_] => {}
        [] => anyhow::bail!(
            "--from-trace {}: no serial trace; the predicted speedups are over the serial run of the same bench (its serial.json)",
            dir.display()
        ),
        [a, b, ..] => anyhow::bail!(
            "--from-trace {}: {} serial traces ({} and {}); the speedups need exactly one baseline: keep the one from the same run as the others",
            dir.display(),
            serial.len(),
            a.display(),
            b.display()
        ),
    }
    // One bench run: the same steps, scheduler and guidance, one --world-size for the
    // parallel strategies.
    let (_, base_path, base) = traces
        .iter()
        .find(|(_, _, t)| t.strategy == "serial")
        .expect("one serial trace");
    let mut parallel_world: Option<(&PathBuf, usize)> = None;
    for (_, p, t) in &traces {
        for (field, mine, theirs) in [
            (
                "num_steps",
                t.num_steps.to_string(),
                base.num_steps.to_string(),
            ),
            ("scheduler", t.scheduler.clone(), base.scheduler.clone()),
            (
                "guidance",
                t.guidance.to_string(),
                base.guidance.to_string(),
            ),
        ] {
            if mine != theirs {
                anyhow::bail!(
                    "{}: `{field}` = {mine} but {} has {theirs}; the traces of one bench run share it (compare only traces from the same run)",
                    p.display(),
                    base_path.display()
                );
            }
        }
        if t.strategy != "serial" {
            match parallel_world {
                Some((q, w)) if w != t.world_size => anyhow::bail!(
                    "{}: `world_size` = {} but {} has {w}; the parallel traces of one bench run share its --world-size",
                    p.display(),
                    t.world_size,
                    q.display()
                ),
                Some(_) => {}
                None => parallel_world = Some((p, t.world_size)),
            }
        }
    }
    let traces: Vec<(String, hybridiff_engine::Trace)> =
        traces.into_iter().map(|(n, _, t)| (n, t)).collect();
    print!(
        "{}",
        hybridiff_engine::bench::trace_table(&traces, &link, compute)?
    );
    Ok(())
}

pub fn run(args: BenchArgs, launch: &crate::launch::Launch) -> Result<()> {
    let compute = parse_compute(args.gpu_tflops)?;
    let given = crate::strategy_args::Given::get();
    if let Some(dir) = &args.from_trace {
        // Everything but the link describes a run, and --from-trace runs nothing.
        let ignored: Vec<String> = given
            .ids()
            .filter(|id| {
                !matches!(
                    *id,
                    "from_trace" | "simulate_link" | "gpu_tflops" | "verbose"
                )
            })
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect();
        if !ignored.is_empty() {
            anyhow::bail!(
                "{}: not used with --from-trace, which only reads the traces in {} (their runs' settings are in them); leave {} out",
                ignored.join(", "),
                dir.display(),
                if ignored.len() == 1 { "it" } else { "them" }
            );
        }
        return run_from_trace(dir, args.simulate_link.as_deref(), compute);
    }
    // Flags that only shape something this run does not do are refused, not ignored.
    if args.inputs.is_some() {
        let unused = given.among(&["latent_size", "context_len"]);
        if !unused.is_empty() {
            anyhow::bail!(
                "{}: sizes of the random inputs, but --inputs gives the inputs; leave {} out",
                unused.join(", "),
                if unused.len() == 1 { "it" } else { "them" }
            );
        }
    }
    if args.repeats == 0 && given.has("only_batch") {
        anyhow::bail!(
            "--only-batch: picks which timed forwards run, but --repeats 0 runs none; leave it out or give --repeats 1 or more"
        );
    }
    let Some(model_dir) = args.model.clone() else {
        anyhow::bail!("--model: required (or --from-trace DIR)");
    };
    args.devices.precheck()?;
    let link = match &args.simulate_link {
        // Parsed now so a bad value fails at once; `in-process` is measured just before the runs.
        Some(l) if l != "in-process" => Some(l.parse::<hybridiff_engine::latency::Link>()?),
        _ => None,
    };
    let processes = launch.processes();
    let root = launch.is_root();
    let default_transport = if processes.is_some() {
        "mpi"
    } else {
        "threads"
    };
    let mut transports = Vec::new();
    for t in args
        .transport
        .as_deref()
        .unwrap_or(default_transport)
        .split(',')
    {
        match (t.trim(), processes) {
            ("threads", _) => transports.push(false),
            ("mpi", Some(_)) => transports.push(true),
            ("mpi", None) => anyhow::bail!(
                "--transport mpi: this process was not started by mpirun; run \
                 `mpirun -np N hybridiff bench ...` with an MPI build (--features mpi)"
            ),
            (other, _) => {
                anyhow::bail!("--transport: unknown `{other}`; expected threads or mpi")
            }
        }
    }
    // The serial baseline runs 1 rank, the threads rows --world-size, all with these
    // threads (rows on processes hold one rank per process).
    let threads_world = if transports.contains(&false) {
        args.world_size
    } else {
        1
    };
    for world in [1, threads_world] {
        hybridiff_engine::RunOptions {
            world_size: world,
            threads_per_rank: args.threads_per_rank,
            comm_timeout: std::time::Duration::from_secs(3600),
            placement: Default::default(),
        }
        .check(hybridiff_engine::cores())?;
    }
    let kinds = args
        .strategies
        .split(',')
        .map(|s| {
            s.trim().parse::<StrategyKind>().map_err(|_| {
                let all: Vec<String> = StrategyKind::ALL.iter().map(|k| k.to_string()).collect();
                anyhow::anyhow!(
                    "--strategies {}: unknown strategy `{}`; expected a comma-separated list of {}",
                    args.strategies,
                    s.trim(),
                    all.join(", ")
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let what = format!("--strategies {}", args.strategies);
    crate::strategy_args::check_flags_used(given, &kinds, &args.strategy_args, &what)?;
    if kinds.iter().all(|&k| k == StrategyKind::Serial) {
        let unused = given.among(&["world_size", "transport"]);
        if !unused.is_empty() {
            anyhow::bail!(
                "{}: for the parallel strategies' ranks, but {what} runs serial only (1 rank); leave {} out or add a parallel strategy",
                unused.join(", "),
                if unused.len() == 1 { "it" } else { "them" }
            );
        }
    }
    if let Some(k) = kinds
        .iter()
        .enumerate()
        .find_map(|(i, k)| kinds[..i].contains(k).then_some(k))
    {
        anyhow::bail!(
            "{what}: `{k}` is listed twice; each strategy runs (and writes its trace) once"
        );
    }
    // The cache decides the trace names: read before the outputs are planned.
    let defaults = crate::strategy_args::ModelDefaults::read(&model_dir)?;
    let cache = args.strategy_args.cache(&defaults, args.steps)?;
    let cache_method = cache.as_ref().map(|(spec, _)| spec.method());
    // Every file the run writes, checked before anything is loaded.
    let mut plan = Plan::new();
    if let Some(p) = &args.inputs {
        plan.input("--inputs", p);
    }
    if let Some(p) = &args.json {
        plan.file("--json", p, Format::Json);
    }
    if let Some(p) = &args.markdown {
        plan.file("--markdown", p, Format::Markdown);
    }
    if let Some(d) = &args.trace_dir {
        let mut files = Vec::new();
        for &kind in &kinds {
            let on: &[bool] = if kind == StrategyKind::Serial {
                &[false]
            } else {
                &transports
            };
            // With --cache, every strategy runs without and then with it.
            let variants: &[Option<&str>] = match cache_method {
                Some(_) => &[None, cache_method],
                None => &[None],
            };
            for &mpi in on {
                for &c in variants {
                    let name = trace_name(kind, c, if mpi { "mpi" } else { "threads" });
                    files.push((format!("--trace-dir ({name})"), d.join(&name), Format::Json));
                }
            }
        }
        plan.folder(
            OutputFolder {
                flag: "--trace-dir",
                path: d,
                force: args.force,
                ours: written_by_bench,
                kinds: "*.json traces and summaries, *.md tables",
            },
            files,
        );
    } else if args.force {
        anyhow::bail!("--force: empties the --trace-dir folder of a previous run's files; there is no --trace-dir, so leave it out");
    }
    // Nothing may land in or on the model or a file its flags name.
    let model_inputs = args.model_args.inputs();
    let mut spare: Vec<(&str, &std::path::Path)> = vec![("--model", model_dir.as_path())];
    spare.extend(model_inputs.iter().map(|(f, p)| (*f, p.as_path())));
    let ready = match root {
        true => Some(plan.check(&spare)?),
        false => None,
    };
    let resolved = args.model_args.spec(&model_dir)?.resolve(false)?;
    if let (true, Some(line)) = (root, resolved.summary()) {
        eprintln!("hybridiff: {line}");
    }

    if let Some(p) = processes {
        let parallel = kinds.iter().any(|&k| k != StrategyKind::Serial);
        if parallel && transports.contains(&true) && args.world_size != p.size {
            anyhow::bail!(
                "--world-size {}: this job was started as {} process(es) and runs its `mpi` rows \
                 on all of them; give --world-size {}",
                args.world_size,
                p.size,
                p.size
            );
        }
    }
    hybridiff_engine::check_guidance(args.guidance)?;
    let (options, switch) = args.strategy_args.options(&defaults, args.steps)?;
    if let Some((spec, note)) = &cache {
        spec.check_steps(args.steps)
            .map_err(|e| anyhow::anyhow!("{e}{}", crate::strategy_args::from_default(note)))?;
        if root && note.starts_with("--cache default") {
            eprintln!("hybridiff: {note}");
        }
    }
    let built: Vec<Box<dyn hybridiff_engine::Strategy>> =
        kinds.iter().map(|k| k.build(&options)).collect();
    let refs: Vec<&dyn hybridiff_engine::Strategy> = built.iter().map(|b| b.as_ref()).collect();
    crate::strategy_args::announce(&kinds, &refs, &switch, args.guidance, args.steps, root)?;
    crate::set_compute_threads(args.threads_per_rank);
    // The in-process ranks of the widest run; serial runs on rank 0's device.
    let devices = args.devices.resolve(threads_world.max(1), None, root)?;
    let device = devices.device.clone();
    let dtype = crate::strategy_args::parse_dtype(&args.dtype, &device)?;
    let model = Model::load_resolved(&resolved, dtype, &device)?;
    crate::strategy_args::check_cache_fits(cache.as_ref(), model.denoiser.as_ref())?;
    let placement = crate::strategy_args::load_replicas(devices.placement, &resolved, dtype)?;
    let inputs = match &args.inputs {
        Some(p) => DenoiseInputs::load(p, &model.input_spec, &device)?,
        None => {
            let size = args.latent_size.or(model.sample_size()).unwrap_or(64);
            // Before the random latents and embeddings are drawn.
            let max_ctx = hybridiff_engine::memory::MAX_CONTEXT_LEN;
            if args.context_len == 0 || args.context_len > max_ctx {
                anyhow::bail!(
                    "--context-len {}: expected 1 to {max_ctx}",
                    args.context_len
                );
            }
            hybridiff_engine::memory::check_counts(args.steps, args.context_len)?;
            for kind in &kinds {
                let world = if *kind == StrategyKind::Serial {
                    1
                } else {
                    args.world_size
                };
                let shape = JobShape::for_strategy(
                    &kind.to_string(),
                    world,
                    (model.input_spec.latent_channels, size, size),
                    args.context_len,
                    args.steps,
                )
                .with_cache(options.cache);
                estimate_job(model.denoiser.as_ref(), &shape).check()?;
            }
            random_inputs(
                &model.input_spec,
                (size, size),
                args.context_len,
                0,
                &device,
            )?
        }
    };
    let (h, w) = (inputs.latents.dim(2)?, inputs.latents.dim(3)?);
    let scheduler = crate::denoise::parse_scheduler(args.scheduler.as_deref(), &model, args.steps)?;
    let tpr = args.threads_per_rank;
    // Bench waits include whole runs on rank 0 (serial, thread rows), hence the long bound.
    let mut comm = launch.communicator(std::time::Duration::from_secs(3600))?;
    if root {
        println!(
        "model {} | latents {h}x{w} | {} | {} steps {scheduler} guidance {} | {tpr} thread(s) per rank | {} cores",
        model_dir.display(),
        args.dtype,
        args.steps,
        args.guidance,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    }

    let job = Job {
        model: model.denoiser.as_ref(),
        scheduler_config: &model.scheduler_config,
        scheduler,
        steps: args.steps,
        guidance: args.guidance,
        inputs: &inputs,
        progress: None,
        sampling: Default::default(),
    };
    let mut runs = Vec::new();
    // With --cache, every strategy runs without and then with it.
    let variants: &[bool] = if options.cache.is_some() {
        &[false, true]
    } else {
        &[false]
    };
    for &kind in &kinds {
        for &cached in variants {
            if kind == StrategyKind::Serial {
                // One rank: the same on threads and processes, so it runs once.
                runs.push(BenchRun {
                    kind,
                    world_size: 1,
                    on_processes: false,
                    cached,
                });
                continue;
            }
            for &on_processes in &transports {
                runs.push(BenchRun {
                    kind,
                    world_size: args.world_size,
                    on_processes,
                    cached,
                });
            }
        }
    }
    // Every run's layout and options are checked before the timed forwards, so a bad flag
    // fails at once rather than after them.
    if args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    for run in &runs {
        run.kind.build(&options).check(&job, run.world_size)?;
    }
    let mut forward = None;
    if args.repeats > 0 && root {
        let time = |b: usize| -> Result<Option<f64>> {
            Ok(match args.only_batch {
                Some(o) if o != b => None,
                _ => Some(forward_seconds(&model, &inputs, b, args.repeats, tpr)?),
            })
        };
        let (f1, f2) = (time(1)?, time(2)?);
        if let Some(f1) = f1 {
            println!("denoiser forward, batch 1: {f1:.4} s");
        }
        match (f1, f2) {
            (Some(f1), Some(f2)) => println!(
                "denoiser forward, batch 2: {f2:.4} s  ({:.2}x batch 1)",
                f2 / f1
            ),
            (None, Some(f2)) => println!("denoiser forward, batch 2: {f2:.4} s"),
            _ => {}
        }
        forward = Some((f1, f2));
    }
    if let Some(c) = comm.as_mut() {
        c.barrier()?; // the others waited while rank 0 timed forwards
    }
    let group: Option<(&mut dyn hybridiff_comm::Communicator, &str)> = match comm.as_mut() {
        Some(c) => Some((c.as_mut(), "mpi")),
        None => None,
    };
    let link = match (&args.simulate_link, link) {
        (Some(l), None) if root => Some(parse_link(l)?),
        (_, link) => link,
    };
    if let Some(r) = &ready {
        r.prepare()?;
    }
    let results = compare_on(
        &job,
        &runs,
        &options,
        tpr,
        &placement,
        link.as_ref().map(|l| (l, compute)),
        group,
    )?;
    if !root {
        return Ok(());
    }
    let rows: Vec<_> = results.iter().map(|(r, _)| r.clone()).collect();
    let table = markdown_table(&rows);
    println!();
    print!("{table}");
    if let Some(d) = &args.trace_dir {
        for (row, trace) in &results {
            let kind: StrategyKind = row.strategy.parse()?;
            let method = (row.cache != "-").then(|| row.cache.split(':').next().unwrap_or("cache"));
            let p = d.join(trace_name(kind, method, &row.transport));
            write_bytes_atomic(&p, serde_json::to_string_pretty(trace)?.as_bytes())?;
        }
    }
    if let Some(p) = &args.markdown {
        write_bytes_atomic(p, table.as_bytes())?;
    }
    if let Some(p) = &args.json {
        let v = serde_json::json!({
            "model": model_dir.display().to_string(),
            "latent_size": [h, w],
            "steps": args.steps,
            "scheduler": scheduler.to_string(),
            "guidance": args.guidance,
            "classifier_free_guidance": args.guidance > 1.0,
            "threads_per_rank": tpr,
            "dtype": args.dtype,
            "forward_seconds": forward.map(|(a, b)| {
                let mut m = serde_json::Map::new();
                if let Some(a) = a {
                    m.insert("batch1".into(), a.into());
                }
                if let Some(b) = b {
                    m.insert("batch2".into(), b.into());
                }
                serde_json::Value::Object(m)
            }),
            "switch": options.switch,
            "runs": rows,
        });
        write_bytes_atomic(p, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}
