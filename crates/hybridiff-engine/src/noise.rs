//! The random numbers of one image: its starting latents and the fresh noise of every
//! stochastic sampler step (Euler Ancestral, DPM-Solver++ 2M SDE, LCM).
//!
//! Both are pure functions of the image's seed (and, for step noise, the step index and
//! the latent shape): never of the rank, the world size, the strategy, the transport or
//! the batch the image is made in. Every rank steps its own copy of the sampler (see
//! [`crate::Sampler`]) and draws the same noise itself, so ranks exchange nothing for it,
//! and a stochastic image is the same from `serial`, `cfg`, `async`, `hybrid` and `patch`
//! at every world size, as threads or under `mpirun`. A batch (`generate --prompts`, a
//! request with `n > 1`) runs each image as its own job with its own seed, so image i
//! equals its own batch-1 run with that seed (diffusers' one generator shared by a batch
//! makes image i depend on the batch: diffusers#612, #6222).
//!
//! # Generators
//! [`NoiseKind::Chacha8`] (the default): the starting latents are `ChaCha8Rng::seed_from_u64
//! (seed)` (stream 0) through rand_distr's `StandardNormal`, row-major; step i's noise is the
//! same generator on stream `i + 1` (ChaCha's 64-bit stream id: independent streams of one
//! key), so any step's noise is drawn without drawing the others.
//!
//! [`NoiseKind::Torch`]: PyTorch's CPU generator ([`crate::torch_rng`]) as diffusers uses
//! it with `generator=torch.Generator("cpu").manual_seed(seed)`: one generator draws the
//! starting latents (`prepare_latents`, unless latents are given) and then, in order, the
//! noise of every step where the scheduler calls `randn_tensor` (every Euler Ancestral and
//! DPM-Solver++ SDE step, every LCM step but the last). Step i's noise is therefore the
//! generator's draws after the latents and the noisy steps before i; [`NoiseStream`] keeps
//! that generator, and every rank replays it from the seed, so it is still independent of
//! where it is computed.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Error, Result};

/// Which generator makes an image's random numbers (`--noise`, the request field `noise`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseKind {
    /// `ChaCha8Rng::seed_from_u64(seed)` with rand_distr's standard normal, a stream per
    /// step (see the module documentation): the default, so that a seed keeps the image it
    /// always gave.
    #[default]
    Chacha8,
    /// PyTorch's CPU generator, `torch.randn(shape, generator=torch.Generator("cpu")
    /// .manual_seed(seed))` bit for bit ([`crate::torch_rng`]), one generator for the
    /// latents and then the step noise, as diffusers draws them: a seed reproduces a
    /// diffusers image.
    Torch,
}

impl std::str::FromStr for NoiseKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "chacha8" => Ok(Self::Chacha8),
            "torch" => Ok(Self::Torch),
            other => Err(format!(
                "{other:?}: expected chacha8 (the default) or torch (diffusers' torch.Generator(\"cpu\").manual_seed)"
            )),
        }
    }
}

impl std::fmt::Display for NoiseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Chacha8 => "chacha8",
            Self::Torch => "torch",
        })
    }
}

/// The random numbers of one image: a seed, a generator, and whether its starting latents
/// were drawn from them (a torch generator's step noise comes after those draws).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Noise {
    pub seed: u64,
    pub kind: NoiseKind,
    /// The starting latents of this many values were drawn from the generator first
    /// (`generate` from a seed); 0 when they were given (`--latents`, `denoise`'s inputs),
    /// as diffusers' `prepare_latents` draws nothing for given latents. Only
    /// [`NoiseKind::Torch`] reads it: ChaCha8's step noise has streams of its own.
    pub latent_values: usize,
}

/// Most values one draw makes (a `[1, 16, 1024, 1024]` latent is 16M): bounds a request
/// before it allocates.
pub const MAX_VALUES: usize = 1 << 28;

impl Noise {
    /// The ChaCha8 noise of `seed`.
    pub fn chacha8(seed: u64) -> Self {
        Self::new(NoiseKind::Chacha8, seed)
    }

    /// `kind`'s noise of `seed`, latents not drawn from it (see [`Noise::latent_values`]).
    pub fn new(kind: NoiseKind, seed: u64) -> Self {
        Self {
            seed,
            kind,
            latent_values: 0,
        }
    }

    /// This noise with the starting latents of `shape` drawn from it first.
    pub fn after_latents(self, (c, h, w): (usize, usize, usize)) -> Self {
        Self {
            latent_values: c * h * w,
            ..self
        }
    }

    /// The starting latents, `[1, C, h, w]` float32 on `device`: standard-normal values
    /// (scaled by the scheduler's `init_noise_sigma` later, by the sampler): ChaCha8's
    /// stream 0, or the torch generator's first `C * h * w` draws (`torch.randn((1, C, h,
    /// w), generator=...)`, which diffusers' `prepare_latents` draws).
    ///
    /// # Errors
    /// More than [`MAX_VALUES`] values.
    pub fn initial_latents(&self, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
        let (c, h, w) = shape;
        let n = checked_count(&[c, h, w])?;
        let v = match self.kind {
            NoiseKind::Chacha8 => chacha8_normals(self.seed, 0, n),
            NoiseKind::Torch => crate::torch_rng::TorchGenerator::manual_seed(self.seed).randn(n),
        };
        Ok(Tensor::from_vec(v, (1, c, h, w), device)?)
    }

    /// A fresh stream of step noise for one run.
    pub fn stream(&self) -> NoiseStream {
        NoiseStream {
            noise: *self,
            torch: None,
            last_step: None,
        }
    }

    /// Step `step`'s ChaCha8 noise of `shape`, float32 on `device`: the same for every
    /// caller, in any order. (Torch noise depends on the steps drawn before: see
    /// [`NoiseStream::step`].)
    ///
    /// # Errors
    /// More than [`MAX_VALUES`] values.
    pub fn step_noise(&self, step: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = checked_count(shape)?;
        let v = chacha8_normals(self.seed, step as u64 + 1, n);
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// The element count of `shape`, refused above [`MAX_VALUES`] before anything allocates.
fn checked_count(shape: &[usize]) -> Result<usize> {
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_VALUES)
        .ok_or_else(|| {
            Error::Options(format!(
                "noise of shape {shape:?}: at most {MAX_VALUES} values per tensor"
            ))
        })?;
    Ok(n)
}

/// `n` standard-normal values of ChaCha8 stream `stream` of `seed`.
fn chacha8_normals(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// One run's source of step noise (see the module documentation on generators).
#[derive(Debug, Clone)]
pub struct NoiseStream {
    noise: Noise,
    /// The torch generator, once the first noisy step asked (it has drawn the latents and
    /// every noisy step before).
    torch: Option<crate::torch_rng::TorchGenerator>,
    /// The last step asked, to refuse an order the torch generator cannot replay.
    last_step: Option<usize>,
}

impl NoiseStream {
    /// The noise of step `step` (a step whose scheduler `needs_noise`), `shape` float32 on
    /// `device`. Callers ask in increasing step order, once per noisy step (as diffusers'
    /// schedulers call `randn_tensor`): torch noise is the generator's next draws.
    ///
    /// # Errors
    /// More than [`MAX_VALUES`] values; a step asked twice or out of order.
    pub fn step(&mut self, step: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        if self.last_step.is_some_and(|last| step <= last) {
            return Err(Error::Options(format!(
                "step noise asked for step {step} after step {}: a run draws it once per step, in order",
                self.last_step.unwrap_or_default()
            )));
        }
        self.last_step = Some(step);
        match self.noise.kind {
            NoiseKind::Chacha8 => self.noise.step_noise(step, shape, device),
            NoiseKind::Torch => {
                let n = checked_count(shape)?;
                let g = self.torch.get_or_insert_with(|| {
                    let mut g = crate::torch_rng::TorchGenerator::manual_seed(self.noise.seed);
                    if self.noise.latent_values > 0 {
                        // Replays prepare_latents' draw; only the generator's state is kept.
                        g.randn(self.noise.latent_values);
                    }
                    g
                });
                Ok(Tensor::from_vec(g.randn(n), shape, device)?)
            }
        }
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
        for kind in [NoiseKind::Chacha8, NoiseKind::Torch] {
            let noise = Noise::new(kind, 0);
            let err = noise
                .stream()
                .step(0, &[1, 4, 1 << 14, 1 << 14], &Device::Cpu)
                .unwrap_err();
            assert!(err.to_string().contains("at most"), "{err}");
            let err = noise
                .initial_latents((usize::MAX, 2, 2), &Device::Cpu)
                .unwrap_err();
            assert!(err.to_string().contains("at most"), "{err}");
        }
    }

    #[test]
    fn torch_step_noise_continues_the_generator_after_the_latents() {
        use crate::torch_rng::TorchGenerator;
        let dev = Device::Cpu;
        // 4x3x5 = 60 values: not a multiple of 16, so each draw also takes PyTorch's
        // 16 extra values; the stream must continue exactly where torch's would.
        let (shape, latent) = ([1, 4, 3, 5], (4, 3, 5));
        let noise = Noise::new(NoiseKind::Torch, 11).after_latents(latent);
        let mut g = TorchGenerator::manual_seed(11);
        let want_init = g.randn(60);
        let want_a = g.randn(60);
        let want_b = g.randn(60);
        assert_eq!(
            values(&noise.initial_latents(latent, &dev).unwrap()),
            want_init
        );
        let mut stream = noise.stream();
        // Steps 0 and 2 draw (say step 1 of the scheduler needs none): the draws are the
        // generator's next ones whatever the step numbers.
        assert_eq!(values(&stream.step(0, &shape, &dev).unwrap()), want_a);
        assert_eq!(values(&stream.step(2, &shape, &dev).unwrap()), want_b);
        // Out of order: refused, not silently different noise.
        let err = stream.step(1, &shape, &dev).unwrap_err();
        assert!(err.to_string().contains("in order"), "{err}");
        // Given latents: diffusers draws none, so the steps start the generator.
        let mut given = Noise::new(NoiseKind::Torch, 11).stream();
        assert_eq!(values(&given.step(0, &shape, &dev).unwrap()), want_init);
    }
}
