//! Writes the random numbers hybridiff draws for one image, for tools that feed them to
//! diffusers (tools/sampler_demo.py): `latents` `[1, C, H, W]` (the starting noise, before
//! `init_noise_sigma`) and `step_noise` `[STEPS, 1, C, H, W]` (step i's noise of a stochastic
//! sampler, for every i whether the sampler uses it or not).
//!
//! `cargo run --release -p hybridiff-engine --example noise_dump -- SEED C H W STEPS OUT.safetensors`

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use hybridiff_engine::Noise;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [seed, c, h, w, steps, out] = args.as_slice() else {
        return Err("usage: noise_dump SEED C H W STEPS OUT.safetensors".into());
    };
    let (c, h, w, steps): (usize, usize, usize, usize) =
        (c.parse()?, h.parse()?, w.parse()?, steps.parse()?);
    if c * h * w * steps.max(1) > 1 << 26 {
        return Err("at most 2^26 values".into());
    }
    let noise = Noise::chacha8(seed.parse()?);
    let dev = Device::Cpu;
    let latents = noise.initial_latents((c, h, w), &dev)?;
    let per_step: Vec<Tensor> = (0..steps)
        .map(|i| noise.step_noise(i, &[1, c, h, w], &dev))
        .collect::<Result<_, _>>()?;
    let mut tensors = HashMap::new();
    tensors.insert("latents".to_string(), latents);
    tensors.insert("step_noise".to_string(), Tensor::stack(&per_step, 0)?);
    candle_core::safetensors::save(&tensors, out)?;
    Ok(())
}
