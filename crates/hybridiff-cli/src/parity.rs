//! `hybridiff parity`: the fixture comparisons of the models crate's tests
//! (`hybridiff_models::parity`) on any device and dtype, e.g. on a GPU in f16
//! (`tools/gpu-check.sh`).

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct ParityArgs {
    /// The repository's `tests/fixtures` (holds tiny-sdxl/ and tiny-sd3/).
    #[arg(long, default_value = "tests/fixtures")]
    pub fixtures: PathBuf,
    /// f32, f16, or bf16 (CUDA builds).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Runs the forwards on candle's device-generic ops (the path CUDA tensors take) even on
    /// the CPU, and fails if any CPU kernel ran: the GPU path checked without a GPU.
    #[arg(long)]
    pub device_generic: bool,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub devices: crate::strategy_args::DeviceArgs,
}

pub fn run(args: ParityArgs) -> Result<()> {
    args.devices.precheck()?;
    // The fixtures are inputs: --json may not land among them.
    let ready = match &args.json {
        Some(json) => {
            let mut plan = crate::outputs::Plan::new();
            plan.file("--json", json, crate::outputs::Format::Json);
            Some(plan.check(&[("--fixtures", &args.fixtures)])?)
        }
        None => None,
    };
    for name in hybridiff_models::parity::FIXTURES {
        let dir = args.fixtures.join(name);
        anyhow::ensure!(
            dir.is_dir(),
            "--fixtures {}: no folder `{name}` (give the repository's tests/fixtures)",
            args.fixtures.display()
        );
    }
    let devices = args.devices.resolve(1, None, true)?;
    let dtype = crate::strategy_args::parse_dtype(&args.dtype, &devices.device)?;
    let kernels_before = hybridiff_models::host::cpu_kernel_calls();
    let rows = {
        let _generic = args
            .device_generic
            .then(hybridiff_models::host::force_device_generic);
        hybridiff_models::parity::run_all(&args.fixtures, &devices.device, dtype)
            .with_context(|| format!("--fixtures {}", args.fixtures.display()))?
    };
    let cpu_kernels = hybridiff_models::host::cpu_kernel_calls() - kernels_before;
    println!(
        "{:<34} {:>5} {:>12} {:>12} {:>12} {:>9} {:>6}",
        "check", "dtype", "max|diff|", "bound", "max|expected|", "seconds", "pass"
    );
    for r in &rows {
        println!(
            "{:<34} {:>5} {:>12.3e} {:>12.3e} {:>12.4} {:>9.4} {:>6}",
            r.name, r.dtype, r.max_abs_diff, r.bound, r.max_abs_expected, r.seconds, r.pass
        );
    }
    println!(
        "device {:?}, tolerance {:e} x max(1, max|expected|), CPU kernels run: {cpu_kernels}",
        devices.device.location(),
        hybridiff_models::parity::tolerance(dtype)
    );
    if let Some(json) = &args.json {
        let v = serde_json::json!({
            "device": format!("{:?}", devices.device.location()),
            "dtype": args.dtype,
            "device_generic": args.device_generic,
            "cpu_kernel_calls": cpu_kernels,
            "tolerance": hybridiff_models::parity::tolerance(dtype),
            "rows": rows,
        });
        if let Some(r) = &ready {
            r.prepare()?;
        }
        hybridiff_engine::io::write_bytes_atomic(
            json,
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )
        .with_context(|| format!("--json {}", json.display()))?;
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.name.as_str())
        .collect();
    anyhow::ensure!(failed.is_empty(), "parity failed: {}", failed.join(", "));
    anyhow::ensure!(
        !(args.device_generic && cpu_kernels > 0),
        "--device-generic: {cpu_kernels} CPU kernels ran (a host round trip on a GPU)"
    );
    Ok(())
}
