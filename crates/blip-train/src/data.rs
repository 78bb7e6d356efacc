//! Training data: annotation files, captions cleaned by [`pre_caption`], and a
//! [`BatchLoader`] that decodes and augments the next batches on background threads while
//! the caller runs the model step.
//!
//! Reproducibility: an epoch's order is a Fisher–Yates shuffle seeded from `(seed, epoch)`
//! and each sample's augmentation draws from an [`SplitMix64`] seeded from `(seed, epoch, index)`,
//! so batch `s` of epoch `e` is the same whether it is reached by iterating or by resuming
//! with `skip = s`, and whatever the number of decode workers.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};

use blip_core::{SplitMix64, pre_caption};
use blip_vision::ImageProcessor;
use burn::tensor::{Device, Tensor, TensorData};
use serde::de::{self, Deserializer as _, SeqAccess, Visitor};
use serde_json::Value;

use crate::augment::{TrainTransform, normalize};

/// One image–caption pair of a training set.
///
/// ```
/// use blip_train::Annotation;
///
/// let a = Annotation {
///     image: "images/0.png".into(),
///     caption: "A dog.".into(),
///     image_id: None,
/// };
/// assert_eq!(a.id(), "images/0.png"); // no image id: the path stands in
/// let b = Annotation { image_id: Some("coco_42".into()), ..a.clone() };
/// assert_eq!(b.id(), "coco_42");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    /// The image file: the annotation's `image`, joined with the image root (an absolute
    /// `image` replaces the root, as Python's `os.path.join`).
    pub image: PathBuf,
    /// The caption as written in the file (the loader applies [`pre_caption`]).
    pub caption: String,
    /// The file's `image_id` (a number is kept as its decimal text). Retrieval fine-tuning
    /// uses it so that another caption of the same image is not treated as a negative.
    pub image_id: Option<String>,
}

impl Annotation {
    /// `image_id`, or the image path when the file gave none.
    pub fn id(&self) -> String {
        self.image_id
            .clone()
            .unwrap_or_else(|| self.image.to_string_lossy().into_owned())
    }
}

/// Where in an annotation file a problem is.
///
/// ```
/// use blip_train::Location;
///
/// assert_eq!(Location::Line(3).to_string(), "line 3");
/// let element = Location::Element { index: 1, line: 4 };
/// assert_eq!(element.to_string(), "element [1] (line 4)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A 1-based line (of a JSON-lines file, or of a JSON array file for syntax errors).
    Line(usize),
    /// A 0-based element of a JSON array, with a 1-based line.
    Element {
        /// Index in the array.
        index: usize,
        /// Line where the element starts, or where the syntax error in it is.
        line: usize,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(line) => write!(f, "line {line}"),
            Self::Element { index, line } => write!(f, "element [{index}] (line {line})"),
        }
    }
}

/// Everything that can go wrong while reading training data.
///
/// ```
/// use std::path::Path;
///
/// use blip_train::{DataError, Location, load_annotations};
///
/// let file = std::env::temp_dir().join(format!("blip-doc-bad-{}.jsonl", std::process::id()));
/// std::fs::write(&file, "{\"image\": \"a.png\", \"caption\": \"ok\"}\n{\"image\": \"b.png\"}\n")?;
/// match load_annotations(&file, Path::new("data")) {
///     Err(DataError::Annotation { location, message, .. }) => {
///         assert_eq!(location, Location::Line(2));
///         assert_eq!(message, "missing \"caption\"");
///     }
///     other => panic!("expected an annotation error, got {other:?}"),
/// }
/// # std::fs::remove_file(&file)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The annotation file could not be read.
    #[error("cannot read annotation file {path}: {source}")]
    Io {
        /// The annotation file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A record of the annotation file is not valid JSON or lacks what a training pair needs.
    #[error("{path}, {location}: {message}")]
    Annotation {
        /// The annotation file.
        path: PathBuf,
        /// The line or array element.
        location: Location,
        /// What is wrong.
        message: String,
    },
    /// The annotation file holds no record.
    #[error("annotation file {path} holds no annotations")]
    Empty {
        /// The annotation file.
        path: PathBuf,
    },
    /// A training image could not be read or decoded (the message names its path).
    #[error("{source}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: blip_core::Error,
    },
    /// A training image decoded to zero pixels.
    #[error("training image {path} has no pixels")]
    EmptyImage {
        /// The image file.
        path: PathBuf,
    },
    /// The loader's settings cannot work.
    #[error("invalid data loader setting: {0}")]
    Config(String),
}

/// Reads a BLIP annotation file: a JSON array, or JSON lines, of objects
/// `{"image": path relative to image_root, "caption": text or [texts], "image_id": optional
/// string or number}`. A caption list (as COCO's evaluation files have) gives one
/// [`Annotation`] per caption. Other fields are ignored.
///
/// Errors name the file and the line (JSON lines) or the element (arrays) and what is wrong.
/// Image files are not opened here.
///
/// ```
/// use std::path::Path;
///
/// use blip_train::load_annotations;
///
/// let file = std::env::temp_dir().join(format!("blip-doc-ann-{}.json", std::process::id()));
/// let json = r#"[{"image": "a/1.jpg", "caption": ["A cat.", "A pet"], "image_id": 7}]"#;
/// std::fs::write(&file, json)?;
/// let annotations = load_annotations(&file, Path::new("/data"))?;
/// assert_eq!(annotations.len(), 2); // one per caption
/// assert_eq!(annotations[0].image, Path::new("/data").join("a/1.jpg"));
/// assert_eq!(annotations[1].caption, "A pet"); // as written: the loader cleans it
/// assert_eq!(annotations[1].image_id.as_deref(), Some("7"));
/// # std::fs::remove_file(&file)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_annotations(path: &Path, image_root: &Path) -> Result<Vec<Annotation>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Vec::new();
    let bad = |location, message| DataError::Annotation {
        path: path.to_path_buf(),
        location,
        message,
    };
    if text.trim_start().starts_with('[') {
        read_array(text, image_root, &mut out)
            .map_err(|(location, message)| bad(location, message))?;
    } else {
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value =
                serde_json::from_str(line).map_err(|e| bad(Location::Line(n + 1), not_json(&e)))?;
            push_record(value, image_root, &mut out).map_err(|m| bad(Location::Line(n + 1), m))?;
        }
    }
    if out.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// serde_json's message without its " at line L column C" suffix (the location is reported
/// separately), plus the column.
fn not_json(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text);
    format!("not valid JSON: {message} (column {})", e.column())
}

/// Streams the elements of a JSON array file (one `Value` in memory at a time: pre-training
/// files hold millions of records).
fn read_array(
    text: &str,
    root: &Path,
    out: &mut Vec<Annotation>,
) -> Result<(), (Location, String)> {
    /// Progress of the parse, for locating an error.
    #[derive(Default)]
    struct Progress {
        /// The element being parsed.
        index: usize,
        /// The array's closing bracket was read.
        done: bool,
        /// The validation failure that aborted parsing.
        failure: Option<String>,
    }
    struct Records<'a> {
        root: &'a Path,
        out: &'a mut Vec<Annotation>,
        progress: &'a mut Progress,
    }
    impl<'de> Visitor<'de> for Records<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of annotation objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(value) = seq.next_element::<Value>()? {
                if let Err(message) = push_record(value, self.root, self.out) {
                    self.progress.failure = Some(message);
                    return Err(de::Error::custom("invalid annotation"));
                }
                self.progress.index += 1;
            }
            self.progress.done = true;
            Ok(())
        }
    }
    let mut progress = Progress::default();
    let mut de = serde_json::Deserializer::from_str(text);
    let result = de
        .deserialize_seq(Records {
            root,
            out,
            progress: &mut progress,
        })
        .and_then(|()| de.end());
    result.map_err(|e| {
        let index = progress.index;
        match progress.failure {
            Some(message) => {
                let line = element_start_line(text, index).unwrap_or(e.line());
                (Location::Element { index, line }, message)
            }
            None if !progress.done => {
                let line = e.line();
                (Location::Element { index, line }, not_json(&e))
            }
            // Something after the closing bracket.
            None => (Location::Line(e.line()), not_json(&e)),
        }
    })
}

/// The 1-based line where element `index` of the JSON array in `text` starts. Only called
/// on a prefix serde_json has parsed, so a scan for brackets and commas outside strings
/// suffices.
fn element_start_line(text: &str, index: usize) -> Option<usize> {
    let (mut line, mut depth, mut element) = (1, 0usize, 0usize);
    let (mut in_string, mut escaped, mut awaiting) = (false, false, false);
    for c in text.chars() {
        if awaiting && !c.is_ascii_whitespace() {
            if element == index {
                return Some(line);
            }
            awaiting = false;
        }
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                awaiting = depth == 1;
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => {
                element += 1;
                awaiting = true;
            }
            _ => {}
        }
    }
    None
}

/// JSON's name for the kind of `value`, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Validates one record and appends its annotations (one per caption).
fn push_record(value: Value, root: &Path, out: &mut Vec<Annotation>) -> Result<(), String> {
    let Value::Object(mut record) = value else {
        return Err(format!(
            "expected an object {{\"image\": ..., \"caption\": ...}}, found {}",
            kind(&value)
        ));
    };
    let image = match record.remove("image") {
        None => return Err("missing \"image\"".into()),
        Some(Value::String(s)) if s.is_empty() => return Err("\"image\" is empty".into()),
        Some(Value::String(s)) => root.join(s),
        Some(other) => return Err(format!("\"image\" is {}, not a string", kind(&other))),
    };
    let image_id = match record.remove("image_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(format!(
                "\"image_id\" is {}, not a string or a number",
                kind(&other)
            ));
        }
    };
    let captions = match record.remove("caption") {
        None => return Err("missing \"caption\"".into()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(list)) if list.is_empty() => {
            return Err("\"caption\" is an empty list".into());
        }
        Some(Value::Array(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                other => Err(format!(
                    "\"caption\"[{i}] is {}, not a string",
                    kind(&other)
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(format!(
                "\"caption\" is {}, not a string or a list of strings",
                kind(&other)
            ));
        }
    };
    out.extend(captions.into_iter().map(|caption| Annotation {
        image: image.clone(),
        caption,
        image_id: image_id.clone(),
    }));
    Ok(())
}

/// A batch of augmented images and cleaned captions.
///
/// ```
/// use blip_train::Batch;
/// use burn::tensor::Device;
///
/// let batch = Batch {
///     pixel_values: vec![0.5; 2 * 3 * 4 * 4],
///     image_size: 4,
///     captions: vec!["a dog".into(), "a cat".into()],
///     image_ids: vec!["1".into(), "2".into()],
///     indices: vec![3, 0],
/// };
/// assert_eq!(batch.len(), 2);
/// assert_eq!(batch.pixel_tensor(&Device::flex()).dims(), [2, 3, 4, 4]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Normalised pixels, `[B, 3, S, S]` row-major.
    pub pixel_values: Vec<f32>,
    /// `S`.
    pub image_size: usize,
    /// Captions after [`pre_caption`].
    pub captions: Vec<String>,
    /// [`Annotation::id`] of each sample.
    pub image_ids: Vec<String>,
    /// Index of each sample in the loader's annotations.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch has no sample.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The pixels as a `[B, 3, S, S]` tensor on `device`.
    pub fn pixel_tensor(&self, device: &Device) -> Tensor<4> {
        let s = self.image_size;
        Tensor::from_data(
            TensorData::new(self.pixel_values.clone(), [self.len(), 3, s, s]),
            device,
        )
    }
}

/// Settings of a [`BatchLoader`].
///
/// ```
/// use blip_train::LoaderConfig;
///
/// let config = LoaderConfig { workers: 2, ..LoaderConfig::new(32) };
/// assert_eq!((config.batch_size, config.max_words, config.seed), (32, 30, 42));
/// assert!(config.drop_last);
/// // Rank 1 of 4 in data-parallel training: 8 of every 32 samples.
/// let shard = config.shard(1, 4);
/// assert_eq!((shard.rank, shard.world_size, shard.rank_batch_size()), (1, 4, 8));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Samples per batch: the global batch, summed over all ranks.
    pub batch_size: usize,
    /// This rank (data-parallel training: it loads samples `rank·b..(rank+1)·b` of every
    /// global batch, with `b = batch_size / world_size`, as PyTorch's
    /// `DistributedSampler`). 0 without distribution.
    pub rank: usize,
    /// Number of ranks sharing each batch (1 without distribution); must divide
    /// `batch_size`.
    pub world_size: usize,
    /// Words kept by [`pre_caption`] (30 in BLIP's pre-training and COCO/Flickr fine-tunes).
    pub max_words: usize,
    /// Seed of the shuffles and augmentations.
    pub seed: u64,
    /// Drop the last, incomplete batch of an epoch (BLIP's training loaders do).
    pub drop_last: bool,
    /// Threads decoding and augmenting the images of one batch.
    pub workers: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch: usize,
}

impl LoaderConfig {
    /// `batch_size` with BLIP's defaults: 30 words, seed 42, `drop_last`, one worker per
    /// available core, 2 batches prefetched.
    pub fn new(batch_size: usize) -> Self {
        Self {
            batch_size,
            rank: 0,
            world_size: 1,
            max_words: 30,
            seed: 42,
            drop_last: true,
            workers: thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: 2,
        }
    }

    /// This config for rank `rank` of `world_size` (see [`Self::rank`]); checked by
    /// [`BatchLoader::new`].
    pub fn shard(self, rank: usize, world_size: usize) -> Self {
        Self {
            rank,
            world_size,
            ..self
        }
    }

    /// Samples this rank loads per batch.
    pub fn rank_batch_size(&self) -> usize {
        self.batch_size / self.world_size.max(1)
    }
}

/// Stream tags, so the shuffle and the augmentations of one epoch never share draws.
const SHUFFLE_STREAM: u64 = 1;
const SAMPLE_STREAM: u64 = 2;
/// The trainer's dropout masks.
pub(crate) const DROPOUT_STREAM: u64 = 3;

struct Inner {
    annotations: Vec<Annotation>,
    transform: TrainTransform,
    config: LoaderConfig,
}

/// Shuffles, decodes, augments and batches training pairs, preparing the next batches on a
/// background thread (the images of one batch are split over `workers` threads) while the
/// caller trains. Cheap to clone.
///
/// ```
/// use blip_train::{BatchLoader, LoaderConfig, TrainTransform, load_annotations};
///
/// let dir = std::env::temp_dir().join(format!("blip-doc-loader-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let mut lines = String::new();
/// for i in 0..5 {
///     image::RgbImage::new(8, 8).save(dir.join(format!("{i}.png")))?;
///     lines += &format!("{{\"image\": \"{i}.png\", \"caption\": \"Picture #{i}!\"}}\n");
/// }
/// std::fs::write(dir.join("train.jsonl"), lines)?;
/// let annotations = load_annotations(&dir.join("train.jsonl"), &dir)?;
/// let loader = BatchLoader::new(annotations, TrainTransform::pretrain(16), LoaderConfig::new(2))?;
/// assert_eq!(loader.batches_per_epoch(), 2); // 5 samples: the incomplete batch is dropped
/// for batch in loader.batches(0, 0) {
///     let batch = batch?;
///     assert_eq!(batch.pixel_values.len(), 2 * 3 * 16 * 16);
///     assert_eq!(batch.captions[0], format!("picture {}", batch.indices[0])); // pre_caption
/// }
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct BatchLoader {
    inner: Arc<Inner>,
}

impl fmt::Debug for BatchLoader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchLoader")
            .field("samples", &self.inner.annotations.len())
            .field("transform", &self.inner.transform)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl BatchLoader {
    /// A loader over `annotations`. Fails on a batch size, worker count or image size of 0,
    /// a crop scale outside `(0, 1]`, a world size that does not divide the batch, or a
    /// rank outside the world.
    pub fn new(
        annotations: Vec<Annotation>,
        transform: TrainTransform,
        config: LoaderConfig,
    ) -> Result<Self, DataError> {
        let problem = if config.batch_size == 0 {
            Some("batch_size is 0".to_string())
        } else if config.world_size == 0 || config.rank >= config.world_size {
            Some(format!(
                "rank {} is outside a world of {} ranks",
                config.rank, config.world_size
            ))
        } else if !config.batch_size.is_multiple_of(config.world_size) {
            Some(format!(
                "a world of {} ranks does not divide the global batch of {} samples",
                config.world_size, config.batch_size
            ))
        } else if config.workers == 0 {
            Some("workers is 0".to_string())
        } else if transform.image_size == 0 {
            Some("image_size is 0".to_string())
        } else if !(transform.min_scale > 0.0 && transform.min_scale <= 1.0) {
            Some(format!(
                "min_scale {} is outside (0, 1]",
                transform.min_scale
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(DataError::Config(problem));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                annotations,
                transform,
                config,
            }),
        })
    }

    /// The annotations, in file order (what [`Batch::indices`] index).
    pub fn annotations(&self) -> &[Annotation] {
        &self.inner.annotations
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.inner.config
    }

    /// Number of (global) batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.inner.annotations.len(), self.inner.config.batch_size);
        if self.inner.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of `epoch`: a Fisher–Yates shuffle seeded from `(seed, epoch)`.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.inner.annotations.len()).collect();
        let mut rng = SplitMix64::derive(self.inner.config.seed, &[SHUFFLE_STREAM, epoch as u64]);
        for i in (1..order.len()).rev() {
            let j = ((rng.next_f64() * (i + 1) as f64) as usize).min(i);
            order.swap(i, j);
        }
        order
    }

    /// The generator that augments annotation `index` in `epoch`.
    pub fn sample_rng(&self, epoch: usize, index: usize) -> SplitMix64 {
        SplitMix64::derive(
            self.inner.config.seed,
            &[SAMPLE_STREAM, epoch as u64, index as u64],
        )
    }

    /// Decodes, augments and normalises the given annotations of `epoch` into a batch, now,
    /// on the calling thread and `workers` scoped threads. The first failing sample (in
    /// batch order) is the error.
    pub fn load(&self, epoch: usize, indices: &[usize]) -> Result<Batch, DataError> {
        let inner = &self.inner;
        let size = inner.transform.image_size;
        let per_sample = 3 * size * size;
        let mut pixel_values = vec![0f32; indices.len() * per_sample];
        let workers = inner.config.workers.clamp(1, indices.len().max(1));
        let chunk = indices.len().div_ceil(workers).max(1);
        let fill = |indices: &[usize], out: &mut [f32]| -> Result<(), DataError> {
            for (&index, out) in indices.iter().zip(out.chunks_exact_mut(per_sample)) {
                let path = &inner.annotations[index].image;
                let image = ImageProcessor::open(path).map_err(|source| DataError::Image {
                    path: path.clone(),
                    source,
                })?;
                if image.width() == 0 || image.height() == 0 {
                    return Err(DataError::EmptyImage { path: path.clone() });
                }
                let augmented = inner
                    .transform
                    .apply(&image, &mut self.sample_rng(epoch, index));
                out.copy_from_slice(&normalize(&augmented));
            }
            Ok(())
        };
        let parts = indices
            .chunks(chunk)
            .zip(pixel_values.chunks_mut(chunk * per_sample));
        if workers == 1 {
            for (indices, out) in parts {
                fill(indices, out)?;
            }
        } else {
            let fill = &fill;
            let results: Vec<_> = thread::scope(|s| {
                let handles: Vec<_> = parts
                    .map(|(indices, out)| s.spawn(move || fill(indices, out)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    })
                    .collect()
            });
            results.into_iter().collect::<Result<(), _>>()?;
        }
        let annotations = indices.iter().map(|&i| &inner.annotations[i]);
        Ok(Batch {
            pixel_values,
            image_size: size,
            captions: annotations
                .clone()
                .map(|a| pre_caption(&a.caption, inner.config.max_words))
                .collect(),
            image_ids: annotations.map(Annotation::id).collect(),
            indices: indices.to_vec(),
        })
    }

    /// The annotations this rank loads for batch `step` of an epoch whose sample order is
    /// `order`: its share of the global batch. An incomplete last batch of several ranks
    /// (`drop_last` off) is completed from the start of the order, as PyTorch's
    /// `DistributedSampler` pads, so every rank gets a full share.
    ///
    /// ```
    /// use blip_train::{BatchLoader, LoaderConfig, TrainTransform, load_annotations};
    ///
    /// let dir = std::env::temp_dir().join(format!("blip-doc-shard-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let mut lines = String::new();
    /// for i in 0..8 {
    ///     image::RgbImage::new(8, 8).save(dir.join(format!("{i}.png")))?;
    ///     lines += &format!("{{\"image\": \"{i}.png\", \"caption\": \"image {i}\"}}\n");
    /// }
    /// std::fs::write(dir.join("train.jsonl"), lines)?;
    /// let annotations = load_annotations(&dir.join("train.jsonl"), &dir)?;
    /// // Global batches of 4 shared by 2 ranks: rank 1 loads the last 2 of each.
    /// let config = LoaderConfig::new(4).shard(1, 2);
    /// let loader = BatchLoader::new(annotations, TrainTransform::finetune(8), config)?;
    /// let order = loader.epoch_order(0);
    /// assert_eq!(loader.rank_indices(&order, 1), order[6..8]);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn rank_indices(&self, order: &[usize], step: usize) -> Vec<usize> {
        let config = &self.inner.config;
        let (global, share) = (config.batch_size, config.rank_batch_size());
        let start = step * global + config.rank * share;
        if order.is_empty() {
            return Vec::new();
        }
        if config.world_size == 1 {
            return order[start.min(order.len())..(start + share).min(order.len())].to_vec();
        }
        (start..start + share)
            .map(|i| order[i % order.len()])
            .collect()
    }

    /// This rank's batches of `epoch` from batch `skip` on (to resume mid-epoch), prepared
    /// on a background thread up to `prefetch` batches ahead. After an error the iterator
    /// ends; dropping it stops the background work.
    pub fn batches(&self, epoch: usize, skip: usize) -> Batches {
        let total = self.batches_per_epoch();
        let remaining = total.saturating_sub(skip);
        let (tx, rx) = mpsc::sync_channel(self.inner.config.prefetch);
        let loader = self.clone();
        let handle = thread::Builder::new()
            .name(format!("blip-data-epoch-{epoch}"))
            .spawn(move || {
                let order = loader.epoch_order(epoch);
                for step in skip..total {
                    let indices = loader.rank_indices(&order, step);
                    let batch = loader.load(epoch, &indices);
                    let failed = batch.is_err();
                    // A closed channel means the consumer dropped the iterator: stop.
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawning the data loader thread");
        Batches {
            receiver: Some(rx),
            handle: Some(handle),
            remaining,
        }
    }
}

/// The iterator of [`BatchLoader::batches`].
///
/// ```
/// # use blip_train::{BatchLoader, LoaderConfig, TrainTransform, load_annotations};
/// # let dir = std::env::temp_dir().join(format!("blip-doc-batches-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let mut lines = String::new();
/// # for i in 0..6 {
/// #     image::RgbImage::new(8, 8).save(dir.join(format!("{i}.png")))?;
/// #     lines += &format!("{{\"image\": \"{i}.png\", \"caption\": \"image {i}\"}}\n");
/// # }
/// # std::fs::write(dir.join("train.jsonl"), lines)?;
/// # let annotations = load_annotations(&dir.join("train.jsonl"), &dir)?;
/// // `annotations`: six images and their captions.
/// let loader = BatchLoader::new(annotations, TrainTransform::finetune(8), LoaderConfig::new(2))?;
/// let epoch: Vec<_> = loader.batches(0, 0).collect::<Result<_, _>>()?;
/// assert_eq!(epoch.len(), 3);
/// // Resuming at batch 1 gives what iterating gave from there, augmentations included.
/// let resumed: Vec<_> = loader.batches(0, 1).collect::<Result<_, _>>()?;
/// assert_eq!(resumed[..], epoch[1..]);
/// // Dropping the iterator early stops the background thread.
/// let mut next_epoch = loader.batches(1, 0);
/// assert!(next_epoch.next().is_some());
/// drop(next_epoch);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Batches {
    receiver: Option<mpsc::Receiver<Result<Batch, DataError>>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
}

impl fmt::Debug for Batches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batches")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl Batches {
    /// Joins the background thread, re-raising its panic if it had one.
    fn finish(&mut self) {
        self.receiver = None;
        if let Some(handle) = self.handle.take()
            && let Err(panic) = handle.join()
            && !thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let received = self.receiver.as_ref()?.recv();
        match received {
            Ok(batch) => {
                self.remaining = self.remaining.saturating_sub(1);
                if batch.is_err() {
                    self.remaining = 0;
                    self.finish();
                }
                Some(batch)
            }
            Err(mpsc::RecvError) => {
                self.remaining = 0;
                self.finish();
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining))
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the channel first unblocks a producer waiting to send; it then returns.
        self.finish();
    }
}
