//! `hybridiff compare`: PSNR, SSIM and (with `--lpips`) LPIPS between two folders of
//! images (the paper's "w/ Orig." comparison).

use std::path::PathBuf;

use anyhow::Result;
use hybridiff_engine::metrics::compare_dirs;

/// Arguments of `hybridiff compare`. Images smaller than SSIM's 7x7 window are refused
/// (as scikit-image refuses them); names found in only one folder are listed on stderr
/// and in the JSON (`only_in_a`, `only_in_b`), and the means cover the pairs.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Folder of reference images (e.g. serial outputs).
    pub dir_a: PathBuf,
    /// Folder of images to measure; pairs are matched by file name.
    pub dir_b: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also LPIPS (AlexNet, v0.1) with these weights: a safetensors file of torchvision's
    /// AlexNet `features.*` and the lpips package's `lin*` heads, written by
    /// `tools/lpips_weights.py convert`. Images must be at least 31x31.
    #[arg(long)]
    pub lpips: Option<PathBuf>,
}

pub fn run(args: CompareArgs) -> Result<()> {
    let lpips = match &args.lpips {
        Some(p) => Some(
            hybridiff_models::lpips::Lpips::load(p, &candle_core::Device::Cpu)
                .map_err(|e| anyhow::anyhow!("--lpips: {e}"))?,
        ),
        None => None,
    };
    let cmp = compare_dirs(&args.dir_a, &args.dir_b, lpips.as_ref())?;
    for (only, dir) in [(&cmp.only_in_a, &args.dir_a), (&cmp.only_in_b, &args.dir_b)] {
        if !only.is_empty() {
            let shown: Vec<&str> = only.iter().take(10).map(String::as_str).collect();
            eprintln!(
                "hybridiff: warning: {} PNG file(s) only in {}, not compared: {}{}",
                only.len(),
                dir.display(),
                shown.join(", "),
                if only.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            );
        }
    }
    let pairs = cmp.pairs;
    let n = pairs.len() as f64;
    let mean_ssim = pairs.iter().map(|p| p.ssim).sum::<f64>() / n;
    // Identical pairs have infinite PSNR; the mean is over the others (null if none).
    let finite: Vec<f64> = pairs.iter().filter_map(|p| p.psnr_db).collect();
    let mean_psnr = (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64);
    let mean_lpips = lpips
        .is_some()
        .then(|| pairs.iter().filter_map(|p| p.lpips).sum::<f64>() / n);
    if args.json {
        let mut v = serde_json::json!({
            "images": pairs,
            "mean_psnr_db": mean_psnr,
            "identical": pairs.len() - finite.len(),
            "mean_ssim": mean_ssim,
            "only_in_a": cmp.only_in_a,
            "only_in_b": cmp.only_in_b,
        });
        if let Some(m) = mean_lpips {
            v["mean_lpips"] = serde_json::json!(m);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let lp = |v: Option<f64>| v.map(|x| format!(" {x:.4} |")).unwrap_or_default();
    if lpips.is_some() {
        println!("| image | PSNR (dB) | SSIM | LPIPS |\n|---|---|---|---|");
    } else {
        println!("| image | PSNR (dB) | SSIM |\n|---|---|---|");
    }
    for p in &pairs {
        let psnr = p
            .psnr_db
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "identical".into());
        println!("| {} | {psnr} | {:.4} |{}", p.file, p.ssim, lp(p.lpips));
    }
    let mp = mean_psnr
        .map(|v| format!("{v:.2}"))
        .unwrap_or_else(|| "identical".into());
    println!(
        "| mean ({} images) | {mp} | {mean_ssim:.4} |{}",
        pairs.len(),
        lp(mean_lpips)
    );
    Ok(())
}
