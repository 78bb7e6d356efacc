//! What BLIP's model crates share and none of them owns: the training-time
//! [`dropout`] (used by the ViT of `blip-vision` and the MED of `blip-text`) and the
//! SplitMix64 mixer behind every seeded stream of the workspace ([`split_mix64`]).
//!
//! This crate is the bottom of the workspace: `blip-vision` ← `blip-text` ← `blip-train`
//! all build on it.

#![warn(missing_docs)]

pub mod dropout;

/// SplitMix64's output function (Steele, Lea & Flood 2014): a bijective mix of a 64-bit
/// counter. The dropout stream, the data loader's seeds and the sampling generator all draw
/// through it.
///
/// ```
/// assert_ne!(blip_core::split_mix64(1), blip_core::split_mix64(2));
/// ```
pub fn split_mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
