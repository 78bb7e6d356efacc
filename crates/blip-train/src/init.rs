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

use blip_vision::checkpoint::{
    KeyMap, PyTorchLayout, SafetensorsHeader, count_layers, expected_keys,
};
use blip_vision::{Error, bicubic_resize, read_json};
use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, bridge};
use burn::tensor::{DType, Tensor, TensorData};

use crate::error::{Result, TrainError};
use crate::model::BlipPretrain;

/// The checkpoint layouts [`BlipPretrain::init_vision_from`] and
/// [`BlipPretrain::init_text_from`] read.
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
struct Source {
    header: SafetensorsHeader,
    prefix: &'static str,
    source: InitSource,
}

impl Source {
    fn path(&self) -> &Path {
        &self.header.path
    }

    fn has(&self, key: &str) -> bool {
        self.header
            .tensors
            .contains_key(&format!("{}{key}", self.prefix))
    }

    fn missing(&self, key: &str) -> TrainError {
        Error::MissingTensor {
            path: self.path().to_path_buf(),
            key: key.to_string(),
            expected: vec![],
        }
        .into()
    }

    /// One tensor as f32 values and its shape; a NaN or infinity is refused.
    fn read(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let full = format!("{}{key}", self.prefix);
        let info = self
            .header
            .tensors
            .get(&full)
            .ok_or_else(|| self.missing(&full))?;
        let dtype = match info.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            other => {
                return Err(Error::DType {
                    path: self.path().to_path_buf(),
                    key: full,
                    found: other.to_string(),
                }
                .into());
            }
        };
        let bytes = self.header.bytes(&full)?;
        let values = TensorData::from_bytes_vec(bytes, info.shape.clone(), dtype)
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| self.invalid(format!("`{full}`: {e:?}")))?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::NonFiniteTensor {
                path: self.path().to_path_buf(),
                key: full,
                count: bad as u64,
            }
            .into());
        }
        Ok((values, info.shape.clone()))
    }

    fn invalid(&self, message: String) -> TrainError {
        TrainError::Checkpoint {
            path: self.path().to_path_buf(),
            message,
        }
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
/// weights, LayerNorm `weight`/`bias`), each with the source key it came from.
struct Plan {
    expected: BTreeMap<String, Vec<usize>>,
    tensors: Vec<(String, String, Vec<f32>, Vec<usize>)>,
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

    /// Queues `values` for `target`, after checking its shape against the module.
    fn set(
        &mut self,
        source: &Source,
        target: &str,
        key: &str,
        values: Vec<f32>,
        shape: Vec<usize>,
    ) -> Result<()> {
        let expected = self.expected.get(target).ok_or_else(|| {
            source.invalid(format!("internal: the model has no parameter `{target}`"))
        })?;
        if *expected != shape {
            return Err(Error::ShapeMismatch {
                path: source.path().to_path_buf(),
                key: format!("{}{key}", source.prefix),
                expected: expected.clone(),
                found: shape,
            }
            .into());
        }
        self.tensors
            .push((target.into(), key.into(), values, shape));
        Ok(())
    }

    /// Reads `key` and queues it for `target`.
    fn copy(&mut self, source: &Source, target: &str, key: &str) -> Result<()> {
        let (values, shape) = source.read(key)?;
        self.set(source, target, key, values, shape)
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
            .map(|(target, _, values, shape)| {
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
fn values_of<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
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
/// [`BlipPretrain::init_text_from`] fits; unchanged when there is no such file. Vocabulary, token ids and dropout stay `config`'s:
/// they follow BLIP's tokenizer and training recipe.
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
        blip_vision::MAX_WIDTH,
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
    use blip_vision::{MAX_LAYERS, MAX_WIDTH};
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
fn vision_source(header: SafetensorsHeader) -> Result<Source> {
    let found = |prefix: &'static str, source| Source {
        header: header.clone(),
        prefix,
        source,
    };
    let has = |key: &str| header.tensors.contains_key(key);
    let source = if has("vit.embeddings.cls_token") {
        found("vit.", InitSource::HfVit)
    } else if has("deit.embeddings.cls_token") {
        found("deit.", InitSource::HfDeit)
    } else if has("embeddings.cls_token") {
        let distilled = has("embeddings.distillation_token");
        found(
            "",
            if distilled {
                InitSource::HfDeit
            } else {
                InitSource::HfVit
            },
        )
    } else if has("cls_token") && has("patch_embed.proj.weight") {
        found("", InitSource::Timm)
    } else {
        return Err(TrainError::Checkpoint {
            path: header.path.clone(),
            message: "not a ViT checkpoint: no `embeddings.cls_token` (transformers ViT/DeiT) \
                      or `cls_token` + `patch_embed.proj.weight` (timm)"
                .into(),
        });
    };
    Ok(source)
}

/// Which BERT layout `header` holds.
fn text_source(header: SafetensorsHeader) -> Result<Source> {
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
        let source = vision_source(SafetensorsHeader::read(&file)?)?;
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
        let mismatch = || -> TrainError {
            Error::ShapeMismatch {
                path: source.path().to_path_buf(),
                key: format!("{}{pos_key}", source.prefix),
                expected: vec![1, wanted, d],
                found: shape.clone(),
            }
            .into()
        };
        let &[1, rows, width] = shape.as_slice() else {
            return Err(mismatch());
        };
        let patches = rows.checked_sub(prefix_rows).ok_or_else(mismatch)?;
        let side = (patches as f64).sqrt().round() as usize;
        let target_side = ((wanted - 1) as f64).sqrt().round() as usize;
        if width != d || side * side != patches || side == 0 {
            return Err(mismatch());
        }
        let mut rows_out = table[..d].to_vec();
        let grid = &table[prefix_rows * d..];
        if side == target_side {
            rows_out.extend_from_slice(grid);
        } else {
            rows_out.extend(bicubic_resize(
                grid,
                d,
                side,
                side,
                target_side,
                target_side,
            ));
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
            // Separate projections → one fused `qkv`, rows [q; k; v].
            for leaf in ["weight", "bias"] {
                let mut fused = Vec::new();
                let mut rows = 0;
                let mut rest = Vec::new();
                for part in ["query", "key", "value"] {
                    let key = format!("{theirs}.attention.attention.{part}.{leaf}");
                    let (values, shape) = source.read(&key)?;
                    rows += shape.first().copied().unwrap_or(0);
                    rest = shape.get(1..).unwrap_or(&[]).to_vec();
                    fused.extend(values);
                }
                let mut shape = vec![rows];
                shape.extend(rest);
                plan.set(
                    &source,
                    &format!("{ours}.self_attn.qkv.{leaf}"),
                    &format!("{theirs}.attention.attention.{{query,key,value}}.{leaf}"),
                    fused,
                    shape,
                )?;
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
        let source = text_source(SafetensorsHeader::read(&file)?)?;
        let layers = self.text_encoder.encoder.layer.len();
        check_layers(&source, "encoder.layer.", layers)?;
        let mut notes = Vec::new();

        // Encoder: embeddings (vocabulary rows and position rows adapted) and layers.
        let mut plan = Plan::new(&self.text_encoder);
        let d = self.text_encoder.hidden_size();
        for (target, key, ours, grow) in [
            (
                "embeddings.word_embeddings.weight",
                "embeddings.word_embeddings.weight",
                self.text_encoder.vocab_size(),
                true,
            ),
            (
                "embeddings.position_embeddings.weight",
                "embeddings.position_embeddings.weight",
                self.text_encoder.max_positions(),
                false,
            ),
        ] {
            let (values, shape) = source.read(key)?;
            let [theirs, width] = shape[..] else {
                return Err(Error::ShapeMismatch {
                    path: source.path().to_path_buf(),
                    key: format!("{}{key}", source.prefix),
                    expected: vec![ours, d],
                    found: shape,
                }
                .into());
            };
            let fits = width == d && if grow { theirs <= ours } else { theirs >= ours };
            if !fits {
                return Err(Error::ShapeMismatch {
                    path: source.path().to_path_buf(),
                    key: format!("{}{key}", source.prefix),
                    expected: vec![ours, d],
                    found: shape,
                }
                .into());
            }
            let rows = if grow {
                let mut all = values_of(if target.starts_with("embeddings.word") {
                    self.text_encoder.embeddings.word_embeddings.weight.val()
                } else {
                    self.text_encoder
                        .embeddings
                        .position_embeddings
                        .weight
                        .val()
                });
                all[..values.len()].copy_from_slice(&values);
                if theirs < ours {
                    notes.push(format!(
                        "{} vocabulary rows added to the checkpoint's {theirs}",
                        ours - theirs
                    ));
                }
                all
            } else {
                if theirs > ours {
                    notes.push(format!("position table cut from {theirs} to {ours} rows"));
                }
                values[..ours * d].to_vec()
            };
            plan.set(&source, target, key, rows, vec![ours, d])?;
        }
        for leaf in ["weight", "bias"] {
            plan.copy(
                &source,
                &format!("embeddings.layer_norm.{leaf}"),
                &format!("embeddings.LayerNorm.{leaf}"),
            )?;
        }
        for i in 0..layers {
            let layer = format!("encoder.layer.{i}");
            for (to, from) in BERT_LAYER {
                for leaf in ["weight", "bias"] {
                    plan.copy(
                        &source,
                        &format!("{layer}.{to}.{leaf}"),
                        &format!("{layer}.{from}.{leaf}"),
                    )?;
                }
            }
        }
        let (encoder, mut loaded, mut fresh) = plan.apply(self.text_encoder, &source)?;
        self.text_encoder = encoder;
        prefix_all(&mut loaded, "text_encoder.");
        prefix_all(&mut fresh, "text_encoder.");

        // Decoder: its own causal self-attention from BERT's, and the LM head.
        let mut plan = Plan::new(&self.text_decoder);
        for i in 0..layers {
            for (to, from) in &BERT_LAYER[..5] {
                let to = to.strip_prefix("attention.").unwrap_or(to);
                for leaf in ["weight", "bias"] {
                    plan.copy(
                        &source,
                        &format!("attention.{i}.{to}.{leaf}"),
                        &format!("encoder.layer.{i}.{from}.{leaf}"),
                    )?;
                }
            }
        }
        // The LM head lives outside `bert.`: read it with no prefix.
        let head = Source {
            header: source.header.clone(),
            prefix: "",
            source: source.source,
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
                    plan.copy(&head, &format!("{to}.{leaf}"), &format!("{from}.{leaf}"))?;
                }
            }
            let (values, shape) = head.read("cls.predictions.bias")?;
            let ours = self.text_decoder.lm_head.bias.dims()[0];
            if shape.len() != 1 || shape[0] > ours {
                return Err(Error::ShapeMismatch {
                    path: head.path().to_path_buf(),
                    key: "cls.predictions.bias".into(),
                    expected: vec![ours],
                    found: shape,
                }
                .into());
            }
            let mut bias = values_of(self.text_decoder.lm_head.bias.val());
            bias[..values.len()].copy_from_slice(&values);
            plan.set(
                &head,
                "lm_head.bias",
                "cls.predictions.bias",
                bias,
                vec![ours],
            )?;
        } else {
            notes.push("no `cls.predictions`: the LM head's transform stays fresh".into());
        }
        let (decoder, decoder_loaded, decoder_fresh) = plan.apply(self.text_decoder, &source)?;
        self.text_decoder = decoder;
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

/// A BERT layer's blocks: (module path, checkpoint path) below `encoder.layer.N`, the
/// self-attention ones first.
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
