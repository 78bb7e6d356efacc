//! Helpers of this crate's unit tests.

use burn::tensor::{Device, Tensor, TensorData};

use crate::SplitMix64;

/// `t`'s values as f32, in row-major order.
pub(crate) fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

/// A tensor of uniform values in `[lo, hi)` from `seed`.
pub(crate) fn uniform<const D: usize>(
    seed: u64,
    shape: [usize; D],
    lo: f64,
    hi: f64,
    device: &Device,
) -> Tensor<D> {
    let mut rng = SplitMix64::new(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.range_f64(lo, hi) as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}
