//! The records CapFilt writes: provenance lines, annotation entries, the summary.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One element of BLIP's annotation format, as its pre-training loader reads it.
///
/// ```
/// use blip_capfilt::Annotation;
///
/// let entry = Annotation { image: "img/0.png".into(), caption: "a red car".into() };
/// assert_eq!(serde_json::to_string(&entry)?, r#"{"image":"img/0.png","caption":"a red car"}"#);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    /// Image path relative to the image root.
    pub image: String,
    /// The (web or synthetic) text.
    pub caption: String,
}

/// Where a text came from.
///
/// ```
/// use blip_capfilt::TextSource;
///
/// assert_eq!(serde_json::to_value(TextSource::Synthetic)?, "synthetic");
/// assert_eq!(serde_json::from_str::<TextSource>(r#""web""#)?, TextSource::Web);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSource {
    /// The data set's own (web) text.
    Web,
    /// Written by the captioner.
    Synthetic,
}

/// Why an image was skipped.
///
/// ```
/// use blip_capfilt::SkipKind;
///
/// assert_eq!(SkipKind::NoImage.as_str(), "no_image");
/// assert_eq!(serde_json::to_value(SkipKind::AmbiguousImage)?, SkipKind::AmbiguousImage.as_str());
/// assert_eq!(serde_json::from_str::<SkipKind>(r#""corrupt""#)?, SkipKind::Corrupt);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipKind {
    /// The image file does not exist.
    Missing,
    /// The image file or tar member cannot be read (permissions, I/O error, too large, not
    /// a regular file such as a FIFO or a directory).
    Unreadable,
    /// The bytes do not decode as an image.
    Corrupt,
    /// A tar key has caption members but no image member.
    NoImage,
    /// A tar key has several image members (`key.jpg` and `key.png`).
    AmbiguousImage,
    /// A tar key is not a plain relative path (`..`, absolute) or not valid UTF-8, and
    /// cannot name an output file.
    UnsafeKey,
    /// A tar key's `.txt` / `.json` member is unreadable or invalid JSON.
    BadMetadata,
}

impl SkipKind {
    /// The snake_case name used in the JSON outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipKind::Missing => "missing",
            SkipKind::Unreadable => "unreadable",
            SkipKind::Corrupt => "corrupt",
            SkipKind::NoImage => "no_image",
            SkipKind::AmbiguousImage => "ambiguous_image",
            SkipKind::UnsafeKey => "unsafe_key",
            SkipKind::BadMetadata => "bad_metadata",
        }
    }
}

/// A scored text (web or synthetic) of one image.
///
/// ```
/// use blip_capfilt::{ProvenanceRecord, TextRecord, TextSource};
///
/// let record = TextRecord {
///     ordinal: 0,
///     image: "a.jpg".into(),
///     text: "a dog".into(),
///     source: TextSource::Web,
///     itm_probability: 0.75,
///     kept: true,
///     captioner: None, // web texts have none
///     filter: "itm".into(),
/// };
/// assert_eq!(
///     serde_json::to_string(&ProvenanceRecord::Text(record))?,
///     r#"{"record":"text","ordinal":0,"image":"a.jpg","text":"a dog","source":"web","itm_probability":0.75,"kept":true,"filter":"itm"}"#
/// );
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextRecord {
    /// The sample's position in the input order.
    pub ordinal: u64,
    /// Image path as in the annotation file.
    pub image: String,
    /// The text (web texts as in the input, not normalised).
    pub text: String,
    /// Web or synthetic.
    pub source: TextSource,
    /// The filter's ITM match probability.
    pub itm_probability: f32,
    /// `itm_probability >= threshold`: the text is in the cleaned data set.
    pub kept: bool,
    /// The captioner that wrote it (synthetic texts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captioner: Option<String>,
    /// The filter that scored it.
    pub filter: String,
}

/// An image that could not be used.
///
/// ```
/// use blip_capfilt::{ProvenanceRecord, SkipKind, SkippedRecord};
///
/// let skipped = SkippedRecord {
///     ordinal: 1,
///     image: "b.jpg".into(),
///     kind: SkipKind::Missing,
///     reason: "b.jpg: no such file".into(),
/// };
/// let json = serde_json::to_value(ProvenanceRecord::Skipped(skipped.clone()))?;
/// assert_eq!(json["record"], "skipped");
/// assert_eq!(json["kind"], "missing");
/// let back: ProvenanceRecord = serde_json::from_value(json)?;
/// assert_eq!(back, ProvenanceRecord::Skipped(skipped));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRecord {
    /// The sample's position in the input order.
    pub ordinal: u64,
    /// Image path as the annotation file would have named it (for tar keys without image
    /// member: `images/<stem>/<key>` without extension). A tar key that is not valid UTF-8
    /// is written with its invalid bytes as `\xNN` (and `\` as `\\`), never lossily.
    pub image: String,
    /// Category of the failure.
    pub kind: SkipKind,
    /// The failure, naming the file or key.
    pub reason: String,
}

/// One line of `provenance.jsonl` (and of the chunk files), tagged by `"record"`.
///
/// ```
/// use blip_capfilt::ProvenanceRecord;
///
/// let line = r#"{"record":"text","ordinal":3,"image":"c.jpg","text":"a cat","source":"synthetic","itm_probability":0.25,"kept":false,"captioner":"cap","filter":"itm"}"#;
/// let record: ProvenanceRecord = serde_json::from_str(line)?;
/// assert_eq!(record.ordinal(), 3);
/// let ProvenanceRecord::Text(text) = &record else { panic!("a text record") };
/// assert_eq!((text.kept, text.captioner.as_deref()), (false, Some("cap")));
/// assert_eq!(serde_json::to_string(&record)?, line);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum ProvenanceRecord {
    /// `{"record": "text", ...}`
    Text(TextRecord),
    /// `{"record": "skipped", ...}`
    Skipped(SkippedRecord),
}

impl ProvenanceRecord {
    /// The sample's position in the input order.
    pub fn ordinal(&self) -> u64 {
        match self {
            ProvenanceRecord::Text(t) => t.ordinal,
            ProvenanceRecord::Skipped(s) => s.ordinal,
        }
    }
}

/// First line of a chunk file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkHeader {
    pub chunk: u64,
    /// Samples (images) in the chunk, processed or skipped; an image whose model output
    /// had no text at all has no record, so this count is the only trace of it.
    pub samples: u64,
    /// Record lines after the header.
    pub records: u64,
    /// SHA-256 (lowercase hex) of every byte after the header line: the record lines,
    /// each with its `\n`.
    pub sha256: String,
}

/// Contents of a shard's `done` marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DoneMarker {
    pub chunks: u64,
    pub samples: u64,
}

/// Counts and noise ratios of a merged CapFilt output (`summary.json`). `Display` prints
/// it for people.
///
/// ```
/// use blip_capfilt::Summary;
///
/// let summary: Summary = serde_json::from_value(serde_json::json!({
///     "input": "web.json", "input_kind": "json", "image_root": "/data", "shards": 1,
///     "captioner": "cap", "filter": "itm", "threshold": 0.5,
///     "images": 4, "images_skipped": 0, "skipped_by_kind": {}, "images_with_kept_text": 3,
///     "web_texts": 4, "web_kept": 3, "synthetic_texts": 4, "synthetic_kept": 2, "annotations": 5,
///     "web_noise_ratio": 0.25, "synthetic_noise_ratio": 0.5
/// }))?;
/// let text = summary.to_string();
/// assert!(text.contains("web texts: 4, kept 3, removed 1 (noise ratio 25.0%)"));
/// assert!(text.contains("synthetic texts: 4, kept 2, removed 2 (noise ratio 50.0%)"));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// `--input` as given.
    pub input: String,
    /// `"json"`, `"json_lines"` or `"tar"`.
    pub input_kind: String,
    /// The directory the annotation's `image` paths are relative to: the JSON input's
    /// image root, or the output directory for tar inputs (images copied to `images/`).
    pub image_root: String,
    /// Number of shards merged.
    pub shards: usize,
    /// Captioner name (from the model).
    pub captioner: String,
    /// Filter name (from the model).
    pub filter: String,
    /// ITM probability at or above which a text is kept.
    pub threshold: f32,
    /// Images (samples) in the input.
    pub images: u64,
    /// Images skipped (missing, corrupt, ...).
    pub images_skipped: u64,
    /// Skipped images by [`SkipKind`] name.
    pub skipped_by_kind: BTreeMap<String, u64>,
    /// Images with at least one kept text (those in the annotation file).
    pub images_with_kept_text: u64,
    /// Web texts scored.
    pub web_texts: u64,
    /// Web texts kept.
    pub web_kept: u64,
    /// Synthetic texts scored.
    pub synthetic_texts: u64,
    /// Synthetic texts kept.
    pub synthetic_kept: u64,
    /// Entries of the annotation file (`web_kept + synthetic_kept`).
    pub annotations: u64,
    /// Share of web texts the filter removed (`None` without web texts).
    pub web_noise_ratio: Option<f64>,
    /// Share of synthetic texts the filter removed: the paper's "noise ratio" (Table 2:
    /// 19% beam, 25% nucleus). `None` without synthetic texts.
    pub synthetic_noise_ratio: Option<f64>,
}

/// `removed / total`, `None` when there is nothing to remove from.
pub(crate) fn noise_ratio(total: u64, kept: u64) -> Option<f64> {
    (total > 0).then(|| (total - kept.min(total)) as f64 / total as f64)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratio = |r: Option<f64>| match r {
            Some(r) => format!("{:.1}%", 100.0 * r),
            None => "n/a".to_string(),
        };
        writeln!(
            f,
            "CapFilt: {} ({}, {} shard{})",
            self.input,
            self.input_kind,
            self.shards,
            if self.shards == 1 { "" } else { "s" }
        )?;
        writeln!(
            f,
            "  captioner {}, filter {}, threshold {}",
            self.captioner, self.filter, self.threshold
        )?;
        write!(
            f,
            "  images: {}, skipped {}",
            self.images, self.images_skipped
        )?;
        if !self.skipped_by_kind.is_empty() {
            let kinds: Vec<String> = self
                .skipped_by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            write!(f, " ({})", kinds.join(", "))?;
        }
        writeln!(f, ", with a kept text {}", self.images_with_kept_text)?;
        writeln!(
            f,
            "  web texts: {}, kept {}, removed {} (noise ratio {})",
            self.web_texts,
            self.web_kept,
            self.web_texts - self.web_kept.min(self.web_texts),
            ratio(self.web_noise_ratio)
        )?;
        writeln!(
            f,
            "  synthetic texts: {}, kept {}, removed {} (noise ratio {})",
            self.synthetic_texts,
            self.synthetic_kept,
            self.synthetic_texts - self.synthetic_kept.min(self.synthetic_texts),
            ratio(self.synthetic_noise_ratio)
        )?;
        write!(
            f,
            "  annotations: {} (image root {})",
            self.annotations, self.image_root
        )
    }
}
