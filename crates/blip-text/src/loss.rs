//! The captioning LM loss (label-smoothed next-token cross-entropy) and its labels.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::Result;
use crate::tokenizer::Encoded;

/// Label used for positions excluded from the loss (padding, prompt), as in PyTorch.
pub const IGNORE_INDEX: i64 = -100;

/// LM labels `[B, L]` for decoder inputs: the ids, with padding and the first
/// `prompt_length` positions (`[DEC]` + prompt) set to [`IGNORE_INDEX`], as the original
/// masks them before [`lm_loss`].
///
/// ```
/// use blip_text::{Encoded, IGNORE_INDEX, lm_labels};
/// use burn::tensor::Device;
/// let text = Encoded { input_ids: vec![vec![30522, 7, 8, 102, 0]], attention_mask: vec![vec![1, 1, 1, 1, 0]] };
/// let labels = lm_labels(&text, 2, &Device::flex()).into_data().try_into_vec_as::<i64>().unwrap();
/// assert_eq!(labels, [IGNORE_INDEX, IGNORE_INDEX, 8, 102, IGNORE_INDEX]);
/// ```
pub fn lm_labels(text: &Encoded, prompt_length: usize, device: &Device) -> Tensor<2, Int> {
    let flat: Vec<i64> = text
        .input_ids
        .iter()
        .zip(&text.attention_mask)
        .flat_map(|(ids, mask)| {
            ids.iter().zip(mask).enumerate().map(|(i, (&id, &m))| {
                if m == 0 || i < prompt_length {
                    IGNORE_INDEX
                } else {
                    id as i64
                }
            })
        })
        .collect();
    Tensor::from_data(TensorData::new(flat, text.shape()), device)
}

/// The captioning LM loss: next-token cross-entropy with label smoothing `ε`, averaged over
/// the positions whose label is not [`IGNORE_INDEX`].
///
/// With `p_t = softmax(logits[:, t])` and targets shifted once (`y_t = labels[:, t + 1]`):
///
/// `L = Σ_{t: y_t ≠ -100} [ (1 − ε)·(−log p_t[y_t]) + ε·mean_c(−log p_t[c]) ] / #{t: y_t ≠ -100}`
///
/// which is PyTorch's `CrossEntropyLoss(ignore_index=-100, label_smoothing=ε)` on
/// `logits[:, :-1]` vs `labels[:, 1:]` — the original BLIP decoder (ε = 0.1) and transformers
/// (ε from the config, 0.0 in hub configs). Returns a 1-element tensor; labels of another
/// shape than the logits' `[B, L]` are an input-shape error.
///
/// ```
/// use blip_text::{IGNORE_INDEX, lm_loss};
/// use burn::tensor::{Device, Int, Tensor};
///
/// let device = Device::flex();
/// // Uniform logits over 4 tokens: every supervised position costs ln 4.
/// let logits = Tensor::<3>::zeros([1, 3, 4], &device);
/// let labels = Tensor::<2, Int>::from_ints([[IGNORE_INDEX, 2, 1]], &device);
/// let loss = lm_loss(logits, labels, 0.0).unwrap().into_scalar::<f32>();
/// assert!((loss - 4f32.ln()).abs() < 1e-5);
/// ```
pub fn lm_loss(
    logits: Tensor<3>,
    labels: Tensor<2, Int>,
    label_smoothing: f64,
) -> Result<Tensor<1>> {
    let [b, l, v] = logits.dims();
    check_labels(&labels, b, l)?;
    // Reduced in f32 whatever the model's precision.
    let logits = blip_core::precision::to_f32(logits);
    if l < 2 {
        // No position has a next token: 0/0, as PyTorch's mean over nothing.
        let (per_token, weight) = token_losses(logits, labels, label_smoothing);
        return Ok((per_token * weight.clone()).sum() / weight.sum());
    }
    Ok(blip_core::ops::smoothed_cross_entropy(
        logits.reshape([b * l, v]),
        next_token_targets(labels),
        IGNORE_INDEX,
        label_smoothing,
    )?)
}

/// `labels` must be `[B, L]`, the shape of the decoder input they label.
pub(crate) fn check_labels(labels: &Tensor<2, Int>, b: usize, l: usize) -> Result<()> {
    if labels.dims() == [b, l] {
        return Ok(());
    }
    Err(blip_core::Error::InputShape {
        what: "labels",
        expected: format!("[{b}, {l}] (the decoder input's batch and length)"),
        found: labels.dims().to_vec(),
    }
    .into())
}

/// The target of every position, `[B·L]`: position `t` predicts `labels[t + 1]`, the last
/// position nothing ([`IGNORE_INDEX`]). Shifting the labels rather than cutting the logits
/// keeps the logits one contiguous `[B·L, V]`. `L` must be at least 2.
pub(crate) fn next_token_targets(labels: Tensor<2, Int>) -> Tensor<1, Int> {
    let [b, l] = labels.dims();
    let device = labels.device();
    Tensor::cat(
        vec![
            labels.narrow(1, 1, l - 1),
            Tensor::full([b, 1], IGNORE_INDEX, &device),
        ],
        1,
    )
    .reshape([b * l])
}

/// As [`lm_loss`], but summed over each sequence's supervised tokens instead of averaged
/// over the batch: `[B]`, the original `reduction='none'` (VQA answer ranking).
///
/// ```
/// use blip_text::{IGNORE_INDEX, lm_loss_per_sequence};
/// use burn::tensor::{Device, Int, Tensor};
///
/// let device = Device::flex();
/// let logits = Tensor::<3>::zeros([2, 3, 4], &device); // uniform: ln 4 per token
/// let labels = Tensor::<2, Int>::from_ints([[0, 2, 1], [0, 3, IGNORE_INDEX]], &device);
/// let losses = lm_loss_per_sequence(logits, labels, 0.0).into_data().try_into_vec_as::<f32>().unwrap();
/// // Summed over each row's supervised targets: two in the first row, one in the second.
/// assert!((losses[0] - 2.0 * 4f32.ln()).abs() < 1e-5);
/// assert!((losses[1] - 4f32.ln()).abs() < 1e-5);
/// ```
pub fn lm_loss_per_sequence(
    logits: Tensor<3>,
    labels: Tensor<2, Int>,
    label_smoothing: f64,
) -> Tensor<1> {
    let [b, _, _] = logits.dims();
    let logits = blip_core::precision::to_f32(logits);
    let (per_token, weight) = token_losses(logits, labels, label_smoothing);
    (per_token * weight).sum_dim(1).reshape([b])
}

/// Per-token smoothed cross-entropy `[B, L-1]` of the shifted targets, and the 0/1 weights
/// of the supervised ones.
fn token_losses(
    logits: Tensor<3>,
    labels: Tensor<2, Int>,
    label_smoothing: f64,
) -> (Tensor<2>, Tensor<2>) {
    let [b, l, v] = logits.dims();
    let logits = logits.narrow(1, 0, l - 1).reshape([b * (l - 1), v]);
    let targets = labels.narrow(1, 1, l - 1).reshape([b * (l - 1)]);
    let keep = targets.clone().not_equal_elem(IGNORE_INDEX);
    let weight = keep.clone().float().reshape([b, l - 1]);
    let safe_targets = targets.mask_fill(keep.bool_not(), 0);
    let log_probs = log_softmax(logits, 1);
    let nll = log_probs
        .clone()
        .gather(1, safe_targets.reshape([b * (l - 1), 1]))
        .reshape([b, l - 1])
        .neg();
    let smooth = log_probs.mean_dim(1).reshape([b, l - 1]).neg();
    (
        nll * (1.0 - label_smoothing) + smooth * label_smoothing,
        weight,
    )
}
