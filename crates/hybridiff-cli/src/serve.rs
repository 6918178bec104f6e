//! `hybridiff serve`: the flags, then the service of `hybridiff-serve` on a tokio runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hybridiff_engine::pipeline::Pipeline;
use hybridiff_engine::Runner;
use hybridiff_serve::{Backend, Config, Limits, PipelineBackend, RequestDefaults, Service, Stop};

use crate::strategy_args::ModelDefaults;

/// Arguments of `hybridiff serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A diffusers pipeline folder, or a single-file SD 1.x / 2.x / SDXL base
    /// .safetensors checkpoint [default: the model built into this binary].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub model_args: crate::strategy_args::ModelArgs,
    /// Address or host name to bind (a name is resolved; the first address that binds is
    /// used). Anything but loopback exposes the service: give --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// A host name clients may reach the service by, besides its own address (and
    /// localhost when bound to loopback or every address): NAME (any port: a reverse
    /// proxy's name) or NAME:PORT (e.g. localhost:9000 behind an SSH tunnel or a container
    /// port mapping). Repeatable. Requests whose Host (or a browser's Origin) names another
    /// host are refused 403, which stops web pages from driving the service through DNS
    /// rebinding. Bound to 0.0.0.0 or ::, any IP address with the bound port is taken too.
    #[arg(long = "allowed-host", value_name = "NAME[:PORT]")]
    pub allowed_hosts: Vec<String>,
    /// Port to bind (0: any free port; the bound address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health and the page. Without
    /// the flag, the HYBRIDIFF_API_KEY environment variable (empty: no key).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Steps when a request gives no num_inference_steps [default: hybridiff.json, else 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance when a request gives no guidance_scale [default: hybridiff.json, else 7 for
    /// SD3, 5 otherwise].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Image height when a request gives no size [default: the denoiser's sample size].
    #[arg(long, requires = "width")]
    pub height: Option<u32>,
    /// Image width when a request gives no size.
    #[arg(long, requires = "height")]
    pub width: Option<u32>,
    /// Requests that may wait behind the running one; more get 429 (0: run only when idle).
    #[arg(long, default_value_t = 8)]
    pub max_queue: usize,
    /// Seconds from arrival to answer (queue wait included); then 504 and the job is
    /// dropped or stopped.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Longest prompt (and negative prompt) in characters.
    #[arg(long, default_value_t = 2000)]
    pub max_prompt_chars: usize,
    /// Most images per request (`n`), at most 128.
    #[arg(long, default_value_t = 4)]
    pub max_n: usize,
    /// Most num_inference_steps.
    #[arg(long, default_value_t = 150)]
    pub max_steps: usize,
    /// Most pixels (width x height) per image.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_pixels: u64,
    /// Largest guidance_scale.
    #[arg(long, default_value_t = 50.0)]
    pub max_guidance: f64,
    /// Images kept in memory for response_format "url" (oldest dropped first); at least
    /// --max-n, so that an answer's own links are live when it is sent.
    #[arg(long, default_value_t = 64)]
    pub max_stored_images: usize,
    /// Seconds a client has to send a request's head (and an idle keep-alive connection
    /// stays open); then the connection is closed.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a client has to send a request's body once its head is in; then 408.
    #[arg(long, default_value_t = 30)]
    pub body_timeout: u64,
    /// Open connections at most; more wait in the listen backlog until one closes.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a write of an answer may make no progress (the client does not read it);
    /// then the connection is closed.
    #[arg(long, default_value_t = 30)]
    pub write_timeout: u64,
    #[command(flatten)]
    pub run: crate::strategy_args::RunArgs,
}

/// The most `--max-n` may be.
const MAX_N: usize = 128;

/// A key clients can send: `Authorization` carries printable ASCII only, and the service
/// trims the key it is sent, so any other character (non-ASCII, a control character such
/// as the `\r` of an env file with CRLF lines) or a space at either end would make every
/// request 401.
fn check_api_key(key: &str, from_flag: bool) -> Result<()> {
    let source = if from_flag {
        "--api-key"
    } else {
        "HYBRIDIFF_API_KEY"
    };
    if let Some(c) = key.chars().find(|c| !(' '..='~').contains(c)) {
        bail!(
            "{source}: the key has the character {c:?}, which an HTTP header cannot carry: \
             use printable ASCII only, or no client could ever send it"
        );
    }
    if key.trim() != key {
        bail!(
            "{source}: the key starts or ends with a space, which clients' headers drop: \
             no client could ever send it"
        );
    }
    Ok(())
}

/// SIGTERM, where there is one.
struct Term(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Term {
    fn new() -> Self {
        #[cfg(unix)]
        return Self(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| tracing::error!("cannot listen for SIGTERM: {e}"))
                .ok(),
        );
        #[cfg(not(unix))]
        Self()
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.0 {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

/// Resolves on SIGINT (never when it cannot be listened for).
async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::error!("cannot listen for Ctrl-C: {e}");
        std::future::pending::<()>().await;
    }
}

/// Resolves once SIGTERM or SIGINT arrives: SIGTERM drains (the running job finishes),
/// Ctrl-C (SIGINT) cancels the running job at its next step. After either, the next SIGINT
/// or SIGTERM exits at once (status 130).
async fn stop_signal() -> Stop {
    let mut term = Term::new();
    let stop = tokio::select! {
        _ = ctrl_c() => {
            eprintln!(
                "hybridiff serve: stopping: the running job is cancelled at its next step, \
                 queued requests get 503 (Ctrl-C again to exit at once)"
            );
            Stop::Cancel
        }
        _ = term.recv() => {
            eprintln!(
                "hybridiff serve: stopping (finishing the running job; queued requests get 503)"
            );
            Stop::Drain
        }
    };
    // The first signal's handler stays installed, so without this a second Ctrl-C would
    // wait for the stop to finish.
    tokio::spawn(async move {
        tokio::select! {
            _ = ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("hybridiff serve: second signal: exiting at once");
        std::process::exit(130);
    });
    stop
}

pub fn run(args: ServeArgs) -> Result<()> {
    for (flag, v) in [
        ("--max-body-bytes", args.max_body_bytes as u64),
        ("--max-prompt-chars", args.max_prompt_chars as u64),
        ("--max-n", args.max_n as u64),
        ("--max-steps", args.max_steps as u64),
        ("--max-pixels", args.max_pixels),
        ("--request-timeout", args.request_timeout),
        ("--max-stored-images", args.max_stored_images as u64),
        ("--header-timeout", args.header_timeout),
        ("--body-timeout", args.body_timeout),
        ("--max-connections", args.max_connections as u64),
        ("--write-timeout", args.write_timeout),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    // Every image of a request is held in memory (PNG and base64) until it is answered.
    if args.max_n > MAX_N {
        bail!("--max-n {}: at most {MAX_N}", args.max_n);
    }
    if args.max_stored_images < args.max_n {
        bail!(
            "--max-stored-images {} is below --max-n {}: a response_format \"url\" answer of \
             n images would push its own first images out of the store before it is sent",
            args.max_stored_images,
            args.max_n
        );
    }
    if args.max_steps > hybridiff_engine::memory::MAX_STEPS {
        bail!(
            "--max-steps {}: at most {} (the engine's bound)",
            args.max_steps,
            hybridiff_engine::memory::MAX_STEPS
        );
    }
    for h in &args.allowed_hosts {
        hybridiff_serve::guard::parse_allowed_host(h).map_err(anyhow::Error::msg)?;
    }
    if !(args.max_guidance.is_finite() && args.max_guidance >= 0.0) {
        bail!("--max-guidance must be a finite number >= 0");
    }
    let api_key = match &args.api_key {
        Some(k) if k.trim().is_empty() => {
            bail!("--api-key is empty: give the key clients must send, or leave the flag out")
        }
        Some(k) => Some(k.clone()),
        None => match std::env::var("HYBRIDIFF_API_KEY") {
            Ok(k) if k.trim().is_empty() => {
                eprintln!(
                    "hybridiff serve: HYBRIDIFF_API_KEY is empty: serving without an API key"
                );
                None
            }
            Ok(k) => Some(k),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                bail!("HYBRIDIFF_API_KEY is not valid UTF-8")
            }
        },
    };
    if let Some(k) = &api_key {
        check_api_key(k, args.api_key.is_some())?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hybridiff-serve-io")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // Resolved before the model loads, so that a bad --host fails at once.
    let addrs: Vec<SocketAddr> = runtime
        .block_on(tokio::net::lookup_host((args.host.as_str(), args.port)))
        .with_context(|| format!("--host {}: cannot resolve it", args.host))?
        .collect();
    if addrs.is_empty() {
        bail!("--host {}: resolves to no address", args.host);
    }
    args.run.devices.precheck()?;
    let (model_dir, model_id) = match &args.model {
        Some(d) => {
            let name = d
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| d.display().to_string());
            (d.clone(), name)
        }
        None => (
            crate::default_model::dir()?,
            "hybridiff-default".to_string(),
        ),
    };
    let defaults = ModelDefaults::read(&model_dir)?;
    // Headers, configs and LoRA files are read and matched now, before the service starts.
    let resolved = args.model_args.spec(&model_dir)?.resolve(true)?;
    if let Some(line) = resolved.summary() {
        eprintln!("hybridiff: {line}");
    }
    let model_source = resolved.description.clone();
    let loras: Vec<serde_json::Value> = resolved
        .loras
        .iter()
        .map(|l| {
            serde_json::json!({
                "file": l.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "scale": l.scale,
                "modules": l.modules,
            })
        })
        .collect();
    let default_steps = args.steps.or(defaults.steps).unwrap_or(50);
    // Sets the per-rank thread budget before any pool exists. Hybrid's thresholds are
    // checked here for the default step count, and resolved for each request's count as
    // `generate --steps N` resolves them (StrategyFor).
    let run = args.run.resolve(&defaults, default_steps, None)?;
    let device = run.device.clone();
    run.announce(
        args.guidance.or(defaults.guidance).unwrap_or(5.0),
        default_steps,
        true,
    )?;
    let strategy_args = args.run.strategy_args.clone();
    let model_defaults = defaults.clone();
    let request_defaults = RequestDefaults {
        steps: default_steps,
        guidance: args.guidance.or(defaults.guidance),
        size: args.width.zip(args.height),
    };
    if request_defaults.steps == 0 || request_defaults.steps > args.max_steps {
        bail!(
            "--steps {}: must be from 1 to --max-steps {}",
            request_defaults.steps,
            args.max_steps
        );
    }
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        max_prompt_chars: args.max_prompt_chars,
        max_n: args.max_n,
        max_steps: args.max_steps,
        max_pixels: args.max_pixels,
        max_guidance: args.max_guidance,
        max_queue: args.max_queue,
        request_timeout: Duration::from_secs(args.request_timeout),
        max_stored_images: args.max_stored_images,
        header_timeout: Duration::from_secs(args.header_timeout),
        body_timeout: Duration::from_secs(args.body_timeout),
        max_connections: args.max_connections,
        write_timeout: Duration::from_secs(args.write_timeout),
    };
    let config = Config {
        limits,
        api_key: api_key.clone(),
        allowed_hosts: args.allowed_hosts.clone(),
    };
    let (kind, dtype, scheduler, options) = (run.kind, run.dtype, run.scheduler, run.options);
    // The model is loaded and the ranks started once, on the service's job thread.
    let make = move || -> std::result::Result<Box<dyn Backend>, String> {
        let pipeline =
            Pipeline::load_resolved(&resolved, dtype, &device).map_err(|e| e.to_string())?;
        let mut options = options;
        options.placement =
            crate::strategy_args::load_replicas(options.placement, &resolved, dtype)
                .map_err(|e| format!("{e:#}"))?;
        let runner = Runner::start(options).map_err(|e| e.to_string())?;
        let strategy_for: hybridiff_serve::StrategyFor = std::sync::Arc::new(move |steps| {
            let (o, _) = strategy_args
                .options(&model_defaults, steps)
                .map_err(|e| hybridiff_engine::Error::Options(format!("{e:#}")))?;
            Ok(kind.build(&o))
        });
        Ok(Box::new(
            PipelineBackend::new(
                model_id,
                pipeline,
                runner,
                strategy_for,
                scheduler,
                request_defaults,
            )?
            .describe(model_source, loras),
        ))
    };
    let service = Service::start(make, config).map_err(anyhow::Error::msg)?;
    let info = service.info().clone();
    // What a request that leaves `size` or `guidance_scale` out gets must pass the checks a
    // request's own values do, or every such request would fail.
    // (Sizes that are not multiples of the model's, the strategy's layout and memory were
    // checked with a request of the defaults when the backend was built.)
    let (w, h) = info.default_size;
    if w as u64 * h as u64 > args.max_pixels {
        bail!(
            "the default size {w}x{h} (--width/--height, else the model's sample size) is {} \
             pixels, above --max-pixels {}",
            w as u64 * h as u64,
            args.max_pixels
        );
    }
    let g = info.default_guidance;
    if !(g.is_finite() && (0.0..=args.max_guidance).contains(&g)) {
        bail!(
            "the default guidance {g} (--guidance, else the model's) must be a number from 0 \
             to --max-guidance {}",
            args.max_guidance
        );
    }
    runtime.block_on(async move {
        let mut listener = None;
        let mut last_err = None;
        for addr in &addrs {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(e) => last_err = Some(format!("{addr}: {e}")),
            }
        }
        let Some(listener) = listener else {
            bail!(
                "--host {} --port {}: cannot bind ({})",
                args.host,
                args.port,
                last_err.unwrap_or_default()
            );
        };
        let bound = listener.local_addr()?;
        // Judged on the address bound, so that `localhost` counts as loopback. Printed once
        // (not also logged), as the first thing an operator should see.
        if !bound.ip().is_loopback() && api_key.is_none() {
            eprintln!(
                "hybridiff serve: warning: {} ({}) is reachable from other machines and no \
                 --api-key (or HYBRIDIFF_API_KEY) is set: anyone who can reach it can use it",
                args.host,
                bound.ip()
            );
        }
        // Tests and scripts read this line for the port.
        println!(
            "hybridiff serve: listening on http://{bound} ({} on {} rank(s), model {})",
            info.strategy, info.world_size, info.model_id
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        service
            .serve_until(listener, stop_signal())
            .await
            .context("serving HTTP")?;
        eprintln!("hybridiff serve: stopped");
        Ok(())
    })
}
