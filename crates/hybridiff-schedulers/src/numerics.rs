//! Scalar helpers that reproduce numpy's and torch's arithmetic closely
//! enough for schedules to match diffusers bit for bit or within an ulp.

use candle_core::{Result, Tensor};

/// `numpy.linspace(start, stop, num)` in float64 (endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            y.iter_mut().for_each(|v| *v = *v / div as f64 * delta);
        } else {
            y.iter_mut().for_each(|v| *v *= step);
        }
    } else {
        y.iter_mut().for_each(|v| *v *= delta);
    }
    y.iter_mut().for_each(|v| *v += start);
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `numpy.linspace(start, stop, num, endpoint=False)` in float64.
pub(crate) fn np_linspace_open(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let delta = stop - start;
    let step = delta / num as f64;
    (0..num)
        .map(|i| {
            let i = i as f64;
            if step == 0.0 {
                i / num as f64 * delta + start
            } else {
                i * step + start
            }
        })
        .collect()
}

/// `numpy.arange(start, stop, step)` for float64 arguments: numpy derives the
/// stride from the first two elements, which can differ from `step` by an ulp.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `numpy.interp(x, arange(len(fp)), fp)`.
pub(crate) fn np_interp_index(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU: the ends
/// are rounded to float32 first and the second half counts back from `end`.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps <= 1 {
        return vec![start; steps];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on CPU, which accumulates in float64
/// and rounds each partial product to float32.
pub(crate) fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `scalar * tensor` with a float32 scalar, as torch does for 0-dim tensors and
/// Python floats (the product is rounded in the tensor's dtype).
pub(crate) fn mul(t: &Tensor, s: f32) -> Result<Tensor> {
    t.affine(s as f64, 0.0)
}

/// `tensor / scalar` as a true division, not a multiplication by the reciprocal.
pub(crate) fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_div(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_edge_cases() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 2), vec![0.0, 999.0]);
        let v = np_linspace(0.0, 999.0, 4);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
    }

    #[test]
    fn arange_length_and_values() {
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn interp_clamps_and_interpolates() {
        let fp = [1.0, 3.0, 7.0];
        assert_eq!(np_interp_index(-1.0, &fp), 1.0);
        assert_eq!(np_interp_index(0.5, &fp), 2.0);
        assert_eq!(np_interp_index(1.0, &fp), 3.0);
        assert_eq!(np_interp_index(1.25, &fp), 4.0);
        assert_eq!(np_interp_index(5.0, &fp), 7.0);
    }

    #[test]
    fn torch_linspace_hits_both_ends() {
        let v = torch_linspace_f32(0.1, 0.2, 7);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[6], 0.2f32);
        assert_eq!(torch_linspace_f32(0.5, 0.7, 1), vec![0.5f32]);
    }
}
