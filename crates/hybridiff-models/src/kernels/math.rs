//! Element-wise f32 kernels on slices: exp, erf, SiLU, GELU, softmax rows and group
//! normalisation. Written as branch-free loops that LLVM vectorises; [`dispatch!`] compiles
//! each one for AVX-512 and AVX2+FMA and picks the best at run time (candle's scalar
//! `expf`/`erff` per element cost a fifth of a U-Net forward; see docs/benchmarks/cpu.md).

/// Runs `$body` compiled for the widest vector unit this CPU has.
macro_rules! dispatch {
    ($name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the features `v4` is compiled for were detected just above.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for `v3`.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

const LANES: usize = 16;

/// e^x for f32, within 2 ulp of `f32::exp` on [-87.3, 88] (Cephes' `expf`: x = n ln 2 +
/// r, |r| <= ln 2 / 2, a degree-6 polynomial for e^r, 2^n built from its bits). Inputs
/// are clamped to that range (e^-87.3 ~ 1.2e-38 stands for anything smaller, e^88 ~
/// 1.65e38 for anything larger, so 2^n stays a normal number); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer and leaves it in the low bits.
    const SHIFTER: f32 = 12_582_912.0;
    // NaN stays NaN through the arithmetic below (clamp keeps it), no select needed.
    let x = x.clamp(-87.3, 88.0);
    let t = x.mul_add(LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let p = p.mul_add(r * r, r) + 1.0;
    let bits = t
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits())
        .wrapping_add(127)
        << 23;
    p * f32::from_bits(bits)
}

/// erf(x) for f32 within 6e-7 absolute (Abramowitz and Stegun 7.1.26, 1.5e-7 in exact
/// arithmetic, the formula PyTorch's vectorised CPU `erf` uses).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / P.mul_add(a, 1.0);
    let poly = t * A5
        .mul_add(t, A4)
        .mul_add(t, A3)
        .mul_add(t, A2)
        .mul_add(t, A1);
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// x * sigmoid(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// diffusers' exact GELU, 0.5 x (1 + erf(x / sqrt 2)).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The tanh GELU, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), with tanh(u) =
/// 1 - 2 / (e^(2u) + 1).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    let u = C * x * (0.044_715 * x * x).mul_add(1.0, 1.0);
    let th = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + th)
}

dispatch!(silu_slice(src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = silu(s);
    }
});

dispatch!(gelu_slice(src: &[f32], dst: &mut [f32], tanh: bool) {
    if tanh {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = gelu_tanh(s);
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = gelu_erf(s);
        }
    }
});

dispatch!(geglu_rows(src: &[f32], dst: &mut [f32], half: usize) {
    // Each source row is [hidden | gate], each destination row hidden * gelu(gate).
    if half == 0 {
        return;
    }
    for (s, d) in src.chunks_exact(2 * half).zip(dst.chunks_exact_mut(half)) {
        let (hidden, gate) = s.split_at(half);
        for ((d, &h), &g) in d.iter_mut().zip(hidden).zip(gate) {
            *d = h * gelu_erf(g);
        }
    }
});

/// Sum of `x` over 16 interleaved accumulators (vectorisable, and more accurate than one).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// Softmax of each `n`-long row of `src` into `dst`.
pub fn softmax_rows(src: &[f32], dst: &mut [f32], n: usize) {
    dst.copy_from_slice(src);
    softmax_rows_in_place(dst, n);
}

dispatch!(softmax_rows_in_place(x: &mut [f32], n: usize) {
    if n == 0 {
        return;
    }
    for r in x.chunks_exact_mut(n) {
        let m = max(r);
        // exp and the sum in one pass, 16 partial sums.
        let mut acc = [0f32; LANES];
        let mut chunks = r.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp(*v - m);
                *a += *v;
            }
        }
        let mut tail = 0f32;
        for v in chunks.into_remainder() {
            *v = exp(*v - m);
            tail += *v;
        }
        let inv = 1.0 / (acc.iter().sum::<f32>() + tail);
        for v in r.iter_mut() {
            *v *= inv;
        }
    }
});

dispatch!(layer_norm_modulate_rows(
    src: &[f32],
    dst: &mut [f32],
    scale: &[f32],
    shift: &[f32],
    eps: f32
) {
    // Rows of `scale.len()` features: (x - mean) / sqrt(var + eps) * (1 + scale) + shift,
    // two-pass statistics per row.
    let n = scale.len();
    if n == 0 {
        return;
    }
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
        let mean = sum(s) / n as f32;
        let mut acc = [0f32; LANES];
        let chunks = s.chunks_exact(LANES);
        let mut tail = 0f32;
        for &v in chunks.remainder() {
            tail += (v - mean) * (v - mean);
        }
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += (v - mean) * (v - mean);
            }
        }
        let rstd = 1.0 / ((acc.iter().sum::<f32>() + tail) / n as f32 + eps).sqrt();
        for ((d, &v), (&sc, &sh)) in d.iter_mut().zip(s).zip(scale.iter().zip(shift)) {
            *d = ((v - mean) * rstd).mul_add(1.0 + sc, sh);
        }
    }
});

dispatch!(group_norm_group(
    src: &[f32],
    dst: &mut [f32],
    scale: &[f32],
    shift: &[f32],
    eps: f32,
    apply_silu: bool
) {
    // One group: `scale.len()` channels of `src.len() / scale.len()` elements each.
    // Two passes for the statistics (mean, then squared deviations), as candle's GroupNorm.
    let len = src.len() as f32;
    let mean = sum(src) / len;
    let mut acc = [0f32; LANES];
    let chunks = src.chunks_exact(LANES);
    let mut tail = 0f32;
    for &v in chunks.remainder() {
        tail += (v - mean) * (v - mean);
    }
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let var = (acc.iter().sum::<f32>() + tail) / len;
    let rstd = 1.0 / (var + eps).sqrt();
    let per = src.len() / scale.len();
    for ((s, d), (&w, &b)) in src
        .chunks_exact(per)
        .zip(dst.chunks_exact_mut(per))
        .zip(scale.iter().zip(shift))
    {
        let a = rstd * w;
        let c = b - mean * a;
        if apply_silu {
            for (d, &v) in d.iter_mut().zip(s) {
                *d = silu(v.mul_add(a, c));
            }
        } else {
            for (d, &v) in d.iter_mut().zip(s) {
                *d = v.mul_add(a, c);
            }
        }
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> impl Iterator<Item = f32> {
        (-200_000..=200_000).map(|i| i as f32 * 5e-4)
    }

    #[test]
    fn exp_is_within_2_ulp_of_libm_and_clamps() {
        for x in grid()
            .filter(|x| (-87.3..=88.0).contains(x))
            .chain([-87.0, 88.0, 1e-8, -1e-8])
        {
            let (a, b) = (exp(x), x.exp());
            assert!(
                (a - b).abs() <= 2.0 * f32::EPSILON * b,
                "exp({x}) = {a}, libm {b}"
            );
        }
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1.3e-38);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    }

    #[test]
    fn erf_silu_and_gelus_match_f64_references() {
        for x in grid() {
            let xd = x as f64;
            // erf: A&S 7.1.26's own 1.4e-7, plus f32 rounding in its alternating polynomial.
            let erf_ref = libm_erf(xd);
            assert!((erf(x) as f64 - erf_ref).abs() < 6e-7, "erf({x})");
            let silu_ref = xd / (1.0 + (-xd).exp());
            assert!((silu(x) as f64 - silu_ref).abs() <= 4e-7 * silu_ref.abs().max(1.0));
            let gelu_ref = 0.5 * xd * (1.0 + libm_erf(xd / 2f64.sqrt()));
            assert!((gelu_erf(x) as f64 - gelu_ref).abs() <= 5e-7 * xd.abs().max(1.0));
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
            let tanh_ref = 0.5 * xd * (1.0 + u.tanh());
            assert!((gelu_tanh(x) as f64 - tanh_ref).abs() <= 1e-6 * xd.abs().max(1.0));
        }
    }

    /// erf in f64 by its Taylor series (|x| < 3) or asymptotic complement, to 1e-12.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let y = if a < 3.0 {
            let (mut term, mut s, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                s += term / (2.0 * n + 1.0);
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // Continued fraction for erfc.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        y.copysign(x)
    }

    #[test]
    fn slice_kernels_equal_their_scalar_forms_at_every_length() {
        for n in [0, 1, 15, 16, 17, 100] {
            let src: Vec<f32> = (0..2 * n).map(|i| (i as f32 * 0.37).sin() * 6.0).collect();
            let mut d = vec![0f32; 2 * n];
            silu_slice(&src, &mut d);
            assert!(d.iter().zip(&src).all(|(&d, &s)| d == silu(s)));
            gelu_slice(&src, &mut d, false);
            assert!(d.iter().zip(&src).all(|(&d, &s)| d == gelu_erf(s)));
            gelu_slice(&src, &mut d, true);
            assert!(d.iter().zip(&src).all(|(&d, &s)| d == gelu_tanh(s)));
            if n > 0 {
                let half = n / 2;
                let mut g = vec![0f32; n];
                geglu_rows(&src, &mut g, half);
                if half > 0 {
                    for (row, out) in src.chunks_exact(2 * half).zip(g.chunks_exact(half)) {
                        for j in 0..half {
                            assert_eq!(out[j], row[j] * gelu_erf(row[half + j]));
                        }
                    }
                }
                softmax_rows(&src, &mut d, n);
                for row in d.chunks_exact(n) {
                    let s: f32 = row.iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "softmax row sums to {s}");
                }
                let mut in_place = src.clone();
                softmax_rows_in_place(&mut in_place, n);
                assert_eq!(in_place, d);
            }
        }
    }
}
