//! Loading HuggingFace BLIP model directories (`config.json`, `model.safetensors`,
//! `tokenizer.json`) — the one place where checkpoint keys meet modules.
//!
//! Module fields carry the checkpoint names, so each family's key map is short:
//!
//! | checkpoint segment(s) | module field | why |
//! |---|---|---|
//! | `self` (in `attention.self.query`) | `self_attention` | `self` is a Rust keyword |
//! | `LayerNorm` | `layer_norm` | Rust field style; burn's adapter maps `weight/bias` → `gamma/beta` |
//! | `cls.predictions` | `lm_head` | one struct instead of two one-field wrappers |
//!
//! Keys present in files but deliberately not loaded:
//!
//! | key | reason |
//! |---|---|
//! | `text_decoder.cls.predictions.decoder.weight` | tied to `text_decoder.bert.embeddings.word_embeddings.weight` (checked equal when present) |
//! | `text_decoder.cls.predictions.decoder.bias` | alias of `text_decoder.cls.predictions.bias` (checked equal when present) |
//! | `*.embeddings.position_ids` | an `arange` buffer in older files |
//!
//! Linear weights are transposed (`[out, in]` → burn's `[in, out]`) by burn's
//! `PyTorchToBurnAdapter`; vision keys need no rule at all.

use std::path::{Path, PathBuf};

use blip_vision::checkpoint::{KeyMap, SafetensorsHeader, load_safetensors, save_safetensors};
use burn::module::Module;
use burn::store::ModuleSnapshot;
use burn::tensor::Device;

use crate::config::BlipConfig;
use crate::error::{Error, Result};
use crate::models::{CaptioningModel, RetrievalModel, VqaModel};
use crate::tokenizer::BlipTokenizer;

const TEXT_RENAMES: &[(&str, &str)] = &[("self", "self_attention"), ("LayerNorm", "layer_norm")];
const DECODER_RENAMES: &[(&str, &str)] = &[
    ("cls.predictions", "lm_head"),
    ("self", "self_attention"),
    ("LayerNorm", "layer_norm"),
];
const TIED_DECODER: &[&str] = &[
    "text_decoder.cls.predictions.decoder.weight",
    "text_decoder.cls.predictions.decoder.bias",
    "*.embeddings.position_ids",
];

/// `BlipForConditionalGeneration`: `vision_model.*`, `text_decoder.bert.*`, `text_decoder.cls.*`.
pub const CAPTIONING_KEYS: KeyMap = KeyMap {
    renames: DECODER_RENAMES,
    ignored: TIED_DECODER,
};

/// `BlipForImageTextRetrieval`: `vision_model.*`, `text_encoder.*`, `vision_proj`,
/// `text_proj`, `itm_head`.
pub const RETRIEVAL_KEYS: KeyMap = KeyMap {
    renames: TEXT_RENAMES,
    ignored: &["*.embeddings.position_ids"],
};

/// `BlipForQuestionAnswering`: `vision_model.*`, `text_encoder.*`, `text_decoder.bert.*`,
/// `text_decoder.cls.*`.
pub const VQA_KEYS: KeyMap = KeyMap {
    renames: DECODER_RENAMES,
    ignored: TIED_DECODER,
};

/// A model loaded from a HF directory, with its config and (when the directory has one)
/// tokenizer.
#[derive(Debug)]
pub struct Pretrained<M> {
    /// The model.
    pub model: M,
    /// The parsed `config.json`.
    pub config: BlipConfig,
    /// From `tokenizer.json`, else `vocab.txt`; `None` when the directory has neither.
    pub tokenizer: Option<BlipTokenizer>,
}

/// The files of a HF BLIP model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: BlipConfig,
}

impl ModelDir {
    /// Opens a directory and parses its `config.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::MissingFile {
                dir,
                file: "config.json",
            });
        }
        let config = BlipConfig::from_hf_json(&config_path)?;
        Ok(Self { dir, config })
    }

    /// The header of `model.safetensors`, validated.
    pub fn weights(&self) -> Result<SafetensorsHeader> {
        let path = self.dir.join("model.safetensors");
        if !path.is_file() {
            return Err(Error::MissingFile {
                dir: self.dir.clone(),
                file: "model.safetensors",
            });
        }
        Ok(SafetensorsHeader::read(&path)?)
    }

    /// The tokenizer from `tokenizer.json`, or `vocab.txt`, if present.
    pub fn tokenizer(&self) -> Result<Option<BlipTokenizer>> {
        let json = self.dir.join("tokenizer.json");
        let vocab = self.dir.join("vocab.txt");
        if json.is_file() {
            BlipTokenizer::from_file(json).map(Some)
        } else if vocab.is_file() {
            BlipTokenizer::from_vocab(vocab).map(Some)
        } else {
            Ok(None)
        }
    }

    fn load<M: Module + ModuleSnapshot>(
        &self,
        model: M,
        keys: &KeyMap,
        tied: &[(&str, &str)],
    ) -> Result<Pretrained<M>> {
        let header = self.weights()?;
        for (alias, source) in tied {
            check_tied(&header, alias, source)?;
        }
        let model = load_safetensors(model, &header, keys)?;
        Ok(Pretrained {
            model,
            config: self.config.clone(),
            tokenizer: self.tokenizer()?,
        })
    }
}

const DECODER_TIES: &[(&str, &str)] = &[
    (
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.bert.embeddings.word_embeddings.weight",
    ),
    (
        "text_decoder.cls.predictions.decoder.bias",
        "text_decoder.cls.predictions.bias",
    ),
];

/// A tied alias that a file stores anyway must equal its source: the model keeps one tensor.
fn check_tied(header: &SafetensorsHeader, alias: &str, source: &str) -> Result<()> {
    let (Some(a), Some(s)) = (header.tensors.get(alias), header.tensors.get(source)) else {
        return Ok(());
    };
    let config_error = |message: String| blip_vision::Error::Config {
        path: header.path.clone(),
        message,
    };
    if a.shape != s.shape || a.dtype != s.dtype || header.bytes(alias)? != header.bytes(source)? {
        return Err(config_error(format!(
            "`{alias}` differs from `{source}`; BLIP ties them and this model keeps one tensor"
        ))
        .into());
    }
    Ok(())
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
fn save<M: Module + ModuleSnapshot>(
    model: &M,
    config: &BlipConfig,
    architecture: &str,
    keys: &KeyMap,
    dir: &Path,
) -> Result<()> {
    let io = |source| blip_vision::Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    save_safetensors(model, &dir.join("model.safetensors"), keys)?;
    let json = serde_json::to_string_pretty(&config.to_hf_json(architecture))
        .expect("a JSON value serialises");
    std::fs::write(dir.join("config.json"), json + "\n").map_err(io)?;
    Ok(())
}

/// Loading from and saving to HF model directories, one implementation per family.
macro_rules! hf_family {
    ($model:ty, $architecture:literal, $keys:expr, $ties:expr, $example:literal) => {
        impl $model {
            #[doc = concat!("Loads a `", $architecture, "` directory (e.g. ", $example, ").")]
            pub fn from_pretrained(
                dir: impl AsRef<Path>,
                device: &Device,
            ) -> Result<Pretrained<Self>> {
                let dir = ModelDir::open(dir)?;
                let model = Self::new(&dir.config, device);
                dir.load(model, &$keys, $ties)
            }

            #[doc = concat!("Writes a `", $architecture, "` directory (`config.json`, `model.safetensors`) that transformers and [`Self::from_pretrained`] load.")]
            pub fn save_pretrained(&self, config: &BlipConfig, dir: impl AsRef<Path>) -> Result<()> {
                save(self, config, $architecture, &$keys, dir.as_ref())
            }
        }
    };
}

hf_family!(
    CaptioningModel,
    "BlipForConditionalGeneration",
    CAPTIONING_KEYS,
    DECODER_TIES,
    "Salesforce/blip-image-captioning-base"
);
hf_family!(
    RetrievalModel,
    "BlipForImageTextRetrieval",
    RETRIEVAL_KEYS,
    &[],
    "Salesforce/blip-itm-base-coco"
);
hf_family!(
    VqaModel,
    "BlipForQuestionAnswering",
    VQA_KEYS,
    DECODER_TIES,
    "Salesforce/blip-vqa-base"
);
