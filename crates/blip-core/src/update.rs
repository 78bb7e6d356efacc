//! Parameter updates in one pass: AdamW's step and the momentum encoders' moving average.
//!
//! burn's `AdamW` runs each term of its update as its own element-wise op, a dozen passes
//! over every parameter, each writing a tensor the size of the parameter; the moving
//! average `m·θ_m + (1 − m)·θ` takes three. At BLIP-base size (252 M parameters, 1 GB in
//! f32) these passes took 2.3–4.6 s and 0.7–1.4 s of a 17–21 s training step on two cores.
//! On flex in f32 each update here is one vectorised pass per parameter, written in place
//! where no other tensor shares the buffer: 0.4–0.6 s and 0.1 s. Other backends and dtypes
//! take burn's ops with the same formulas.

use burn::tensor::{FloatDType, Tensor};

/// The hyper-parameters and the position of one AdamW step.
///
/// `time` is the step's number, from 1: the bias corrections are `1 − β₁ᵗ` and `1 − β₂ᵗ`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate `η`.
    pub lr: f64,
    /// Decay of the first moment, `β₁`.
    pub beta_1: f32,
    /// Decay of the second moment, `β₂`.
    pub beta_2: f32,
    /// `ε`, added to `√v̂`.
    pub epsilon: f32,
    /// Decoupled weight decay `λ`.
    pub weight_decay: f32,
    /// The step's number, from 1.
    pub time: usize,
}

/// One AdamW step of a parameter `θ` with gradient `g` (PyTorch's `AdamW`, burn's
/// `AdamW` without AMSGrad):
///
/// ```text
/// m ← β₁·m + (1 − β₁)·g          v ← β₂·v + (1 − β₂)·g²
/// θ ← θ·(1 − η·λ) − η · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
/// ```
///
/// `moments` are `(m, v)` from the step before, `None` on the first step (zeros). Returns
/// the new `(θ, m, v)`. On flex in f32, one pass computes all three, in the buffers of `θ`,
/// `m` and `v` where no other tensor shares them. Every tensor must have `param`'s shape.
///
/// ```
/// use blip_core::update::{AdamWStep, adamw};
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let step = AdamWStep { lr: 0.1, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.0, time: 1 };
/// let param = Tensor::<1>::from_floats([1.0, 1.0], &device);
/// let grad = Tensor::<1>::from_floats([0.5, -2.0], &device);
/// let (param, m, v) = adamw(param, grad, None, &step);
/// // The first step moves every weight by η against the sign of its gradient.
/// let param: Vec<f32> = param.into_data().to_vec().unwrap();
/// assert!((param[0] - 0.9).abs() < 1e-6 && (param[1] - 1.1).abs() < 1e-6);
/// let m: Vec<f32> = m.into_data().to_vec().unwrap();
/// assert!((m[0] - 0.05).abs() < 1e-7); // (1 − β₁)·g
/// # let _ = v;
/// ```
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    step: &AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    #[cfg(feature = "flex")]
    let (param, grad, moments) = match flex::adamw(param, grad, moments, step) {
        Ok(updated) => return updated,
        Err(inputs) => inputs,
    };
    adamw_composed(param, grad, moments, step)
}

/// [`adamw`] in burn's ops, in the order burn's own `AdamW` runs them.
fn adamw_composed<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    step: &AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (beta_1, beta_2) = (step.beta_1, step.beta_2);
    let (m, v) = match moments {
        Some((m, v)) => (
            m.mul_scalar(beta_1) + grad.clone().mul_scalar(1.0 - beta_1),
            v.mul_scalar(beta_2) + grad.square().mul_scalar(1.0 - beta_2),
        ),
        None => (
            grad.clone().mul_scalar(1.0 - beta_1),
            grad.square().mul_scalar(1.0 - beta_2),
        ),
    };
    let time = step.time as i32;
    let m_hat = m.clone().div_scalar(1.0 - beta_1.powi(time));
    let v_hat = v.clone().div_scalar(1.0 - beta_2.powi(time));
    let delta = m_hat / v_hat.sqrt().add_scalar(step.epsilon);
    let decay = step.lr * step.weight_decay as f64;
    let param = if decay == 0.0 {
        param
    } else {
        param.mul_scalar(1.0 - decay)
    };
    (param - delta.mul_scalar(step.lr), m, v)
}

/// The exponential moving average of a momentum encoder's parameter:
/// `m·average + (1 − m)·value`, returned detached. `value` is cast to `average`'s dtype
/// (the momentum encoders stay in f32 when the online model computes in half precision)
/// and must have its number of elements; it takes `average`'s shape.
///
/// On flex in f32, one pass, in `average`'s buffer when no other tensor shares it.
///
/// ```
/// use blip_core::update::moving_average;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let average = Tensor::<2>::from_floats([[0.0, 1.0]], &device);
/// let value = Tensor::<2>::from_floats([[1.0, 0.0]], &device);
/// let y: Vec<f32> = moving_average(average, value, 0.9).into_data().to_vec().unwrap();
/// assert!((y[0] - 0.1).abs() < 1e-7 && (y[1] - 0.9).abs() < 1e-7);
/// ```
pub fn moving_average<const D: usize, const E: usize>(
    average: Tensor<D>,
    value: Tensor<E>,
    m: f64,
) -> Tensor<D> {
    let dims = average.dims();
    let value = value
        .detach()
        .cast(FloatDType::from(average.dtype()))
        .reshape(dims);
    let average = average.detach();
    #[cfg(feature = "flex")]
    let (average, value) = match flex::moving_average(average, value, m) {
        Ok(updated) => return updated,
        Err(inputs) => inputs,
    };
    (average * m + value * (1.0 - m)).detach()
}

#[cfg(feature = "flex")]
mod flex {
    //! The one-pass updates on flex's f32 buffers.

    // `Err` hands the inputs back to the composed path: boxing them would save nothing.
    #![allow(clippy::result_large_err, clippy::type_complexity)]

    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Tensor};
    use rayon::prelude::*;

    use super::AdamWStep;
    use crate::kernels::{
        flex_from_values as from_values, flex_owned as owned, flex_values as values, is_plain_flex,
        multiversion,
    };

    /// Elements per parallel task.
    const CHUNK: usize = 1 << 15;

    /// Whether `t` is an f32 tensor of plain flex (autodiff tensors are unwrapped by the
    /// caller where they may come).
    fn fits<const D: usize>(t: &Tensor<D>) -> bool {
        is_plain_flex(&t.device()) && t.dtype() == DType::F32
    }

    fn primitive<const D: usize>(t: Tensor<D>) -> FlexTensor {
        t.try_into_primitive::<Flex>()
            .expect("an f32 tensor of plain flex is a flex primitive")
    }

    fn tensor<const D: usize>(t: FlexTensor) -> Tensor<D> {
        Tensor::from_primitive::<Flex>(t)
    }

    /// Whether `t`'s buffer holds exactly its values in row-major order, and no other tensor
    /// shares it: then it can be written in place.
    fn in_place(t: &FlexTensor) -> bool {
        t.is_unique()
            && t.is_contiguous()
            && t.layout().start_offset() == 0
            && t.storage::<f32>().len() == t.layout().num_elements()
    }

    /// `t` as a buffer to write in place: its own where [`in_place`], else a copy.
    fn writable(t: FlexTensor) -> FlexTensor {
        if in_place(&t) {
            return t;
        }
        let (shape, values) = owned(t);
        from_values(values, shape)
    }

    /// The per-element constants of one step.
    #[derive(Clone, Copy)]
    struct Coefficients {
        beta_1: f32,
        one_minus_beta_1: f32,
        beta_2: f32,
        one_minus_beta_2: f32,
        /// `1 / (1 − β₁ᵗ)`, `1 / (1 − β₂ᵗ)`.
        correction_1: f32,
        correction_2: f32,
        epsilon: f32,
        /// `1 − η·λ`, and `η`.
        keep: f32,
        lr: f32,
    }

    impl Coefficients {
        fn new(step: &AdamWStep) -> Self {
            let time = step.time as i32;
            Self {
                beta_1: step.beta_1,
                one_minus_beta_1: 1.0 - step.beta_1,
                beta_2: step.beta_2,
                one_minus_beta_2: 1.0 - step.beta_2,
                correction_1: 1.0 / (1.0 - step.beta_1.powi(time)),
                correction_2: 1.0 / (1.0 - step.beta_2.powi(time)),
                epsilon: step.epsilon,
                keep: (1.0 - step.lr * step.weight_decay as f64) as f32,
                lr: step.lr as f32,
            }
        }

        /// One element: the new `(θ, m, v)`.
        #[inline(always)]
        fn apply(&self, theta: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
            let m = self.beta_1 * m + self.one_minus_beta_1 * g;
            let v = self.beta_2 * v + self.one_minus_beta_2 * (g * g);
            let delta = (m * self.correction_1) / ((v * self.correction_2).sqrt() + self.epsilon);
            (theta * self.keep - self.lr * delta, m, v)
        }
    }

    multiversion! {
        /// AdamW on one chunk, `θ` in place.
        fn adamw_in_place(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Coefficients) {
            for (((theta, &g), m), v) in theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                (*theta, *m, *v) = c.apply(*theta, g, *m, *v);
            }
        }
    }

    multiversion! {
        /// AdamW on one chunk, `θ` read from `from` and written to `theta`.
        fn adamw_into(from: &[f32], theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Coefficients) {
            for ((((theta, &from), &g), m), v) in
                theta.iter_mut().zip(from).zip(g).zip(m.iter_mut()).zip(v.iter_mut())
            {
                (*theta, *m, *v) = c.apply(from, g, *m, *v);
            }
        }
    }

    pub(super) fn adamw<const D: usize>(
        param: Tensor<D>,
        grad: Tensor<D>,
        moments: Option<(Tensor<D>, Tensor<D>)>,
        step: &AdamWStep,
    ) -> Result<
        (Tensor<D>, Tensor<D>, Tensor<D>),
        (Tensor<D>, Tensor<D>, Option<(Tensor<D>, Tensor<D>)>),
    > {
        let dims = param.dims();
        let moments_fit = moments
            .as_ref()
            .is_none_or(|(m, v)| fits(m) && fits(v) && m.dims() == dims && v.dims() == dims);
        if !fits(&param) || !fits(&grad) || grad.dims() != dims || !moments_fit {
            return Err((param, grad, moments));
        }
        let n = dims.iter().product::<usize>();
        let c = Coefficients::new(step);
        let grad = primitive(grad);
        let g = values(&grad);
        let (mut m, mut v) = match moments {
            Some((m, v)) => (writable(primitive(m)), writable(primitive(v))),
            None => {
                let zeros = || from_values(vec![0f32; n], dims.to_vec());
                (zeros(), zeros())
            }
        };
        let mut param = primitive(param);
        let (ms, vs) = (m.storage_mut::<f32>(), v.storage_mut::<f32>());
        let chunks = g
            .par_chunks(CHUNK)
            .zip(ms.par_chunks_mut(CHUNK))
            .zip(vs.par_chunks_mut(CHUNK));
        if in_place(&param) {
            let theta = param.storage_mut::<f32>();
            chunks
                .zip(theta.par_chunks_mut(CHUNK))
                .for_each(|(((g, m), v), theta)| adamw_in_place(theta, g, m, v, c));
        } else {
            let from = values(&param);
            let mut out = vec![0f32; n];
            chunks
                .zip(from.par_chunks(CHUNK))
                .zip(out.par_chunks_mut(CHUNK))
                .for_each(|((((g, m), v), from), theta)| adamw_into(from, theta, g, m, v, c));
            drop(from);
            param = from_values(out, dims.to_vec());
        }
        Ok((tensor(param), tensor(m), tensor(v)))
    }

    multiversion! {
        /// `average ← m·average + (1 − m)·value` on one chunk.
        fn lerp(average: &mut [f32], value: &[f32], m: f32, rest: f32) {
            for (a, &x) in average.iter_mut().zip(value) {
                *a = m * *a + rest * x;
            }
        }
    }

    pub(super) fn moving_average<const D: usize>(
        average: Tensor<D>,
        value: Tensor<D>,
        m: f64,
    ) -> Result<Tensor<D>, (Tensor<D>, Tensor<D>)> {
        // The momentum encoders live on the training device: the update reads and writes
        // their values below autodiff (nothing here is tracked).
        let autodiff = average.device().is_autodiff();
        let (average, value) = (average.inner(), value.inner());
        if !fits(&average) || !fits(&value) {
            let lift = |t: Tensor<D>| if autodiff { Tensor::from_inner(t) } else { t };
            return Err((lift(average), lift(value)));
        }
        let mut average = writable(primitive(average));
        let value = primitive(value);
        let x = values(&value);
        let (m, rest) = (m as f32, (1.0 - m) as f32);
        average
            .storage_mut::<f32>()
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(a, x)| lerp(a, x, m, rest));
        let average = tensor(average);
        Ok(if autodiff {
            Tensor::from_inner(average)
        } else {
            average
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor};

    use super::*;
    use crate::test_util::{uniform, values};

    /// `[n, 3]` uniform values of plain flex.
    fn rows(seed: u64, n: usize, lo: f64, hi: f64) -> Tensor<2> {
        uniform(seed, [n, 3], lo, hi, &Device::flex())
    }

    fn assert_close(what: &str, got: &[f32], expected: &[f32]) {
        assert_eq!(got.len(), expected.len(), "{what}");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!(
                approx::relative_eq!(*g, *e, max_relative = 1e-6, epsilon = 1e-7),
                "{what}[{i}]: {g} against {e}"
            );
        }
    }

    /// Three steps, from no moments, of the one-pass update against the composed one, with
    /// the parameter shared (written to a new buffer) and not (written in place).
    #[test]
    fn adamw_matches_burns_ops_in_place_and_not() {
        let step = |time| AdamWStep {
            lr: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.05,
            time,
        };
        // More elements than one parallel chunk, so that chunks are split.
        let n = 40_000;
        for share in [false, true] {
            let mut fused = (rows(1, n, -1.0, 1.0), None);
            let mut composed = (rows(1, n, -1.0, 1.0), None);
            for time in 1..=3 {
                let grad = rows(10 + time as u64, n, -0.1, 0.1);
                let before = values(fused.0.clone());
                let keep = share.then(|| fused.0.clone());
                let (p, m, v) = adamw(fused.0, grad.clone(), fused.1, &step(time));
                if let Some(keep) = keep {
                    // A shared parameter keeps its values.
                    assert_eq!(values(keep), before);
                }
                fused = (p, Some((m, v)));
                let (p, m, v) = adamw_composed(composed.0, grad, composed.1, &step(time));
                composed = (p, Some((m, v)));
                let ((p, (m, v)), (q, (m2, v2))) = (
                    (fused.0.clone(), fused.1.clone().unwrap()),
                    (composed.0.clone(), composed.1.clone().unwrap()),
                );
                assert_close("θ", &values(p), &values(q));
                assert_close("m", &values(m), &values(m2));
                assert_close("v", &values(v), &values(v2));
            }
        }
    }

    /// One step against the formula written out in f64.
    #[test]
    fn adamw_follows_the_formula() {
        let step = AdamWStep {
            lr: 0.01,
            beta_1: 0.8,
            beta_2: 0.9,
            epsilon: 1e-3,
            weight_decay: 0.5,
            time: 2,
        };
        let device = Device::flex();
        let t = |v: [f32; 2]| Tensor::<1>::from_floats(v, &device);
        let (p, m, v) = adamw(
            t([1.0, -2.0]),
            t([0.3, -0.4]),
            Some((t([0.1, 0.2]), t([0.05, 0.01]))),
            &step,
        );
        let (p, m, v) = (values(p), values(m), values(v));
        for (i, (theta, g, m0, v0)) in [(1.0, 0.3, 0.1, 0.05), (-2.0, -0.4, 0.2, 0.01)]
            .into_iter()
            .enumerate()
        {
            let m1: f64 = 0.8 * m0 + 0.2 * g;
            let v1: f64 = 0.9 * v0 + 0.1 * g * g;
            let delta = (m1 / (1.0 - 0.64)) / ((v1 / (1.0 - 0.81)).sqrt() + 1e-3);
            let theta1 = theta * (1.0 - 0.01 * 0.5) - 0.01 * delta;
            approx::assert_relative_eq!(m[i] as f64, m1, max_relative = 1e-6);
            approx::assert_relative_eq!(v[i] as f64, v1, max_relative = 1e-6);
            approx::assert_relative_eq!(p[i] as f64, theta1, max_relative = 1e-6);
        }
    }

    #[test]
    fn moving_average_matches_burns_ops_and_leaves_shared_inputs() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            let average = uniform(3, [20_000, 3], -1.0, 1.0, &device);
            let value = uniform(4, [60_000], -1.0, 1.0, &device);
            let expected =
                values(average.clone() * 0.995 + value.clone().reshape([20_000, 3]) * 0.005);
            let before = values(average.clone());
            let kept = average.clone();
            let updated = moving_average(average, value, 0.995);
            assert_eq!(updated.device().is_autodiff(), device.is_autodiff());
            assert_close("average", &values(updated), &expected);
            assert_eq!(
                values(kept),
                before,
                "a shared average is not written in place"
            );
        }
    }
}
