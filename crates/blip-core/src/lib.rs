//! What BLIP's model crates share and none of them owns:
//!
//! - `checkpoint`: checked safetensors loading and saving (key maps, PyTorch layout, header
//!   checks against the model before anything is allocated);
//! - [`Error`] and [`Result`], the typed errors of every file a model is built from;
//! - bounded reading of configs ([`read_json`], [`read_file`]) and the size limits a config
//!   is held to ([`check_sizes`], [`MAX_WIDTH`], [`MAX_LAYERS`]);
//! - crash-safe writes ([`fs::write_atomic`]);
//! - one seedable random generator ([`SplitMix64`]);
//! - progress reports of long calls to the application's callback ([`progress`]);
//! - BLIP's text cleaning ([`pre_caption`], [`pre_question`]);
//! - training-time `dropout` and drop-path;
//! - [`fused`]: dense layers, the ViT's self-attention, attention's softmax, GELU and LayerNorm
//!   with their own backward passes;
//! - [`update`]: AdamW's step and the momentum encoders' moving average, one pass per
//!   parameter;
//! - [`precision`]: the float types a model runs in, and f32 where half precision needs it.
//!
//! The tensor parts (`checkpoint`, `dropout`) need the default feature `burn`; without it
//! the crate is plain Rust.
//!
//! The CPU kernels the ViT and the text decoder share live here too, hidden from the docs:
//! they are an implementation detail of `blip-vision` and `blip-text`.
//!
//! This crate is the bottom of the workspace: `blip-core` ← `blip-vision` ← `blip-text` ←
//! `blip-train` ← `blip-capfilt`.

#![warn(missing_docs)]

mod caption;
#[cfg(feature = "burn")]
pub mod checkpoint;
#[cfg(feature = "burn")]
pub mod dropout;
mod error;
pub mod fs;
#[cfg(feature = "burn")]
pub mod fused;
mod io;
#[cfg(feature = "flex")]
#[doc(hidden)]
pub mod kernels;
#[cfg(feature = "burn")]
#[doc(hidden)]
pub mod ops;
#[cfg(feature = "burn")]
pub mod precision;
pub mod progress;
pub mod rng;
#[cfg(all(test, feature = "burn"))]
mod test_util;
#[cfg(feature = "burn")]
pub mod update;

pub use caption::{pre_caption, pre_question};
pub use error::{Error, Result};
pub use io::{
    MAX_LAYERS, MAX_WIDTH, check_size, check_sizes, open_file, peak_rss, read_file, read_json,
};
pub use rng::{SplitMix64, split_mix64};
