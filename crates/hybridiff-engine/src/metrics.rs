//! Distances between a run's output and the serial reference.

use candle_core::{DType, Tensor};

use crate::Result;

/// Max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// PSNR in dB of `x` against `reference`, with the reference's value range
/// (max - min) as the peak; infinite for identical tensors.
pub fn psnr(x: &Tensor, reference: &Tensor) -> Result<f64> {
    let r = reference.to_dtype(DType::F64)?.flatten_all()?;
    let d = (x.to_dtype(DType::F64)?.flatten_all()? - &r)?;
    let mse = d.sqr()?.mean(0)?.to_scalar::<f64>()?;
    let peak = r.max(0)?.to_scalar::<f64>()? - r.min(0)?.to_scalar::<f64>()?;
    if mse == 0.0 {
        return Ok(f64::INFINITY);
    }
    Ok(10.0 * (peak * peak / mse).log10())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn psnr_of_a_known_error() {
        let r = Tensor::new(&[0f32, 1.0, 0.0, 1.0], &Device::Cpu).unwrap();
        let x = Tensor::new(&[0.1f32, 0.9, 0.1, 0.9], &Device::Cpu).unwrap();
        // mse 0.01, peak 1 -> 20 dB
        assert!((psnr(&x, &r).unwrap() - 20.0).abs() < 1e-4);
        assert!(psnr(&r, &r).unwrap().is_infinite());
        assert!((max_abs_diff(&x, &r).unwrap() - 0.1).abs() < 1e-6);
    }

    #[test]
    fn ssim_needs_a_whole_window() {
        let img = vec![7u8; 7 * 7 * 3];
        assert_eq!(ssim_u8(&img, &img, 7, 7, 3), Some(1.0));
        let small = vec![7u8; 6 * 9 * 3];
        assert_eq!(ssim_u8(&small, &small, 6, 9, 3), None);
        assert_eq!(ssim_u8(&small, &small, 9, 6, 3), None);
    }
}

/// PSNR in dB between two 8-bit images of the same size (peak 255, all channels), as
/// scikit-image's `peak_signal_noise_ratio`; infinite for identical images.
pub fn psnr_u8(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = *x as f64 - *y as f64;
            d * d
        })
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// Mean SSIM of two interleaved 8-bit images (`channels` per pixel), as scikit-image's
/// `structural_similarity` with its defaults: 7x7 uniform window, K1 = 0.01, K2 = 0.03,
/// data range 255, sample covariance, the 3-pixel border cropped, channels averaged.
/// `None` for images smaller than the window in either side, where scikit-image raises
/// "win_size exceeds image extent" (no window lies inside the image).
pub fn ssim_u8(a: &[u8], b: &[u8], width: usize, height: usize, channels: usize) -> Option<f64> {
    let r = SSIM_WINDOW / 2;
    if width < SSIM_WINDOW || height < SSIM_WINDOW || channels == 0 {
        return None;
    }
    const WIN: usize = SSIM_WINDOW;
    let np = (WIN * WIN) as f64;
    let cov_norm = np / (np - 1.0);
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0.0;
    for c in 0..channels {
        let px = |img: &[u8], x: usize, y: usize| img[(y * width + x) * channels + c] as f64;
        let mut sum = 0.0;
        let mut count = 0usize;
        // Only windows that lie fully inside the image survive scikit-image's crop.
        for y in r..height - r {
            for x in r..width - r {
                let (mut sx, mut sy, mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for wy in y - r..=y + r {
                    for wx in x - r..=x + r {
                        let (p, q) = (px(a, wx, wy), px(b, wx, wy));
                        sx += p;
                        sy += q;
                        sxx += p * p;
                        syy += q * q;
                        sxy += p * q;
                    }
                }
                let (ux, uy) = (sx / np, sy / np);
                let vx = cov_norm * (sxx / np - ux * ux);
                let vy = cov_norm * (syy / np - uy * uy);
                let vxy = cov_norm * (sxy / np - ux * uy);
                let s = ((2.0 * ux * uy + c1) * (2.0 * vxy + c2))
                    / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
                sum += s;
                count += 1;
            }
        }
        total += sum / count as f64;
    }
    Some(total / channels as f64)
}

/// Side of SSIM's square window: images must be at least this wide and high.
pub const SSIM_WINDOW: usize = 7;

/// PSNR and SSIM (and LPIPS when asked) of one image pair.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImagePair {
    pub file: String,
    /// `None` (JSON null) for identical images.
    pub psnr_db: Option<f64>,
    pub ssim: f64,
    /// LPIPS distance (AlexNet, v0.1), when weights were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lpips: Option<f64>,
}

/// PSNR, SSIM and optionally LPIPS of two RGB8 images of `width x height`, as `compare` and
/// `tune` measure them. `None` when the images are smaller than SSIM's window (or, with
/// `lpips`, than [`hybridiff_models::lpips::MIN_SIDE`]): check sizes first.
pub fn image_quality(
    a: &[u8],
    b: &[u8],
    width: usize,
    height: usize,
    lpips: Option<&hybridiff_models::lpips::Lpips>,
) -> crate::Result<(f64, f64, Option<f64>)> {
    let psnr = psnr_u8(a, b);
    let ssim = ssim_u8(a, b, width, height, 3).ok_or_else(|| {
        crate::Error::Input(format!(
            "{width}x{height} pixels is smaller than SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window"
        ))
    })?;
    let lp = match lpips {
        Some(l) => Some(l.distance_rgb8(a, b, width, height)?),
        None => None,
    };
    Ok((psnr, ssim, lp))
}

/// The pairs of two folders, and the PNG names found in only one of them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub pairs: Vec<ImagePair>,
    pub only_in_a: Vec<String>,
    pub only_in_b: Vec<String>,
}

/// Pairs the PNG files of two folders by name and measures each pair (LPIPS too with
/// `lpips`). Names present in one folder only are returned, not measured. Images smaller
/// than SSIM's 7x7 window are refused, as scikit-image refuses them, and with `lpips` those
/// smaller than its 31x31 minimum.
pub fn compare_dirs(
    a: &std::path::Path,
    b: &std::path::Path,
    lpips: Option<&hybridiff_models::lpips::Lpips>,
) -> crate::Result<Comparison> {
    use crate::Error;
    let list = |d: &std::path::Path| -> crate::Result<Vec<String>> {
        if !d.is_dir() {
            return Err(Error::io(d, "not a folder of images"));
        }
        let rd = std::fs::read_dir(d).map_err(|e| Error::io(d, e))?;
        let mut v = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io(d, e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.to_ascii_lowercase().ends_with(".png") {
                // A FIFO or device would block or never end when read.
                if let Some(kind) = crate::io::special_file_kind(&e.path()) {
                    return Err(Error::io(e.path(), format!("is {kind}, not an image file")));
                }
                v.push(name);
            }
        }
        v.sort();
        Ok(v)
    };
    let names_a = list(a)?;
    let names_b = list(b)?;
    let common: Vec<&String> = names_a.iter().filter(|n| names_b.contains(n)).collect();
    let only_in_a: Vec<String> = names_a
        .iter()
        .filter(|n| !names_b.contains(n))
        .cloned()
        .collect();
    let only_in_b: Vec<String> = names_b
        .iter()
        .filter(|n| !names_a.contains(n))
        .cloned()
        .collect();
    if common.is_empty() {
        return Err(Error::Input(format!(
            "{} and {} share no PNG file names; compare pairs images by name",
            a.display(),
            b.display()
        )));
    }
    let load = |p: &std::path::Path| -> crate::Result<image::RgbImage> {
        Ok(image::open(p)
            .map_err(|e| Error::io(p, format!("cannot read the image: {e}")))?
            .to_rgb8())
    };
    let mut out = Vec::new();
    for name in common {
        let (pa, pb) = (a.join(name), b.join(name));
        let (ia, ib) = (load(&pa)?, load(&pb)?);
        if ia.dimensions() != ib.dimensions() {
            return Err(Error::Input(format!(
                "{name}: {}x{} in {} but {}x{} in {}",
                ia.width(),
                ia.height(),
                a.display(),
                ib.width(),
                ib.height(),
                b.display()
            )));
        }
        let (w, h) = (ia.width() as usize, ia.height() as usize);
        let psnr = psnr_u8(ia.as_raw(), ib.as_raw());
        let ssim = ssim_u8(ia.as_raw(), ib.as_raw(), w, h, 3).ok_or_else(|| {
            Error::Input(format!(
                "{name}: {w}x{h} pixels is smaller than SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window (scikit-image refuses it too); compare images of at least {SSIM_WINDOW}x{SSIM_WINDOW}"
            ))
        })?;
        let min = hybridiff_models::lpips::MIN_SIDE;
        let lpips = match lpips {
            Some(_) if w < min || h < min => {
                return Err(Error::Input(format!(
                    "{name}: {w}x{h} pixels is smaller than LPIPS's {min}x{min} minimum (AlexNet's two 3x3 max-pools); compare it without --lpips"
                )))
            }
            Some(l) => Some(l.distance_rgb8(ia.as_raw(), ib.as_raw(), w, h)?),
            None => None,
        };
        out.push(ImagePair {
            file: name.clone(),
            psnr_db: psnr.is_finite().then_some(psnr),
            ssim,
            lpips,
        });
    }
    Ok(Comparison {
        pairs: out,
        only_in_a,
        only_in_b,
    })
}
