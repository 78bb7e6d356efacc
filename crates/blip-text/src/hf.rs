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

use blip_core::checkpoint::{
    KeyMap, SafetensorsHeader, count_layers, load_safetensors_as, save_safetensors,
};
use burn::module::Module;
use burn::store::ModuleSnapshot;
use burn::tensor::{Device, FloatDType};

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
///
/// ```
/// use blip_text::{BlipConfig, CaptioningModel};
/// use blip_vision::VisionConfig;
/// use burn::tensor::Device;
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// # let dir = std::env::temp_dir().join(format!("blip-text-doc-pretrained-{}", std::process::id()));
/// let device = Device::flex();
/// let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// CaptioningModel::new(&config, &device).save_pretrained(&config, &dir)?;
/// let loaded = CaptioningModel::from_pretrained(&dir, &device)?;
/// assert_eq!(loaded.config.vision, config.vision);
/// assert_eq!(loaded.config.text.vocab_size, 64);
/// assert!(loaded.tokenizer.is_none()); // the directory has no tokenizer.json or vocab.txt
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
///
/// ```
/// use blip_text::{BlipConfig, CaptioningModel, ModelDir, TextConfig};
/// use blip_vision::VisionConfig;
/// use burn::tensor::Device;
///
/// # let dir = std::env::temp_dir().join(format!("blip-text-doc-modeldir-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # std::fs::write(dir.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\npicture\n")?;
/// # let text = TextConfig::new(13, 32, 32, 64, 1, 2).with_sep_token_id(3).with_bos_token_id(11).with_enc_token_id(12);
/// # let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// // A directory with a tiny captioning model and a 13-token vocab.txt.
/// CaptioningModel::new(&config, &Device::flex()).save_pretrained(&config, &dir)?;
/// let model_dir = ModelDir::open(&dir)?;
/// assert_eq!(model_dir.config.text.vocab_size, 13);
/// assert!(model_dir.weights()?.tensors.contains_key("text_decoder.cls.predictions.bias"));
/// let tokenizer = model_dir.tokenizer()?.expect("the directory has a vocab.txt");
/// assert_eq!(tokenizer.vocab_size(), 13);
/// assert!(ModelDir::open(dir.join("missing")).is_err()); // no config.json there
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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

    /// The tokenizer must have exactly the model's vocabulary (`[DEC]` and `[ENC]` included):
    /// a smaller one decodes the model's ids as the wrong words, a larger one makes ids the
    /// embedding table lacks.
    fn check_tokenizer(&self, tokenizer: &BlipTokenizer) -> Result<()> {
        let (have, want) = (tokenizer.vocab_size(), self.config.text.vocab_size);
        if have != want {
            let file = ["tokenizer.json", "vocab.txt"]
                .iter()
                .map(|f| self.dir.join(f))
                .find(|p| p.is_file())
                .unwrap_or_else(|| self.dir.clone());
            return Err(Error::Tokenizer {
                path: file,
                message: format!(
                    "it has {have} tokens ([DEC] and [ENC] included), but config.json's \
                     text_config.vocab_size is {want}: the tokenizer does not belong to this model"
                ),
            });
        }
        Ok(())
    }

    /// Refuses a config that declares more layers in a stack than the file holds, before
    /// the model (one module per declared layer) is allocated. Fewer declared layers than
    /// the file holds are reported by the key check, naming the first unused tensor.
    fn check_layers(&self, header: &SafetensorsHeader, stacks: &[LayerStack]) -> Result<()> {
        for &(prefix, field, claimed) in stacks {
            let held = count_layers(header.tensors.keys().map(String::as_str), prefix);
            // A stack the file lacks entirely is a file of another family: the key check
            // names the missing tensors (and the config's bound caps what is allocated).
            if held > 0 && claimed > held {
                return Err(blip_core::Error::Config {
                    path: self.dir.join("config.json"),
                    message: format!(
                        "{field} is {claimed}, but {} holds {held} layers under `{prefix}*` \
                         (does config.json belong to these weights?)",
                        header.path.display()
                    ),
                }
                .into());
            }
        }
        Ok(())
    }

    fn load<M: Module + ModuleSnapshot>(
        &self,
        header: SafetensorsHeader,
        model: M,
        keys: &KeyMap,
        tied: &[(&str, &str)],
        dtype: FloatDType,
    ) -> Result<Pretrained<M>> {
        for (alias, source) in tied {
            check_tied(&header, alias, source)?;
        }
        let model = load_safetensors_as(model, &header, keys, dtype)?;
        let tokenizer = self.tokenizer()?;
        if let Some(tokenizer) = &tokenizer {
            self.check_tokenizer(tokenizer)?;
        }
        Ok(Pretrained {
            model,
            config: self.config.clone(),
            tokenizer,
        })
    }
}

/// A stack of layers in a checkpoint: key prefix, config field, layers the config declares.
type LayerStack = (&'static str, &'static str, usize);

fn vision_stack(config: &BlipConfig) -> LayerStack {
    (
        "vision_model.encoder.layers.",
        "vision_config.num_hidden_layers",
        config.vision.num_hidden_layers,
    )
}

fn captioning_stacks(config: &BlipConfig) -> Vec<LayerStack> {
    vec![
        vision_stack(config),
        (
            "text_decoder.bert.encoder.layer.",
            "text_config.num_hidden_layers",
            config.text.num_hidden_layers,
        ),
    ]
}

fn retrieval_stacks(config: &BlipConfig) -> Vec<LayerStack> {
    vec![
        vision_stack(config),
        (
            "text_encoder.encoder.layer.",
            "text_config.num_hidden_layers",
            config.text.num_hidden_layers,
        ),
    ]
}

fn vqa_stacks(config: &BlipConfig) -> Vec<LayerStack> {
    let mut stacks = captioning_stacks(config);
    stacks.push(retrieval_stacks(config)[1]);
    stacks
}

/// The decoder's tied LM-head tensors, `(alias, source)`: files of every BLIP family may store
/// the alias beside its source, and a loader checks they are equal (the model keeps one
/// tensor). Keys in the HF and original layouts alike.
pub const DECODER_TIES: &[(&str, &str)] = &[
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
    let config_error = |message: String| blip_core::Error::Config {
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

/// A directory as is; a path-less `org/name` that is no directory is a hub id, looked up in
/// (or, with the `download` feature, fetched into) the HF cache.
fn resolve(spec: &Path) -> Result<PathBuf> {
    match spec.to_str() {
        Some(id) if !spec.is_dir() && crate::hub::parse_repo_id(id).is_some() => {
            crate::hub::find_or_download(id, &crate::hub::cache_dir())
        }
        _ => Ok(spec.to_path_buf()),
    }
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
fn save<M: Module + ModuleSnapshot>(
    model: &M,
    config: &BlipConfig,
    architecture: &str,
    keys: &KeyMap,
    dir: &Path,
) -> Result<()> {
    let io = |source| blip_core::Error::Io {
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

/// How a model is loaded: what `from_pretrained_with` takes beside the directory and device
/// (transformers' `from_pretrained(..., torch_dtype=...)`).
///
/// ```
/// use blip_text::LoadOptions;
/// use burn::tensor::FloatDType;
///
/// assert_eq!(LoadOptions::default().dtype, FloatDType::F32);
/// assert_eq!(LoadOptions::default().with_dtype(FloatDType::BF16).dtype, FloatDType::BF16);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// The float type of the weights and activations: f32 (default), f16 or bf16. The file's
    /// tensors are cast as they are read; LayerNorm, softmax and losses still compute in f32
    /// (see [`blip_core::precision`]).
    pub dtype: FloatDType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: FloatDType::F32,
        }
    }
}

impl LoadOptions {
    /// These options with the model in `dtype`.
    pub fn with_dtype(mut self, dtype: FloatDType) -> Self {
        self.dtype = dtype;
        self
    }
}

/// Loading from and saving to HF model directories, one implementation per family.
macro_rules! hf_family {
    ($model:ty, $architecture:literal, $keys:expr, $ties:expr, $stacks:expr, $example:literal) => {
        impl $model {
            #[doc = concat!("Loads a `", $architecture, "` directory, or a hub id (e.g. `", $example, "`) from the HF cache, downloaded into it first with the `download` feature when missing (see [`crate::hub::find_or_download`]).")]
            pub fn from_pretrained(
                dir: impl AsRef<Path>,
                device: &Device,
            ) -> Result<Pretrained<Self>> {
                Self::from_pretrained_with(dir, device, LoadOptions::default())
            }

            /// [`Self::from_pretrained`] with [`LoadOptions`] (e.g. half precision). A dtype
            /// the device cannot compute in is [`blip_core::Error::UnsupportedDType`], before
            /// anything is read.
            pub fn from_pretrained_with(
                dir: impl AsRef<Path>,
                device: &Device,
                options: LoadOptions,
            ) -> Result<Pretrained<Self>> {
                blip_core::precision::check_dtype(device, options.dtype)?;
                let dir = resolve(dir.as_ref())?;
                let dir = ModelDir::open(dir)?;
                let header = dir.weights()?;
                dir.check_layers(&header, &$stacks(&dir.config))?;
                let model = Self::new(&dir.config, device);
                dir.load(header, model, &$keys, $ties, options.dtype)
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
    captioning_stacks,
    "Salesforce/blip-image-captioning-base"
);
hf_family!(
    RetrievalModel,
    "BlipForImageTextRetrieval",
    RETRIEVAL_KEYS,
    &[],
    retrieval_stacks,
    "Salesforce/blip-itm-base-coco"
);
hf_family!(
    VqaModel,
    "BlipForQuestionAnswering",
    VQA_KEYS,
    DECODER_TIES,
    vqa_stacks,
    "Salesforce/blip-vqa-base"
);
