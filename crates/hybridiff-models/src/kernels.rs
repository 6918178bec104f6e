//! CPU kernels for the hot ops of a denoiser forward, each with the device-generic candle
//! form it replaces (taken on GPUs, in bf16, and under [`crate::host::force_device_generic`]).
//!
//! Why they exist (profiled with `perf`, SDXL layout at 1/5 width, see
//! docs/benchmarks/cpu.md): candle's CPU softmax, SiLU and GELU call scalar `expf`/`erff`
//! per element (a fifth of the forward); its `Linear` multiplies by the transposed weight,
//! which the `gemm` crate packs on every call (up to 2x slower than a row-major operand at
//! small batch); bias adds, GroupNorm and the activation after it are separate passes
//! with an allocation each. Here:
//! - [`Linear`] keeps its weight transposed (`[in, out]`, row-major) from load on, and
//!   writes `x W^T + b` in one GEMM whose destination starts as the bias rows;
//! - [`Conv2d`](crate::conv::Conv2d) does im2col per image and one GEMM straight into the
//!   NCHW output, bias included (see [`crate::conv`]);
//! - [`softmax_last_dim`], [`silu`], [`gelu`], [`geglu`] and [`group_norm`] (with an
//!   optional fused SiLU) run vectorised f32 loops ([`math`]).
//!
//! Every kernel is checked against its generic form in this module's tests and in the
//! models' parity tests (which compare whole forwards with diffusers' outputs).

pub mod math;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::host;

/// Whether the f32 CPU kernels of this module run for `x`.
fn cpu_f32(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && host::use_cpu_kernels(x.device(), x.dtype())
}

/// Threads for one kernel: those of the rayon pool it runs in (a rank's pool holds its
/// `--threads-per-rank`), so ranks keep to their budgets.
fn threads() -> usize {
    rayon::current_num_threads()
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(format!("{what}: expected f32"))),
    }
}

/// Runs `f(src_rows, dst_rows)` over blocks of whole rows, in parallel when the pool has
/// threads and the work is large enough to pay for them.
fn rows_par(
    src: &[f32],
    dst: &mut [f32],
    src_row: usize,
    dst_row: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) {
    let rows = dst.len().checked_div(dst_row).unwrap_or(0);
    let t = threads();
    if t <= 1 || src.len() < 1 << 15 || rows < 2 {
        f(src, dst);
        return;
    }
    let per = rows.div_ceil(t * 4).max(1);
    src.par_chunks(per * src_row)
        .zip(dst.par_chunks_mut(per * dst_row))
        .for_each(|(s, d)| f(s, d));
}

struct Unary(UnaryKind);

#[derive(Clone, Copy)]
enum UnaryKind {
    Silu,
    Gelu { tanh: bool },
    Softmax,
    Geglu,
}

impl CustomOp1 for Unary {
    fn name(&self) -> &'static str {
        match self.0 {
            UnaryKind::Silu => "hybridiff-silu",
            UnaryKind::Gelu { .. } => "hybridiff-gelu",
            UnaryKind::Softmax => "hybridiff-softmax",
            UnaryKind::Geglu => "hybridiff-geglu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        host::count_cpu_kernel();
        let src = slice(s, l, self.name())?;
        let dims = l.shape().dims();
        let last = dims.last().copied().unwrap_or(1).max(1);
        let (shape, out_row) = match self.0 {
            UnaryKind::Geglu => {
                let mut d = dims.to_vec();
                *d.last_mut().expect("geglu input has a last dim") = last / 2;
                (Shape::from(d), last / 2)
            }
            _ => (l.shape().clone(), last),
        };
        let mut dst = vec![0f32; shape.elem_count()];
        if dst.is_empty() {
            return Ok((CpuStorage::F32(dst), shape));
        }
        match self.0 {
            UnaryKind::Silu => rows_par(src, &mut dst, last, last, math::silu_slice),
            UnaryKind::Gelu { tanh } => rows_par(src, &mut dst, last, last, |s, d| {
                math::gelu_slice(s, d, tanh)
            }),
            UnaryKind::Softmax => rows_par(src, &mut dst, last, last, |s, d| {
                math::softmax_rows(s, d, last)
            }),
            UnaryKind::Geglu => rows_par(src, &mut dst, last, out_row, |s, d| {
                math::geglu_rows(s, d, out_row)
            }),
        }
        Ok((CpuStorage::F32(dst), shape))
    }
}

/// x * sigmoid(x), element-wise.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1_no_bwd(&Unary(UnaryKind::Silu))
    } else {
        x.silu()
    }
}

/// GELU, exact (erf, diffusers' `"gelu"`) or with the tanh approximation
/// (`"gelu-approximate"`), element-wise.
pub fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?
            .apply_op1_no_bwd(&Unary(UnaryKind::Gelu { tanh }))
    } else if tanh {
        x.gelu()
    } else {
        x.gelu_erf()
    }
}

/// Softmax over the last dimension (candle_nn's `softmax_last_dim`).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1_no_bwd(&Unary(UnaryKind::Softmax))
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// diffusers' `GEGLU` after its projection: `h` is `[..., 2n]` = `[hidden | gate]`, the
/// result `[..., n]` = `hidden * gelu(gate)` (exact GELU).
///
/// # Errors
/// When the last dimension is odd.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let two_n = h.dim(D::Minus1)?;
    if two_n % 2 != 0 {
        candle_core::bail!("geglu: last dimension {two_n} is odd; expected [hidden | gate]");
    }
    if cpu_f32(h) {
        h.contiguous()?.apply_op1_no_bwd(&Unary(UnaryKind::Geglu))
    } else {
        let half = two_n / 2;
        h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "hybridiff-group-norm"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        host::count_cpu_kernel();
        let src = slice(s, l, "group_norm")?;
        let (w, b) = (
            slice(ws, wl, "group_norm weight")?,
            slice(bs, bl, "group_norm bias")?,
        );
        let dims = l.shape().dims();
        let c = dims[1];
        let cg = c / self.groups;
        let group_len = src.len() / (dims[0] * self.groups);
        let mut dst = vec![0f32; src.len()];
        let run = |gi: usize, s: &[f32], d: &mut [f32]| {
            let g = gi % self.groups;
            let ch = g * cg..(g + 1) * cg;
            math::group_norm_group(s, d, &w[ch.clone()], &b[ch], self.eps, self.silu);
        };
        if threads() > 1 && src.len() >= 1 << 15 {
            src.par_chunks(group_len)
                .zip(dst.par_chunks_mut(group_len))
                .enumerate()
                .for_each(|(gi, (s, d))| run(gi, s, d));
        } else {
            for (gi, (s, d)) in src
                .chunks(group_len)
                .zip(dst.chunks_mut(group_len))
                .enumerate()
            {
                run(gi, s, d);
            }
        }
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// Group normalisation of `x` (`[B, C, ...]`, `C` divisible by `groups`) with per-channel
/// `weight` and `bias` (`[C]`), then SiLU when `silu` (diffusers' `GroupNorm` followed by
/// `nonlinearity`, fused into one pass on the CPU).
///
/// # Errors
/// When `C` is not a multiple of `groups` or the affine parameters do not have `C` values.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 3 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!(
            "group_norm: input {:?} cannot be cut into {groups} groups of channels",
            dims
        );
    }
    if weight.elem_count() != dims[1] || bias.elem_count() != dims[1] {
        candle_core::bail!("group_norm: weight and bias need {} values", dims[1]);
    }
    if cpu_f32(x) && x.elem_count() > 0 {
        return x.contiguous()?.apply_op3_no_bwd(
            &weight.to_dtype(DType::F32)?.contiguous()?,
            &bias.to_dtype(DType::F32)?.contiguous()?,
            &GroupNormOp {
                groups,
                eps: eps as f32,
                silu,
            },
        );
    }
    let y = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), dims[1], groups, eps)?
        .forward(x)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

struct LayerNormModulateOp {
    eps: f32,
}

impl CustomOp3 for LayerNormModulateOp {
    fn name(&self) -> &'static str {
        "hybridiff-layer-norm-modulate"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        host::count_cpu_kernel();
        let src = slice(s, l, "layer_norm")?;
        let (scale, shift) = (
            slice(ss, sl, "modulate scale")?,
            slice(hs, hl, "modulate shift")?,
        );
        let (b, len, d) = l.shape().dims3()?;
        let mut dst = vec![0f32; src.len()];
        for bi in 0..b {
            let range = bi * len * d..(bi + 1) * len * d;
            let (sc, sh) = (&scale[bi * d..(bi + 1) * d], &shift[bi * d..(bi + 1) * d]);
            rows_par(&src[range.clone()], &mut dst[range], d, d, |s, o| {
                math::layer_norm_modulate_rows(s, o, sc, sh, self.eps)
            });
        }
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// `LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]` on the CPU in one pass, for `x`
/// `[B, L, D]` (no affine, eps `eps`, statistics in f32) and `scale`, `shift` `[B, D]`
/// (diffusers' `AdaLayerNormZero` / `AdaLayerNormContinuous` after their linear). `None`
/// when the inputs are not f32 CPU tensors of those shapes (take the generic path).
pub(crate) fn layer_norm_modulate_cpu(
    x: &Tensor,
    eps: f64,
    scale: &Tensor,
    shift: &Tensor,
) -> Result<Option<Tensor>> {
    if !(cpu_f32(x) && cpu_f32(scale) && cpu_f32(shift)) || x.rank() != 3 {
        return Ok(None);
    }
    let (b, _, d) = x.dims3()?;
    if scale.dims() != [b, d] || shift.dims() != [b, d] || x.elem_count() == 0 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(
        &scale.contiguous()?,
        &shift.contiguous()?,
        &LayerNormModulateOp { eps: eps as f32 },
    )?))
}

/// `dst[r, :] = bias` for every row, or zeros without a bias.
fn bias_rows<T: candle_core::WithDType>(rows: usize, bias: Option<&[T]>, n: usize) -> Vec<T> {
    match bias {
        Some(b) => {
            let mut v = Vec::with_capacity(rows * n);
            for _ in 0..rows {
                v.extend_from_slice(b);
            }
            v
        }
        None => vec![T::zero(); rows * n],
    }
}

fn gemm_parallelism(work: usize) -> gemm::Parallelism {
    let t = threads();
    // Below ~1 MFLOP the threads' start-up costs more than they save.
    if t > 1 && work >= 1 << 20 {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst (m x n, row stride dst_rs) += lhs (m x k, row-major) * rhs (k x n, row stride
/// rhs_rs, unit column stride)`, on the pool's threads when the product is large.
///
/// # Safety
/// The slices must hold the elements the strides address.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_acc<T: 'static + candle_core::WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    lhs: &[T],
    rhs: &[T],
    rhs_rs: usize,
) {
    debug_assert!(dst.len() >= (m.max(1) - 1) * dst_rs + n);
    let par = gemm_parallelism(m * n * k);
    gemm_raw(m, n, k, dst.as_mut_ptr(), dst_rs, lhs, rhs, rhs_rs, par)
}

/// [`gemm_acc`] on a raw destination, on the pool's threads when `parallel` (and the
/// product is large), else on the calling thread (for callers that run GEMMs in
/// parallel). Either way the result is the same: the `gemm` crate splits the output, not
/// the sum.
///
/// # Safety
/// As [`gemm_acc`]; `dst` is a raw pointer so that parallel callers can write disjoint
/// parts of one buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_acc_ptr<T: 'static + candle_core::WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    lhs: &[T],
    rhs: &[T],
    rhs_rs: usize,
    parallel: bool,
) {
    let par = if parallel {
        gemm_parallelism(m * n * k)
    } else {
        gemm::Parallelism::None
    };
    gemm_raw(m, n, k, dst, dst_rs, lhs, rhs, rhs_rs, par)
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: 'static + candle_core::WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    lhs: &[T],
    rhs: &[T],
    rhs_rs: usize,
    par: gemm::Parallelism,
) {
    debug_assert!(lhs.len() >= m * k);
    debug_assert!(k == 0 || rhs.len() >= (k - 1) * rhs_rs + n);
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        true,
        lhs.as_ptr(),
        1,
        k as isize,
        rhs.as_ptr(),
        1,
        rhs_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    )
}

/// A raw pointer that jobs writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: users write disjoint elements only (each says why at its use).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// Query rows per block: a block's scores (`QUERY_BLOCK x Lk` f32) stay in the L2 cache.
const QUERY_BLOCK: usize = 128;

struct AttentionOp {
    heads: usize,
    scale: f32,
}

impl AttentionOp {
    /// One (batch, head): `out = softmax(scale q k^T) v` read and written in place in the
    /// `[L, heads * d]` layouts, one block of query rows at a time.
    ///
    /// # Safety
    /// The pointers address `lq x inner` (q, out) and `lk x inner` (k, v) row-major
    /// matrices, offset to this head's first column; `out`'s columns are this job's alone.
    #[allow(clippy::too_many_arguments)]
    unsafe fn head(
        &self,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        out: *mut f32,
        (lq, lk, d, inner): (usize, usize, usize, usize),
        scores: &mut Vec<f32>,
    ) {
        let par = gemm::Parallelism::None;
        let mut r0 = 0;
        while r0 < lq {
            let rows = QUERY_BLOCK.min(lq - r0);
            // The QK^T GEMM overwrites every score (it does not read dst): grow the buffer
            // once, never clear it (zeroing it was ~1% of a 64x64 U-Net forward).
            if scores.len() < rows * lk {
                scores.resize(rows * lk, 0.0);
            }
            let scores = &mut scores[..rows * lk];
            // scores (rows x lk) = scale * q_block (rows x d) k^T (d x lk).
            gemm::gemm(
                rows,
                lk,
                d,
                scores.as_mut_ptr(),
                1,
                lk as isize,
                false,
                q.add(r0 * inner),
                1,
                inner as isize,
                k,
                inner as isize,
                1,
                0.0,
                self.scale,
                false,
                false,
                false,
                par,
            );
            math::softmax_rows_in_place(scores, lk);
            // out_block (rows x d) = probs (rows x lk) v (lk x d).
            gemm::gemm(
                rows,
                d,
                lk,
                out.add(r0 * inner),
                1,
                inner as isize,
                false,
                scores.as_ptr(),
                1,
                lk as isize,
                v,
                1,
                inner as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
            r0 += rows;
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "hybridiff-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        host::count_cpu_kernel();
        let (q, k, v) = (
            slice(qs, ql, "attention q")?,
            slice(ks, kl, "attention k")?,
            slice(vs, vl, "attention v")?,
        );
        let (b, lq, inner) = ql.shape().dims3()?;
        let lk = kl.shape().dims3()?.1;
        let d = inner / self.heads;
        let mut out = vec![0f32; b * lq * inner];
        let dims = (lq, lk, d, inner);
        let optr = SharedMut(out.as_mut_ptr());
        let job = |j: usize, scores: &mut Vec<f32>| {
            let (bi, h) = (j / self.heads, j % self.heads);
            let o = optr;
            // SAFETY: q, out are b x lq x inner, k, v b x lk x inner (checked by the caller);
            // job j writes only head h's columns of batch bi.
            unsafe {
                self.head(
                    q.as_ptr().add(bi * lq * inner + h * d),
                    k.as_ptr().add(bi * lk * inner + h * d),
                    v.as_ptr().add(bi * lk * inner + h * d),
                    o.0.add(bi * lq * inner + h * d),
                    dims,
                    scores,
                )
            }
        };
        let jobs = b * self.heads;
        if threads() > 1 && jobs > 1 && lq * lk * d >= 1 << 16 {
            (0..jobs)
                .into_par_iter()
                .for_each_init(Vec::new, |scores, j| job(j, scores));
        } else {
            let mut scores = Vec::new();
            for j in 0..jobs {
                job(j, &mut scores);
            }
        }
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// Multi-head scaled dot-product attention on the CPU in f32, reading each head's
/// columns of the `[B, L, heads * d]` projections in place (no head split, no transposes)
/// and keeping only one block of query rows' scores at a time. `None` when the inputs
/// are not f32 CPU tensors of matching shapes (the caller then takes the generic path).
pub(crate) fn attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Option<Tensor>> {
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v)) || heads == 0 {
        return Ok(None);
    }
    let (b, _, inner) = q.dims3()?;
    let (bk, lk, ik) = k.dims3()?;
    if k.dims() != v.dims() || bk != b || ik != inner || inner % heads != 0 || lk == 0 {
        return Ok(None);
    }
    let scale = 1.0 / ((inner / heads) as f32).sqrt();
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &AttentionOp { heads, scale },
    )?))
}

struct LinearOp;

impl LinearOp {
    fn run<T: 'static + candle_core::WithDType>(
        x: &[T],
        wt: &[T],
        bias: Option<&[T]>,
        (rows, inp, out): (usize, usize, usize),
    ) -> Vec<T> {
        if rows == 1 {
            // The `gemm` crate multiplies a single row by another path (GEMV) that sums in
            // another order, so a sample's time embedding would differ in its last bits
            // between a batch of 1 and a batch of 2 (CFG on one rank vs two, a batch split
            // over threads). As row 0 of two it takes the path every taller input takes.
            let mut x2 = Vec::with_capacity(2 * inp);
            x2.extend_from_slice(&x[..inp]);
            x2.resize(2 * inp, T::zero());
            let mut dst = Self::run(&x2, wt, bias, (2, inp, out));
            dst.truncate(out);
            return dst;
        }
        let mut dst = bias_rows(rows, bias, out);
        // SAFETY: x is rows x inp, wt inp x out, dst rows x out, all contiguous.
        unsafe { gemm_acc(rows, out, inp, &mut dst, out, x, wt, out) };
        dst
    }

    fn fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        host::count_cpu_kernel();
        let (inp, out) = wl.shape().dims2()?;
        let rows = l.shape().elem_count() / inp.max(1);
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("linear input has a last dim") = out;
        let off = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("linear: operands must be contiguous".into())
            })
        };
        let ((x0, x1), (w0, w1)) = (off(l)?, off(wl)?);
        let bo = match b {
            Some((_, bl)) => Some(off(bl)?),
            None => None,
        };
        let shape = (rows, inp, out);
        let dst = match (s, ws, b.map(|(s, _)| s)) {
            (CpuStorage::F32(x), CpuStorage::F32(w), bias) => {
                let bias = match (bias, bo) {
                    (Some(CpuStorage::F32(v)), Some((a, z))) => Some(&v[a..z]),
                    (None, _) => None,
                    _ => candle_core::bail!("linear: bias dtype differs from the input's"),
                };
                CpuStorage::F32(Self::run(&x[x0..x1], &w[w0..w1], bias, shape))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w), bias) => {
                let bias = match (bias, bo) {
                    (Some(CpuStorage::F16(v)), Some((a, z))) => Some(&v[a..z]),
                    (None, _) => None,
                    _ => candle_core::bail!("linear: bias dtype differs from the input's"),
                };
                CpuStorage::F16(Self::run(&x[x0..x1], &w[w0..w1], bias, shape))
            }
            _ => candle_core::bail!("linear: expected f32 or f16 operands of one dtype"),
        };
        Ok((dst, Shape::from(dims)))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "hybridiff-linear"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(s, l, ws, wl, None)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "hybridiff-linear"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(s, l, ws, wl, Some((bs, bl)))
    }
}

/// A fully connected layer, `y = x W^T + b`, loading diffusers' `weight` (`[out, in]`)
/// and `bias` (`[out]`) and keeping the weight transposed (`[in, out]`, contiguous): the
/// GEMM then reads it row by row instead of packing a transposed operand on every call.
/// Drop-in for `candle_nn::Linear` (same weight names, same results).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`, contiguous.
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a `[out, in]` weight (diffusers' layout) and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// The weight in diffusers' layout, `[out, in]` (a transposed view).
    pub fn weight(&self) -> Result<Tensor> {
        self.weight_t.t()
    }

    /// The bias, `[out]`, when the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    /// `x`: `[..., in]` → `[..., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (inp, _) = self.weight_t.dims2()?;
        if x.dim(D::Minus1)? != inp {
            candle_core::bail!(
                "linear: input {:?} does not end in the layer's {inp} input features",
                x.dims()
            );
        }
        let dt = x.dtype();
        if host::use_cpu_kernels(x.device(), dt)
            && matches!(dt, DType::F32 | DType::F16)
            && self.weight_t.dtype() == dt
            && self.bias.as_ref().is_none_or(|b| b.dtype() == dt)
        {
            let x = x.contiguous()?;
            return match &self.bias {
                Some(b) => x.apply_op3_no_bwd(&self.weight_t, &b.contiguous()?, &LinearOp),
                None => x.apply_op2_no_bwd(&self.weight_t, &LinearOp),
            };
        }
        // Contiguous first: candle 0.11.1's CPU matmul folds a broadcast right operand's
        // batches into rows assuming a row-major left one, and gets strided inputs wrong.
        let x = x.contiguous()?;
        let y = match x.rank() {
            2 => x.matmul(&self.weight_t)?,
            _ => x.broadcast_matmul(&self.weight_t)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// A [`Linear`] with bias, as `candle_nn::linear`.
pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear(inp, out, vb)?;
    Linear::new(l.weight().clone(), l.bias().cloned())
}

/// A [`Linear`] without bias, as `candle_nn::linear_no_bias`.
pub fn linear_no_bias(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear_no_bias(inp, out, vb)?;
    Linear::new(l.weight().clone(), None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |a - b| (same shapes); the models' unit tests share it.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Each kernel against its device-generic form (what a GPU runs), on one input.
    fn both(f: impl Fn() -> Tensor) -> (Tensor, Tensor) {
        let cpu = f();
        let generic = {
            let _g = host::force_device_generic();
            f()
        };
        (cpu, generic)
    }

    #[test]
    fn element_wise_kernels_match_candle() {
        // Tolerances: the kernels' own bounds (exp 2 ulp, erf 1.5e-7) on values up to 3.
        let x = rand(&[2, 3, 37], 1);
        let (a, b) = both(|| silu(&x).unwrap());
        assert!(max_diff(&a, &b) < 1e-6);
        let (a, b) = both(|| gelu(&x, false).unwrap());
        assert!(max_diff(&a, &b) < 1e-6);
        let (a, b) = both(|| gelu(&x, true).unwrap());
        assert!(max_diff(&a, &b) < 1e-5);
        let (a, b) = both(|| softmax_last_dim(&(&x * 10.0).unwrap()).unwrap());
        assert!(max_diff(&a, &b) < 1e-6);
        let (a, b) = both(|| geglu(&x.narrow(2, 0, 36).unwrap()).unwrap());
        assert_eq!(a.dims(), &[2, 3, 18]);
        assert!(max_diff(&a, &b) < 1e-6);
        assert!(geglu(&x).is_err(), "an odd last dimension is refused");
    }

    #[test]
    fn attention_matches_the_generic_form_across_blocks_heads_and_batches() {
        // 300 query rows: two full blocks of 128 and a partial one.
        for &(b, lq, lk, heads, d) in &[(1, 5, 7, 1, 4), (2, 300, 77, 3, 8), (2, 64, 300, 2, 16)] {
            let q = rand(&[b, lq, heads * d], 12);
            let k = rand(&[b, lk, heads * d], 13);
            let v = rand(&[b, lk, heads * d], 14);
            let (a, g) = both(|| crate::nn::attention(&q, &k, &v, heads).unwrap());
            assert_eq!(a.dims(), &[b, lq, heads * d]);
            assert!(
                max_diff(&a, &g) < 1e-5,
                "{b} {lq} {lk} {heads}: {}",
                max_diff(&a, &g)
            );
        }
    }

    #[test]
    fn layer_norm_modulate_matches_the_unfused_ops() {
        let x = rand(&[2, 5, 37], 15);
        let m = rand(&[2, 74], 16);
        // Strided [B, D] views, as the models' chunks of the modulation are.
        let (scale, shift) = (m.narrow(1, 0, 37).unwrap(), m.narrow(1, 37, 37).unwrap());
        let fused = layer_norm_modulate_cpu(&x, 1e-6, &scale, &shift)
            .unwrap()
            .unwrap();
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let n = xc
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap();
        let plain = n
            .broadcast_mul(&(&scale + 1.0).unwrap().unsqueeze(1).unwrap())
            .unwrap()
            .broadcast_add(&shift.unsqueeze(1).unwrap())
            .unwrap();
        assert!(
            max_diff(&fused, &plain) < 1e-5,
            "{}",
            max_diff(&fused, &plain)
        );
        let _g = host::force_device_generic();
        assert!(layer_norm_modulate_cpu(&x, 1e-6, &scale, &shift)
            .unwrap()
            .is_none());
    }

    #[test]
    fn group_norm_with_and_without_silu_matches_candle() {
        let x = rand(&[2, 8, 5, 3], 2);
        let (w, b) = (rand(&[8], 3), rand(&[8], 4));
        for s in [false, true] {
            let (a, g) = both(|| group_norm(&x, 4, 1e-5, &w, &b, s).unwrap());
            assert!(max_diff(&a, &g) < 2e-5, "silu {s}: {}", max_diff(&a, &g));
        }
        assert!(group_norm(&x, 3, 1e-5, &w, &b, false).is_err());
    }

    #[test]
    fn linear_matches_candle_nn_for_ranks_bias_and_non_contiguous_input() {
        let w = rand(&[7, 5], 5);
        let b = rand(&[7], 6);
        for bias in [Some(b.clone()), None] {
            let ours = Linear::new(w.clone(), bias.clone()).unwrap();
            let theirs = candle_nn::Linear::new(w.clone(), bias);
            for x in [
                rand(&[4, 5], 7),
                rand(&[2, 3, 5], 8),
                rand(&[2, 2, 3, 5], 9),
                rand(&[2, 5, 3], 10).transpose(1, 2).unwrap(),
            ] {
                let (a, g) = both(|| ours.forward(&x).unwrap());
                // candle_nn 0.11.1's Linear itself gets the transposed input wrong (it
                // multiplies the strided batch as if contiguous): the reference is taken on
                // a contiguous copy.
                let r = theirs.forward(&x.contiguous().unwrap()).unwrap();
                let tol = 1e-5 * (1.0 + max_diff(&r, &r.zeros_like().unwrap()));
                assert!(
                    max_diff(&a, &r) < tol,
                    "{:?}: {}",
                    x.dims(),
                    max_diff(&a, &r)
                );
                assert!(
                    max_diff(&g, &r) < tol,
                    "{:?}: {}",
                    x.dims(),
                    max_diff(&g, &r)
                );
            }
        }
        let ours = Linear::new(w, None).unwrap();
        assert!(
            ours.forward(&rand(&[2, 4], 11)).is_err(),
            "wrong input width"
        );
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
        // A batch of 1 and a batch of 2 (or a split batch) must give a sample the same
        // bits: row 0 alone, of 2, 3, 17 and 40 rows.
        for (inp, out) in [(64, 256), (320, 64), (7, 5)] {
            let lin = Linear::new(rand(&[out, inp], 15), Some(rand(&[out], 16))).unwrap();
            let x = rand(&[40, inp], 17);
            let row0 = |m: usize| {
                lin.forward(&x.narrow(0, 0, m).unwrap())
                    .unwrap()
                    .narrow(0, 0, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let alone = row0(1);
            for m in [2, 3, 17, 40] {
                assert_eq!(alone, row0(m), "{inp}x{out}: row 0 alone vs of {m} rows");
            }
        }
    }
}
