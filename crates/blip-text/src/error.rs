//! The typed errors of the text side and of loading whole BLIP models.

use std::path::PathBuf;

/// Everything that can go wrong in `blip-text`: file, image, shape and checkpoint errors
/// ([`blip_core::Error`]),
/// plus tokenizer and text-input errors.
///
/// ```
/// use blip_text::{Error, GenerationConfig};
///
/// let config = GenerationConfig { num_beams: 0, ..GenerationConfig::default() };
/// let err = config.validate().unwrap_err();
/// assert!(matches!(err, Error::Generation(_)));
/// assert_eq!(err.to_string(), "generation: num_beams and num_return_sequences must be at least 1");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file, image, config, checkpoint or input-shape error (names the file, key or input).
    #[error(transparent)]
    Core(#[from] blip_core::Error),
    /// A tokenizer file could not be read or built.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The `tokenizer.json` or `vocab.txt`.
        path: PathBuf,
        /// What the tokenizers crate said.
        message: String,
    },
    /// Encoding or decoding text failed.
    #[error("tokenizing {text:?}: {message}")]
    Encode {
        /// The text (or a description of the ids).
        text: String,
        /// What the tokenizers crate said.
        message: String,
    },
    /// A token id is outside the model's vocabulary.
    #[error(
        "{what}: token id {id} at row {row}, column {column} is outside the vocabulary of {vocab_size} tokens"
    )]
    TokenId {
        /// Which input.
        what: &'static str,
        /// The offending id.
        id: i64,
        /// Batch row.
        row: usize,
        /// Sequence position.
        column: usize,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// A text is longer than the position table.
    #[error("{what}: {length} tokens exceed max_position_embeddings = {max}")]
    TooLong {
        /// Which input.
        what: &'static str,
        /// Tokens given (including cached ones).
        length: usize,
        /// The model's limit.
        max: usize,
    },
    /// Generation settings that cannot be honoured.
    #[error("generation: {0}")]
    Generation(String),
    /// A `--model` argument that names no usable local directory or cached hub model.
    #[error("model {spec:?} not found: {detail}")]
    ModelNotFound {
        /// What was asked for.
        spec: String,
        /// Why, and what to do.
        detail: String,
    },
    /// A hub server's answer that is unsafe to store: a commit or etag that is not a hash
    /// (and so could name a path outside the cache), or a cache entry that would leave it.
    #[error("refusing the hub's answer for {url}: {detail}")]
    HubResponse {
        /// The URL (or cache path) concerned.
        url: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A model produced NaN or infinite values: damaged weights, or a config (such as a
    /// negative `layer_norm_eps`) that makes the arithmetic diverge.
    #[error("{what} holds non-finite values ({detail}): are the weights or config.json damaged?")]
    NonFinite {
        /// Which output (e.g. "decoder logits").
        what: &'static str,
        /// Where, e.g. "row 0, NaN at 3 of 30524 positions".
        detail: String,
    },
    /// A model directory lacks a required file.
    #[error(
        "{dir} has no {file}: a HF model directory holds config.json, model.safetensors and tokenizer.json"
    )]
    MissingFile {
        /// The directory.
        dir: PathBuf,
        /// The missing file name.
        file: &'static str,
    },
}

/// Result alias for this crate.
///
/// ```
/// fn beams(n: usize) -> blip_text::Result<usize> {
///     let config = blip_text::GenerationConfig { num_beams: n, ..Default::default() };
///     config.validate()?;
///     Ok(config.num_beams)
/// }
/// assert_eq!(beams(3).unwrap(), 3);
/// assert!(beams(0).is_err());
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;
