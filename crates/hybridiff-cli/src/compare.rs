//! `hybridiff compare`: PSNR, SSIM and (with `--lpips`) LPIPS between two folders of
//! images (the paper's "w/ Orig." comparison).

use std::path::PathBuf;

use anyhow::Result;
use hybridiff_engine::metrics::compare_dirs;

/// Arguments of `hybridiff compare`. Images smaller than SSIM's 7x7 window are refused
/// (as scikit-image refuses them), and so are images of more than 16777216 pixels
/// (4096x4096), read from the PNG header before decoding. Images with an alpha channel are
/// compared on R, G, B and A (an image without one counts as opaque), so images that differ
/// only in transparency are not identical; 16-bit images are compared at 16 bits. Names
/// found in only one folder are listed on stderr and in the JSON (`only_in_a`,
/// `only_in_b`), and the means cover the pairs. A progress bar shows on a terminal.
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
    // Drawn only on a terminal (indicatif hides it otherwise); sized once the pairs are known.
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} images {elapsed_precise} eta {eta}",
        )
        .expect("valid template"),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let cmp = compare_dirs(&args.dir_a, &args.dir_b, lpips.as_ref(), Some(&progress));
    bar.finish_and_clear();
    let cmp = cmp?;
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
        // A file name is a table cell: pipes and line breaks would break the row.
        let file = p.file.replace('|', "\\|").replace(['\n', '\r'], " ");
        println!("| {file} | {psnr} | {:.4} |{}", p.ssim, lp(p.lpips));
    }
    let mp = mean_psnr
        .map(|v| format!("{v:.2}"))
        .unwrap_or_else(|| "identical".into());
    println!(
        "| mean ({} images) | {mp} | {mean_ssim:.4} |{}",
        pairs.len(),
        lp(mean_lpips)
    );
    let rgba = pairs.iter().filter(|p| p.channels == "RGBA").count();
    let wide = pairs.iter().filter(|p| p.bits == 16).count();
    if rgba + wide > 0 {
        println!(
            "\n{rgba} pair(s) compared with their alpha channel (RGBA), {wide} at 16 bits per sample"
        );
    }
    Ok(())
}
