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
    psnr_samples(a, b, 255.0)
}

/// PSNR in dB between two images' samples (any channels, interleaved) with `peak` the
/// largest sample value (255 for 8 bits, 65535 for 16, scikit-image's `data_range` for
/// unsigned integers); infinite for identical images.
pub fn psnr_samples<T: Copy + Into<f64>>(a: &[T], b: &[T], peak: f64) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x).into() - (*y).into();
            d * d
        })
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (peak * peak / mse).log10()
}

/// Mean SSIM of two interleaved 8-bit images (`channels` per pixel), as scikit-image's
/// `structural_similarity` with its defaults: 7x7 uniform window, K1 = 0.01, K2 = 0.03,
/// data range 255, sample covariance, the 3-pixel border cropped, channels averaged.
/// `None` for images smaller than the window in either side, where scikit-image raises
/// "win_size exceeds image extent" (no window lies inside the image).
pub fn ssim_u8(a: &[u8], b: &[u8], width: usize, height: usize, channels: usize) -> Option<f64> {
    ssim_samples(a, b, width, height, channels, 255.0)
}

/// [`ssim_u8`] for samples of any unsigned depth, `data_range` their largest value (65535
/// for 16-bit images, as scikit-image takes it from the dtype).
pub fn ssim_samples<T: Copy + Into<f64>>(
    a: &[T],
    b: &[T],
    width: usize,
    height: usize,
    channels: usize,
    data_range: f64,
) -> Option<f64> {
    let r = SSIM_WINDOW / 2;
    if width < SSIM_WINDOW || height < SSIM_WINDOW || channels == 0 {
        return None;
    }
    const WIN: usize = SSIM_WINDOW;
    let np = (WIN * WIN) as f64;
    let cov_norm = np / (np - 1.0);
    let (c1, c2) = ((0.01 * data_range).powi(2), (0.03 * data_range).powi(2));
    let mut total = 0.0;
    for c in 0..channels {
        let px = |img: &[T], x: usize, y: usize| img[(y * width + x) * channels + c].into();
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

/// Most pixels (width x height) of an image `compare` reads: 4096 x 4096, 16 times SDXL's
/// 1024 x 1024. Checked from the PNG header before anything is decoded (a 140 KB PNG can
/// claim 12000 x 12000 pixels: a gigabyte decoded, minutes of SSIM).
pub const MAX_COMPARE_PIXELS: u64 = 4096 * 4096;

/// PSNR and SSIM (and LPIPS when asked) of one image pair.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImagePair {
    pub file: String,
    /// `None` (JSON null) for identical images.
    pub psnr_db: Option<f64>,
    pub ssim: f64,
    /// The channels compared: `RGB`, or `RGBA` when either image has an alpha channel.
    pub channels: &'static str,
    /// Bits per sample compared: 8, or 16 when either image has 16-bit samples.
    pub bits: u8,
    /// LPIPS distance (AlexNet, v0.1) of the RGB channels at 8 bits, when weights were given.
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

/// An image's samples at the depth and channels both images of a pair are compared in.
enum Samples {
    Eight(Vec<u8>),
    Sixteen(Vec<u16>),
}

/// Width and height from a PNG's header (its first 24 bytes), refusing images beyond
/// [`MAX_COMPARE_PIXELS`] before anything is decoded.
fn header(p: &std::path::Path) -> crate::Result<(u32, u32)> {
    use crate::Error;
    use std::io::Read;
    let mut head = [0u8; 24];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::io(p, format!("cannot read the image: {e}")))?;
    if &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        return Err(Error::io(
            p,
            "not a PNG file (no PNG signature and IHDR header)",
        ));
    }
    let w = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
    let h = u32::from_be_bytes(head[20..24].try_into().expect("4 bytes"));
    if w as u64 * h as u64 > MAX_COMPARE_PIXELS {
        return Err(Error::Input(format!(
            "{}: {w}x{h} pixels; compare reads images of at most {MAX_COMPARE_PIXELS} pixels (4096x4096)",
            p.display()
        )));
    }
    Ok((w, h))
}

/// Decodes `p` (already checked by [`header`]), the decoder held to the header's bound.
fn decode(p: &std::path::Path) -> crate::Result<image::DynamicImage> {
    use crate::Error;
    let mut reader = image::ImageReader::open(p)
        .map_err(|e| Error::io(p, format!("cannot read the image: {e}")))?;
    reader.set_format(image::ImageFormat::Png);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_COMPARE_PIXELS as u32);
    limits.max_image_height = Some(MAX_COMPARE_PIXELS as u32);
    // 16-bit RGBA at the bound, and room for the decoder's own buffers.
    limits.max_alloc = Some(MAX_COMPARE_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| Error::io(p, format!("cannot read the image: {e}")))
}

/// `img` as RGB or RGBA samples of 8 or 16 bits.
fn samples(img: &image::DynamicImage, alpha: bool, wide: bool) -> Samples {
    match (alpha, wide) {
        (false, false) => Samples::Eight(img.to_rgb8().into_raw()),
        (true, false) => Samples::Eight(img.to_rgba8().into_raw()),
        (false, true) => Samples::Sixteen(img.to_rgb16().into_raw()),
        (true, true) => Samples::Sixteen(img.to_rgba16().into_raw()),
    }
}

/// Whether a decoded image has an alpha channel (a tRNS chunk counts), and wider than
/// 8-bit samples.
fn alpha_and_depth(img: &image::DynamicImage) -> (bool, bool) {
    let c = img.color();
    (
        c.has_alpha(),
        c.bytes_per_pixel() as usize / c.channel_count() as usize > 1,
    )
}

/// Pairs the PNG files of two folders by name and measures each pair. Names present in
/// one folder only are returned, not measured. Images smaller than SSIM's 7x7 window, or
/// larger than [`MAX_COMPARE_PIXELS`] (read from the header, before decoding), are refused.
///
/// An image with an alpha channel is compared on R, G, B and A (an image without one counts
/// as opaque), so two images that differ only in transparency are not identical; PSNR and
/// SSIM then average over the four channels. Images with 16-bit samples are compared at 16
/// bits (peak and data range 65535; an 8-bit image of the pair is widened, `v * 257`), so
/// differences below 8 bits count. Plain 8-bit RGB pairs are measured exactly as
/// scikit-image measures them. `progress` is called with (pairs done, pairs) after each.
pub fn compare_dirs(
    a: &std::path::Path,
    b: &std::path::Path,
    lpips: Option<&hybridiff_models::lpips::Lpips>,
    progress: Option<&dyn Fn(usize, usize)>,
) -> crate::Result<Comparison> {
    use crate::Error;
    use std::collections::HashSet;
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
    // Hash sets: linear in the number of files.
    let set_a: HashSet<&String> = names_a.iter().collect();
    let set_b: HashSet<&String> = names_b.iter().collect();
    let common: Vec<&String> = names_a.iter().filter(|n| set_b.contains(n)).collect();
    let only_in_a: Vec<String> = names_a
        .iter()
        .filter(|n| !set_b.contains(n))
        .cloned()
        .collect();
    let only_in_b: Vec<String> = names_b
        .iter()
        .filter(|n| !set_a.contains(n))
        .cloned()
        .collect();
    if common.is_empty() {
        return Err(Error::Input(format!(
            "{} and {} share no PNG file names; compare pairs images by name",
            a.display(),
            b.display()
        )));
    }
    let mut out = Vec::new();
    for (done, name) in common.iter().enumerate() {
        let (pa, pb) = (a.join(name), b.join(name));
        let (ha, hb) = (header(&pa)?, header(&pb)?);
        if ha != hb {
            return Err(Error::Input(format!(
                "{name}: {}x{} in {} but {}x{} in {}",
                ha.0,
                ha.1,
                a.display(),
                hb.0,
                hb.1,
                b.display()
            )));
        }
        let (w, h) = (ha.0 as usize, ha.1 as usize);
        // Two decoded images and their samples at up to 8 bytes per pixel (16-bit RGBA).
        hybridiff_models::memory::check(
            &format!("comparing {name} ({w}x{h})"),
            (w * h) as u128 * 8 * 3,
        )
        .map_err(Error::Memory)?;
        if w < SSIM_WINDOW || h < SSIM_WINDOW {
            return Err(Error::Input(format!(
                "{name}: {w}x{h} pixels is smaller than SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window (scikit-image refuses it too); compare images of at least {SSIM_WINDOW}x{SSIM_WINDOW}"
            )));
        }
        let min = hybridiff_models::lpips::MIN_SIDE;
        if lpips.is_some() && (w < min || h < min) {
            return Err(Error::Input(format!(
                "{name}: {w}x{h} pixels is smaller than LPIPS's {min}x{min} minimum (AlexNet's two 3x3 max-pools); compare it without --lpips"
            )));
        }
        let (da, db) = (decode(&pa)?, decode(&pb)?);
        // LPIPS's network sees RGB at 8 bits, as the lpips package's loaders give it.
        let lpips = match lpips {
            Some(l) => Some(l.distance_rgb8(da.to_rgb8().as_raw(), db.to_rgb8().as_raw(), w, h)?),
            None => None,
        };
        let ((alpha_a, wide_a), (alpha_b, wide_b)) = (alpha_and_depth(&da), alpha_and_depth(&db));
        let (alpha, wide) = (alpha_a || alpha_b, wide_a || wide_b);
        let channels = if alpha { 4 } else { 3 };
        // Each decoded image is dropped once converted: at most three images held at once.
        let sa = samples(&da, alpha, wide);
        drop(da);
        let sb = samples(&db, alpha, wide);
        drop(db);
        let (psnr, ssim) = match (sa, sb) {
            (Samples::Eight(x), Samples::Eight(y)) => (
                psnr_samples(&x, &y, 255.0),
                ssim_samples(&x, &y, w, h, channels, 255.0),
            ),
            (Samples::Sixteen(x), Samples::Sixteen(y)) => (
                psnr_samples(&x, &y, 65535.0),
                ssim_samples(&x, &y, w, h, channels, 65535.0),
            ),
            _ => unreachable!("both decoded at the pair's depth"),
        };
        out.push(ImagePair {
            file: (*name).clone(),
            psnr_db: psnr.is_finite().then_some(psnr),
            ssim: ssim.expect("the size was checked against the window"),
            channels: if alpha { "RGBA" } else { "RGB" },
            bits: if wide { 16 } else { 8 },
            lpips,
        });
        if let Some(p) = progress {
            p(done + 1, common.len());
        }
    }
    Ok(Comparison {
        pairs: out,
        only_in_a,
        only_in_b,
    })
}
