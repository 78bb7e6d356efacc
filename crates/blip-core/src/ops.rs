//! Operations the models share, each on burn's ops with a fast path on plain flex
//! ([`crate::kernels`]); the results agree to float rounding.

use burn::nn::Linear;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor};

use crate::precision::to_f32;

/// Whether `device` computes in host memory (flex, ndarray), where reading a tensor back is a
/// copy, not a synchronisation with a GPU that stalls its queue.
pub fn is_host(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)] // burn keeps ndarray working in 0.22
    if *device == Device::ndarray() {
        return true;
    }
    let _ = device;
    false
}

/// Applies `linear` to `[B, L, D]` as one `[B·L, D]` product. burn broadcasts a rank-3 input
/// into B separate products, each reading the whole weight again: with batched images, or
/// with one token per row while decoding, that multiplies the memory traffic by B.
pub fn dense(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, l, d] = x.dims();
    let x = x.reshape([b * l, d]);
    #[cfg(feature = "flex")]
    let x = match crate::kernels::linear_few_rows(linear, x) {
        Ok(y) => return reshape_rows(y, b, l),
        Err(x) => x,
    };
    // Training on flex: one GEMM onto the bias, with its own backward pass. A width that
    // does not fit takes burn's `forward`, which fails as it always has.
    let y = if crate::fused::has_backward(&x.device()) {
        crate::fused::linear(linear, x.clone()).unwrap_or_else(|_| linear.forward(x))
    } else {
        linear.forward(x)
    };
    reshape_rows(y, b, l)
}

/// `[B·L, D]` back to `[B, L, D]`.
fn reshape_rows(y: Tensor<2>, b: usize, l: usize) -> Tensor<3> {
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
    // Row-major `[N, M]`, as the ops after it (bias, softmax, loss) read it: the transposed
    // result of `w·xᵀ` made every one of them walk the logits column by column, and
    // the bias add alone took 15 % of a training step at BLIP's 30524-token vocabulary.
    x.matmul(w.transpose())
}

/// Label-smoothed cross-entropy of the rows of `logits` (`[M, V]`) against `targets` (`[M]`,
/// `ignore` for rows without a label), averaged over the labelled rows, as a 1-element
/// tensor differentiable with respect to `logits`:
///
/// `L = Σ_{r labelled} [lse(z_r) − (1 − ε)·z_r[y_r] − ε·mean(z_r)] / #labelled`
///
/// (PyTorch's `cross_entropy(ignore_index, label_smoothing = ε)`). The loss and its
/// gradient `G = (softmax(z_r) − (1 − ε)·onehot(y_r) − ε/V) / #labelled` are computed
/// together, outside the autodiff graph (in one fused pass per row on flex), and enter it as
/// `Σ z·G + (L − Σ z·G)`: the value is `L`, the gradient `G`, and backward does one
/// multiplication where `log_softmax`'s graph did a dozen full-size passes.
///
/// `targets` of another length than the rows, or an empty vocabulary, is an
/// [`Error::InputShape`](crate::Error::InputShape). Target ids are those of validated inputs
/// (`lm_labels` of ids the text model checked).
pub fn smoothed_cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    ignore: i64,
    smoothing: f64,
) -> crate::Result<Tensor<1>> {
    let [rows, vocab] = logits.dims();
    check_shape("logits", "[rows ≥ 0, V ≥ 1]", &logits.dims(), vocab > 0)?;
    check_targets(&targets, rows)?;
    let logits = to_f32(logits);
    let plain = logits.clone().inner();
    let (loss, grad) = loss_and_gradient(plain.clone(), targets, ignore, smoothing);
    Ok(inject(logits, plain, grad) + loss)
}

/// `targets` must hold one id per row.
fn check_targets(targets: &Tensor<1, Int>, rows: usize) -> crate::Result<()> {
    let found = targets.dims();
    check_shape("targets", &format!("[{rows}]"), &found, found == [rows])
}

/// `Ok` when `fine`, else an [`Error::InputShape`](crate::Error::InputShape) naming `what`.
pub(crate) fn check_shape(
    what: &'static str,
    expected: &str,
    found: &[usize],
    fine: bool,
) -> crate::Result<()> {
    if fine {
        return Ok(());
    }
    Err(crate::Error::InputShape {
        what,
        expected: expected.to_string(),
        found: found.to_vec(),
    })
}

/// [`smoothed_cross_entropy`] of the linear head `z = x·wᵀ + b` (`x: [N, D]`, `w: [V, D]`,
/// `b: [V]`; a tied LM head), differentiable with respect to `x`, `w` and `b`, without the
/// logits ever entering the autodiff graph.
///
/// The logits are computed on untracked copies, the loss and `G = ∂L/∂z` from them as in
/// [`smoothed_cross_entropy`], and the three gradients from `G` by two products
/// (`∂L/∂x = G·w`, `∂L/∂w = Gᵀ·x`, `∂L/∂b = Σ_rows G`). They enter the graph as
/// `Σ x·∂x + Σ w·∂w + Σ b·∂b + (L − the same sums untracked)`: the value is `L` and the
/// gradients those. The full `[N, V]` logits exist once, outside the graph, instead of as the
/// half-dozen tracked tensors (logits, bias sum, log-probabilities, their gradients) that
/// the head and `log_softmax` leave for backward.
///
/// Shapes that do not fit together (`w` of another width than `x`, `b` of another length
/// than `w`'s rows, `targets` of another length than `x`'s rows, an empty vocabulary) are an
/// [`Error::InputShape`](crate::Error::InputShape).
pub fn linear_smoothed_cross_entropy(
    x: Tensor<2>,
    w: Tensor<2>,
    b: Tensor<1>,
    targets: Tensor<1, Int>,
    ignore: i64,
    smoothing: f64,
) -> crate::Result<Tensor<1>> {
    let ([rows, d], [vocab, w_d]) = (x.dims(), w.dims());
    check_shape(
        "w",
        &format!("[V ≥ 1, {d}]"),
        &w.dims(),
        w_d == d && vocab > 0,
    )?;
    check_shape("b", &format!("[{vocab}]"), &b.dims(), b.dims() == [vocab])?;
    check_targets(&targets, rows)?;
    // In f32 for a half-precision model: the loss and its softmax over the vocabulary.
    let (x, w, b) = (to_f32(x), to_f32(w), to_f32(b));
    let (xp, wp, bp) = (x.clone().inner(), w.clone().inner(), b.clone().inner());
    let (loss, grad_x, grad_w, grad_b) = head_loss_and_gradients(
        xp.clone(),
        wp.clone(),
        bp.clone(),
        targets,
        ignore,
        smoothing,
    );
    Ok(inject(x, xp, grad_x) + inject(w, wp, grad_w) + inject(b, bp, grad_b) + loss)
}

/// The loss and its gradients with respect to the untracked `x`, `w` and `b`: the blocked
/// kernel on flex, the full logits through burn's ops elsewhere.
fn head_loss_and_gradients(
    x: Tensor<2>,
    w: Tensor<2>,
    b: Tensor<1>,
    targets: Tensor<1, Int>,
    ignore: i64,
    smoothing: f64,
) -> (Tensor<1>, Tensor<2>, Tensor<2>, Tensor<1>) {
    #[cfg(feature = "flex")]
    if crate::kernels::is_plain_flex(&x.device())
        && let Ok(host) = targets.clone().into_data().try_into_vec_as::<i64>()
        && let Some((loss, grad_x, grad_w, grad_b)) = crate::kernels::linear_smoothed_cross_entropy(
            &x,
            &w,
            &b,
            &host,
            ignore,
            smoothing as f32,
        )
    {
        return (
            Tensor::from_floats([loss as f32], &x.device()),
            grad_x,
            grad_w,
            grad_b,
        );
    }
    let vocab = b.dims()[0];
    let logits = matmul_by_transpose(x.clone(), w.clone()) + b.reshape([1, vocab]);
    let (loss, grad) = loss_and_gradient(logits, targets, ignore, smoothing);
    let grad_x = grad.clone().matmul(w);
    let grad_w = grad.clone().transpose().matmul(x);
    let grad_b = grad.sum_dim(0).reshape([vocab]);
    (loss, grad_x, grad_w, grad_b)
}

/// The loss (`[1]`) and its gradient with respect to the untracked `logits`: the fused
/// kernel on flex, burn's ops elsewhere (or where the kernel does not apply).
fn loss_and_gradient(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    ignore: i64,
    smoothing: f64,
) -> (Tensor<1>, Tensor<2>) {
    #[cfg(feature = "flex")]
    if crate::kernels::is_plain_flex(&logits.device())
        && let Ok(host) = targets.clone().into_data().try_into_vec_as::<i64>()
        && let Some((loss, grad)) =
            crate::kernels::smoothed_cross_entropy(&logits, &host, ignore, smoothing as f32)
    {
        return (Tensor::from_floats([loss as f32], &logits.device()), grad);
    }
    let [rows, vocab] = logits.dims();
    let keep = targets.clone().not_equal_elem(ignore);
    let safe = targets
        .mask_fill(keep.clone().bool_not(), 0)
        .reshape([rows, 1]);
    let weight = keep.float();
    let weight = (weight.clone() / weight.sum()).reshape([rows, 1]);
    let max = logits.clone().max_dim(1);
    let exps = (logits.clone() - max.clone()).exp();
    let sums = exps.clone().sum_dim(1);
    let lse = sums.clone().log() + max;
    let picked = logits.clone().gather(1, safe.clone());
    let mean = logits.mean_dim(1);
    let loss = ((lse - picked * (1.0 - smoothing) - mean * smoothing) * weight.clone()).sum();
    let grad = (exps / sums - smoothing / vocab as f64) * weight.clone();
    let grad = grad.scatter(1, safe, weight * -(1.0 - smoothing), IndexingUpdateOp::Add);
    (loss.reshape([1]), grad)
}

/// `Σ t·G − Σ t'·G` for a tracked `t` and its untracked copy `t'`: the same values summed
/// the same way, so the value is exactly 0 and the gradient with respect to `t` is `G`.
fn inject<const D: usize>(tracked: Tensor<D>, plain: Tensor<D>, grad: Tensor<D>) -> Tensor<1> {
    (tracked * grad.clone()).sum() - (plain * grad).sum()
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

    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Distribution, TensorData};

    const IGNORE: i64 = -100;

    /// The same loss from burn's own ops (`log_softmax`, `gather`, `mean`), as `lm_loss`
    /// computed it before.
    fn reference(logits: Tensor<2>, targets: &[i64], smoothing: f64) -> Tensor<1> {
        let [rows, _] = logits.dims();
        let device = logits.device();
        let keep: Vec<f32> = targets.iter().map(|&t| f32::from(t != IGNORE)).collect();
        let safe: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
        let keep = Tensor::<1>::from_data(TensorData::new(keep, [rows]), &device);
        let safe = Tensor::<2, Int>::from_data(TensorData::new(safe, [rows, 1]), &device);
        let log_p = log_softmax(logits, 1);
        let nll = log_p.clone().gather(1, safe).reshape([rows]).neg();
        let smooth = log_p.mean_dim(1).reshape([rows]).neg();
        let per_row = nll * (1.0 - smoothing) + smooth * smoothing;
        (per_row * keep.clone()).sum() / keep.sum()
    }

    fn case(rows: usize, vocab: usize, seed: u64) -> (Tensor<2>, Vec<i64>) {
        let device = Device::flex();
        device.seed(seed);
        let logits = Tensor::<2>::random([rows, vocab], Distribution::Normal(0.0, 3.0), &device);
        (logits, targets(rows, vocab))
    }

    /// Targets for `rows` rows, every third without a label.
    fn targets(rows: usize, vocab: usize) -> Vec<i64> {
        (0..rows)
            .map(|r| {
                if r % 3 == 1 {
                    IGNORE
                } else {
                    ((r * 7 + 3) % vocab) as i64
                }
            })
            .collect()
    }

    fn loss_and_grad(
        op: impl Fn(Tensor<2>, &[i64]) -> Tensor<1>,
        logits: &Tensor<2>,
        targets: &[i64],
    ) -> (f32, Vec<f32>) {
        let x = logits.clone().autodiff().require_grad();
        let loss = op(x.clone(), targets);
        let grads = loss.clone().backward();
        let grad = x.grad(&grads).expect("a gradient");
        (
            loss.into_scalar(),
            grad.into_data().try_into_vec::<f32>().unwrap(),
        )
    }

    fn ours(smoothing: f64, transposed: bool) -> impl Fn(Tensor<2>, &[i64]) -> Tensor<1> {
        move |x, targets| {
            let rows = targets.len();
            let device = x.device();
            let targets =
                Tensor::<1, Int>::from_data(TensorData::new(targets.to_vec(), [rows]), &device);
            // A transposed view takes the burn-ops path (the fused kernel wants rows).
            let x = if transposed {
                (x.transpose() * 1.0).transpose()
            } else {
                x
            };
            smoothed_cross_entropy(x, targets, IGNORE, smoothing).unwrap()
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn smoothed_cross_entropy_equals_burns_ops_in_value_and_gradient() {
        for (rows, vocab, smoothing) in [(7, 5, 0.0), (12, 301, 0.1), (5, 30524, 0.1)] {
            let (logits, targets) = case(rows, vocab, rows as u64);
            let (want, want_grad) =
                loss_and_grad(|x, t| reference(x, t, smoothing), &logits, &targets);
            for transposed in [false, true] {
                let (got, got_grad) = loss_and_grad(ours(smoothing, transposed), &logits, &targets);
                assert!(
                    (got - want).abs() < 1e-5,
                    "{vocab} {transposed}: {got} vs {want}"
                );
                let diff = max_diff(&got_grad, &want_grad);
                assert!(diff < 1e-6, "{vocab} {transposed}: gradient max |Δ| {diff}");
            }
            // Without autodiff, the same value.
            let plain = ours(smoothing, false)(logits.clone(), &targets).into_scalar::<f32>();
            assert!((plain - want).abs() < 1e-5);
        }
    }

    #[test]
    fn smoothed_cross_entropy_gradient_matches_finite_differences() {
        let (logits, targets) = case(4, 6, 9);
        let (_, grad) = loss_and_grad(ours(0.1, false), &logits, &targets);
        let values = logits.clone().into_data().try_into_vec::<f32>().unwrap();
        let loss_at = |values: Vec<f32>| -> f64 {
            let x = Tensor::<2>::from_data(TensorData::new(values, [4, 6]), &Device::flex());
            f64::from(ours(0.1, false)(x, &targets).into_scalar::<f32>())
        };
        let h = 1e-2;
        for i in 0..values.len() {
            let (mut up, mut down) = (values.clone(), values.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (loss_at(up) - loss_at(down)) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(grad[i])).abs() < 2e-3,
                "element {i}: {numeric} vs {}",
                grad[i]
            );
        }
    }

    #[test]
    fn linear_smoothed_cross_entropy_equals_burns_ops_in_value_and_gradients() {
        let device = Device::flex();
        // 40 rows: past the few-rows kernel, as in training.
        // 150 rows: three blocks of the flex kernel, accumulating ∂w and ∂b.
        for (rows, vocab, d) in [(3, 11, 4), (40, 301, 8), (150, 97, 8)] {
            device.seed(rows as u64);
            let normal = Distribution::Normal(0.0, 1.0);
            let x = Tensor::<2>::random([rows, d], normal, &device);
            let w = Tensor::<2>::random([vocab, d], normal, &device);
            let b = Tensor::<1>::random([vocab], normal, &device);
            let targets = targets(rows, vocab);
            // `strided`: `w` as a transposed view, which takes the burn-ops path.
            let run = |fused: bool, strided: bool| {
                let x = x.clone().autodiff().require_grad();
                let w = w.clone().autodiff().require_grad();
                let b = b.clone().autodiff().require_grad();
                let loss = if fused {
                    let t = TensorData::new(targets.clone(), [rows]);
                    let t = Tensor::<1, Int>::from_data(t, &x.device());
                    let w_in = if strided {
                        (w.clone().transpose() * 1.0).transpose()
                    } else {
                        w.clone()
                    };
                    linear_smoothed_cross_entropy(x.clone(), w_in, b.clone(), t, IGNORE, 0.1)
                        .unwrap()
                } else {
                    let logits =
                        x.clone().matmul(w.clone().transpose()) + b.clone().reshape([1, vocab]);
                    reference(logits, &targets, 0.1)
                };
                let grads = loss.clone().backward();
                let values =
                    |t: Option<Tensor<2>>| t.unwrap().into_data().try_into_vec::<f32>().unwrap();
                (
                    loss.into_scalar::<f32>(),
                    values(x.grad(&grads)),
                    values(w.grad(&grads)),
                    b.grad(&grads)
                        .unwrap()
                        .into_data()
                        .try_into_vec::<f32>()
                        .unwrap(),
                )
            };
            let (want, want_x, want_w, want_b) = run(false, false);
            for strided in [false, true] {
                let (got, got_x, got_w, got_b) = run(true, strided);
                assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                for (name, a, b) in [
                    ("x", got_x, &want_x),
                    ("w", got_w, &want_w),
                    ("b", got_b, &want_b),
                ] {
                    let diff = max_diff(&a, b);
                    assert!(diff < 1e-6, "{vocab} {strided}: ∂{name} max |Δ| {diff}");
                }
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_typed_errors_naming_the_input() {
        let device = Device::flex();
        let ids = |n: usize| Tensor::<1, Int>::zeros([n], &device);
        let what = |r: crate::Result<Tensor<1>>| match r {
            Err(crate::Error::InputShape { what, .. }) => what,
            other => panic!("{other:?}"),
        };
        let z = Tensor::<2>::zeros([3, 5], &device);
        assert_eq!(
            what(smoothed_cross_entropy(z.clone(), ids(4), IGNORE, 0.1)),
            "targets"
        );
        let empty = Tensor::<2>::zeros([3, 0], &device);
        assert_eq!(
            what(smoothed_cross_entropy(empty, ids(3), IGNORE, 0.1)),
            "logits"
        );
        let (x, w, b) = (
            Tensor::<2>::zeros([3, 4], &device),
            Tensor::<2>::zeros([5, 4], &device),
            Tensor::<1>::zeros([5], &device),
        );
        let head = |x: Tensor<2>, w: Tensor<2>, b: Tensor<1>, n: usize| {
            what(linear_smoothed_cross_entropy(x, w, b, ids(n), IGNORE, 0.1))
        };
        assert_eq!(
            head(x.clone(), Tensor::zeros([5, 6], &device), b.clone(), 3),
            "w"
        );
        assert_eq!(
            head(x.clone(), w.clone(), Tensor::zeros([4], &device), 3),
            "b"
        );
        assert_eq!(head(x, w, b, 2), "targets");
    }

    #[test]
    fn smoothed_cross_entropy_over_no_labelled_row_is_nan_as_pytorch() {
        let (logits, _) = case(3, 4, 1);
        let loss = ours(0.1, false)(logits, &[IGNORE; 3]).into_scalar::<f32>();
        assert!(loss.is_nan());
    }
}
