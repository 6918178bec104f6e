//! Distances between a run's output and the serial reference.

use candle_core::{DType, Tensor};

use crate::Result;

/// Max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// PSNR in dB of `x` against `reference`, with the reference's value range
/// (max - min) as the peak; infinite for identical tensors.
pub fn psnr(x: &Tensor, reference: &Tensor) -> Result<f64> {
    let r = reference.to_dtype(DType::F64)?.flatten_all()?;
    let d = (x.to_dtype(DType::F64)?.flatten_all()? - &r)?;
    let mse = d.sqr()?.mean(0)?.to_scalar::<f64>()?;
    let peak = r.max(0)?.to_scalar::<f64>()? - r.min(0)?.to_scalar::<f64>()?;
    if mse == 0.0 {
        return Ok(f64::INFINITY);
    }
    Ok(10.0 * (peak * peak / mse).log10())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn psnr_of_a_known_error() {
        let r = Tensor::new(&[0f32, 1.0, 0.0, 1.0], &Device::Cpu).unwrap();
        let x = Tensor::new(&[0.1f32, 0.9, 0.1, 0.9], &Device::Cpu).unwrap();
        // mse 0.01, peak 1 -> 20 dB
        assert!((psnr(&x, &r).unwrap() - 20.0).abs() < 1e-4);
        assert!(psnr(&r, &r).unwrap().is_infinite());
        assert!((max_abs_diff(&x, &r).unwrap() - 0.1).abs() < 1e-6);
    }
}
