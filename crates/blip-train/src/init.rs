//! Starting pre-training where BLIP starts: the ViT from an ImageNet checkpoint, the text
//! encoder and decoder from BERT.
//!
//! BLIP initialises its ViT-B from DeiT-B (ViT-L from ImageNet-21k ViT-L) and both text
//! transformers from `bert-base-uncased` (BLIP §4.1). [`BlipPretrain::init_vision_from`]
//! and [`BlipPretrain::init_text_from`] do the same from checkpoints in the layouts these
//! weights are published in (a directory with `model.safetensors`, or the file itself):
//!
//! | source | layout | keys |
//! |---|---|---|
//! | `google/vit-*`, `facebook/deit-*` (non-distilled) | transformers `ViTModel` / `ViTFor…` | `[vit.]embeddings.cls_token`, `encoder.layer.N.attention.attention.{query,key,value}`, `layernorm_before`, … |
//! | `facebook/deit-*-distilled-*` | transformers `DeiTModel` / `DeiTFor…` | `[deit.]…`, plus a distillation token (dropped with its position row) |
//! | timm `vit_*` | timm `VisionTransformer` | `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, … (the original BLIP ViT's own names) |
//! | `bert-base-uncased`, MiniLM, … | transformers `BertModel` / `BertForMaskedLM` | `[bert.]embeddings.…`, `encoder.layer.N.…`, `cls.predictions.…` |
//!
//! What the original does, and so what happens here:
//! - separate `query`/`key`/`value` projections are fused into the ViT's `qkv` (rows
//!   `[q; k; v]`); the position table is resized bicubically when the checkpoint was trained
//!   at another resolution (the original's `interpolate_pos_embed`);
//! - the text encoder's layers and the decoder's causal self-attention both come from BERT's
//!   layers (the original loads `BertModel` and `BertLMHeadModel` from the same weights, then
//!   shares all but self-attention); the cross-attention blocks, which BERT lacks, keep their
//!   fresh initialisation;
//! - BERT's vocabulary fills the first rows of the word embeddings and LM bias; the rows of
//!   the tokens BLIP adds (`[DEC]`, `[ENC]`) keep their fresh values (the original's
//!   `resize_token_embeddings`); a longer position table is cut to the config's length;
//! - BERT's token-type embeddings, pooler and classifier heads are not used (BLIP's text
//!   transformer has no token types);
//! - the LM head's transform comes from `cls.predictions` when the checkpoint has it
//!   (`BertForMaskedLM`), else it stays fresh.
//!
//! The config decides the sizes and the LayerNorm epsilon; every tensor is checked against
//! the model before any is applied, and a checkpoint of another family or size is a typed
//! error naming the key and both shapes.
//!
//! ```no_run
//! use blip_train::PretrainConfig;
//! use burn::tensor::Device;
//!
//! # fn main() -> blip_train::Result<()> {
//! let model = PretrainConfig::base().init(&Device::flex());
//! let (model, vision) = model.init_vision_from("deit-base-patch16-224")?;
//! let (model, text) = model.init_text_from("bert-base-uncased")?;
//! println!("{vision}\n{text}");
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use blip_core::checkpoint::{
    KeyMap, PyTorchLayout, SafetensorsHeader, count_layers, expected_keys,
};
use blip_core::{Error, read_json};
use blip_vision::resize_position_table;
use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, bridge};
use burn::tensor::{Tensor, TensorData};

use crate::error::{Result, TrainError};
use crate::model::BlipPretrain;

/// The checkpoint layouts [`BlipPretrain::init_vision_from`] and
/// [`BlipPretrain::init_text_from`] read.
///
/// ```
/// use blip_train::InitSource;
///
/// // How reports name the layouts.
/// assert_eq!(InitSource::HfDeit.to_string(), "transformers DeiT");
/// assert_eq!(InitSource::Timm.to_string(), "timm ViT");
/// assert_eq!(InitSource::BertForMaskedLm.to_string(), "transformers BertForMaskedLM");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitSource {
    /// transformers `ViTModel` (or a `ViTFor…` head model, keys under `vit.`).
    HfVit,
    /// transformers `DeiTModel` (or a `DeiTFor…` head model, keys under `deit.`).
    HfDeit,
    /// timm's `VisionTransformer`.
    Timm,
    /// transformers `BertModel`.
    Bert,
    /// transformers `BertForMaskedLM` / `BertForPreTraining` (keys under `bert.`, LM head
    /// under `cls.predictions`).
    BertForMaskedLm,
}

impl fmt::Display for InitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InitSource::HfVit => "transformers ViT",
            InitSource::HfDeit => "transformers DeiT",
            InitSource::Timm => "timm ViT",
            InitSource::Bert => "transformers BertModel",
            InitSource::BertForMaskedLm => "transformers BertForMaskedLM",
        })
    }
}

/// What an initialisation took from its checkpoint.
///
/// ```
/// use blip_train::{InitReport, InitSource};
///
/// let report = InitReport {
///     path: "bert/model.safetensors".into(),
///     source: InitSource::Bert,
///     loaded: vec!["text_encoder.embeddings.word_embeddings.weight".into()],
///     fresh: vec!["text_encoder.encoder.layer.0.crossattention.self.query.weight".into()],
///     notes: vec!["2 vocabulary rows added".into()],
/// };
/// assert_eq!(
///     report.to_string(),
///     "bert/model.safetensors (transformers BertModel): 1 tensors loaded, 1 kept fresh; \
///      2 vocabulary rows added"
/// );
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct InitReport {
    /// The checkpoint file read.
    pub path: PathBuf,
    /// Its layout.
    pub source: InitSource,
    /// Parameters set from the checkpoint, by module path.
    pub loaded: Vec<String>,
    /// Parameters of the initialised part that kept their fresh values, by module path
    /// (cross-attention, and the LM head's transform without `cls.predictions`).
    pub fresh: Vec<String>,
    /// Adaptations: a resized position table, added vocabulary rows, a cut position table.
    pub notes: Vec<String>,
}

impl fmt::Display for InitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {} tensors loaded, {} kept fresh",
            self.path.display(),
            self.source,
            self.loaded.len(),
            self.fresh.len()
        )?;
        for note in &self.notes {
            write!(f, "; {note}")?;
        }
        Ok(())
    }
}

/// A checkpoint's header, with the prefix its keys carry.
struct Source<'a> {
    header: &'a SafetensorsHeader,
    prefix: &'static str,
    source: InitSource,
}

impl Source<'_> {
    fn path(&self) -> &Path {
        &self.header.path
    }

    /// The file's key for `key` below the prefix.
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn has(&self, key: &str) -> bool {
        self.header.tensors.contains_key(&self.key(key))
    }

    /// One tensor as f32 values and its shape; a NaN or infinity is refused.
    fn read(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        Ok(self.header.floats(&self.key(key))?)
    }

    fn invalid(&self, message: String) -> TrainError {
        TrainError::Checkpoint {
            path: self.path().to_path_buf(),
            message,
        }
    }

    /// The typed error of a tensor whose shape does not fit, naming the file's key.
    fn mismatch(&self, key: &str, expected: Vec<usize>, found: Vec<usize>) -> TrainError {
        Error::ShapeMismatch {
            path: self.path().to_path_buf(),
            key: self.key(key),
            expected,
            found,
        }
        .into()
    }
}

/// The safetensors file of `path` (a directory holding `model.safetensors`, or the file).
fn checkpoint_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    }
}

/// Refuses a `config.json` beside the weights whose activation is not BLIP's exact GELU.
fn check_activation(file: &Path) -> Result<()> {
    let config = config_beside(file);
    if !config.is_file() {
        return Ok(());
    }
    let value = read_json(&config)?;
    let act = value
        .get("hidden_act")
        .or_else(|| value.get("hidden_activation"))
        .and_then(|v| v.as_str());
    match act {
        None | Some("gelu") => Ok(()),
        Some(other) => Err(Error::Config {
            path: config,
            message: format!(
                "hidden_act is {other:?}; BLIP's transformers use exact GELU (\"gelu\")"
            ),
        }
        .into()),
    }
}

/// Tensors planned for one module, by module path in checkpoint layout (`[out, in]` Linear
/// weights, LayerNorm `weight`/`bias`).
struct Plan {
    expected: BTreeMap<String, Vec<usize>>,
    tensors: Vec<(String, Vec<f32>, Vec<usize>)>,
}

impl Plan {
    fn new<M: Module>(module: &M) -> Self {
        const MODULE_PATHS: KeyMap = KeyMap {
            renames: &[],
            ignored: &[],
        };
        Self {
            expected: expected_keys(module, &MODULE_PATHS),
            tensors: Vec::new(),
        }
    }

    /// The shape the module expects for `target`.
    fn shape(&self, source: &Source, target: &str) -> Result<Vec<usize>> {
        self.expected.get(target).cloned().ok_or_else(|| {
            source.invalid(format!("internal: the model has no parameter `{target}`"))
        })
    }

    /// Queues `values` (from the file's `key`) for `target`, after checking its shape
    /// against the module.
    fn set(
        &mut self,
        source: &Source,
        target: &str,
        key: &str,
        values: Vec<f32>,
        shape: Vec<usize>,
    ) -> Result<()> {
        let expected = self.shape(source, target)?;
        if expected != shape {
            return Err(source.mismatch(key, expected, shape));
        }
        self.tensors.push((target.into(), values, shape));
        Ok(())
    }

    /// Reads `key` and queues it for `target`.
    fn copy(&mut self, source: &Source, target: &str, key: &str) -> Result<()> {
        let (values, shape) = source.read(key)?;
        self.set(source, target, key, values, shape)
    }

    /// Queues `key` for `target` where the two may differ in their first dimension only:
    /// with `current` (the parameter's values), the file's rows replace its first rows and
    /// the others keep their values (BERT's vocabulary in BLIP's larger one); without, the
    /// file's first rows are taken (a longer position table). Returns the file's row count.
    fn set_rows(
        &mut self,
        source: &Source,
        target: &str,
        key: &str,
        current: Option<Vec<f32>>,
    ) -> Result<usize> {
        let expected = self.shape(source, target)?;
        let (values, shape) = source.read(key)?;
        let (theirs, ours) = (shape.first().copied(), expected[0]);
        let fits = shape.len() == expected.len()
            && shape[1..] == expected[1..]
            && theirs.is_some_and(|n| {
                if current.is_some() {
                    n <= ours
                } else {
                    n >= ours
                }
            });
        if !fits {
            return Err(source.mismatch(key, expected, shape));
        }
        let row: usize = expected[1..].iter().product();
        let values = match current {
            Some(mut all) => {
                all[..values.len()].copy_from_slice(&values);
                all
            }
            None => values[..ours * row].to_vec(),
        };
        self.set(source, target, key, values, expected)?;
        Ok(shape[0])
    }

    /// Applies the queued tensors to `module`; returns it with the loaded and fresh paths.
    fn apply<M: Module + ModuleSnapshot>(
        self,
        mut module: M,
        source: &Source,
    ) -> Result<(M, Vec<String>, Vec<String>)> {
        let loaded: Vec<String> = self.tensors.iter().map(|t| t.0.clone()).collect();
        let fresh = self
            .expected
            .keys()
            .filter(|k| !loaded.contains(k))
            .cloned()
            .collect();
        let tensors: Vec<PackTensor> = self
            .tensors
            .into_iter()
            .map(|(target, values, shape)| {
                bridge::from_data(TensorData::new(values, shape), target, None)
            })
            .collect();
        let adapter = PyTorchLayout(PyTorchToBurnAdapter);
        let result = module.apply(tensors, None, Some(Box::new(adapter)), false);
        if let Some(error) = result.errors.first() {
            return Err(source.invalid(error.to_string()));
        }
        if let Some(unused) = result.unused.first() {
            return Err(source.invalid(format!("internal: `{unused}` was not applied")));
        }
        Ok((module, loaded, fresh))
    }
}

/// The current values of a parameter, to keep the rows a checkpoint does not cover.
fn values_of<const D: usize>(source: &Source, tensor: Tensor<D>) -> Result<Vec<f32>> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| source.invalid(format!("internal: reading a parameter back: {e:?}")))
}

/// The `config.json` beside a checkpoint (`path` a directory or the weights file).
fn config_beside(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("config.json")
    } else {
        path.with_file_name("config.json")
    }
}

/// The transformers config at `file`, when there is one that declares a `hidden_size`
/// (timm's `config.json` does not).
fn declared_sizes(file: &Path) -> Result<Option<serde_json::Value>> {
    if !file.is_file() {
        return Ok(None);
    }
    let value = read_json(file)?;
    Ok(value.get("hidden_size").is_some().then_some(value))
}

/// Reads the integer `name` of a transformers config, bounded by `max`.
fn size_field(value: &serde_json::Value, name: &str, max: usize, config: &Path) -> Result<usize> {
    value
        .get(name)
        .and_then(serde_json::Value::as_u64)
        .filter(|&n| n > 0 && n <= max as u64)
        .map(|n| n as usize)
        .ok_or_else(|| {
            Error::Config {
                path: config.to_path_buf(),
                message: format!("`{name}` is missing or not an integer in 1..={max}"),
            }
            .into()
        })
}

/// `config` with the text sizes of the BERT checkpoint at `path` (its `config.json`: width,
/// depth, heads, feed-forward width, position table and LayerNorm epsilon), so that
/// [`BlipPretrain::init_text_from`] fits; unchanged when there is no such file. Vocabulary,
/// token ids and dropout stay `config`'s: they follow BLIP's tokenizer and training recipe.
///
/// ```
/// use blip_text::TextConfig;
/// use blip_train::text_config_of;
///
/// // A MiniLM-sized BERT: its config.json beside the weights.
/// let dir = std::env::temp_dir().join(format!("blip-doc-bert-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let json = r#"{"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
///     "intermediate_size": 1536, "max_position_embeddings": 512}"#;
/// std::fs::write(dir.join("config.json"), json)?;
/// let text = text_config_of(&dir, TextConfig::base(768))?;
/// assert_eq!((text.hidden_size, text.num_hidden_layers, text.intermediate_size), (384, 6, 1536));
/// assert_eq!(text.vocab_size, 30524); // BLIP's tokenizer's, not the checkpoint's
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn text_config_of(
    path: impl AsRef<Path>,
    mut config: blip_text::TextConfig,
) -> Result<blip_text::TextConfig> {
    let file = config_beside(&checkpoint_file(path.as_ref()));
    let Some(value) = declared_sizes(&file)? else {
        return Ok(config);
    };
    [
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
    ] = transformer_sizes(&value, &file)?;
    config.max_position_embeddings = size_field(
        &value,
        "max_position_embeddings",
        blip_core::MAX_WIDTH,
        &file,
    )?;
    if let Some(eps) = value
        .get("layer_norm_eps")
        .and_then(serde_json::Value::as_f64)
    {
        config.layer_norm_eps = eps;
    }
    Ok(config)
}

/// Width, depth, heads and feed-forward width of a transformers config, bounded, the heads
/// dividing the width.
fn transformer_sizes(value: &serde_json::Value, file: &Path) -> Result<[usize; 4]> {
    use blip_core::{MAX_LAYERS, MAX_WIDTH};
    let width = size_field(value, "hidden_size", MAX_WIDTH, file)?;
    let heads = size_field(value, "num_attention_heads", MAX_WIDTH, file)?;
    if !width.is_multiple_of(heads) {
        return Err(Error::Config {
            path: file.to_path_buf(),
            message: format!("hidden_size {width} is not divisible by num_attention_heads {heads}"),
        }
        .into());
    }
    Ok([
        width,
        size_field(value, "num_hidden_layers", MAX_LAYERS, file)?,
        heads,
        size_field(value, "intermediate_size", MAX_WIDTH, file)?,
    ])
}

/// `config` with the ViT sizes of the transformers ViT/DeiT checkpoint at `path` (its
/// `config.json`: width, depth, heads, MLP width, patch size), so that
/// [`BlipPretrain::init_vision_from`] fits. The image size and LayerNorm epsilon stay
/// `config`'s (BLIP trains at its own resolution, with eps 1e-6). Unchanged without a
/// config that declares sizes (timm's do not): choose a matching preset then.
///
/// ```
/// use blip_train::vision_config_of;
/// use blip_vision::VisionConfig;
///
/// // DeiT-tiny: its config.json beside the weights.
/// let dir = std::env::temp_dir().join(format!("blip-doc-deit-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let json = r#"{"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3,
///     "intermediate_size": 768, "patch_size": 16, "image_size": 224}"#;
/// std::fs::write(dir.join("config.json"), json)?;
/// let base = VisionConfig::base();
/// let vision = vision_config_of(&dir, base.clone())?;
/// assert_eq!((vision.hidden_size, vision.num_attention_heads, vision.patch_size), (192, 3, 16));
/// assert_eq!(vision.image_size, base.image_size); // BLIP's resolution stays
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn vision_config_of(
    path: impl AsRef<Path>,
    mut config: blip_vision::VisionConfig,
) -> Result<blip_vision::VisionConfig> {
    use blip_vision::MAX_IMAGE_SIZE;
    let file = config_beside(&checkpoint_file(path.as_ref()));
    let Some(value) = declared_sizes(&file)? else {
        return Ok(config);
    };
    [
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
    ] = transformer_sizes(&value, &file)?;
    config.patch_size = size_field(&value, "patch_size", MAX_IMAGE_SIZE, &file)?;
    Ok(config)
}

/// Which ViT layout `header` holds.
fn vision_source(header: &SafetensorsHeader) -> Result<Source<'_>> {
    let has = |key: &str| header.tensors.contains_key(key);
    let (prefix, source) = if has("vit.embeddings.cls_token") {
        ("vit.", InitSource::HfVit)
    } else if has("deit.embeddings.cls_token") {
        ("deit.", InitSource::HfDeit)
    } else if has("embeddings.distillation_token") {
        ("", InitSource::HfDeit)
    } else if has("embeddings.cls_token") {
        ("", InitSource::HfVit)
    } else if has("cls_token") && has("patch_embed.proj.weight") {
        ("", InitSource::Timm)
    } else {
        return Err(TrainError::Checkpoint {
            path: header.path.clone(),
            message: "not a ViT checkpoint: no `embeddings.cls_token` (transformers ViT/DeiT) \
                      or `cls_token` + `patch_embed.proj.weight` (timm)"
                .into(),
        });
    };
    Ok(Source {
        header,
        prefix,
        source,
    })
}

/// Which BERT layout `header` holds.
fn text_source(header: &SafetensorsHeader) -> Result<Source<'_>> {
    let has = |key: &str| header.tensors.contains_key(key);
    let (prefix, source) = if has("bert.embeddings.word_embeddings.weight") {
        ("bert.", InitSource::BertForMaskedLm)
    } else if has("embeddings.word_embeddings.weight") {
        ("", InitSource::Bert)
    } else {
        return Err(TrainError::Checkpoint {
            path: header.path.clone(),
            message: "not a BERT checkpoint: no `embeddings.word_embeddings.weight` \
                      (BertModel) or `bert.embeddings.word_embeddings.weight` (BertForMaskedLM)"
                .into(),
        });
    };
    Ok(Source {
        header,
        prefix,
        source,
    })
}

/// Fails unless the checkpoint has exactly `expected` layers under `prefix`.
fn check_layers(source: &Source, prefix: &str, expected: usize) -> Result<()> {
    let keys = source
        .header
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix(source.prefix));
    let found = count_layers(keys, prefix);
    if found != expected {
        return Err(source.invalid(format!(
            "{found} layers under `{}{prefix}`, the config has {expected}",
            source.prefix
        )));
    }
    Ok(())
}

impl BlipPretrain {
    /// Sets the ViT (`visual_encoder`) from an ImageNet checkpoint: transformers ViT or
    /// DeiT, or timm (see the [module documentation](crate::init)). Every ViT parameter is
    /// loaded; the position table is resized when the checkpoint's resolution differs.
    ///
    /// Do this before [`crate::Trainer::new`], which copies the model into the momentum
    /// encoders.
    ///
    /// # Errors
    ///
    /// A checkpoint that is not a ViT, has another width, depth or patch size, or holds NaN.
    pub fn init_vision_from(mut self, path: impl AsRef<Path>) -> Result<(Self, InitReport)> {
        let path = path.as_ref();
        let file = checkpoint_file(path);
        check_activation(&file)?;
        let header = SafetensorsHeader::read(&file)?;
        let source = vision_source(&header)?;
        let vit = &self.visual_encoder;
        let depth = vit.encoder.layers.len();
        let timm = source.source == InitSource::Timm;
        check_layers(
            &source,
            if timm { "blocks." } else { "encoder.layer." },
            depth,
        )?;
        let mut plan = Plan::new(vit);
        let mut notes = Vec::new();
        let pos_key = if timm {
            "pos_embed"
        } else {
            "embeddings.position_embeddings"
        };
        let cls_key = if timm {
            "cls_token"
        } else {
            "embeddings.cls_token"
        };
        let patch_key = if timm {
            "patch_embed.proj"
        } else {
            "embeddings.patch_embeddings.projection"
        };
        plan.copy(&source, "embeddings.class_embedding", cls_key)?;
        for leaf in ["weight", "bias"] {
            plan.copy(
                &source,
                &format!("embeddings.patch_embedding.{leaf}"),
                &format!("{patch_key}.{leaf}"),
            )?;
        }
        // Position table: drop a distillation token's row, resize the patch grid if needed.
        let (table, shape) = source.read(pos_key)?;
        let [_, wanted, d] = vit.embeddings.position_embedding.dims();
        let prefix_rows = if source.has("embeddings.distillation_token") || source.has("dist_token")
        {
            2
        } else {
            1
        };
        let mismatch = || source.mismatch(pos_key, vec![1, wanted, d], shape.clone());
        let &[1, rows, width] = shape.as_slice() else {
            return Err(mismatch());
        };
        let patches = rows.checked_sub(prefix_rows).ok_or_else(mismatch)?;
        let side = (patches as f64).sqrt().round() as usize;
        let target_side = ((wanted - 1) as f64).sqrt().round() as usize;
        if width != d || side * side != patches || side == 0 {
            return Err(mismatch());
        }
        // The class row and the patch rows, without a distillation token's row.
        let mut rows_out = table[..d].to_vec();
        rows_out.extend_from_slice(&table[prefix_rows * d..]);
        if side != target_side {
            rows_out = resize_position_table(&rows_out, d, side, target_side, target_side);
            notes.push(format!(
                "position table resized from a {side}×{side} to a {target_side}×{target_side} grid"
            ));
        }
        if prefix_rows == 2 {
            notes.push("distillation token dropped".into());
        }
        plan.set(
            &source,
            "embeddings.position_embedding",
            pos_key,
            rows_out,
            vec![1, wanted, d],
        )?;
        for i in 0..depth {
            let ours = format!("encoder.layers.{i}");
            if timm {
                let theirs = format!("blocks.{i}");
                for (to, from) in [
                    ("layer_norm1", "norm1"),
                    ("self_attn.qkv", "attn.qkv"),
                    ("self_attn.projection", "attn.proj"),
                    ("layer_norm2", "norm2"),
                    ("mlp.fc1", "mlp.fc1"),
                    ("mlp.fc2", "mlp.fc2"),
                ] {
                    for leaf in ["weight", "bias"] {
                        plan.copy(
                            &source,
                            &format!("{ours}.{to}.{leaf}"),
                            &format!("{theirs}.{from}.{leaf}"),
                        )?;
                    }
                }
                continue;
            }
            let theirs = format!("encoder.layer.{i}");
            for (to, from) in [
                ("layer_norm1", "layernorm_before"),
                ("self_attn.projection", "attention.output.dense"),
                ("layer_norm2", "layernorm_after"),
                ("mlp.fc1", "intermediate.dense"),
                ("mlp.fc2", "output.dense"),
            ] {
                for leaf in ["weight", "bias"] {
                    plan.copy(
                        &source,
                        &format!("{ours}.{to}.{leaf}"),
                        &format!("{theirs}.{from}.{leaf}"),
                    )?;
                }
            }
            // Separate projections → one fused `qkv`, rows [q; k; v], each a third of it.
            for leaf in ["weight", "bias"] {
                let target = format!("{ours}.self_attn.qkv.{leaf}");
                let fused_shape = plan.shape(&source, &target)?;
                let mut part_shape = fused_shape.clone();
                part_shape[0] /= 3;
                let mut fused = Vec::new();
                for part in ["query", "key", "value"] {
                    let key = format!("{theirs}.attention.attention.{part}.{leaf}");
                    let (values, shape) = source.read(&key)?;
                    if shape != part_shape {
                        return Err(source.mismatch(&key, part_shape, shape));
                    }
                    fused.extend(values);
                }
                plan.set(&source, &target, &target, fused, fused_shape)?;
            }
        }
        let final_norm = if timm { "norm" } else { "layernorm" };
        for leaf in ["weight", "bias"] {
            plan.copy(
                &source,
                &format!("post_layernorm.{leaf}"),
                &format!("{final_norm}.{leaf}"),
            )?;
        }
        let (vit, loaded, fresh) = plan.apply(self.visual_encoder, &source)?;
        self.visual_encoder = vit;
        Ok((
            self,
            InitReport {
                path: file,
                source: source.source,
                loaded,
                fresh,
                notes,
            },
        ))
    }

    /// Sets the text encoder and the decoder from a BERT checkpoint (`BertModel` or
    /// `BertForMaskedLM`, see the [module documentation](crate::init)): embeddings, every
    /// layer's self-attention and feed-forward block, the decoder's own causal
    /// self-attention (from the same BERT blocks), and the LM head's transform and bias when
    /// the checkpoint has `cls.predictions`. Cross-attention stays fresh.
    ///
    /// Do this before [`crate::Trainer::new`], which copies the model into the momentum
    /// encoders.
    ///
    /// # Errors
    ///
    /// A checkpoint that is not BERT, has another width or depth, a larger vocabulary or a
    /// shorter position table than the config, or holds NaN.
    pub fn init_text_from(mut self, path: impl AsRef<Path>) -> Result<(Self, InitReport)> {
        let path = path.as_ref();
        let file = checkpoint_file(path);
        check_activation(&file)?;
        let header = SafetensorsHeader::read(&file)?;
        let source = text_source(&header)?;
        let layers = self.text_encoder.encoder.layer.len();
        check_layers(&source, "encoder.layer.", layers)?;
        let mut notes = Vec::new();

        // The encoder, and the decoder's own causal self-attention blocks, which come from
        // the same BERT blocks (each read once).
        let mut encoder = Plan::new(&self.text_encoder);
        let mut decoder = Plan::new(&self.text_decoder);
        let word = "embeddings.word_embeddings.weight";
        let current = values_of(
            &source,
            self.text_encoder.embeddings.word_embeddings.weight.val(),
        )?;
        let (theirs, ours) = (
            encoder.set_rows(&source, word, word, Some(current))?,
            self.text_encoder.vocab_size(),
        );
        if theirs < ours {
            notes.push(format!(
                "{} vocabulary rows added to the checkpoint's {theirs}",
                ours - theirs
            ));
        }
        let position = "embeddings.position_embeddings.weight";
        let (theirs, ours) = (
            encoder.set_rows(&source, position, position, None)?,
            self.text_encoder.max_positions(),
        );
        if theirs > ours {
            notes.push(format!("position table cut from {theirs} to {ours} rows"));
        }
        for leaf in ["weight", "bias"] {
            encoder.copy(
                &source,
                &format!("embeddings.layer_norm.{leaf}"),
                &format!("embeddings.LayerNorm.{leaf}"),
            )?;
        }
        for i in 0..layers {
            let layer = format!("encoder.layer.{i}");
            for (to, from) in BERT_LAYER {
                for leaf in ["weight", "bias"] {
                    let key = format!("{layer}.{from}.{leaf}");
                    let (values, shape) = source.read(&key)?;
                    if let Some(block) = to.strip_prefix("attention.") {
                        let target = format!("attention.{i}.{block}.{leaf}");
                        decoder.set(&source, &target, &key, values.clone(), shape.clone())?;
                    }
                    encoder.set(
                        &source,
                        &format!("{layer}.{to}.{leaf}"),
                        &key,
                        values,
                        shape,
                    )?;
                }
            }
        }
        let (text_encoder, mut loaded, mut fresh) = encoder.apply(self.text_encoder, &source)?;
        self.text_encoder = text_encoder;
        prefix_all(&mut loaded, "text_encoder.");
        prefix_all(&mut fresh, "text_encoder.");

        // The LM head, outside `bert.`.
        let head = Source {
            prefix: "",
            ..source
        };
        if head.has("cls.predictions.transform.dense.weight") {
            for (to, from) in [
                ("lm_head.transform.dense", "cls.predictions.transform.dense"),
                (
                    "lm_head.transform.layer_norm",
                    "cls.predictions.transform.LayerNorm",
                ),
            ] {
                for leaf in ["weight", "bias"] {
                    decoder.copy(&head, &format!("{to}.{leaf}"), &format!("{from}.{leaf}"))?;
                }
            }
            let current = values_of(&head, self.text_decoder.lm_head.bias.val())?;
            decoder.set_rows(&head, "lm_head.bias", "cls.predictions.bias", Some(current))?;
        } else {
            notes.push("no `cls.predictions`: the LM head's transform stays fresh".into());
        }
        let (text_decoder, decoder_loaded, decoder_fresh) =
            decoder.apply(self.text_decoder, &source)?;
        self.text_decoder = text_decoder;
        loaded.extend(
            decoder_loaded
                .into_iter()
                .map(|k| format!("text_decoder.{k}")),
        );
        fresh.extend(
            decoder_fresh
                .into_iter()
                .map(|k| format!("text_decoder.{k}")),
        );
        Ok((
            self,
            InitReport {
                path: file,
                source: source.source,
                loaded,
                fresh,
                notes,
            },
        ))
    }
}

/// A BERT layer's blocks: (module path, checkpoint path) below `encoder.layer.N`. Those
/// under `attention.` are the self-attention block, which the decoder also takes.
const BERT_LAYER: [(&str, &str); 8] = [
    ("attention.self_attention.query", "attention.self.query"),
    ("attention.self_attention.key", "attention.self.key"),
    ("attention.self_attention.value", "attention.self.value"),
    ("attention.output.dense", "attention.output.dense"),
    ("attention.output.layer_norm", "attention.output.LayerNorm"),
    ("intermediate.dense", "intermediate.dense"),
    ("output.dense", "output.dense"),
    ("output.layer_norm", "output.LayerNorm"),
];

fn prefix_all(keys: &mut [String], prefix: &str) {
    for key in keys {
        key.insert_str(0, prefix);
    }
}
