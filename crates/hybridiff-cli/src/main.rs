//! `hybridiff`: fast multi-device text-to-image diffusion.

mod bench;
mod compare;
mod default_model;
mod denoise;
mod generate;
mod interrupt;
mod launch;
mod nccl_check;
mod outputs;
mod parity;
mod plot;
mod serve;
mod strategy_args;
mod tune;

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2 and v3 alike; libmimalloc-sys names
/// no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps memory the process freed for its next allocations instead of returning it to the
/// OS after mimalloc's purge delay: a forward frees and reallocates the same large
/// activation and attention buffers every step, and each purge made the next step fault
/// them in again, zeroed by the kernel (perf: `clear_page_erms` 17% of a 20-step batch on
/// the default model, 1% without purging). The process's peak memory, which the memory
/// estimate already bounds, stays reserved until it exits.
fn keep_freed_memory() {
    // SAFETY: sets one integer option of the allocator this binary links; mimalloc reads
    // its options atomically, so setting one while threads allocate is allowed.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Fast text-to-image diffusion on several devices (Hybridiff, AsyncDiff, CFG split).
#[derive(Parser, Debug)]
#[command(name = "hybridiff", version, about)]
struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Text to image with a diffusers pipeline folder.
    Generate(generate::GenerateArgs),
    /// Denoise latents from a safetensors inputs file with a model folder.
    Denoise(denoise::DenoiseArgs),
    /// Write a random-weight model folder from a U-Net or MMDiT config (for benchmarks).
    Init(InitArgs),
    /// Time the denoiser forward and compare strategies on one machine.
    Bench(bench::BenchArgs),
    /// PSNR, SSIM (and LPIPS with --lpips) between two folders of images, paired by file name.
    Compare(compare::CompareArgs),
    /// Chooses Hybridiff's thresholds, k and knobs for a model: the fastest setting that
    /// keeps a quality floor against serial; writes hybridiff.json and a report with plots.
    Tune(tune::TuneArgs),
    /// Draws one run's trace (rel-MAE, slope, mode and per-rank time per step) as a PNG.
    Plot(plot::PlotArgs),
    /// HTTP image service (OpenAI images API, web page) on ranks kept warm.
    Serve(serve::ServeArgs),
    /// Compares our U-Net, MMDiT and VAE with diffusers' outputs in tests/fixtures on a
    /// device and dtype (the GPU check's first table).
    Parity(parity::ParityArgs),
    /// Tests this machine's NCCL on one GPU: the NCCL transport's path, one rank sending to
    /// itself (needs a build with --features cuda,nccl).
    NcclCheck(nccl_check::NcclCheckArgs),
}

#[derive(clap::Args, Debug)]
struct InitArgs {
    /// A diffusers `unet/config.json` or `transformer/config.json`.
    #[arg(long)]
    config: std::path::PathBuf,
    /// The model folder to write: new or empty (created if missing), or with --force one an
    /// earlier `init` wrote.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Replace the model in an --out folder an earlier `init` wrote (its model_index.json,
    /// unet/, transformer/ and scheduler/ are removed first; anything else in the folder is
    /// refused, never deleted).
    #[arg(long)]
    force: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,hybridiff_comm=error",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: escapes in a redirected log are noise.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Sets the per-rank thread budget that candle's matmul reads, before any pool exists.
pub(crate) fn set_compute_threads(threads_per_rank: usize) {
    // candle sizes its gemm parallelism from RAYON_NUM_THREADS on every call; each rank
    // runs inside its own pool of this size, so the two must agree.
    std::env::set_var("RAYON_NUM_THREADS", threads_per_rank.to_string());
    // candle 0.11's element-wise ops above 64K elements run on one process-wide pool of
    // spinning threads sized by CANDLE_NUM_THREADS (else RAYON_NUM_THREADS), outside every
    // rank's pool: with 2 threads per rank its worker spun against the rank's own threads
    // and a 2-thread forward was no faster than a 1-thread one (perf: 16% in its barrier).
    // Inline, they stay in the rank's budget; the heavy element-wise work is ours anyway
    // (models' kernels.rs, parallel in the rank's pool).
    std::env::set_var("CANDLE_NUM_THREADS", "1");
}

/// Threads per rank when the user gives none: the cores shared evenly.
pub(crate) fn default_threads(world_size: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (cores / world_size.max(1)).max(1)
}

/// A progress bar on stderr, drawn by the process that prints (rank 0) only.
pub(crate) fn progress_bar(steps: usize, shown: bool) -> indicatif::ProgressBar {
    if !shown {
        return indicatif::ProgressBar::hidden();
    }
    indicatif::ProgressBar::new(steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise} eta {eta}",
        )
        .expect("valid template"),
    )
}

fn main() -> ExitCode {
    keep_freed_memory();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some((_, sub)) = matches.subcommand() {
        strategy_args::Given::from_matches(sub).set();
    }
    init_logging(cli.verbose);
    let launch = match launch::Launch::from_env() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hybridiff: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(args, &launch),
        Command::Denoise(args) => denoise::run(args, &launch),
        Command::Init(args) => launch.only_one_process("init").and_then(|()| {
            hybridiff_engine::init::init_model_folder(
                &args.config,
                &args.out,
                args.seed,
                args.force,
            )
            .map(|()| println!("wrote random-weight model to {}", args.out.display()))
            .map_err(anyhow::Error::from)
        }),
        Command::Bench(args) => bench::run(args, &launch),
        Command::Compare(args) => launch
            .only_one_process("compare")
            .and_then(|()| compare::run(args)),
        Command::Tune(args) => launch
            .only_one_process("tune")
            .and_then(|()| tune::run(args)),
        Command::Plot(args) => launch
            .only_one_process("plot")
            .and_then(|()| plot::run(args)),
        Command::Serve(args) => launch
            .only_one_process("serve")
            .and_then(|()| serve::run(args)),
        Command::Parity(args) => launch
            .only_one_process("parity")
            .and_then(|()| parity::run(args)),
        Command::NcclCheck(args) => launch
            .only_one_process("nccl-check")
            .and_then(|()| nccl_check::run(args)),
    };
    launch.finish(result)
}
