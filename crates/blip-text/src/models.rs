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
#[derive(Module, Debug)]
pub struct CaptioningModel {
    /// The image encoder.
    pub vision_model: VisionTransformer,
    /// The decoder (`bert` + LM head).
    pub text_decoder: TextLmHeadModel,
}

/// Image–text matching and retrieval: ViT, image-grounded text encoder, ITM head and ITC
/// projections.
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
        let [b, _, d] = states.dims();
        Ok(self
            .itm_head
            .forward(states.narrow(1, 0, 1).reshape([b, d])))
    }

    /// L2-normalised ITC image features `[B, 256]` from the class token.
    pub fn image_features(&self, image_embeds: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = image_embeds.dims();
        l2_normalize(
            self.vision_proj
                .forward(image_embeds.narrow(1, 0, 1).reshape([b, d])),
        )
    }

    /// L2-normalised ITC text features `[B, 256]` from the unimodal encoder's `[CLS]`.
    pub fn text_features(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<2>> {
        let states = self.text_encoder.encode_text(input_ids, attention_mask)?;
        let [b, _, d] = states.dims();
        Ok(l2_normalize(
            self.text_proj
                .forward(states.narrow(1, 0, 1).reshape([b, d])),
        ))
    }
}

/// Cosine similarities `[images, texts]` of normalised features (no temperature), as
/// transformers' `use_itm_head=False`.
pub fn cosine_similarity(image_features: Tensor<2>, text_features: Tensor<2>) -> Tensor<2> {
    image_features.matmul(text_features.transpose())
}

/// Rows scaled to unit L2 norm (PyTorch `normalize(eps=1e-12)`).
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
