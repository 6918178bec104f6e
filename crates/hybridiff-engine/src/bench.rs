//! Measurements behind `hybridiff bench`: denoiser forward times and whole runs per
//! strategy, all in one process so the ratios compare like with like.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hybridiff_models::Conditioning;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::io::InputSpec;
use crate::{DenoiseInputs, Error, Model, Result};

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Seeded standard-normal latents and embeddings of the shapes `spec` asks for, with
/// `ctx_len` text tokens: stand-ins for a real prompt when only speed matters.
pub fn random_inputs(
    spec: &InputSpec,
    latent_hw: (usize, usize),
    ctx_len: usize,
    seed: u64,
    device: &Device,
) -> Result<DenoiseInputs> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, w) = latent_hw;
    let latents = randn(&mut rng, &[1, spec.latent_channels, h, w], device)?;
    let branch = |rng: &mut ChaCha8Rng| -> Result<Conditioning> {
        let time_ids = if spec.time_ids {
            let (ph, pw) = ((h * spec.vae_factor) as f32, (w * spec.vae_factor) as f32);
            Some(Tensor::new(&[[ph, pw, 0.0, 0.0, ph, pw]], device)?)
        } else {
            None
        };
        Ok(Conditioning {
            prompt_embeds: randn(rng, &[1, ctx_len, spec.context_dim], device)?,
            pooled: match spec.pooled_dim {
                Some(p) => Some(randn(rng, &[1, p], device)?),
                None => None,
            },
            time_ids,
        })
    };
    let uncond = branch(&mut rng)?;
    let cond = branch(&mut rng)?;
    Ok(DenoiseInputs {
        latents,
        cond,
        uncond,
    })
}

/// Median seconds of `repeats` denoiser forwards at `batch` (after one warm-up), run on
/// a pool of `threads` threads.
pub fn forward_seconds(
    model: &Model,
    inputs: &DenoiseInputs,
    batch: usize,
    repeats: usize,
    threads: usize,
) -> Result<f64> {
    let x = Tensor::cat(&vec![&inputs.latents; batch], 0)?;
    let mut cond = inputs.cond.clone();
    for _ in 1..batch {
        cond = Conditioning::cat(&cond, &inputs.cond)?;
    }
    let times = hybridiff_comm::run_ranks(1, threads, Duration::from_secs(3600), |_comm| {
        model.denoiser.forward(&x, 500.0, &cond)?;
        let mut t = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            model.denoiser.forward(&x, 500.0, &cond)?;
            t.push(start.elapsed().as_secs_f64());
        }
        Ok::<_, Error>(t)
    })
    .map_err(|e| Error::Options(e.to_string()))?;
    let mut t = times.into_iter().next().unwrap_or_default();
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}
