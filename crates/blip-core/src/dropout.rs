//! Dropout and stochastic depth (drop-path) for training.
//!
//! BLIP trains its text transformer with BERT's dropout (0.1 on hidden states and attention
//! probabilities) and its ViT with drop-path (0 for ViT-B pre-training, 0.1 for ViT-L and for
//! VQA). Both are on only inside [`train`]: a forward pass outside it is the inference model,
//! whatever the device, so the same modules serve training and inference.
//!
//! The masks come from a counter-based stream: the mask of the `n`-th dropout call inside a
//! [`train`] scope is a pure function of the scope's key and `n`. A trainer that keys each
//! batch by `(seed, epoch, batch)` therefore draws the same masks after a resume as in an
//! uninterrupted run, with no generator state to save, and every backend draws the same masks
//! (they are made on the host). burn's own `Dropout` draws from the backend's global
//! generator, which neither a checkpoint nor a concurrent thread leaves alone.
//!
//! ```
//! use blip_core::dropout::{self, DropoutRates};
//! use burn::tensor::{Device, Tensor};
//!
//! # fn main() -> Result<(), blip_core::dropout::RateError> {
//! let device = Device::flex();
//! let x = Tensor::<2>::ones([4, 1000], &device);
//! let rates = DropoutRates::new(0.1, 0.1, 0.0)?;
//! let y = dropout::train(rates, 7, || dropout::hidden(x.clone()));
//! let kept = y.clone().greater_elem(0.0).float().mean().into_scalar::<f32>();
//! assert!((kept - 0.9).abs() < 0.02);
//! // Outside a scope dropout is the identity.
//! assert_eq!(dropout::hidden(x.clone()).into_data(), x.into_data());
//! # Ok(()) }
//! ```

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{Tensor, TensorData};

use crate::split_mix64;

/// The dropout rates of a training run.
///
/// ```
/// use blip_core::dropout::DropoutRates;
///
/// let rates = DropoutRates::new(0.1, 0.1, 0.0)?;
/// assert_eq!((rates.hidden, rates.attention, rates.drop_path), (0.1, 0.1, 0.0));
/// assert_eq!(DropoutRates::NONE, DropoutRates::new(0.0, 0.0, 0.0)?);
/// assert!(DropoutRates::new(1.0, 0.1, 0.0).is_err()); // 1 would drop everything
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutRates {
    /// Dropout on hidden states: text embeddings, attention outputs and feed-forward outputs
    /// (BERT's `hidden_dropout_prob`).
    pub hidden: f64,
    /// Dropout on attention probabilities (BERT's `attention_probs_dropout_prob`).
    pub attention: f64,
    /// The ViT's stochastic depth at its last block; block `i` of `n` drops its residual
    /// branches with `drop_path · i / (n − 1)` (timm's `linspace(0, drop_path, n)`).
    pub drop_path: f64,
}

impl DropoutRates {
    /// No dropout at all.
    pub const NONE: Self = Self {
        hidden: 0.0,
        attention: 0.0,
        drop_path: 0.0,
    };

    /// Rates, each checked by [`check_rate`].
    pub fn new(hidden: f64, attention: f64, drop_path: f64) -> Result<Self, RateError> {
        for (name, rate) in [
            ("hidden dropout", hidden),
            ("attention dropout", attention),
            ("drop-path rate", drop_path),
        ] {
            check_rate(name, rate).map_err(RateError)?;
        }
        Ok(Self {
            hidden,
            attention,
            drop_path,
        })
    }
}

/// A dropout rate outside `[0, 1)`, with the message naming it.
///
/// ```
/// use blip_core::dropout::{DropoutRates, RateError};
///
/// let err: RateError = DropoutRates::new(0.1, 1.5, 0.0).unwrap_err();
/// assert_eq!(err.to_string(), "attention dropout 1.5 is outside [0, 1)");
/// assert_eq!(err, RateError("attention dropout 1.5 is outside [0, 1)".into()));
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct RateError(pub String);

/// A rate must lie in `[0, 1)`: at 1 every unit is dropped and the rescaling `1 / (1 − p)`
/// divides by zero. Returns the message naming `name` otherwise.
///
/// ```
/// use blip_core::dropout::check_rate;
///
/// assert!(check_rate("hidden dropout", 0.1).is_ok());
/// let message = check_rate("hidden dropout", 1.0).unwrap_err();
/// assert_eq!(message, "hidden dropout 1 is outside [0, 1)");
/// assert!(check_rate("drop-path rate", f64::NAN).is_err());
/// ```
pub fn check_rate(name: &str, rate: f64) -> std::result::Result<(), String> {
    if rate.is_finite() && (0.0..1.0).contains(&rate) {
        Ok(())
    } else {
        Err(format!("{name} {rate} is outside [0, 1)"))
    }
}

/// One [`train`] scope: its rates, key and the number of masks drawn so far.
#[derive(Debug)]
struct Stream {
    rates: DropoutRates,
    key: u64,
    calls: AtomicU64,
}

thread_local! {
    static ACTIVE: RefCell<Option<Arc<Stream>>> = const { RefCell::new(None) };
}

/// Restores the previous scope when a [`train`] or [`carry`] scope ends, panics included.
struct Restore(Option<Arc<Stream>>);

impl Drop for Restore {
    fn drop(&mut self) {
        ACTIVE.with(|active| *active.borrow_mut() = self.0.take());
    }
}

fn enter(stream: Option<Arc<Stream>>) -> Restore {
    Restore(ACTIVE.with(|active| active.replace(stream)))
}

/// Runs `f` with dropout on at `rates`, drawing masks from the stream `key` (see the module
/// documentation). Nested scopes replace the outer one until they end.
///
/// ```
/// use blip_core::dropout::{self, DropoutRates};
/// use burn::tensor::{Device, Tensor};
///
/// let x = Tensor::<2>::ones([4, 8], &Device::flex());
/// let rates = DropoutRates::new(0.5, 0.0, 0.0)?;
/// let draw = |key| {
///     let y = dropout::train(rates, key, || dropout::hidden(x.clone()));
///     y.into_data().to_vec::<f32>().unwrap()
/// };
/// assert_eq!(draw(42), draw(42)); // the same key draws the same mask
/// assert!(draw(42).iter().all(|&v| v == 0.0 || v == 2.0)); // kept values scaled by 1 / (1 - p)
/// assert_eq!(dropout::train(rates, 42, dropout::rates), Some(rates));
/// assert_eq!(dropout::rates(), None); // off again once the scope ends
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
pub fn train<R>(rates: DropoutRates, key: u64, f: impl FnOnce() -> R) -> R {
    let _restore = enter(Some(Arc::new(Stream {
        rates,
        key,
        calls: AtomicU64::new(0),
    })));
    f()
}

/// The scope of the calling thread, for work that moves to another thread: `carry` on that
/// thread continues the same stream (`blip_core::ops::on_thread_pool` does this).
///
/// ```
/// use blip_core::dropout::{self, DropoutRates, Scope};
///
/// let rates = DropoutRates::new(0.1, 0.0, 0.0)?;
/// let (carried, empty) = dropout::train(rates, 7, || {
///     let scope: Scope = dropout::current();
///     let thread = std::thread::spawn(move || dropout::carry(scope, dropout::rates));
///     let carried = thread.join().unwrap();
///     (carried, dropout::carry(Scope::default(), dropout::rates))
/// });
/// assert_eq!(carried, Some(rates)); // the other thread continues the scope
/// assert_eq!(empty, None); // the default scope has dropout off
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Scope(Option<Arc<Stream>>);

/// The calling thread's scope (empty outside [`train`]).
///
/// ```
/// use blip_core::dropout::{self, DropoutRates};
///
/// let rates = DropoutRates::new(0.1, 0.1, 0.0)?;
/// let scope = dropout::train(rates, 3, dropout::current);
/// // The scope outlives `train`: carried later, it has the same rates.
/// assert_eq!(dropout::carry(scope, dropout::rates), Some(rates));
/// // Outside any scope, `current` is the empty scope.
/// assert_eq!(dropout::carry(dropout::current(), dropout::rates), None);
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
pub fn current() -> Scope {
    Scope(ACTIVE.with(|active| active.borrow().clone()))
}

/// Runs `f` inside `scope` (taken with [`current`] on another thread).
///
/// ```
/// use blip_core::dropout::{self, DropoutRates};
///
/// let rates = DropoutRates::new(0.2, 0.0, 0.0)?;
/// let seen = dropout::train(rates, 5, || {
///     let scope = dropout::current();
///     std::thread::scope(|s| s.spawn(|| dropout::carry(scope, dropout::rates)).join().unwrap())
/// });
/// assert_eq!(seen, Some(rates));
/// // A thread that does not carry the scope has dropout off.
/// let bare = dropout::train(rates, 5, || std::thread::spawn(dropout::rates).join().unwrap());
/// assert_eq!(bare, None);
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
pub fn carry<R>(scope: Scope, f: impl FnOnce() -> R) -> R {
    let _restore = enter(scope.0);
    f()
}

/// The active rates, if any.
///
/// ```
/// use blip_core::dropout::{self, DropoutRates};
///
/// assert_eq!(dropout::rates(), None);
/// let rates = DropoutRates::new(0.1, 0.1, 0.0)?;
/// assert_eq!(dropout::train(rates, 0, dropout::rates), Some(rates));
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
pub fn rates() -> Option<DropoutRates> {
    ACTIVE.with(|active| active.borrow().as_ref().map(|s| s.rates))
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A keep-mask of `n` values, each `1 / (1 − p)` with probability `1 − p` and 0 otherwise,
/// from the next call of the active stream.
fn mask(stream: &Stream, n: usize, p: f64) -> Vec<f32> {
    let call = stream.calls.fetch_add(1, Ordering::Relaxed);
    let base = split_mix64(stream.key ^ split_mix64(call.wrapping_add(1).wrapping_mul(GOLDEN)));
    let scale = (1.0 / (1.0 - p)) as f32;
    // Compare 24-bit uniforms with p: exact in f32, and fine enough for any rate in use.
    let threshold = (p * (1u64 << 24) as f64).round() as u64;
    (0..n as u64)
        .map(|i| {
            let u = split_mix64(base.wrapping_add(i.wrapping_mul(GOLDEN))) >> 40;
            if u >= threshold { scale } else { 0.0 }
        })
        .collect()
}

/// `x` times a keep-mask drawn at `rate` of the active rates: one value per element, or
/// with `per_sample` one per index of the first dimension (broadcast over the others).
fn drop<const D: usize>(
    x: Tensor<D>,
    rate: impl Fn(&DropoutRates) -> f64,
    per_sample: bool,
) -> Tensor<D> {
    let stream = ACTIVE.with(|active| active.borrow().clone());
    let Some(stream) = stream else {
        return x;
    };
    let p = rate(&stream.rates);
    if p == 0.0 {
        return x;
    }
    let mut dims = x.dims();
    if per_sample {
        dims[1..].fill(1);
    }
    let values = mask(&stream, dims.iter().product(), p);
    // In x's own type (a half-precision model's activations in mixed-precision training).
    let keep = Tensor::<D>::from_data(TensorData::new(values, dims), (&x.device(), x.dtype()));
    x * keep
}

/// Dropout on hidden states at the active scope's `hidden` rate; the identity outside
/// [`train`].
///
/// ```
/// use blip_core::dropout::{self, DropoutRates};
/// use burn::tensor::{Device, Tensor};
///
/// let x = Tensor::<3>::ones([2, 4, 8], &Device::flex());
/// // Outside `train` it is the identity.
/// assert_eq!(dropout::hidden(x.clone()).into_data().to_vec::<f32>().unwrap(), vec![1.0; 64]);
/// let rates = DropoutRates::new(0.5, 0.0, 0.0)?;
/// let y = dropout::train(rates, 1, || dropout::hidden(x.clone()));
/// assert_eq!(y.dims(), [2, 4, 8]);
/// assert!(y.into_data().to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0 || v == 2.0));
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
pub fn hidden<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    drop(x, |r| r.hidden, false)
}

/// Dropout on attention probabilities `[B, H, L_q, L_k]` at the active `attention` rate.
///
/// ```
/// use blip_core::dropout::{self, DropoutRates};
/// use burn::tensor::{Device, Tensor};
///
/// let probs = Tensor::<4>::ones([1, 2, 4, 4], &Device::flex());
/// // Only the `attention` rate applies: at hidden 0.5, attention 0 nothing is dropped.
/// let hidden_only = DropoutRates::new(0.5, 0.0, 0.0)?;
/// let kept = dropout::train(hidden_only, 1, || dropout::attention_probs(probs.clone()));
/// assert_eq!(kept.into_data().to_vec::<f32>().unwrap(), vec![1.0; 32]);
/// let attention_only = DropoutRates::new(0.0, 0.5, 0.0)?;
/// let dropped = dropout::train(attention_only, 1, || dropout::attention_probs(probs.clone()));
/// assert!(dropped.into_data().to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0 || v == 2.0));
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
pub fn attention_probs(x: Tensor<4>) -> Tensor<4> {
    drop(x, |r| r.attention, false)
}

/// Whether attention probabilities are dropped in the current scope: attention must then be
/// computed in steps instead of by a fused kernel.
///
/// ```
/// use blip_core::dropout::{self, DropoutRates};
///
/// assert!(!dropout::drops_attention());
/// assert!(dropout::train(DropoutRates::new(0.1, 0.1, 0.0)?, 0, dropout::drops_attention));
/// assert!(!dropout::train(DropoutRates::new(0.1, 0.0, 0.0)?, 0, dropout::drops_attention));
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
pub fn drops_attention() -> bool {
    rates().is_some_and(|r| r.attention > 0.0)
}

/// Stochastic depth of a residual branch `[B, T, D]` in block `layer` of `depth`: each
/// sample's branch is zeroed with probability `drop_path · layer / (depth − 1)` and scaled
/// by `1 / (1 − rate)` otherwise (timm's `DropPath`).
///
/// ```
/// use blip_core::dropout::{self, DropoutRates};
/// use burn::tensor::{Device, Tensor};
///
/// let branch = Tensor::<3>::ones([64, 2, 3], &Device::flex());
/// let rates = DropoutRates::new(0.0, 0.0, 0.5)?;
/// // The last block of 3 drops at the full rate 0.5, each sample as a whole.
/// let last = dropout::train(rates, 9, || dropout::drop_path(branch.clone(), 2, 3));
/// for sample in last.into_data().to_vec::<f32>().unwrap().chunks(6) {
///     assert!(sample.iter().all(|&v| v == sample[0]) && (sample[0] == 0.0 || sample[0] == 2.0));
/// }
/// // The first block never drops.
/// let first = dropout::train(rates, 9, || dropout::drop_path(branch.clone(), 0, 3));
/// assert_eq!(first.into_data().to_vec::<f32>().unwrap(), vec![1.0; 384]);
/// # Ok::<(), blip_core::dropout::RateError>(())
/// ```
pub fn drop_path(branch: Tensor<3>, layer: usize, depth: usize) -> Tensor<3> {
    let at_layer = |r: &DropoutRates| match depth {
        0 | 1 => 0.0,
        _ => r.drop_path * layer as f64 / (depth - 1) as f64,
    };
    drop(branch, at_layer, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;
    use burn::tensor::Device;

    fn rates(hidden: f64) -> DropoutRates {
        DropoutRates::new(hidden, hidden, hidden).unwrap()
    }

    #[test]
    fn masks_keep_the_expected_fraction_rescaled() {
        let device = Device::flex();
        let x = Tensor::<2>::ones([100, 1000], &device);
        for p in [0.1, 0.5] {
            let y = values(train(rates(p), 1, || hidden(x.clone())));
            let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
            // 10⁵ draws: the standard error of the fraction is below 0.0016.
            assert!((kept - (1.0 - p)).abs() < 0.01, "p {p}: kept {kept}");
            let scale = (1.0 / (1.0 - p)) as f32;
            assert!(y.iter().all(|&v| v == 0.0 || v == scale));
            let mean = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
            assert!((mean - 1.0).abs() < 0.02, "p {p}: mean {mean}");
        }
    }

    #[test]
    fn the_stream_is_a_function_of_key_and_call_order() {
        let device = Device::flex();
        let x = Tensor::<2>::ones([8, 64], &device);
        let draw = |key| {
            train(rates(0.5), key, || {
                (values(hidden(x.clone())), values(hidden(x.clone())))
            })
        };
        let (a1, a2) = draw(3);
        let (b1, b2) = draw(3);
        assert_eq!((a1.clone(), a2.clone()), (b1, b2));
        assert_ne!(a1, a2, "two calls of one scope draw different masks");
        assert_ne!(draw(4).0, a1, "another key draws another mask");
    }

    #[test]
    fn off_outside_a_scope_and_at_rate_zero() {
        let device = Device::flex();
        let x = Tensor::<3>::ones([2, 3, 4], &device);
        assert_eq!(values(hidden(x.clone())), vec![1.0; 24]);
        assert_eq!(values(drop_path(x.clone(), 1, 2)), vec![1.0; 24]);
        let y = train(DropoutRates::NONE, 1, || {
            (hidden(x.clone()), drop_path(x.clone(), 1, 2))
        });
        assert_eq!(values(y.0), vec![1.0; 24]);
        assert_eq!(values(y.1), vec![1.0; 24]);
        assert_eq!(rates_after_scope(), None);
    }

    fn rates_after_scope() -> Option<DropoutRates> {
        train(rates(0.1), 1, || ());
        super::rates()
    }

    #[test]
    fn drop_path_drops_whole_samples_and_grows_with_depth() {
        let device = Device::flex();
        let x = Tensor::<3>::ones([4000, 2, 3], &device);
        let y = values(train(rates(0.5), 9, || drop_path(x.clone(), 2, 3)));
        for sample in y.chunks(6) {
            assert!(sample.iter().all(|&v| v == sample[0]), "{sample:?}");
        }
        let kept = y.chunks(6).filter(|s| s[0] != 0.0).count() as f64 / 4000.0;
        assert!((kept - 0.5).abs() < 0.03, "last block keeps {kept}");
        // The first block of a stack never drops.
        let first = values(train(rates(0.5), 9, || drop_path(x.clone(), 0, 3)));
        assert!(first.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn rates_outside_the_unit_interval_are_errors() {
        for bad in [1.0, -0.1, f64::NAN, f64::INFINITY] {
            let err = DropoutRates::new(0.1, bad, 0.0).unwrap_err().to_string();
            assert!(err.contains("attention dropout"), "{err}");
        }
    }

    #[test]
    fn a_scope_carries_to_another_thread() {
        let device = Device::flex();
        let x = Tensor::<2>::ones([4, 16], &device);
        let here = train(rates(0.5), 5, || {
            let first = values(hidden(x.clone()));
            (first, values(hidden(x.clone())))
        });
        let carried = train(rates(0.5), 5, || {
            let scope = current();
            let first = std::thread::scope(|s| {
                s.spawn(|| carry(scope, || values(hidden(x.clone()))))
                    .join()
                    .unwrap()
            });
            (first, values(hidden(x.clone())))
        });
        assert_eq!(
            here, carried,
            "the other thread's call counts in the stream"
        );
    }
}
