//! Writing a whole world: images, annotation files, labels and WebDataset shards.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use image::ImageEncoder;
use image::codecs::png::PngEncoder;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::caption;
use crate::parse::caption_mentions;
use crate::scene::{SceneAttributes, scene};
use crate::vocab::{AttributeKind, Background, Colour, Position, Relation, Shape, Size, Texture};
use blip_core::SplitMix64;

const STREAM_CLEAN: u64 = 2;
const STREAM_WEB: u64 = 3;
const STREAM_TEST: u64 = 4;
const STREAM_NOISE: u64 = 5;

/// Relative weights of the noise kinds among the noisy web texts.
///
/// The default leans to texts that do not describe their image at all (another image's
/// caption, unrelated text: 70 %), as the paper's web alt-texts mostly do, over the subtle
/// kinds (one attribute wrong, a caption cut short).
///
/// ```
/// use blip_world::{NoiseMix, WorldConfig};
///
/// let mix = NoiseMix::default();
/// assert!((mix.other_image + mix.wrong_attribute + mix.unrelated + mix.truncated - 1.0).abs() < 1e-12);
/// let config = WorldConfig { noise_mix: NoiseMix { unrelated: -1.0, ..mix }, ..WorldConfig::small() };
/// assert!(config.validate().is_err()); // weights must be non-negative
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseMix {
    /// A correct caption of another (different-looking) image.
    pub other_image: f64,
    /// A caption of this image with exactly one attribute swapped.
    pub wrong_attribute: f64,
    /// A sentence about another topic.
    pub unrelated: f64,
    /// A correct caption cut short.
    pub truncated: f64,
}

impl Default for NoiseMix {
    fn default() -> Self {
        Self {
            other_image: 0.4,
            wrong_attribute: 0.2,
            unrelated: 0.3,
            truncated: 0.1,
        }
    }
}

impl NoiseMix {
    fn weights(&self) -> [(NoiseKind, f64); 4] {
        [
            (NoiseKind::OtherImage, self.other_image),
            (NoiseKind::WrongAttribute, self.wrong_attribute),
            (NoiseKind::Unrelated, self.unrelated),
            (NoiseKind::Truncated, self.truncated),
        ]
    }
}

/// What a web text is, for evaluation only (`web_labels.jsonl`).
///
/// ```
/// use blip_world::NoiseKind;
///
/// assert_eq!(NoiseKind::ALL[0], NoiseKind::None);
/// assert_eq!(NoiseKind::WrongAttribute.name(), "wrong_attribute");
/// assert_eq!(serde_json::to_value(NoiseKind::OtherImage)?, NoiseKind::OtherImage.name());
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseKind {
    /// A correct caption.
    None,
    /// A correct caption of another image (one that is not exact for this one).
    OtherImage,
    /// This image's caption with exactly one attribute wrong.
    WrongAttribute,
    /// Text about something else entirely.
    Unrelated,
    /// A correct caption truncated (at a word boundary or mid-word).
    Truncated,
}

impl NoiseKind {
    /// Every kind, `None` first.
    pub const ALL: [NoiseKind; 5] = [
        NoiseKind::None,
        NoiseKind::OtherImage,
        NoiseKind::WrongAttribute,
        NoiseKind::Unrelated,
        NoiseKind::Truncated,
    ];

    /// The name used in the labels file.
    pub fn name(self) -> &'static str {
        match self {
            NoiseKind::None => "none",
            NoiseKind::OtherImage => "other_image",
            NoiseKind::WrongAttribute => "wrong_attribute",
            NoiseKind::Unrelated => "unrelated",
            NoiseKind::Truncated => "truncated",
        }
    }
}

/// The most images a world holds, over its three splits: scene indices then fit the
/// six digits of [`image_path`]'s names.
pub const MAX_IMAGES: usize = 1_000_000;

/// Settings of a world. Everything written is a function of these alone.
///
/// ```
/// use blip_world::WorldConfig;
///
/// let config = WorldConfig { clean_images: 3, web_images: 4, test_images: 2, ..WorldConfig::small() };
/// assert!(config.validate().is_ok());
/// assert_eq!(config.first_indices(), [0, 3, 7]); // clean, web, test
/// assert!(WorldConfig { image_size: 32, ..config }.validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorldConfig {
    /// The world seed.
    pub seed: u64,
    /// Image side in pixels, 64 to 96.
    pub image_size: u32,
    /// Images of the clean ("human-annotated") split.
    pub clean_images: usize,
    /// Correct captions per clean image (one annotation entry each), 1 to 20.
    pub clean_captions_per_image: usize,
    /// Images of the noisy web split (one web text each). The three splits hold at most
    /// [`MAX_IMAGES`] together.
    pub web_images: usize,
    /// Images of the clean test split.
    pub test_images: usize,
    /// Correct captions per test image, 1 to 20.
    pub test_captions_per_image: usize,
    /// Fraction of web texts that are noisy, 0 to 1 (rounded to a whole number of texts).
    pub noise_rate: f64,
    /// How the noisy web texts split among the noise kinds.
    pub noise_mix: NoiseMix,
    /// Web samples per WebDataset shard.
    pub shard_size: usize,
    /// Captions use synonyms ("ball", "crimson", "at the left"); when false, every value
    /// is named by its canonical word, as the demo model's world does: beam search ranks
    /// a value by its words' probability, so a value with three synonyms loses to one
    /// with a single word unless the model is three times as sure of it.
    #[serde(default = "synonyms_default")]
    pub synonyms: bool,
}

fn synonyms_default() -> bool {
    true
}

impl Default for WorldConfig {
    /// 500 clean images × 2 captions, 4000 web images at 50 % noise in shards of 1000,
    /// 300 test images × 5 captions, 64 px.
    fn default() -> Self {
        Self {
            seed: 2201,
            image_size: 64,
            clean_images: 500,
            clean_captions_per_image: 2,
            web_images: 4000,
            test_images: 300,
            test_captions_per_image: 5,
            noise_rate: 0.5,
            noise_mix: NoiseMix::default(),
            shard_size: 1000,
            synonyms: true,
        }
    }
}

impl WorldConfig {
    /// A world that is written in a second or two: 40 clean, 200 web (shards of 100),
    /// 30 test images.
    pub fn small() -> Self {
        Self {
            clean_images: 40,
            web_images: 200,
            test_images: 30,
            shard_size: 100,
            ..Self::default()
        }
    }

    /// Checks the ranges documented on the fields.
    pub fn validate(&self) -> Result<(), WorldError> {
        let bad = |m: String| Err(WorldError::InvalidConfig(m));
        if !(64..=96).contains(&self.image_size) {
            return bad(format!("image_size {} is outside 64..=96", self.image_size));
        }
        if !(0.0..=1.0).contains(&self.noise_rate) {
            return bad(format!("noise_rate {} is outside [0, 1]", self.noise_rate));
        }
        let weights = self.noise_mix.weights();
        if weights.iter().any(|(_, w)| !w.is_finite() || *w < 0.0) {
            return bad(format!(
                "noise_mix {:?} has a negative or non-finite weight",
                self.noise_mix
            ));
        }
        if self.noise_rate > 0.0 && weights.iter().all(|(_, w)| *w == 0.0) {
            return bad("noise_mix is all zero but noise_rate is positive".into());
        }
        for (name, n) in [
            ("clean_captions_per_image", self.clean_captions_per_image),
            ("test_captions_per_image", self.test_captions_per_image),
        ] {
            if !(1..=20).contains(&n) {
                return bad(format!("{name} {n} is outside 1..=20"));
            }
        }
        if self.shard_size == 0 {
            return bad("shard_size is 0".into());
        }
        // Checked before `generate` sizes its per-split records by these counts.
        let images = self
            .clean_images
            .checked_add(self.web_images)
            .and_then(|n| n.checked_add(self.test_images));
        if images.is_none_or(|n| n > MAX_IMAGES) {
            return bad(format!(
                "clean_images + web_images + test_images ({} + {} + {}) is over {MAX_IMAGES}",
                self.clean_images, self.web_images, self.test_images
            ));
        }
        Ok(())
    }

    /// First scene index of each split: clean, web, test (scene indices are global, so
    /// no image appears in two splits).
    pub fn first_indices(&self) -> [u64; 3] {
        let clean = 0u64;
        let web = clean + self.clean_images as u64;
        let test = web + self.web_images as u64;
        [clean, web, test]
    }
}

/// An entry of `clean.json` / `web.json` (BLIP's pre-training annotation format).
///
/// ```
/// use blip_world::{Annotation, WorldConfig, generate};
///
/// let dir = tempfile::tempdir()?;
/// let config = WorldConfig { clean_images: 2, web_images: 4, test_images: 1, shard_size: 2, ..WorldConfig::small() };
/// generate(&config, dir.path())?;
/// let clean: Vec<Annotation> = serde_json::from_slice(&std::fs::read(dir.path().join("clean.json"))?)?;
/// assert_eq!(clean.len(), config.clean_images * config.clean_captions_per_image);
/// assert!(clean.iter().all(|a| dir.path().join(&a.image).is_file()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    /// Image path relative to the world directory.
    pub image: String,
    /// The text.
    pub caption: String,
}

/// An entry of `test.json`: an image and all its reference captions.
///
/// ```
/// use blip_world::{TestAnnotation, WorldConfig, caption_mentions, generate, image_index, scene};
///
/// let dir = tempfile::tempdir()?;
/// let config = WorldConfig { clean_images: 2, web_images: 4, test_images: 1, shard_size: 2, ..WorldConfig::small() };
/// generate(&config, dir.path())?;
/// let test: Vec<TestAnnotation> = serde_json::from_slice(&std::fs::read(dir.path().join("test.json"))?)?;
/// assert_eq!(test[0].caption.len(), config.test_captions_per_image);
/// let s = scene(config.seed, image_index(&test[0].image).unwrap(), config.image_size);
/// assert!(test[0].caption.iter().all(|c| caption_mentions(&s, c).is_exact()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestAnnotation {
    /// Image path relative to the world directory.
    pub image: String,
    /// The correct captions.
    pub caption: Vec<String>,
}

/// A line of `web_labels.jsonl`: a web text and the truth about it.
///
/// ```
/// use blip_world::{NoiseKind, WebLabel, WorldConfig, generate};
///
/// let dir = tempfile::tempdir()?;
/// let config = WorldConfig { clean_images: 2, web_images: 4, test_images: 1, shard_size: 2, ..WorldConfig::small() };
/// generate(&config, dir.path())?;
/// let labels = std::fs::read_to_string(dir.path().join("web_labels.jsonl"))?;
/// let labels: Vec<WebLabel> = labels.lines().map(|line| serde_json::from_str(line)).collect::<Result<_, _>>()?;
/// assert_eq!(labels.len(), config.web_images);
/// for label in &labels {
///     assert_eq!(label.noisy, label.noise != NoiseKind::None);
///     assert_eq!(label.attribute.is_some(), label.noise == NoiseKind::WrongAttribute);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebLabel {
    /// Image path relative to the world directory.
    pub image: String,
    /// The web text, as in `web.json`.
    pub caption: String,
    /// Whether the text is noise (`noise != none`).
    pub noisy: bool,
    /// What kind of text it is.
    pub noise: NoiseKind,
    /// For `wrong_attribute`: the attribute that was swapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<AttributeKind>,
    /// For `other_image`: the image the caption was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A line of `test_attributes.jsonl`: a test image's ground truth.
///
/// ```
/// use blip_world::{TestRecord, WorldConfig, generate, image_index, scene};
///
/// let dir = tempfile::tempdir()?;
/// let config = WorldConfig { clean_images: 2, web_images: 4, test_images: 1, shard_size: 2, ..WorldConfig::small() };
/// generate(&config, dir.path())?;
/// let lines = std::fs::read_to_string(dir.path().join("test_attributes.jsonl"))?;
/// let record: TestRecord = serde_json::from_str(lines.lines().next().unwrap())?;
/// assert_eq!(image_index(&record.image), Some(record.index));
/// assert_eq!(&record.attributes, scene(config.seed, record.index, config.image_size).attributes());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestRecord {
    /// Image path relative to the world directory.
    pub image: String,
    /// Scene index (`scene(seed, index, image_size)` rebuilds it).
    pub index: u64,
    /// Background, objects and relations.
    #[serde(flatten)]
    pub attributes: SceneAttributes,
}

/// Counts of what [`generate`] wrote.
///
/// ```
/// use blip_world::{WorldConfig, generate};
///
/// let dir = tempfile::tempdir()?;
/// let config = WorldConfig { clean_images: 2, web_images: 4, test_images: 1, shard_size: 2, ..WorldConfig::small() };
/// let summary = generate(&config, dir.path())?;
/// assert_eq!(summary.web_noisy, 2); // 50 % of 4 web texts
/// assert_eq!(summary.noise.values().sum::<usize>(), config.web_images);
/// assert_eq!((summary.shards, summary.test_captions), (2, 5));
/// assert!(summary.files.iter().any(|f| f == "world.json"));
/// assert!(summary.to_string().starts_with("clean: 2 images, 4 pairs"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorldSummary {
    /// Images of the clean split.
    pub clean_images: usize,
    /// Entries of `clean.json`.
    pub clean_pairs: usize,
    /// Images (and texts) of the web split.
    pub web_images: usize,
    /// Noisy web texts.
    pub web_noisy: usize,
    /// Web texts by kind (every kind listed, zeros included).
    pub noise: BTreeMap<NoiseKind, usize>,
    /// Images of the test split.
    pub test_images: usize,
    /// Reference captions over all test images.
    pub test_captions: usize,
    /// WebDataset shards written.
    pub shards: usize,
    /// Every file written, relative to the output directory, images excluded.
    pub files: Vec<String>,
}

impl fmt::Display for WorldSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "clean: {} images, {} pairs",
            self.clean_images, self.clean_pairs
        )?;
        let rate = if self.web_images == 0 {
            0.0
        } else {
            100.0 * self.web_noisy as f64 / self.web_images as f64
        };
        write!(
            f,
            "web:   {} images, {} noisy ({rate:.1} %):",
            self.web_images, self.web_noisy
        )?;
        for (kind, n) in &self.noise {
            write!(f, " {}={n}", kind.name())?;
        }
        writeln!(f, "; {} shards", self.shards)?;
        write!(
            f,
            "test:  {} images, {} captions",
            self.test_images, self.test_captions
        )
    }
}

/// Why [`generate`] failed.
///
/// ```
/// use blip_world::{WorldConfig, WorldError, generate};
///
/// let config = WorldConfig { image_size: 32, ..WorldConfig::small() };
/// // The config is checked before anything is written.
/// let err = generate(&config, std::path::Path::new("not-written")).unwrap_err();
/// assert!(matches!(err, WorldError::InvalidConfig(_)));
/// assert_eq!(err.to_string(), "invalid world config: image_size 32 is outside 64..=96");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// A setting is out of range.
    #[error("invalid world config: {0}")]
    InvalidConfig(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Encoding a PNG failed.
    #[error("encoding {}: {source}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: image::ImageError,
    },
    /// Serialising JSON failed.
    #[error("writing {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> WorldError + '_ {
    move |source| WorldError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` atomically (a reader sees the old file or the whole new one). Not fsynced:
/// every file is regenerated byte for byte from the config.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WorldError> {
    blip_core::fs::write_atomic_unsynced(path, |out| out.write_all(bytes)).map_err(|e| {
        WorldError::Io {
            path: e.path,
            source: e.source,
        }
    })
}

/// The relative path of image `index` of `split` ("clean", "web" or "test").
///
/// ```
/// use blip_world::{image_index, image_path};
///
/// assert_eq!(image_path("web", 512), "images/web/000512.png");
/// assert_eq!(image_index(&image_path("test", 7)), Some(7));
/// ```
pub fn image_path(split: &str, index: u64) -> String {
    format!("images/{split}/{index:06}.png")
}

/// The scene index of an image path written by [`generate`] (`images/web/000512.png` →
/// 512), `None` for other paths.
///
/// ```
/// use blip_world::image_index;
///
/// assert_eq!(image_index("images/web/000512.png"), Some(512));
/// assert_eq!(image_index("images/web/cat.jpg"), None);
/// ```
pub fn image_index(path: &str) -> Option<u64> {
    let name = path.rsplit('/').next()?;
    name.strip_suffix(".png")?.parse().ok()
}

fn png(img: &image::RgbImage, path: &Path) -> Result<Vec<u8>, WorldError> {
    let mut bytes = Vec::new();
    PngEncoder::new(&mut bytes)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|source| WorldError::Image {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes)
}

fn json_array<T: Serialize>(items: &[T], path: &Path) -> Result<Vec<u8>, WorldError> {
    let err = |source| WorldError::Json {
        path: path.to_path_buf(),
        source,
    };
    if items.is_empty() {
        return Ok(b"[]\n".to_vec());
    }
    let mut out = b"[\n".to_vec();
    for (k, item) in items.iter().enumerate() {
        if k > 0 {
            out.extend_from_slice(b",\n");
        }
        serde_json::to_writer(&mut out, item).map_err(err)?;
    }
    out.extend_from_slice(b"\n]\n");
    Ok(out)
}

fn json_lines<T: Serialize>(items: &[T], path: &Path) -> Result<Vec<u8>, WorldError> {
    let mut out = Vec::new();
    for item in items {
        serde_json::to_writer(&mut out, item).map_err(|source| WorldError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Which noise kind each web text gets: exactly `round(rate · n)` noisy texts, split among
/// the kinds by largest remainder, in a seeded random order.
fn assign_noise(config: &WorldConfig) -> Vec<NoiseKind> {
    let n = config.web_images;
    let noisy = ((config.noise_rate * n as f64).round() as usize).min(n);
    let weights = config.noise_mix.weights();
    let total: f64 = weights.iter().map(|(_, w)| w).sum();
    let mut kinds = Vec::with_capacity(n);
    if noisy > 0 && total > 0.0 {
        let exact: Vec<f64> = weights
            .iter()
            .map(|(_, w)| noisy as f64 * w / total)
            .collect();
        let mut quota: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
            rb.total_cmp(&ra).then(a.cmp(&b))
        });
        let mut left = noisy - quota.iter().sum::<usize>();
        for &k in order.iter().cycle() {
            if left == 0 {
                break;
            }
            if weights[k].1 > 0.0 {
                quota[k] += 1;
                left -= 1;
            }
        }
        for ((kind, _), q) in weights.iter().zip(quota) {
            kinds.extend(std::iter::repeat_n(*kind, q));
        }
    }
    kinds.resize(n, NoiseKind::None);
    crate::stream(config.seed, &[STREAM_NOISE]).shuffle(&mut kinds);
    kinds
}

/// The web text of web image `index` given its assigned noise kind, and its label.
fn web_text(
    config: &WorldConfig,
    index: u64,
    attrs: &SceneAttributes,
    kind: NoiseKind,
) -> (String, NoiseKind, Option<AttributeKind>, Option<String>) {
    let mut rng = crate::stream(config.seed, &[STREAM_WEB, index]);
    let correct =
        |rng: &mut SplitMix64| caption::random_plan(attrs, rng).render_worded(config.synonyms);
    match kind {
        NoiseKind::None => (correct(&mut rng), kind, None, None),
        NoiseKind::Truncated => {
            let text = correct(&mut rng);
            (caption::truncate(&text, &mut rng), kind, None, None)
        }
        NoiseKind::Unrelated => (caption::unrelated(&mut rng), kind, None, None),
        NoiseKind::WrongAttribute => {
            match caption::wrong_attribute(attrs, &mut rng, config.synonyms) {
                Some((text, attribute)) => (text, kind, Some(attribute), None),
                None => {
                    let text = correct(&mut rng);
                    (
                        caption::truncate(&text, &mut rng),
                        NoiseKind::Truncated,
                        None,
                        None,
                    )
                }
            }
        }
        NoiseKind::OtherImage => {
            let [_, first_web, _] = config.first_indices();
            let n = config.web_images;
            if n >= 2 {
                for _ in 0..64 {
                    let offset = 1 + rng.below(n - 1) as u64;
                    let other = first_web + (index - first_web + offset) % n as u64;
                    let other_scene = scene(config.seed, other, config.image_size);
                    let text = caption::random_plan(other_scene.attributes(), &mut rng)
                        .render_worded(config.synonyms);
                    // Skip captions that happen to be right for this image too.
                    if !caption_mentions(attrs, &text).is_exact() {
                        return (text, kind, None, Some(image_path("web", other)));
                    }
                }
            }
            (
                caption::unrelated(&mut rng),
                NoiseKind::Unrelated,
                None,
                None,
            )
        }
    }
}

/// Writes one WebDataset shard (img2dataset's layout: `key.png`, `key.txt`, `key.json` per
/// sample, fixed metadata so that the bytes are reproducible).
fn shard_bytes(
    samples: &[(String, Vec<u8>, String)],
    image_size: u32,
    path: &Path,
) -> Result<Vec<u8>, WorldError> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut append = |name: String, data: &[u8]| -> Result<(), WorldError> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, data)
            .map_err(io_error(path))
    };
    for (key, png, caption) in samples {
        append(format!("{key}.png"), png)?;
        append(format!("{key}.txt"), caption.as_bytes())?;
        let meta = json!({
            "url": format!("https://blip-world.invalid/{key}.png"),
            "caption": caption,
            "key": key,
            "status": "success",
            "error_message": null,
            "width": image_size,
            "height": image_size,
            "original_width": image_size,
            "original_height": image_size,
        });
        let meta = serde_json::to_vec(&meta).map_err(|source| WorldError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        append(format!("{key}.json"), &meta)?;
    }
    builder.into_inner().map_err(io_error(path))
}

/// Writes the world described by `config` under `out` (created if missing):
///
/// * `images/{clean,web,test}/NNNNNN.png` — the images (scene index in the name);
/// * `clean.json`, `web.json` — `[{"image", "caption"}]`, one entry per text;
/// * `test.json` — `[{"image", "caption": [...]}]`;
/// * `web_labels.jsonl` — the truth about each web text ([`WebLabel`]), for evaluation;
/// * `test_attributes.jsonl` — each test image's scene ([`TestRecord`]);
/// * `web-shards/00000.tar …` — the web split as WebDataset shards (stale higher-numbered
///   shards of an earlier, larger world are removed);
/// * `world.json` — the config, split index ranges, counts and vocabulary (written last).
///
/// Each file is written to a temporary name and renamed into place. The same config gives
/// byte-identical files.
///
/// ```
/// use blip_world::{WorldConfig, generate};
///
/// let config = WorldConfig { clean_images: 2, web_images: 4, test_images: 1, shard_size: 2, ..WorldConfig::small() };
/// let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
/// let summary = generate(&config, a.path())?;
/// generate(&config, b.path())?;
/// assert!(a.path().join("web-shards/00001.tar").is_file());
/// // The same config writes the same bytes.
/// for file in &summary.files {
///     assert_eq!(std::fs::read(a.path().join(file))?, std::fs::read(b.path().join(file))?);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn generate(config: &WorldConfig, out: &Path) -> Result<WorldSummary, WorldError> {
    config.validate()?;
    for dir in ["images/clean", "images/web", "images/test", "web-shards"] {
        let dir = out.join(dir);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    }
    let [first_clean, first_web, first_test] = config.first_indices();
    let size = config.image_size;
    let write_image =
        |split: &str, index: u64, attrs: &crate::Scene| -> Result<(String, Vec<u8>), WorldError> {
            let rel = image_path(split, index);
            let path = out.join(&rel);
            let bytes = png(&attrs.render(), &path)?;
            write_atomic(&path, &bytes)?;
            Ok((rel, bytes))
        };

    // Clean split.
    let mut clean = Vec::new();
    for index in first_clean..first_web {
        let s = scene(config.seed, index, size);
        let (rel, _) = write_image("clean", index, &s)?;
        let mut rng = crate::stream(config.seed, &[STREAM_CLEAN, index]);
        for caption in s.captions_worded(&mut rng, config.clean_captions_per_image, config.synonyms)
        {
            clean.push(Annotation {
                image: rel.clone(),
                caption,
            });
        }
    }

    // Web split.
    let kinds = assign_noise(config);
    let mut web = Vec::with_capacity(config.web_images);
    let mut labels = Vec::with_capacity(config.web_images);
    let mut samples = Vec::with_capacity(config.web_images);
    let mut noise: BTreeMap<NoiseKind, usize> = NoiseKind::ALL.iter().map(|k| (*k, 0)).collect();
    for (k, index) in (first_web..first_test).enumerate() {
        let s = scene(config.seed, index, size);
        let (rel, bytes) = write_image("web", index, &s)?;
        let (caption, kind, attribute, source) = web_text(config, index, s.attributes(), kinds[k]);
        *noise.entry(kind).or_insert(0) += 1;
        web.push(Annotation {
            image: rel.clone(),
            caption: caption.clone(),
        });
        labels.push(WebLabel {
            image: rel,
            caption: caption.clone(),
            noisy: kind != NoiseKind::None,
            noise: kind,
            attribute,
            source,
        });
        samples.push((bytes, caption));
    }

    // Test split.
    let mut test = Vec::new();
    let mut test_records = Vec::new();
    for index in first_test..first_test + config.test_images as u64 {
        let s = scene(config.seed, index, size);
        let (rel, _) = write_image("test", index, &s)?;
        let mut rng = crate::stream(config.seed, &[STREAM_TEST, index]);
        test.push(TestAnnotation {
            image: rel.clone(),
            caption: s.captions_worded(&mut rng, config.test_captions_per_image, config.synonyms),
        });
        test_records.push(TestRecord {
            image: rel,
            index,
            attributes: s.attributes().clone(),
        });
    }

    let mut files = Vec::new();
    let mut put = |name: &str, bytes: Vec<u8>| -> Result<(), WorldError> {
        write_atomic(&out.join(name), &bytes)?;
        files.push(name.to_string());
        Ok(())
    };
    put("clean.json", json_array(&clean, &out.join("clean.json"))?)?;
    put("web.json", json_array(&web, &out.join("web.json"))?)?;
    put("test.json", json_array(&test, &out.join("test.json"))?)?;
    put(
        "web_labels.jsonl",
        json_lines(&labels, &out.join("web_labels.jsonl"))?,
    )?;
    put(
        "test_attributes.jsonl",
        json_lines(&test_records, &out.join("test_attributes.jsonl"))?,
    )?;

    // WebDataset shards; keys as img2dataset makes them: shard number then sample number.
    let digits = (config.shard_size.saturating_sub(1))
        .max(1)
        .to_string()
        .len();
    let mut shards = Vec::new();
    for (shard, chunk) in samples.chunks(config.shard_size).enumerate() {
        let name = format!("web-shards/{shard:05}.tar");
        let keyed: Vec<(String, Vec<u8>, String)> = chunk
            .iter()
            .enumerate()
            .map(|(i, (png, caption))| {
                (
                    format!("{shard:05}{i:0digits$}"),
                    png.clone(),
                    caption.clone(),
                )
            })
            .collect();
        let path = out.join(&name);
        put(&name, shard_bytes(&keyed, size, &path)?)?;
        shards.push(name);
    }
    // A smaller world written over a larger one must not leave its extra shards behind.
    let shard_dir = out.join("web-shards");
    for entry in fs::read_dir(&shard_dir).map_err(io_error(&shard_dir))? {
        let entry = entry.map_err(io_error(&shard_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let numbered = name
            .strip_suffix(".tar")
            .is_some_and(|stem| stem.len() == 5 && stem.bytes().all(|b| b.is_ascii_digit()));
        if numbered && !shards.contains(&format!("web-shards/{name}")) {
            fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
        }
    }

    let summary = WorldSummary {
        clean_images: config.clean_images,
        clean_pairs: clean.len(),
        web_images: config.web_images,
        web_noisy: config.web_images - noise[&NoiseKind::None],
        noise,
        test_images: config.test_images,
        test_captions: test.iter().map(|t| t.caption.len()).sum(),
        shards: shards.len(),
        files: {
            let mut f = files.clone();
            f.push("world.json".into());
            f
        },
    };
    let words = |list: Vec<&'static [&'static str]>| -> Vec<&'static str> { list.concat() };
    let world = json!({
        "generator": "blip-world",
        "version": env!("CARGO_PKG_VERSION"),
        "config": config,
        "splits": {
            "clean": {"first_index": first_clean, "images": config.clean_images, "annotation": "clean.json"},
            "web": {"first_index": first_web, "images": config.web_images, "annotation": "web.json",
                    "labels": "web_labels.jsonl", "shards": shards},
            "test": {"first_index": first_test, "images": config.test_images, "annotation": "test.json",
                     "attributes": "test_attributes.jsonl"},
        },
        "summary": &summary,
        "vocabulary": {
            "shapes": words(Shape::ALL.iter().map(|v| v.words()).collect()),
            "colours": words(Colour::ALL.iter().map(|v| v.words()).collect()),
            "sizes": words(Size::ALL.iter().map(|v| v.words()).collect()),
            "positions": words(Position::ALL.iter().map(|v| v.phrases()).collect()),
            "relations": words(Relation::ALL.iter().map(|v| v.phrases()).collect()),
            "backgrounds": words(Background::ALL.iter().map(|v| v.words()).collect()),
            "textures": words(Texture::ALL.iter().map(|v| v.words()).collect()),
        },
    });
    let path = out.join("world.json");
    let mut bytes = serde_json::to_vec_pretty(&world).map_err(|source| WorldError::Json {
        path: path.clone(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(&path, &bytes)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_assignment_is_exact() {
        let config = WorldConfig {
            web_images: 1001,
            ..WorldConfig::default()
        };
        let kinds = assign_noise(&config);
        assert_eq!(kinds.len(), 1001);
        let count = |k| kinds.iter().filter(|x| **x == k).count();
        // round(0.5 · 1001) = 501, split 0.4 / 0.2 / 0.3 / 0.1 by largest remainder.
        assert_eq!(1001 - count(NoiseKind::None), 501);
        assert_eq!(count(NoiseKind::OtherImage), 201);
        assert_eq!(count(NoiseKind::WrongAttribute), 100);
        assert_eq!(count(NoiseKind::Unrelated), 150);
        assert_eq!(count(NoiseKind::Truncated), 50);
        assert_eq!(kinds, assign_noise(&config));
        let only = WorldConfig {
            web_images: 10,
            noise_rate: 1.0,
            noise_mix: NoiseMix {
                other_image: 0.0,
                wrong_attribute: 0.0,
                unrelated: 1.0,
                truncated: 0.0,
            },
            ..WorldConfig::default()
        };
        assert!(
            assign_noise(&only)
                .iter()
                .all(|k| *k == NoiseKind::Unrelated)
        );
    }

    #[test]
    fn image_paths_round_trip() {
        assert_eq!(image_path("web", 512), "images/web/000512.png");
        assert_eq!(image_index("images/web/000512.png"), Some(512));
        assert_eq!(image_index("images/web/x.jpg"), None);
    }

    #[test]
    fn config_validation() {
        assert!(WorldConfig::default().validate().is_ok());
        let full = WorldConfig::default();
        let at_limit = WorldConfig {
            web_images: MAX_IMAGES - full.clean_images - full.test_images,
            ..full
        };
        assert!(at_limit.validate().is_ok());
        for bad in [
            WorldConfig {
                image_size: 63,
                ..WorldConfig::default()
            },
            WorldConfig {
                image_size: 97,
                ..WorldConfig::default()
            },
            WorldConfig {
                noise_rate: 1.5,
                ..WorldConfig::default()
            },
            WorldConfig {
                shard_size: 0,
                ..WorldConfig::default()
            },
            WorldConfig {
                clean_captions_per_image: 0,
                ..WorldConfig::default()
            },
            WorldConfig {
                web_images: MAX_IMAGES,
                ..WorldConfig::default()
            },
            WorldConfig {
                web_images: usize::MAX,
                ..WorldConfig::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(WorldError::InvalidConfig(_))));
        }
    }
}
