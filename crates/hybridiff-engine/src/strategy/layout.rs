//! How a job's ranks compose, for every strategy: `W = branch groups x bands` in exact steps
//! (the condition split, then horizontal bands of the latents inside each branch group) and
//! stages in pipelined ones (see `stages.rs`). One layout type and one set of checks, so that
//! `cfg`, `patch` and `hybrid` refuse the same impossible layouts with the same words.
//!
//! Rank `r` is in branch group `r / P` (uncond first, as everywhere) and computes band `r % P`
//! of that group's branch. With one band a group's rank runs the plain forward; with one
//! branch group (no CFG split) every rank runs its band of the whole CFG batch (or of the
//! conditional branch when guidance is off).

use hybridiff_comm::Group;
use hybridiff_models::patch::split_rows;

use crate::{Error, Job, Result};

/// Branch groups x bands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandLayout {
    /// Rank groups: 2 when the CFG branches are split, else 1.
    pub branches: usize,
    /// Bands per branch group (`P`).
    pub bands: usize,
    /// `(first row, rows)` of each band.
    pub rows: Vec<(usize, usize)>,
}

/// The most bands per group the job's latents allow (1 when the model has no band support).
pub fn max_bands(job: &Job) -> usize {
    let Some((align, min_rows)) = job.model.patch_alignment() else {
        return 1;
    };
    let rows = job.inputs.latents.dims().get(2).copied().unwrap_or(0);
    (1..=rows.max(1))
        .rev()
        .find(|&p| split_rows(rows, p, align, min_rows).is_ok())
        .unwrap_or(1)
}

impl BandLayout {
    /// `world_size` ranks as `branches` groups of bands, or an error naming `--world-size`,
    /// what `strategy` needs and the world sizes that would fit.
    pub fn new(job: &Job, world_size: usize, branches: usize, strategy: &str) -> Result<Self> {
        let what = if branches == 2 {
            "2 CFG branch groups x P bands of the latents (W = 2P)"
        } else {
            "P bands of the latents (W = P)"
        };
        if world_size == 0 {
            return Err(Error::Options(format!(
                "--world-size 0: {strategy} runs {what}; {}",
                fits(job, branches)
            )));
        }
        if !world_size.is_multiple_of(branches) {
            // Only with classifier-free guidance on (guidance > 1) are there two branches: a
            // service request can avoid the split with its guidance.
            return Err(Error::refused(
                crate::Field::Guidance,
                format!(
                    "--world-size {world_size}: {strategy} runs {what}, so it needs an even number of ranks; {}",
                    fits(job, branches)
                ),
                format!(
                    "`guidance_scale` {}: this service's {strategy} strategy runs on {world_size} ranks, which cannot be split between the two branches of classifier-free guidance; use guidance_scale 1 or below",
                    job.guidance
                ),
            ));
        }
        let bands = world_size / branches;
        if bands > 1 && job.model.patch_alignment().is_none() {
            return Err(Error::Options(format!(
                "--world-size {world_size}: {strategy} runs {what}, and this model cannot run on bands; {}",
                fits(job, branches)
            )));
        }
        let (align, min_rows) = job.model.patch_alignment().unwrap_or((1, 1));
        let dims = job.inputs.latents.dims();
        let rows = dims.get(2).copied().unwrap_or(0);
        let split = split_rows(rows, bands, align, min_rows).map_err(|e| {
            let per = if branches == 2 { " per CFG branch" } else { "" };
            Error::refused(
                crate::Field::Size,
                format!(
                    "--world-size {world_size}: {strategy} runs {what}, {bands} bands here: {e}; {}",
                    fits(job, branches)
                ),
                format!(
                    "`size`: the image is {rows} latent rows high, too few for this service's {strategy} strategy, which cuts it into {bands} horizontal bands{per} of at least {} latent rows each, at multiples of {align} rows; use a taller size",
                    min_rows.max(align)
                ),
            )
        })?;
        Ok(Self {
            branches,
            bands,
            rows: split,
        })
    }

    /// The branch group of `rank`.
    pub fn group_of(&self, rank: usize) -> usize {
        rank / self.bands
    }

    /// The band `rank` computes.
    pub fn band_of(&self, rank: usize) -> usize {
        rank % self.bands
    }

    /// The ranks of branch group `g`: a band group.
    pub fn group(&self, g: usize) -> Group {
        Group::span(g * self.bands, self.bands)
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.branches * self.bands
    }

    /// `2 CFG groups x 4 bands`, `1 band x 2 CFG groups`, `4 bands`.
    pub fn describe(&self) -> String {
        let bands = if self.bands == 1 {
            "1 band".to_string()
        } else {
            format!("{} bands", self.bands)
        };
        if self.branches == 2 {
            format!("2 CFG groups x {bands}")
        } else {
            bands
        }
    }
}

/// `use --world-size 2, 4 or 8` for the layouts that fit this job.
fn fits(job: &Job, branches: usize) -> String {
    let most = max_bands(job);
    let sizes = if most <= 8 {
        let v: Vec<String> = (1..=most).map(|p| (p * branches).to_string()).collect();
        join_or(&v)
    } else if branches == 2 {
        format!("an even number from 2 to {}", 2 * most)
    } else {
        format!("1 to {most}")
    };
    format!(
        "this job's latents fit at most {most} band{} per group: use --world-size {sizes}",
        if most == 1 { "" } else { "s" },
    )
}

/// `a`, `a or b`, `a, b or c`.
pub(crate) fn join_or(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [a] => a.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}
