//! Loading the original salesforce/BLIP `.pth` checkpoints (`model_base.pth`,
//! `model_base_caption_capfilt_large.pth`, `model_base_retrieval_coco.pth`, `model_vqa.pth`,
//! ...) into this workspace's modules, without PyTorch and without executing pickle code.
//!
//! A file is a pickled `{"model": state_dict, ...}` (or a bare state dict). burn's PyTorch
//! reader (`burn::store::pytorch_reader`, the parser behind `PytorchStore`) interprets the
//! pickle as data: opening a file reads every tensor's name, shape and dtype and no weight;
//! loading then checks every key, shape and dtype against the module the config built
//! before a single weight is read, and applies the tensors through burn's store
//! (`ModuleSnapshot::apply` with `PyTorchToBurnAdapter`, which renames LayerNorm
//! `weight`/`bias`, and `PyTorchLayout`, which transposes Linear weights), one at a time.
//!
//! # Key mapping
//!
//! The text side keeps its original names (BERT's, as in the HF files: `self` →
//! `self_attention`, `LayerNorm` → `layer_norm`, `cls.predictions` → `lm_head` are the
//! module-field renames of [`blip_text::hf`]'s key maps). Everything else that differs is in
//! this table; the ViT rows are transformers' conversion rules (`rename_key`), kept in
//! [`VIT_RENAMES`] and applied by [`original_to_hf`] / [`hf_to_original`]:
//!
//! | original key | module key | where |
//! |---|---|---|
//! | `visual_encoder.…` | `vision_model.…` | task models (pre-training keeps `visual_encoder`, `visual_encoder_m`) |
//! | `<vit>.cls_token` `[1,1,D]` | `<vit>.embeddings.class_embedding` `[1,1,D]` | every ViT |
//! | `<vit>.pos_embed` `[1,N,D]` | `<vit>.embeddings.position_embedding` `[1,N,D]` | every ViT; resized when `N` ≠ the config's (below) |
//! | `<vit>.patch_embed.proj.*` | `<vit>.embeddings.patch_embedding.*` | every ViT |
//! | `<vit>.blocks.N.norm1/norm2.*` | `<vit>.encoder.layers.N.layer_norm1/layer_norm2.*` | every ViT |
//! | `<vit>.blocks.N.attn.qkv.*` `[3D,D]` | `<vit>.encoder.layers.N.self_attn.qkv.*` (fused, rows `[q; k; v]`) | every ViT |
//! | `<vit>.blocks.N.attn.proj.*` | `<vit>.encoder.layers.N.self_attn.projection.*` | every ViT |
//! | `<vit>.blocks.N.mlp.fc1/fc2.*` | `<vit>.encoder.layers.N.mlp.fc1/fc2.*` | every ViT |
//! | `<vit>.norm.*` | `<vit>.post_layernorm.*` | every ViT |
//! | `text_decoder.bert.encoder.layer.N.attention.*` | `text_decoder.attention.N.*` | [`BlipPretrain`] (the decoder's own self-attention) |
//! | other `text_decoder.bert.*` | — (the model keeps `text_encoder.*`; each copy is checked equal to it) | [`BlipPretrain`] (BLIP §3.1: shared but for SA) |
//! | `temp` (0-d) | `temp` `[1]` | [`BlipPretrain`]; dropped by the task models |
//! | `*_m.*`, `image_queue`, `text_queue`, `queue_ptr` / `ptr_queue`, `idx_queue` | [`Distillation`] | [`BlipPretrain`]; dropped by the task models |
//!
//! Keys present in files and deliberately not loaded:
//!
//! | key | reason |
//! |---|---|
//! | `text_decoder.cls.predictions.decoder.weight` | tied to the decoder's word embeddings (checked equal) |
//! | `text_decoder.cls.predictions.decoder.bias` | alias of `text_decoder.cls.predictions.bias` (checked equal) |
//! | `*.embeddings.position_ids` | an `arange` buffer |
//! | top-level modules a task model lacks (e.g. `text_encoder.*` when a pre-training file is loaded as a captioner) | the original `load_checkpoint` (non-strict) and transformers' conversion drop them too |
//!
//! # Position tables
//!
//! Pre-training files hold a 197-row table (224 px), task files 577 (384 px) or 901 (VQA,
//! 480 px). When the file's table does not fit the config's `image_size`, the ViT is loaded
//! at the file's resolution and its table resized bicubically once
//! ([`blip_vision::VisionTransformer::with_image_size`]), as the original `interpolate_pos_embed` and
//! transformers' conversion did.
//!
//! The original ViT uses LayerNorm eps 1e-6; transformers' configs (and
//! [`blip_vision::VisionConfig::base`]) say 1e-5. The config decides: set
//! `layer_norm_eps = 1e-6` to reproduce the original exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use blip_core::Error;
use blip_core::checkpoint::{KeyMap, PyTorchLayout, expected_keys};
use blip_text::hf::{CAPTIONING_KEYS, DECODER_TIES, RETRIEVAL_KEYS, VQA_KEYS};
use blip_text::linear;
use blip_text::{BlipConfig, CaptioningModel, RetrievalModel, VqaModel};
use blip_vision::VisionConfig;
use burn::module::Module;
use burn::store::burn_pack::{Bytes, Error as PackError, Tensor as PackTensor};
use burn::store::pytorch_reader::{self, PytorchError, PytorchReader};
use burn::store::{FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter};
use burn::tensor::{BoolStore, DType, Device, Tensor, TensorData};

use crate::error::{Result, TrainError};
use crate::model::PRETRAIN_KEYS;
use crate::model::{BlipPretrain, MomentumEncoders, PretrainConfig};
use crate::momentum::FeatureQueue;
use crate::pretrain::Distillation;

/// Original ViT (timm) names → HF / module names, as whole dot-separated segment sequences,
/// applied in this order to the part of a key below its ViT prefix (transformers'
/// `rename_key`, spec §6.3); [`hf_to_original`] applies the inverses in reverse order.
pub const VIT_RENAMES: &[(&str, &str)] = &[
    ("blocks", "encoder.layers"),
    ("attn", "self_attn"),
    ("self_attn.proj", "self_attn.projection"),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
    ("norm", "post_layernorm"),
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("cls_token", "embeddings.class_embedding"),
];

/// Top-level ViT prefixes of original files, and their names in HF task models.
const VIT_PREFIXES: &[(&str, &str)] = &[
    ("visual_encoder", "vision_model"),
    ("visual_encoder_m", "visual_encoder_m"),
];

/// Every top-level name an original BLIP file (other than NLVR2) may hold.
const KNOWN_TOP_LEVEL: &[&str] = &[
    "visual_encoder",
    "visual_encoder_m",
    "text_encoder",
    "text_encoder_m",
    "text_decoder",
    "vision_proj",
    "vision_proj_m",
    "text_proj",
    "text_proj_m",
    "itm_head",
    "temp",
    "image_queue",
    "text_queue",
    "idx_queue",
    "queue_ptr",
    "ptr_queue",
];

/// Replaces every whole dot-separated segment sequence `from` in `key` by `to`.
fn replace_segments(key: &str, from: &str, to: &str) -> String {
    let padded = format!(".{key}.").replace(&format!(".{from}."), &format!(".{to}."));
    padded[1..padded.len() - 1].to_string()
}

/// The HF / module name of an original key: the ViT renames of [`VIT_RENAMES`] below
/// `visual_encoder` (which becomes `vision_model`) or `visual_encoder_m`; every other key is
/// unchanged.
///
/// ```
/// use blip_train::original::original_to_hf;
/// assert_eq!(
///     original_to_hf("visual_encoder.blocks.3.attn.proj.weight"),
///     "vision_model.encoder.layers.3.self_attn.projection.weight"
/// );
/// assert_eq!(
///     original_to_hf("visual_encoder.pos_embed"),
///     "vision_model.embeddings.position_embedding"
/// );
/// ```
pub fn original_to_hf(key: &str) -> String {
    vit_rename(key, true)
}

/// The original name of an HF / module key, the inverse of [`original_to_hf`].
///
/// ```
/// use blip_train::original::{hf_to_original, original_to_hf};
///
/// let key = "vision_model.encoder.layers.3.self_attn.projection.weight";
/// assert_eq!(hf_to_original(key), "visual_encoder.blocks.3.attn.proj.weight");
/// assert_eq!(original_to_hf(&hf_to_original(key)), key);
/// // Keys outside the ViT keep their names.
/// let text = "text_encoder.embeddings.word_embeddings.weight";
/// assert_eq!(hf_to_original(text), text);
/// ```
pub fn hf_to_original(key: &str) -> String {
    vit_rename(key, false)
}

fn vit_rename(key: &str, forward: bool) -> String {
    let (top, rest) = key.split_once('.').unwrap_or((key, ""));
    let Some(&(original, hf)) = VIT_PREFIXES
        .iter()
        .find(|(original, hf)| top == if forward { *original } else { *hf })
    else {
        return key.to_string();
    };
    if forward {
        format!("{hf}.{}", vit_suffix_to_hf(rest))
    } else {
        format!("{original}.{}", vit_suffix_to_original(rest))
    }
}

/// [`VIT_RENAMES`] in order, on the part of a key below its ViT prefix.
fn vit_suffix_to_hf(rest: &str) -> String {
    VIT_RENAMES.iter().fold(rest.to_string(), |k, (from, to)| {
        replace_segments(&k, from, to)
    })
}

/// The inverse of [`vit_suffix_to_hf`]: [`VIT_RENAMES`] reversed, in reverse order.
fn vit_suffix_to_original(rest: &str) -> String {
    VIT_RENAMES
        .iter()
        .rev()
        .fold(rest.to_string(), |k, (from, to)| {
            replace_segments(&k, to, from)
        })
}

/// The original key of a [`BlipPretrain`] / [`MomentumEncoders`] key (their module names
/// under [`PRETRAIN_KEYS`]): ViT renames below `visual_encoder`/`visual_encoder_m`, and the
/// decoder's own self-attention blocks back inside its BERT layers.
fn pretrain_to_original(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("text_decoder.attention.") {
        let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
        return format!("text_decoder.bert.encoder.layer.{layer}.attention.{rest}");
    }
    match key.split_once('.') {
        Some((top @ ("visual_encoder" | "visual_encoder_m"), rest)) => {
            format!("{top}.{}", vit_suffix_to_original(rest))
        }
        _ => key.to_string(),
    }
}

/// What an original file holds, from the model class that saved it.
///
/// ```
/// use blip_train::Family;
///
/// assert_eq!(Family::Pretrain.to_string(), "pre-training");
/// assert_eq!(Family::Vqa.to_string(), "VQA");
/// assert_ne!(Family::Captioning, Family::Retrieval);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `BLIP_Pretrain` (`model_base.pth`, `model_large.pth`, `model_base_capfilt_large.pth`,
    /// ...): ViT, encoder, decoder, heads, `temp`, and usually momentum copies and queues.
    Pretrain,
    /// `BLIP_Decoder` (`model_*_caption*.pth`): ViT and decoder.
    Captioning,
    /// `BLIP_Retrieval` / `BLIP_ITM` (`model_*_retrieval_*.pth`): ViT, encoder, ITC/ITM heads.
    Retrieval,
    /// `BLIP_VQA` (`model_vqa.pth`, `model_base_vqa_capfilt_large.pth`): ViT, question encoder,
    /// answer decoder.
    Vqa,
    /// `BLIP_NLVR` (`model_base_nlvr.pth`): two cross-attention blocks per layer; not
    /// supported by these loaders.
    Nlvr,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Pretrain => "pre-training",
            Family::Captioning => "captioning",
            Family::Retrieval => "retrieval",
            Family::Vqa => "VQA",
            Family::Nlvr => "NLVR2",
        })
    }
}

/// An opened original BLIP checkpoint: every tensor's name, shape and dtype, no weights yet.
///
/// ```no_run
/// use blip_text::BlipConfig;
/// use blip_train::original::OriginalCheckpoint;
/// use burn::tensor::Device;
///
/// # fn main() -> blip_train::Result<()> {
/// let device = Device::flex();
/// let ckpt = OriginalCheckpoint::open("model_base_caption_capfilt_large.pth")?;
/// let mut config = BlipConfig::base();
/// config.vision.layer_norm_eps = 1e-6; // the original ViT's
/// let captioner = ckpt.captioning(&config, &device)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct OriginalCheckpoint {
    path: PathBuf,
    nested: bool,
    tensors: BTreeMap<String, pytorch_reader::Tensor>,
}

/// One planned load: tensors to apply, and the original keys they consumed.
#[derive(Default)]
struct Plan {
    tensors: Vec<PackTensor>,
    used: BTreeSet<String>,
}

impl OriginalCheckpoint {
    /// Opens a `.pth`/`.pt` file (the ZIP container of PyTorch ≥ 1.6 or the older legacy
    /// one) and reads its tensors' metadata from the dictionary under `"model"`, or from the
    /// root dictionary when there is no `"model"` key (a bare state dict).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] when the file cannot be read, [`TrainError::Checkpoint`] when it is
    /// not a PyTorch checkpoint holding a dictionary of tensors.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let fail = |e: PytorchError| match e {
            PytorchError::Io(source) => TrainError::Io {
                path: path.clone(),
                source,
            },
            other => TrainError::Checkpoint {
                path: path.clone(),
                message: format!("not a readable PyTorch checkpoint: {other}"),
            },
        };
        let (reader, nested) = match PytorchReader::with_top_level_key(&path, "model") {
            Ok(reader) => (reader, true),
            Err(PytorchError::KeyNotFound(_)) => (PytorchReader::new(&path).map_err(fail)?, false),
            Err(e) => return Err(fail(e)),
        };
        let tensors: BTreeMap<_, _> = reader.into_tensors().into_iter().collect();
        Ok(Self {
            path,
            nested,
            tensors,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the state dict was under a `"model"` key (else the file is a bare state dict).
    pub fn is_nested(&self) -> bool {
        self.nested
    }

    /// Every tensor key, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Shape of one tensor (empty for a 0-d tensor such as `temp`).
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape())
    }

    /// Element type of one tensor, as burn names it.
    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.tensors.get(key).map(|t| burn_dtype(t.dtype()))
    }

    /// Reads one tensor's values (in the file's dtype).
    pub fn values(&self, key: &str) -> Result<TensorData> {
        let t = self.get(key, &[])?;
        let bytes = t.read().map_err(|e| self.store_error(e.to_string()))?;
        Ok(TensorData::from_bytes_vec(
            bytes,
            t.shape().to_vec(),
            burn_dtype(t.dtype()),
        ))
    }

    /// What the file holds, from its keys; `None` when it is not an original BLIP file
    /// (no `visual_encoder.*` tensors, e.g. an HF-layout state dict).
    pub fn family(&self) -> Option<Family> {
        let has = |prefix: &str| self.tensors.keys().any(|k| k.starts_with(prefix));
        if !has("visual_encoder.") {
            return None;
        }
        if has("cls_head.") || self.tensors.keys().any(|k| k.contains(".self0.")) {
            return Some(Family::Nlvr);
        }
        let (enc, dec, itm) = (has("text_encoder."), has("text_decoder."), has("itm_head."));
        Some(match (enc, dec, itm) {
            (true, true, true) => Family::Pretrain,
            (true, true, false) => Family::Vqa,
            (true, false, true) => Family::Retrieval,
            (false, true, _) => Family::Captioning,
            _ => return None,
        })
    }

    /// Loads a captioning model (`BlipForConditionalGeneration` layout) from a captioning
    /// file, or from a pre-training file's ViT and decoder (as transformers' conversion of
    /// `model_base_capfilt_large.pth` did).
    pub fn captioning(&self, config: &BlipConfig, device: &Device) -> Result<CaptioningModel> {
        self.expect_family(
            "a captioning model",
            &[Family::Captioning, Family::Pretrain],
        )?;
        let (vision, resized) = self.vision_at_checkpoint("visual_encoder", &config.vision)?;
        let model = CaptioningModel::new(&with_vision(config, vision), device);
        let mut plan = Plan::default();
        self.plan(&model, &CAPTIONING_KEYS, &hf_to_original, &mut plan)?;
        self.check_ties()?;
        self.check_unused(&plan, &["visual_encoder", "text_decoder"], &is_tied_alias)?;
        let mut model = self.apply(model, plan, &CAPTIONING_KEYS, &hf_to_original)?;
        if resized {
            model.vision_model = model.vision_model.with_image_size(config.vision.image_size);
        }
        Ok(model)
    }

    /// Loads a retrieval model (`BlipForImageTextRetrieval` layout) from a retrieval file,
    /// or from a pre-training file's ViT, encoder and heads.
    pub fn retrieval(&self, config: &BlipConfig, device: &Device) -> Result<RetrievalModel> {
        self.expect_family("a retrieval model", &[Family::Retrieval, Family::Pretrain])?;
        let (vision, resized) = self.vision_at_checkpoint("visual_encoder", &config.vision)?;
        let model = RetrievalModel::new(&with_vision(config, vision), device);
        let mut plan = Plan::default();
        self.plan(&model, &RETRIEVAL_KEYS, &hf_to_original, &mut plan)?;
        let loaded = [
            "visual_encoder",
            "text_encoder",
            "vision_proj",
            "text_proj",
            "itm_head",
        ];
        self.check_unused(&plan, &loaded, &|_| false)?;
        let mut model = self.apply(model, plan, &RETRIEVAL_KEYS, &hf_to_original)?;
        if resized {
            model.vision_model = model.vision_model.with_image_size(config.vision.image_size);
        }
        Ok(model)
    }

    /// Loads a VQA model (`BlipForQuestionAnswering` layout) from a VQA file, or from a
    /// pre-training file (the original's VQA fine-tuning initialisation; the answer
    /// decoder's cross-attention then starts from the image cross-attention, so the widths
    /// must agree). A 480 px file loaded with a 384 px config has its position table resized.
    pub fn vqa(&self, config: &BlipConfig, device: &Device) -> Result<VqaModel> {
        self.expect_family("a VQA model", &[Family::Vqa, Family::Pretrain])?;
        let (vision, resized) = self.vision_at_checkpoint("visual_encoder", &config.vision)?;
        let model = VqaModel::new(&with_vision(config, vision), device);
        let mut plan = Plan::default();
        self.plan(&model, &VQA_KEYS, &hf_to_original, &mut plan)?;
        self.check_ties()?;
        let loaded = ["visual_encoder", "text_encoder", "text_decoder"];
        self.check_unused(&plan, &loaded, &is_tied_alias)?;
        let mut model = self.apply(model, plan, &VQA_KEYS, &hf_to_original)?;
        if resized {
            model.vision_model = model.vision_model.with_image_size(config.vision.image_size);
        }
        Ok(model)
    }

    /// Loads a pre-training file (the `model_base.pth` layout) into the pre-training model,
    /// and its distillation state when the file has one.
    ///
    /// * `text_encoder.*` → [`BlipPretrain::text_encoder`]; the decoder's own self-attention
    ///   blocks `text_decoder.bert.encoder.layer.N.attention.*` →
    ///   `text_decoder.attention.N`; `text_decoder.cls.predictions.*` → the LM head. Every
    ///   other `text_decoder.bert.*` tensor is one the original ties to the encoder's: it must
    ///   equal the `text_encoder.*` copy (the model keeps one tensor), else
    ///   [`TrainError::Checkpoint`] names both keys.
    /// * `temp` (0-d in the file) → the `[1]` temperature.
    /// * When the file has momentum copies (`*_m.*`) or queues, all of them are required
    ///   and returned as a [`Distillation`]: `image_queue`/`text_queue` `[256, K]` (K must be
    ///   the config's `queue_size`), the pointer from `queue_ptr` (or `ptr_queue`), the image
    ///   ids from `idx_queue` when present (else −100s). Otherwise the second value is `None`.
    pub fn pretrain(
        &self,
        config: &PretrainConfig,
        device: &Device,
    ) -> Result<(BlipPretrain, Option<Distillation>)> {
        self.expect_family("the pre-training model", &[Family::Pretrain])?;
        let (vision, resized) = self.vision_at_checkpoint("visual_encoder", &config.blip.vision)?;
        let mut at_file = config.clone();
        at_file.blip.vision = vision;
        let model = at_file.init(device);
        let mut plan = Plan::default();
        self.plan(&model, &PRETRAIN_KEYS, &pretrain_to_original, &mut plan)?;

        let distill = self
            .tensors
            .keys()
            .any(|k| k.starts_with("visual_encoder_m.") || k.ends_with("_queue"));
        let mut momentum_plan = Plan::default();
        let momentum = if distill {
            let (vision_m, resized_m) =
                self.vision_at_checkpoint("visual_encoder_m", &config.blip.vision)?;
            let (dv, dt, dp) = (
                vision_m.hidden_size,
                config.blip.text.hidden_size,
                config.blip.image_text_hidden_size,
            );
            let momentum = MomentumEncoders {
                visual_encoder_m: vision_m.init(device),
                vision_proj_m: linear(dv, dp, device),
                text_encoder_m: config.blip.text.init(device),
                text_proj_m: linear(dt, dp, device),
            };
            self.plan(
                &momentum,
                &PRETRAIN_KEYS,
                &pretrain_to_original,
                &mut momentum_plan,
            )?;
            Some((momentum, resized_m))
        } else {
            None
        };
        let queues = if distill {
            Some(self.queues(config, device, &mut momentum_plan)?)
        } else {
            None
        };

        self.check_ties()?;
        let shared = self.check_shared(&plan)?;
        plan.used.extend(momentum_plan.used.iter().cloned());
        self.check_unused(&plan, KNOWN_TOP_LEVEL, &|k| {
            is_tied_alias(k) || shared.contains(k)
        })?;

        let mut model = self.apply(
            model,
            std::mem::take(&mut plan),
            &PRETRAIN_KEYS,
            &pretrain_to_original,
        )?;
        if resized {
            model.visual_encoder = model
                .visual_encoder
                .with_image_size(config.blip.vision.image_size);
        }
        let distillation = match (momentum, queues) {
            (Some((momentum, resized_m)), Some((image_queue, text_queue, idx_queue))) => {
                let mut momentum = self.apply(
                    momentum,
                    momentum_plan,
                    &PRETRAIN_KEYS,
                    &pretrain_to_original,
                )?;
                if resized_m {
                    momentum.visual_encoder_m = momentum
                        .visual_encoder_m
                        .with_image_size(config.blip.vision.image_size);
                }
                Some(Distillation {
                    momentum: momentum.no_grad(),
                    image_queue,
                    text_queue,
                    idx_queue,
                })
            }
            _ => None,
        };
        Ok((model, distillation))
    }

    // ---- checks ------------------------------------------------------------------------

    fn expect_family(&self, target: &str, accepted: &[Family]) -> Result<()> {
        let found = self.family();
        if found.is_some_and(|f| accepted.contains(&f)) {
            return Ok(());
        }
        let accepted: Vec<String> = accepted.iter().map(Family::to_string).collect();
        let message = match found {
            Some(family) => format!(
                "is a {family} checkpoint ({}); {target} loads from a {} checkpoint",
                self.family_evidence(family),
                accepted.join(" or ")
            ),
            None if self.tensors.keys().any(|k| k.starts_with("vision_model.")) => {
                "is a HuggingFace-layout state dict (`vision_model.*`), not an original BLIP \
                 checkpoint: load HF models with `from_pretrained`"
                    .to_string()
            }
            None => format!(
                "is not an original BLIP checkpoint: no `visual_encoder.*` with `text_encoder.*` \
                 or `text_decoder.*` among its {} tensors{}",
                self.tensors.len(),
                self.tensors
                    .keys()
                    .next()
                    .map(|k| format!(" (first key `{k}`)"))
                    .unwrap_or_default()
            ),
        };
        Err(TrainError::Checkpoint {
            path: self.path.clone(),
            message,
        })
    }

    fn family_evidence(&self, family: Family) -> String {
        let has = |prefix: &str| self.tensors.keys().any(|k| k.starts_with(prefix));
        let yes_no =
            |prefix: &str| format!("{} `{prefix}*`", if has(prefix) { "has" } else { "no" });
        match family {
            Family::Nlvr => "has NLVR2 `self0`/`self1` cross-attention blocks".into(),
            _ => [
                yes_no("text_encoder."),
                yes_no("text_decoder."),
                yes_no("itm_head."),
            ]
            .join(", "),
        }
    }

    fn get(&self, key: &str, expected: &[usize]) -> Result<&pytorch_reader::Tensor> {
        self.tensors.get(key).ok_or_else(|| {
            Error::MissingTensor {
                path: self.path.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
            }
            .into()
        })
    }

    fn store_error(&self, message: String) -> TrainError {
        Error::Store {
            path: self.path.clone(),
            message,
        }
        .into()
    }

    /// The ViT config at the resolution of the file's position table, and whether it
    /// differs from `config` (so the table must be resized after loading).
    fn vision_at_checkpoint(
        &self,
        prefix: &str,
        config: &VisionConfig,
    ) -> Result<(VisionConfig, bool)> {
        let key = format!("{prefix}.pos_embed");
        let Some(shape) = self.shape(&key) else {
            return Ok((config.clone(), false)); // reported as missing when planned
        };
        let rows = config.num_positions();
        if shape.len() != 3 || shape[1] == rows {
            return Ok((config.clone(), false)); // a wrong rank is reported when planned
        }
        let patches = shape[1].saturating_sub(1);
        let side = (patches as f64).sqrt().round() as usize;
        if side == 0 || side * side != patches {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                key,
                expected: vec![1, rows, config.hidden_size],
                found: shape.to_vec(),
            }
            .into());
        }
        let at_file = VisionConfig {
            image_size: side * config.patch_size,
            ..config.clone()
        };
        Ok((at_file, true))
    }

    /// Matches every parameter of `module` with its original tensor (present, floating
    /// point, same shape; a 0-d `temp` fills a `[1]` parameter) and queues it for loading.
    fn plan<M: Module>(
        &self,
        module: &M,
        map: &KeyMap,
        to_original: &dyn Fn(&str) -> String,
        plan: &mut Plan,
    ) -> Result<()> {
        for (key, shape) in expected_keys(module, map) {
            let original = to_original(&key);
            let tensor = self.get(&original, &shape)?;
            let dtype = float_dtype(tensor.dtype()).ok_or_else(|| Error::DType {
                path: self.path.clone(),
                key: original.clone(),
                found: format!("{:?}", tensor.dtype()),
            })?;
            let scalar_as_one = tensor.shape().is_empty() && shape == [1];
            if tensor.shape() != shape.as_slice() && !scalar_as_one {
                return Err(Error::ShapeMismatch {
                    path: self.path.clone(),
                    key: original,
                    expected: shape,
                    found: tensor.shape().to_vec(),
                }
                .into());
            }
            let (reader, len) = (tensor.clone(), tensor.byte_len());
            plan.tensors.push(PackTensor::deferred(
                map.to_module(&key),
                dtype,
                shape,
                None,
                len,
                move || {
                    reader
                        .read()
                        .map(Bytes::from_bytes_vec)
                        .map_err(|e| PackError::IoError(e.to_string()))
                },
            ));
            plan.used.insert(original);
        }
        Ok(())
    }

    /// Whether two tensors hold the same values (shape, dtype and bytes).
    fn same(&self, a: &str, b: &str) -> Result<bool> {
        let (ta, tb) = (self.get(a, &[])?, self.get(b, &[])?);
        if ta.shape() != tb.shape() || ta.dtype() != tb.dtype() {
            return Ok(false);
        }
        let read =
            |t: &pytorch_reader::Tensor| t.read().map_err(|e| self.store_error(e.to_string()));
        Ok(read(ta)? == read(tb)?)
    }

    /// The LM head's tied aliases must equal their sources where the file stores both.
    fn check_ties(&self) -> Result<()> {
        for (alias, source) in DECODER_TIES {
            // A pre-training file may store the decoder's word embeddings as the encoder's only.
            let source = if self.tensors.contains_key(*source) {
                source.to_string()
            } else {
                source.replace("text_decoder.bert.", "text_encoder.")
            };
            if self.tensors.contains_key(*alias)
                && self.tensors.contains_key(&source)
                && !self.same(alias, &source)?
            {
                return Err(TrainError::Checkpoint {
                    path: self.path.clone(),
                    message: format!(
                        "`{alias}` differs from `{source}`; BLIP ties them and this model keeps \
                         one tensor"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The decoder's copies of the tensors it shares with the encoder in pre-training: each
    /// must equal the encoder's (which the model loads). Returns the copies checked.
    fn check_shared(&self, plan: &Plan) -> Result<BTreeSet<String>> {
        let mut shared = BTreeSet::new();
        for key in self.tensors.keys() {
            let Some(rest) = key.strip_prefix("text_decoder.bert.") else {
                continue;
            };
            let encoder = format!("text_encoder.{rest}");
            if plan.used.contains(key) || !plan.used.contains(&encoder) {
                continue; // the decoder's own, or a copy of nothing loaded (reported unused)
            }
            if !self.same(key, &encoder)? {
                return Err(TrainError::Checkpoint {
                    path: self.path.clone(),
                    message: format!(
                        "`{key}` differs from `{encoder}`: BLIP pre-training ties the decoder's \
                         weights outside its self-attention to the encoder's, and this model \
                         keeps one tensor (is this a fine-tuned checkpoint rather than a \
                         pre-training one?)"
                    ),
                });
            }
            shared.insert(key.clone());
        }
        Ok(shared)
    }

    /// Every tensor under the prefixes a loader reads must have been used (or be a checked
    /// alias, or a buffer); other BLIP top-level modules are dropped; anything else is
    /// reported.
    fn check_unused(
        &self,
        plan: &Plan,
        loaded: &[&str],
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        for (key, tensor) in &self.tensors {
            if plan.used.contains(key) || key.ends_with(".position_ids") || skip(key) {
                continue;
            }
            let top = key.split('.').next().unwrap_or(key);
            if loaded.contains(&top) || !KNOWN_TOP_LEVEL.contains(&top) {
                return Err(Error::UnexpectedTensor {
                    path: self.path.clone(),
                    key: key.clone(),
                    shape: tensor.shape().to_vec(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// The feature queues, the queue pointer and the image ids of a distillation state.
    fn queues(
        &self,
        config: &PretrainConfig,
        device: &Device,
        plan: &mut Plan,
    ) -> Result<(FeatureQueue, FeatureQueue, Vec<i64>)> {
        let (dim, size) = (config.blip.image_text_hidden_size, config.queue_size);
        let mut queue = |key: &str| -> Result<Tensor<2>> {
            let shape = self.get(key, &[dim, size])?.shape().to_vec();
            if shape != [dim, size] {
                return Err(Error::ShapeMismatch {
                    path: self.path.clone(),
                    key: key.to_string(),
                    expected: vec![dim, size],
                    found: shape,
                }
                .into());
            }
            let values = self.floats(key)?;
            plan.used.insert(key.to_string());
            Ok(Tensor::from_data(
                TensorData::new(values, [dim, size]),
                device,
            ))
        };
        let (image, text) = (queue("image_queue")?, queue("text_queue")?);
        let ptr_key = ["queue_ptr", "ptr_queue"]
            .into_iter()
            .find(|k| self.tensors.contains_key(*k))
            .unwrap_or("queue_ptr");
        let ptr = self.ints(ptr_key, &[1])?;
        plan.used.insert(ptr_key.to_string());
        let ptr = match ptr.as_slice() {
            [p] if *p >= 0 && (*p as usize) < size.max(1) => *p as usize,
            _ => {
                return Err(TrainError::Checkpoint {
                    path: self.path.clone(),
                    message: format!(
                        "`{ptr_key}` = {ptr:?} is not a position in a queue of {size}"
                    ),
                });
            }
        };
        let idx_queue = if self.tensors.contains_key("idx_queue") {
            plan.used.insert("idx_queue".into());
            self.ints("idx_queue", &[1, size])?
        } else {
            vec![-100; size]
        };
        Ok((
            FeatureQueue {
                features: image,
                ptr,
            },
            FeatureQueue {
                features: text,
                ptr,
            },
            idx_queue,
        ))
    }

    /// A floating-point tensor's values as `f32`s.
    fn floats(&self, key: &str) -> Result<Vec<f32>> {
        let dtype = self.get(key, &[])?.dtype();
        if float_dtype(dtype).is_none() {
            return Err(Error::DType {
                path: self.path.clone(),
                key: key.to_string(),
                found: format!("{dtype:?}"),
            }
            .into());
        }
        self.values(key)?
            .try_into_vec_as::<f32>()
            .map_err(|e| self.store_error(format!("`{key}`: {e:?}")))
    }

    /// An integer tensor of exactly `shape` as `i64`s.
    fn ints(&self, key: &str, shape: &[usize]) -> Result<Vec<i64>> {
        let tensor = self.get(key, shape)?;
        if tensor.shape() != shape {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                key: key.to_string(),
                expected: shape.to_vec(),
                found: tensor.shape().to_vec(),
            }
            .into());
        }
        let bytes = tensor.read().map_err(|e| self.store_error(e.to_string()))?;
        let width = tensor.dtype().size();
        let values = match tensor.dtype() {
            pytorch_reader::DType::I64 => bytes
                .chunks_exact(width)
                .map(|b| i64::from_ne_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            pytorch_reader::DType::I32 => bytes
                .chunks_exact(width)
                .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")) as i64)
                .collect(),
            other => {
                return Err(Error::DType {
                    path: self.path.clone(),
                    key: key.to_string(),
                    found: format!("{other:?} (expected an integer tensor)"),
                }
                .into());
            }
        };
        Ok(values)
    }

    /// Applies a plan; a parameter burn's store did not reach is reported by original key.
    fn apply<M: Module + ModuleSnapshot>(
        &self,
        mut module: M,
        plan: Plan,
        map: &KeyMap,
        to_original: &dyn Fn(&str) -> String,
    ) -> Result<M> {
        let adapter = PyTorchLayout(PyTorchToBurnAdapter).chain(FloatCastAdapter::to(DType::F32));
        let result = module.apply(plan.tensors, None, Some(Box::new(adapter)), false);
        if let Some(error) = result.errors.first() {
            return Err(self.store_error(error.to_string()));
        }
        if let Some((missing, _)) = result.missing.first() {
            return Err(Error::MissingTensor {
                path: self.path.clone(),
                key: to_original(&map.to_checkpoint(missing)),
                expected: vec![],
            }
            .into());
        }
        Ok(module)
    }
}

fn is_tied_alias(key: &str) -> bool {
    DECODER_TIES.iter().any(|(alias, _)| *alias == key)
}

fn with_vision(config: &BlipConfig, vision: VisionConfig) -> BlipConfig {
    BlipConfig {
        vision,
        ..config.clone()
    }
}

fn burn_dtype(dtype: pytorch_reader::DType) -> DType {
    use pytorch_reader::DType as Pt;
    match dtype {
        Pt::F64 => DType::F64,
        Pt::F32 => DType::F32,
        Pt::F16 => DType::F16,
        Pt::BF16 => DType::BF16,
        Pt::I64 => DType::I64,
        Pt::I32 => DType::I32,
        Pt::I16 => DType::I16,
        Pt::I8 => DType::I8,
        Pt::U64 => DType::U64,
        Pt::U32 => DType::U32,
        Pt::U16 => DType::U16,
        Pt::U8 => DType::U8,
        Pt::Bool => DType::Bool(BoolStore::Native),
    }
}

fn float_dtype(dtype: pytorch_reader::DType) -> Option<DType> {
    use pytorch_reader::DType as Pt;
    matches!(dtype, Pt::F64 | Pt::F32 | Pt::F16 | Pt::BF16).then(|| burn_dtype(dtype))
}
