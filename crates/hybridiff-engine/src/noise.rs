//! The random numbers of one image: its starting latents and the fresh noise of every
//! stochastic sampler step (Euler Ancestral, DPM-Solver++ 2M SDE, LCM).
//!
//! Both are pure functions of the image's seed and the step index: never of the rank, the
//! world size, the strategy, the transport or the batch the image is made in. Every rank
//! steps its own copy of the sampler (see [`crate::Sampler`]) and draws the same noise
//! itself, so ranks exchange nothing for it, and a stochastic image is the same from
//! `serial`, `cfg`, `async`, `hybrid` and `patch` at every world size, as threads or under
//! `mpirun`. A batch (`generate --prompts`, a request with `n > 1`) runs each image as its
//! own job with its own seed, so image i equals its own batch-1 run with that seed
//! (diffusers' one generator shared by a batch makes image i depend on the batch:
//! diffusers#612, #6222).
//!
//! # Generators
//! [`NoiseKind::ChaCha8`] (the default): the starting latents are `ChaCha8Rng::seed_from_u64
//! (seed)` (stream 0) through rand_distr's `StandardNormal`, row-major; step i's noise is the
//! same generator on stream `i + 1` (ChaCha's 64-bit stream id: independent streams of one
//! key), so any step's noise is drawn without drawing the others.
//!
//! A torch-compatible kind (diffusers' `torch.Generator("cpu").manual_seed(seed)`) slots in
//! as another [`NoiseKind`]: diffusers draws the starting latents and then every noisy
//! step's noise from one generator, so step i's noise is the generator's draws after the
//! latents and the noisy steps before i. [`NoiseStream`] is where that state lives: the
//! sampler asks it for the steps where the scheduler `needs_noise`, in order, once per run,
//! on every rank alike; a torch kind keeps its generator there and asserts the order.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Error, Result};

/// Which generator makes an image's random numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum NoiseKind {
    /// ChaCha8 with a stream per step (see the module documentation).
    #[default]
    ChaCha8,
}

/// The random numbers of one image: a seed and a generator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Noise {
    pub seed: u64,
    pub kind: NoiseKind,
}

/// Most values one draw makes (a `[1, 16, 1024, 1024]` latent is 16M): bounds a request
/// before it allocates.
pub const MAX_VALUES: usize = 1 << 28;

impl Noise {
    /// The ChaCha8 noise of `seed`.
    pub fn chacha8(seed: u64) -> Self {
        Self {
            seed,
            kind: NoiseKind::ChaCha8,
        }
    }

    /// The starting latents, `[1, C, h, w]` float32 on `device`: standard-normal values
    /// (scaled by the scheduler's `init_noise_sigma` later, by the sampler).
    pub fn initial_latents(&self, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
        let (c, h, w) = shape;
        let v = self.draw(0, c * h * w)?;
        Ok(Tensor::from_vec(v, (1, c, h, w), device)?)
    }

    /// A fresh stream of step noise for one run.
    pub fn stream(&self) -> NoiseStream {
        NoiseStream { noise: *self }
    }

    /// Step `step`'s noise of `shape`, float32 on `device`; the same for every caller.
    pub fn step_noise(&self, step: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v = self.draw(step as u64 + 1, n)?;
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// `n` standard-normal values of ChaCha stream `stream`.
    fn draw(&self, stream: u64, n: usize) -> Result<Vec<f32>> {
        if n > MAX_VALUES {
            return Err(Error::Options(format!(
                "noise of {n} values: at most {MAX_VALUES} per tensor"
            )));
        }
        match self.kind {
            NoiseKind::ChaCha8 => {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                rng.set_stream(stream);
                Ok((0..n).map(|_| StandardNormal.sample(&mut rng)).collect())
            }
        }
    }
}

/// One run's source of step noise (see the module documentation on generators).
#[derive(Debug, Clone)]
pub struct NoiseStream {
    noise: Noise,
}

impl NoiseStream {
    /// The noise of step `step` (a step whose scheduler `needs_noise`), `shape` float32 on
    /// `device`. Callers ask in increasing step order, once per step.
    pub fn step(&mut self, step: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.noise.step_noise(step, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn initial_latents_are_chacha8_stream_zero() {
        // The values every image made before step noise existed: ChaCha8 from the seed,
        // no stream set.
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let want: Vec<f32> = (0..2 * 3 * 4)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let got = Noise::chacha8(42)
            .initial_latents((2, 3, 4), &Device::Cpu)
            .unwrap();
        assert_eq!(got.dims(), [1, 2, 3, 4]);
        assert_eq!(values(&got), want);
    }

    #[test]
    fn step_noise_depends_on_seed_and_step_only() {
        let dev = Device::Cpu;
        let a = Noise::chacha8(7);
        let shape = [1, 4, 3, 5];
        let s3 = values(&a.step_noise(3, &shape, &dev).unwrap());
        // Asked again, out of order, through a stream: the same values.
        let mut stream = a.stream();
        assert_eq!(values(&stream.step(3, &shape, &dev).unwrap()), s3);
        assert_eq!(values(&a.step_noise(3, &shape, &dev).unwrap()), s3);
        // Another step, another seed, the starting latents: different.
        assert_ne!(values(&a.step_noise(4, &shape, &dev).unwrap()), s3);
        assert_ne!(
            values(&Noise::chacha8(8).step_noise(3, &shape, &dev).unwrap()),
            s3
        );
        let init = values(&a.initial_latents((4, 3, 5), &dev).unwrap());
        assert_ne!(init, s3);
        // Roughly standard normal.
        let big = values(&a.step_noise(0, &[1, 4, 64, 64], &dev).unwrap());
        let mean = big.iter().sum::<f32>() / big.len() as f32;
        let var = big.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / big.len() as f32;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }

    #[test]
    fn huge_draws_are_refused_before_allocating() {
        let err = Noise::chacha8(0)
            .step_noise(0, &[1, 4, 1 << 14, 1 << 14], &Device::Cpu)
            .unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }
}
