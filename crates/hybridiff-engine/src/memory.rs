//! A job's memory, estimated before it runs and refused when it cannot fit.
//!
//! All ranks of a job are threads of one process, so the estimate is the sum over ranks
//! of what each holds at its peak: the denoiser forward's live activations and attention
//! score matrices (from [`hybridiff_models::Denoiser::forward_memory`]), a staged
//! runner's cache of every module output, the step cache of `--cache` (what
//! [`crate::cache::CacheSpec::memory`] says one rank keeps), and the sampler's latents and
//! per-step record.
//! Weights are checked when they are loaded ([`hybridiff_models::weights::Weights`]), so
//! by the time a job is estimated they are resident and `MemAvailable` no longer counts
//! them. The limit is [`hybridiff_models::memory::limit`]: `HYBRIDIFF_MEMORY_LIMIT`, else
//! the smallest of `MemAvailable`, the address-space limit and the cgroup's `memory.max`.

use hybridiff_models::memory::{bytes, ForwardMemory};
/// The memory limit and its reader, as the models crate defines them.
pub use hybridiff_models::memory::{limit, Limit};
use hybridiff_models::vae::VaeConfig;
use hybridiff_models::Denoiser;

use crate::{Error, Result};

/// Most denoising steps of one job (the per-step record holds one latent per step).
pub const MAX_STEPS: usize = 10_000;
/// Most text tokens of a conditioning (CLIP has 77, SD3 77 + 256 or 512).
pub const MAX_CONTEXT_LEN: usize = 1 << 16;

/// The sizes that decide a job's memory.
#[derive(Debug, Clone, Copy)]
pub struct JobShape {
    /// Latent channels, height and width.
    pub latent: (usize, usize, usize),
    /// Text tokens per branch.
    pub ctx_len: usize,
    pub steps: usize,
    pub world_size: usize,
    /// Samples each rank's forward runs at once (2 when it runs both CFG branches).
    pub batch_per_rank: usize,
    /// Whether ranks keep a cache of every module output (async, hybrid).
    pub staged: bool,
    /// The step cache (`--cache`), if any.
    pub cache: Option<crate::cache::CacheSpec>,
}

impl JobShape {
    /// The shape of `strategy` (by name) over `world_size` ranks.
    pub fn for_strategy(
        strategy: &str,
        world_size: usize,
        latent: (usize, usize, usize),
        ctx_len: usize,
        steps: usize,
    ) -> Self {
        Self {
            latent,
            ctx_len,
            steps,
            world_size,
            // `cfg` gives each rank one branch; the others may batch both on a rank.
            batch_per_rank: if strategy == "cfg" { 1 } else { 2 },
            staged: matches!(strategy, "async" | "hybrid"),
            cache: None,
        }
    }

    /// The same shape with a step cache on every rank.
    pub fn with_cache(self, cache: Option<crate::cache::CacheSpec>) -> Self {
        Self { cache, ..self }
    }
}

/// A job's estimated peak bytes, by part.
#[derive(Debug, Clone)]
pub struct Estimate {
    /// What the bytes are for ("this job", "decoding with the VAE").
    pub what: String,
    /// `(part, bytes)`, summed into [`Estimate::total`].
    pub parts: Vec<(String, u128)>,
}

impl Estimate {
    /// The sum of the parts.
    pub fn total(&self) -> u128 {
        self.parts
            .iter()
            .fold(0u128, |a, (_, b)| a.saturating_add(*b))
    }

    /// Refuses the job when the estimate exceeds the memory limit, with both in the message.
    pub fn check(&self) -> Result<()> {
        self.check_within(limit().map_err(Error::Options)?)
    }

    /// [`Estimate::check`] against a limit read earlier (`None`: no limit).
    pub fn check_within(&self, limit: Option<Limit>) -> Result<()> {
        if let Some(l) = limit {
            let total = self.total();
            if total > l.bytes {
                let parts: Vec<String> = self
                    .parts
                    .iter()
                    .filter(|(_, b)| *b > 0)
                    .map(|(p, b)| format!("{p} {}", bytes(*b)))
                    .collect();
                return Err(Error::Memory(format!(
                    "{} needs an estimated {} ({}), more than the {} available; use a smaller size, fewer ranks or steps",
                    self.what,
                    bytes(total),
                    parts.join(", "),
                    l
                )));
            }
        }
        Ok(())
    }
}

/// Estimates a denoising job on `model`. Unknown models count as their latents only.
pub fn estimate_job(model: &dyn Denoiser, shape: &JobShape) -> Estimate {
    let (c, h, w) = shape.latent;
    let fwd = model
        .forward_memory(shape.batch_per_rank, (h, w), shape.ctx_len)
        .unwrap_or_default();
    estimate_from(fwd, shape, c, h, w)
}

fn estimate_from(fwd: ForwardMemory, shape: &JobShape, c: usize, h: usize, w: usize) -> Estimate {
    let ranks = shape.world_size.max(1) as u128;
    let latent = [c, h, w, 4]
        .iter()
        .fold(1u128, |a, &b| a.saturating_mul(b as u128));
    // Each rank keeps its latents, a few scheduler temporaries and one latent per step;
    // the result stacks rank 0's steps once more.
    let sampler = latent.saturating_mul(shape.steps as u128 + 8);
    let cache = if shape.staged { fwd.module_outputs } else { 0 };
    let step_cache = shape.cache.map(|c| c.memory(&fwd)).unwrap_or(0);
    Estimate {
        what: format!(
            "this job ({}x{} latents, {} rank(s), {} steps)",
            h, w, shape.world_size, shape.steps
        ),
        parts: vec![
            ("activations".into(), fwd.activations.saturating_mul(ranks)),
            (
                "attention matrices".into(),
                fwd.attention.saturating_mul(ranks),
            ),
            ("module cache".into(), cache.saturating_mul(ranks)),
            (
                match shape.cache {
                    Some(c) => format!("step cache (--cache {})", c.method()),
                    None => "step cache".into(),
                },
                step_cache.saturating_mul(ranks),
            ),
            (
                "latents and step record".into(),
                sampler
                    .saturating_mul(ranks)
                    .saturating_add(latent.saturating_mul(shape.steps as u128)),
            ),
        ],
    }
}

/// Estimates decoding one `h x w` latent with a VAE of `config` (run in f32: a half
/// decode needs less, and one that overflows is redone in f32).
pub fn estimate_decode(config: &VaeConfig, (h, w): (usize, usize)) -> Estimate {
    let m = hybridiff_models::memory::vae_decode(config, (h, w), 4);
    Estimate {
        what: format!("decoding {h}x{w} latents with the VAE"),
        parts: vec![
            ("activations".into(), m.activations),
            ("attention matrix".into(), m.attention),
        ],
    }
}

/// Refuses step counts and text lengths beyond the engine's bounds.
pub fn check_counts(steps: usize, ctx_len: usize) -> Result<()> {
    if steps > MAX_STEPS {
        return Err(Error::refused(
            crate::Field::Steps,
            format!(
                "--steps {steps}: at most {MAX_STEPS} (the per-step record keeps one latent per step)"
            ),
            format!(
                "`num_inference_steps` {steps}: at most {MAX_STEPS} (the per-step record keeps one latent per step)"
            ),
        ));
    }
    if ctx_len == 0 || ctx_len > MAX_CONTEXT_LEN {
        return Err(Error::Input(format!(
            "text embeddings of {ctx_len} tokens: expected 1 to {MAX_CONTEXT_LEN} (attention over no tokens is NaN)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_scales_with_ranks_and_counts_the_cache_only_when_staged() {
        let fwd = ForwardMemory {
            activations: 1000,
            attention: 500,
            module_outputs: 300,
            hidden: 50,
        };
        let mut shape = JobShape::for_strategy("serial", 1, (4, 8, 8), 77, 10);
        let one = estimate_from(fwd, &shape, 4, 8, 8).total();
        shape.world_size = 2;
        let two = estimate_from(fwd, &shape, 4, 8, 8).total();
        assert!(two > one + 1500, "{one} {two}");
        let staged = JobShape::for_strategy("hybrid", 2, (4, 8, 8), 77, 10);
        assert_eq!(
            estimate_from(fwd, &staged, 4, 8, 8).total(),
            two + 600,
            "the cache of each rank"
        );
        // 8x8x4 f32 latents = 1 KiB; 10 steps + 8 temporaries per rank, 10 more once.
        assert_eq!(two - 3000, 1024 * (18 * 2 + 10));
    }

    #[test]
    fn the_step_cache_is_counted_per_rank_and_named_when_it_does_not_fit() {
        let fwd = ForwardMemory {
            activations: 1000,
            attention: 500,
            module_outputs: 300,
            hidden: 50,
        };
        let plain = JobShape::for_strategy("cfg", 2, (4, 8, 8), 77, 10);
        let base = estimate_from(fwd, &plain, 4, 8, 8).total();
        let deep = plain.with_cache(Some("deepcache".parse().unwrap()));
        let tea = plain.with_cache(Some("teacache".parse().unwrap()));
        assert_eq!(estimate_from(fwd, &deep, 4, 8, 8).total(), base + 2 * 300);
        assert_eq!(estimate_from(fwd, &tea, 4, 8, 8).total(), base + 2 * 4 * 50);
        // A limit that holds the job without the cache but not with it refuses the cached
        // job before compute, naming the cache.
        let limit = hybridiff_models::memory::Limit {
            bytes: base + 100,
            source: hybridiff_models::memory::LimitSource::Env,
        };
        assert!(estimate_from(fwd, &plain, 4, 8, 8)
            .check_within(Some(limit))
            .is_ok());
        let e = estimate_from(fwd, &deep, 4, 8, 8)
            .check_within(Some(limit))
            .unwrap_err()
            .to_string();
        assert!(e.contains("step cache (--cache deepcache)"), "{e}");
    }

    #[test]
    fn counts_beyond_the_bounds_are_refused() {
        assert!(check_counts(MAX_STEPS, 77).is_ok());
        let e = check_counts(MAX_STEPS + 1, 77).unwrap_err().to_string();
        assert!(e.contains("--steps"), "{e}");
        assert!(check_counts(20, MAX_CONTEXT_LEN + 1).is_err());
        assert!(check_counts(20, 0).is_err());
    }
}
