//! The three task models of the HF checkpoint families, with their forward passes.
//!
//! | model | HF class | checkpoints |
//! |---|---|---|
//! | [`CaptioningModel`] | `BlipForConditionalGeneration` | blip-image-captioning-base/-large |
//! | [`RetrievalModel`] | `BlipForImageTextRetrieval` | blip-itm-{base,large}-{coco,flickr} |
//! | [`VqaModel`] | `BlipForQuestionAnswering` | blip-vqa-base, blip-vqa-capfilt-large |
//!
//! Field names are the top-level checkpoint prefixes; loading is in [`crate::hf`].

use blip_vision::VisionTransformer;
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor};

use crate::config::{BlipConfig, TextConfig};
use crate::error::Result;
use crate::generate::{Generated, GenerationConfig};
use crate::heads::TextLmHeadModel;
use crate::med::{CrossInput, TextModel, linear};

/// Image captioning: ViT + image-grounded decoder with LM head.
///
/// ```
/// use blip_text::{BlipConfig, CaptioningModel, GenerationConfig, ids_tensor};
/// use blip_vision::VisionConfig;
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// // A 32-pixel ViT with 16-pixel patches: 1 + 2 × 2 image tokens of width 32.
/// let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// let model = CaptioningModel::new(&config, &device);
/// let pixels = Tensor::<4>::zeros([1, 3, 32, 32], &device);
/// let logits = model.forward(pixels.clone(), ids_tensor(&[vec![3, 10]], &device), None)?;
/// assert_eq!(logits.dims(), [1, 2, 64]);
/// let generation = GenerationConfig { max_length: 5, ..GenerationConfig::default() };
/// let captions = model.generate(pixels, &[vec![3]], &generation)?;
/// assert!(captions[0][0].token_ids.len() <= 5);
/// # Ok::<(), blip_text::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct CaptioningModel {
    /// The image encoder.
    pub vision_model: VisionTransformer,
    /// The decoder (`bert` + LM head).
    pub text_decoder: TextLmHeadModel,
}

/// Image–text matching and retrieval: ViT, image-grounded text encoder, ITM head and ITC
/// projections.
///
/// ```
/// use blip_text::{BlipConfig, RetrievalModel, cosine_similarity, ids_tensor};
/// use blip_vision::VisionConfig;
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// // A 32-pixel ViT with 16-pixel patches: 1 + 2 × 2 image tokens of width 32.
/// let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// let model = RetrievalModel::new(&config, &device);
/// let images = model.vision_model.forward(Tensor::zeros([2, 3, 32, 32], &device))?;
/// assert_eq!(images.dims(), [2, 5, 32]);
/// let ids = ids_tensor(&[vec![1, 10, 2], vec![1, 11, 2]], &device);
/// assert_eq!(model.itm_logits(images.clone(), ids.clone(), None)?.dims(), [2, 2]);
/// let itc = cosine_similarity(model.image_features(images), model.text_features(ids, None)?);
/// assert_eq!(itc.dims(), [2, 2]); // [images, texts]
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Module, Debug)]
pub struct RetrievalModel {
    /// The image encoder.
    pub vision_model: VisionTransformer,
    /// The text encoder: unimodal for ITC, image-grounded for ITM.
    pub text_encoder: TextModel,
    /// ITC image projection `D_v → 256`.
    pub vision_proj: Linear,
    /// ITC text projection `D_t → 256`.
    pub text_proj: Linear,
    /// ITM head `D_t → 2` (index 1 = match).
    pub itm_head: Linear,
}

/// Visual question answering: ViT, image-grounded question encoder, answer decoder that
/// cross-attends to the question states.
///
/// ```
/// use blip_text::{BlipConfig, GenerationConfig, VqaModel, ids_tensor};
/// use blip_vision::VisionConfig;
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// // A 32-pixel ViT with 16-pixel patches: 1 + 2 × 2 image tokens of width 32.
/// let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// let model = VqaModel::new(&config, &device);
/// let pixels = Tensor::<4>::zeros([1, 3, 32, 32], &device);
/// let question = ids_tensor(&[vec![1, 10, 11, 2]], &device);
/// let answer = ids_tensor(&[vec![3, 12, 2]], &device); // [DEC] answer [SEP]
/// let logits = model.forward(pixels.clone(), question.clone(), None, answer, None)?;
/// assert_eq!(logits.dims(), [1, 3, 64]);
/// let generation = GenerationConfig { max_length: 4, ..GenerationConfig::default() };
/// let answers = model.generate(pixels, question, None, &generation, 3)?;
/// assert_eq!(answers[0][0].token_ids[0], 3);
/// # Ok::<(), blip_text::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct VqaModel {
    /// The image encoder.
    pub vision_model: VisionTransformer,
    /// Question encoder (cross-attends to the image).
    pub text_encoder: TextModel,
    /// Answer decoder (cross-attends to the question, width `D_t`).
    pub text_decoder: TextLmHeadModel,
}

/// An all-attend cross mask is the same as none; kept explicit for readability.
fn image_input(image_embeds: Tensor<3>) -> CrossInput {
    CrossInput {
        states: image_embeds,
        mask: None,
    }
}

impl CaptioningModel {
    /// A model with random weights.
    pub fn new(config: &BlipConfig, device: &Device) -> Self {
        Self {
            vision_model: config.vision.init(device),
            text_decoder: config.text.init_lm_head_model(device),
        }
    }

    /// Decoder logits `[B, L, vocab]` for `input_ids` (first token `[DEC]`) on the images.
    /// Pair with [`lm_loss`](crate::lm_loss) for the captioning loss.
    pub fn forward(
        &self,
        pixel_values: Tensor<4>,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<3>> {
        let image_embeds = self.vision_model.forward(pixel_values)?;
        self.text_decoder
            .forward(input_ids, attention_mask, image_input(image_embeds))
    }
}

impl CaptioningModel {
    /// Captions images (`[B, 3, H, W]`): `prompts[i]` is image `i`'s decoder prompt, `[DEC]`
    /// alone for unconditional captioning or `[DEC] a picture of` (see
    /// [`BlipTokenizer::decoder_prompt`](crate::BlipTokenizer::decoder_prompt)); rows may
    /// differ in length. The ViT runs once per image, whatever the number of beams.
    pub fn generate(
        &self,
        pixel_values: Tensor<4>,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<Generated>>> {
        let image_embeds = self.vision_model.forward(pixel_values)?;
        self.text_decoder
            .generate(image_input(image_embeds), prompts, config)
    }
}

impl RetrievalModel {
    /// A model with random weights.
    pub fn new(config: &BlipConfig, device: &Device) -> Self {
        let (dv, dt, dp) = (
            config.vision.hidden_size,
            config.text.hidden_size,
            config.image_text_hidden_size,
        );
        Self {
            vision_model: config.vision.init(device),
            text_encoder: config.text.init(device),
            vision_proj: linear(dv, dp, device),
            text_proj: linear(dt, dp, device),
            itm_head: linear(dt, 2, device),
        }
    }

    /// ITM logits `[B, 2]` for paired rows: text `i` with image `i` (image embeddings from
    /// `vision_model.forward`). The first id decides the mode's marker: `[CLS]` as
    /// transformers, `[ENC]` as the original training code.
    pub fn itm_logits(
        &self,
        image_embeds: Tensor<3>,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<2>> {
        let states = self.text_encoder.encode_multimodal(
            input_ids,
            attention_mask,
            image_input(image_embeds),
        )?;
        Ok(self.itm_head.forward(first_token_state(states)))
    }

    /// L2-normalised ITC image features `[B, 256]` from the class token.
    pub fn image_features(&self, image_embeds: Tensor<3>) -> Tensor<2> {
        l2_normalize(self.vision_proj.forward(first_token_state(image_embeds)))
    }

    /// L2-normalised ITC text features `[B, 256]` from the unimodal encoder's `[CLS]`.
    pub fn text_features(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<2>> {
        let states = self.text_encoder.encode_text(input_ids, attention_mask)?;
        Ok(l2_normalize(
            self.text_proj.forward(first_token_state(states)),
        ))
    }
}

/// The state of each row's first token, `[B, L, D]` → `[B, D]`: the pooling of every BLIP
/// head (the ViT's class token for ITC, the text's `[CLS]` for ITC and `[ENC]` for ITM).
///
/// ```
/// use blip_text::first_token_state;
/// use burn::tensor::{Device, Tensor};
///
/// let states = Tensor::<3>::from_floats([[[1.0, 2.0], [3.0, 4.0]]], &Device::flex());
/// let pooled = first_token_state(states).into_data().to_vec::<f32>().unwrap();
/// assert_eq!(pooled, [1.0, 2.0]);
/// ```
pub fn first_token_state(states: Tensor<3>) -> Tensor<2> {
    let [b, _, d] = states.dims();
    states.narrow(1, 0, 1).reshape([b, d])
}

/// Cosine similarities `[images, texts]` of normalised features (no temperature), as
/// transformers' `use_itm_head=False`.
///
/// ```
/// use blip_text::{cosine_similarity, l2_normalize};
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let images = l2_normalize(Tensor::<2>::from_floats([[1.0, 0.0], [1.0, 1.0]], &device));
/// let texts = l2_normalize(Tensor::<2>::from_floats([[2.0, 0.0], [0.0, 3.0]], &device));
/// let similarity = cosine_similarity(images, texts).into_data().try_into_vec_as::<f32>().unwrap();
/// let expected = [1.0, 0.0, 0.5f32.sqrt(), 0.5f32.sqrt()]; // [images, texts], row-major
/// assert!(similarity.iter().zip(expected).all(|(s, e)| (s - e).abs() < 1e-6));
/// ```
pub fn cosine_similarity(image_features: Tensor<2>, text_features: Tensor<2>) -> Tensor<2> {
    image_features.matmul(text_features.transpose())
}

/// Rows scaled to unit L2 norm (PyTorch `normalize(eps=1e-12)`).
///
/// ```
/// use blip_text::l2_normalize;
/// use burn::tensor::{Device, Tensor};
///
/// let x = Tensor::<2>::from_floats([[3.0, 4.0], [0.0, 0.0]], &Device::flex());
/// let unit = l2_normalize(x).into_data().try_into_vec_as::<f32>().unwrap();
/// // A zero row stays zero instead of dividing by zero.
/// let expected = [0.6f32, 0.8, 0.0, 0.0];
/// assert!(unit.iter().zip(expected).all(|(u, e)| (u - e).abs() < 1e-6));
/// ```
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

impl VqaModel {
    /// A model with random weights. The answer decoder cross-attends to question states, so
    /// its cross-attention width is the text width whatever the ViT's.
    pub fn new(config: &BlipConfig, device: &Device) -> Self {
        let decoder = TextConfig {
            encoder_hidden_size: config.text.hidden_size,
            ..config.text.clone()
        };
        Self {
            vision_model: config.vision.init(device),
            text_encoder: config.text.init(device),
            text_decoder: decoder.init_lm_head_model(device),
        }
    }

    /// Question states `[B, Lq, D_t]`: the question encoded with cross-attention to the image.
    pub fn encode_question(
        &self,
        image_embeds: Tensor<3>,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<3>> {
        self.text_encoder
            .encode_multimodal(input_ids, attention_mask, image_input(image_embeds))
    }

    /// Answer logits `[B, La, vocab]` for answers (first token `[DEC]`) to questions on
    /// images.
    ///
    /// The answer decoder attends to every question position, padding included: that is what
    /// transformers computes (its cross-attention drops the mask it is given) and what both
    /// transformers' and the original code's `generate` do. For the original code's masked
    /// variant (training, rank mode), call [`answer_logits`](Self::answer_logits) with the
    /// question mask.
    pub fn forward(
        &self,
        pixel_values: Tensor<4>,
        question_ids: Tensor<2, Int>,
        question_mask: Option<Tensor<2, Int>>,
        answer_ids: Tensor<2, Int>,
        answer_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<3>> {
        let image_embeds = self.vision_model.forward(pixel_values)?;
        let question = self.encode_question(image_embeds, question_ids, question_mask)?;
        self.answer_logits(
            CrossInput {
                states: question,
                mask: None,
            },
            answer_ids,
            answer_mask,
        )
    }

    /// Generates answers: the question (ids as given, first token `[CLS]` as transformers or
    /// `[ENC]` as the original) is encoded on the image, then the decoder starts from `[DEC]`
    /// and attends to every question position, as both references' `generate` do.
    pub fn generate(
        &self,
        pixel_values: Tensor<4>,
        question_ids: Tensor<2, Int>,
        question_mask: Option<Tensor<2, Int>>,
        config: &GenerationConfig,
        dec_token_id: u32,
    ) -> Result<Vec<Vec<Generated>>> {
        let image_embeds = self.vision_model.forward(pixel_values)?;
        let question = self.encode_question(image_embeds, question_ids, question_mask)?;
        let prompts = vec![vec![dec_token_id]; question.dims()[0]];
        self.text_decoder.generate(
            CrossInput {
                states: question,
                mask: None,
            },
            &prompts,
            config,
        )
    }

    /// Answer-decoder logits over given question states (with the cross-attention mask of
    /// your choice).
    pub fn answer_logits(
        &self,
        question: CrossInput,
        answer_ids: Tensor<2, Int>,
        answer_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<3>> {
        self.text_decoder.forward(answer_ids, answer_mask, question)
    }
}
