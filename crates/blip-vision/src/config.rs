//! [`VisionConfig`]: the ViT hyper-parameters, with BLIP's published presets.

use blip_core::{MAX_LAYERS, MAX_WIDTH, check_sizes, read_json};
use std::path::Path;

use burn::config::Config;
use serde::Deserialize;

use blip_core::{Error, Result};

/// Hyper-parameters of BLIP's ViT image encoder.
///
/// Field names follow the `vision_config` of a HuggingFace `config.json`, so
/// [`VisionConfig::from_hf_json`] reads one directly.
///
/// ```
/// use std::path::Path;
/// use blip_vision::VisionConfig;
///
/// let config = VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16);
/// assert_eq!(config.grid_size(), 2);
/// assert_eq!(config.num_positions(), 5); // 2 × 2 patches + class token
/// config.validate(Path::new("<config>"))?;
/// // 4 heads do not divide a width of 30.
/// assert!(VisionConfig::new(30, 64, 1, 4, 32).validate(Path::new("<config>")).is_err());
/// assert_eq!(VisionConfig::base().hidden_size, 768);
/// # Ok::<(), blip_vision::Error>(())
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct VisionConfig {
    /// Token width `D_v` (768 for ViT-B, 1024 for ViT-L).
    pub hidden_size: usize,
    /// Hidden width of the MLP (`4·D_v`).
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    pub num_attention_heads: usize,
    /// Side of the square input the position table was trained for (384 for the task models).
    pub image_size: usize,
    /// Side of a square patch (16).
    #[config(default = 16)]
    pub patch_size: usize,
    /// LayerNorm epsilon: 1e-5 in HF configs, 1e-6 in the original code.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Stochastic depth at the last block in training (see [`blip_core::dropout`]): 0 for ViT-B
    /// pre-training, captioning and retrieval, 0.1 for ViT-B VQA and NLVR² and for ViT-L
    /// always, in the original code. Not part of HF configs (transformers does not train
    /// with it); ignored in inference.
    #[config(default = 0.0)]
    pub drop_path_rate: f64,
}

impl VisionConfig {
    /// ViT-B/16 at 384 px, as in `Salesforce/blip-image-captioning-base` (HF eps 1e-5).
    pub fn base() -> Self {
        Self::new(768, 3072, 12, 12, 384)
    }

    /// ViT-L/16 at 384 px, as in `Salesforce/blip-image-captioning-large`.
    pub fn large() -> Self {
        Self::new(1024, 4096, 24, 16, 384)
    }

    /// Number of patches per side at the configured image size.
    pub fn grid_size(&self) -> usize {
        self.image_size.checked_div(self.patch_size).unwrap_or(0)
    }

    /// Number of tokens (class token + patches) at the configured image size. A config that
    /// passed [`Self::validate`] cannot overflow here; one that did not saturates.
    pub fn num_positions(&self) -> usize {
        let grid = self.grid_size();
        grid.saturating_mul(grid).saturating_add(1)
    }

    /// Reads the `vision_config` object of a HF BLIP `config.json` (given as parsed JSON).
    ///
    /// Missing fields take the defaults of transformers' `BlipVisionConfig`, exactly as
    /// transformers does when it reads the same file.
    pub fn from_hf_value(value: &serde_json::Value, path: &Path) -> Result<Self> {
        let hf = HfVisionConfig::deserialize(value).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("vision_config: {e}"),
        })?;
        let config = Self {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            image_size: hf.image_size,
            patch_size: hf.patch_size,
            layer_norm_eps: hf.layer_norm_eps,
            drop_path_rate: hf.drop_path_rate,
        };
        if hf.hidden_act != "gelu" {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "vision_config.hidden_act is {:?}; BLIP uses \"gelu\" (exact erf GELU)",
                    hf.hidden_act
                ),
            });
        }
        config.validate(path)?;
        Ok(config)
    }

    /// Reads the `vision_config` of a HF BLIP `config.json` file.
    pub fn from_hf_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        let vision = value.get("vision_config").ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            message: "no `vision_config` object (is this a BLIP config.json?)".into(),
        })?;
        Self::from_hf_value(vision, path)
    }

    /// Checks the values are consistent (heads divide the width, patches tile the image) and
    /// within [`MAX_IMAGE_SIZE`] and [`MAX_WIDTH`], so that no size computed from them
    /// overflows and nothing is allocated for an absurd claim.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let fail = |message: String| {
            Err(Error::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        check_sizes(
            "vision",
            &[
                ("hidden_size", self.hidden_size, MAX_WIDTH),
                ("intermediate_size", self.intermediate_size, MAX_WIDTH),
                ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
                ("image_size", self.image_size, MAX_IMAGE_SIZE),
                ("patch_size", self.patch_size, MAX_IMAGE_SIZE),
            ],
            self.layer_norm_eps,
            path,
        )?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return fail(format!(
                "vision hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return fail(format!(
                "vision image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        blip_core::dropout::check_rate("vision drop_path_rate", self.drop_path_rate).or_else(fail)
    }
}

/// The largest `image_size` a config may declare (ViT inputs are 224–480 px in practice): it
/// bounds the image processor's output and the position table before any weight is read.
pub const MAX_IMAGE_SIZE: usize = 16_384;

/// transformers' `BlipVisionConfig`, missing fields taking its class defaults (5.x).
#[derive(Deserialize)]
#[serde(default)]
struct HfVisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    layer_norm_eps: f64,
    hidden_act: String,
    drop_path_rate: f64,
}

impl Default for HfVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            layer_norm_eps: 1e-5,
            hidden_act: "gelu".into(),
            drop_path_rate: 0.0,
        }
    }
}
