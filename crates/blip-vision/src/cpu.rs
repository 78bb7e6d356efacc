//! Inference kernels for burn's flex (CPU) backend, where flex leaves time on the table.
//!
//! * **Attention**: flex tiles every head into 64-key blocks, each with two small GEMM calls
//!   and a scalar `exp`. [`self_attention`] reads q, k and v straight out of the fused `qkv`
//!   projection (no split, no permute), runs one score GEMM and one value GEMM per head
//!   (the `gemm` crate flex itself uses), with a softmax that vectorises, heads in parallel.
//! * **GELU**: flex evaluates `erf` with a scalar libm call on one thread. [`gelu`] uses a
//!   branch-free `erf` (|error| ≤ 5e-7 in f32) that vectorises, over all cores.
//! * **Products with few rows** (a decoding step): flex runs them on one thread, at one
//!   core's memory bandwidth, for a product that only streams its weight.
//!   [`linear_few_rows`] reads the weight in place and splits its rows over all cores.
//!
//! All take the tensor by value and give it back untouched (`Err`) where they do not apply:
//! another backend, an autodiff device (training keeps burn's differentiable ops), or a dtype
//! other than f32. On flex a uniquely owned tensor converts to and from host memory without
//! a copy, so the detour costs nothing.

// `Ok` and `Err` are both a tensor (or its values): boxing the error would save nothing.
#![allow(clippy::result_large_err)]

use burn::backend::Flex;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Runs `$body` compiled for AVX-512 when the CPU has it (so the loops vectorise 16 wide),
/// else as plain code.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn any($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    any($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512.
                    return unsafe { avx512($($arg),*) };
                }
            }
            any($($arg),*)
        }
    };
}

/// Whether `device` is flex without autodiff, where these kernels and flex-specific
/// scheduling apply. (An autodiff device compares equal to its inner device.)
pub fn is_plain_flex(device: &Device) -> bool {
    *device == Device::flex() && !device.is_autodiff()
}

/// Host `f32` values of `x` when it lives on the plain flex device; `x` back otherwise.
fn host_values<const D: usize>(x: Tensor<D>) -> Result<Vec<f32>, Tensor<D>> {
    if !is_plain_flex(&x.device()) || x.dtype() != burn::tensor::DType::F32 {
        return Err(x);
    }
    Ok(x.into_data()
        .try_into_vec::<f32>()
        .expect("an f32 tensor reads back as f32"))
}

fn flex_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), &Device::flex())
}

/// Multi-head self-attention without a mask, from a fused projection: `qkv` is
/// `[B, T, 3·D]` with columns `[q | k | v]` (heads inner), the result `[B, T, D]` with
/// `out[b, :, head] = softmax(q kᵀ / √(D/heads)) v` for that head's columns.
pub fn self_attention(qkv: Tensor<3>, heads: usize) -> Result<Tensor<3>, Tensor<3>> {
    let [b, t, d3] = qkv.dims();
    if heads == 0 || d3 % (3 * heads) != 0 {
        return Err(qkv);
    }
    let values = host_values(qkv)?;
    let d = d3 / 3;
    let mut out = vec![0.0f32; b * t * d];
    attention_qkv(&values, b, t, heads, d / heads, &mut out);
    Ok(flex_tensor(out, [b, t, d]))
}

/// Most rows [`linear_few_rows`] takes: each weight element is loaded once for all rows.
pub const FEW_ROWS: usize = 8;

/// `linear` applied to `x: [rows, d_in]` with at most [`FEW_ROWS`] rows, reading the weight
/// where flex stores it: each core takes a contiguous block of the weight's rows and the
/// partial products are summed.
pub fn linear_few_rows(linear: &Linear, x: Tensor<2>) -> Result<Tensor<2>, Tensor<2>> {
    let [rows, d] = x.dims();
    let weight = linear.weight.val();
    let [_, out] = weight.dims();
    if rows == 0 || rows > FEW_ROWS || !is_plain_flex(&weight.device()) {
        return Err(x);
    }
    let Some(weight) = f32_buffer(weight) else {
        return Err(x);
    };
    let bias = match linear.bias.as_ref().map(|bias| f32_buffer(bias.val())) {
        Some(None) => return Err(x),
        bias => bias.flatten(),
    };
    let w = weight.as_slice::<f32>().expect("checked by f32_buffer");
    let bias = bias
        .as_ref()
        .map(|b| b.as_slice::<f32>().expect("checked by f32_buffer"));
    let x = host_values(x)?;
    let threads = rayon::current_num_threads().clamp(1, d);
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let (k0, k1) = (d * t / threads, d * (t + 1) / threads);
            let mut y = vec![0.0f32; rows * out];
            accumulate_rows(&x, d, &w[k0 * out..k1 * out], k0, out, &mut y);
            y
        })
        .collect();
    let mut y = match bias {
        Some(bias) => bias.repeat(rows),
        None => vec![0.0; rows * out],
    };
    for partial in &partials {
        add_into(&mut y, partial);
    }
    Ok(flex_tensor(y, [rows, out]))
}

multiversion! {
    /// `y[r, :] += Σ_k x[r, k0 + k] · w[k, :]` over the `w.len() / out` weight rows given.
    /// Columns go a block at a time so that the rows of `y` stay in L1, and weight rows four
    /// at a time so that each `y` element is loaded and stored once per four.
    fn accumulate_rows(x: &[f32], d: usize, w: &[f32], k0: usize, out: usize, y: &mut [f32]) {
        const BLOCK: usize = 1024;
        let k_rows = w.len() / out;
        for c0 in (0..out).step_by(BLOCK) {
            let c1 = (c0 + BLOCK).min(out);
            let mut k = 0;
            while k + 4 <= k_rows {
                let w_at = |i: usize| &w[(k + i) * out + c0..(k + i) * out + c1];
                let (w0, w1, w2, w3) = (w_at(0), w_at(1), w_at(2), w_at(3));
                for (x_row, y_row) in x.chunks_exact(d).zip(y.chunks_exact_mut(out)) {
                    let a = &x_row[k0 + k..k0 + k + 4];
                    let y_block = &mut y_row[c0..c1];
                    for j in 0..y_block.len() {
                        y_block[j] += a[0] * w0[j] + a[1] * w1[j] + a[2] * w2[j] + a[3] * w3[j];
                    }
                }
                k += 4;
            }
            for k in k..k_rows {
                let w_block = &w[k * out + c0..k * out + c1];
                for (x_row, y_row) in x.chunks_exact(d).zip(y.chunks_exact_mut(out)) {
                    let a = x_row[k0 + k];
                    for (y, &w) in y_row[c0..c1].iter_mut().zip(w_block) {
                        *y += a * w;
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `y += z`.
    fn add_into(y: &mut [f32], z: &[f32]) {
        for (y, &z) in y.iter_mut().zip(z) {
            *y += z;
        }
    }
}

/// The flex buffer of a contiguous f32 tensor, borrowed in place (no copy).
fn f32_buffer<const D: usize>(t: Tensor<D>) -> Option<burn::backend::flex::FlexTensor> {
    let t = t.try_into_primitive::<Flex>().ok()?;
    t.as_slice::<f32>().is_some().then_some(t)
}

/// A pointer that may cross threads; every head writes its own columns.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the threads write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The kernel of [`self_attention`] on host slices.
fn attention_qkv(qkv: &[f32], batch: usize, t: usize, heads: usize, hd: usize, out: &mut [f32]) {
    let d = heads * hd;
    assert_eq!(qkv.len(), batch * t * 3 * d);
    assert_eq!(out.len(), batch * t * d);
    let scale = 1.0 / (hd as f32).sqrt();
    let out = SendPtr(out.as_mut_ptr());
    let (row, t_stride) = (3 * d as isize, t as isize);
    (0..batch * heads).into_par_iter().for_each_init(
        || vec![0.0f32; t * t],
        |scores, job| {
            let (b, h) = (job / heads, job % heads);
            let head = &qkv[b * t * 3 * d + h * hd..];
            let (q, k, v) = (head.as_ptr(), head[d..].as_ptr(), head[2 * d..].as_ptr());
            // SAFETY: each operand is T rows of hd values inside its buffer: rows of
            // stride 3·D from this head's offset in `qkv`, stride T in `scores`, stride D
            // from this head's columns in `out`, which no other job writes.
            unsafe {
                // scores = scale · q kᵀ (kᵀ read through swapped strides).
                gemm(
                    t,
                    t,
                    hd,
                    scores.as_mut_ptr(),
                    1,
                    t_stride,
                    false,
                    q,
                    1,
                    row,
                    k,
                    row,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                softmax_rows(scores, t);
                gemm(
                    t,
                    hd,
                    t,
                    out.get().add(b * t * d + h * hd),
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    t_stride,
                    v,
                    1,
                    row,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
}

/// Exact (erf) GELU, `x · (1 + erf(x/√2)) / 2`, element-wise.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Result<Tensor<D>, Tensor<D>> {
    let shape: [usize; D] = x.dims();
    let mut values = host_values(x)?;
    values.par_chunks_mut(1 << 14).for_each(gelu_slice);
    Ok(flex_tensor(values, shape))
}

multiversion! {
    /// In-place exact GELU of a slice.
    fn gelu_slice(xs: &mut [f32]) {
        for x in xs {
            *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// In-place softmax of each `t`-long row.
    fn softmax_rows(s: &mut [f32], t: usize) {
        // 16 partial maxima and sums so the reductions vectorise.
        const L: usize = 16;
        for row in s.chunks_exact_mut(t) {
            let mut lanes = [f32::NEG_INFINITY; L];
            let mut chunks = row.chunks_exact(L);
            for c in &mut chunks {
                for i in 0..L {
                    lanes[i] = lanes[i].max(c[i]);
                }
            }
            let max = chunks
                .remainder()
                .iter()
                .chain(&lanes)
                .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sums = [0.0f32; L];
            let mut chunks = row.chunks_exact_mut(L);
            for c in &mut chunks {
                for i in 0..L {
                    c[i] = exp(c[i] - max);
                    sums[i] += c[i];
                }
            }
            let mut sum = 0.0;
            for x in chunks.into_remainder() {
                *x = exp(*x - max);
                sum += *x;
            }
            let inv = 1.0 / (sum + sums.iter().sum::<f32>());
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    }
}

/// `eˣ` to about 2.5e-7 relative, in straight-line arithmetic that vectorises:
/// `2ⁿ · p(r)` with `x = n·ln2 + r`, `|r| ≤ ln2/2`, `p` the degree-6 Taylor polynomial.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `erf(x)` to 5e-7 absolute in f32 (Abramowitz & Stegun 7.1.26: 1.5e-7 in exact arithmetic),
/// branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp(-z * z)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation;

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn exp_and_erf_match_the_standard_library() {
        for i in 0..=20_000 {
            let x = -87.0 * i as f32 / 20_000.0;
            let want = (x as f64).exp();
            assert!(((exp(x) as f64 - want) / want).abs() < 3e-7, "exp({x})");
        }
        let worst = (-4000..=4000)
            .map(|i| i as f32 / 500.0)
            .map(|x| (erf(x) as f64 - erf_reference(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "erf is off by {worst:e}");
    }

    /// erf by its Taylor series (|x| < 3) or asymptotic expansion, in f64.
    fn erf_reference(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let (mut sum, mut term, mut n) = (0.0, x, 0.0);
            loop {
                let t = term / (2.0 * n + 1.0);
                sum += t;
                if t.abs() < 1e-17 {
                    break;
                }
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let x2 = x * x;
            let tail = (-x2).exp() / (x.abs() * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2));
            x.signum() * (1.0 - tail)
        }
    }

    #[test]
    fn self_attention_equals_burns_attention() {
        let device = Device::flex();
        let (b, t, heads, hd) = (2, 37, 3, 8);
        let d = heads * hd;
        let qkv = Tensor::<3>::random([b, t, 3 * d], Distribution::Normal(0.0, 2.0), &device);
        let want = crate::vit::attention_from_qkv(qkv.clone(), heads);
        let got = self_attention(qkv, heads).expect("applies on flex");
        assert!(max_diff(got, want) < 1e-5);
    }

    #[test]
    fn gelu_equals_burns_gelu() {
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 50, 700], Distribution::Normal(0.0, 3.0), &device);
        let got = gelu(x.clone()).expect("applies on flex");
        assert!(max_diff(got, activation::gelu(x)) < 1e-6);
    }

    #[test]
    fn linear_few_rows_equals_burns_linear() {
        use burn::nn::LinearConfig;
        let device = Device::flex();
        // 2100 outputs: more than one column block, and not a multiple of the vector width.
        for bias in [true, false] {
            let linear = LinearConfig::new(50, 2100).with_bias(bias).init(&device);
            for rows in 1..=FEW_ROWS {
                let x = Tensor::<2>::random([rows, 50], Distribution::Normal(0.0, 1.0), &device);
                let got = linear_few_rows(&linear, x.clone()).expect("applies on flex");
                assert!(max_diff(got, linear.forward(x)) < 1e-5, "{rows} rows");
            }
            let many = Tensor::<2>::zeros([FEW_ROWS + 1, 50], &device);
            assert!(linear_few_rows(&linear, many).is_err());
        }
    }

    #[test]
    fn other_devices_get_their_tensor_back() {
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::ones([1, 2, 6], &device);
        let back = gelu(x).expect_err("autodiff is not a fast-path device");
        assert_eq!(back.dims(), [1, 2, 6]);
        assert!(self_attention(back, 2).is_err());
        let linear = burn::nn::LinearConfig::new(6, 4).init(&device);
        let x = Tensor::<2>::ones([1, 6], &device);
        assert!(linear_few_rows(&linear, x).is_err());
    }
}
