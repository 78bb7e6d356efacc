//! CapFilt (BLIP §3): a captioner writes synthetic captions for web images, a filter drops
//! the web and synthetic texts whose image–text match it rejects, and the cleaned data set
//! is written in BLIP's annotation format with a provenance record per text.
//!
//! This crate is the model-independent runner: [`run`] enumerates the input, decodes
//! images on background threads, hands batches to a [`CapFiltModel`] and commits the
//! results in crash-safe chunks; [`merge`] joins the shards into the final files. A text
//! is kept iff its ITM probability is at least [`RunOptions::threshold`] (0.5, the value
//! the BLIP authors used).
//!
//! # Inputs
//!
//! * a BLIP annotation file: a JSON array or JSON lines of
//!   `{"image": path relative to the image root, "caption": text | [texts] | null}`
//!   (the caption may be absent; other fields are ignored);
//! * WebDataset tar shards as img2dataset writes them: `key.jpg` / `key.png` / `key.webp`
//!   with `key.txt` (the web caption) and/or `key.json` (its `"caption"` field); the
//!   members sharing a key form a sample. `--input` names one `.tar`, a directory of
//!   `.tar` files (taken in file-name order) or a brace pattern
//!   (`shards/{00000..00009}.tar`, see [`expand_braces`]).
//!
//! Input paths must be regular files (or a directory, for a directory of `.tar`s): a
//! FIFO, socket or device is refused with [`Error::Input`] before it is opened (opening a
//! FIFO blocks), and an image file of a JSON input that is not a regular file is skipped
//! as `unreadable`. Paths the JSON outputs name must be valid UTF-8, since a lossy U+FFFD
//! would name a file that does not exist: a tar file name, an image root or a tar input's
//! output directory that is not is refused with [`Error::NonUtf8Path`]; a tar key that is
//! not is skipped as `unsafe_key`, its record naming it with the invalid bytes as `\xNN`.
//!
//! Samples are numbered (their *ordinal*) in this deterministic order. A caption list is
//! one image with several web texts: as [`CapFiltModel::process`] scores one web text per
//! entry, the image is passed once per web text, and only the first entry's synthetic
//! captions are recorded (one caption set per image, as the paper captions each image once).
//!
//! # Sharding, chunks and restarts
//!
//! With `--shard i/N` a run takes the samples whose `ordinal % N == i`; N machines run
//! the N shards with no coordination, into one output directory (or directories copied
//! together later), and [`merge`] joins them. A shard's samples are cut into chunks of
//! [`RunOptions::chunk_size`]; a chunk's results are written to a temp file, fsynced and
//! renamed into place, the rename being the commit. A restarted run (after a crash or
//! `kill -9`) removes temp files, verifies the committed chunks (record count and
//! SHA-256 of their records, from the chunk header), skips them without reading their
//! images and redoes the rest, so its output equals an uninterrupted run's. A committed
//! chunk that fails verification (truncated, lines removed, bytes altered) stops the run
//! with [`Error::CorruptOutput`] naming the file and what differs, rather than being
//! redone silently, which could hide damage or tampering: delete the chunk file and run
//! again to redo it. [`merge`] verifies every chunk the same way before reading it. For
//! tar inputs the images of a chunk that have a kept text are copied (bytes unchanged)
//! to `images/<tar stem>/<key>.<ext>` before the chunk is committed.
//!
//! Each shard directory records its options in `run.json` (format version, input and its
//! file sizes, shard, chunk size, captioner and filter names, threshold, generation
//! settings); a restart or sibling shard with other options fails with
//! [`Error::OptionsChanged`]. The options and the model's settings
//! ([`CapFiltModel::validate`]) are checked before anything is written, so a refused run
//! leaves no `run.json` behind and a corrected rerun is not taken for another run.
//! For the output of a sharded run to equal the unsharded one, the model's output for an
//! image must not depend on the rest of its batch (seed sampling per image, e.g. from
//! its pixels, not per batch).
//!
//! # On-disk layout
//!
//! ```text
//! <out>/
//!   shard-00000-of-00003/        one run directory per shard ("shard-00000-of-00001" unsharded)
//!     run.json                   the run's options (see above; "format": 2)
//!     chunks/00000000.jsonl      chunk 0: a header line
//!     chunks/00000001.jsonl        {"chunk": 0, "samples": n, "records": r, "sha256": h},
//!                                  then its r provenance records (as in provenance.jsonl),
//!                                  one a line; h: SHA-256 (lowercase hex) of every byte
//!                                  after the header line
//!     done                       {"chunks": c, "samples": s}: every chunk is committed
//!     lock                       locked (OS file lock) while a run works on the shard
//!   images/<tar stem>/<key>.<ext>  tar inputs only: images with at least one kept text
//!   annotations.json             merge: the cleaned data set, a JSON array of
//!                                  {"image", "caption"} (kept web and synthetic texts)
//!   provenance.jsonl             merge: one line per text and per skipped image
//!   summary.json                 merge: counts and noise ratios ([`Summary`])
//! ```
//!
//! Annotation `image` paths are relative to [`Summary::image_root`]: the JSON input's
//! image root (paths kept as in the input), or `<out>` for tar inputs
//! (`images/<stem>/<key>.<ext>`). Provenance lines, in ordinal order, are
//! [`ProvenanceRecord`]s:
//!
//! ```text
//! {"record":"text","ordinal":0,"image":"a.jpg","text":"a dog","source":"web","itm_probability":0.91,"kept":true,"filter":"<filter>"}
//! {"record":"text","ordinal":0,"image":"a.jpg","text":"a dog on grass","source":"synthetic","itm_probability":0.83,"kept":true,"captioner":"<captioner>","filter":"<filter>"}
//! {"record":"skipped","ordinal":1,"image":"b.jpg","kind":"corrupt","reason":"..."}
//! ```
//!
//! An unsharded [`run`] merges by itself when it completes; sharded runs need a [`merge`]
//! once every shard has its `done` marker. The noise ratios of [`Summary`] are the shares
//! of web and of synthetic texts removed (the paper's Table 2 "noise ratio" is the
//! synthetic one).

#![warn(missing_docs)]

mod chunk;
mod error;
mod input;
mod manifest;
mod merge;
pub mod model;
mod records;
mod runner;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use error::{Error, ModelError};
pub use input::expand_braces;
pub use merge::merge;
pub use model::{BlipCapFilt, CapFiltSettings, CaptionStrategy};
pub use records::{
    Annotation, ProvenanceRecord, SkipKind, SkippedRecord, Summary, TextRecord, TextSource,
};
pub use runner::{RunReport, run};

/// `run.json` in a shard directory: the run's options.
pub const RUN_FILE: &str = "run.json";
/// Lock file of a shard directory (an OS file lock, held while a run works on the shard).
pub const LOCK_FILE: &str = "lock";
/// The committed chunks of a shard directory.
pub const CHUNKS_DIR: &str = "chunks";
/// Marker a shard writes when all its chunks are committed.
pub const DONE_FILE: &str = "done";
/// Images copied out of tar inputs, `images/<tar stem>/<key>.<ext>`.
pub const IMAGES_DIR: &str = "images";
/// The cleaned data set in BLIP's annotation format.
pub const ANNOTATIONS_FILE: &str = "annotations.json";
/// One provenance line per text and per skipped image.
pub const PROVENANCE_FILE: &str = "provenance.jsonl";
/// Counts and noise ratios.
pub const SUMMARY_FILE: &str = "summary.json";

/// A text with the filter's ITM match probability (softmax of the ITM head, class 1).
///
/// ```
/// use blip_capfilt::{RunOptions, ScoredText};
///
/// let scored = ScoredText { text: "a dog on grass".into(), itm_probability: 0.83 };
/// // A text is kept iff its probability reaches the threshold (0.5 by default).
/// let threshold = RunOptions::new("web.json", "out").threshold;
/// assert!(scored.itm_probability >= threshold);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredText {
    /// The text that was scored.
    pub text: String,
    /// Probability in `[0, 1]` that the text matches the image.
    pub itm_probability: f32,
}

/// What the model says about one image.
///
/// ```
/// use blip_capfilt::{ImageVerdict, ScoredText};
///
/// let scored = |text: &str, p: f32| ScoredText { text: text.into(), itm_probability: p };
/// // An image with a web text, and one synthetic caption.
/// let verdict = ImageVerdict {
///     web: Some(scored("a red car", 0.91)),
///     synthetic: vec![scored("a red car on a road", 0.42)],
/// };
/// let kept: Vec<&str> = verdict.web.iter().chain(&verdict.synthetic)
///     .filter(|s| s.itm_probability >= 0.5)
///     .map(|s| s.text.as_str())
///     .collect();
/// assert_eq!(kept, ["a red car"]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ImageVerdict {
    /// The web text's score: `Some` iff a web text was given for this image. The recorded
    /// text is the input's, so a model may score a normalised copy.
    pub web: Option<ScoredText>,
    /// The captioner's texts (usually one) with their scores.
    pub synthetic: Vec<ScoredText>,
}

/// Captioner + filter, as the runner drives them.
///
/// ```
/// use blip_capfilt::{CapFiltModel, ImageVerdict, ModelError, RunOptions, ScoredText, run};
/// use image::RgbImage;
///
/// // Captions every image "a red square"; scores a text 0.9 if it says "red", else 0.1.
/// struct Fake;
/// impl CapFiltModel for Fake {
///     fn process(&mut self, _images: &[RgbImage], web: &[Option<String>]) -> Result<Vec<ImageVerdict>, ModelError> {
///         let score = |text: &str| ScoredText {
///             text: text.into(),
///             itm_probability: if text.contains("red") { 0.9 } else { 0.1 },
///         };
///         Ok(web.iter().map(|w| ImageVerdict { web: w.as_deref().map(score), synthetic: vec![score("a red square")] }).collect())
///     }
///     fn captioner_name(&self) -> String { "fake-captioner".into() }
///     fn filter_name(&self) -> String { "fake-filter".into() }
/// }
///
/// let dir = tempfile::tempdir()?;
/// # RgbImage::new(4, 4).save(dir.path().join("a.png"))?;
/// # RgbImage::new(4, 4).save(dir.path().join("b.png"))?;
/// let input = dir.path().join("web.json");
/// std::fs::write(&input, r#"[{"image": "a.png", "caption": "a red car"}, {"image": "b.png", "caption": "a cat"}]"#)?;
/// let options = RunOptions::new(input.to_string_lossy(), dir.path().join("out"));
/// let summary = run(&options, &mut Fake)?.summary.expect("an unsharded run merges");
/// assert_eq!((summary.web_texts, summary.web_kept), (2, 1));
/// assert_eq!((summary.synthetic_texts, summary.synthetic_kept), (2, 2));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait CapFiltModel {
    /// Checks the model's settings (generation options and the like); [`run`] calls it
    /// before it enumerates the input or writes anything, so that a bad setting fails
    /// once, before any image is decoded, and leaves the output directory untouched.
    /// Return [`Error::InvalidOption`] naming the setting. The default accepts everything.
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Captions + ITM scores for a batch of decoded images with their web texts (`None`
    /// if the sample has none); one verdict per image, in order. For sharded and
    /// unsharded runs to agree, an image's verdict must not depend on the rest of the batch.
    /// An image with several web texts comes once per text, consecutively; the synthetic
    /// captions of its repeats are ignored.
    fn process(
        &mut self,
        images: &[image::RgbImage],
        web_texts: &[Option<String>],
    ) -> Result<Vec<ImageVerdict>, ModelError>;
    /// The processor whose size every image is resized to as it is decoded, when all the
    /// model's networks take that one size: a batch waiting in memory then costs the
    /// model's resolution, not the input's (16 decoded 12000² photos are 6.9 GB). `None`
    /// (the default) keeps images as decoded.
    fn image_processor(&self) -> Option<blip_vision::ImageProcessor> {
        None
    }
    /// Name recorded in provenance and `run.json` (e.g. the captioner's path or hub id).
    fn captioner_name(&self) -> String;
    /// Name recorded in provenance and `run.json` (e.g. the filter's path or hub id).
    fn filter_name(&self) -> String;
}

/// One of N shards of the work: the samples with `ordinal % count == index`.
///
/// ```
/// use blip_capfilt::Shard;
/// use std::path::Path;
///
/// let shard: Shard = "1/3".parse()?;
/// assert_eq!(shard, Shard::new(1, 3)?);
/// assert!(shard.contains(4) && !shard.contains(5)); // ordinal % 3 == 1
/// assert_eq!(shard.to_string(), "1/3");
/// assert_eq!(shard.dir(Path::new("out")), Path::new("out/shard-00001-of-00003"));
/// assert!("3/3".parse::<Shard>().is_err());
/// # Ok::<(), blip_capfilt::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl Shard {
    /// The whole input as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`; errors unless `index < count`.
    pub fn new(index: usize, count: usize) -> Result<Shard, Error> {
        if count == 0 || index >= count {
            return Err(Error::InvalidShard {
                spec: format!("{index}/{count}"),
                reason: "expected i/N with 0 <= i < N".into(),
            });
        }
        Ok(Shard { index, count })
    }

    /// Whether the sample at `ordinal` belongs to this shard.
    pub fn contains(&self, ordinal: u64) -> bool {
        ordinal % self.count as u64 == self.index as u64
    }

    /// The shard a run directory's name (`shard-00001-of-00003`) names, if any.
    pub(crate) fn from_dir_name(name: &str) -> Option<Shard> {
        let rest = name.strip_prefix("shard-")?;
        let (i, n) = rest.split_once("-of-")?;
        Shard::new(i.parse().ok()?, n.parse().ok()?).ok()
    }

    /// The shard's run directory in `out_dir`: `shard-00001-of-00003`.
    pub fn dir(&self, out_dir: &Path) -> PathBuf {
        out_dir.join(format!("shard-{:05}-of-{:05}", self.index, self.count))
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard::ALL
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// Parses `i/N` (as `--shard` takes it).
    fn from_str(spec: &str) -> Result<Shard, Error> {
        let invalid = |reason: &str| Error::InvalidShard {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (i, n) = spec
            .split_once('/')
            .ok_or_else(|| invalid("expected i/N, e.g. 0/8"))?;
        let i = i.trim().parse().map_err(|_| invalid("i is not a number"))?;
        let n = n.trim().parse().map_err(|_| invalid("N is not a number"))?;
        Shard::new(i, n).map_err(|_| invalid("expected i/N with 0 <= i < N"))
    }
}

/// Everything a [`run`] needs besides the model.
///
/// ```
/// use blip_capfilt::{RunOptions, Shard};
///
/// let mut options = RunOptions::new("web.json", "capfilt-out");
/// assert_eq!((options.chunk_size, options.batch_size, options.threshold), (1000, 32, 0.5));
/// assert_eq!(options.shard, Shard::ALL);
/// assert!((1..=4).contains(&options.decode_threads));
/// // The second of eight machines, keeping only texts the filter is surer of.
/// options.shard = "1/8".parse()?;
/// options.threshold = 0.7;
/// assert_eq!(options.shard.dir(&options.out_dir).file_name().unwrap(), "shard-00001-of-00008");
/// # Ok::<(), blip_capfilt::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// A JSON / JSON lines file, a `.tar`, a directory of `.tar`s or a brace pattern.
    pub input: String,
    /// Directory the JSON input's image paths are relative to (default: the JSON file's
    /// directory); ignored for tar inputs.
    pub image_root: Option<PathBuf>,
    /// Output directory (see the crate docs for its layout).
    pub out_dir: PathBuf,
    /// The share of the input this run processes.
    pub shard: Shard,
    /// Samples per committed chunk: the work lost to a crash, and the granularity of
    /// restarts. Recorded; changing it needs a new output directory.
    pub chunk_size: usize,
    /// Images per model call (batches never straddle chunks). Not recorded: it must not
    /// change the model's output.
    pub batch_size: usize,
    /// A text is kept iff its ITM probability is `>= threshold` (default 0.5).
    pub threshold: f32,
    /// Caption generation settings (strategy, top-p, lengths, seed, ...), recorded in
    /// `run.json` and compared on restart; the runner does not interpret them.
    pub generation: serde_json::Value,
    /// Stop after committing this many chunks in this invocation (the rest is left for a
    /// restart); `None` runs to the end.
    pub max_chunks: Option<usize>,
    /// Where this invocation reports its images (done of total, `shard i/n`); the library
    /// draws nothing itself. `None` (the default) skips the counting pass too.
    pub progress: Option<blip_core::progress::ProgressSink>,
    /// Threads decoding images while the model runs (at least 1).
    pub decode_threads: usize,
}

impl RunOptions {
    /// Defaults: whole input, chunks of 1000, batches of 32, threshold 0.5, no progress
    /// reports, up to 4 decoding threads.
    pub fn new(input: impl Into<String>, out_dir: impl Into<PathBuf>) -> RunOptions {
        RunOptions {
            input: input.into(),
            image_root: None,
            out_dir: out_dir.into(),
            shard: Shard::ALL,
            chunk_size: 1000,
            batch_size: 32,
            threshold: 0.5,
            generation: serde_json::Value::Null,
            max_chunks: None,
            progress: None,
            decode_threads: std::thread::available_parallelism()
                .map(|n| n.get().min(4))
                .unwrap_or(1),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |option, reason: &str| {
            Err(Error::InvalidOption {
                option,
                reason: reason.to_string(),
            })
        };
        if self.chunk_size == 0 {
            return invalid("chunk_size", "must be at least 1");
        }
        if self.batch_size == 0 {
            return invalid("batch_size", "must be at least 1");
        }
        if self.decode_threads == 0 {
            return invalid("decode_threads", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return invalid("threshold", "must be a probability in [0, 1]");
        }
        Shard::new(self.shard.index, self.shard.count)?;
        Ok(())
    }
}
