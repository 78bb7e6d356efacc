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
//! * **Copies of views**: flex gathers a strided view one element at a time;
//!   [`contiguous`] copies whole rows.
//! * **Scheduling**: [`on_thread_pool`] runs a whole forward pass inside the thread pool.
//!
//! Each gives its input back untouched (`Err`) where it does not apply: another backend, an
//! autodiff device (training keeps burn's differentiable ops), or a dtype other than f32.
//! Weights and large inputs are read where flex stores them (a `Strided` view): reading a
//! tensor back through `into_data` copies it.

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
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn any($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
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
pub(crate) use multiversion;

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
    // Read in place: a copy of `qkv` costs as much as the softmax.
    let Some(view) = Strided::new(&qkv) else {
        return Err(qkv);
    };
    let Some(values) = view.tensor.as_slice::<f32>() else {
        return Err(qkv);
    };
    let d = d3 / 3;
    let mut out = vec![0.0f32; b * t * d];
    attention_qkv(values, (b, t, heads, d / heads), &mut out, None);
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
    let [d_in, out] = weight.dims();
    if rows == 0 || rows > FEW_ROWS || d != d_in {
        return Err(x);
    }
    let Some(weight) = Strided::new(&weight).filter(|w| w.strides == [out, 1]) else {
        return Err(x);
    };
    let bias = match linear.bias.as_ref().map(|bias| Strided::new(&bias.val())) {
        Some(None) => return Err(x),
        bias => bias.flatten(),
    };
    let x = host_values(x)?;
    let w = &weight.values()[weight.offset..][..d * out];
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
    let mut y = match &bias {
        Some(bias) => (0..out)
            .map(|c| bias.values()[bias.index([c])])
            .collect::<Vec<_>>()
            .repeat(rows),
        None => vec![0.0; rows * out],
    };
    for partial in &partials {
        add_into(&mut y, partial);
    }
    Ok(flex_tensor(y, [rows, out]))
}

/// `x · wᵀ` for `x: [rows, d]` with at most [`FEW_ROWS`] rows and `w: [out, d]` (a tied
/// embedding table used as the LM head's weight), reading `w` where flex stores it. Blocks of
/// `w`'s rows go to the cores; each row is loaded once for all rows of `x`.
pub fn matmul_by_transpose_few_rows(x: Tensor<2>, w: &Tensor<2>) -> Result<Tensor<2>, Tensor<2>> {
    let [rows, d] = x.dims();
    let [out, w_d] = w.dims();
    if rows == 0 || rows > FEW_ROWS || d == 0 || w_d != d {
        return Err(x);
    }
    let Some(w) = Strided::new(w).filter(|w| w.strides == [d, 1]) else {
        return Err(x);
    };
    let x = host_values(x)?;
    let w = &w.values()[w.offset..][..out * d];
    // 256 weight rows (768 KB at d = 768) per task: enough tasks to balance the cores.
    const BLOCK: usize = 256;
    let mut y = vec![0.0f32; rows * out];
    let y_ptr = SendPtr(y.as_mut_ptr());
    w.par_chunks(BLOCK * d).enumerate().for_each_init(
        || vec![0.0f32; BLOCK * rows],
        |block_y, (b, w_block)| {
            let n = w_block.len() / d;
            dot_rows(&x, d, w_block, &mut block_y[..n * rows]);
            for (j, ys) in block_y[..n * rows].chunks_exact(rows).enumerate() {
                for (r, &value) in ys.iter().enumerate() {
                    // SAFETY: column b·BLOCK + j of row r; each task writes its own columns.
                    unsafe { *y_ptr.get().add(r * out + b * BLOCK + j) = value };
                }
            }
        },
    );
    Ok(flex_tensor(y, [rows, out]))
}

multiversion! {
    /// `y[j·rows + r] = w_j · x_r` for the `d`-long rows `x_r` of `x` and `w_j` of `w`.
    fn dot_rows(x: &[f32], d: usize, w: &[f32], y: &mut [f32]) {
        const L: usize = 16;
        let rows = x.len() / d;
        for (w_row, ys) in w.chunks_exact(d).zip(y.chunks_exact_mut(rows)) {
            for (x_row, y) in x.chunks_exact(d).zip(ys.iter_mut()) {
                // 16 partial sums so the dot product vectorises.
                let mut lanes = [0.0f32; L];
                let (ws, xs) = (w_row.chunks_exact(L), x_row.chunks_exact(L));
                let mut tail = 0.0;
                for (a, b) in ws.remainder().iter().zip(xs.remainder()) {
                    tail += a * b;
                }
                for (a, b) in ws.zip(xs) {
                    for l in 0..L {
                        lanes[l] += a[l] * b[l];
                    }
                }
                *y = tail + lanes.iter().sum::<f32>();
            }
        }
    }
}

/// A contiguous copy of `x` in the same shape; for views (split heads, say) whose elements
/// flex would otherwise gather one at a time. Copies each run of contiguous last-dimension
/// values at once, over all cores.
pub fn contiguous(x: Tensor<4>) -> Result<Tensor<4>, Tensor<4>> {
    let dims = x.dims();
    let Some(view) = Strided::new(&x).filter(|t| t.strides[3] == 1 || dims[3] == 1) else {
        return Err(x);
    };
    let [n0, n1, n2, n3] = dims;
    let mut out = vec![0.0f32; n0 * n1 * n2 * n3];
    out.par_chunks_mut((n2 * n3).max(1))
        .enumerate()
        .for_each(|(job, block)| {
            let (a, b) = (job / n1, job % n1);
            for (c, row) in block.chunks_exact_mut(n3.max(1)).enumerate() {
                row.copy_from_slice(&view.values()[view.index([a, b, c, 0])..][..n3]);
            }
        });
    Ok(flex_tensor(out, dims))
}

/// Runs `f` on one of rayon's worker threads (inline when already on one). A decoding step
/// starts about a hundred parallel kernels; started from a thread outside the pool, each
/// hands its work over and puts the caller to sleep until it is done, which costs more
/// than the small kernels themselves.
pub fn on_thread_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

multiversion! {
    /// `y[r, :] += Σ_k x[r, k0 + k] · w[k, :]` over the `w.len() / out` weight rows given.
    /// Columns go a block at a time so that the rows of `y` stay in L1, and weight rows four
    /// at a time so that each `y` element is loaded and stored once per four. With several
    /// rows, each 16-column piece of the four weight rows is loaded once for all of them
    /// (8 rows: 33 → 25 ms for 40 [768, 3072] weights against re-reading it per row).
    fn accumulate_rows(x: &[f32], d: usize, w: &[f32], k0: usize, out: usize, y: &mut [f32]) {
        const BLOCK: usize = 1024;
        const L: usize = 16;
        let rows = y.len() / out;
        let k_rows = w.len() / out;
        for c0 in (0..out).step_by(BLOCK) {
            let c1 = (c0 + BLOCK).min(out);
            let vectors = (c1 - c0) / L * L;
            let mut k = 0;
            while k + 4 <= k_rows {
                let w_at = |i: usize| &w[(k + i) * out + c0..(k + i) * out + c1];
                let (w0, w1, w2, w3) = (w_at(0), w_at(1), w_at(2), w_at(3));
                let mut a = [[0.0f32; 4]; FEW_ROWS];
                for (r, a) in a.iter_mut().enumerate().take(rows) {
                    a.copy_from_slice(&x[r * d + k0 + k..][..4]);
                }
                // 16 columns of the four weight rows, loaded once for every row of `y`.
                for j in (0..vectors).step_by(L) {
                    let chunk = |w: &[f32]| -> [f32; L] { w[j..j + L].try_into().expect("L values") };
                    let (v0, v1, v2, v3) = (chunk(w0), chunk(w1), chunk(w2), chunk(w3));
                    for (r, a) in a.iter().enumerate().take(rows) {
                        let y = &mut y[r * out + c0 + j..][..L];
                        for l in 0..L {
                            y[l] += a[0] * v0[l] + a[1] * v1[l] + a[2] * v2[l] + a[3] * v3[l];
                        }
                    }
                }
                for (r, a) in a.iter().enumerate().take(rows) {
                    for j in vectors..c1 - c0 {
                        y[r * out + c0 + j] +=
                            a[0] * w0[j] + a[1] * w1[j] + a[2] * w2[j] + a[3] * w3[j];
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

/// `sums[j] += Σ_r rows[r·W + j]` with `W = sums.len()`: the column sums of the row-major
/// `rows` (a bias's gradient), blocks of columns in parallel, each summed in row order.
pub(crate) fn add_column_sums(sums: &mut [f32], rows: &[f32]) {
    const COLUMNS: usize = 1024;
    let width = sums.len();
    if width == 0 {
        return;
    }
    sums.par_chunks_mut(COLUMNS)
        .enumerate()
        .for_each(|(j, sums)| {
            for row in rows.chunks_exact(width) {
                add_into(sums, &row[j * COLUMNS..][..sums.len()]);
            }
        });
}

multiversion! {
    /// `y += z`.
    fn add_into(y: &mut [f32], z: &[f32]) {
        for (y, &z) in y.iter_mut().zip(z) {
            *y += z;
        }
    }
}

/// A flex f32 tensor's values in row-major order: its own buffer when it is contiguous,
/// else a copy.
pub(crate) fn flex_values(t: &burn::backend::flex::FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => v.into(),
        None => t.to_contiguous().storage::<f32>().to_vec().into(),
    }
}

/// A flex f32 tensor's shape and values, as an owned buffer to compute in.
pub(crate) fn flex_owned(t: burn::backend::flex::FlexTensor) -> (Vec<usize>, Vec<f32>) {
    use burn::backend::TensorMetadata;
    let shape = t.shape().to_vec();
    let values = flex_values(&t).into_owned();
    (shape, values)
}

/// A flex f32 tensor of `shape` holding `values` (row-major), without a copy.
pub(crate) fn flex_from_values(
    values: Vec<f32>,
    shape: Vec<usize>,
) -> burn::backend::flex::FlexTensor {
    burn::backend::flex::FlexTensor::from_data(TensorData::new(values, shape))
}

/// A flex tensor's f32 storage and layout, read in place (no copy): element `at` is
/// `values()[index(at)]`.
struct Strided<const D: usize> {
    tensor: burn::backend::flex::FlexTensor,
    /// Strides in elements; negative ones (flipped views) are not taken.
    strides: [usize; D],
    offset: usize,
}

impl<const D: usize> Strided<D> {
    /// `t`'s storage when it is an f32 tensor on the plain flex device.
    fn new(t: &Tensor<D>) -> Option<Self> {
        if !is_plain_flex(&t.device()) || t.dtype() != burn::tensor::DType::F32 {
            return None;
        }
        let tensor = t.clone().try_into_primitive::<Flex>().ok()?;
        let layout = tensor.layout();
        let mut strides = [0; D];
        for (s, &from) in strides.iter_mut().zip(layout.strides()) {
            *s = usize::try_from(from).ok()?;
        }
        let offset = layout.start_offset();
        Some(Self {
            tensor,
            strides,
            offset,
        })
    }

    /// The whole storage buffer.
    fn values(&self) -> &[f32] {
        self.tensor.storage::<f32>()
    }

    /// Position of element `at` in [`Self::values`].
    fn index(&self, at: [usize; D]) -> usize {
        self.offset
            + at.iter()
                .zip(&self.strides)
                .map(|(a, s)| a * s)
                .sum::<usize>()
    }
}

/// A pointer that may cross threads; every head writes its own columns.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the threads write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A matrix operand of [`matmul`]: element `(i, j)` is at `ptr + i·row + j·col`, so one
/// buffer can be read as itself (`col` 1) or as its transpose (`row` 1).
#[derive(Clone, Copy)]
pub(crate) struct View {
    ptr: *const f32,
    row: isize,
    col: isize,
}

impl View {
    /// Row-major rows `stride` apart.
    pub(crate) fn rows(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            row: stride as isize,
            col: 1,
        }
    }

    /// The transpose of row-major rows `stride` apart.
    pub(crate) fn transposed(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            row: 1,
            col: stride as isize,
        }
    }
}

/// `dst = scale · lhs·rhs`, or `dst += scale · lhs·rhs` when `accumulate`: `lhs` `[m, k]`,
/// `rhs` `[k, n]`, `dst` `[m, n]` row-major with rows `dst_stride` apart.
///
/// # Safety
///
/// Every element the shapes and strides reach must lie inside its operand's allocation,
/// and `dst` must not overlap `lhs` or `rhs` nor be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)] // a GEMM: three shapes, three operands, two factors
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_stride: usize,
    lhs: View,
    rhs: View,
    scale: f32,
    accumulate: bool,
    parallelism: Parallelism,
) {
    // SAFETY: the caller's contract is gemm's.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The kernel of [`self_attention`] on host slices.
///
/// With `probs` (`[B·H, T, T]`), each head's probabilities are kept there for a backward pass.
pub(crate) fn attention_qkv(
    qkv: &[f32],
    (batch, t, heads, hd): (usize, usize, usize, usize),
    out: &mut [f32],
    probs: Option<&mut [f32]>,
) {
    let d = heads * hd;
    assert_eq!(qkv.len(), batch * t * 3 * d);
    assert_eq!(out.len(), batch * t * d);
    let scale = 1.0 / (hd as f32).sqrt();
    let out = SendPtr(out.as_mut_ptr());
    let probs = probs.map(|p| {
        assert_eq!(p.len(), batch * heads * t * t);
        SendPtr(p.as_mut_ptr())
    });
    let row = 3 * d;
    (0..batch * heads).into_par_iter().for_each_init(
        || vec![0.0f32; if probs.is_some() { 0 } else { t * t }],
        |scratch, job| {
            let scores: &mut [f32] = match probs {
                // SAFETY: job `job` alone owns `probs[job·T², (job + 1)·T²)`.
                Some(p) => unsafe {
                    std::slice::from_raw_parts_mut(p.get().add(job * t * t), t * t)
                },
                None => scratch,
            };
            let (b, h) = (job / heads, job % heads);
            let head = &qkv[b * t * 3 * d + h * hd..];
            let (q, k, v) = (head.as_ptr(), head[d..].as_ptr(), head[2 * d..].as_ptr());
            // SAFETY: each operand is T rows of hd values inside its buffer: rows of
            // stride 3·D from this head's offset in `qkv`, stride T in `scores`, stride D
            // from this head's columns in `out`, which no other job writes.
            unsafe {
                // scores = scale · q kᵀ
                matmul(
                    (t, t, hd),
                    scores.as_mut_ptr(),
                    t,
                    View::rows(q, row),
                    View::transposed(k, row),
                    scale,
                    false,
                    Parallelism::None,
                );
                softmax_rows(scores, t);
                matmul(
                    (t, hd, t),
                    out.get().add(b * t * d + h * hd),
                    d,
                    View::rows(scores.as_ptr(), t),
                    View::rows(v, row),
                    1.0,
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
    let Some(view) = Strided::new(&x) else {
        return Err(x);
    };
    drop(x);
    let mut t = view.tensor;
    // In place when nothing else holds the buffer (a layer's fresh output), else on a copy.
    if let Some((start, end)) = t.layout().contiguous_offsets()
        && let Some(values) = t.try_storage_mut::<f32>()
    {
        values[start..end]
            .par_chunks_mut(1 << 14)
            .for_each(gelu_slice);
        return Ok(Tensor::from_primitive::<Flex>(t));
    }
    let mut values = host_values(Tensor::<D>::from_primitive::<Flex>(t))?;
    values.par_chunks_mut(1 << 14).for_each(gelu_slice);
    Ok(flex_tensor(values, shape))
}

multiversion! {
    /// In-place exact GELU of a slice.
    pub(crate) fn gelu_slice(xs: &mut [f32]) {
        for x in xs {
            *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// In-place softmax of each `t`-long row. A row whose every entry is `-∞` (every key
/// masked) gives zeros, not NaN.
pub(crate) fn softmax_rows(s: &mut [f32], t: usize) {
    for row in s.chunks_exact_mut(t) {
        let mut stats = (0.0, 0.0, 0.0);
        exp_in_place(row, &mut stats);
        if stats.0 == f32::NEG_INFINITY {
            row.fill(0.0);
        } else {
            scale_row(row, 1.0 / stats.1, 0.0);
        }
    }
}

/// Label-smoothed cross-entropy of the rows of `logits` (`[M, V]`, plain flex, f32) against
/// `targets` (`M` ids, `ignore` for rows without a label), averaged over the labelled rows:
/// the loss and its gradient `G = ∂loss/∂logits`, in two passes over each row (the
/// exponentials computed once, vectorised) instead of the dozen full-size tensors that
/// `log_softmax` + `gather` + `mean` and their backward passes write.
///
/// `None` where it does not apply (another device, a strided view, a target out of range).
pub fn smoothed_cross_entropy(
    logits: &Tensor<2>,
    targets: &[i64],
    ignore: i64,
    smoothing: f32,
) -> Option<(f64, Tensor<2>)> {
    let [rows, vocab] = logits.dims();
    let view = Strided::new(logits).filter(|v| v.strides == [vocab, 1])?;
    if targets.len() != rows || !labels_fit(targets, ignore, vocab) {
        return None;
    }
    let z = &view.values()[view.offset..][..rows * vocab];
    let labelled = targets.iter().filter(|&&t| t != ignore).count();
    // PyTorch's mean over no labelled row: 0/0.
    let scale = 1.0 / labelled as f32;
    let mut grad = vec![0.0f32; rows * vocab];
    let losses: Vec<f64> = grad
        .par_chunks_mut(vocab)
        .zip(z.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((g, z), &target)| {
            if target == ignore {
                return 0.0;
            }
            g.copy_from_slice(z);
            row_loss_and_gradient(g, target as usize, scale, smoothing)
        })
        .collect();
    let loss = losses.iter().sum::<f64>() / labelled as f64;
    Some((loss, flex_tensor(grad, [rows, vocab])))
}

/// [`smoothed_cross_entropy`] of the linear head `z = x·wᵀ + b` (`x: [N, D]`, `w: [V, D]`,
/// `b: [V]`, plain flex, f32, contiguous), with its gradients with respect to `x`, `w` and
/// `b`: `(loss, ∂x, ∂w, ∂b)`.
///
/// The labelled rows go through in blocks of 64: a block's logits (`[64, V]`,
/// 7.8 MB at BLIP's vocabulary) are computed, turned into their gradient in place, and used
/// for the block's share of the three gradients before the next block reuses the buffer. The
/// full `[N, V]` logits never exist, and rows without a label cost nothing.
pub fn linear_smoothed_cross_entropy(
    x: &Tensor<2>,
    w: &Tensor<2>,
    b: &Tensor<1>,
    targets: &[i64],
    ignore: i64,
    smoothing: f32,
) -> Option<(f64, Tensor<2>, Tensor<2>, Tensor<1>)> {
    let [rows, d] = x.dims();
    let [vocab, w_d] = w.dims();
    let x = Strided::new(x).filter(|v| v.strides == [d, 1])?;
    let w = Strided::new(w).filter(|v| v.strides == [w_d, 1])?;
    let b = Strided::new(b).filter(|v| v.strides == [1])?;
    if w_d != d
        || b.tensor.layout().shape()[0] != vocab
        || targets.len() != rows
        || d == 0
        || !labels_fit(targets, ignore, vocab)
    {
        return None;
    }
    let xs = &x.values()[x.offset..][..rows * d];
    let ws = &w.values()[w.offset..][..vocab * d];
    let bs = &b.values()[b.offset..][..vocab];
    let labelled: Vec<usize> = (0..rows).filter(|&r| targets[r] != ignore).collect();
    // PyTorch's mean over no labelled row: 0/0.
    let scale = 1.0 / labelled.len() as f32;
    let (mut grad_x, mut grad_w, mut grad_b) = (
        vec![0.0f32; rows * d],
        vec![0.0f32; vocab * d],
        vec![0.0f32; vocab],
    );
    let mut loss = 0.0f64;
    let mut block = vec![0.0f32; HEAD_BLOCK.min(labelled.len().max(1)) * vocab];
    let mut x_block = vec![0.0f32; HEAD_BLOCK * d];
    let mut gx_block = vec![0.0f32; HEAD_BLOCK * d];
    for chunk in labelled.chunks(HEAD_BLOCK) {
        let c = chunk.len();
        for (i, &r) in chunk.iter().enumerate() {
            x_block[i * d..][..d].copy_from_slice(&xs[r * d..][..d]);
        }
        let z = &mut block[..c * vocab];
        for row in z.chunks_exact_mut(vocab) {
            row.copy_from_slice(bs);
        }
        // SAFETY: every pointer and stride stays inside its slice: z is [c, V] row-major,
        // x_block [c, D], w [V, D] read as wᵀ through swapped strides.
        unsafe {
            matmul(
                (c, vocab, d),
                z.as_mut_ptr(),
                vocab,
                View::rows(x_block.as_ptr(), d),
                View::transposed(ws.as_ptr(), d),
                1.0,
                true,
                Parallelism::Rayon(0),
            );
        }
        loss += z
            .par_chunks_mut(vocab)
            .zip(chunk.par_iter())
            .map(|(g, &r)| row_loss_and_gradient(g, targets[r] as usize, scale, smoothing))
            .sum::<f64>();
        let g = &block[..c * vocab];
        // SAFETY: as above; gx_block is [c, D], grad_w [V, D] (Gᵀ read through swapped
        // strides), accumulated across blocks.
        unsafe {
            matmul(
                (c, d, vocab),
                gx_block.as_mut_ptr(),
                d,
                View::rows(g.as_ptr(), vocab),
                View::rows(ws.as_ptr(), d),
                1.0,
                false,
                Parallelism::Rayon(0),
            );
            matmul(
                (vocab, d, c),
                grad_w.as_mut_ptr(),
                d,
                View::transposed(g.as_ptr(), vocab),
                View::rows(x_block.as_ptr(), d),
                1.0,
                true,
                Parallelism::Rayon(0),
            );
        }
        for (i, &r) in chunk.iter().enumerate() {
            grad_x[r * d..][..d].copy_from_slice(&gx_block[i * d..][..d]);
        }
        add_column_sums(&mut grad_b, g);
    }
    Some((
        loss / labelled.len() as f64,
        flex_tensor(grad_x, [rows, d]),
        flex_tensor(grad_w, [vocab, d]),
        flex_tensor(grad_b, [vocab]),
    ))
}

/// One labelled row: `g` holds its logits and is turned into its gradient in place,
/// `(softmax − (1 − ε)·onehot(y) − ε/V)·scale`; returns the row's smoothed cross-entropy
/// `lse − (1 − ε)·z_y − ε·mean(z)`.
fn row_loss_and_gradient(g: &mut [f32], y: usize, scale: f32, smoothing: f32) -> f64 {
    let vocab = g.len() as f32;
    let z_y = g[y];
    let mut stats = (0.0, 0.0, 0.0);
    exp_in_place(g, &mut stats);
    let (max, sum, total) = stats;
    let loss = max + sum.ln() - (1.0 - smoothing) * z_y - smoothing * total / vocab;
    scale_row(g, scale / sum, scale * smoothing / vocab);
    g[y] -= scale * (1.0 - smoothing);
    f64::from(loss)
}

/// Whether every target is `ignore` or a class of a non-empty vocabulary.
fn labels_fit(targets: &[i64], ignore: i64, vocab: usize) -> bool {
    vocab > 0
        && targets
            .iter()
            .all(|&t| t == ignore || (0..vocab as i64).contains(&t))
}

/// Rows of logits per block in [`linear_smoothed_cross_entropy`].
const HEAD_BLOCK: usize = 64;

multiversion! {
    /// `z = exp(z − max z)` in place; `out` = (max z, Σ exp, Σ z) of the row as it was.
    fn exp_in_place(z: &mut [f32], out: &mut (f32, f32, f32)) {
        const L: usize = 16;
        let mut lanes = [f32::NEG_INFINITY; L];
        let mut totals = [0.0f32; L];
        let mut chunks = z.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                lanes[i] = lanes[i].max(c[i]);
                totals[i] += c[i];
            }
        }
        let mut max = f32::NEG_INFINITY;
        let mut total = 0.0;
        for &x in chunks.remainder() {
            max = max.max(x);
            total += x;
        }
        let max = lanes.iter().fold(max, |m, &x| m.max(x));
        let total = total + totals.iter().sum::<f32>();
        let mut sums = [0.0f32; L];
        let mut chunks = z.chunks_exact_mut(L);
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
        *out = (max, sum + sums.iter().sum::<f32>(), total);
    }
}

multiversion! {
    /// `g = g·a − b`, element-wise.
    fn scale_row(g: &mut [f32], a: f32, b: f32) {
        for x in g.iter_mut() {
            *x = *x * a - b;
        }
    }
}

/// `eˣ` to about 2.5e-7 relative (0 below −87), in straight-line arithmetic that vectorises:
/// `2ⁿ · p(r)` with `x = n·ln2 + r`, `|r| ≤ ln2/2`, `p` the degree-6 Taylor polynomial.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Below −87 the result is 0, not the clamp's 1.6e-38: a masked attention key
    // (a −10⁴ bias) would otherwise get a probability of 10⁻³⁸, and every product with
    // those subnormals, in the GEMMs after softmax and in its backward pass, runs an
    // order of magnitude slower (it tripled the GEMM time of a training step).
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ from n's bits: adding 1.5·2²³ leaves n in the low mantissa bits. Unlike an
    // `as i32` cast (saturating, NaN to 0, so compiled one lane at a time), bit casts vectorise.
    const MAGIC: f32 = 12_582_912.0;
    let biased = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits() - 127);
    if underflow {
        0.0
    } else {
        p * f32::from_bits(biased << 23)
    }
}

/// `erf(x)` to 5e-7 absolute in f32 (Abramowitz & Stegun 7.1.26: 1.5e-7 in exact arithmetic),
/// branch-free.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
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
    fn gelu_equals_burns_gelu() {
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 50, 700], Distribution::Normal(0.0, 3.0), &device);
        // `x` is shared here, so this takes the copy; the second call owns its input.
        let got = gelu(x.clone()).expect("applies on flex");
        let want = activation::gelu(x.clone());
        assert!(max_diff(got, want.clone()) < 1e-6);
        let owned = gelu(x.clone() * 1.0).expect("applies on flex");
        assert!(max_diff(owned, want) < 1e-6);
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
            let other_width = Tensor::<2>::zeros([1, 49], &device);
            assert!(linear_few_rows(&linear, other_width).is_err());
        }
    }

    #[test]
    fn matmul_by_transpose_few_rows_equals_burns_matmul() {
        let device = Device::flex();
        // 600 weight rows: more than two blocks of 256, the last one partial; d = 50 is not
        // a multiple of the vector width. Weights of std 1/√d keep outputs near 1, where
        // 1e-5 is well above the rounding of a 50-term sum in either order.
        let w = Tensor::<2>::random([600, 50], Distribution::Normal(0.0, 0.15), &device);
        for rows in 1..=FEW_ROWS {
            let x = Tensor::<2>::random([rows, 50], Distribution::Normal(0.0, 1.0), &device);
            let want = x.clone().matmul(w.clone().transpose());
            let got = matmul_by_transpose_few_rows(x, &w).expect("applies on flex");
            assert!(max_diff(got, want) < 1e-5, "{rows} rows");
        }
        let many = Tensor::<2>::zeros([FEW_ROWS + 1, 50], &device);
        assert!(matmul_by_transpose_few_rows(many, &w).is_err());
        let other_width = Tensor::<2>::zeros([1, 49], &device);
        assert!(matmul_by_transpose_few_rows(other_width, &w).is_err());
    }

    #[test]
    fn contiguous_copies_a_view_element_for_element() {
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 7, 12], Distribution::Normal(0.0, 1.0), &device);
        // Split heads: [2, 7, 3, 4] → [2, 3, 7, 4], a strided view.
        let view = x.reshape([2, 7, 3, 4]).swap_dims(1, 2);
        let copy = contiguous(view.clone()).expect("applies on flex");
        assert_eq!(copy.dims(), [2, 3, 7, 4]);
        assert_eq!(
            copy.into_data().try_to_vec::<f32>().unwrap(),
            view.into_data().try_to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn on_thread_pool_runs_on_a_worker() {
        assert_eq!(rayon::current_thread_index(), None);
        assert!(on_thread_pool(rayon::current_thread_index).is_some());
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
        assert!(linear_few_rows(&linear, x.clone()).is_err());
        let w = Tensor::<2>::ones([5, 6], &device);
        assert!(matmul_by_transpose_few_rows(x, &w).is_err());
        assert!(contiguous(Tensor::<4>::ones([1, 2, 3, 4], &device)).is_err());
    }
}
