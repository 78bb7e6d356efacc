//! Heads on the text transformer: the LM head of the image-grounded decoder and the LM loss.
//! (The ITM head and the ITC projections are plain `Linear`s on the task models.)

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::{gelu, log_softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use blip_core::ops::dense;

use crate::config::TextConfig;
use crate::error::Result;
use crate::generate::{Generated, GenerationConfig, SpecialTokens, generate};
use crate::med::{CrossInput, TextModel, linear};
use crate::tokenizer::Encoded;

/// Dense + GELU + LayerNorm before the vocabulary projection.
#[derive(Module, Debug)]
pub struct PredictionHeadTransform {
    /// `D → D`.
    pub dense: Linear,
    /// LayerNorm (eps 1e-12).
    pub layer_norm: LayerNorm,
}

/// BERT's LM head (`cls.predictions`): `transform`, then the word-embedding matrix
/// (tied: there is no separate decoder weight) plus a vocabulary bias.
#[derive(Module, Debug)]
pub struct LmPredictionHead {
    /// Transform block.
    pub transform: PredictionHeadTransform,
    /// `[vocab]` bias (checkpoint `cls.predictions.bias`, aliased as `decoder.bias`).
    pub bias: Param<Tensor<1>>,
}

/// The image-grounded decoder: a [`TextModel`] (`bert`) with the LM head.
#[derive(Module, Debug)]
pub struct TextLmHeadModel {
    /// The text transformer, run causally with cross-attention.
    pub bert: TextModel,
    /// The LM head (checkpoint `cls.predictions`).
    pub lm_head: LmPredictionHead,
    /// `[SEP]`: where generation stops.
    pub sep_token_id: usize,
    /// `[PAD]`.
    pub pad_token_id: usize,
}

impl TextConfig {
    /// Builds a decoder with LM head, random weights.
    pub fn init_lm_head_model(&self, device: &Device) -> TextLmHeadModel {
        TextLmHeadModel {
            bert: self.init(device),
            lm_head: self.init_lm_prediction_head(device),
            sep_token_id: self.sep_token_id,
            pad_token_id: self.pad_token_id,
        }
    }

    /// The LM head alone (transform + bias; its decoder is the tied word embeddings).
    pub fn init_lm_prediction_head(&self, device: &Device) -> LmPredictionHead {
        let d = self.hidden_size;
        LmPredictionHead {
            transform: PredictionHeadTransform {
                dense: linear(d, d, device),
                layer_norm: LayerNormConfig::new(d)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device),
            },
            bias: Initializer::Zeros.init([self.vocab_size], device),
        }
    }
}

impl LmPredictionHead {
    /// `[B, L, D]` states → `[B, L, vocab]` logits, using the tied `word_embeddings`.
    pub fn forward(&self, hidden: Tensor<3>, word_embeddings: Tensor<2>) -> Tensor<3> {
        let h = self
            .transform
            .layer_norm
            .forward(gelu(dense(&self.transform.dense, hidden)));
        let [b, l, d] = h.dims();
        let logits = blip_core::ops::matmul_by_transpose(h.reshape([b * l, d]), word_embeddings);
        let vocab = logits.dims()[1];
        (logits + self.bias.val().reshape([1, vocab])).reshape([b, l, vocab])
    }
}

impl TextLmHeadModel {
    /// Decoder logits `[B, L, vocab]` for `input_ids` (first token `[DEC]`), causal, with
    /// cross-attention to `cross`.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cross: CrossInput,
    ) -> Result<Tensor<3>> {
        let hidden = self.bert.decode(input_ids, attention_mask, cross)?;
        Ok(self.logits(hidden))
    }

    /// Generates from `prompts` (each starting with `[DEC]`) attending to `cross`; see
    /// [`crate::generate()`].
    pub fn generate(
        &self,
        cross: CrossInput,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<Generated>>> {
        let special = SpecialTokens {
            eos: self.sep_token_id as u32,
            pad: self.pad_token_id as u32,
        };
        generate(self, cross, prompts, config, special)
    }

    /// LM-head logits for decoder states.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.lm_head
            .forward(hidden, self.bert.embeddings.word_embeddings.weight.val())
    }
}

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
/// (ε from the config, 0.0 in hub configs). Returns a 1-element tensor.
pub fn lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>, label_smoothing: f64) -> Tensor<1> {
    let (per_token, weight) = token_losses(logits, labels, label_smoothing);
    (per_token * weight.clone()).sum() / weight.sum()
}

/// As [`lm_loss`], but summed over each sequence's supervised tokens instead of averaged
/// over the batch: `[B]`, the original `reduction='none'` (VQA answer ranking).
pub fn lm_loss_per_sequence(
    logits: Tensor<3>,
    labels: Tensor<2, Int>,
    label_smoothing: f64,
) -> Tensor<1> {
    let [b, _, _] = logits.dims();
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
