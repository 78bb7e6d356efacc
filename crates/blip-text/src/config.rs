//! [`TextConfig`] (the MED text transformer) and [`BlipConfig`] (a whole HF `config.json`).

use std::path::Path;

use blip_core::read_json;
use blip_vision::VisionConfig;
use burn::config::Config;
use serde::Deserialize;

use crate::error::Result;

/// Hyper-parameters of BLIP's BERT-based text transformer (MED).
///
/// Field names follow the `text_config` of a HuggingFace `config.json`.
///
/// ```
/// use blip_text::TextConfig;
///
/// let base = TextConfig::base(768);
/// assert_eq!((base.vocab_size, base.hidden_size, base.num_hidden_layers), (30524, 768, 12));
/// assert_eq!(base.head_dim(), 64);
/// // A tiny decoder over 32-wide image tokens; the fields not given keep their defaults.
/// let tiny = TextConfig::new(64, 32, 32, 64, 1, 2).with_max_position_embeddings(32);
/// assert_eq!((tiny.head_dim(), tiny.max_position_embeddings), (16, 32));
/// assert_eq!((tiny.pad_token_id, tiny.sep_token_id), (0, 102));
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct TextConfig {
    /// Vocabulary size: 30524 = bert-base-uncased + `[DEC]` + `[ENC]`.
    pub vocab_size: usize,
    /// Text width (768).
    pub hidden_size: usize,
    /// Width of the states cross-attention reads: the ViT width for the image-grounded
    /// encoder/decoder (768 or 1024). transformers overwrites it with the vision width.
    pub encoder_hidden_size: usize,
    /// Feed-forward width (3072).
    pub intermediate_size: usize,
    /// Number of layers (12).
    pub num_hidden_layers: usize,
    /// Attention heads (12; transformers' class default is 8, every hub config says 12).
    pub num_attention_heads: usize,
    /// Length of the position table (512).
    #[config(default = 512)]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon (1e-12).
    #[config(default = 1e-12)]
    pub layer_norm_eps: f64,
    /// Whether every layer owns a cross-attention block (true in every BLIP checkpoint).
    #[config(default = true)]
    pub add_cross_attention: bool,
    /// `[PAD]` id.
    #[config(default = 0)]
    pub pad_token_id: usize,
    /// `[DEC]` id, the decoder's first token (30522).
    #[config(default = 30522)]
    pub bos_token_id: usize,
    /// `[ENC]` id, the image-grounded encoder's first token in the original code (30523).
    #[config(default = 30523)]
    pub enc_token_id: usize,
    /// `[SEP]` id: the real end-of-caption token (102).
    #[config(default = 102)]
    pub sep_token_id: usize,
    /// `[CLS]` id (101).
    #[config(default = 101)]
    pub cls_token_id: usize,
    /// LM-loss label smoothing: 0.0 in transformers 5 configs, 0.1 in the original code.
    #[config(default = 0.0)]
    pub label_smoothing: f64,
    /// Dropout on hidden states in training (see [`blip_core::dropout`]): 0.1 in the
    /// original's BERT config, 0.0 in HF configs. Ignored in inference.
    #[config(default = 0.0)]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities in training: 0.1 in the original, 0.0 in HF
    /// configs. Ignored in inference.
    #[config(default = 0.0)]
    pub attention_probs_dropout_prob: f64,
}

impl TextConfig {
    /// BERT-base with BLIP's vocabulary, cross-attending to `encoder_width`-wide states.
    pub fn base(encoder_width: usize) -> Self {
        Self::new(30524, 768, encoder_width, 3072, 12, 12)
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self, path: &Path) -> blip_core::Result<()> {
        let fail = |message: String| {
            Err(blip_core::Error::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        use blip_core::{MAX_LAYERS, MAX_WIDTH};
        blip_core::check_sizes(
            "text",
            &[
                ("vocab_size", self.vocab_size, MAX_WIDTH),
                ("hidden_size", self.hidden_size, MAX_WIDTH),
                ("encoder_hidden_size", self.encoder_hidden_size, MAX_WIDTH),
                ("intermediate_size", self.intermediate_size, MAX_WIDTH),
                ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
                (
                    "max_position_embeddings",
                    self.max_position_embeddings,
                    MAX_WIDTH,
                ),
            ],
            self.layer_norm_eps,
            path,
        )?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return fail(format!(
                "text hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, id) in [
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
            ("sep_token_id", self.sep_token_id),
            ("enc_token_id", self.enc_token_id),
        ] {
            if id >= self.vocab_size {
                return fail(format!(
                    "text {name} {id} >= vocab_size {}",
                    self.vocab_size
                ));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return fail(format!(
                "label_smoothing {} is outside [0, 1)",
                self.label_smoothing
            ));
        }
        for (name, rate) in [
            ("text hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "text attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            blip_core::dropout::check_rate(name, rate).or_else(fail)?;
        }
        Ok(())
    }
}

/// A whole BLIP model config: vision, text, and the ITC projection width.
///
/// ```
/// use blip_text::BlipConfig;
///
/// let config = BlipConfig::large();
/// assert_eq!(config.text.encoder_hidden_size, config.vision.hidden_size);
/// let json = config.to_hf_json("BlipForConditionalGeneration");
/// assert_eq!(json["vision_config"]["hidden_size"], 1024);
/// # let path = std::env::temp_dir().join(format!("blip-text-doc-config-{}.json", std::process::id()));
/// std::fs::write(&path, json.to_string())?;
/// assert_eq!(BlipConfig::from_hf_json(&path)?, config);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct BlipConfig {
    /// The ViT.
    pub vision: VisionConfig,
    /// The text transformer; `encoder_hidden_size` equals the vision width.
    pub text: TextConfig,
    /// Width of the ITC projections `vision_proj`/`text_proj` (256).
    #[config(default = 256)]
    pub image_text_hidden_size: usize,
}

impl BlipConfig {
    /// BLIP with ViT-B/16 at 384 px (blip-image-captioning-base, blip-itm-base-*, blip-vqa-base).
    pub fn base() -> Self {
        Self::new(VisionConfig::base(), TextConfig::base(768))
    }

    /// BLIP with ViT-L/16 at 384 px (blip-image-captioning-large, blip-itm-large-*).
    pub fn large() -> Self {
        Self::new(VisionConfig::large(), TextConfig::base(1024))
    }

    /// Reads a HF BLIP `config.json`, with transformers' defaults for missing fields and its
    /// rule that cross-attention width = vision width.
    pub fn from_hf_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        let config_error = |message: String| blip_core::Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let empty = empty_object();
        let vision =
            VisionConfig::from_hf_value(value.get("vision_config").unwrap_or(&empty), path)?;
        let hf = HfTextConfig::deserialize(value.get("text_config").unwrap_or(&empty))
            .map_err(|e| config_error(format!("text_config: {e}")))?;
        if hf.hidden_act != "gelu" {
            return Err(config_error(format!(
                "text_config.hidden_act is {:?}; BLIP uses \"gelu\"",
                hf.hidden_act
            ))
            .into());
        }
        let text = TextConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            encoder_hidden_size: vision.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            max_position_embeddings: hf.max_position_embeddings,
            layer_norm_eps: hf.layer_norm_eps,
            add_cross_attention: hf.is_decoder,
            pad_token_id: hf.pad_token_id,
            bos_token_id: hf.bos_token_id,
            enc_token_id: hf.bos_token_id.saturating_add(1),
            sep_token_id: hf.sep_token_id,
            cls_token_id: 101,
            label_smoothing: hf.label_smoothing,
            hidden_dropout_prob: hf.hidden_dropout_prob,
            attention_probs_dropout_prob: hf.attention_probs_dropout_prob,
        };
        let image_text_hidden_size = match value.get("image_text_hidden_size") {
            None => 256,
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n <= blip_core::MAX_WIDTH as u64)
                .ok_or_else(|| {
                    config_error(format!(
                        "image_text_hidden_size {v} is not an integer in 1..={}",
                        blip_core::MAX_WIDTH
                    ))
                })? as usize,
        };
        let config = Self {
            vision,
            text,
            image_text_hidden_size,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks that the config can make a model: the ViT's sizes
    /// ([`VisionConfig::validate`]), the text transformer's sizes, heads, token ids and
    /// rates, cross-attention as wide as the ViT, and an ITC width in 1..=[`blip_core::MAX_WIDTH`].
    /// Errors name `path`, the file the config came from.
    ///
    /// ```
    /// use blip_text::BlipConfig;
    /// use std::path::Path;
    ///
    /// let mut config = BlipConfig::base();
    /// assert!(config.validate(Path::new("config.json")).is_ok());
    /// config.text.encoder_hidden_size = 1024; // ViT-B is 768 wide
    /// assert!(config.validate(Path::new("config.json")).is_err());
    /// ```
    pub fn validate(&self, path: &Path) -> blip_core::Result<()> {
        self.vision.validate(path)?;
        self.text.validate(path)?;
        let fail = |message: String| {
            Err(blip_core::Error::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.text.encoder_hidden_size != self.vision.hidden_size {
            return fail(format!(
                "text encoder_hidden_size {} is not the vision hidden_size {}",
                self.text.encoder_hidden_size, self.vision.hidden_size
            ));
        }
        blip_core::check_size(
            "blip",
            "image_text_hidden_size",
            self.image_text_hidden_size,
            blip_core::MAX_WIDTH,
            path,
        )
    }
}

impl BlipConfig {
    /// The config as a HF `config.json` for `architecture` (e.g.
    /// `"BlipForConditionalGeneration"`), readable by transformers and [`Self::from_hf_json`].
    pub fn to_hf_json(&self, architecture: &str) -> serde_json::Value {
        let (v, t) = (&self.vision, &self.text);
        serde_json::json!({
            "architectures": [architecture],
            "model_type": "blip",
            "image_text_hidden_size": self.image_text_hidden_size,
            "label_smoothing": t.label_smoothing,
            "vision_config": {
                "model_type": "blip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": "gelu",
                "drop_path_rate": v.drop_path_rate,
            },
            "text_config": {
                "model_type": "blip_text_model",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "encoder_hidden_size": v.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "max_position_embeddings": t.max_position_embeddings,
                "layer_norm_eps": t.layer_norm_eps,
                "is_decoder": t.add_cross_attention,
                "pad_token_id": t.pad_token_id,
                "bos_token_id": t.bos_token_id,
                "sep_token_id": t.sep_token_id,
                "label_smoothing": t.label_smoothing,
                "hidden_act": "gelu",
                "hidden_dropout_prob": t.hidden_dropout_prob,
                "attention_probs_dropout_prob": t.attention_probs_dropout_prob,
            },
        })
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// transformers' `BlipTextConfig`, missing fields taking its class defaults (5.x).
#[derive(Deserialize)]
#[serde(default)]
struct HfTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    layer_norm_eps: f64,
    is_decoder: bool,
    pad_token_id: usize,
    bos_token_id: usize,
    sep_token_id: usize,
    label_smoothing: f64,
    hidden_act: String,
    hidden_dropout_prob: f64,
    attention_probs_dropout_prob: f64,
}

impl Default for HfTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8, // sic: every Salesforce config overrides it with 12
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            is_decoder: true,
            pad_token_id: 0,
            bos_token_id: 30522,
            sep_token_id: 102,
            label_smoothing: 0.0,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<BlipConfig> {
        let path = std::env::temp_dir().join(format!(
            "blip-config-{}-{}.json",
            std::process::id(),
            json.len()
        ));
        std::fs::write(&path, json).unwrap();
        let config = BlipConfig::from_hf_json(&path);
        std::fs::remove_file(&path).unwrap();
        config
    }

    #[test]
    fn hub_base_config_reads_as_the_base_preset() {
        // What Salesforce/blip-image-captioning-base's config.json sets; the rest defaults.
        let config = parse(
            r#"{"architectures": ["BlipForConditionalGeneration"], "model_type": "blip",
                "text_config": {"num_attention_heads": 12},
                "vision_config": {"dropout": 0.0, "initializer_range": 0.02}}"#,
        )
        .unwrap();
        assert_eq!(config, BlipConfig::base());
    }

    #[test]
    fn hub_large_config_reads_as_the_large_preset() {
        let config = parse(
            r#"{"text_config": {"num_attention_heads": 12, "encoder_hidden_size": 1024},
                "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                                  "num_attention_heads": 16, "num_hidden_layers": 24}}"#,
        )
        .unwrap();
        assert_eq!(config, BlipConfig::large());
    }

    #[test]
    fn inconsistent_configs_are_rejected_with_the_file_named() {
        for bad in [
            r#"{"text_config": {"hidden_size": 770, "num_attention_heads": 12}}"#,
            r#"{"vision_config": {"image_size": 100}}"#,
            r#"{"text_config": {"hidden_act": "relu", "num_attention_heads": 12}}"#,
            r#"{"text_config": {"vocab_size": 100, "num_attention_heads": 12}}"#,
            r#"{"text_config": {"num_attention_heads": "twelve"}}"#,
            r#"not json"#,
            // Sizes that overflowed (2^64 - 64 wrapped to 65 positions) or allocated for a
            // claim (10^9 layers) before any weight was read.
            r#"{"vision_config": {"image_size": 18446744073709551552, "patch_size": 8}}"#,
            r#"{"vision_config": {"image_size": 1099511627776}}"#,
            r#"{"vision_config": {"num_hidden_layers": 1000000000}}"#,
            r#"{"text_config": {"num_attention_heads": 12, "num_hidden_layers": 1000000}}"#,
            r#"{"text_config": {"num_attention_heads": 12, "vocab_size": 0}}"#,
            r#"{"vision_config": {"patch_size": 0}}"#,
            r#"{"vision_config": {"layer_norm_eps": -1}}"#,
            r#"{"text_config": {"num_attention_heads": 12, "layer_norm_eps": -1}}"#,
            r#"{"text_config": {"num_attention_heads": 12, "layer_norm_eps": 0}}"#,
            r#"{"text_config": {"num_attention_heads": 12, "bos_token_id": 18446744073709551615}}"#,
            r#"{"image_text_hidden_size": -3, "text_config": {"num_attention_heads": 12}}"#,
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.to_string().contains("blip-config-"), "{err}");
        }
    }
}
