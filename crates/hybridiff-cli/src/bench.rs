//! `hybridiff bench`.

use std::path::PathBuf;

use anyhow::Result;
use hybridiff_engine::bench::{
    compare_on, forward_seconds, markdown_table, random_inputs, BenchRun,
};
use hybridiff_engine::io::{
    check_distinct_paths, check_output_path, check_outside_folder, write_bytes_atomic,
};
use hybridiff_engine::memory::{estimate_job, JobShape};
use hybridiff_engine::{DenoiseInputs, Job, Model, StrategyKind};

/// Arguments of `hybridiff bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A diffusers model folder (see `hybridiff init` for random-weight ones).
    #[arg(long, required_unless_present = "from_trace")]
    pub model: Option<PathBuf>,
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
    /// ddim, euler, dpmpp-2m or flow-euler [default: the model's scheduler_config.json]
    #[arg(long)]
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
    /// for rows on processes; the folder must exist).
    #[arg(long)]
    pub trace_dir: Option<PathBuf>,
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
        let name = p
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        traces.push((name, t));
    }
    if traces.is_empty() {
        anyhow::bail!(
            "--from-trace {}: no traces (*.json written by bench --trace-dir) in the folder",
            dir.display()
        );
    }
    print!(
        "{}",
        hybridiff_engine::bench::trace_table(&traces, &link, compute)?
    );
    Ok(())
}

pub fn run(args: BenchArgs, launch: &crate::launch::Launch) -> Result<()> {
    let compute = parse_compute(args.gpu_tflops)?;
    if let Some(dir) = &args.from_trace {
        return run_from_trace(dir, args.simulate_link.as_deref(), compute);
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
    if root {
        for (p, flag) in [(&args.json, "--json"), (&args.markdown, "--markdown")] {
            if let Some(p) = p {
                check_output_path(p, flag)?;
            }
        }
        if let Some(d) = &args.trace_dir {
            if !d.is_dir() {
                anyhow::bail!("--trace-dir {}: not a folder; create it first", d.display());
            }
        }
    }
    if let (Some(j), Some(m)) = (&args.json, &args.markdown) {
        check_distinct_paths(&[("--json", j), ("--markdown", m)], &[])?;
    }
    let mut outputs: Vec<(&str, &std::path::Path)> = Vec::new();
    for (p, flag) in [(&args.json, "--json"), (&args.markdown, "--markdown")] {
        if let Some(p) = p {
            outputs.push((flag, p.as_path()));
        }
    }
    if let Some(d) = &args.trace_dir {
        outputs.push(("--trace-dir", d.as_path()));
    }
    check_outside_folder(&outputs, &model_dir, "--model")?;
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
        .map(|s| s.trim().parse::<StrategyKind>())
        .collect::<Result<Vec<_>, _>>()?;
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
    let (options, switch) = args.strategy_args.options(
        &crate::strategy_args::ModelDefaults::read(&model_dir)?,
        args.steps,
    )?;
    let built: Vec<Box<dyn hybridiff_engine::Strategy>> =
        kinds.iter().map(|k| k.build(&options)).collect();
    let refs: Vec<&dyn hybridiff_engine::Strategy> = built.iter().map(|b| b.as_ref()).collect();
    crate::strategy_args::announce(&kinds, &refs, &switch, args.guidance, args.steps, root)?;
    crate::set_compute_threads(args.threads_per_rank);
    // The in-process ranks of the widest run; serial runs on rank 0's device.
    let devices = args.devices.resolve(threads_world.max(1), None, root)?;
    let device = devices.device.clone();
    let dtype = crate::strategy_args::parse_dtype(&args.dtype, &device)?;
    let model = Model::load(&model_dir, dtype, &device)?;
    let placement = crate::strategy_args::load_replicas(devices.placement, &model_dir, dtype)?;
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
                );
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
    let scheduler = crate::denoise::parse_scheduler(args.scheduler.as_deref(), &model)?;
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
    };
    let mut runs = Vec::new();
    for &kind in &kinds {
        if kind == StrategyKind::Serial {
            // One rank: the same on threads and processes, so it runs once.
            runs.push(BenchRun {
                kind,
                world_size: 1,
                on_processes: false,
            });
            continue;
        }
        for &on_processes in &transports {
            runs.push(BenchRun {
                kind,
                world_size: args.world_size,
                on_processes,
            });
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
            let p = match row.transport.as_str() {
                "threads" => d.join(format!("{}.json", row.strategy)),
                t => d.join(format!("{}-{t}.json", row.strategy)),
            };
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
