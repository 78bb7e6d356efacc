//! BLIP's image side: the ViT encoder ([`VisionTransformer`]), its config
//! ([`VisionConfig`], with the published `base()` and `large()`), the image processor
//! ([`ImageProcessor`]) and the interpolation of the position table to other resolutions
//! ([`resize_position_table`]).
//!
//! Built on `blip-core` (checkpoint IO, errors, kernels); `blip-text` builds on it, and
//! nothing else is needed to run the ViT alone.
//!
//! ```no_run
//! use blip_vision::{ImageProcessor, VisionConfig};
//! use burn::tensor::Device;
//!
//! # fn main() -> blip_core::Result<()> {
//! let device = Device::flex();
//! let vit = VisionConfig::base().init(&device);
//! let pixels = ImageProcessor::new(384).preprocess_paths(&["cat.jpg"], &device)?;
//! let tokens = vit.forward(pixels)?; // [1, 577, 768]
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod interpolate;
mod processor;
mod vit;

pub use blip_core::{Error, Result};
pub use config::{MAX_IMAGE_SIZE, VisionConfig};
pub use interpolate::{bicubic_resize, resize_position_table};
pub use processor::{BLIP_MEAN, BLIP_STD, ImageProcessor, resize_bicubic_aa, to_rgb};
pub use vit::{
    VisionAttention, VisionEmbeddings, VisionEncoder, VisionLayer, VisionMlp, VisionOutput,
    VisionTransformer,
};
