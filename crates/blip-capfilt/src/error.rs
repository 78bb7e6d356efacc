//! The crate's error type: every variant names the file, record or key at fault.

use std::path::PathBuf;

use crate::Shard;

/// What a [`CapFiltModel`](crate::CapFiltModel) returns when it fails: any error type, boxed,
/// so that model code can use `?` on its own errors.
///
/// ```
/// use blip_capfilt::ModelError;
///
/// // Model code can use `?` on any error type.
/// fn parse_count(text: &str) -> Result<u32, ModelError> {
///     Ok(text.trim().parse::<u32>()?)
/// }
/// assert_eq!(parse_count(" 7 ").unwrap(), 7);
/// assert_eq!(parse_count("seven").unwrap_err().to_string(), "invalid digit found in string");
/// ```
pub type ModelError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that stops a CapFilt run or merge. Per-image problems (missing or corrupt
/// images) are not errors: they are recorded as skipped and the run goes on.
///
/// ```
/// use blip_capfilt::{Error, Shard};
///
/// let err = Shard::new(3, 2).unwrap_err();
/// assert!(matches!(err, Error::InvalidShard { .. }));
/// assert_eq!(err.to_string(), r#"shard "3/2": expected i/N with 0 <= i < N"#);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON input or output file is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A record of a JSON / JSON lines input is not `{"image": path, "caption": ...}`.
    #[error("{path}: {location}: {reason}")]
    InvalidRecord {
        /// The annotation file.
        path: PathBuf,
        /// Where in it: `element 3` (JSON array, 0-based) or `line 4` (JSON lines, 1-based).
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// The `--input` specification cannot be resolved into input files.
    #[error("input {input:?}: {reason}")]
    Input {
        /// The specification as given.
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// A tar shard cannot be read as a tar archive (truncated or not a tar).
    #[error("{path}: unreadable tar archive: {source}")]
    Tar {
        /// The tar file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A `--shard i/N` specification is malformed or out of range.
    #[error("shard {spec:?}: {reason}")]
    InvalidShard {
        /// The specification as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A [`RunOptions`](crate::RunOptions) field or a generation setting (see
    /// [`CapFiltModel::validate`](crate::CapFiltModel::validate)) has an unusable value.
    /// Reported before anything is written to the output directory.
    #[error("option {option}: {reason}")]
    InvalidOption {
        /// The field or setting name (`chunk_size`, `top_p`, `num_beams`, ...).
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The output directory holds a run with other options (this shard's own earlier run,
    /// or a sibling shard); mixing them would produce an inconsistent data set.
    #[error(
        "{path}: recorded run options differ from this run's ({}); use the same options or another output directory",
        differences.join("; ")
    )]
    OptionsChanged {
        /// The `run.json` that disagrees.
        path: PathBuf,
        /// One line per differing option: `name: recorded X, now Y`.
        differences: Vec<String>,
    },
    /// A path that the JSON outputs would have to name (a tar file, which becomes an
    /// `images/<stem>/` directory; an image root; a tar input's output directory) is not
    /// valid UTF-8. Written lossily (U+FFFD) it would name a file that does not exist, so
    /// the run refuses it before writing anything: rename it.
    #[error(
        "{}: {what} is not valid UTF-8, so the JSON outputs cannot name it; rename it",
        path.display()
    )]
    NonUtf8Path {
        /// The path (displayed lossily).
        path: PathBuf,
        /// What the path is (`"image root"`, `"tar file"`, ...).
        what: &'static str,
    },
    /// Another process is running this shard in this output directory.
    #[error("{path}: another run holds this shard's lock; wait for it or stop it")]
    Busy {
        /// The shard's lock file.
        path: PathBuf,
    },
    /// [`merge`](crate::merge) found shards that have not finished (no `done` marker).
    #[error(
        "{out_dir}: shard(s) {} not complete (no done marker); run them to the end before merging",
        missing.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
    )]
    MissingShards {
        /// The output directory.
        out_dir: PathBuf,
        /// The incomplete or absent shards.
        missing: Vec<Shard>,
    },
    /// [`merge`](crate::merge) found no shard directory at all.
    #[error("{out_dir}: no CapFilt run found (no shard-*-of-* directory)")]
    NoRun {
        /// The output directory.
        out_dir: PathBuf,
    },
    /// An output file written by an earlier run is malformed, missing or does not match
    /// the input (e.g. the input changed after chunks were committed).
    #[error("{path}: {reason}")]
    CorruptOutput {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model failed on a batch.
    #[error("shard {shard}, chunk {chunk}: model failed: {source}")]
    Model {
        /// The shard being processed.
        shard: Shard,
        /// The chunk being processed.
        chunk: u64,
        /// The model's error.
        #[source]
        source: ModelError,
    },
    /// The model returned something the runner cannot record (wrong number of verdicts,
    /// a probability outside `[0, 1]`, a web score for a sample without web text, ...).
    #[error("shard {shard}, chunk {chunk}: model broke its contract: {reason}")]
    ModelContract {
        /// The shard being processed.
        shard: Shard,
        /// The chunk being processed.
        chunk: u64,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

impl From<blip_core::fs::WriteError> for Error {
    fn from(e: blip_core::fs::WriteError) -> Self {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}
