//! The pre-training model (the original `BLIP_Pretrain`): image encoder, a text encoder that
//! is unimodal for ITC and image-grounded for ITM, and an image-grounded decoder that shares
//! every encoder weight except the self-attention blocks (BLIP §3.1, Table 3).
//!
//! Sharing is structural, not copies kept in sync: [`BlipPretrain::text_encoder`] holds the
//! embeddings, cross-attention and feed-forward blocks once, and [`SharedDecoder`] holds only
//! what the decoder owns alone (its causal self-attention blocks and the LM head, whose
//! decoder matrix is the shared word embeddings). The optimiser therefore updates each shared
//! tensor once per step, with the sum of the encoder's and decoder's gradients — what the
//! original's tied `nn.Parameter`s receive.

use blip_core::checkpoint::KeyMap;
use blip_text::{
    BlipConfig, BlipTokenizer, CaptioningModel, CrossInput, Decoder, Encoded, LmPredictionHead,
    RetrievalModel, SpecialTokens, TextAttention, TextConfig, TextLmHeadModel, TextModel,
    first_token_state, ids_tensor, l2_normalize, linear, with_first_token,
};
use blip_vision::{VisionConfig, VisionTransformer};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor};

use crate::error::{Result, TrainError};

/// Hyper-parameters of pre-training (the original `configs/pretrain.yaml` and
/// `BLIP_Pretrain.__init__`).
///
/// ```
/// use blip_train::PretrainConfig;
///
/// let config = PretrainConfig::tiny(30524); // bert-base-uncased + [DEC], [ENC]
/// assert_eq!(config.blip.text.vocab_size, 30524);
/// assert_eq!((config.queue_size, config.blip.vision.image_size), (256, 64));
/// // The original's hyper-parameters are the defaults.
/// assert_eq!((config.momentum, config.alpha, config.temp), (0.995, 0.4, 0.07));
/// let base = PretrainConfig::base();
/// assert_eq!((base.queue_size, base.blip.vision.image_size), (57600, 224));
/// assert_eq!(base.without_dropout().blip.text.hidden_dropout_prob, 0.0);
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct PretrainConfig {
    /// The ViT and MED sizes (the decoder's LM head uses the text config's vocabulary).
    pub blip: BlipConfig,
    /// Entries in each ITC feature queue (57600; the batch must divide it).
    #[config(default = 57600)]
    pub queue_size: usize,
    /// Momentum of the EMA encoders (0.995).
    #[config(default = 0.995)]
    pub momentum: f64,
    /// Distillation weight `α` of the ITC soft targets once ramped up (0.4).
    #[config(default = 0.4)]
    pub alpha: f64,
    /// Initial ITC temperature (0.07; clamped to [0.001, 0.5] before every step).
    #[config(default = 0.07)]
    pub temp: f64,
    /// LM label smoothing (0.1, hard-coded in the original).
    #[config(default = 0.1)]
    pub label_smoothing: f64,
    /// Maximum caption length in tokens (30 in pre-training, 35 in retrieval fine-tuning).
    #[config(default = 30)]
    pub max_length: usize,
    /// How the objectives are combined.
    #[config(default = "LossWeights::new()")]
    pub weights: LossWeights,
    /// Retrieval fine-tuning across ranks: draw ITM's hard negatives from every rank's
    /// images and texts, not only this rank's (`negative_all_rank`, on in the original's
    /// COCO retrieval config, off for Flickr30k). No effect on one rank.
    #[config(default = false)]
    pub negative_all_rank: bool,
}

/// The original's training-time settings on a ViT/MED size: ViT LayerNorm eps 1e-6 and
/// text dropout 0.1.
fn original_training(mut blip: BlipConfig) -> BlipConfig {
    blip.vision.layer_norm_eps = ORIGINAL_VIT_LAYER_NORM_EPS;
    blip.text.hidden_dropout_prob = ORIGINAL_TEXT_DROPOUT;
    blip.text.attention_probs_dropout_prob = ORIGINAL_TEXT_DROPOUT;
    blip
}

/// Weights of the objectives in the total loss, `L = w_itc·L_itc + w_itm·L_itm + w_lm·L_lm`
/// (all 1 in the paper). An objective with weight 0 is not computed at all: fine-tuning the
/// captioner is `itc = itm = 0`, the filter `lm = 0`.
///
/// ```
/// use blip_train::{LossWeights, PretrainConfig, TrainConfig, Trainer};
/// use burn::tensor::Device;
///
/// // Captioning fine-tuning: the LM objective alone.
/// let weights = LossWeights::new().with_itc(0.0).with_itm(0.0);
/// assert_eq!((weights.itc, weights.itm, weights.lm), (0.0, 0.0, 1.0));
/// let config = PretrainConfig::tiny(30524).with_weights(weights);
/// let model = config.init(&Device::flex());
/// let trainer = Trainer::new(model, config, TrainConfig::new(), &Device::flex().autodiff());
/// // Without ITC and ITM there are no momentum encoders or queues to keep.
/// assert!(trainer.distillation.is_none());
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct LossWeights {
    /// Image–text contrastive.
    #[config(default = 1.0)]
    pub itc: f64,
    /// Image–text matching.
    #[config(default = 1.0)]
    pub itm: f64,
    /// Language modelling.
    #[config(default = 1.0)]
    pub lm: f64,
}

impl LossWeights {
    /// Whether ITC or ITM is computed, and so a run keeps momentum encoders and queues.
    ///
    /// ```
    /// use blip_train::LossWeights;
    ///
    /// assert!(LossWeights::new().contrastive());
    /// assert!(!LossWeights::new().with_itc(0.0).with_itm(0.0).contrastive());
    /// ```
    pub fn contrastive(&self) -> bool {
        self.itc != 0.0 || self.itm != 0.0
    }
}

/// The ViT's LayerNorm epsilon in the original code (`partial(nn.LayerNorm, eps=1e-6)` in
/// `models/vit.py`); transformers' BLIP configs say 1e-5.
pub const ORIGINAL_VIT_LAYER_NORM_EPS: f64 = 1e-6;

/// The text dropout of the original (`configs/med_config.json`, BERT's): 0.1 on hidden
/// states and on attention probabilities, in every task.
pub const ORIGINAL_TEXT_DROPOUT: f64 = 0.1;

/// The ViT drop-path rate the original uses for ViT-L in every task (`create_vit`'s
/// `0.1 or drop_path_rate`), and for ViT-B in VQA and NLVR² fine-tuning; ViT-B pre-training,
/// captioning and retrieval use 0.
pub const ORIGINAL_DROP_PATH: f64 = 0.1;

impl PretrainConfig {
    /// BLIP pre-training with ViT-B/16 at 224 px (the paper's pre-training resolution):
    /// text dropout 0.1, no drop-path. The same rates hold for captioning and retrieval
    /// fine-tuning; VQA sets `blip.vision.drop_path_rate` to [`ORIGINAL_DROP_PATH`].
    pub fn base() -> Self {
        let mut blip = BlipConfig::base();
        blip.vision.image_size = 224;
        Self::new(original_training(blip))
    }

    /// BLIP pre-training with ViT-L/16 at 224 px: text dropout 0.1 and drop-path 0.1 (the
    /// original's ViT-L uses it in every task).
    pub fn large() -> Self {
        let mut blip = BlipConfig::large();
        blip.vision.image_size = 224;
        blip.vision.drop_path_rate = ORIGINAL_DROP_PATH;
        Self::new(original_training(blip))
    }

    /// The same config without any dropout or drop-path: for comparisons with references
    /// that train without them, and for experiments that want none.
    pub fn without_dropout(mut self) -> Self {
        self.blip.text.hidden_dropout_prob = 0.0;
        self.blip.text.attention_probs_dropout_prob = 0.0;
        self.blip.vision.drop_path_rate = 0.0;
        self
    }

    /// Checks that the config can make a model and train it: [`BlipConfig::validate`], a
    /// finite `temp` > 0, `momentum` and `alpha` in [0, 1], `label_smoothing` in [0, 1),
    /// finite loss weights, `max_length` in 1..=`max_position_embeddings`, and a queue of
    /// 1..=[`blip_core::MAX_WIDTH`] entries. Errors name `path`, the file the config came
    /// from. A checkpoint's config is checked so at load.
    ///
    /// ```
    /// use blip_train::PretrainConfig;
    /// use std::path::Path;
    ///
    /// let mut config = PretrainConfig::tiny(30524);
    /// assert!(config.validate(Path::new("state.json")).is_ok());
    /// config.temp = 0.0; // ITC divides by it
    /// assert!(config.validate(Path::new("state.json")).is_err());
    /// ```
    pub fn validate(&self, path: &std::path::Path) -> Result<()> {
        self.blip.validate(path)?;
        let fail = |message: String| -> Result<()> {
            Err(blip_core::Error::Config {
                path: path.to_path_buf(),
                message,
            }
            .into())
        };
        if !(self.temp.is_finite() && self.temp > 0.0) {
            return fail(format!("temp {} must be a positive number", self.temp));
        }
        for (name, value) in [("momentum", self.momentum), ("alpha", self.alpha)] {
            if !(0.0..=1.0).contains(&value) {
                return fail(format!("{name} {value} is outside [0, 1]"));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return fail(format!(
                "label_smoothing {} is outside [0, 1)",
                self.label_smoothing
            ));
        }
        let w = &self.weights;
        for (name, weight) in [("itc", w.itc), ("itm", w.itm), ("lm", w.lm)] {
            if !weight.is_finite() {
                return fail(format!("weights.{name} {weight} is not finite"));
            }
        }
        let positions = self.blip.text.max_position_embeddings;
        for (name, value, max) in [
            ("max_length", self.max_length, positions),
            ("queue_size", self.queue_size, blip_core::MAX_WIDTH),
        ] {
            blip_core::check_size("pre-training", name, value, max, path)?;
        }
        Ok(())
    }

    /// The dropout rates of a training step, checked.
    pub fn dropout_rates(&self) -> Result<blip_core::dropout::DropoutRates> {
        let (text, vision) = (&self.blip.text, &self.blip.vision);
        blip_core::dropout::DropoutRates::new(
            text.hidden_dropout_prob,
            text.attention_probs_dropout_prob,
            vision.drop_path_rate,
        )
        .map_err(|e| {
            blip_core::Error::Config {
                path: "<config>".into(),
                message: e.to_string(),
            }
            .into()
        })
    }

    /// A tiny BLIP (ViT and MED of width 64, 2 layers, 4 heads, 64 px images in 8-px
    /// patches, 256 queued features, the original's text dropout 0.1) for tests, examples
    /// and CPU experiments; `vocab_size` from the tokenizer.
    pub fn tiny(vocab_size: usize) -> Self {
        let vision = VisionConfig::new(64, 128, 2, 4, 64).with_patch_size(8);
        let mut text = TextConfig::base(64);
        text.vocab_size = vocab_size;
        text.hidden_size = 64;
        text.intermediate_size = 128;
        text.num_hidden_layers = 2;
        text.num_attention_heads = 4;
        text.max_position_embeddings = 64;
        text.hidden_dropout_prob = ORIGINAL_TEXT_DROPOUT;
        text.attention_probs_dropout_prob = ORIGINAL_TEXT_DROPOUT;
        Self::new(BlipConfig::new(vision, text).with_image_text_hidden_size(32))
            .with_queue_size(256)
    }

    /// The vocabulary size and special-token ids of `tokenizer` (for vocabularies other
    /// than bert-base-uncased's).
    pub fn with_tokenizer(mut self, tokenizer: &BlipTokenizer) -> Self {
        let text = &mut self.blip.text;
        text.vocab_size = tokenizer.vocab_size();
        text.pad_token_id = tokenizer.pad_token_id as usize;
        text.cls_token_id = tokenizer.cls_token_id as usize;
        text.sep_token_id = tokenizer.sep_token_id as usize;
        text.bos_token_id = tokenizer.dec_token_id as usize;
        text.enc_token_id = tokenizer.enc_token_id as usize;
        self
    }

    /// Builds the trainable model with random weights.
    pub fn init(&self, device: &Device) -> BlipPretrain {
        let (dv, dt, dp) = (
            self.blip.vision.hidden_size,
            self.blip.text.hidden_size,
            self.blip.image_text_hidden_size,
        );
        let text = &self.blip.text;
        BlipPretrain {
            visual_encoder: self.blip.vision.init(device),
            text_encoder: text.init(device),
            text_decoder: SharedDecoder {
                attention: (0..text.num_hidden_layers)
                    .map(|_| text.init_attention(dt, device))
                    .collect(),
                lm_head: text.init_lm_prediction_head(device),
            },
            vision_proj: linear(dv, dp, device),
            text_proj: linear(dt, dp, device),
            itm_head: linear(dt, 2, device),
            temp: Param::from_tensor(Tensor::from_floats([self.temp as f32], device)),
            enc_token_id: text.enc_token_id,
            dec_token_id: text.bos_token_id,
            pad_token_id: text.pad_token_id,
            sep_token_id: text.sep_token_id,
        }
    }
}

/// Key names of the pre-training checkpoint (the trainer's `model.safetensors`, the
/// original `model_base.pth` through `blip_train::original`): the original's (`self`, `LayerNorm`,
/// `cls.predictions`) where Rust field names differ.
pub const PRETRAIN_KEYS: KeyMap = KeyMap {
    renames: &[
        ("cls.predictions", "lm_head"),
        ("self", "self_attention"),
        ("LayerNorm", "layer_norm"),
    ],
    ignored: &[],
};

/// What the pre-training decoder owns alone; everything else it reads from the encoder.
///
/// ```
/// use blip_train::PretrainConfig;
/// use burn::module::Module;
/// use burn::tensor::Device;
///
/// let config = PretrainConfig::tiny(30524);
/// let model = config.init(&Device::flex());
/// // One causal self-attention block per layer, and the LM head; the rest is the encoder's.
/// assert_eq!(model.text_decoder.attention.len(), config.blip.text.num_hidden_layers);
/// assert!(model.text_decoder.num_params() < model.text_encoder.num_params());
/// ```
#[derive(Module, Debug)]
pub struct SharedDecoder {
    /// Causal self-attention block of each layer (`text_decoder.bert.encoder.layer.N.attention`).
    pub attention: Vec<TextAttention>,
    /// LM head (`text_decoder.cls.predictions`), tied to the shared word embeddings.
    pub lm_head: LmPredictionHead,
}

/// The trainable pre-training model. Field names are the original checkpoint prefixes.
///
/// ```
/// use blip_train::PretrainConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let config = PretrainConfig::tiny(30524);
/// let model = config.init(&device);
/// assert!((model.temperature() - 0.07).abs() < 1e-6);
/// let s = config.blip.vision.image_size; // 64 px in 8-px patches: 64 patch tokens
/// let embeds = model.image_embeds(Tensor::zeros([2, 3, s, s], &device))?;
/// assert_eq!(embeds.dims(), [2, 1 + 64, 64]);
/// let features = model.image_features(embeds); // L2-normalised ITC features
/// assert_eq!(features.dims(), [2, config.blip.image_text_hidden_size]);
/// # Ok::<(), blip_train::TrainError>(())
/// ```
#[derive(Module, Debug)]
pub struct BlipPretrain {
    /// The ViT.
    pub visual_encoder: VisionTransformer,
    /// MED: unimodal (ITC) and image-grounded (ITM) encoder, and every weight the decoder
    /// shares with it.
    pub text_encoder: TextModel,
    /// The decoder's own weights.
    pub text_decoder: SharedDecoder,
    /// ITC image projection `D_v → 256`.
    pub vision_proj: Linear,
    /// ITC text projection `D_t → 256`.
    pub text_proj: Linear,
    /// ITM head `D_t → 2` (index 1 = match).
    pub itm_head: Linear,
    /// Learnable ITC temperature `τ` (`[1]`).
    pub temp: Param<Tensor<1>>,
    /// `[ENC]`: first token of the image-grounded encoder.
    pub enc_token_id: usize,
    /// `[DEC]`: first token of the decoder.
    pub dec_token_id: usize,
    /// `[PAD]`.
    pub pad_token_id: usize,
    /// `[SEP]`: end of caption.
    pub sep_token_id: usize,
}

/// The pre-training decoder as `generate` drives it: the encoder's layers with the decoder's
/// own self-attention blocks and LM head, read in place.
///
/// ```
/// use blip_text::{CrossInput, GenerationConfig, generate};
/// use blip_train::PretrainConfig;
/// use burn::tensor::Device;
///
/// let device = Device::flex();
/// let config = PretrainConfig::tiny(30524); // BERT ids: [DEC] is 30522
/// let model = config.init(&device);
/// let pixels = burn::tensor::Tensor::zeros([1, 3, config.blip.vision.image_size, config.blip.vision.image_size], &device);
/// let image = CrossInput { states: model.image_embeds(pixels).unwrap(), mask: None };
/// let prompt = vec![vec![model.dec_token_id as u32]];
/// let config = GenerationConfig { max_length: 5, ..GenerationConfig::default() };
/// let captions = generate(&model, image, &prompt, &config).unwrap();
/// assert!(captions[0][0].token_ids.len() <= 5);
/// ```
impl Decoder for BlipPretrain {
    fn text_model(&self) -> &TextModel {
        &self.text_encoder
    }

    fn self_attention(&self) -> Option<&[TextAttention]> {
        Some(&self.text_decoder.attention)
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.text_decoder.lm_head.forward(
            hidden,
            self.text_encoder.embeddings.word_embeddings.weight.val(),
        )
    }

    fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            eos: self.sep_token_id as u32,
            pad: self.pad_token_id as u32,
        }
    }
}

/// The EMA copies ITC distils from (`*_m` in the original), never trained by gradients.
///
/// ```
/// use blip_train::PretrainConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let config = PretrainConfig::tiny(30524);
/// let model = config.init(&device);
/// let momentum = model.momentum_copy();
/// let s = config.blip.vision.image_size;
/// let pixels = Tensor::<4>::ones([1, 3, s, s], &device);
/// let online = model.image_features(model.image_embeds(pixels.clone())?);
/// // A fresh copy has the online weights, so it gives the same features.
/// let ema = momentum.image_features(pixels)?;
/// assert!((online - ema).abs().max().into_scalar::<f32>() < 1e-5);
/// # Ok::<(), blip_train::TrainError>(())
/// ```
#[derive(Module, Debug)]
pub struct MomentumEncoders {
    /// EMA of the ViT.
    pub visual_encoder_m: VisionTransformer,
    /// EMA of `vision_proj`.
    pub vision_proj_m: Linear,
    /// EMA of the text encoder (used in unimodal mode only).
    pub text_encoder_m: TextModel,
    /// EMA of `text_proj`.
    pub text_proj_m: Linear,
}

impl BlipPretrain {
    /// The momentum encoders, initialised as copies of the online ones (`copy_params`) and
    /// excluded from gradient tracking.
    pub fn momentum_copy(&self) -> MomentumEncoders {
        crate::momentum::momentum_copy(&self.momentum_sources())
    }

    /// The online modules paired with [`MomentumEncoders`], in the same order, for
    /// [`crate::momentum_update`].
    pub fn momentum_sources(&self) -> MomentumEncoders {
        MomentumEncoders {
            visual_encoder_m: self.visual_encoder.clone(),
            vision_proj_m: self.vision_proj.clone(),
            text_encoder_m: self.text_encoder.clone(),
            text_proj_m: self.text_proj.clone(),
        }
    }

    /// Image tokens `[B, 1 + N, D_v]`.
    pub fn image_embeds(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>> {
        Ok(self.visual_encoder.forward(pixel_values)?)
    }

    /// L2-normalised ITC image features `[B, 256]`.
    pub fn image_features(&self, image_embeds: Tensor<3>) -> Tensor<2> {
        l2_normalize(self.vision_proj.forward(first_token_state(image_embeds)))
    }

    /// L2-normalised ITC text features `[B, 256]` (unimodal encoder, `[CLS]` first).
    pub fn text_features(&self, text: &Encoded, device: &Device) -> Result<Tensor<2>> {
        let (ids, mask) = text.to_tensors(device);
        let states = self.text_encoder.encode_text(ids, Some(mask))?;
        Ok(l2_normalize(
            self.text_proj.forward(first_token_state(states)),
        ))
    }

    /// The text encoder cross-attending to `image_embeds`, the ids' first token replaced by
    /// `first`: bidirectional (ITM), or causal with the decoder's own self-attention blocks
    /// when `decoder_attention` is given (LM).
    fn image_grounded(
        &self,
        image_embeds: Tensor<3>,
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u32>],
        first: usize,
        decoder_attention: Option<&[TextAttention]>,
    ) -> Result<Tensor<3>> {
        let device = image_embeds.device();
        let ids = ids_tensor(&with_first_token(input_ids, first as u32), &device);
        let mask = ids_tensor(attention_mask, &device);
        let image = CrossInput {
            states: image_embeds,
            mask: None,
        };
        Ok(self.text_encoder.forward_with(
            ids,
            Some(mask),
            Some(image),
            decoder_attention.is_some(),
            decoder_attention,
        )?)
    }

    /// ITM logits `[N, 2]` for rows of `ids`/`mask` (first token replaced by `[ENC]`) paired
    /// with the rows of `image_embeds`.
    pub fn itm_logits(
        &self,
        image_embeds: Tensor<3>,
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u32>],
    ) -> Result<Tensor<2>> {
        let states = self.image_grounded(
            image_embeds,
            input_ids,
            attention_mask,
            self.enc_token_id,
            None,
        )?;
        Ok(self.itm_head.forward(first_token_state(states)))
    }

    /// Decoder logits `[B, L, vocab]` for captions (`[CLS]` replaced by `[DEC]`), causal,
    /// cross-attending to `image_embeds`: the encoder's layers with the decoder's own
    /// self-attention blocks.
    pub fn decoder_logits(
        &self,
        image_embeds: Tensor<3>,
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u32>],
    ) -> Result<Tensor<3>> {
        let hidden = self.decoder_states(image_embeds, input_ids, attention_mask)?;
        Ok(self.text_decoder.lm_head.forward(
            hidden,
            self.text_encoder.embeddings.word_embeddings.weight.val(),
        ))
    }

    /// The decoder's last hidden states `[B, L, D]`, before the LM head: what
    /// [`Self::decoder_logits`] projects, and what the LM loss reads
    /// ([`blip_text::LmPredictionHead::loss`]).
    pub fn decoder_states(
        &self,
        image_embeds: Tensor<3>,
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u32>],
    ) -> Result<Tensor<3>> {
        self.image_grounded(
            image_embeds,
            input_ids,
            attention_mask,
            self.dec_token_id,
            Some(&self.text_decoder.attention),
        )
    }

    /// The LM loss of captions (`labels` from [`blip_text::lm_labels`]), label-smoothed by
    /// `label_smoothing`: [`blip_text::lm_loss`] of [`Self::decoder_logits`], computed
    /// without the logits entering the autodiff graph.
    pub fn decoder_loss(
        &self,
        states: Tensor<3>,
        labels: Tensor<2, Int>,
        label_smoothing: f64,
    ) -> Result<Tensor<1>> {
        Ok(self.text_decoder.lm_head.loss(
            states,
            self.text_encoder.embeddings.word_embeddings.weight.val(),
            labels,
            label_smoothing,
        )?)
    }

    /// The captioning model of the HF layout: this ViT and the decoder (shared weights
    /// copied, decoder self-attention swapped in). Loadable by `blip-text` and transformers.
    ///
    /// Only for saving: to caption with this model, pass it to [`blip_text::generate`] as it
    /// is (it is a [`Decoder`]), which copies nothing.
    pub fn to_captioning(&self) -> CaptioningModel {
        let mut bert = self.text_encoder.clone();
        for (layer, attention) in bert
            .encoder
            .layer
            .iter_mut()
            .zip(&self.text_decoder.attention)
        {
            layer.attention = attention.clone();
        }
        CaptioningModel {
            vision_model: self.visual_encoder.clone(),
            text_decoder: TextLmHeadModel {
                bert,
                lm_head: self.text_decoder.lm_head.clone(),
                sep_token_id: self.sep_token_id,
                pad_token_id: self.pad_token_id,
            },
        }
    }

    /// The retrieval (ITM + ITC) model of the HF layout. The temperature is not part of it:
    /// HF's `BlipForImageTextRetrieval` has none.
    pub fn to_retrieval(&self) -> RetrievalModel {
        RetrievalModel {
            vision_model: self.visual_encoder.clone(),
            text_encoder: self.text_encoder.clone(),
            vision_proj: self.vision_proj.clone(),
            text_proj: self.text_proj.clone(),
            itm_head: self.itm_head.clone(),
        }
    }

    /// Writes the captioner in the HF layout (`config.json`, `model.safetensors`,
    /// `tokenizer.json`): what `blip_text::Captioner::from_pretrained` and transformers'
    /// `BlipForConditionalGeneration` load.
    pub fn save_captioner(
        &self,
        config: &BlipConfig,
        tokenizer: &BlipTokenizer,
        dir: impl AsRef<std::path::Path>,
    ) -> Result<()> {
        let dir = dir.as_ref();
        self.to_captioning().save_pretrained(config, dir)?;
        tokenizer.save(dir.join("tokenizer.json"))?;
        Ok(())
    }

    /// Writes the filter (ITM + ITC) in the HF layout, with `tokenizer.json`: what
    /// `blip_text::Matcher::from_pretrained` and `BlipForImageTextRetrieval` load.
    pub fn save_filter(
        &self,
        config: &BlipConfig,
        tokenizer: &BlipTokenizer,
        dir: impl AsRef<std::path::Path>,
    ) -> Result<()> {
        let dir = dir.as_ref();
        self.to_retrieval().save_pretrained(config, dir)?;
        tokenizer.save(dir.join("tokenizer.json"))?;
        Ok(())
    }

    /// The current temperature as a number.
    pub fn temperature(&self) -> f64 {
        self.temp.val().into_scalar::<f32>() as f64
    }

    /// Checks that a text batch is one the model can take: as many rows as images, ids and
    /// mask of equal shape, not longer than the position table.
    pub(crate) fn check_text(&self, text: &Encoded, images: usize) -> Result<()> {
        let [b, l] = text.shape();
        if b != images {
            return Err(TrainError::Batch(format!(
                "{b} captions for {images} images: each image needs exactly one caption"
            )));
        }
        let mask_shape = [
            text.attention_mask.len(),
            text.attention_mask.first().map_or(0, Vec::len),
        ];
        if mask_shape != [b, l] || text.input_ids.iter().any(|r| r.len() != l) {
            return Err(TrainError::Batch(format!(
                "ragged text batch: ids [{b}, {l}], mask {mask_shape:?}"
            )));
        }
        Ok(())
    }
}

impl MomentumEncoders {
    /// Momentum image features `[B, 256]` (no gradient).
    pub fn image_features(&self, pixel_values: Tensor<4>) -> Result<Tensor<2>> {
        let embeds = self.visual_encoder_m.forward(pixel_values)?;
        Ok(l2_normalize(self.vision_proj_m.forward(first_token_state(embeds))).detach())
    }

    /// Momentum text features `[B, 256]` (no gradient).
    pub fn text_features(&self, text: &Encoded, device: &Device) -> Result<Tensor<2>> {
        let (ids, mask) = text.to_tensors(device);
        let states = self.text_encoder_m.encode_text(ids, Some(mask))?;
        Ok(l2_normalize(self.text_proj_m.forward(first_token_state(states))).detach())
    }
}
