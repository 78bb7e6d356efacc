//! The errors of training: bad batches, checkpoints that cannot be read or written, and
//! the inference crates' errors passed through.

use std::path::PathBuf;

/// What went wrong in training, and where.
///
/// ```
/// use blip_train::{QueueSizeError, TrainError};
///
/// let err = TrainError::Batch("3 captions for 4 images".into());
/// assert_eq!(err.to_string(), "invalid batch: 3 captions for 4 images");
/// // The crate's other errors convert into it (`?` does this).
/// let err: TrainError = QueueSizeError { queue: 8, batch: 3 }.into();
/// assert!(matches!(err, TrainError::Queue(_)));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A model error (input ids, shapes, checkpoint keys) from `blip-text`.
    #[error(transparent)]
    Model(#[from] blip_text::Error),
    /// An image or checkpoint error from `blip-vision`.
    #[error(transparent)]
    Core(#[from] blip_core::Error),
    /// The batch does not divide the feature queue.
    #[error(transparent)]
    Queue(#[from] crate::momentum::QueueSizeError),
    /// An annotation file or training image that cannot be used.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A batch the model cannot take.
    #[error("invalid batch: {0}")]
    Batch(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Ranks that cannot train together: different options, a rank that left, a world
    /// size that does not divide the batch.
    #[error("distributed training: {0}")]
    Distributed(String),
    /// A training checkpoint that is missing pieces or does not fit the model.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// `Result` with [`TrainError`].
///
/// ```
/// use blip_train::{Result, TrainError};
///
/// fn batch_size(captions: &[&str]) -> Result<usize> {
///     if captions.is_empty() {
///         return Err(TrainError::Batch("no captions".into()));
///     }
///     Ok(captions.len())
/// }
/// assert_eq!(batch_size(&["a dog", "a cat"]).unwrap(), 2);
/// assert!(batch_size(&[]).is_err());
/// ```
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
