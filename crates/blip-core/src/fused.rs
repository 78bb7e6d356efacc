//! Training ops with their own backward passes: dense layers, the ViT's self-attention,
//! attention's softmax, GELU and LayerNorm.
//!
//! Under autodiff, burn builds each of these from generic ops, and each generic op is a
//! graph node with its own full-size pass forward and backward: attention's softmax is a
//! dozen (scale, bias add, max, clamp, subtract, a scalar `exp`, sum, clamp, divide, and
//! their backward passes, which evaluate `exp` again), LayerNorm ten, and GELU evaluates a
//! scalar libm `erf`. Unmasked self-attention splits its heads out of `[B, T, 3·D]` with
//! copies, and gathers them back the same way, forward and backward. A dense layer is a
//! matmul and a bias add, and flex allocates each matmul's output twice (zeroed, then copied
//! into an aligned buffer), forward and for both gradients. Here each is one node: one
//! vectorised pass forward, one backward, with the few tensors backward needs saved in
//! between.
//!
//! | op | forward | backward (`g` = gradient of the output) |
//! |---|---|---|
//! | [`linear`] | `y = x·W + b`: one GEMM onto rows of `b` | `∂x = g·Wᵀ`; `∂W = xᵀ·g`; `∂b = Σ_rows g` |
//! | [`self_attention`] | per head, `P = softmax(q·kᵀ/√d_h)`, `y = P·v`, read from and written to `[B, T, ·]` rows in place | `∂v = Pᵀ·g`; `∂q = S·k`, `∂k = Sᵀ·q` with `S = P ⊙ (g·vᵀ − Σ_row P⊙g·vᵀ)/√d_h` |
//! | [`attention_softmax`] | `y = softmax(scale·s + bias)` over the last dim | `∂s = scale · y ⊙ (g − Σ_row g⊙y)` |
//! | [`gelu`] | `y = x · Φ(x)` | `∂x = g ⊙ (Φ(x) + x·φ(x))` |
//! | [`layer_norm`] | `y = x̂ ⊙ γ + β`, `x̂ = (x − μ)·r`, `r = 1/√(σ² + ε)` per row | `∂x = r·(g̃ − mean(g̃) − x̂·mean(g̃⊙x̂))`, `g̃ = g⊙γ`; `∂γ = Σ_rows g⊙x̂`; `∂β = Σ_rows g` |
//!
//! The fused path runs on flex (burn's CPU backend) in f32, with or without autodiff.
//! Every other backend or dtype takes burn's own ops, with the same result to float
//! rounding. The tests compare both paths' values and gradients, and the gradients with
//! finite differences.

use burn::nn::{LayerNorm, Linear};
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, FloatDType, Tensor, activation};

use crate::ops::check_shape;
use crate::precision;

/// Whether the fused ops run with their own backward passes on `device`: autodiff over
/// flex. There, attention is best computed in steps around [`attention_softmax`]; elsewhere
/// burn's fused attention (or, on plain flex, the inference kernels) is faster.
///
/// ```
/// use burn::tensor::Device;
///
/// assert!(!blip_core::fused::has_backward(&Device::flex()));
/// ```
pub fn has_backward(device: &Device) -> bool {
    cfg!(all(feature = "flex", feature = "autodiff"))
        && device.is_autodiff()
        && *device == Device::flex()
}

/// `linear` applied to the rows of `x` (`[N, D_in]`): `x·W + b`, with burn's layout of the
/// weight (`W: [D_in, D_out]`). On flex the bias is the GEMM's starting value, so no pass adds
/// it, and the gradients are written straight into their own buffers.
///
/// An `x` whose width is not the layer's input width is an
/// [`Error::InputShape`](crate::Error::InputShape).
///
/// ```
/// use blip_core::fused::linear;
/// use burn::nn::LinearConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let mut layer = LinearConfig::new(2, 1).init(&device);
/// layer.weight = layer.weight.map(|_| Tensor::<2>::from_floats([[1.0], [10.0]], &device));
/// layer.bias = layer.bias.map(|b| b.map(|_| Tensor::<1>::from_floats([0.5], &device)));
/// let x = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
/// let y: Vec<f32> = linear(&layer, x)?.into_data().to_vec().unwrap();
/// assert_eq!(y, [21.5, 43.5]);
/// assert!(linear(&layer, Tensor::<2>::zeros([1, 3], &device)).is_err());
/// # Ok::<(), blip_core::Error>(())
/// ```
pub fn linear(linear: &Linear, x: Tensor<2>) -> crate::Result<Tensor<2>> {
    let [d_in, _] = linear.weight.val().dims();
    let dims = x.dims();
    check_shape("x", &format!("[.., {d_in}]"), &dims, dims[1] == d_in)?;
    #[cfg(feature = "flex")]
    let x = match flex::linear(linear, x) {
        Ok(y) => return Ok(y),
        Err(x) => x,
    };
    Ok(linear.forward(x))
}

/// Unmasked multi-head self-attention (the ViT's) from a fused projection: `qkv` is
/// `[B, T, 3·D]` with columns `[q | k | v]` (heads inner), the result `[B, T, D]` with
/// `out[b, :, head] = softmax(q·kᵀ/√(D/heads))·v` for that head's columns. On flex each head
/// reads its columns in place, forward and backward, and backward reuses the probabilities.
///
/// A `qkv` whose width is not three times a multiple of `heads` is an
/// [`Error::InputShape`](crate::Error::InputShape).
///
/// ```
/// use blip_core::fused::self_attention;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// // One head of width 1, two tokens with equal keys: each query averages the values.
/// let qkv = Tensor::<3>::from_floats([[[1.0, 1.0, 2.0], [3.0, 1.0, 4.0]]], &device);
/// let y: Vec<f32> = self_attention(qkv.clone(), 1)?.into_data().to_vec().unwrap();
/// assert_eq!(y, [3.0, 3.0]);
/// assert!(self_attention(qkv, 2).is_err());
/// # Ok::<(), blip_core::Error>(())
/// ```
pub fn self_attention(qkv: Tensor<3>, heads: usize) -> crate::Result<Tensor<3>> {
    let dims = qkv.dims();
    let [b, t, d3] = dims;
    check_shape(
        "qkv",
        &format!("[B, T, 3·{heads}·head width]"),
        &dims,
        heads > 0 && d3 % (3 * heads) == 0,
    )?;
    #[cfg(feature = "flex")]
    let qkv = match flex::self_attention(qkv, heads) {
        Ok(y) => return Ok(y),
        Err(qkv) => qkv,
    };
    // Elsewhere burn's attention (fused kernels on the GPU backends), on the heads split out:
    // [B, T, 3, H, hd] → [3, B, H, T, hd], the 3 the outer split, heads inner.
    let hd = d3 / 3 / heads;
    let qkv = qkv.reshape([b, t, 3, heads, hd]).permute([2, 0, 3, 1, 4]);
    let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b, heads, t, hd]);
    let options = AttentionModuleOptions::default();
    let context = module::attention(part(0), part(1), part(2), None, None, options);
    Ok(context.swap_dims(1, 2).reshape([b, t, heads * hd]))
}

/// `softmax(scale · scores + bias)` over the last dimension: the attention probabilities
/// of the scores `q·kᵀ` (`[B, H, L_q, L_k]`). `bias` (an additive mask, a large negative
/// value or `-∞` where a key is hidden) broadcasts against the scores. It is a constant on
/// the fused path: a `bias` that takes part in autodiff takes burn's ops, so that it gets
/// its gradient.
///
/// A `bias` that does not broadcast against `scores` is an
/// [`Error::InputShape`](crate::Error::InputShape).
///
/// ```
/// use blip_core::fused::attention_softmax;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let scores = Tensor::<4>::from_floats([[[[0.0, 2.0, 4.0]]]], &device);
/// // The last key is hidden: the first two share the probability as softmax([0, 1]).
/// let bias = Tensor::<4>::from_floats([[[[0.0, 0.0, -1e4]]]], &device);
/// let p: Vec<f32> = attention_softmax(scores.clone(), 0.5, Some(bias))?.into_data().to_vec().unwrap();
/// let e = std::f32::consts::E;
/// assert!((p[1] - e / (1.0 + e)).abs() < 1e-6 && p[2] == 0.0);
/// let wrong = Tensor::<4>::zeros([1, 1, 1, 2], &device);
/// assert!(attention_softmax(scores, 0.5, Some(wrong)).is_err());
/// # Ok::<(), blip_core::Error>(())
/// ```
pub fn attention_softmax(
    scores: Tensor<4>,
    scale: f64,
    bias: Option<Tensor<4>>,
) -> crate::Result<Tensor<4>> {
    if let Some(b) = &bias {
        let fits = b
            .dims()
            .iter()
            .zip(scores.dims())
            .all(|(&b, s)| b == s || b == 1);
        let expected = format!("broadcastable to {:?}", scores.dims());
        check_shape("bias", &expected, &b.dims(), fits)?;
    }
    #[cfg(feature = "flex")]
    let (scores, bias) = match flex::attention_softmax(scores, scale, bias) {
        Ok(y) => return Ok(y),
        Err(inputs) => inputs,
    };
    // In f32 for half-precision scores: the row sum of a long row loses digits in f16.
    Ok(precision::in_f32(scores, |scores| {
        let z = scores * scale;
        let z = match bias {
            Some(bias) => z + precision::to_f32(bias),
            None => z,
        };
        activation::softmax(z, 3)
    }))
}

/// Exact (erf) GELU, `x · Φ(x)`, element-wise.
///
/// ```
/// use blip_core::fused::gelu;
/// use burn::tensor::{Device, Tensor};
///
/// let x = Tensor::<1>::from_floats([-1.0, 0.0, 1.0], &Device::flex());
/// let y: Vec<f32> = gelu(x).into_data().to_vec().unwrap();
/// // Φ(1) = 0.841345, Φ(−1) = 0.158655.
/// assert!((y[2] - 0.841_345).abs() < 1e-6 && (y[0] + 0.158_655).abs() < 1e-6);
/// ```
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    // Plain flex: in place, without a backward pass to save the input for.
    #[cfg(feature = "flex")]
    let x = match crate::kernels::gelu(x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "flex")]
    let x = match flex::gelu(x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    activation::gelu(x)
}

/// `norm` applied to `x` over its last dimension, with `norm`'s epsilon `eps` (burn keeps a
/// `LayerNorm`'s epsilon private, so the model passes its config's).
///
/// An `x` whose last dimension is not `norm`'s width is an
/// [`Error::InputShape`](crate::Error::InputShape).
///
/// ```
/// use blip_core::fused::layer_norm;
/// use burn::nn::LayerNormConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let norm = LayerNormConfig::new(4).with_epsilon(1e-12).init(&device);
/// let x = Tensor::<2>::from_floats([[1.0, 2.0, 3.0, 4.0]], &device);
/// let y: Vec<f32> = layer_norm(&norm, x, 1e-12)?.into_data().to_vec().unwrap();
/// // Mean 2.5, variance 1.25: (x − 2.5) / √1.25.
/// assert!((y[0] + 1.341_641).abs() < 1e-5 && (y[3] - 1.341_641).abs() < 1e-5);
/// assert!(layer_norm(&norm, Tensor::<2>::zeros([1, 3], &device), 1e-12).is_err());
/// # Ok::<(), blip_core::Error>(())
/// ```
pub fn layer_norm<const D: usize>(
    norm: &LayerNorm,
    x: Tensor<D>,
    eps: f64,
) -> crate::Result<Tensor<D>> {
    let [width] = norm.gamma.val().dims();
    let dims = x.dims();
    check_shape(
        "x",
        &format!("[.., {width}]"),
        &dims,
        dims.last() == Some(&width),
    )?;
    // Only the fused path reads `eps`: burn's LayerNorm keeps its own.
    #[cfg(not(feature = "flex"))]
    let _ = eps;
    #[cfg(feature = "flex")]
    let x = match flex::layer_norm(norm, x, eps) {
        Ok(y) => return Ok(y),
        Err(x) => x,
    };
    if !precision::is_half(x.dtype()) {
        return Ok(norm.forward(x));
    }
    // Half precision: burn's own LayerNorm, on an f32 copy of its parameters, in f32.
    let norm = precision::cast_module(norm.clone(), FloatDType::F32);
    Ok(precision::in_f32(x, |x| norm.forward(x)))
}

#[cfg(feature = "flex")]
mod flex {
    //! The fused path: a backend extension with a flex implementation (forward only) and,
    //! with the `autodiff` feature, one for autodiff over flex with the backward passes.

    // `Ok` and `Err` are both tensors: boxing the error would save nothing.
    #![allow(clippy::result_large_err)]

    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Dispatch, Flex, backend_extension};
    use burn::nn::{LayerNorm, Linear};
    use burn::tensor::{DType, Device, Tensor};
    use rayon::prelude::*;

    use crate::kernels::{
        View, attention_qkv, flex_from_values as tensor, flex_owned as owned,
        flex_values as values, gelu_slice, matmul, multiversion, softmax_rows,
    };
    use gemm::Parallelism;

    /// The fused ops on burn's primitives. Flex runs them forward; autodiff over flex adds
    /// their backward passes. Only flex devices are routed here (see [`is_flex_f32`]).
    #[backend_extension(Flex, Autodiff: cfg(feature = "autodiff"))]
    pub trait FusedOps: burn::backend::Backend {
        /// `x·W + b` for `x: [N, D_in]`, `W: [D_in, D_out]`, `b: [D_out]`.
        fn fused_linear(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            bias: FloatTensor<Self>,
        ) -> FloatTensor<Self>;
        /// Unmasked self-attention of `qkv` (`[B, T, 3·D]`) with `heads` heads.
        fn fused_self_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;
        /// `softmax(scale · scores + bias)` over the last dimension, `bias` broadcast (a
        /// `[1, …, 1]` zero where there is none).
        fn fused_softmax(
            scores: FloatTensor<Self>,
            bias: FloatTensor<Self>,
            scale: f64,
        ) -> FloatTensor<Self>;
        /// Exact GELU.
        fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
        /// LayerNorm over the last dimension.
        fn fused_layer_norm(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            eps: f64,
        ) -> FloatTensor<Self>;
    }

    /// Whether the fused path takes tensors of `device` and `dtype`: flex in f32, and under
    /// autodiff only when this crate routes autodiff tensors to its backward passes.
    fn is_flex_f32(device: &Device, dtype: DType) -> bool {
        // An autodiff device compares equal to its inner device.
        *device == Device::flex()
            && dtype == DType::F32
            && (cfg!(feature = "autodiff") || !device.is_autodiff())
    }

    pub(super) fn linear(linear: &Linear, x: Tensor<2>) -> Result<Tensor<2>, Tensor<2>> {
        // The caller has checked `x`'s width against the weight's.
        let weight = linear.weight.val();
        let [_, out] = weight.dims();
        let bias = match &linear.bias {
            Some(bias) => bias.val(),
            None => Tensor::zeros([out], &weight.device()),
        };
        let autodiff = x.device().is_autodiff();
        let fits =
            |device: &Device, dtype| is_flex_f32(device, dtype) && device.is_autodiff() == autodiff;
        if !fits(&x.device(), x.dtype())
            || !fits(&weight.device(), weight.dtype())
            || !fits(&bias.device(), bias.dtype())
            || bias.dims() != [out]
        {
            return Err(x);
        }
        Ok(Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
        )))
    }

    pub(super) fn self_attention(qkv: Tensor<3>, heads: usize) -> Result<Tensor<3>, Tensor<3>> {
        // The caller has checked the width against `heads`.
        if !is_flex_f32(&qkv.device(), qkv.dtype()) {
            return Err(qkv);
        }
        Ok(Tensor::from_dispatch(
            <Dispatch as FusedOps>::fused_self_attention(qkv.into_dispatch(), heads),
        ))
    }

    pub(super) fn attention_softmax(
        scores: Tensor<4>,
        scale: f64,
        bias: Option<Tensor<4>>,
    ) -> Result<Tensor<4>, (Tensor<4>, Option<Tensor<4>>)> {
        // The caller has checked that `bias` broadcasts against `scores`.
        let fits = |t: &Tensor<4>| is_flex_f32(&t.device(), t.dtype());
        if !fits(&scores) || !bias.as_ref().is_none_or(fits) {
            return Err((scores, bias));
        }
        let bias = bias.unwrap_or_else(|| Tensor::zeros([1; 4], &scores.device()));
        let out = <Dispatch as FusedOps>::fused_softmax(
            scores.into_dispatch(),
            bias.into_dispatch(),
            scale,
        );
        Ok(Tensor::from_dispatch(out))
    }

    pub(super) fn gelu<const D: usize>(x: Tensor<D>) -> Result<Tensor<D>, Tensor<D>> {
        if !is_flex_f32(&x.device(), x.dtype()) {
            return Err(x);
        }
        Ok(Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(
            x.into_dispatch(),
        )))
    }

    pub(super) fn layer_norm<const D: usize>(
        norm: &LayerNorm,
        x: Tensor<D>,
        eps: f64,
    ) -> Result<Tensor<D>, Tensor<D>> {
        let gamma = norm.gamma.val();
        let Some(beta) = norm.beta.as_ref().map(|b| b.val()) else {
            return Err(x);
        };
        let d = x.dims().last().copied().unwrap_or(0);
        let params_fit = [&gamma, &beta]
            .iter()
            .all(|p| p.dims() == [d] && is_flex_f32(&p.device(), p.dtype()));
        if !is_flex_f32(&x.device(), x.dtype()) || !params_fit {
            return Err(x);
        }
        Ok(Tensor::from_dispatch(
            <Dispatch as FusedOps>::fused_layer_norm(
                x.into_dispatch(),
                gamma.into_dispatch(),
                beta.into_dispatch(),
                eps,
            ),
        ))
    }

    impl FusedOps for Flex {
        fn fused_self_attention(qkv: FlexTensor, heads: usize) -> FlexTensor {
            self_attention_forward(&qkv, heads, false).0
        }

        fn fused_linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
            linear_forward(&x, &weight, &bias)
        }

        fn fused_softmax(scores: FlexTensor, bias: FlexTensor, scale: f64) -> FlexTensor {
            softmax_forward(&scores, &bias, scale as f32)
        }

        fn fused_gelu(x: FlexTensor) -> FlexTensor {
            let (shape, mut y) = owned(x);
            y.par_chunks_mut(CHUNK).for_each(gelu_slice);
            tensor(y, shape)
        }

        fn fused_layer_norm(
            x: FlexTensor,
            gamma: FlexTensor,
            beta: FlexTensor,
            eps: f64,
        ) -> FlexTensor {
            layer_norm_forward(&x, &gamma, &beta, eps).0
        }
    }

    /// Elements per parallel task of the element-wise kernels.
    const CHUNK: usize = 1 << 14;

    /// Row-major strides of `shape`, 0 along the dimensions of size 1 (a broadcast operand).
    fn broadcast_strides(shape: &[usize]) -> Vec<usize> {
        let mut strides = vec![0; shape.len()];
        let mut step = 1;
        for (s, &n) in strides.iter_mut().zip(shape).rev() {
            *s = if n == 1 { 0 } else { step };
            step *= n;
        }
        strides
    }

    /// The context `[B, T, D]` of `qkv` (`[B, T, 3·D]`) and, when `keep`, the probabilities
    /// `[B·H, T, T]` for the backward pass.
    fn self_attention_forward(
        qkv: &FlexTensor,
        heads: usize,
        keep: bool,
    ) -> (FlexTensor, Option<FlexTensor>) {
        let (b, t, d) = (qkv.shape()[0], qkv.shape()[1], qkv.shape()[2] / 3);
        let values = values(qkv);
        let mut out = vec![0.0f32; b * t * d];
        let mut probs = keep.then(|| vec![0.0f32; b * heads * t * t]);
        let dims = (b, t, heads, d / heads);
        attention_qkv(&values, dims, &mut out, probs.as_deref_mut());
        (
            tensor(out, vec![b, t, d]),
            probs.map(|p| tensor(p, vec![b * heads, t, t])),
        )
    }

    /// `x·W + b`: the rows of `b`, then one GEMM accumulated onto them.
    fn linear_forward(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> FlexTensor {
        let (n, d, out) = (x.shape()[0], x.shape()[1], weight.shape()[1]);
        let (x, w) = (values(x), values(weight));
        let mut y = values(bias).repeat(n);
        if n * d * out > 0 {
            // SAFETY: y is [n, out], x [n, d] and w [d, out], each contiguous and row-major.
            unsafe {
                matmul(
                    (n, out, d),
                    y.as_mut_ptr(),
                    out,
                    View::rows(x.as_ptr(), d),
                    View::rows(w.as_ptr(), out),
                    1.0,
                    true,
                    Parallelism::Rayon(0),
                );
            }
        }
        tensor(y, vec![n, out])
    }

    fn softmax_forward(scores: &FlexTensor, bias: &FlexTensor, scale: f32) -> FlexTensor {
        let shape = scores.shape().to_vec();
        let len = shape.last().copied().unwrap_or(1).max(1);
        let mut z = values(scores).into_owned();
        let strides = broadcast_strides(&bias.shape().to_vec());
        let bias = values(bias);
        // The row's position in the leading dimensions, for the bias's broadcast strides.
        let lead = &shape[..shape.len().saturating_sub(1)];
        let rows_per_task = (CHUNK / len).max(1);
        z.par_chunks_mut(rows_per_task * len)
            .enumerate()
            .for_each(|(task, block)| {
                for (i, row) in block.chunks_exact_mut(len).enumerate() {
                    let mut r = task * rows_per_task + i;
                    let mut at = 0;
                    for (&n, &s) in lead.iter().zip(&strides).rev() {
                        at += (r % n) * s;
                        r /= n;
                    }
                    scale_add(row, scale, &bias, at, strides[lead.len()]);
                    softmax_rows(row, len);
                }
            });
        tensor(z, shape)
    }

    multiversion! {
        /// `z = scale·z + b[at + i·step]`.
        fn scale_add(z: &mut [f32], scale: f32, b: &[f32], at: usize, step: usize) {
            if step == 1 {
                let n = z.len();
                for (z, &b) in z.iter_mut().zip(&b[at..at + n]) {
                    *z = *z * scale + b;
                }
            } else {
                for (i, z) in z.iter_mut().enumerate() {
                    *z = *z * scale + b[at + i * step];
                }
            }
        }
    }

    /// `y = x̂ ⊙ γ + β` with `x̂` and `r = 1/√(σ² + ε)` per row, which backward reuses.
    fn layer_norm_forward(
        x: &FlexTensor,
        gamma: &FlexTensor,
        beta: &FlexTensor,
        eps: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = x.shape().to_vec();
        let d = shape.last().copied().unwrap_or(1).max(1);
        let (gamma, beta) = (values(gamma), values(beta));
        let mut xhat = values(x).into_owned();
        let mut y = vec![0.0f32; xhat.len()];
        let mut rstd = vec![0.0f32; xhat.len() / d];
        let rows_per_task = (CHUNK / d).max(1);
        xhat.par_chunks_mut(rows_per_task * d)
            .zip(y.par_chunks_mut(rows_per_task * d))
            .zip(rstd.par_chunks_mut(rows_per_task))
            .for_each(|((xhat, y), rstd)| {
                for ((xhat, y), rstd) in xhat
                    .chunks_exact_mut(d)
                    .zip(y.chunks_exact_mut(d))
                    .zip(rstd)
                {
                    *rstd = normalize_row(xhat, y, &gamma, &beta, eps);
                }
            });
        let rows = shape[..shape.len() - 1].to_vec();
        (
            tensor(y, shape.clone()),
            tensor(xhat, shape),
            tensor(rstd, rows),
        )
    }

    multiversion! {
        /// Turns the row `x` into `x̂` in place, writes `y = x̂ ⊙ γ + β`, returns `r`. The
        /// moments are summed in f64: BERT's ε of 10⁻¹² leaves f32 no margin.
        fn normalize_row(x: &mut [f32], y: &mut [f32], gamma: &[f32], beta: &[f32], eps: f64) -> f32 {
            let n = x.len() as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            let mean = mean as f32;
            for (((x, y), &g), &b) in x.iter_mut().zip(y.iter_mut()).zip(gamma).zip(beta) {
                *x = (*x - mean) * rstd;
                *y = *x * g + b;
            }
            rstd
        }
    }

    #[cfg(feature = "autodiff")]
    mod backward {
        //! The backward passes, on autodiff over flex.

        use burn::backend::Flex;
        use burn::backend::TensorMetadata;
        use burn::backend::autodiff::Autodiff;
        use burn::backend::autodiff::checkpoint::base::Checkpointer;
        use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
        use burn::backend::autodiff::grads::Gradients;
        use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
        use burn::backend::flex::FlexTensor;
        use burn::backend::tensor::FloatTensor;
        use rayon::prelude::*;

        use super::{
            CHUNK, FusedOps, layer_norm_forward, linear_forward, owned, self_attention_forward,
            softmax_forward, tensor, values,
        };
        use crate::kernels::{SendPtr, View, add_column_sums, erf, exp, matmul, multiversion};
        use gemm::Parallelism;

        impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
            fn fused_self_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
                let (qkv, guard) = qkv.into_parts();
                match SelfAttentionBackward
                    .prepare::<C>([guard])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        let (y, probs) = self_attention_forward(&qkv, heads, true);
                        let probs = probs.expect("kept when asked for");
                        prep.finish((qkv, probs, heads), y)
                    }
                    OpsKind::UnTracked(prep) => {
                        prep.finish(self_attention_forward(&qkv, heads, false).0)
                    }
                }
            }

            fn fused_linear(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                bias: FloatTensor<Self>,
            ) -> FloatTensor<Self> {
                let (x, gx) = x.into_parts();
                let (weight, gw) = weight.into_parts();
                let (bias, gb) = bias.into_parts();
                let y = linear_forward(&x, &weight, &bias);
                match LinearBackward
                    .prepare::<C>([gx, gw, gb])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => prep.finish((x, weight), y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            }

            fn fused_softmax(
                scores: FloatTensor<Self>,
                bias: FloatTensor<Self>,
                scale: f64,
            ) -> FloatTensor<Self> {
                if bias.is_tracked() {
                    return composed_softmax::<Self>(scores, bias, scale);
                }
                let bias = bias.into_primitive();
                let (scores, guard) = scores.into_parts();
                match SoftmaxBackward
                    .prepare::<C>([guard])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        let y = softmax_forward(&scores, &bias, scale as f32);
                        prep.finish((y.clone(), scale as f32), y)
                    }
                    OpsKind::UnTracked(prep) => {
                        prep.finish(softmax_forward(&scores, &bias, scale as f32))
                    }
                }
            }

            fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
                let (x, guard) = x.into_parts();
                match GeluBackward
                    .prepare::<C>([guard])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        let y = Flex::fused_gelu(x.clone());
                        prep.finish(x, y)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(Flex::fused_gelu(x)),
                }
            }

            fn fused_layer_norm(
                x: FloatTensor<Self>,
                gamma: FloatTensor<Self>,
                beta: FloatTensor<Self>,
                eps: f64,
            ) -> FloatTensor<Self> {
                let (x, gx) = x.into_parts();
                let (gamma, gg) = gamma.into_parts();
                let (beta, gb) = beta.into_parts();
                let (y, xhat, rstd) = layer_norm_forward(&x, &gamma, &beta, eps);
                match LayerNormBackward
                    .prepare::<C>([gx, gg, gb])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => prep.finish((xhat, rstd, gamma), y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            }
        }

        /// burn's ops on any backend `B`, for a bias that needs its own gradient.
        fn composed_softmax<B: burn::backend::Backend>(
            scores: FloatTensor<B>,
            bias: FloatTensor<B>,
            scale: f64,
        ) -> FloatTensor<B> {
            let z = B::float_add(B::float_mul_scalar(scores, scale.into()), bias);
            let last = z.shape().num_dims() - 1;
            B::softmax(z, last)
        }

        #[derive(Debug)]
        struct LinearBackward;

        impl Backward<Flex, 3> for LinearBackward {
            /// The input and the weight.
            type State = (FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, weight) = ops.state;
                let g = grads.consume::<Flex>(&ops.node);
                let [px, pw, pb] = ops.parents;
                let (n, d, out) = (x.shape()[0], x.shape()[1], weight.shape()[1]);
                let g = values(&g);
                let any = n * d * out > 0;
                if let Some(node) = px {
                    let w = values(&weight);
                    let mut dx = vec![0.0f32; n * d];
                    if any {
                        // SAFETY: dx is [n, d], g [n, out], w [d, out] read as Wᵀ through
                        // swapped strides; all contiguous.
                        unsafe {
                            matmul(
                                (n, d, out),
                                dx.as_mut_ptr(),
                                d,
                                View::rows(g.as_ptr(), out),
                                View::transposed(w.as_ptr(), out),
                                1.0,
                                false,
                                Parallelism::Rayon(0),
                            );
                        }
                    }
                    grads.register::<Flex>(node.id, tensor(dx, vec![n, d]));
                }
                if let Some(node) = pw {
                    let x = values(&x);
                    let mut dw = vec![0.0f32; d * out];
                    if any {
                        // SAFETY: dw is [d, out], x [n, d] read as xᵀ through swapped
                        // strides, g [n, out]; all contiguous.
                        unsafe {
                            matmul(
                                (d, out, n),
                                dw.as_mut_ptr(),
                                out,
                                View::transposed(x.as_ptr(), d),
                                View::rows(g.as_ptr(), out),
                                1.0,
                                false,
                                Parallelism::Rayon(0),
                            );
                        }
                    }
                    grads.register::<Flex>(node.id, tensor(dw, vec![d, out]));
                }
                if let Some(node) = pb {
                    let mut db = vec![0.0f32; out];
                    add_column_sums(&mut db, &g);
                    grads.register::<Flex>(node.id, tensor(db, vec![out]));
                }
            }
        }

        #[derive(Debug)]
        struct SelfAttentionBackward;

        impl Backward<Flex, 1> for SelfAttentionBackward {
            /// `qkv`, the probabilities `[B·H, T, T]` and the number of heads.
            type State = (FlexTensor, FlexTensor, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (qkv, probs, heads) = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
                    let shape = qkv.shape().to_vec();
                    let (b, t, d3) = (shape[0], shape[1], shape[2]);
                    let (qkv, probs, g) = (values(&qkv), values(&probs), values(&g));
                    let mut dqkv = vec![0.0f32; b * t * d3];
                    self_attention_backward(&qkv, &probs, &g, (b, t, heads), &mut dqkv);
                    tensor(dqkv, shape)
                });
            }
        }

        /// `∂qkv` of unmasked self-attention, each head on its own columns: `∂v = Pᵀ·g`,
        /// `S = scale · P ⊙ (g·vᵀ − Σ_row P⊙(g·vᵀ))`, `∂q = S·k`, `∂k = Sᵀ·q`.
        fn self_attention_backward(
            qkv: &[f32],
            probs: &[f32],
            g: &[f32],
            (batch, t, heads): (usize, usize, usize),
            dqkv: &mut [f32],
        ) {
            let d = qkv.len() / (batch * t * 3).max(1);
            let hd = d / heads;
            let scale = 1.0 / (hd as f32).sqrt();
            let row = 3 * d;
            assert_eq!(probs.len(), batch * heads * t * t);
            assert_eq!((g.len(), dqkv.len()), (batch * t * d, qkv.len()));
            let dqkv = SendPtr(dqkv.as_mut_ptr());
            (0..batch * heads).into_par_iter().for_each_init(
                || vec![0.0f32; t * t],
                |ds, job| {
                    let (b, h) = (job / heads, job % heads);
                    let p = &probs[job * t * t..][..t * t];
                    let head = b * t * row + h * hd;
                    let (q, k, v) = (&qkv[head..], &qkv[head + d..], &qkv[head + 2 * d..]);
                    let g = &g[b * t * d + h * hd..];
                    // SAFETY: every operand is T rows of hd values inside its buffer (rows
                    // 3·D apart in `qkv` and `dqkv`, D apart in `g`, T apart in `p` and
                    // `ds`), and this job alone writes its head's columns of `dqkv`.
                    unsafe {
                        let dq = dqkv.get().add(head);
                        matmul(
                            (t, t, hd),
                            ds.as_mut_ptr(),
                            t,
                            View::rows(g.as_ptr(), d),
                            View::transposed(v.as_ptr(), row),
                            1.0,
                            false,
                            Parallelism::None,
                        );
                        for (ds, p) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                            softmax_row_backward(ds, p, scale);
                        }
                        matmul(
                            (t, hd, t),
                            dq,
                            row,
                            View::rows(ds.as_ptr(), t),
                            View::rows(k.as_ptr(), row),
                            1.0,
                            false,
                            Parallelism::None,
                        );
                        matmul(
                            (t, hd, t),
                            dq.add(d),
                            row,
                            View::transposed(ds.as_ptr(), t),
                            View::rows(q.as_ptr(), row),
                            1.0,
                            false,
                            Parallelism::None,
                        );
                        matmul(
                            (t, hd, t),
                            dq.add(2 * d),
                            row,
                            View::transposed(p.as_ptr(), t),
                            View::rows(g.as_ptr(), d),
                            1.0,
                            false,
                            Parallelism::None,
                        );
                    }
                },
            );
        }

        #[derive(Debug)]
        struct SoftmaxBackward;

        impl Backward<Flex, 1> for SoftmaxBackward {
            /// The probabilities and the scale.
            type State = (FlexTensor, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (y, scale) = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
                    let shape = y.shape().to_vec();
                    let len = shape.last().copied().unwrap_or(1).max(1);
                    let (_, mut g) = owned(g);
                    let y = values(&y);
                    let rows = (CHUNK / len).max(1) * len;
                    g.par_chunks_mut(rows)
                        .zip(y.par_chunks(rows))
                        .for_each(|(g, y)| {
                            for (g, y) in g.chunks_exact_mut(len).zip(y.chunks_exact(len)) {
                                softmax_row_backward(g, y, scale);
                            }
                        });
                    tensor(g, shape)
                });
            }
        }

        multiversion! {
            /// `g = scale · y ⊙ (g − Σ g⊙y)` for one row.
            fn softmax_row_backward(g: &mut [f32], y: &[f32], scale: f32) {
                let dot: f32 = g.iter().zip(y).map(|(&g, &y)| g * y).sum();
                for (g, &y) in g.iter_mut().zip(y) {
                    *g = scale * y * (*g - dot);
                }
            }
        }

        #[derive(Debug)]
        struct GeluBackward;

        impl Backward<Flex, 1> for GeluBackward {
            /// The input.
            type State = FlexTensor;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let x = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
                    let (shape, mut g) = owned(g);
                    let x = values(&x);
                    g.par_chunks_mut(CHUNK)
                        .zip(x.par_chunks(CHUNK))
                        .for_each(|(g, x)| gelu_backward_slice(g, x));
                    tensor(g, shape)
                });
            }
        }

        multiversion! {
            /// `g = g ⊙ (Φ(x) + x·φ(x))`.
            fn gelu_backward_slice(g: &mut [f32], x: &[f32]) {
                // 1/√(2π)
                const INV_SQRT_2PI: f32 = 0.398_942_3;
                for (g, &x) in g.iter_mut().zip(x) {
                    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
                    *g *= cdf + x * pdf;
                }
            }
        }

        #[derive(Debug)]
        struct LayerNormBackward;

        impl Backward<Flex, 3> for LayerNormBackward {
            /// `x̂`, `r` per row, and `γ`.
            type State = (FlexTensor, FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (xhat, rstd, gamma) = ops.state;
                let g = grads.consume::<Flex>(&ops.node);
                let [px, pgamma, pbeta] = ops.parents;
                let shape = xhat.shape().to_vec();
                let d = shape.last().copied().unwrap_or(1).max(1);
                let (g, xhat, rstd, gamma) =
                    (values(&g), values(&xhat), values(&rstd), values(&gamma));
                let rows = (CHUNK / d).max(1);
                if let Some(node) = px {
                    let mut dx = vec![0.0f32; g.len()];
                    dx.par_chunks_mut(rows * d)
                        .zip(g.par_chunks(rows * d))
                        .zip(xhat.par_chunks(rows * d))
                        .zip(rstd.par_chunks(rows))
                        .for_each(|(((dx, g), xhat), rstd)| {
                            for (((dx, g), xhat), &r) in dx
                                .chunks_exact_mut(d)
                                .zip(g.chunks_exact(d))
                                .zip(xhat.chunks_exact(d))
                                .zip(rstd)
                            {
                                layer_norm_row_backward(dx, g, xhat, &gamma, r);
                            }
                        });
                    grads.register::<Flex>(node.id, tensor(dx, shape.clone()));
                }
                if pgamma.is_none() && pbeta.is_none() {
                    return;
                }
                // Σ over rows of g⊙x̂ and of g: per task, then added up.
                let (dgamma, dbeta) = g
                    .par_chunks(rows * d)
                    .zip(xhat.par_chunks(rows * d))
                    .map(|(g, xhat)| {
                        let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
                        for (g, xhat) in g.chunks_exact(d).zip(xhat.chunks_exact(d)) {
                            accumulate_param_grads(&mut dgamma, &mut dbeta, g, xhat);
                        }
                        (dgamma, dbeta)
                    })
                    .reduce(
                        || (vec![0.0f32; d], vec![0.0f32; d]),
                        |(mut a, mut b), (c, e)| {
                            a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
                            b.iter_mut().zip(&e).for_each(|(b, e)| *b += e);
                            (a, b)
                        },
                    );
                if let Some(node) = pgamma {
                    grads.register::<Flex>(node.id, tensor(dgamma, vec![d]));
                }
                if let Some(node) = pbeta {
                    grads.register::<Flex>(node.id, tensor(dbeta, vec![d]));
                }
            }
        }

        multiversion! {
            /// `dx = r·(g̃ − mean(g̃) − x̂·mean(g̃⊙x̂))`, `g̃ = g⊙γ`, for one row.
            fn layer_norm_row_backward(dx: &mut [f32], g: &[f32], xhat: &[f32], gamma: &[f32], r: f32) {
                let n = g.len() as f32;
                let (mut sum, mut dot) = (0.0f32, 0.0f32);
                for ((&g, &xh), &ga) in g.iter().zip(xhat).zip(gamma) {
                    sum += g * ga;
                    dot += g * ga * xh;
                }
                let (mean, mean_dot) = (sum / n, dot / n);
                for (((dx, &g), &xh), &ga) in dx.iter_mut().zip(g).zip(xhat).zip(gamma) {
                    *dx = r * (g * ga - mean - xh * mean_dot);
                }
            }
        }

        multiversion! {
            /// `∂γ += g⊙x̂`, `∂β += g` for one row.
            fn accumulate_param_grads(dgamma: &mut [f32], dbeta: &mut [f32], g: &[f32], xhat: &[f32]) {
                for (((dg, db), &g), &xh) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(g).zip(xhat) {
                    *dg += g * xh;
                    *db += g;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each fused op against burn's own ops (values and gradients, on autodiff over flex)
    //! and its gradient against central finite differences.

    use approx::assert_abs_diff_eq;
    use burn::module::Module;
    use burn::nn::{LayerNormConfig, LinearConfig};
    use burn::tensor::{Device, Tensor, TensorData, activation};

    use super::*;
    use crate::test_util::{uniform, values};

    fn autodiff() -> Device {
        let device = Device::flex().autodiff();
        // The workspace's training crate turns on `autodiff`, so these tests take the fused
        // backward passes, not burn's ops twice.
        assert_eq!(has_backward(&device), cfg!(feature = "autodiff"));
        device
    }

    fn assert_close(what: &str, got: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(got.len(), expected.len(), "{what}");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!(
                (g - e).abs() <= tolerance * e.abs().max(1.0),
                "{what}[{i}]: {g} against {e}"
            );
        }
    }

    /// `Σ f(x) ⊙ w` against its gradient at a few elements of `x`, by central differences
    /// with step `h` (in f32: the error is about `h²·f‴ + 1e-7·|L|/h`).
    fn check_finite_differences<const D: usize>(
        f: impl Fn(Tensor<D>) -> Tensor<D>,
        x: Tensor<D>,
        w: Tensor<D>,
        grad: &[f32],
        h: f32,
    ) {
        let plain = |t: Tensor<D>| Tensor::<D>::from_data(t.into_data(), &Device::flex());
        let (x, w) = (plain(x), plain(w));
        let shape = x.dims();
        let base = values(x.clone());
        let loss = |v: Vec<f32>| -> f64 {
            let y = f(Tensor::from_data(
                TensorData::new(v, shape),
                &Device::flex(),
            ));
            values(y * w.clone()).iter().map(|&v| v as f64).sum()
        };
        let step = (base.len() / 7).max(1);
        for i in (0..base.len()).step_by(step) {
            let (mut up, mut down) = (base.clone(), base.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(up) - loss(down)) / (2.0 * h as f64);
            assert_abs_diff_eq!(fd, grad[i] as f64, epsilon = 2e-3);
        }
    }

    #[test]
    fn linear_matches_burn_and_finite_differences() {
        let device = autodiff();
        // Widths that are not multiples of the GEMM's register blocks.
        let (n, d, out) = (5, 37, 11);
        for bias in [true, false] {
            let mut layer = LinearConfig::new(d, out).with_bias(bias).init(&device);
            layer.weight = layer
                .weight
                .map(|_| uniform(13, [d, out], -1.0, 1.0, &device).require_grad());
            layer.bias = layer
                .bias
                .map(|b| b.map(|_| uniform(14, [out], -1.0, 1.0, &device).require_grad()));
            let x0 = uniform(15, [n, d], -2.0, 2.0, &device);
            let w = uniform(16, [n, out], -1.0, 1.0, &device);
            let x = x0.clone().require_grad();
            let y = linear(&layer, x.clone()).unwrap();
            let grads = (y.clone() * w.clone()).sum().backward();
            let reference_x = x0.clone().require_grad();
            let reference = layer.forward(reference_x.clone());
            let reference_grads = (reference.clone() * w.clone()).sum().backward();
            assert_close("y", &values(y), &values(reference), 1e-5);
            let grad = values(x.grad(&grads).unwrap());
            let reference_grad = values(reference_x.grad(&reference_grads).unwrap());
            assert_close("∂x", &grad, &reference_grad, 1e-5);
            let weight = layer.weight.val();
            let mut params = vec![(
                "∂W",
                values(weight.grad(&grads).unwrap()),
                values(weight.grad(&reference_grads).unwrap()),
            )];
            if let Some(b) = &layer.bias {
                let b = b.val();
                let got = values(b.grad(&grads).unwrap());
                params.push(("∂b", got, values(b.grad(&reference_grads).unwrap())));
            }
            assert_eq!(params.len(), 1 + bias as usize);
            for (what, got, expected) in params {
                assert_close(what, &got, &expected, 1e-5);
                assert!(got.iter().any(|&g| g != 0.0), "{what}");
            }
            let plain = layer.valid();
            let f = |x| linear(&plain, x).unwrap();
            check_finite_differences(f, x0, w, &grad, 1e-2);
        }
    }

    /// Self-attention from `[B, T, 3·D]` with burn's ops, as the ViT composes it elsewhere.
    fn composed_self_attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, t, d3] = qkv.dims();
        let hd = d3 / 3 / heads;
        let qkv = qkv.reshape([b, t, 3, heads, hd]).permute([2, 0, 3, 1, 4]);
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b, heads, t, hd]);
        let scores = part(0).matmul(part(1).swap_dims(2, 3)) / (hd as f64).sqrt();
        let probs = activation::softmax(scores, 3);
        probs
            .matmul(part(2))
            .swap_dims(1, 2)
            .reshape([b, t, heads * hd])
    }

    #[test]
    fn self_attention_matches_burn_and_finite_differences() {
        let device = autodiff();
        // 2 images, 7 tokens, 3 heads of width 5.
        let (b, t, heads, hd) = (2, 7, 3, 5);
        let qkv0 = uniform(17, [b, t, 3 * heads * hd], -1.5, 1.5, &device);
        let w = uniform(18, [b, t, heads * hd], -1.0, 1.0, &device);
        let qkv = qkv0.clone().require_grad();
        let y = self_attention(qkv.clone(), heads).unwrap();
        let grads = (y.clone() * w.clone()).sum().backward();
        let reference_qkv = qkv0.clone().require_grad();
        let reference = composed_self_attention(reference_qkv.clone(), heads);
        let reference_grads = (reference.clone() * w.clone()).sum().backward();
        assert_close("y", &values(y), &values(reference), 1e-5);
        let grad = values(qkv.grad(&grads).unwrap());
        let reference_grad = values(reference_qkv.grad(&reference_grads).unwrap());
        assert_close("∂qkv", &grad, &reference_grad, 1e-5);
        // Every third of the columns (q, k and v) gets a gradient.
        let width = 3 * heads * hd;
        for part in 0..3 {
            let cols = part * heads * hd..(part + 1) * heads * hd;
            assert!(
                grad.chunks_exact(width)
                    .any(|r| r[cols.clone()].iter().any(|&g| g != 0.0))
            );
        }
        let f = |x| self_attention(x, heads).unwrap();
        check_finite_differences(f, qkv0, w, &grad, 1e-2);
    }

    #[test]
    fn attention_softmax_matches_burn_and_finite_differences() {
        let device = autodiff();
        let scale = 0.35;
        let scores = uniform(1, [2, 3, 4, 21], -3.0, 3.0, &device);
        // A padding mask [B, 1, 1, L_k] and a causal one [B, 1, L_q, L_k], as the text
        // model builds them.
        let mut padding = vec![0.0f32; 2 * 21];
        padding[21 + 17..].fill(-1e4);
        let padding = Tensor::<4>::from_data(TensorData::new(padding, [2, 1, 1, 21]), &device);
        let causal: Vec<f32> = (0..2 * 4 * 21)
            .map(|i| {
                if i % 21 > (i / 21) % 4 + 10 {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::<4>::from_data(TensorData::new(causal, [2, 1, 4, 21]), &device);
        let w = uniform(2, [2, 3, 4, 21], -1.0, 1.0, &device);
        for bias in [None, Some(padding), Some(causal)] {
            let x = scores.clone().require_grad();
            let y = attention_softmax(x.clone(), scale, bias.clone()).unwrap();
            let grads = (y.clone() * w.clone()).sum().backward();
            let grad = values(x.grad(&grads).unwrap());
            let reference_x = scores.clone().require_grad();
            let z = reference_x.clone() * scale;
            let z = bias
                .clone()
                .map_or(z.clone(), |b| z + b.expand([2, 3, 4, 21]));
            let reference = activation::softmax(z, 3);
            let reference_grads = (reference.clone() * w.clone()).sum().backward();
            assert_close("y", &values(y), &values(reference), 1e-6);
            let reference_grad = values(reference_x.grad(&reference_grads).unwrap());
            assert_close("∂scores", &grad, &reference_grad, 1e-6);
            let f = |x| attention_softmax(x, scale, bias.clone().map(|b| b.inner())).unwrap();
            check_finite_differences(f, scores.clone(), w.clone(), &grad, 1e-2);
        }
    }

    #[test]
    fn a_bias_that_needs_its_gradient_gets_it() {
        let device = autodiff();
        let scores = uniform(3, [1, 2, 3, 5], -2.0, 2.0, &device);
        let w = uniform(4, [1, 2, 3, 5], -1.0, 1.0, &device);
        let bias = uniform(5, [1, 2, 3, 5], -1.0, 1.0, &device).require_grad();
        let y = attention_softmax(scores.clone(), 0.5, Some(bias.clone())).unwrap();
        let grads = (y * w.clone()).sum().backward();
        let reference = activation::softmax(scores * 0.5 + bias.clone(), 3);
        let reference_grads = (reference * w).sum().backward();
        let grad = values(bias.grad(&grads).expect("the bias has a gradient"));
        assert_close(
            "∂bias",
            &grad,
            &values(bias.grad(&reference_grads).unwrap()),
            1e-6,
        );
        assert!(grad.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn a_row_with_every_key_hidden_gives_zeros_and_finite_gradients() {
        let device = autodiff();
        let x = uniform(6, [1, 1, 2, 4], -1.0, 1.0, &device).require_grad();
        let bias = Tensor::<4>::from_data(
            TensorData::new(vec![f32::NEG_INFINITY; 4], [1, 1, 1, 4]),
            &device,
        );
        let y = attention_softmax(x.clone(), 1.0, Some(bias)).unwrap();
        let grads = y.clone().sum().backward();
        assert_eq!(values(y), vec![0.0; 8]);
        assert!(
            values(x.grad(&grads).unwrap())
                .iter()
                .all(|g| g.is_finite())
        );
    }

    #[test]
    fn gelu_matches_burn_and_finite_differences() {
        let device = autodiff();
        // 3·7·37 elements: not a multiple of the 16-wide vectors.
        let x0 = uniform(7, [3, 7, 37], -5.0, 5.0, &device);
        let w = uniform(8, [3, 7, 37], -1.0, 1.0, &device);
        let x = x0.clone().require_grad();
        let y = gelu(x.clone());
        let grad = values(x.grad(&(y.clone() * w.clone()).sum().backward()).unwrap());
        let reference_x = x0.clone().require_grad();
        let reference = activation::gelu(reference_x.clone());
        let reference_grads = (reference.clone() * w.clone()).sum().backward();
        // erf to 5e-7 (see kernels::erf) against libm's.
        assert_close("y", &values(y), &values(reference), 2e-6);
        let reference_grad = values(reference_x.grad(&reference_grads).unwrap());
        assert_close("∂x", &grad, &reference_grad, 2e-6);
        check_finite_differences(gelu, x0, w, &grad, 1e-2);
    }

    #[test]
    fn layer_norm_matches_burn_and_finite_differences() {
        let device = autodiff();
        for (eps, d) in [(1e-12, 24), (1e-5, 37)] {
            let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init(&device);
            norm.gamma = norm
                .gamma
                .map(|_| uniform(9, [d], 0.5, 1.5, &device).require_grad());
            norm.beta = norm
                .beta
                .map(|b| b.map(|_| uniform(10, [d], -0.5, 0.5, &device).require_grad()));
            // Rows with a large mean, as residual streams have.
            let x0 = uniform(11, [4, 5, d], 2.0, 6.0, &device);
            let w = uniform(12, [4, 5, d], -1.0, 1.0, &device);
            let x = x0.clone().require_grad();
            let y = layer_norm(&norm, x.clone(), eps).unwrap();
            let grads = (y.clone() * w.clone()).sum().backward();
            let reference_x = x0.clone().require_grad();
            let reference = norm.forward(reference_x.clone());
            let reference_grads = (reference.clone() * w.clone()).sum().backward();
            assert_close("y", &values(y), &values(reference), 1e-5);
            let grad = values(x.grad(&grads).unwrap());
            let reference_grad = values(reference_x.grad(&reference_grads).unwrap());
            assert_close("∂x", &grad, &reference_grad, 1e-5);
            let (gamma, beta) = (norm.gamma.val(), norm.beta.as_ref().unwrap().val());
            for (what, p) in [("∂γ", gamma), ("∂β", beta)] {
                let got = values(p.grad(&grads).unwrap());
                let expected = values(p.grad(&reference_grads).unwrap());
                assert_close(what, &got, &expected, 1e-5);
            }
            let plain = norm.valid();
            let f = |x| layer_norm(&plain, x, eps).unwrap();
            check_finite_differences(f, x0, w, &grad, 1e-2);
        }
    }

    #[test]
    fn shape_mismatches_are_typed_errors() {
        let device = autodiff();
        let scores = Tensor::<4>::zeros([2, 3, 4, 5], &device);
        for bias in [[2, 3, 4, 4], [3, 1, 1, 5]] {
            let err = attention_softmax(scores.clone(), 1.0, Some(Tensor::zeros(bias, &device)));
            assert!(
                matches!(err, Err(crate::Error::InputShape { what: "bias", .. })),
                "{bias:?}"
            );
        }
        let norm = LayerNormConfig::new(8).init(&device);
        let err = layer_norm(&norm, Tensor::<3>::zeros([2, 3, 7], &device), 1e-5);
        assert!(matches!(
            err,
            Err(crate::Error::InputShape { what: "x", .. })
        ));
        let qkv = Tensor::<3>::zeros([1, 2, 12], &device);
        for heads in [0, 3, 5] {
            let err = self_attention(qkv.clone(), heads);
            assert!(
                matches!(err, Err(crate::Error::InputShape { what: "qkv", .. })),
                "{heads}"
            );
        }
        let layer = LinearConfig::new(8, 3).init(&device);
        let err = linear(&layer, Tensor::<2>::zeros([2, 7], &device));
        assert!(matches!(
            err,
            Err(crate::Error::InputShape { what: "x", .. })
        ));
    }
}
