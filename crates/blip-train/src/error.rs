//! The errors of training: bad batches, checkpoints that cannot be read or written, and
//! the inference crates' errors passed through.

use std::path::PathBuf;

/// What went wrong in training, and where.
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
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
