//! MED, BLIP's "multimodal mixture of encoder-decoder": one BERT stack ([`TextModel`]) run in
//! three modes.
//!
//! | mode | self-attention | cross-attention | first token | used for |
//! |---|---|---|---|---|
//! | [`TextModel::encode_text`] | bidirectional | skipped | `[CLS]` | ITC |
//! | [`TextModel::encode_multimodal`] | bidirectional | on the image | `[ENC]` (or `[CLS]`, as HF) | ITM, VQA question |
//! | [`TextModel::decode`] | causal | on the image | `[DEC]` | LM, captioning, VQA answer |
//!
//! In training, inside a [`blip_core::dropout::train`] scope, BERT's dropout applies where
//! the original's does: after the embeddings' LayerNorm, on attention probabilities, and on
//! the attention and feed-forward outputs before their residual LayerNorms.
//!
//! Field names equal the BERT checkpoint keys except `self` (a Rust keyword) →
//! `self_attention` and `LayerNorm` → `layer_norm`; see the key maps in [`crate::hf`].

use burn::module::Module;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor};

use blip_core::ops::dense;
use blip_core::{dropout, fused, precision};

use crate::config::TextConfig;
use crate::error::{Error, Result};

/// Word + absolute position embeddings, LayerNorm (no token types, as BLIP).
///
/// ```
/// use blip_text::ids_tensor;
/// use burn::tensor::Device;
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// let embeddings = text.init(&device).embeddings;
/// assert_eq!(embeddings.word_embeddings.weight.val().dims(), [64, 32]);
/// assert_eq!(embeddings.position_embeddings.weight.val().dims(), [32, 32]);
/// let x = embeddings.forward(ids_tensor(&[vec![1, 10, 2]], &device));
/// assert_eq!(x.dims(), [1, 3, 32]);
/// ```
#[derive(Module, Debug)]
pub struct TextEmbeddings {
    /// `[vocab, D]`; the LM head's decoder is tied to it.
    pub word_embeddings: Embedding,
    /// `[max_positions, D]`.
    pub position_embeddings: Embedding,
    /// LayerNorm (eps 1e-12).
    pub layer_norm: LayerNorm,
    /// The LayerNorm's epsilon (the config's `layer_norm_eps`; burn keeps `LayerNorm`'s own
    /// private, and the fused LayerNorm of training needs it).
    pub layer_norm_eps: f64,
}

/// Query/key/value projections of one attention block. For cross-attention the key and
/// value read `encoder_hidden_size`-wide states.
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
/// let block = text.init_attention(32, &device).self_attention;
/// let x = Tensor::<3>::ones([1, 4, 32], &device);
/// let kv = block.key_value(x.clone());
/// assert_eq!(kv.key.dims(), [1, 2, 4, 16]); // [batch, heads, length, head width]
/// assert_eq!(block.attend(x, &kv, None).dims(), [1, 4, 32]);
/// ```
#[derive(Module, Debug)]
pub struct TextSelfAttention {
    /// `D → D`.
    pub query: Linear,
    /// `D_kv → D`.
    pub key: Linear,
    /// `D_kv → D`.
    pub value: Linear,
    /// Number of heads.
    pub num_heads: usize,
}

/// Output projection, residual and post-LayerNorm of an attention block.
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
/// let output = text.init_attention(32, &device).output;
/// assert_eq!(output.dense.weight.val().dims(), [32, 32]);
/// // A fresh LayerNorm maps a constant vector to zeros.
/// let y = output.layer_norm.forward(Tensor::<3>::ones([1, 2, 32], &device) * 3.0);
/// assert!(y.into_data().try_into_vec_as::<f32>().unwrap().iter().all(|v| v.abs() < 1e-3));
/// ```
#[derive(Module, Debug)]
pub struct TextAttentionOutput {
    /// `D → D`.
    pub dense: Linear,
    /// Post-residual LayerNorm.
    pub layer_norm: LayerNorm,
    /// The LayerNorm's epsilon (the config's `layer_norm_eps`; burn keeps `LayerNorm`'s own
    /// private, and the fused LayerNorm of training needs it).
    pub layer_norm_eps: f64,
}

/// A self- or cross-attention block: `LayerNorm(x + dense(attention(x, kv)))`.
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
/// let attention = text.init_attention(32, &device);
/// let x = Tensor::<3>::ones([2, 3, 32], &device);
/// let kv = attention.self_attention.key_value(x.clone());
/// assert_eq!(attention.forward(x, &kv, None).dims(), [2, 3, 32]);
/// // A cross-attention block's keys read 48-wide states.
/// let cross = text.init_attention(48, &device);
/// assert_eq!(cross.self_attention.key.weight.val().dims(), [48, 32]);
/// ```
#[derive(Module, Debug)]
pub struct TextAttention {
    /// Projections (checkpoint name `self`).
    pub self_attention: TextSelfAttention,
    /// Output block.
    pub output: TextAttentionOutput,
}

/// First half of the feed-forward block.
///
/// ```
/// use burn::tensor::Device;
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let bert = text.init(&Device::flex());
/// let intermediate = &bert.encoder.layer[0].intermediate;
/// assert_eq!(intermediate.dense.weight.val().dims(), [32, 64]); // D → intermediate_size
/// ```
#[derive(Module, Debug)]
pub struct TextIntermediate {
    /// `D → 4·D`, followed by GELU.
    pub dense: Linear,
}

/// Second half of the feed-forward block, with residual and LayerNorm.
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
/// let output = &bert.encoder.layer[0].output;
/// assert_eq!(output.dense.weight.val().dims(), [64, 32]); // intermediate_size → D
/// let y = output.dense.forward(Tensor::<3>::zeros([1, 2, 64], &device));
/// assert_eq!(output.layer_norm.forward(y).dims(), [1, 2, 32]);
/// ```
#[derive(Module, Debug)]
pub struct TextOutput {
    /// `4·D → D`.
    pub dense: Linear,
    /// Post-residual LayerNorm.
    pub layer_norm: LayerNorm,
    /// The LayerNorm's epsilon (the config's `layer_norm_eps`; burn keeps `LayerNorm`'s own
    /// private, and the fused LayerNorm of training needs it).
    pub layer_norm_eps: f64,
}

/// One post-LN BERT layer with an optional cross-attention block.
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
/// let layer = &bert.encoder.layer[0];
/// assert!(layer.crossattention.is_some()); // `add_cross_attention` is true by default
/// let x = Tensor::<3>::ones([1, 3, 32], &device);
/// let kv = layer.attention.self_attention.key_value(x.clone());
/// assert_eq!(layer.forward(x, &kv, None, None).dims(), [1, 3, 32]);
/// ```
#[derive(Module, Debug)]
pub struct TextLayer {
    /// Self-attention (bidirectional or causal).
    pub attention: TextAttention,
    /// Cross-attention to image (or question) states; present in every BLIP checkpoint.
    pub crossattention: Option<TextAttention>,
    /// Feed-forward, first half.
    pub intermediate: TextIntermediate,
    /// Feed-forward, second half.
    pub output: TextOutput,
}

/// The layer stack.
///
/// ```
/// use burn::tensor::Device;
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// text.num_hidden_layers = 3;
/// let encoder = text.init(&Device::flex()).encoder;
/// assert_eq!(encoder.layer.len(), 3);
/// assert!(encoder.layer.iter().all(|layer| layer.crossattention.is_some()));
/// ```
#[derive(Module, Debug)]
pub struct TextEncoder {
    /// Layers, in order.
    pub layer: Vec<TextLayer>,
}

/// BLIP's BERT text transformer (MED).
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
/// let bert = text.init(&device);
/// let ids = ids_tensor(&[vec![1, 10, 11, 2]], &device);
/// let image = CrossInput { states: Tensor::zeros([1, 5, 32], &device), mask: None };
/// assert_eq!(bert.encode_text(ids.clone(), None)?.dims(), [1, 4, 32]);
/// assert_eq!(bert.encode_multimodal(ids.clone(), None, image.clone())?.dims(), [1, 4, 32]);
/// assert_eq!(bert.decode(ids, None, image)?.dims(), [1, 4, 32]);
/// // Ids outside the vocabulary are refused.
/// assert!(bert.encode_text(ids_tensor(&[vec![1, 64]], &device), None).is_err());
/// # Ok::<(), blip_text::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct TextModel {
    /// Embeddings.
    pub embeddings: TextEmbeddings,
    /// Layers.
    pub encoder: TextEncoder,
}

/// States the text attends to in the image-grounded modes, with their padding mask.
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
/// let bert = text.init(&device);
/// // Two images of 5 tokens, the first with its last two tokens masked out.
/// let mask = ids_tensor(&[vec![1, 1, 1, 0, 0], vec![1; 5]], &device);
/// let images = CrossInput { states: Tensor::zeros([2, 5, 32], &device), mask: Some(mask) };
/// let ids = ids_tensor(&[vec![1, 10, 2], vec![1, 11, 2]], &device);
/// assert_eq!(bert.encode_multimodal(ids, None, images)?.dims(), [2, 3, 32]);
/// # Ok::<(), blip_text::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CrossInput {
    /// `[B, L_kv, D_kv]`: image tokens (or, for the VQA answer decoder, question states).
    pub states: Tensor<3>,
    /// `[B, L_kv]`, 1 = attend, 0 = padding; `None` attends to everything.
    pub mask: Option<Tensor<2, Int>>,
}

/// Keys and values `[B, H, L, hd]` of one attention block, computed once and reused.
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
/// let kvs = bert.cross_key_values(Tensor::zeros([2, 5, 32], &device));
/// assert_eq!(kvs.len(), 1); // one per layer
/// assert_eq!(kvs[0].key.dims(), [2, 2, 5, 16]); // [batch, heads, length, head width]
/// assert_eq!(kvs[0].value.dims(), kvs[0].key.dims());
/// ```
#[derive(Debug, Clone)]
pub struct KeyValue {
    /// Keys.
    pub key: Tensor<4>,
    /// Values.
    pub value: Tensor<4>,
}

/// A Linear with BERT's initialisation (normal, std 0.02), used by every text-side module
/// and the ITC/ITM heads.
///
/// ```
/// use blip_text::linear;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let layer = linear(32, 8, &device);
/// assert_eq!(layer.weight.val().dims(), [32, 8]);
/// assert_eq!(layer.forward(Tensor::<2>::zeros([4, 32], &device)).dims(), [4, 8]);
/// ```
pub fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        })
        .init(device)
}

impl TextConfig {
    /// A self- (`kv_width` = hidden size) or cross-attention block with random weights.
    pub fn init_attention(&self, kv_width: usize, device: &Device) -> TextAttention {
        let d = self.hidden_size;
        TextAttention {
            self_attention: TextSelfAttention {
                query: linear(d, d, device),
                key: linear(kv_width, d, device),
                value: linear(kv_width, d, device),
                num_heads: self.num_attention_heads,
            },
            output: TextAttentionOutput {
                dense: linear(d, d, device),
                layer_norm: LayerNormConfig::new(d)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device),
                layer_norm_eps: self.layer_norm_eps,
            },
        }
    }

    /// Builds a [`TextModel`] with random (lazily initialised) weights.
    pub fn init(&self, device: &Device) -> TextModel {
        let d = self.hidden_size;
        let norm = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let embedding = |n| {
            EmbeddingConfig::new(n, d)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device)
        };
        let layer = (0..self.num_hidden_layers)
            .map(|_| TextLayer {
                attention: self.init_attention(d, device),
                crossattention: self
                    .add_cross_attention
                    .then(|| self.init_attention(self.encoder_hidden_size, device)),
                intermediate: TextIntermediate {
                    dense: linear(d, self.intermediate_size, device),
                },
                output: TextOutput {
                    dense: linear(self.intermediate_size, d, device),
                    layer_norm: norm(),
                    layer_norm_eps: self.layer_norm_eps,
                },
            })
            .collect();
        TextModel {
            embeddings: TextEmbeddings {
                word_embeddings: embedding(self.vocab_size),
                position_embeddings: embedding(self.max_position_embeddings),
                layer_norm: norm(),
                layer_norm_eps: self.layer_norm_eps,
            },
            encoder: TextEncoder { layer },
        }
    }
}

/// Additive attention bias `[B, 1, L_q, L_k]` in `dtype` from a `[B, L_k]` keep-mask,
/// optionally causal (query `i` sees keys `0..=past + i`). Masked entries get the type's most
/// negative finite value, as transformers does: a row with nothing visible then softmaxes to
/// uniform instead of NaN.
pub(crate) fn attention_bias(
    mask: Option<Tensor<2, Int>>,
    batch: usize,
    queries: usize,
    keys: usize,
    causal: bool,
    device: &Device,
    dtype: DType,
) -> Option<Tensor<4>> {
    if mask.is_none() && !causal {
        return None;
    }
    let keep = match mask {
        Some(mask) => mask.float().reshape([batch, 1, 1, keys]),
        None => Tensor::ones([batch, 1, 1, keys], device),
    };
    let keep = if causal {
        let past = (keys - queries) as i64;
        // key index j is visible from query i iff j <= past + i
        let q = Tensor::<1, Int>::arange(0..queries as i64, device).reshape([queries, 1]);
        let k = Tensor::<1, Int>::arange(0..keys as i64, device).reshape([1, keys]);
        let visible = k.lower_equal(q.add_scalar(past)).float();
        keep * visible.reshape([1, 1, queries, keys])
    } else {
        keep.expand([batch, 1, queries, keys])
    };
    Some(((keep.neg() + 1.0) * precision::masked_bias(dtype)).cast(FloatDType::from(dtype)))
}

impl TextSelfAttention {
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, l, d] = x.dims();
        x.reshape([b, l, self.num_heads, d / self.num_heads])
            .swap_dims(1, 2)
    }

    /// Keys and values of `states` (`[B, L, D_kv]`), split into heads.
    pub fn key_value(&self, states: Tensor<3>) -> KeyValue {
        KeyValue {
            key: self.split_heads(dense(&self.key, states.clone())),
            value: self.split_heads(dense(&self.value, states)),
        }
    }

    /// Scaled dot-product attention of `x`'s queries over `kv`, heads merged back.
    pub fn attend(&self, x: Tensor<3>, kv: &KeyValue, bias: Option<Tensor<4>>) -> Tensor<3> {
        let [b, l, d] = x.dims();
        let q = self.split_heads(dense(&self.query, x));
        // In training on flex (autodiff), and wherever attention probabilities are dropped
        // (which needs them in hand), attention runs in steps around the fused softmax;
        // elsewhere burn's fused kernel is faster.
        let context = if dropout::drops_attention() || fused::has_backward(&q.device()) {
            let scale = 1.0 / ((d / self.num_heads) as f64).sqrt();
            let scores = q.matmul(kv.key.clone().swap_dims(2, 3));
            // The mask broadcasts over the heads as it is; expanded, it would be copied.
            let probs = fused::attention_softmax(scores, scale, bias)
                .expect("the mask is [B, 1 or H, L_q, L_k], built for these scores");
            dropout::attention_probs(probs).matmul(kv.value.clone())
        } else {
            let bias = bias.map(|bias| {
                let [bb, _, lq, lk] = bias.dims();
                bias.expand([bb, self.num_heads, lq, lk])
            });
            attention(
                q,
                kv.key.clone(),
                kv.value.clone(),
                None,
                bias,
                AttentionModuleOptions::default(),
            )
        };
        context.swap_dims(1, 2).reshape([b, l, d])
    }
}

impl TextAttention {
    /// `LayerNorm(x + dense(attend(x, kv)))`.
    pub fn forward(&self, x: Tensor<3>, kv: &KeyValue, bias: Option<Tensor<4>>) -> Tensor<3> {
        let context = self.self_attention.attend(x.clone(), kv, bias);
        let out = dropout::hidden(dense(&self.output.dense, context));
        post_norm(&self.output.layer_norm, out + x, self.output.layer_norm_eps)
    }
}

impl TextLayer {
    /// Self-attention over `x`'s own keys (or over `self_kv`, when cached ones are given),
    /// cross-attention over `cross` when given, then the feed-forward block.
    pub fn forward(
        &self,
        x: Tensor<3>,
        self_kv: &KeyValue,
        self_bias: Option<Tensor<4>>,
        cross: Option<(&KeyValue, Option<Tensor<4>>)>,
    ) -> Tensor<3> {
        self.forward_with(&self.attention, x, self_kv, self_bias, cross)
    }

    /// [`Self::forward`] with another self-attention block in place of `self.attention`:
    /// pre-training's decoder shares every weight of the encoder's layer but this one.
    pub fn forward_with(
        &self,
        attention: &TextAttention,
        x: Tensor<3>,
        self_kv: &KeyValue,
        self_bias: Option<Tensor<4>>,
        cross: Option<(&KeyValue, Option<Tensor<4>>)>,
    ) -> Tensor<3> {
        let mut x = attention.forward(x, self_kv, self_bias);
        if let (Some(block), Some((kv, bias))) = (&self.crossattention, cross) {
            x = block.forward(x, kv, bias);
        }
        let hidden = fused::gelu(dense(&self.intermediate.dense, x.clone()));
        let out = dropout::hidden(dense(&self.output.dense, hidden));
        post_norm(&self.output.layer_norm, out + x, self.output.layer_norm_eps)
    }
}

impl TextEmbeddings {
    /// Word + position (`0 .. L`) embeddings, LayerNorm.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, l] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<1, Int>::arange(0..l as i64, &device).reshape([1, l]);
        self.forward_at(input_ids, positions)
    }

    /// Word embeddings of `input_ids` `[N, L]` plus the position embeddings of `positions`
    /// (`[N, L]`, or `[1, L]` shared by every row), LayerNorm.
    pub fn forward_at(&self, input_ids: Tensor<2, Int>, positions: Tensor<2, Int>) -> Tensor<3> {
        let x =
            self.word_embeddings.forward(input_ids) + self.position_embeddings.forward(positions);
        dropout::hidden(post_norm(&self.layer_norm, x, self.layer_norm_eps))
    }
}

/// `norm(x)` for `x` of the model's own width (fused, with its own backward pass, in
/// training on flex).
fn post_norm(norm: &LayerNorm, x: Tensor<3>, eps: f64) -> Tensor<3> {
    fused::layer_norm(norm, x, eps).expect("x has the hidden size the norm was built for")
}

impl TextModel {
    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embeddings.word_embeddings.weight.shape()[0]
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.embeddings.word_embeddings.weight.shape()[1]
    }

    /// The float type of the weights and activations (f32 unless loaded in half precision).
    pub fn dtype(&self) -> DType {
        self.embeddings.word_embeddings.weight.val().dtype()
    }

    /// Length of the position table.
    pub fn max_positions(&self) -> usize {
        self.embeddings.position_embeddings.weight.shape()[0]
    }

    /// Checks ids against the vocabulary and position table, and the mask's shape.
    ///
    /// The ids are read back for the vocabulary check only on a CPU device
    /// ([`blip_core::ops::is_host`]). On a GPU that read would stall every pass; there the
    /// ids come from the model's tokenizer (whose vocabulary loading checks against the
    /// model's) or from generation, which checks its prompts on the host.
    pub fn check_input(
        &self,
        what: &'static str,
        input_ids: &Tensor<2, Int>,
        attention_mask: Option<&Tensor<2, Int>>,
    ) -> Result<()> {
        let [b, l] = input_ids.dims();
        if l > self.max_positions() {
            return Err(Error::TooLong {
                what,
                length: l,
                max: self.max_positions(),
            });
        }
        if let Some(mask) = attention_mask
            && mask.dims() != [b, l]
        {
            return Err(blip_core::Error::InputShape {
                what: "attention_mask",
                expected: format!("[{b}, {l}] like {what}"),
                found: mask.dims().to_vec(),
            }
            .into());
        }
        if !blip_core::ops::is_host(&input_ids.device()) {
            return Ok(());
        }
        let ids = input_ids
            .clone()
            .into_data()
            .try_into_vec_as::<i64>()
            .expect("int tensors convert to i64");
        let vocab_size = self.vocab_size();
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id < 0 || id as usize >= vocab_size)
        {
            return Err(Error::TokenId {
                what,
                id,
                row: i / l.max(1),
                column: i % l.max(1),
                vocab_size,
            });
        }
        Ok(())
    }

    /// Cross-attention keys/values of every layer for `states`: computed once per image and
    /// reused by every decoding step (and every beam).
    pub fn cross_key_values(&self, states: Tensor<3>) -> Vec<KeyValue> {
        let states = states.cast(FloatDType::from(self.dtype()));
        self.encoder
            .layer
            .iter()
            .filter_map(|layer| layer.crossattention.as_ref())
            .map(|block| {
                let kv = block.self_attention.key_value(states.clone());
                // Split heads are strided views; attention kernels copy such inputs to a
                // contiguous layout on every call. Materialise once, as they are reused by
                // every decoding step.
                KeyValue {
                    key: blip_core::ops::contiguous(kv.key),
                    value: blip_core::ops::contiguous(kv.value),
                }
            })
            .collect()
    }

    /// The general forward pass: `[B, L]` ids → `[B, L, D]` states.
    ///
    /// `cross = None` is the unimodal text encoder; with `cross` the layers cross-attend
    /// (image-grounded encoder, or decoder when `causal`).
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cross: Option<CrossInput>,
        causal: bool,
    ) -> Result<Tensor<3>> {
        self.forward_with(input_ids, attention_mask, cross, causal, None)
    }

    /// [`Self::forward`] where, when `self_attention` is given (one block per layer), those
    /// blocks replace the layers' own self-attention: the pre-training decoder, which shares
    /// everything else with the encoder (BLIP §3.1, `tie_encoder_decoder_weights`).
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cross: Option<CrossInput>,
        causal: bool,
        self_attention: Option<&[TextAttention]>,
    ) -> Result<Tensor<3>> {
        self.check_input("input_ids", &input_ids, attention_mask.as_ref())?;
        let [b, l] = input_ids.dims();
        let (device, dtype) = (input_ids.device(), self.dtype());
        let cross = match cross {
            Some(cross) => {
                let [cb, lk, _] = cross.states.dims();
                if cb != b {
                    return Err(blip_core::Error::InputShape {
                        what: "cross-attention states",
                        expected: format!("[{b}, L, D] (one per text row)"),
                        found: cross.states.dims().to_vec(),
                    }
                    .into());
                }
                let bias = attention_bias(cross.mask.clone(), b, l, lk, false, &device, dtype);
                Some((self.cross_key_values(cross.states), bias))
            }
            None => None,
        };
        let self_bias = attention_bias(attention_mask, b, l, l, causal, &device, dtype);
        let x = self.embeddings.forward(input_ids);
        let cross = cross
            .as_ref()
            .map(|(kvs, bias)| (kvs.as_slice(), bias.clone()));
        Ok(self.layers_with(x, self_bias, &mut Vec::new(), cross, self_attention))
    }

    /// Runs the layers over embedded tokens `x` `[N, L, D]`. Each layer's self-attention
    /// attends to the keys/values in `cache` (one entry per layer, `[N, H, T, hd]`; empty on
    /// the first call) followed by `x`'s own, which are appended to `cache`. `self_bias` is
    /// `[N, 1, L, T + L]`. This is the incremental decoder: past keys are never recomputed.
    pub fn layers_cached(
        &self,
        x: Tensor<3>,
        self_bias: Option<Tensor<4>>,
        cache: &mut Vec<KeyValue>,
        cross: Option<(&[KeyValue], Option<Tensor<4>>)>,
    ) -> Tensor<3> {
        self.layers_with(x, self_bias, cache, cross, None)
    }

    /// [`Self::layers_cached`] with `self_attention` (one block per layer), when given, in
    /// place of the layers' own self-attention blocks.
    pub fn layers_with(
        &self,
        mut x: Tensor<3>,
        self_bias: Option<Tensor<4>>,
        cache: &mut Vec<KeyValue>,
        cross: Option<(&[KeyValue], Option<Tensor<4>>)>,
        self_attention: Option<&[TextAttention]>,
    ) -> Tensor<3> {
        let fresh = cache.is_empty();
        for (i, layer) in self.encoder.layer.iter().enumerate() {
            let attention = self_attention.map_or(&layer.attention, |blocks| &blocks[i]);
            let new = attention.self_attention.key_value(x.clone());
            if fresh {
                cache.push(new);
            } else {
                let past = &mut cache[i];
                past.key = Tensor::cat(vec![past.key.clone(), new.key], 2);
                past.value = Tensor::cat(vec![past.value.clone(), new.value], 2);
            }
            let cross = cross.as_ref().map(|(kvs, bias)| (&kvs[i], bias.clone()));
            x = layer.forward_with(attention, x, &cache[i], self_bias.clone(), cross);
        }
        x
    }

    /// Unimodal text encoder (ITC): bidirectional, no cross-attention; ids start with `[CLS]`.
    pub fn encode_text(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<3>> {
        self.forward(input_ids, attention_mask, None, false)
    }

    /// Image-grounded text encoder (ITM, VQA question): bidirectional, cross-attends to
    /// `image_embeds`.
    pub fn encode_multimodal(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        image: CrossInput,
    ) -> Result<Tensor<3>> {
        self.forward(input_ids, attention_mask, Some(image), false)
    }

    /// Image-grounded decoder body (LM): causal, cross-attends to `image`; ids start with
    /// `[DEC]`.
    pub fn decode(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        image: CrossInput,
    ) -> Result<Tensor<3>> {
        self.forward(input_ids, attention_mask, Some(image), true)
    }
}
