//! Operations the models share, each on burn's ops with a fast path on plain flex
//! ([`crate::kernels`]); the results agree to float rounding.

use burn::nn::Linear;
use burn::tensor::{Device, Tensor};

/// Applies `linear` to `[B, L, D]` as one `[B·L, D]` product. burn broadcasts a rank-3 input
/// into B separate products, each reading the whole weight again: with batched images, or
/// with one token per row while decoding, that multiplies the memory traffic by B.
pub fn dense(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, l, d] = x.dims();
    let x = x.reshape([b * l, d]);
    #[cfg(feature = "flex")]
    let y = crate::kernels::linear_few_rows(linear, x).unwrap_or_else(|x| linear.forward(x));
    #[cfg(not(feature = "flex"))]
    let y = linear.forward(x);
    let out = y.dims()[1];
    y.reshape([b, l, out])
}

/// `x · wᵀ` (`x: [N, D]`, `w: [M, D]`), as a tied LM head multiplies by its embedding table.
pub fn matmul_by_transpose(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "flex")]
    let x = match crate::kernels::matmul_by_transpose_few_rows(x, &w) {
        Ok(y) => return y,
        Err(x) => x,
    };
    // w·xᵀ, then transpose the small result: multiplying by wᵀ would make the kernel
    // stride through (or copy) the whole of `w`.
    w.matmul(x.transpose()).transpose()
}

/// `x` in a contiguous layout, for a view that many later calls read (cached keys and
/// values): kernels would otherwise copy it on every call.
pub fn contiguous(x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    let x = match crate::kernels::contiguous(x) {
        Ok(copy) => return copy,
        Err(x) => x,
    };
    // An element-wise op writes a fresh contiguous tensor.
    x.mul_scalar(1.0)
}

/// Runs `f`, on flex inside its thread pool (see [`crate::kernels::on_thread_pool`]). Autodiff
/// on flex included: this only moves where the work starts, and a [`crate::dropout`] scope
/// moves with it.
pub fn on_thread_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    // An autodiff device compares equal to the device it wraps.
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        let scope = crate::dropout::current();
        return crate::kernels::on_thread_pool(move || crate::dropout::carry(scope, f));
    }
    let _ = device;
    f()
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    #[test]
    fn on_thread_pool_moves_flex_work_into_the_pool_autodiff_included() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            assert!(on_thread_pool(&device, rayon::current_thread_index).is_some());
        }
    }
}
