//! The typed errors of reading the files a model is built from: images, configs,
//! tokenizers and checkpoints.

use std::path::PathBuf;

/// Everything that can go wrong while reading an image, a config or a checkpoint.
///
/// Every variant names the file (and, for tensors, the checkpoint key) it is about, so that a
/// user can act on the message without a debugger.
///
/// ```
/// use std::path::Path;
/// use blip_core::Error;
///
/// let err = blip_core::read_json(Path::new("no/such/config.json")).unwrap_err();
/// assert!(matches!(&err, Error::Io { path, .. } if path.ends_with("config.json")));
/// assert!(err.to_string().starts_with("cannot read no/such/config.json"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An image file exists but could not be decoded.
    #[error("cannot decode image {path}: {source}")]
    ImageDecode {
        /// The image file.
        path: PathBuf,
        /// What the decoder said.
        #[source]
        source: image::ImageError,
    },
    /// A `config.json` (or a config value given in code) is malformed or unsupported.
    #[error("invalid config {path}: {message}")]
    Config {
        /// The config file, or `<config>` for one built in code.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file is not a safetensors file (bad header, bad JSON, overlapping offsets...).
    #[error("{path} is not a valid safetensors file: {message}")]
    InvalidCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file is shorter than its header says: an interrupted download or copy.
    #[error("{path} is truncated: its header declares {expected} bytes, the file has {found}")]
    Truncated {
        /// The checkpoint file.
        path: PathBuf,
        /// Bytes the header declares.
        expected: u64,
        /// Bytes actually present.
        found: u64,
    },
    /// The model needs a tensor the checkpoint does not have.
    #[error("{path} has no tensor `{key}` (the model expects shape {expected:?})")]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The checkpoint key.
        key: String,
        /// The shape the model expects, in checkpoint layout.
        expected: Vec<usize>,
    },
    /// The checkpoint has a tensor the model does not use: usually a config that does not
    /// match the weights (fewer layers) or a checkpoint of another model family.
    #[error(
        "{path} has tensor `{key}` of shape {shape:?} that this model does not use \
         (does config.json match the weights, and is this the right model family?)"
    )]
    UnexpectedTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The checkpoint key.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A tensor's shape differs from what the config implies.
    #[error(
        "{path}: tensor `{key}` has shape {found:?}, the model built from config.json expects {expected:?}"
    )]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The checkpoint key.
        key: String,
        /// Shape the model expects, in checkpoint layout.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype that cannot be loaded into a float parameter.
    #[error("{path}: tensor `{key}` has dtype {found}, expected a floating-point tensor")]
    DType {
        /// The checkpoint file.
        path: PathBuf,
        /// The checkpoint key.
        key: String,
        /// The dtype in the file.
        found: String,
    },
    /// A weight holds NaN or infinite values: a damaged or diverged checkpoint, refused at
    /// load rather than decoded into empty captions.
    #[error("{path}: tensor `{key}` holds {count} NaN or infinite values")]
    NonFiniteTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The checkpoint key.
        key: String,
        /// How many of its values are not finite.
        count: u64,
    },
    /// burn's store failed while reading tensors.
    #[error("loading {path} failed: {message}")]
    Store {
        /// The checkpoint file.
        path: PathBuf,
        /// burn-store's message.
        message: String,
    },
    /// A tensor handed to a forward pass has the wrong shape.
    #[error("{what}: expected shape {expected}, got {found:?}")]
    InputShape {
        /// Which input.
        what: &'static str,
        /// The expected shape, as text (may contain wildcards such as `[B, 3, H, W]`).
        expected: String,
        /// The shape received.
        found: Vec<usize>,
    },
    /// A precision name that is none of [`crate::precision::DTYPES`].
    #[error("unknown dtype {name:?}: expected one of f32, f16, bf16")]
    UnknownDType {
        /// The name asked for.
        name: String,
    },
    /// A precision the model code or the device does not compute in.
    #[error("device {device} cannot compute in {dtype}: {reason}")]
    UnsupportedDType {
        /// The precision asked for.
        dtype: String,
        /// The device, as burn prints it.
        device: String,
        /// Why not, and what to use instead.
        reason: &'static str,
    },
}

/// Result alias for this crate.
///
/// ```
/// use std::path::Path;
///
/// fn width(n: usize) -> blip_core::Result<usize> {
///     let sizes = [("hidden_size", n, blip_core::MAX_WIDTH)];
///     blip_core::check_sizes("text", &sizes, 1e-12, Path::new("<config>"))?;
///     Ok(n)
/// }
/// assert_eq!(width(768)?, 768);
/// assert!(matches!(width(0), Err(blip_core::Error::Config { .. })));
/// # Ok::<(), blip_core::Error>(())
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;
