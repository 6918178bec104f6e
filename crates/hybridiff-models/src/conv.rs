//! 2-D convolution as im2col plus one GEMM per image. candle's CPU conv2d re-lays out the
//! input and kernel on every call and gathers patches element by element; here the
//! NCHW weight already is the `[C_out, C_in * k * k]` GEMM operand, patches are built
//! with row copies, and the GEMM writes straight into the NCHW output, which starts as
//! the bias (no transpose, no separate bias pass; see docs/benchmarks/cpu.md). Other
//! devices (and bf16) use candle's own kernel: see [`crate::host`].

use candle_core::{CpuStorage, CustomOp3, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// A convolution with square kernel, `padding = k / 2`-style symmetric padding and
/// stride, equivalent to `candle_nn::Conv2d` (weights `weight` `[out, in, k, k]`, `bias`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    /// `[out, in * k * k]`, the GEMM view of `weight`.
    weight2d: Tensor,
    bias: Option<Tensor>,
    k: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Loads `weight` (and `bias`) from `vb`.
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", init)?;
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        let bias = vb.get_with_hints(
            cout,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let weight2d = weight.reshape((cout, cin * k * k))?;
        Ok(Self {
            weight,
            weight2d,
            bias: Some(bias),
            k,
            stride,
            padding,
        })
    }
}

/// Elements of one band's im2col matrix (f32: 1 MiB).
const COL_BUDGET: usize = 1 << 18;

struct Im2Col {
    k: usize,
    stride: usize,
    /// Zero padding on rows and on columns.
    pad_h: usize,
    pad_w: usize,
}

impl Im2Col {
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad_h - self.k) / self.stride + 1,
            (w + 2 * self.pad_w - self.k) / self.stride + 1,
        )
    }

    /// `src` is one image, contiguous `[c, h, w]`; fills `col` (`[c * k * k, (y1 - y0) *
    /// wo]`, output rows `y0..y1`) entirely, zeros where a patch reaches into the padding.
    fn fill<T: Copy + Default>(
        &self,
        src: &[T],
        (c, h, w): (usize, usize, usize),
        (y0, y1): (usize, usize),
        col: &mut [T],
    ) {
        let (k, s) = (self.k, self.stride);
        let (ph, p) = (self.pad_h as isize, self.pad_w as isize);
        let (_, wo) = self.out_hw(h, w);
        let n = (y1 - y0) * wo;
        let zero = T::default();
        for ci in 0..c {
            let plane = &src[ci * h * w..(ci + 1) * h * w];
            for kh in 0..k {
                for kw in 0..k {
                    let row = (ci * k + kh) * k + kw;
                    let dst_row = &mut col[row * n..(row + 1) * n];
                    // Output columns whose input column lies inside the image.
                    let off = kw as isize - p;
                    let x0 = if off < 0 {
                        ((-off) as usize).div_ceil(s).min(wo)
                    } else {
                        0
                    };
                    let x1 = (((w as isize - off) + s as isize - 1) / s as isize)
                        .clamp(x0 as isize, wo as isize) as usize;
                    for y in y0..y1 {
                        let dst = &mut dst_row[(y - y0) * wo..(y - y0 + 1) * wo];
                        let iy = (y * s) as isize + kh as isize - ph;
                        if iy < 0 || iy >= h as isize || x0 >= x1 {
                            dst.fill(zero);
                            continue;
                        }
                        let src_row = &plane[iy as usize * w..(iy as usize + 1) * w];
                        dst[..x0].fill(zero);
                        dst[x1..].fill(zero);
                        if s == 1 {
                            let ix0 = (x0 as isize + off) as usize;
                            dst[x0..x1].copy_from_slice(&src_row[ix0..ix0 + (x1 - x0)]);
                        } else {
                            for (x, d) in dst.iter_mut().enumerate().take(x1).skip(x0) {
                                *d = src_row[(x as isize * s as isize + off) as usize];
                            }
                        }
                    }
                }
            }
        }
    }

    /// The convolution of `x` (`[b, c, h, w]`) with `w2d` (`[cout, c * k * k]`) plus
    /// `bias` (`[cout]`): per image, im2col and one GEMM straight into that image's
    /// `[cout, ho * wo]` block of the NCHW output, which starts as the bias. A 1x1
    /// convolution without padding needs no im2col: the image is the GEMM operand.
    fn conv<T: 'static + candle_core::WithDType + Default>(
        &self,
        x: &[T],
        (b, c, h, w): (usize, usize, usize, usize),
        w2d: &[T],
        bias: &[T],
    ) -> Vec<T> {
        let (ho, wo) = self.out_hw(h, w);
        let (cout, n, kk) = (bias.len(), ho * wo, c * self.k * self.k);
        let mut out = Vec::with_capacity(b * cout * n);
        for _ in 0..b {
            for &v in bias {
                out.extend(std::iter::repeat_n(v, n));
            }
        }
        let direct = self.k == 1 && self.stride == 1 && self.pad_h == 0 && self.pad_w == 0;
        if direct {
            for bi in 0..b {
                let img = &x[bi * c * h * w..(bi + 1) * c * h * w];
                let dst = &mut out[bi * cout * n..(bi + 1) * cout * n];
                // SAFETY: w2d is cout x kk, img kk x n and dst cout x n, all row-major.
                unsafe { crate::kernels::gemm_acc(cout, n, kk, dst, n, w2d, img, n) };
            }
            return out;
        }
        // im2col a band of output rows at a time, so the patch matrix the GEMM streams
        // (kk x band) stays within ~1 MB (the L2 cache) instead of kk x ho x wo. The band
        // size must not depend on the thread count: the GEMM's blocking, hence its
        // rounding, follows its shape, and results must not change with --threads-per-rank.
        let threads = rayon::current_num_threads();
        let rows = (COL_BUDGET / (kk * wo).max(1)).clamp(1, ho.max(1));
        let bands = ho.div_ceil(rows);
        let dst = crate::kernels::SharedMut(out.as_mut_ptr());
        let job = |j: usize, col: &mut Vec<T>, parallel_gemm: bool| {
            let (bi, band) = (j / bands, j % bands);
            let (y0, y1) = (band * rows, ((band + 1) * rows).min(ho));
            let cols = (y1 - y0) * wo;
            col.resize(kk * cols, T::default());
            let img = &x[bi * c * h * w..(bi + 1) * c * h * w];
            self.fill(img, (c, h, w), (y0, y1), col);
            let d = dst;
            // SAFETY: w2d is cout x kk, col kk x cols; the destination is image bi's
            // output from this band's first pixel on, rows n apart: cout x cols elements
            // no other job writes (bands and images are disjoint).
            unsafe {
                crate::kernels::gemm_acc_ptr(
                    cout,
                    cols,
                    kk,
                    d.0.add(bi * cout * n + y0 * wo),
                    n,
                    w2d,
                    col,
                    cols,
                    parallel_gemm,
                )
            };
        };
        let jobs = b * bands;
        if threads > 1 && jobs >= 2 * threads {
            // Enough bands to keep every thread busy: bands (im2col included) in parallel.
            use rayon::prelude::*;
            (0..jobs)
                .into_par_iter()
                .for_each_init(Vec::new, |col, j| job(j, col, false));
        } else {
            // Few bands: one after the other, each GEMM on the pool's threads.
            let mut col = Vec::new();
            for j in 0..jobs {
                job(j, &mut col, true);
            }
        }
        out
    }
}

impl CustomOp3 for Im2Col {
    fn name(&self) -> &'static str {
        "hybridiff-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::host::count_cpu_kernel();
        let dims = xl.shape().dims4()?;
        let (b, _, h, w) = dims;
        let (ho, wo) = self.out_hw(h, w);
        let cout = bl.shape().elem_count();
        let off = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("conv2d: operands must be contiguous".into())
            })
        };
        let ((x0, x1), (w0, w1), (b0, b1)) = (off(xl)?, off(wl)?, off(bl)?);
        let out = match (xs, ws, bs) {
            (CpuStorage::F32(x), CpuStorage::F32(wt), CpuStorage::F32(bi)) => {
                CpuStorage::F32(self.conv(&x[x0..x1], dims, &wt[w0..w1], &bi[b0..b1]))
            }
            (CpuStorage::F16(x), CpuStorage::F16(wt), CpuStorage::F16(bi)) => {
                CpuStorage::F16(self.conv(&x[x0..x1], dims, &wt[w0..w1], &bi[b0..b1]))
            }
            (CpuStorage::F64(x), CpuStorage::F64(wt), CpuStorage::F64(bi)) => {
                CpuStorage::F64(self.conv(&x[x0..x1], dims, &wt[w0..w1], &bi[b0..b1]))
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "conv2d: expected f32, f16 or f64 input, weight and bias of one dtype".into(),
                ))
            }
        };
        Ok((out, Shape::from((b, cout, ho, wo))))
    }
}

impl Conv2d {
    /// `(kernel, stride, padding)`.
    pub fn geometry(&self) -> (usize, usize, usize) {
        (self.k, self.stride, self.padding)
    }

    /// The convolution with its padding on columns only: `x`'s rows already include
    /// whatever lies above and below (a band's halo rows, see [`crate::patch`]).
    pub fn forward_rows_unpadded(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_padded(x, 0)
    }

    fn forward_padded(&self, x: &Tensor, pad_h: usize) -> Result<Tensor> {
        if !crate::host::use_cpu_kernels(x.device(), x.dtype()) {
            let cfg = candle_nn::Conv2dConfig {
                padding: pad_h,
                stride: self.stride,
                ..Default::default()
            };
            // candle pads both axes alike: pad the columns' difference by hand.
            let x = if self.padding > pad_h {
                let extra = self.padding - pad_h;
                x.pad_with_zeros(3, extra, extra)?
            } else {
                x.clone()
            };
            if self.padding < pad_h {
                return Err(candle_core::Error::Msg(
                    "conv: row padding above column padding".into(),
                ));
            }
            return candle_nn::Conv2d::new(self.weight.clone(), self.bias.clone(), cfg).forward(&x);
        }
        let (b, c, h, w) = x.dims4()?;
        let (cout, kk) = self.weight2d.dims2()?;
        if c * self.k * self.k != kk {
            return Err(candle_core::Error::Msg(format!(
                "conv2d: input has {c} channels; the {cout}x{}x{k}x{k} weight expects {}",
                kk / (self.k * self.k),
                kk / (self.k * self.k),
                k = self.k
            )));
        }
        // An empty or too small input would underflow the output size below.
        if h == 0 || w == 0 || b == 0 || h + 2 * pad_h < self.k || w + 2 * self.padding < self.k {
            return Err(candle_core::Error::Msg(format!(
                "conv2d: input of {h}x{w} pixels (batch {b}) is too small for a {k}x{k} kernel with padding {p}",
                k = self.k,
                p = self.padding
            )));
        }
        let op = Im2Col {
            k: self.k,
            stride: self.stride,
            pad_h,
            pad_w: self.padding,
        };
        let bias = match &self.bias {
            Some(b) => b.contiguous()?,
            None => Tensor::zeros(cout, x.dtype(), x.device())?,
        };
        x.contiguous()?.apply_op3_no_bwd(&self.weight2d, &bias, &op)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_padded(x, self.padding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::max_diff as max_abs_diff;
    use candle_core::{DType, Device};

    #[test]
    fn matches_candle_conv2d_for_kernels_strides_and_batches() {
        let dev = Device::Cpu;
        for &(k, stride, padding, h, w, b) in &[
            (3, 1, 1, 7, 5, 1),
            (3, 1, 1, 8, 8, 2),
            (3, 2, 1, 8, 8, 2),
            (3, 2, 0, 9, 7, 1),
            (1, 1, 0, 4, 6, 2),
            (5, 1, 2, 6, 6, 1),
        ] {
            let (cin, cout) = (3, 4);
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let ours = Conv2d {
                weight2d: weight.reshape((cout, cin * k * k)).unwrap(),
                weight: weight.clone(),
                bias: Some(bias.clone()),
                k,
                stride,
                padding,
            };
            let cfg = candle_nn::Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let theirs = candle_nn::Conv2d::new(weight, Some(bias), cfg);
            let a = ours.forward(&x).unwrap();
            let e = theirs.forward(&x).unwrap();
            assert_eq!(a.dims(), e.dims());
            let d = max_abs_diff(&a, &e);
            assert!(d < 1e-4, "k{k} s{stride} p{padding} {h}x{w} b{b}: {d}");
        }
    }

    #[test]
    fn images_cut_into_several_im2col_bands_match_candle_conv2d() {
        // 64 channels x 9 = 576 patch rows and 64 output columns: a band is 7 output rows,
        // so 20 rows take three bands (the last one short); stride 2 (10 rows of 32) one.
        let dev = Device::Cpu;
        for stride in [1, 2] {
            let (cin, cout, k) = (64, 8, 3);
            let x = Tensor::randn(0f32, 1.0, (2, cin, 20, 64), &dev).unwrap();
            let weight = Tensor::randn(0f32, 0.1, (cout, cin, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let ours = Conv2d {
                weight2d: weight.reshape((cout, cin * k * k)).unwrap(),
                weight: weight.clone(),
                bias: Some(bias.clone()),
                k,
                stride,
                padding: 1,
            };
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            let theirs = candle_nn::Conv2d::new(weight, Some(bias), cfg);
            let (a, e) = (ours.forward(&x).unwrap(), theirs.forward(&x).unwrap());
            assert_eq!(a.dims(), e.dims());
            let d = max_abs_diff(&a, &e);
            assert!(d < 1e-4, "stride {stride}: {d}");
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // --threads-per-rank must not change a single bit: the same convolutions (one band,
        // several bands, batch 2) in pools of 1, 2 and 3 threads.
        let dev = Device::Cpu;
        for &(cin, h, w, b) in &[(8, 16, 16, 1), (64, 20, 64, 2), (4, 33, 7, 2)] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f32, 0.1, (16, cin, 3, 3), &dev).unwrap();
            let conv = Conv2d {
                weight2d: weight.reshape((16, cin * 9)).unwrap(),
                weight,
                bias: Some(Tensor::randn(0f32, 1.0, 16, &dev).unwrap()),
                k: 3,
                stride: 1,
                padding: 1,
            };
            let run = |t: usize| -> Vec<f32> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap();
                pool.install(|| conv.forward(&x).unwrap())
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let one = run(1);
            assert_eq!(one, run(2), "{cin}x{h}x{w} b{b}: 1 vs 2 threads");
            assert_eq!(one, run(3), "{cin}x{h}x{w} b{b}: 1 vs 3 threads");
        }
    }

    #[test]
    fn empty_and_too_small_inputs_are_errors_not_underflows() {
        let dev = Device::Cpu;
        let weight = Tensor::zeros((2, 3, 3, 3), DType::F32, &dev).unwrap();
        let conv = Conv2d {
            weight2d: weight.reshape((2, 27)).unwrap(),
            weight,
            bias: None,
            k: 3,
            stride: 1,
            padding: 0,
        };
        for (h, w) in [(0, 4), (4, 0), (2, 4), (0, 0)] {
            let x = Tensor::zeros((1, 3, h, w), DType::F32, &dev).unwrap();
            let e = conv.forward(&x).unwrap_err().to_string();
            assert!(e.contains("too small"), "{h}x{w}: {e}");
        }
        // A channel count the weight does not expect would make the GEMM read past the
        // patch matrix: refused, naming both counts.
        let x = Tensor::zeros((1, 4, 5, 5), DType::F32, &dev).unwrap();
        let e = conv.forward(&x).unwrap_err().to_string();
        assert!(e.contains("4 channels") && e.contains("expects 3"), "{e}");
    }

    #[test]
    fn bands_with_halo_rows_equal_the_whole_convolution() {
        let dev = Device::Cpu;
        // (k, stride, padding, rows, band start): stride-2 bands start at even rows; 7 rows
        // leave the last band odd, as an uneven latent height does.
        for &(k, s, p, h, r0) in &[
            (3, 1, 1, 8, 3),
            (3, 2, 1, 8, 4),
            (3, 2, 1, 7, 4),
            (1, 1, 0, 5, 2),
        ] {
            let (cin, cout, w) = (3, 2, 5);
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
            let conv = Conv2d {
                weight2d: weight.reshape((cout, cin * k * k)).unwrap(),
                weight,
                bias: Some(Tensor::randn(0f32, 1.0, cout, &dev).unwrap()),
                k,
                stride: s,
                padding: p,
            };
            let whole = conv.forward(&x).unwrap();
            let below = (k - p).saturating_sub(s);
            // Rows [r0 - p, r0 + rows + below) of the zero-padded input, per band.
            let padded = x.pad_with_zeros(2, p, p).unwrap();
            let mut parts = Vec::new();
            for (a, b) in [(0, r0), (r0, h)] {
                let extra = if b == h { p } else { below };
                let band = padded.narrow(2, a, b - a + p + extra).unwrap();
                parts.push(conv.forward_rows_unpadded(&band).unwrap());
            }
            let banded = Tensor::cat(&parts, 2).unwrap();
            assert_eq!(banded.dims(), whole.dims(), "k{k} s{s} h{h}");
            let d = max_abs_diff(&banded, &whole);
            assert!(d < 1e-5, "k{k} s{s} p{p} h{h} r0{r0}: {d}");
        }
    }
}
