//! BLIP's text side: the MED text transformer ([`TextModel`]) in its three modes, the LM head
//! and loss, the tokenizer, and the three HF task models with their loaders.
//!
//! Image → caption, in files: `blip_vision::processor` (pixels) → `blip_vision::vit` (image
//! tokens) → [`med`] (decoder layers cross-attending to them) → [`heads`] (vocabulary
//! logits) → [`tokenizer`] (text). [`hf`] loads the published checkpoints into [`models`].
//!
//! ```no_run
//! use blip_text::{CaptioningModel, tokenizer::ids_tensor};
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
pub mod generate;
pub mod heads;
pub mod hf;
pub mod hub;
pub mod med;
pub mod models;
pub mod tasks;
pub mod tokenizer;

pub use config::{BlipConfig, TextConfig};
pub use error::{Error, Result};
pub use generate::{Generated, GenerationConfig, Sampling, SpecialTokens, generate};
pub use heads::{
    IGNORE_INDEX, LmPredictionHead, TextLmHeadModel, lm_labels, lm_loss, lm_loss_per_sequence,
};
pub use hf::{ModelDir, Pretrained};
pub use med::{CrossInput, TextModel};
pub use models::{CaptioningModel, RetrievalModel, VqaModel, cosine_similarity, l2_normalize};
pub use tasks::{Caption, Captioner, FirstToken, Matcher, QuestionAnswerer, Ranked, RankedAnswer};
pub use tokenizer::{BlipTokenizer, Encoded, Padding};
