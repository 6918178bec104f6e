//! Patch (band) parallelism seen from the model: the few layers that need other bands'
//! data ask a [`PatchContext`] for it, so models never see a communicator (DistriFusion,
//! Li et al. 2024, arXiv 2402.19481).
//!
//! A rank runs [`crate::Denoiser::forward_patch`] on one horizontal band of the latents,
//! `[B, C, rows, W]`. Band boundaries are multiples of `2^downsamples` latent rows (U-Net)
//! or of `patch_size` (MMDiT), so every resolution level splits at whole rows; the last
//! band takes the remainder, so any height works. What crosses bands:
//! - a convolution with a kernel taller than one row reads its neighbours' halo rows;
//! - GroupNorm combines every band's per-group count, mean and squared deviations
//!   (Chan's parallel variance, stable in f32);
//! - self-attention (U-Net) and joint attention (MMDiT) read every band's keys and values.
//!
//! Everything else (resnets' time embeddings, cross-attention, per-token norms, feed
//! forwards) is local. Exchanges are numbered by module and call order within it (the
//! layer id, [`Patch::enter_module`]), which is the same on every band and every step, and
//! stays the same for a module whatever other modules a step skips (step caching).

use std::cell::Cell;

use candle_core::{DType, Tensor, D};

use crate::conv::Conv2d;
use crate::Result;

/// Which rows of the latents this forward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    /// This band's index, `0..count`, top to bottom.
    pub index: usize,
    /// Number of bands.
    pub count: usize,
    /// First latent row of the band.
    pub row0: usize,
    /// Latent rows in the band.
    pub rows: usize,
    /// Latent rows of the whole image.
    pub full_rows: usize,
}

/// What a band-parallel forward asks of whoever runs the other bands. The engine
/// implements it over a communicator; values may be fresh (exact) or from the previous
/// step (DistriFusion's displaced mode), the model cannot tell.
pub trait PatchContext {
    /// The band this forward computes.
    fn band(&self) -> Band;
    /// Halo rows of exchange `layer` for `x` (`[B, C, h, W]`, this band at some
    /// resolution): returns the band above's last `top` rows and the band below's first
    /// `bottom` rows, `None` where there is no such band (the image edge). Every band
    /// calls it with the same `top` and `bottom`.
    fn halo(
        &self,
        layer: usize,
        x: &Tensor,
        top: usize,
        bottom: usize,
    ) -> Result<(Option<Tensor>, Option<Tensor>)>;
    /// Every band's `x` for exchange `layer`, in band order (this band's is `x` itself).
    fn gather(&self, layer: usize, x: &Tensor) -> Result<Vec<Tensor>>;
    /// Module `idx`'s output on this band, handed over as soon as it is computed (by
    /// [`crate::Denoiser::forward_patch`], module by module), for an engine that keeps band
    /// outputs (to start a stage pipeline from an exact banded step). Ignored by default.
    fn module_output(&self, idx: usize, output: &[Tensor]) {
        let _ = (idx, output);
    }
    /// Whether [`Self::module_output`] keeps what it is handed (a step a stage pipeline
    /// starts from): such a forward must compute every module, so a step cache runs it whole.
    fn keeps_outputs(&self) -> bool {
        false
    }
}

/// Layer ids each module may use: a module's `k`-th exchange has id
/// `module * MODULE_IDS + k`.
pub const MODULE_IDS: usize = 1 << 16;

/// A [`PatchContext`] plus the running layer id of one forward.
pub struct Patch<'a> {
    ctx: &'a dyn PatchContext,
    next: Cell<usize>,
    end: Cell<usize>,
}

impl<'a> Patch<'a> {
    /// Starts a forward: layer ids count from 0 (module 0).
    pub fn new(ctx: &'a dyn PatchContext) -> Self {
        Self {
            ctx,
            next: Cell::new(0),
            end: Cell::new(MODULE_IDS),
        }
    }

    /// The band being computed.
    pub fn band(&self) -> Band {
        self.ctx.band()
    }

    /// Numbers the exchanges of module `module` from `module * MODULE_IDS`, so a layer's id
    /// does not depend on which earlier modules ran this step.
    ///
    /// # Errors
    /// A module index too large for the id space.
    pub fn enter_module(&self, module: usize) -> Result<()> {
        let base = module
            .checked_mul(MODULE_IDS)
            .and_then(|b| b.checked_add(MODULE_IDS).map(|e| (b, e)));
        let Some((base, end)) = base else {
            return Err(crate::Error::Input(format!(
                "module {module}: too many modules to number their band exchanges"
            )));
        };
        self.next.set(base);
        self.end.set(end);
        Ok(())
    }

    fn id(&self) -> Result<usize> {
        let i = self.next.get();
        if i >= self.end.get() {
            return Err(crate::Error::Input(format!(
                "more than {MODULE_IDS} band exchanges in one module"
            )));
        }
        self.next.set(i + 1);
        Ok(i)
    }

    /// `x` (`[B, C, h, W]`) with `top` rows above and `bottom` rows below: the neighbours'
    /// rows, zeros at the image edge (`bottom_edge` rows at the bottom edge, which the
    /// convolution's own padding would have added).
    pub(crate) fn extend_rows(
        &self,
        x: &Tensor,
        top: usize,
        bottom: usize,
        bottom_edge: usize,
    ) -> Result<Tensor> {
        let id = self.id()?;
        if self.band().count == 1 {
            return Ok(x.pad_with_zeros(2, top, bottom_edge)?);
        }
        let (above, below) = self.ctx.halo(id, x, top, bottom)?;
        let mut parts = Vec::with_capacity(3);
        let (b, c, _, w) = x.dims4()?;
        let zeros = |rows: usize| Tensor::zeros((b, c, rows, w), x.dtype(), x.device());
        match above {
            Some(t) => parts.push(t),
            None if top > 0 => parts.push(zeros(top)?),
            None => {}
        }
        parts.push(x.clone());
        match below {
            Some(t) => parts.push(t),
            None if bottom_edge > 0 => parts.push(zeros(bottom_edge)?),
            None => {}
        }
        Ok(Tensor::cat(&parts, 2)?.contiguous()?)
    }

    /// A convolution with symmetric padding on this band: reads `padding` halo rows
    /// above and `k - padding - stride` below (stride 1: `padding`; stride 2 at even band
    /// boundaries: none), then convolves without padding on rows.
    pub(crate) fn conv(&self, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
        let (k, s, p) = conv.geometry();
        if k == 1 && p == 0 {
            return Ok(candle_core::Module::forward(conv, x)?);
        }
        let below = (k - p).saturating_sub(s);
        let x = self.extend_rows(x, p, below, p)?;
        Ok(conv.forward_rows_unpadded(&x)?)
    }

    /// Every band's tokens (`[B, L_band, D]`) concatenated along the tokens, in band
    /// (= row-major) order.
    pub(crate) fn gather_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let id = self.id()?;
        if self.band().count == 1 {
            return Ok(x.clone());
        }
        let all = self.ctx.gather(id, x)?;
        Ok(Tensor::cat(&all, 1)?)
    }

    /// GroupNorm over the whole image: per-group statistics of every band combined.
    pub(crate) fn group_norm(&self, gn: &GroupNorm, x: &Tensor) -> Result<Tensor> {
        let id = self.id()?;
        let (b, c, h, w) = x.dims4()?;
        let g = gn.groups;
        let n = (c / g) * h * w;
        let dtype = x.dtype();
        let internal = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let xf = x.reshape((b, g, n))?.to_dtype(internal)?;
        let mean = (xf.sum_keepdim(2)? / n as f64)?;
        let xc = xf.broadcast_sub(&mean)?;
        let m2 = xc.sqr()?.sum_keepdim(2)?;
        let (mean_all, var_all) = if self.band().count == 1 {
            (mean, (m2 / n as f64)?)
        } else {
            let count = Tensor::full(n as f32, (b, g, 1), x.device())?.to_dtype(xf.dtype())?;
            let stats = Tensor::cat(&[&count, &mean, &m2], 2)?;
            let all = self.ctx.gather(id, &stats)?;
            // Chan et al.: mean = sum n_i m_i / N; M2 = sum M2_i + n_i (m_i - mean)^2.
            let all = Tensor::stack(&all, 0)?; // [P, B, G, 3]
            let ns = all.narrow(D::Minus1, 0, 1)?;
            let ms = all.narrow(D::Minus1, 1, 1)?;
            let m2s = all.narrow(D::Minus1, 2, 1)?;
            let total = ns.sum_keepdim(0)?;
            let mean_all = (ns.mul(&ms)?.sum_keepdim(0)? / &total)?;
            let dev = ms.broadcast_sub(&mean_all)?.sqr()?.mul(&ns)?;
            let m2_all = (m2s + dev)?.sum_keepdim(0)?;
            (mean_all.squeeze(0)?, (m2_all / total)?.squeeze(0)?)
        };
        let normed = xf
            .broadcast_sub(&mean_all)?
            .broadcast_div(&(var_all + gn.eps)?.sqrt()?)?
            .to_dtype(dtype)?
            .reshape((b, c, h, w))?;
        Ok(normed
            .broadcast_mul(&gn.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&gn.bias.reshape((1, c, 1, 1))?)?)
    }
}

/// diffusers' `GroupNorm` (`weight`, `bias`): candle's kernel on a whole image, the
/// combined statistics of [`Patch::group_norm`] on a band.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`[channels]`) from `vb`.
    pub fn new(
        groups: usize,
        channels: usize,
        eps: f64,
        vb: candle_nn::VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels cannot be cut into {groups} groups");
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// Normalises `x` (`[B, C, h, W]`): the whole image, or this band with `patch`.
    pub fn forward(&self, x: &Tensor, patch: Option<&Patch>) -> Result<Tensor> {
        self.norm(x, patch, false)
    }

    /// [`Self::forward`] followed by SiLU (diffusers' `norm` then `nonlinearity`), in one
    /// pass on the CPU for the whole image.
    pub fn forward_silu(&self, x: &Tensor, patch: Option<&Patch>) -> Result<Tensor> {
        self.norm(x, patch, true)
    }

    fn norm(&self, x: &Tensor, patch: Option<&Patch>, silu: bool) -> Result<Tensor> {
        match patch {
            None => Ok(crate::kernels::group_norm(
                x,
                self.groups,
                self.eps,
                &self.weight,
                &self.bias,
                silu,
            )?),
            Some(p) if silu => Ok(crate::kernels::silu(&p.group_norm(self, x)?)?),
            Some(p) => p.group_norm(self, x),
        }
    }
}

/// A convolution on the whole image, or on this band with `patch`.
pub fn conv(conv: &Conv2d, x: &Tensor, patch: Option<&Patch>) -> Result<Tensor> {
    match patch {
        None => Ok(candle_core::Module::forward(conv, x)?),
        Some(p) => p.conv(conv, x),
    }
}

/// Keys or values of the whole image: this band's alone, or every band's with `patch`.
pub fn tokens(x: &Tensor, patch: Option<&Patch>) -> Result<Tensor> {
    match patch {
        None => Ok(x.clone()),
        Some(p) => p.gather_tokens(x),
    }
}

/// Checks that `rows` latent rows can be cut into `bands` bands at multiples of `align`
/// rows with at least `min_rows` rows each, and returns each band's first row and rows.
///
/// The first `rows / align % bands` bands get one more `align` unit; the last band also
/// takes the remainder `rows % align`, so uneven heights work.
///
/// # Errors
/// A message naming the sizes when some band would have fewer than `max(align,
/// min_rows)` rows.
pub fn split_rows(
    rows: usize,
    bands: usize,
    align: usize,
    min_rows: usize,
) -> std::result::Result<Vec<(usize, usize)>, String> {
    if bands == 1 {
        // The whole image: no internal boundary to align and no halo to exchange, so any
        // height the model itself takes will do (as for `cfg` and `serial`).
        return Ok(vec![(0, rows)]);
    }
    let align = align.max(1);
    let units = rows / align;
    let need = min_rows.max(align);
    if bands == 0 || units < bands || (rows / bands) < need.min(rows) {
        let most = units.min(rows / need.max(1)).max(1);
        return Err(format!(
            "{rows} latent rows cannot be cut into {bands} bands of at least {need} rows each at multiples of {align} rows (the model halves the rows until they are {align} times smaller; use at most {most} band{}, or taller images)",
            if most == 1 { "" } else { "s" }
        ));
    }
    let (base, extra) = (units / bands, units % bands);
    let mut out = Vec::with_capacity(bands);
    let mut row0 = 0;
    for i in 0..bands {
        let mut r = (base + usize::from(i < extra)) * align;
        if i + 1 == bands {
            r = rows - row0;
        }
        if r < need.min(rows) {
            return Err(format!(
                "{rows} latent rows cannot be cut into {bands} bands of at least {need} rows each"
            ));
        }
        out.push((row0, r));
        row0 += r;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rows_aligns_internal_boundaries_and_gives_the_rest_to_the_last_band() {
        assert_eq!(split_rows(32, 2, 4, 1).unwrap(), vec![(0, 16), (16, 16)]);
        assert_eq!(
            split_rows(36, 4, 4, 1).unwrap(),
            vec![(0, 12), (12, 8), (20, 8), (28, 8)]
        );
        assert_eq!(split_rows(30, 2, 4, 1).unwrap(), vec![(0, 16), (16, 14)]);
        assert!(split_rows(8, 4, 4, 1).is_err());
        assert!(split_rows(3, 4, 1, 1).is_err());
        assert!(split_rows(8, 4, 1, 3).is_err());
        // One band is the whole image, however short (fresh-eyes finding: 2 and 3 rows were
        // refused with "use at most 1 bands").
        assert_eq!(split_rows(2, 1, 4, 4).unwrap(), vec![(0, 2)]);
        assert_eq!(split_rows(3, 1, 4, 1).unwrap(), vec![(0, 3)]);
        let e = split_rows(3, 2, 4, 4).unwrap_err();
        assert!(e.contains("use at most 1 band,"), "{e}");
    }
}
