//! Parity with diffusers on the reference fixtures of `tests/fixtures` (see its README):
//! the tiny SDXL U-Net and the tiny SD3 MMDiT forward (conditional and unconditional
//! branch) and both VAE decodes, on any device and dtype. The models crate's tests and
//! `hybridiff parity` (the GPU check, `tools/gpu-check.sh`) both call [`run_all`], so the
//! comparisons are written once.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::mmdit::SD3Transformer2DModel;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::{Conditioning, Denoiser, Error, Result};

/// The tolerance of a fixture comparison, relative to `max(1, max |expected|)`, for a
/// run in `dtype`.
///
/// - f32: 1e-4, the fixtures README's bound for a faithful float32 port.
/// - f16: 2e-2. f16 keeps 11 significant bits (unit roundoff 2^-11 = 4.9e-4); a forward
///   through the fixtures' 24 joint blocks (SD3) or 3 levels of resnets and attention
///   (SDXL) rounds every activation and weight, and those errors add up over the depth
///   (about 24 x 4.9e-4 = 1.2e-2 if they never cancel), so 2e-2 passes a correct half
///   port while a wrong op (a missing scale, a swapped branch: differences of order 1)
///   still fails it.
/// - bf16: 1e-1, the same reasoning with 8 significant bits (roundoff 3.9e-3).
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 2e-2,
        DType::BF16 => 1e-1,
        _ => 1e-4,
    }
}

/// One fixture comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParityCheck {
    /// e.g. `tiny-sdxl unet out_cond`.
    pub name: String,
    /// The run's dtype (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// Max |ours - expected| over all elements, in f32.
    pub max_abs_diff: f32,
    /// Max |expected|.
    pub max_abs_expected: f32,
    /// The bound: [`tolerance`] x max(1, `max_abs_expected`).
    pub bound: f32,
    /// `max_abs_diff < bound` (false for NaN).
    pub pass: bool,
    /// Seconds the forward or decode took (one call, after loading; includes the first
    /// call's kernel set-up on a GPU).
    pub seconds: f64,
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

fn compare(
    name: String,
    got: &Tensor,
    want: &Tensor,
    dtype: DType,
    seconds: f64,
) -> Result<ParityCheck> {
    if got.dims() != want.dims() {
        return Err(Error::Input(format!(
            "{name}: shape {:?}, the fixture's is {:?}",
            got.dims(),
            want.dims()
        )));
    }
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let want = want.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let max_abs_diff = max_abs(&(got - &want)?)?;
    let max_abs_expected = max_abs(&want)?;
    let bound = tolerance(dtype) * max_abs_expected.max(1.0);
    Ok(ParityCheck {
        name,
        dtype: dtype_name(dtype).into(),
        max_abs_diff,
        max_abs_expected,
        bound,
        pass: max_abs_diff < bound,
        seconds,
    })
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

fn load(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| Error::io(path, e))
}

fn take(map: &HashMap<String, Tensor>, key: &str, path: &Path) -> Result<Tensor> {
    map.get(key)
        .cloned()
        .ok_or_else(|| Error::Input(format!("{}: no tensor `{key}`", path.display())))
}

/// The denoiser of a fixture folder: `unet/` or `transformer/`.
fn load_denoiser(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(&'static str, Box<dyn Denoiser>)> {
    if dir.join("unet").is_dir() {
        let m = UNet2DConditionModel::load(&dir.join("unet"), dtype, device)?;
        Ok(("unet", Box::new(m)))
    } else {
        let m = SD3Transformer2DModel::load(&dir.join("transformer"), dtype, device)?;
        Ok(("transformer", Box::new(m)))
    }
}

/// The fixture's single denoiser forward (`expected/denoiser_forward.safetensors`) on
/// both branches: `FIXTURE unet|transformer out_cond` and `... out_uncond`.
pub fn denoiser_forward(dir: &Path, device: &Device, dtype: DType) -> Result<Vec<ParityCheck>> {
    let fixture = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let (kind, model) = load_denoiser(dir, dtype, device)?;
    let inputs_path = dir.join("inputs.safetensors");
    let inputs = load(&inputs_path, device)?;
    let exp_path = dir.join("expected/denoiser_forward.safetensors");
    let exp = load(&exp_path, device)?;
    let timestep = f64::from(
        take(&exp, "timestep", &exp_path)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .get(0)?
            .to_scalar::<f32>()?,
    );
    let time_ids = exp.get("time_ids").cloned();
    let sample = take(&exp, "sample", &exp_path)?;
    let mut out = Vec::new();
    for (branch, prefix) in [("out_cond", ""), ("out_uncond", "negative_")] {
        let cond = Conditioning {
            prompt_embeds: take(&inputs, &format!("{prefix}prompt_embeds"), &inputs_path)?,
            pooled: Some(take(
                &inputs,
                &format!("{prefix}pooled_prompt_embeds"),
                &inputs_path,
            )?),
            time_ids: time_ids.clone(),
        };
        let t0 = std::time::Instant::now();
        let got = model.forward(&sample, timestep, &cond)?;
        // Finish the device's queue before reading the clock.
        device.synchronize()?;
        let secs = t0.elapsed().as_secs_f64();
        let want = take(&exp, branch, &exp_path)?;
        out.push(compare(
            format!("{fixture} {kind} {branch}"),
            &got,
            &want,
            dtype,
            secs,
        )?);
    }
    Ok(out)
}

/// The fixture's VAE decode (`expected/vae_decode.safetensors`): `FIXTURE vae decode`.
pub fn vae_decode(dir: &Path, device: &Device, dtype: DType) -> Result<ParityCheck> {
    let fixture = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let vae = AutoencoderKL::load(&dir.join("vae"), dtype, device)?;
    let path = dir.join("expected/vae_decode.safetensors");
    let exp = load(&path, device)?;
    let t0 = std::time::Instant::now();
    let image = vae.decode_latents(&take(&exp, "latents", &path)?)?;
    device.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    compare(
        format!("{fixture} vae decode"),
        &image,
        &take(&exp, "image", &path)?,
        dtype,
        secs,
    )
}

/// The fixtures [`run_all`] compares, under `tests/fixtures`.
pub const FIXTURES: [&str; 2] = ["tiny-sdxl", "tiny-sd3"];

/// Every comparison on every fixture of [`FIXTURES`] under `fixtures` (the repository's
/// `tests/fixtures`): 2 denoiser branches and 1 VAE decode each, in `dtype` on `device`.
/// Errors name the file or tensor that is missing; a comparison that fails is a row with
/// `pass: false`, not an error.
pub fn run_all(fixtures: &Path, device: &Device, dtype: DType) -> Result<Vec<ParityCheck>> {
    let mut rows = Vec::new();
    for name in FIXTURES {
        let dir = fixtures.join(name);
        rows.extend(denoiser_forward(&dir, device, dtype)?);
        rows.push(vae_decode(&dir, device, dtype)?);
    }
    Ok(rows)
}
