//! LPIPS, the learned perceptual image distance (Zhang et al., "The Unreasonable
//! Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018), version 0.1 with the
//! AlexNet backbone: the `lpips` Python package's `LPIPS(net='alex')` forward, which is the
//! Hybridiff paper's headline quality metric (arXiv 2602.21760, Table 1).
//!
//! The distance of two images `x0, x1` in `[-1, 1]`: each is shifted and scaled per channel
//! (`(x - shift) / scale`, the package's `ScalingLayer`), run through AlexNet's five
//! convolutions (torchvision's `features`: conv 11x11/4 + ReLU, max-pool 3/2, conv 5x5 +
//! ReLU, max-pool 3/2, three conv 3x3 + ReLU), and at each ReLU output the features are
//! normalised over channels (`f / (||f||_2 + 1e-10)`), subtracted, squared, weighted by the
//! layer's linear head (a 1x1 convolution to one channel, no bias) and averaged over the
//! image; the five layer values are summed.
//!
//! Weights: one safetensors file with torchvision's AlexNet names for the backbone
//! (`features.{0,3,6,8,10}.{weight,bias}`) and the `lpips` package's names for the heads
//! (`lin{0..4}.model.1.weight`, `[1, C, 1, 1]`); `tools/lpips_weights.py` writes it from
//! torchvision's AlexNet checkpoint and the heads that ship in the `lpips` wheel.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::conv::Conv2d;
use crate::{Error, Result};

/// AlexNet's convolutions as `(torchvision index, in, out, kernel, stride, padding)`.
const ALEX: [(usize, usize, usize, usize, usize, usize); 5] = [
    (0, 3, 64, 11, 4, 2),
    (3, 64, 192, 5, 1, 2),
    (6, 192, 384, 3, 1, 1),
    (8, 384, 256, 3, 1, 1),
    (10, 256, 256, 3, 1, 1),
];

/// The `lpips` package's `ScalingLayer` (v0.1).
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// The smallest image side LPIPS (AlexNet) takes: both max-pools need a 3x3 window.
pub const MIN_SIDE: usize = 31;

/// The AlexNet-LPIPS network.
#[derive(Debug, Clone)]
pub struct Lpips {
    convs: Vec<Conv2d>,
    /// Each layer's head as `[1, C, 1, 1]`.
    lins: Vec<Tensor>,
    device: Device,
}

impl Lpips {
    /// Builds the network from `vb` (names in the module docs).
    pub fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let mut convs = Vec::with_capacity(5);
        let mut lins = Vec::with_capacity(5);
        for (layer, &(idx, cin, cout, k, stride, pad)) in ALEX.iter().enumerate() {
            convs.push(Conv2d::new(
                vb.pp(format!("features.{idx}")),
                cin,
                cout,
                k,
                stride,
                pad,
            )?);
            lins.push(vb.get((1, cout, 1, 1), &format!("lin{layer}.model.1.weight"))?);
        }
        Ok(Self {
            convs,
            lins,
            device: vb.device().clone(),
        })
    }

    /// Loads the weights file `path` (f32 on `device`).
    ///
    /// # Errors
    /// A missing or damaged file, or tensors missing or of the wrong shape, naming the file
    /// and the tensor.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let weights = crate::weights::Weights::open(&[path.to_path_buf()])?;
        crate::memory::check(
            &format!("loading the LPIPS weights {}", path.display()),
            weights.bytes_in(DType::F32),
        )
        .map_err(Error::Weights)?;
        let net = Self::new(weights.into_var_builder(DType::F32, device)).map_err(|e| {
            Error::Weights(format!(
                "{}: not LPIPS (AlexNet) weights: {e}; expected torchvision's features.{{0,3,6,8,10}}.{{weight,bias}} and the lpips package's lin{{0..4}}.model.1.weight (tools/lpips_weights.py writes them)",
                path.display()
            ))
        })?;
        // The lpips package clamps its heads at 0 when it trains them: a negative weight
        // would make a distance negative, which no LPIPS value is.
        for (layer, lin) in net.lins.iter().enumerate() {
            let least = lin.flatten_all()?.min(0)?.to_scalar::<f32>()?;
            if least.is_nan() || least < 0.0 {
                return Err(Error::Weights(format!(
                    "{}: lin{layer}.model.1.weight has {least}; LPIPS heads are non-negative (the lpips package keeps them >= 0), so this is not an LPIPS weights file",
                    path.display()
                )));
            }
        }
        Ok(net)
    }

    /// LPIPS distance of each pair of images `x0[n]`, `x1[n]` (`[N, 3, H, W]`, values in
    /// `[-1, 1]`, `H, W >= MIN_SIDE`).
    pub fn distance(&self, x0: &Tensor, x1: &Tensor) -> Result<Vec<f64>> {
        let (n, c, h, w) = x0.dims4()?;
        if x1.dims() != x0.dims() || c != 3 {
            return Err(Error::Input(format!(
                "LPIPS compares two [N, 3, H, W] batches of one shape; got {:?} and {:?}",
                x0.dims(),
                x1.dims()
            )));
        }
        if h < MIN_SIDE || w < MIN_SIDE {
            return Err(Error::Input(format!(
                "LPIPS (AlexNet) needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels; got {w}x{h}"
            )));
        }
        let feats0 = self.features(x0)?;
        let feats1 = self.features(x1)?;
        let mut total = Tensor::zeros(n, DType::F32, &self.device)?;
        for ((f0, f1), lin) in feats0.iter().zip(&feats1).zip(&self.lins) {
            let d = (normalize(f0)? - normalize(f1)?)?.sqr()?;
            let weighted = d.broadcast_mul(lin)?.sum_keepdim(1)?;
            total = (total + weighted.flatten_from(1)?.mean(D::Minus1)?)?;
        }
        Ok(total
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .collect())
    }

    /// LPIPS distance of two interleaved RGB8 images of `width x height` (converted to
    /// `[-1, 1]` as the package's `im2tensor` does: `x / 127.5 - 1`).
    pub fn distance_rgb8(&self, a: &[u8], b: &[u8], width: usize, height: usize) -> Result<f64> {
        let n = width * height * 3;
        if a.len() != n || b.len() != n {
            return Err(Error::Input(format!(
                "LPIPS: images of {} and {} bytes, expected {n} for {width}x{height} RGB",
                a.len(),
                b.len()
            )));
        }
        let t = |img: &[u8]| -> Result<Tensor> {
            let v: Vec<f32> = img.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
            Ok(Tensor::from_vec(v, (1, height, width, 3), &self.device)?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        Ok(self.distance(&t(a)?, &t(b)?)?[0])
    }

    /// The five ReLU outputs of AlexNet on the scaled input.
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dev = &self.device;
        let shift = Tensor::new(&SHIFT, dev)?.reshape((1, 3, 1, 1))?;
        let scale = Tensor::new(&SCALE, dev)?.reshape((1, 3, 1, 1))?;
        let mut h = x
            .to_dtype(DType::F32)?
            .broadcast_sub(&shift)?
            .broadcast_div(&scale)?;
        let mut out = Vec::with_capacity(5);
        for (i, conv) in self.convs.iter().enumerate() {
            // torchvision's features: max-pool 3/2 before the second and third convolutions.
            if i == 1 || i == 2 {
                h = h.max_pool2d_with_stride(3, 2)?;
            }
            h = conv.forward(&h)?.relu()?;
            out.push(h.clone());
        }
        Ok(out)
    }
}

/// `f / (sqrt(sum_c f^2) + 1e-10)`: the package's `normalize_tensor`.
fn normalize(f: &Tensor) -> Result<Tensor> {
    let norm = (f.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-10)?;
    Ok(f.broadcast_div(&norm)?)
}

/// FNV-1a of a tensor name: the seed of its stream in [`seeded_backbone`].
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// `n` values uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`: value `i` is SplitMix64 of
/// `(fnv1a(name) ^ seed) + (i + 1) * 0x9E3779B97F4A7C15`, its top 24 bits as `u` in
/// `[0, 1)`, then `(2u - 1) * bound` in f32 (every step exact or one IEEE rounding, so numpy
/// gives the same bits).
fn seeded_uniform(name: &str, n: usize, fan_in: usize, seed: u64) -> Vec<f32> {
    let base = fnv1a(name) ^ seed;
    let bound = 1.0f32 / (fan_in as f32).sqrt();
    (1..=n as u64)
        .map(|i| {
            let mut z = base.wrapping_add(i.wrapping_mul(0x9E3779B97F4A7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / 16_777_216.0;
            (2.0 * u - 1.0) * bound
        })
        .collect()
}

/// A seeded random AlexNet backbone (`features.{0,3,6,8,10}.{weight,bias}`, f32 on the CPU),
/// in PyTorch's default range: the backbone of the LPIPS parity fixture, which
/// `tools/lpips_weights.py` (`seeded_backbone`) builds bit for bit in numpy, so the fixture
/// need not store its 10 MB. Not a perceptual metric: real LPIPS needs torchvision's
/// ImageNet weights.
pub fn seeded_backbone(
    seed: u64,
) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
    let mut out = std::collections::HashMap::new();
    for &(idx, cin, cout, k, _, _) in &ALEX {
        let fan_in = cin * k * k;
        let w = format!("features.{idx}.weight");
        let b = format!("features.{idx}.bias");
        let wv = seeded_uniform(&w, cout * fan_in, fan_in, seed);
        let bv = seeded_uniform(&b, cout, fan_in, seed);
        out.insert(w, Tensor::from_vec(wv, (cout, cin, k, k), &Device::Cpu)?);
        out.insert(b, Tensor::from_vec(bv, cout, &Device::Cpu)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeded_backbone_matches_numpys_bits() {
        // tools/lpips_weights.py: seeded_backbone(2026)[name].flatten().view("uint32").
        let b = seeded_backbone(2026).unwrap();
        let bits = |name: &str| -> Vec<u32> {
            let v: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        let w = bits("features.0.weight");
        assert_eq!(&w[..4], &[0x3d0dfdaf, 0x3b466d96, 0xbc0ff600, 0xbca78f91]);
        assert_eq!(
            &bits("features.0.bias")[..3],
            &[0x3bc949e1, 0xbd134123, 0xbd12d971]
        );
        let w = bits("features.10.weight");
        assert_eq!(&w[w.len() - 2..], &[0x3be38660, 0xbc3a5b8e]);
    }
}
