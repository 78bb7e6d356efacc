//! Heads on the text transformer: the LM head of the image-grounded decoder (its loss is in
//! [`crate::loss`]).
//! (The ITM head and the ITC projections are plain `Linear`s on the task models.)

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Device, Int, Tensor};

use blip_core::ops::dense;

use crate::config::TextConfig;
use crate::error::Result;
use crate::generate::{Decoder, Generated, GenerationConfig, SpecialTokens, generate};
use crate::med::{CrossInput, TextModel, linear};

/// Dense + GELU + LayerNorm before the vocabulary projection.
///
/// ```
/// use burn::tensor::activation::gelu;
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// let transform = text.init_lm_prediction_head(&device).transform;
/// let x = Tensor::<3>::ones([1, 2, 32], &device);
/// let y = transform.forward(x.clone());
/// assert_eq!(y.dims(), [1, 2, 32]);
/// let plain = transform.layer_norm.forward(gelu(transform.dense.forward(x)));
/// let diff: f32 = (y.clone() - plain).abs().max().into_scalar();
/// assert!(diff < 1e-5);
/// // Fresh LayerNorm (scale 1, shift 0): every position has mean 0.
/// let means = y.mean_dim(2).into_data().try_into_vec_as::<f32>().unwrap();
/// assert!(means.iter().all(|m| m.abs() < 1e-4));
/// ```
#[derive(Module, Debug)]
pub struct PredictionHeadTransform {
    /// `D → D`.
    pub dense: Linear,
    /// LayerNorm (eps 1e-12).
    pub layer_norm: LayerNorm,
    /// Its epsilon (the config's `layer_norm_eps`).
    pub layer_norm_eps: f64,
}

impl PredictionHeadTransform {
    /// `LayerNorm(GELU(dense(x)))` (the LayerNorm in f32 for a half-precision model, fused
    /// in training on flex).
    pub fn forward(&self, hidden: Tensor<3>) -> Tensor<3> {
        let h = blip_core::fused::gelu(dense(&self.dense, hidden));
        blip_core::fused::layer_norm(&self.layer_norm, h, self.layer_norm_eps)
            .expect("dense keeps the norm's width")
    }
}

/// BERT's LM head (`cls.predictions`): `transform`, then the word-embedding matrix
/// (tied: there is no separate decoder weight) plus a vocabulary bias.
///
/// ```
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// let bert = text.init(&device);
/// let head = text.init_lm_prediction_head(&device);
/// let bias = head.bias.val().into_data().try_into_vec_as::<f32>().unwrap();
/// assert!(bias.len() == 64 && bias.iter().all(|&b| b == 0.0));
/// // The vocabulary projection is the (tied) word-embedding matrix.
/// let logits = head.forward(Tensor::ones([2, 3, 32], &device), bert.embeddings.word_embeddings.weight.val());
/// assert_eq!(logits.dims(), [2, 3, 64]);
/// ```
#[derive(Module, Debug)]
pub struct LmPredictionHead {
    /// Transform block.
    pub transform: PredictionHeadTransform,
    /// `[vocab]` bias (checkpoint `cls.predictions.bias`, aliased as `decoder.bias`).
    pub bias: Param<Tensor<1>>,
}

/// The image-grounded decoder: a [`TextModel`] (`bert`) with the LM head.
///
/// ```
/// use blip_text::{CrossInput, ids_tensor};
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// let decoder = text.init_lm_head_model(&device);
/// assert_eq!(decoder.sep_token_id, 2);
/// let image = CrossInput { states: Tensor::zeros([1, 5, 32], &device), mask: None };
/// let ids = ids_tensor(&[vec![3, 10, 11]], &device); // [DEC] and two tokens
/// let logits = decoder.forward(ids, None, image)?;
/// assert_eq!(logits.dims(), [1, 3, 64]);
/// # Ok::<(), blip_text::Error>(())
/// ```
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
                layer_norm_eps: self.layer_norm_eps,
            },
            bias: Initializer::Zeros.init([self.vocab_size], device),
        }
    }
}

impl LmPredictionHead {
    /// `[B, L, D]` states → `[B, L, vocab]` logits, using the tied `word_embeddings`.
    pub fn forward(&self, hidden: Tensor<3>, word_embeddings: Tensor<2>) -> Tensor<3> {
        let h = self.transform.forward(hidden);
        let [b, l, d] = h.dims();
        let logits = blip_core::ops::matmul_by_transpose(h.reshape([b * l, d]), word_embeddings);
        let vocab = logits.dims()[1];
        (logits + self.bias.val().reshape([1, vocab])).reshape([b, l, vocab])
    }
}

impl LmPredictionHead {
    /// [`crate::lm_loss`] of [`Self::forward`]'s logits for decoder states `hidden`
    /// (`[B, L, D]`) against `labels` (`[B, L]`, as [`crate::lm_labels`] builds them): the
    /// same value and gradients, with the `[B·L, vocab]` logits computed once outside the
    /// autodiff graph ([`blip_core::ops::linear_smoothed_cross_entropy`]). What training
    /// uses: at BLIP's 30524-token vocabulary the logits dominate a small model's step.
    ///
    /// ```
    /// use blip_text::{IGNORE_INDEX, TextConfig, lm_loss};
    /// use burn::tensor::{Device, Distribution, Int, Tensor};
    ///
    /// let device = Device::flex();
    /// let mut text = TextConfig::base(16);
    /// (text.vocab_size, text.hidden_size) = (50, 16);
    /// let head = text.init_lm_prediction_head(&device);
    /// let embeddings = Tensor::<2>::random([50, 16], Distribution::Normal(0.0, 1.0), &device);
    /// let hidden = Tensor::<3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &device);
    /// let labels = Tensor::<2, Int>::from_ints([[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, 8, 9, IGNORE_INDEX]], &device);
    /// let fused = head.loss(hidden.clone(), embeddings.clone(), labels.clone(), 0.1).unwrap().into_scalar::<f32>();
    /// let plain = lm_loss(head.forward(hidden.clone(), embeddings.clone()), labels, 0.1).unwrap().into_scalar::<f32>();
    /// assert!((fused - plain).abs() < 1e-5);
    /// // Labels of another shape than the states' [B, L] are an error, not a panic.
    /// let short = Tensor::<2, Int>::from_ints([[IGNORE_INDEX, 5, 6]], &device);
    /// assert!(head.loss(hidden, embeddings, short, 0.1).is_err());
    /// ```
    pub fn loss(
        &self,
        hidden: Tensor<3>,
        word_embeddings: Tensor<2>,
        labels: Tensor<2, Int>,
        label_smoothing: f64,
    ) -> Result<Tensor<1>> {
        let [b, l, d] = hidden.dims();
        crate::loss::check_labels(&labels, b, l)?;
        if l < 2 {
            return crate::lm_loss(
                self.forward(hidden, word_embeddings),
                labels,
                label_smoothing,
            );
        }
        let h = self.transform.forward(hidden);
        Ok(blip_core::ops::linear_smoothed_cross_entropy(
            h.reshape([b * l, d]),
            word_embeddings,
            self.bias.val(),
            crate::loss::next_token_targets(labels),
            crate::IGNORE_INDEX,
            label_smoothing,
        )?)
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
        generate(self, cross, prompts, config)
    }

    /// LM-head logits for decoder states.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.lm_head
            .forward(hidden, self.bert.embeddings.word_embeddings.weight.val())
    }
}

impl Decoder for TextLmHeadModel {
    fn text_model(&self) -> &TextModel {
        &self.bert
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        TextLmHeadModel::logits(self, hidden)
    }

    fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            eos: self.sep_token_id as u32,
            pad: self.pad_token_id as u32,
        }
    }
}
