//! Parity of the `AutoencoderKL` decoder with diffusers on the tiny fixtures, and its
//! error messages.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use hybridiff_models::vae::{to_rgb8, AutoencoderKL, VaeConfig};
use hybridiff_models::Error;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Decodes the fixture's `latents` the way its pipeline does and compares with `image`
/// (the comparison `hybridiff parity` runs on GPUs too).
fn check_decode(model: &str) -> Result<()> {
    let row =
        hybridiff_models::parity::vae_decode(&fixtures().join(model), &Device::Cpu, DType::F32)?;
    eprintln!(
        "{}: max abs difference {:e} (bound {:e})",
        row.name, row.max_abs_diff, row.bound
    );
    assert!(
        row.pass,
        "{}: max abs difference {} exceeds {}",
        row.name, row.max_abs_diff, row.bound
    );
    Ok(())
}

#[test]
fn decode_matches_diffusers_sdxl() -> Result<()> {
    check_decode("tiny-sdxl")
}

#[test]
fn decode_matches_diffusers_sd3() -> Result<()> {
    check_decode("tiny-sd3")
}

#[test]
fn configs_are_read() -> Result<()> {
    let sdxl = VaeConfig::from_file(&fixtures().join("tiny-sdxl/vae/config.json"))?;
    assert_eq!(sdxl.latent_channels, 4);
    assert!(sdxl.use_post_quant_conv);
    assert_eq!(sdxl.shift_factor, None);
    assert_eq!(sdxl.scaling_factor, 0.13025);
    let sd3 = VaeConfig::from_file(&fixtures().join("tiny-sd3/vae/config.json"))?;
    assert_eq!(sd3.latent_channels, 16);
    assert!(!sd3.use_post_quant_conv);
    assert_eq!(sd3.shift_factor, Some(0.0609));
    Ok(())
}

#[test]
fn decode_does_not_ignore_scaling() -> Result<()> {
    // decode_latents must differ from decode on the same tensor: guards against a
    // scaling step that silently does nothing.
    let dir = fixtures().join("tiny-sd3/vae");
    let dev = Device::Cpu;
    let vae = AutoencoderKL::load(&dir, DType::F32, &dev)?;
    let z = Tensor::ones((1, 16, 4, 4), DType::F32, &dev)?;
    let a = vae.decode(&z)?;
    let b = vae.decode_latents(&z)?;
    assert_eq!(a.dims(), &[1, 3, 32, 32]);
    assert!(max_abs(&(a - b)?)? > 1e-3);
    Ok(())
}

#[test]
fn wrong_latent_channels_is_an_input_error() -> Result<()> {
    let dev = Device::Cpu;
    let vae = AutoencoderKL::load(&fixtures().join("tiny-sdxl/vae"), DType::F32, &dev)?;
    let z = Tensor::zeros((1, 16, 8, 8), DType::F32, &dev)?;
    for (name, res) in [("latents", vae.decode_latents(&z)), ("z", vae.decode(&z))] {
        match res {
            Err(e @ Error::Input(_)) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("`{name}`")), "{msg}");
                assert!(msg.contains("[batch, 4, height, width]"), "{msg}");
                assert!(msg.contains("[1, 16, 8, 8]"), "{msg}");
            }
            other => panic!("expected Error::Input for `{name}`, got {other:?}"),
        }
    }
    let z3 = Tensor::zeros((4, 8, 8), DType::F32, &dev)?;
    assert!(matches!(vae.decode(&z3), Err(Error::Input(_))));
    Ok(())
}

fn scratch_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hybridiff-vae-test-{}-{tag}", std::process::id()))
}

/// A scratch copy of the tiny SDXL VAE config with one key replaced.
fn patched_config(tag: &str, key: &str, value: serde_json::Value) -> Result<PathBuf> {
    let src = fixtures().join("tiny-sdxl/vae/config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src)?)?;
    json[key] = value;
    let dir = scratch_dir(tag);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    Ok(path)
}

fn expect_unsupported(path: &Path, key: &str, value: &str) {
    match VaeConfig::from_file(path) {
        Err(e @ Error::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("`{key}`")), "{msg}");
            assert!(msg.contains(value), "{msg}");
        }
        other => panic!("expected Error::Unsupported for {key}, got {other:?}"),
    }
}

#[test]
fn unsupported_config_values_name_key_and_file() -> Result<()> {
    let p = patched_config("act", "act_fn", "gelu".into())?;
    expect_unsupported(&p, "act_fn", "gelu");

    let p = patched_config(
        "up",
        "up_block_types",
        serde_json::json!([
            "UpDecoderBlock2D",
            "AttnUpDecoderBlock2D",
            "UpDecoderBlock2D",
            "UpDecoderBlock2D"
        ]),
    )?;
    expect_unsupported(&p, "up_block_types", "AttnUpDecoderBlock2D");

    let p = patched_config(
        "mean",
        "latents_mean",
        serde_json::json!([0.5, 0.5, 0.5, 0.5]),
    )?;
    expect_unsupported(&p, "latents_mean", "0.5");

    // load() goes through the same check: here the weights exist but the config is bad.
    let vae_dir = p.parent().unwrap().to_path_buf();
    std::fs::copy(
        fixtures().join("tiny-sdxl/vae/diffusion_pytorch_model.safetensors"),
        vae_dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    let err = AutoencoderKL::load(&vae_dir, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Unsupported { ref key, .. } if key == "latents_mean"));
    for tag in ["act", "up", "mean"] {
        let _ = std::fs::remove_dir_all(scratch_dir(tag));
    }
    Ok(())
}

#[test]
fn rgb8_follows_diffusers_postprocess() -> Result<()> {
    let dev = Device::Cpu;
    // Two pixels: channel planes [-1, 1], [0, 2], [-3, 0.003921569 * 2 - 1].
    let img = Tensor::new(&[-1f32, 1., 0., 2., -3., 1.0 / 255.0 * 2.0 - 1.0], &dev)?
        .reshape((1, 3, 1, 2))?;
    let (w, h, bytes) = to_rgb8(&img)?;
    assert_eq!((w, h), (2, 1));
    // HWC: pixel 0 = (-1, 0, -3), pixel 1 = (1, 2, ~1/255).
    assert_eq!(bytes, vec![0, 128, 0, 255, 255, 1]);
    assert!(matches!(
        to_rgb8(&Tensor::zeros((2, 3, 1, 1), DType::F32, &dev)?),
        Err(Error::Input(_))
    ));
    // NaN is refused, not written as a black pixel.
    let nan = Tensor::new(&[0f32, f32::NAN, 0.], &dev)?.reshape((1, 3, 1, 1))?;
    let e = to_rgb8(&nan).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains("index 1"), "{e}");
    Ok(())
}
