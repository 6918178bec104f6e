//! PyTorch's CPU random generator, so that `--noise torch --seed S` starts from the latents
//! diffusers draws with `torch.Generator("cpu").manual_seed(S)`, bit for bit.
//!
//! What is reproduced (PyTorch's `CPUGeneratorImpl` and `normal_kernel` on CPU, float32,
//! contiguous; checked against torch 2.15 in `tests/torch_rng.rs` over many seeds and sizes):
//!
//! - The engine is a 32-bit Mersenne Twister (MT19937) seeded with the low 32 bits of the
//!   seed (`manual_seed`), standard initialisation and tempering.
//! - `randn(n)` with `n >= 16` (the vectorised path, `normal_fill`): `n` uniforms
//!   `(r & 0xFFFFFF) / 2^24` from one 32-bit draw each, turned into normals 16 at a time by
//!   Box-Muller: for `j < 8`, `u1 = 1 - d[j]`, `u2 = d[j + 8]`, `radius = sqrt(-2 ln u1)`,
//!   `theta = 2 pi u2`, `d[j] = radius cos theta`, `d[j + 8] = radius sin theta`. When `n`
//!   is not a multiple of 16, 16 fresh uniforms replace the last 16 values and are
//!   transformed again. On x86-64 PyTorch takes the AVX2 kernel: `ln`, `sin` and `cos` are
//!   the Cephes single-precision polynomials (as in `avx_mathfun.h`) with the
//!   multiply-adds the compiler fused, which [`log_f32`] and [`sincos_f32`] evaluate in
//!   the same order (found by matching torch's output exactly; a correctly rounded
//!   `ln`/`sin`/`cos` differs in about a third of the values by an ulp).
//! - `randn(n)` with `n < 16` (the scalar path): each value is a double-precision
//!   Box-Muller normal from two 53-bit uniforms (`random64`: the first 32-bit draw is the
//!   high half), `r = sqrt(-2 log1p(-u2))`, `theta = 2 pi u1`; `r cos theta` is returned
//!   and `r sin theta` is kept for the next scalar draw, as the generator's
//!   `next_double_normal_sample` is.
//!
//! Draws continue the stream as PyTorch's do: diffusers' stochastic schedulers draw each
//! step's noise from the generator that drew the initial latents.

/// PyTorch's CPU generator: MT19937 plus the cached second normal of the scalar path.
#[derive(Clone)]
pub struct TorchGenerator {
    mt: [u32; 624],
    index: usize,
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("index", &self.index)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

/// Element count from which PyTorch fills float tensors 16 values at a time.
pub const VECTOR_THRESHOLD: usize = 16;

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`: seeds with the low 32 bits, as PyTorch's
    /// `mt19937` does, and clears the cached normal.
    pub fn manual_seed(seed: u64) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed as u32;
        for i in 1..624 {
            let prev = mt[i - 1];
            mt[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            mt,
            index: 624,
            next_double_normal: None,
        }
    }

    /// The next 32-bit output (`generator->random()`).
    pub fn random(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// The next 64-bit output (`generator->random64()`): two draws, the first one high.
    pub fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.mt[i] & UPPER) | (self.mt[(i + 1) % 624] & LOWER);
            let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.mt[i] = v;
        }
        self.index = 0;
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits over 2^24, in [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits over 2^53, in [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One standard normal of the scalar path (`normal_distribution<double>`), as f64.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=self)` for a contiguous float32 tensor of `n` elements
    /// (any shape: PyTorch fills it in memory order), continuing this generator's stream.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < VECTOR_THRESHOLD {
            // `ret = normal(gen) * std + mean` in double, then cast.
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut d: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in d.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut d[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        d
    }
}

/// Box-Muller on 16 uniforms in place (PyTorch's `normal_fill_16_AVX2`, mean 0, std 1).
fn normal_fill_16(d: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * log_f32(u1)).sqrt();
        let (sin, cos) = sincos_f32(two_pi * u2);
        // `fmadd(n, std, mean)` with std 1 and mean 0: exact, except that -0 becomes +0.
        d[j] = radius * cos + 0.0;
        d[j + 8] = radius * sin + 0.0;
    }
}

// The constants are Cephes' as published (decimal, rounded to f32 as C rounds them).
/// Natural logarithm of a positive normal float: the Cephes `logf` polynomial, evaluated
/// as PyTorch's AVX2 build of it does (multiply-adds fused where its compiler fused them).
#[allow(clippy::excessive_precision)]
pub fn log_f32(x: f32) -> f32 {
    // Cephes' SQRTHF, 0.707106781186547524: the same f32.
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440e-4;
    const Q2: f32 = 0.693359375;
    let bits = x.to_bits();
    let mut e = (((bits >> 23) as i32) - 0x7f) as f32 + 1.0;
    // The mantissa as a value in [0.5, 1).
    let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = m < SQRT_HALF;
    let x = if below {
        e -= 1.0;
        (m - 1.0) + m
    } else {
        (m - 1.0) + 0.0
    };
    let z = x * x;
    let mut y = P[0];
    for p in &P[1..] {
        y = y.mul_add(x, *p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    let x = x + y;
    e.mul_add(Q2, x)
}

/// Sine and cosine of a float (`sincos256_ps`): Cephes' reduction by pi/4 in three parts
/// and its two minimax polynomials, with PyTorch's fused multiply-adds.
#[allow(clippy::excessive_precision)]
pub fn sincos_f32(x: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.27323954473516;
    const DP1: f32 = -0.78515625;
    const DP2: f32 = -2.4187564849853515625e-4;
    const DP3: f32 = -3.77489497744594108e-8;
    const COS: [f32; 3] = [
        2.443315711809948E-5,
        -1.388731625493765E-3,
        4.166664568298827E-2,
    ];
    const SIN: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];
    let mut sign_sin = x.is_sign_negative();
    let x = x.abs();
    let mut j = (x * FOUR_OVER_PI) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = j & 4 != 0;
    let sin_poly_is_sin = j & 2 == 0;
    let x = y.mul_add(DP1, x);
    let x = y.mul_add(DP2, x);
    let x = y.mul_add(DP3, x);
    let sign_cos = (!(j.wrapping_sub(2))) & 4 != 0;
    sign_sin ^= swap_sign_sin;
    let z = x * x;
    let mut c = COS[0].mul_add(z, COS[1]).mul_add(z, COS[2]);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = SIN[0].mul_add(z, SIN[1]).mul_add(z, SIN[2]);
    s *= z;
    s = s.mul_add(x, x);
    let (sin, cos) = if sin_poly_is_sin { (s, c) } else { (c, s) };
    (
        if sign_sin { -sin } else { sin },
        if sign_cos { -cos } else { cos },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard's check: the 10000th output of mt19937 seeded 5489.
        let mut g = TorchGenerator::manual_seed(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = g.random();
        }
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn the_polynomials_are_close_to_the_true_functions() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!(
                (log_f32(x) as f64 - (x as f64).ln()).abs() < 2e-7 * (1.0 + (x as f64).ln().abs())
            );
            let t = x * 6.25;
            let (s, c) = sincos_f32(t);
            assert!((s as f64 - (t as f64).sin()).abs() < 3e-7, "{t}");
            assert!((c as f64 - (t as f64).cos()).abs() < 3e-7, "{t}");
        }
    }
}
