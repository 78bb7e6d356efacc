//! ITC and ITM, exactly as the original `BLIP_Pretrain.forward` computes them.

use blip_core::SplitMix64;

use crate::error::{Result, TrainError};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor};

/// Image–text contrastive loss with momentum distillation.
///
/// Inputs: L2-normalised online features `v = image_feat`, `t = text_feat` (`[B, D]`), the
/// momentum encoders' features `v_m`, `t_m` (`[B, D]`), the feature queues `Q_v`, `Q_t`
/// (`[D, K]`, normalised along `D`), the temperature `τ` (`[1]`, learnable) and the
/// distillation weight `α`.
///
/// With `T_all = [t_mᵀ | Q_t]` and `V_all = [v_mᵀ | Q_v]` (`[D, B + K]`):
///
/// * `s_i2t = v·T_all / τ`, `s_t2i = t·V_all / τ` (online vs momentum + queue);
/// * targets `y_i2t = α·softmax(v_m·T_all / τ) + (1 − α)·I`, likewise `y_t2i`, where `I`
///   is 1 at column `i` of row `i` (the paired sample) and 0 elsewhere, queue included —
///   computed without gradient;
/// * `L_itc = ½·[ mean_i(−Σ_j y_i2t[i,j]·log_softmax(s_i2t)[i,j]) + mean_i(same for t2i) ]`.
///
/// `positives`, when given (`[B, B + K]`, rows summing to 1), replaces `I`: retrieval
/// fine-tuning spreads the target over every caption of the same image.
///
/// ```
/// use blip_train::itc_loss;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let images = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
/// let queue = Tensor::<2>::from_floats([[-1.0, 0.0], [0.0, -1.0]], &device); // K = 2 columns
/// // No distillation (α = 0); the momentum features equal the online ones.
/// let itc = |texts: Tensor<2>| -> f32 {
///     let temp = Tensor::<1>::from_floats([0.01], &device);
///     let (v, q) = (images.clone(), queue.clone());
///     itc_loss(v.clone(), texts.clone(), v, texts, q.clone(), q, temp, 0.0, None).into_scalar()
/// };
/// // Each caption's feature is its image's: the pairs are perfectly separated.
/// assert!(itc(images.clone()) < 1e-3);
/// // Captions swapped: each image is closest to the other image's caption.
/// let swapped = Tensor::<2>::from_floats([[0.0, 1.0], [1.0, 0.0]], &device);
/// assert!(itc(swapped) > 10.0);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn itc_loss(
    image_feat: Tensor<2>,
    text_feat: Tensor<2>,
    image_feat_m: Tensor<2>,
    text_feat_m: Tensor<2>,
    image_queue: Tensor<2>,
    text_queue: Tensor<2>,
    temp: Tensor<1>,
    alpha: f64,
    positives: Option<Tensor<2>>,
) -> Tensor<1> {
    let [b, _] = image_feat.dims();
    let [_, k] = image_queue.dims();
    let device = image_feat.device();
    let image_all = Tensor::cat(vec![image_feat_m.clone().transpose(), image_queue], 1);
    let text_all = Tensor::cat(vec![text_feat_m.clone().transpose(), text_queue], 1);
    let inv_temp = temp.recip().reshape([1, 1]);
    let hard = positives.unwrap_or_else(|| identity_targets(b, b + k, &device));
    let soft = |momentum: Tensor<2>, keys: Tensor<2>| {
        let inv = inv_temp.clone().detach();
        let sim = momentum.matmul(keys) * inv;
        (softmax(sim, 1) * alpha + hard.clone() * (1.0 - alpha)).detach()
    };
    let i2t_targets = soft(image_feat_m, text_all.clone());
    let t2i_targets = soft(text_feat_m, image_all.clone());
    let sim_i2t = image_feat.matmul(text_all) * inv_temp.clone();
    let sim_t2i = text_feat.matmul(image_all) * inv_temp;
    let cross_entropy = |sim: Tensor<2>, targets: Tensor<2>| {
        (log_softmax(sim, 1) * targets).sum_dim(1).mean().neg()
    };
    (cross_entropy(sim_i2t, i2t_targets) + cross_entropy(sim_t2i, t2i_targets)) / 2.0
}

/// `[rows, cols]` with 1 at `(i, i)`: each sample's own pair is its positive.
fn identity_targets(rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    let r = Tensor::<1, Int>::arange(0..rows as i64, device).reshape([rows, 1]);
    let c = Tensor::<1, Int>::arange(0..cols as i64, device).reshape([1, cols]);
    r.equal(c).float()
}

/// Hard-negative sampling weights from an ITC similarity block `sim` (`[B, B]`: row `i`
/// against the batch's own momentum features): `softmax(sim, rows) + 1e-4`, diagonal set to
/// 0 so that a sample never draws its own pair. Draw one negative per row in proportion.
///
/// ```
/// use blip_train::hard_negative_weights;
/// use burn::tensor::{Device, Tensor};
///
/// // Row i: sample i against the batch's three samples (its own pair on the diagonal).
/// let sim = Tensor::<2>::from_floats(
///     [[9.0, 2.0, 1.0], [2.0, 9.0, 1.0], [1.0, 2.0, 9.0]],
///     &Device::flex(),
/// );
/// let w = hard_negative_weights(sim).into_data().try_into_vec_as::<f32>().unwrap();
/// assert_eq!([w[0], w[4], w[8]], [0.0; 3]); // a sample never draws its own pair
/// assert!(w[1] > w[2]); // the more similar other sample is the harder negative
/// ```
pub fn hard_negative_weights(sim: Tensor<2>) -> Tensor<2> {
    let [b, _] = sim.dims();
    let off_diagonal = identity_targets(b, b, &sim.device()).neg() + 1.0;
    ((softmax(sim.detach(), 1) + 1e-4) * off_diagonal).detach()
}

/// Draws one hard negative per row of `weights` (`[B, B]`, from [`hard_negative_weights`]):
/// index `j` with probability proportional to `weights[i, j]`, from the seeded `rng`, as the
/// original's `torch.multinomial(weights[i], 1)`.
///
/// A row with no positive weight has no negative to draw: a batch of one, or, in retrieval
/// fine-tuning, a batch whose every sample shows the row's image. That row is a
/// [`TrainError::Batch`] naming it, as torch's multinomial raises there; drawing anyway
/// would pick index 0, which may be the positive pair itself. So is a NaN or negative weight.
///
/// ```
/// use blip_train::{SplitMix64, sample_negatives};
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// // Row 0 can only draw 1, row 1 only 0, row 2 either 0 or 1: never itself.
/// let weights = Tensor::<2>::from_floats(
///     [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]],
///     &device,
/// );
/// let drawn = sample_negatives(weights.clone(), &mut SplitMix64::new(7))?;
/// assert_eq!(drawn[..2], [1, 0]);
/// assert!(drawn[2] < 2);
/// // The same seed draws the same negatives.
/// assert_eq!(drawn, sample_negatives(weights, &mut SplitMix64::new(7))?);
/// // A row with no candidate is an error, not a draw of its own pair.
/// let stuck = Tensor::<2>::from_floats([[0.0, 1.0], [0.0, 0.0]], &device);
/// assert!(sample_negatives(stuck, &mut SplitMix64::new(7)).is_err());
/// # Ok::<(), blip_train::TrainError>(())
/// ```
pub fn sample_negatives(weights: Tensor<2>, rng: &mut SplitMix64) -> Result<Vec<usize>> {
    let [b, cols] = weights.dims();
    let values = weights
        .into_data()
        .convert::<f64>()
        .try_into_vec_as::<f64>()
        .map_err(|e| TrainError::Batch(format!("hard-negative weights: {e:?}")))?;
    values
        .chunks(cols.max(1))
        .take(b)
        .enumerate()
        .map(|(i, row)| {
            let valid = row.iter().all(|w| w.is_finite() && *w >= 0.0);
            if !valid || !row.iter().any(|&w| w > 0.0) {
                return Err(TrainError::Batch(format!(
                    "hard-negative row {i} has no candidate (weights {row:?}): every other \
                     sample of the batch is a positive for it; use a larger or shuffled batch"
                )));
            }
            Ok(rng.weighted(row))
        })
        .collect()
}

/// BLIP's ramp of the distillation weight: `α·min(1, (epoch·S + step) / (ramp_epochs·S))`
/// with `S` steps per epoch — over the first 2 epochs in pre-training, 1 in retrieval
/// fine-tuning.
///
/// ```
/// use blip_train::alpha_ramp;
///
/// // α = 0.4, ramped over 2 epochs of 100 steps.
/// assert_eq!(alpha_ramp(0.4, 0, 0, 100, 2), 0.0);
/// assert!((alpha_ramp(0.4, 1, 0, 100, 2) - 0.2).abs() < 1e-12); // half-way
/// assert_eq!(alpha_ramp(0.4, 2, 0, 100, 2), 0.4);
/// assert_eq!(alpha_ramp(0.4, 7, 50, 100, 2), 0.4); // then held
/// ```
pub fn alpha_ramp(
    alpha: f64,
    epoch: usize,
    step: usize,
    steps_per_epoch: usize,
    ramp_epochs: usize,
) -> f64 {
    let progress =
        (epoch * steps_per_epoch + step) as f64 / (ramp_epochs * steps_per_epoch).max(1) as f64;
    alpha * progress.min(1.0)
}

/// ITM labels for `B` positives followed by `2B` negatives: `[1]·B ++ [0]·2B`.
///
/// ```
/// use blip_train::itm_labels;
/// use burn::tensor::Device;
///
/// let labels = itm_labels(2, &Device::flex());
/// let labels = labels.into_data().try_into_vec_as::<i64>().unwrap();
/// assert_eq!(labels, [1, 1, 0, 0, 0, 0]); // 2 positives, then 2·2 negatives
/// ```
pub fn itm_labels(batch: usize, device: &Device) -> Tensor<1, Int> {
    let ones = Tensor::<1, Int>::ones([batch], device);
    Tensor::cat(vec![ones, Tensor::zeros([2 * batch], device)], 0)
}

/// Image–text matching loss: `L_itm = mean_i −log softmax(logits_i)[y_i]` over the ITM
/// head's logits `[3B, 2]` for (text_i, image_i), (text_i, hard negative image),
/// (hard negative text, image_i), with `y` from [`itm_labels`] (class 1 = match).
///
/// ```
/// use blip_train::itm_loss;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let itm = |logits: Tensor<2>| -> f32 { itm_loss(logits).into_scalar() };
/// // B = 1: the positive pair (class 1 = match), then its two negatives (class 0).
/// let right = Tensor::<2>::from_floats([[-5.0, 5.0], [5.0, -5.0], [5.0, -5.0]], &device);
/// assert!(itm(right) < 1e-3);
/// // Undecided logits cost ln 2 per pair.
/// assert!((itm(Tensor::zeros([3, 2], &device)) - std::f32::consts::LN_2).abs() < 1e-5);
/// ```
pub fn itm_loss(logits: Tensor<2>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let labels = itm_labels(n / 3, &logits.device());
    log_softmax(logits, 1)
        .gather(1, labels.reshape([n, 1]))
        .mean()
        .neg()
}
