//! Checked loading of safetensors checkpoints into burn modules, shared by every BLIP family.
//!
//! burn's store applies the tensors (`ModuleSnapshot::apply`, with `PyTorchToBurnAdapter`
//! renaming LayerNorm `weight`/`bias` to `gamma`/`beta`, and [`PyTorchLayout`] transposing
//! Linear weights).
//! Before that, [`load_safetensors`] compares the file's header with the module the config
//! built — every key, shape and dtype — so that a wrong or damaged checkpoint is a typed
//! [`Error`] naming the key and both shapes, never a panic and never a silently random
//! weight.
//!
//! Module field names equal the checkpoint keys wherever Rust allows; a [`KeyMap`] lists the
//! few segment renames that remain and the keys a family may carry without using them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::store::burn_pack::{Bytes, Error as PackError, Tensor as PackTensor};
use burn::store::{
    FloatCastAdapter, ModuleAdapter, ModuleContext, ModuleSnapshot, PyTorchToBurnAdapter,
};
use burn::tensor::{Bool, DType, FloatDType, Int, Shape, Tensor, TensorData};

use safetensors::Dtype;
use safetensors::tensor::Metadata;

use crate::error::{Error, Result};

/// How one checkpoint family's keys relate to the module's parameter paths.
///
/// ```
/// use blip_core::checkpoint::KeyMap;
///
/// const KEYS: KeyMap = KeyMap {
///     renames: &[("LayerNorm", "layer_norm")],
///     ignored: &["*.position_ids"],
/// };
/// assert_eq!(KEYS.to_module("embeddings.LayerNorm.weight"), "embeddings.layer_norm.weight");
/// assert_eq!(KEYS.to_checkpoint("embeddings.layer_norm.weight"), "embeddings.LayerNorm.weight");
/// // Only whole dot-separated segments are renamed.
/// assert_eq!(KEYS.to_module("LayerNorms.0.weight"), "LayerNorms.0.weight");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KeyMap {
    /// `(checkpoint segments, module segments)` renames, matched on whole dot-separated
    /// segments, in order. Needed only where a checkpoint name is not a valid or clear Rust
    /// field name (`self`, `LayerNorm`).
    pub renames: &'static [(&'static str, &'static str)],
    /// Checkpoint keys that may be present and are deliberately not loaded (tied aliases,
    /// buffers), as exact keys or `*.suffix` patterns.
    pub ignored: &'static [&'static str],
}

impl KeyMap {
    fn matches_ignored(&self, key: &str) -> bool {
        self.ignored
            .iter()
            .any(|pattern| match pattern.strip_prefix('*') {
                Some(suffix) => key.ends_with(suffix),
                None => key == *pattern,
            })
    }

    /// Module path → checkpoint key.
    pub fn to_checkpoint(&self, path: &str) -> String {
        self.renames
            .iter()
            .fold(path.to_string(), |key, (ckpt, module)| {
                rename(&key, module, ckpt)
            })
    }

    /// Checkpoint key → module path.
    pub fn to_module(&self, key: &str) -> String {
        self.renames
            .iter()
            .fold(key.to_string(), |path, (ckpt, module)| {
                rename(&path, ckpt, module)
            })
    }
}

/// Replaces the whole dot-separated segments `from` by `to` in `path`.
fn rename(path: &str, from: &str, to: &str) -> String {
    let padded = format!(".{path}.").replace(&format!(".{from}."), &format!(".{to}."));
    padded[1..padded.len() - 1].to_string()
}

/// One tensor as described by a safetensors header.
///
/// ```
/// use blip_core::checkpoint::SafetensorsHeader;
///
/// # let device = burn::tensor::Device::flex();
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("linear.safetensors");
/// # const KEYS: blip_core::checkpoint::KeyMap = blip_core::checkpoint::KeyMap { renames: &[], ignored: &[] };
/// # blip_core::checkpoint::save_safetensors(&burn::nn::LinearConfig::new(3, 2).init(&device), &path, &KEYS)?;
/// // `path` holds a `Linear` 3 → 2 saved by `save_safetensors`.
/// let header = SafetensorsHeader::read(&path)?;
/// let info = &header.tensors["weight"];
/// assert_eq!(info.dtype, "F32");
/// assert_eq!(info.shape, [2, 3]); // checkpoint layout: [out, in]
/// assert_eq!(info.data_offsets.1 - info.data_offsets.0, 2 * 3 * 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The safetensors dtype name (`F32`, `F16`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub data_offsets: (u64, u64),
}

/// The parsed header of a safetensors file, checked against the file's length.
///
/// ```
/// use blip_core::Error;
/// use blip_core::checkpoint::SafetensorsHeader;
///
/// # let device = burn::tensor::Device::flex();
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("linear.safetensors");
/// # const KEYS: blip_core::checkpoint::KeyMap = blip_core::checkpoint::KeyMap { renames: &[], ignored: &[] };
/// # blip_core::checkpoint::save_safetensors(&burn::nn::LinearConfig::new(3, 2).init(&device), &path, &KEYS)?;
/// // `path` holds a `Linear` 3 → 2 saved by `save_safetensors`.
/// let header = SafetensorsHeader::read(&path)?;
/// assert_eq!(header.tensors.keys().collect::<Vec<_>>(), ["bias", "weight"]);
/// let (values, shape) = header.floats("weight")?;
/// assert_eq!((values.len(), shape), (6, vec![2, 3]));
/// assert_eq!(header.bytes("bias")?.len(), 2 * 4);
/// // A file cut short (an interrupted download) is reported as such.
/// let bytes = std::fs::read(&path)?;
/// std::fs::write(&path, &bytes[..bytes.len() - 4])?;
/// assert!(matches!(SafetensorsHeader::read(&path), Err(Error::Truncated { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SafetensorsHeader {
    /// The file.
    pub path: PathBuf,
    /// Tensors by key.
    pub tensors: BTreeMap<String, TensorInfo>,
    data_start: u64,
}

impl SafetensorsHeader {
    /// Reads and validates the header of `path`: well-formed JSON, offsets that tile the
    /// data section, and a file long enough to hold it (a truncated download is reported as
    /// [`Error::Truncated`]).
    pub fn read(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |message: String| Error::InvalidCheckpoint {
            path: path.to_path_buf(),
            message,
        };
        let mut file = crate::open_file(path)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| invalid(format!("file is {file_len} bytes, too short for a header")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > 100_000_000 || 8 + header_len > file_len {
            // `8 + header_len` only where the length is bounded: near 2^64 it overflowed.
            return Err(if header_len <= 100_000_000 {
                Error::Truncated {
                    path: path.to_path_buf(),
                    expected: 8 + header_len,
                    found: file_len,
                }
            } else {
                invalid(format!("implausible header length {header_len}"))
            });
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        // The safetensors crate parses and validates the header: JSON, known dtypes, shapes
        // whose byte size does not overflow and matches its range, and ranges that tile the
        // data section from 0 without gaps or overlaps (checked arithmetic throughout).
        let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| {
            let message = e.to_string();
            invalid(if message.contains("offset") {
                format!("entries overlap or leave gaps in the data section: {message}")
            } else {
                format!("bad header: {message}")
            })
        })?;
        let tensors: BTreeMap<String, TensorInfo> = metadata
            .tensors()
            .into_iter()
            .map(|(key, info)| {
                let info = TensorInfo {
                    dtype: info.dtype.to_string(),
                    shape: info.shape.clone(),
                    data_offsets: (info.data_offsets.0 as u64, info.data_offsets.1 as u64),
                };
                (key, info)
            })
            .collect();
        let data_start = 8 + header_len;
        let expected = data_start
            .checked_add(metadata.data_len() as u64)
            .ok_or_else(|| invalid("the data section lies beyond any file".into()))?;
        if expected > file_len {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                expected,
                found: file_len,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            data_start,
        })
    }

    /// A burn-store tensor named `name` whose bytes are read from the file when first drawn.
    /// A non-finite value is recorded in `non_finite` and fails the read.
    fn deferred(
        &self,
        key: &str,
        name: String,
        non_finite: &std::sync::Arc<std::sync::Mutex<Option<(String, u64)>>>,
    ) -> Result<PackTensor> {
        let info = &self.tensors[key];
        let dtype = self.float_dtype(key, info)?;
        let (path, start) = (self.path.clone(), self.data_start + info.data_offsets.0);
        let len = (info.data_offsets.1 - info.data_offsets.0) as usize;
        let (key, non_finite) = (key.to_string(), non_finite.clone());
        Ok(PackTensor::deferred(
            name,
            dtype,
            info.shape.clone(),
            None,
            len,
            move || {
                // Read into spare capacity: zeroing the buffer first would touch it twice.
                let mut buffer = Vec::with_capacity(len);
                File::open(&path)
                    .and_then(|mut f| {
                        f.seek(SeekFrom::Start(start))?;
                        f.take(len as u64).read_to_end(&mut buffer)?;
                        if buffer.len() < len {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        Ok(())
                    })
                    .map_err(|e| PackError::IoError(format!("{}: {e}", path.display())))?;
                if let Some(count) = count_non_finite(&buffer, dtype) {
                    if let Ok(mut slot) = non_finite.lock() {
                        slot.get_or_insert((key.clone(), count));
                    }
                    return Err(PackError::ValidationError(format!(
                        "`{key}` holds {count} NaN or infinite values"
                    )));
                }
                Ok(Bytes::from_bytes_vec(buffer))
            },
        ))
    }

    /// The burn dtype of a floating-point entry; any other is an [`Error::DType`].
    fn float_dtype(&self, key: &str, info: &TensorInfo) -> Result<DType> {
        Ok(match info.dtype.as_str() {
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            other => {
                return Err(Error::DType {
                    path: self.path.clone(),
                    key: key.to_string(),
                    found: other.to_string(),
                });
            }
        })
    }

    /// One floating-point tensor as f32 values, with its shape. A NaN or infinity is an
    /// [`Error::NonFiniteTensor`], as in [`load_safetensors`].
    pub fn floats(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            key: key.to_string(),
            expected: vec![],
        })?;
        let dtype = self.float_dtype(key, info)?;
        let bytes = self.bytes(key)?;
        if let Some(count) = count_non_finite(&bytes, dtype) {
            return Err(Error::NonFiniteTensor {
                path: self.path.clone(),
                key: key.to_string(),
                count,
            });
        }
        let values = TensorData::from_bytes_vec(bytes, info.shape.clone(), dtype)
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| Error::InvalidCheckpoint {
                path: self.path.clone(),
                message: format!("`{key}`: {e:?}"),
            })?;
        Ok((values, info.shape.clone()))
    }

    /// Raw little-endian bytes of one tensor.
    pub fn bytes(&self, key: &str) -> Result<Vec<u8>> {
        let info = self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            key: key.to_string(),
            expected: vec![],
        })?;
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(self.data_start + info.data_offsets.0))
            .map_err(io)?;
        let mut buffer = vec![0u8; (info.data_offsets.1 - info.data_offsets.0) as usize];
        file.read_exact(&mut buffer).map_err(io)?;
        Ok(buffer)
    }
}

/// The number of distinct layer indices `i` among `keys` of the form `{prefix}{i}.…`.
///
/// Loaders compare it with a config's layer count before building the model: a module is
/// allocated per declared layer, so a config claiming 10⁹ layers must be refused from the
/// file's header, not discovered after the allocation.
///
/// ```
/// use blip_core::checkpoint::count_layers;
///
/// let keys = [
///     "vision_model.encoder.layers.0.mlp.fc1.weight",
///     "vision_model.encoder.layers.0.mlp.fc2.weight",
///     "vision_model.encoder.layers.11.mlp.fc1.weight",
///     "text_encoder.encoder.layer.3.output.dense.weight",
/// ];
/// assert_eq!(count_layers(keys, "vision_model.encoder.layers."), 2); // indices 0 and 11
/// assert_eq!(count_layers(keys, "text_decoder.bert.encoder.layer."), 0);
/// ```
pub fn count_layers<'a>(keys: impl IntoIterator<Item = &'a str>, prefix: &str) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for key in keys {
        if let Some((index, _)) = key.strip_prefix(prefix).and_then(|r| r.split_once('.'))
            && let Ok(i) = index.parse::<usize>()
        {
            seen.insert(i);
        }
    }
    seen.len()
}

/// How many values of a little-endian float buffer are NaN or ±inf (all exponent bits
/// set); `None` when there are none. Written on the bits so that it vectorises: it runs over
/// every weight of every load.
fn count_non_finite(bytes: &[u8], dtype: DType) -> Option<u64> {
    macro_rules! count {
        ($int:ty, $exponent:expr) => {{
            let (chunks, _) = bytes.as_chunks::<{ size_of::<$int>() }>();
            chunks
                .iter()
                .map(|c| u64::from(<$int>::from_le_bytes(*c) & $exponent == $exponent))
                .sum::<u64>()
        }};
    }
    let n = match dtype {
        DType::F32 => count!(u32, 0x7F80_0000),
        DType::F16 => count!(u16, 0x7C00),
        DType::BF16 => count!(u16, 0x7F80),
        DType::F64 => count!(u64, 0x7FF0_0000_0000_0000),
        _ => 0,
    };
    (n > 0).then_some(n)
}

fn is_float(dtype: &str) -> bool {
    matches!(dtype, "F16" | "BF16" | "F32" | "F64")
}

/// Collects, without materialising any weight, every parameter of a module as
/// `(checkpoint key, shape in checkpoint layout)`.
struct ExpectedKeys<'a> {
    map: &'a KeyMap,
    path: Vec<String>,
    containers: Vec<String>,
    keys: BTreeMap<String, Vec<usize>>,
}

impl ExpectedKeys<'_> {
    fn record(&mut self, mut shape: Vec<usize>) {
        let container = self.containers.last().map(String::as_str).unwrap_or("");
        let mut path = self.path.clone();
        let leaf = path.last_mut().expect("a parameter has a name");
        if container == "Struct:LayerNorm" {
            *leaf = match leaf.as_str() {
                "gamma" => "weight".into(),
                "beta" => "bias".into(),
                other => other.into(),
            };
        }
        if container == "Struct:Linear" && leaf == "weight" {
            shape.reverse(); // burn stores [in, out]; checkpoints [out, in]
        }
        let key = self.map.to_checkpoint(&path.join("."));
        self.keys.insert(key, shape);
    }
}

impl ModuleVisitor for ExpectedKeys<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.record(param.lazy_shape().to_vec());
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        self.record(param.lazy_shape().to_vec());
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
        self.record(param.lazy_shape().to_vec());
    }
}

/// Every parameter of `module` as checkpoint key → shape in checkpoint layout.
///
/// ```
/// use blip_core::checkpoint::{KeyMap, expected_keys};
/// use burn::nn::{LayerNormConfig, LinearConfig};
/// use burn::tensor::Device;
///
/// let device = Device::flex();
/// const KEYS: KeyMap = KeyMap { renames: &[], ignored: &[] };
/// let linear = expected_keys(&LinearConfig::new(3, 2).init(&device), &KEYS);
/// assert_eq!(linear["weight"], [2, 3]); // PyTorch's [out, in], not burn's [in, out]
/// assert_eq!(linear["bias"], [2]);
/// // LayerNorm's `gamma`/`beta` are the checkpoint's `weight`/`bias`.
/// let norm = expected_keys(&LayerNormConfig::new(4).init(&device), &KEYS);
/// assert_eq!(norm.keys().collect::<Vec<_>>(), ["bias", "weight"]);
/// ```
pub fn expected_keys<M: Module>(module: &M, map: &KeyMap) -> BTreeMap<String, Vec<usize>> {
    let mut visitor = ExpectedKeys {
        map,
        path: vec![],
        containers: vec![],
        keys: BTreeMap::new(),
    };
    module.visit(&mut visitor);
    visitor.keys
}

/// Compares a header with the keys a module expects; the first problem, in key order, is
/// returned as a typed error.
///
/// ```
/// use blip_core::Error;
/// use blip_core::checkpoint::{KeyMap, SafetensorsHeader, check_header, expected_keys};
/// use burn::nn::LinearConfig;
///
/// # let device = burn::tensor::Device::flex();
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("linear.safetensors");
/// # const KEYS: blip_core::checkpoint::KeyMap = blip_core::checkpoint::KeyMap { renames: &[], ignored: &[] };
/// # blip_core::checkpoint::save_safetensors(&burn::nn::LinearConfig::new(3, 2).init(&device), &path, &KEYS)?;
/// // `path` holds a `Linear` 3 → 2 saved by `save_safetensors` with the empty key map `KEYS`.
/// let header = SafetensorsHeader::read(&path)?;
/// let same = expected_keys(&LinearConfig::new(3, 2).init(&device), &KEYS);
/// check_header(&header, &same, &KEYS)?;
/// let wider = expected_keys(&LinearConfig::new(4, 2).init(&device), &KEYS);
/// let err = check_header(&header, &wider, &KEYS).unwrap_err();
/// assert!(matches!(&err, Error::ShapeMismatch { key, .. } if key == "weight"));
/// // A tensor the module lacks is an error, unless the key map ignores it.
/// let no_bias = expected_keys(&LinearConfig::new(3, 2).with_bias(false).init(&device), &KEYS);
/// assert!(matches!(check_header(&header, &no_bias, &KEYS), Err(Error::UnexpectedTensor { .. })));
/// const LENIENT: KeyMap = KeyMap { renames: &[], ignored: &["bias"] };
/// check_header(&header, &no_bias, &LENIENT)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check_header(
    header: &SafetensorsHeader,
    expected: &BTreeMap<String, Vec<usize>>,
    map: &KeyMap,
) -> Result<()> {
    let path = || header.path.clone();
    for (key, shape) in expected {
        let Some(found) = header.tensors.get(key) else {
            return Err(Error::MissingTensor {
                path: path(),
                key: key.clone(),
                expected: shape.clone(),
            });
        };
        if !is_float(&found.dtype) {
            return Err(Error::DType {
                path: path(),
                key: key.clone(),
                found: found.dtype.clone(),
            });
        }
        if &found.shape != shape {
            return Err(Error::ShapeMismatch {
                path: path(),
                key: key.clone(),
                expected: shape.clone(),
                found: found.shape.clone(),
            });
        }
    }
    if let Some((key, info)) = header
        .tensors
        .iter()
        .find(|(key, _)| !expected.contains_key(*key) && !map.matches_ignored(key))
    {
        return Err(Error::UnexpectedTensor {
            path: path(),
            key: key.clone(),
            shape: info.shape.clone(),
        });
    }
    Ok(())
}

/// burn's PyTorch-layout adapter `A` (`PyTorchToBurnAdapter` to load, `BurnToPyTorchAdapter`
/// to save), with Linear weights transposed a tile at a time. burn's own transpose copies one
/// element per `memcpy` call: half of a BLIP-base load went there.
///
/// ```
/// use blip_core::checkpoint::PyTorchLayout;
/// use burn::nn::LinearConfig;
/// use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};
/// use burn::tensor::Device;
///
/// let linear = LinearConfig::new(3, 2).init(&Device::flex());
/// let plain = linear.collect(None, None, false);
/// let weight = plain.iter().find(|t| t.name == "weight").unwrap();
/// assert_eq!(weight.shape.to_vec(), [3, 2]); // burn's [in, out]
/// let pytorch = linear.collect(None, Some(Box::new(PyTorchLayout(BurnToPyTorchAdapter))), false);
/// let weight = pytorch.iter().find(|t| t.name == "weight").unwrap();
/// assert_eq!(weight.shape.to_vec(), [2, 3]); // PyTorch's [out, in]
/// ```
#[derive(Debug, Clone)]
pub struct PyTorchLayout<A>(pub A);

impl<A: ModuleAdapter + Clone + 'static> ModuleAdapter for PyTorchLayout<A> {
    fn adapt(&self, tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
        // The names burn's adapters match on: the Module derive's "Struct:<name>".
        let linear_weight = ctx.module_type() == Some("Struct:Linear")
            && tensor.name.rsplit('.').next() == Some("weight")
            && tensor.shape.len() == 2
            && !matches!(tensor.dtype, DType::QFloat(_));
        if !linear_weight {
            return self.0.adapt(tensor, ctx);
        }
        let (name, dtype) = (tensor.name.clone(), tensor.dtype);
        let shape = Shape::from(vec![tensor.shape[1], tensor.shape[0]]);
        burn::store::bridge::map_data(tensor, name, dtype, shape, transpose_2d)
    }

    fn get_alternative_param_name(&self, param: &str, module_type: &str) -> Option<String> {
        self.0.get_alternative_param_name(param, module_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose_2d(data: TensorData) -> TensorData {
    let (rows, cols) = (data.shape()[0], data.shape()[1]);
    let dtype = data.dtype();
    let out = transpose_elements(data.as_bytes(), rows, cols, dtype.size());
    TensorData::from_bytes_vec(out, [cols, rows], dtype)
}

/// `[rows, cols]` → `[cols, rows]` for `size`-byte elements.
fn transpose_elements(bytes: &[u8], rows: usize, cols: usize, size: usize) -> Vec<u8> {
    match size {
        1 => transpose_tiles::<1>(bytes, rows, cols),
        2 => transpose_tiles::<2>(bytes, rows, cols),
        4 => transpose_tiles::<4>(bytes, rows, cols),
        8 => transpose_tiles::<8>(bytes, rows, cols),
        // No dtype a checkpoint loads has another width; kept correct all the same.
        _ => {
            let mut out = vec![0u8; bytes.len()];
            for (i, row) in bytes.chunks_exact(cols * size).enumerate() {
                for (j, element) in row.chunks_exact(size).enumerate() {
                    out[(j * rows + i) * size..][..size].copy_from_slice(element);
                }
            }
            out
        }
    }
}

/// Transposes `N`-byte elements in 32 × 32 tiles, so that both the reads and the writes of a
/// tile stay within a few cache lines; the output's rows are split over the cores.
fn transpose_tiles<const N: usize>(src: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    const TILE: usize = 32;
    let (src, _) = src.as_chunks::<N>();
    if src.is_empty() {
        return Vec::new();
    }
    let mut dst = vec![[0u8; N]; src.len()];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Output row j is input column j: each thread takes a run of whole tiles of columns.
    let per_thread = cols.div_ceil(threads).div_ceil(TILE).max(1) * TILE;
    std::thread::scope(|scope| {
        for (part, dst) in dst.chunks_mut(per_thread * rows).enumerate() {
            scope.spawn(move || {
                let first = part * per_thread;
                let part_cols = dst.len() / rows.max(1);
                for i0 in (0..rows).step_by(TILE) {
                    for j0 in (0..part_cols).step_by(TILE) {
                        for i in i0..(i0 + TILE).min(rows) {
                            for j in j0..(j0 + TILE).min(part_cols) {
                                dst[j * rows + i] = src[i * cols + first + j];
                            }
                        }
                    }
                }
            });
        }
    });
    dst.into_flattened()
}

/// Loads the checkpoint into `module` after checking every key, shape and dtype against it.
///
/// Tensors go through burn's store (`ModuleSnapshot::apply` with `PyTorchToBurnAdapter`, and
/// `FloatCastAdapter` casting every float tensor to f32), each read from the file only
/// when the module reaches it and dropped once applied: peak memory is the model plus its
/// largest tensor, not twice the file as a whole-file or memory-mapped read would be. On any
/// error the module is dropped and nothing partially loaded escapes.
///
/// ```
/// use blip_core::Error;
/// use blip_core::checkpoint::{KeyMap, SafetensorsHeader, load_safetensors, save_safetensors};
/// use burn::nn::LinearConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("linear.safetensors");
/// const KEYS: KeyMap = KeyMap { renames: &[], ignored: &[] };
/// let saved = LinearConfig::new(3, 2).init(&device);
/// save_safetensors(&saved, &path, &KEYS)?;
/// let header = SafetensorsHeader::read(&path)?;
/// let loaded = load_safetensors(LinearConfig::new(3, 2).init(&device), &header, &KEYS)?;
/// let values = |t: Tensor<2>| t.into_data().to_vec::<f32>().unwrap();
/// assert_eq!(values(loaded.weight.val()), values(saved.weight.val()));
/// // A module of another shape is refused before any tensor is read.
/// let err = load_safetensors(LinearConfig::new(4, 2).init(&device), &header, &KEYS).unwrap_err();
/// assert!(matches!(err, Error::ShapeMismatch { .. }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_safetensors<M: Module + ModuleSnapshot>(
    module: M,
    header: &SafetensorsHeader,
    map: &KeyMap,
) -> Result<M> {
    load_safetensors_as(module, header, map, FloatDType::F32)
}

/// [`load_safetensors`] with every float tensor cast to `dtype` as it is read: an f32
/// checkpoint loads straight into an f16 or bf16 model, one tensor in f32 at a time.
///
/// ```
/// use blip_core::checkpoint::{KeyMap, SafetensorsHeader, load_safetensors_as, save_safetensors};
/// use burn::nn::LinearConfig;
/// use burn::tensor::{DType, Device, FloatDType};
///
/// let device = Device::flex();
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("linear.safetensors");
/// const KEYS: KeyMap = KeyMap { renames: &[], ignored: &[] };
/// save_safetensors(&LinearConfig::new(3, 2).init(&device), &path, &KEYS)?;
/// let header = SafetensorsHeader::read(&path)?;
/// let half = load_safetensors_as(LinearConfig::new(3, 2).init(&device), &header, &KEYS, FloatDType::BF16)?;
/// assert_eq!(half.weight.val().dtype(), DType::BF16);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_safetensors_as<M: Module + ModuleSnapshot>(
    mut module: M,
    header: &SafetensorsHeader,
    map: &KeyMap,
    dtype: FloatDType,
) -> Result<M> {
    let expected = expected_keys(&module, map);
    check_header(header, &expected, map)?;
    let non_finite = std::sync::Arc::new(std::sync::Mutex::new(None));
    let tensors = expected
        .keys()
        .map(|key| header.deferred(key, map.to_module(key), &non_finite))
        .collect::<Result<Vec<_>>>()?;
    let adapter = PyTorchLayout(PyTorchToBurnAdapter).chain(FloatCastAdapter::to(dtype.into()));
    let result = module.apply(tensors, None, Some(Box::new(adapter)), false);
    let store_error = |message: String| Error::Store {
        path: header.path.clone(),
        message,
    };
    if let Some((key, count)) = non_finite.lock().ok().and_then(|mut slot| slot.take()) {
        return Err(Error::NonFiniteTensor {
            path: header.path.clone(),
            key,
            count,
        });
    }
    if let Some(error) = result.errors.first() {
        return Err(store_error(error.to_string()));
    }
    if let Some((missing, _)) = result.missing.first() {
        // The header check makes this unreachable unless the key map and the module
        // disagree: report it rather than run with a random weight.
        return Err(Error::MissingTensor {
            path: header.path.clone(),
            key: map.to_checkpoint(missing),
            expected: vec![],
        });
    }
    Ok(module)
}

/// Writes `module` as a safetensors file in checkpoint layout (`[out, in]` Linear weights,
/// LayerNorm `weight`/`bias`, keys through `map`), the inverse of [`load_safetensors`].
///
/// Tensors are produced and written one at a time. The file appears atomically
/// ([`crate::fs::AtomicFile`]): a failure leaves no half-written checkpoint.
///
/// ```
/// use blip_core::checkpoint::{KeyMap, SafetensorsHeader, save_safetensors};
/// use burn::nn::LinearConfig;
/// use burn::tensor::Device;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("linear.safetensors");
/// // Keys go through the map: module `weight` is saved as `kernel`.
/// const KEYS: KeyMap = KeyMap { renames: &[("kernel", "weight")], ignored: &[] };
/// save_safetensors(&LinearConfig::new(3, 2).init(&Device::flex()), &path, &KEYS)?;
/// let header = SafetensorsHeader::read(&path)?;
/// assert_eq!(header.tensors.keys().collect::<Vec<_>>(), ["bias", "kernel"]);
/// assert_eq!(header.tensors["kernel"].shape, [2, 3]); // [out, in], as PyTorch stores it
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 1); // no temp file left
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn save_safetensors<M: Module + ModuleSnapshot>(
    module: &M,
    path: &Path,
    map: &KeyMap,
) -> Result<()> {
    use burn::store::BurnToPyTorchAdapter;

    let mut tensors = module.collect(
        None,
        Some(Box::new(PyTorchLayout(BurnToPyTorchAdapter))),
        false,
    );
    for t in &mut tensors {
        t.name = map.to_checkpoint(&t.name);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let invalid = |message: String| Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        message,
    };
    // The header is the safetensors crate's (it checks that the ranges tile the data
    // section); the data is written here, one tensor at a time, so that saving never holds a
    // second copy of the model (`safetensors::serialize_to_file` wants every tensor's bytes
    // up front).
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in &tensors {
        let dtype = match t.dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F64 => Dtype::F64,
            DType::I64 => Dtype::I64,
            DType::I32 => Dtype::I32,
            other => {
                return Err(invalid(format!(
                    "cannot write `{}` of dtype {other:?}",
                    t.name
                )));
            }
        };
        let len = t.byte_len();
        let info = safetensors::tensor::TensorInfo {
            dtype,
            shape: t.shape.to_vec(),
            data_offsets: (offset, offset + len),
        };
        infos.push((t.name.clone(), info));
        offset += len;
    }
    let metadata = Metadata::new(None, infos).map_err(|e| invalid(e.to_string()))?;
    let mut json = serde_json::to_vec(&metadata).map_err(|e| invalid(e.to_string()))?;
    json.resize(json.len().div_ceil(8) * 8, b' '); // keep the data section aligned
    let mut file = crate::fs::AtomicFile::create(path)?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let out = file.writer();
    out.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&json).map_err(io)?;
    for t in &tensors {
        let bytes = t.to_bytes().map_err(|e| Error::Store {
            path: path.to_path_buf(),
            message: format!("`{}`: {e}", t.name),
        })?;
        file.writer().write_all(&bytes).map_err(io)?;
    }
    Ok(file.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: KeyMap = KeyMap {
        renames: &[
            ("cls.predictions", "lm_head"),
            ("self", "self_attention"),
            ("LayerNorm", "layer_norm"),
        ],
        ignored: &["*.position_ids"],
    };

    #[test]
    fn renames_whole_segments_only() {
        assert_eq!(
            MAP.to_checkpoint("text.encoder.layer.0.attention.self_attention.query.weight"),
            "text.encoder.layer.0.attention.self.query.weight"
        );
        assert_eq!(
            MAP.to_checkpoint("vision_model.encoder.layers.0.layer_norm1.weight"),
            "vision_model.encoder.layers.0.layer_norm1.weight"
        );
        assert_eq!(
            MAP.to_checkpoint("text_decoder.lm_head.transform.layer_norm.bias"),
            "text_decoder.cls.predictions.transform.LayerNorm.bias"
        );
    }

    #[test]
    fn to_module_inverts_to_checkpoint() {
        for key in [
            "text_decoder.bert.encoder.layer.3.crossattention.self.value.bias",
            "text_decoder.cls.predictions.transform.LayerNorm.weight",
            "vision_model.encoder.layers.0.self_attn.qkv.weight",
        ] {
            assert_eq!(MAP.to_checkpoint(&MAP.to_module(key)), key);
        }
        assert_eq!(
            MAP.to_module("text_decoder.cls.predictions.bias"),
            "text_decoder.lm_head.bias"
        );
    }

    #[test]
    fn transpose_moves_every_element() {
        // Shapes around the 32-element tile and the per-thread split; widths 1, 2, 4 and 8
        // (the tiled path) and 3 (the generic one).
        for (rows, cols) in [(1, 1), (3, 70), (70, 3), (33, 65), (64, 96)] {
            for size in [1, 2, 3, 4, 8] {
                let bytes: Vec<u8> = (0..rows * cols * size).map(|b| (b % 251) as u8).collect();
                let out = transpose_elements(&bytes, rows, cols, size);
                assert_eq!(out.len(), bytes.len());
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(
                            out[(j * rows + i) * size..][..size],
                            bytes[(i * cols + j) * size..][..size],
                            "width {size}, [{rows}, {cols}] at ({i}, {j})"
                        );
                    }
                }
            }
        }
        let data = TensorData::from_bytes_vec(vec![0u8; 4 * 6], [2, 3], DType::F32);
        assert_eq!(transpose_2d(data).shape().to_vec(), vec![3, 2]);
        assert!(transpose_elements(&[], 0, 5, 4).is_empty());
    }

    #[test]
    fn non_finite_values_are_counted_in_every_float_dtype() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN, -0.0, f32::INFINITY, f32::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(&f32s, DType::F32), Some(2));
        assert_eq!(count_non_finite(&f32s[..4], DType::F32), None);
        let f16s: Vec<u8> = [0x3C00u16, 0x7C00, 0xFE00, 0x7BFF]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(&f16s, DType::F16), Some(2));
        let bf16s: Vec<u8> = [0x3F80u16, 0xFF80, 0x7F7F]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(&bf16s, DType::BF16), Some(1));
        let f64s: Vec<u8> = [f64::NAN, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(&f64s, DType::F64), Some(1));
        assert_eq!(count_non_finite(&f32s, DType::I32), None);
    }

    #[test]
    fn count_layers_counts_distinct_indices_under_the_prefix() {
        let keys = [
            "vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.encoder.layers.0.mlp.fc2.weight",
            "vision_model.encoder.layers.11.mlp.fc1.weight",
            "vision_model.encoder.layers.x.mlp.fc1.weight",
            "text_encoder.encoder.layer.3.output.dense.weight",
        ];
        assert_eq!(count_layers(keys, "vision_model.encoder.layers."), 2);
        assert_eq!(count_layers(keys, "text_encoder.encoder.layer."), 1);
        assert_eq!(count_layers(keys, "text_decoder.bert.encoder.layer."), 0);
    }

    #[test]
    fn ignored_patterns() {
        assert!(MAP.matches_ignored("text_encoder.embeddings.position_ids"));
        assert!(!MAP.matches_ignored("text_encoder.embeddings.position_embeddings.weight"));
    }
}
