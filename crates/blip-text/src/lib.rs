//! BLIP's text side: the MED text transformer ([`TextModel`]) in its three modes, the LM head
//! ([`TextLmHeadModel`]) and its loss ([`lm_loss`]), the tokenizer ([`BlipTokenizer`]),
//! generation over any [`Decoder`] ([`generate`]: greedy, beam, nucleus), the three HF task
//! models ([`CaptioningModel`], [`RetrievalModel`], [`VqaModel`]) with their loaders
//! ([`hf`], [`hub`]), and the task APIs ([`Captioner`], [`Matcher`], [`QuestionAnswerer`]).
//!
//! Image → caption: [`Captioner`] holds a [`CaptioningModel`] (loaded by `from_pretrained`
//! from a directory or a hub id), the tokenizer and the image processor; the ViT turns
//! pixels into image tokens, the decoder layers cross-attend to them, the LM head gives
//! vocabulary logits, and [`generate`] decodes them. The repository README lists the files
//! in that order.
//!
//! ```no_run
//! use blip_text::{CaptioningModel, ids_tensor};
//! use blip_vision::ImageProcessor;
//! use burn::tensor::Device;
//!
//! # fn main() -> blip_text::Result<()> {
//! let device = Device::flex();
//! let loaded = CaptioningModel::from_pretrained("blip-image-captioning-base", &device)?;
//! let pixels = ImageProcessor::new(384).preprocess_paths(&["cat.jpg"], &device)?;
//! let dec = loaded.config.text.bos_token_id as u32;
//! let logits = loaded.model.forward(pixels, ids_tensor(&[vec![dec]], &device), None)?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod error;
mod generate;
mod heads;
pub mod hf;
pub mod hub;
mod loss;
mod med;
mod models;
mod tasks;
mod tokenizer;

pub use config::{BlipConfig, TextConfig};
pub use error::{Error, Result};
pub use generate::{
    DEFAULT_MEMORY_LIMIT, Decoder, Generated, GenerationConfig, Sampling, SpecialTokens, generate,
};
pub use heads::{LmPredictionHead, PredictionHeadTransform, TextLmHeadModel};
pub use hf::{LoadOptions, ModelDir, Pretrained};
pub use loss::{IGNORE_INDEX, lm_labels, lm_loss, lm_loss_per_sequence};
pub use med::{
    CrossInput, KeyValue, TextAttention, TextAttentionOutput, TextEmbeddings, TextEncoder,
    TextIntermediate, TextLayer, TextModel, TextOutput, TextSelfAttention, linear,
};
pub use models::{
    CaptioningModel, RetrievalModel, VqaModel, cosine_similarity, first_token_state, l2_normalize,
};
pub use tasks::{Caption, Captioner, FirstToken, Matcher, QuestionAnswerer, Ranked, RankedAnswer};
pub use tokenizer::{BlipTokenizer, Encoded, Padding, ids_tensor, with_first_token};
