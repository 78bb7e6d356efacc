//! A synthetic world of noisy image–caption pairs that anyone can generate offline, for
//! exercising BLIP's CapFilt (captioner + filter, arXiv 2201.12086 §3) end to end.
//!
//! Every image shows one to three coloured shapes (circle, square, triangle, star,
//! diamond; red, green, blue, yellow, purple, orange; small or large) in five grid cells
//! (left, right, top, bottom, center) on a plain or speckled white, gray or black
//! background. Each image has many correct captions from varied templates and synonyms
//! ("a large red circle", "a big crimson ball on the left", "two
//! shapes: a green triangle above a small yellow square"). The web split pairs each image
//! with one text that is, at a configurable rate, noise of the kinds the paper describes:
//! another image's caption, a caption with one attribute wrong, unrelated text, or a
//! truncated caption. The truth about each text lives in a separate labels file.
//!
//! Everything is a deterministic function of a seed: [`scene`] rebuilds any image from
//! `(seed, index)`, and [`generate`] writes byte-identical files for the same
//! [`WorldConfig`]. For evaluation, [`caption_mentions`] reads a caption back and scores
//! its attributes against a scene, and [`cider`] computes CIDEr-D as pycocoevalcap does.
//!
//! ```
//! use blip_world::{SplitMix64, caption_mentions, scene};
//!
//! let s = scene(7, 0, 64);
//! let image = s.render();
//! assert_eq!(image.dimensions(), (64, 64));
//! for caption in s.captions(&mut SplitMix64::new(1)) {
//!     assert!(caption_mentions(&s, &caption).is_exact(), "{caption}");
//! }
//! ```
#![warn(missing_docs)]

mod auc;
mod caption;
mod cider;
mod parse;
mod scene;
mod seeds;
mod vocab;
mod world;

pub use blip_core::SplitMix64;

/// The prompt BLIP's captioner writes before every caption (the original's
/// `prompt = 'a picture of '`). The world's captions never open with it or a paraphrase of
/// it, so a captioner trained with it on them does not learn to say it twice.
///
/// ```
/// use blip_world::{PROMPT, SplitMix64, scene};
///
/// let mut rng = SplitMix64::new(3);
/// for index in 0..50 {
///     for caption in scene(3, index, 64).captions_n(&mut rng, 20) {
///         assert!(!caption.starts_with(PROMPT.trim_end()), "{caption}");
///     }
/// }
/// ```
pub const PROMPT: &str = "a picture of ";
pub use auc::ranking_auc;
pub use cider::{cider, cider_scores, cider_tokenize};
pub use parse::{AttributeMatch, CaptionScore, Tally, caption_mentions};
pub use scene::{ObjectAttributes, RelationFact, Scene, SceneAttributes, scene};
pub use seeds::{Interval, ROW_METRICS, RUN_METRICS, SeedRun, SeedSummary, paired_gap};
pub use vocab::{AttributeKind, Background, Colour, Position, Relation, Shape, Size, Texture};
pub use world::{
    Annotation, MAX_IMAGES, NoiseKind, NoiseMix, TestAnnotation, TestRecord, WebLabel, WorldConfig,
    WorldError, WorldSummary, generate, image_index, image_path,
};

/// Salt of the world's streams, so that a world and a training run given the same seed never
/// share draws.
const WORLD_SALT: u64 = 0x6A09_E667_F3BC_C908;

/// The world's random stream `tags` of `seed` (see [`SplitMix64::derive`]).
pub(crate) fn stream(seed: u64, tags: &[u64]) -> SplitMix64 {
    SplitMix64::derive(seed ^ WORLD_SALT, tags)
}
