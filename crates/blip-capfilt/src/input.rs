//! Inputs: BLIP annotation files (JSON array or JSON lines) and WebDataset tar shards,
//! enumerated as samples in one deterministic order (the ordinals that sharding and
//! chunking are defined on).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde::de::{Deserializer as _, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, SkipKind};

/// Largest image member or file read into memory; bigger ones are skipped (a data set
/// image is kilobytes, so this only stops pathological inputs).
const MAX_IMAGE_BYTES: u64 = 256 << 20;
/// Largest caption member (`.txt` / `.json`) read from a tar.
const MAX_TEXT_BYTES: u64 = 1 << 20;
/// Largest number of paths one brace pattern may expand to (guards against typos such
/// as `{0..99999999}`).
const MAX_EXPANSION: usize = 10_000_000;

/// Member extensions taken as the sample's image (lower-cased before matching).
const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pnm", "tga", "qoi",
];

/// Expands shell-style brace patterns as WebDataset does: `{a,b}` alternatives and
/// `{00..09}` numeric ranges (zero-padded to the longer bound when a bound has a leading
/// zero); several braces give their cartesian product, left to right.
///
/// ```
/// assert_eq!(
///     blip_capfilt::expand_braces("s/{08..10}.tar").unwrap(),
///     ["s/08.tar", "s/09.tar", "s/10.tar"]
/// );
/// ```
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, Error> {
    let invalid = |reason: String| Error::Input {
        input: pattern.to_string(),
        reason,
    };
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(invalid("'}' without '{'".into()));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let prefix = &pattern[..open];
    if prefix.contains('}') {
        return Err(invalid("'}' without '{'".into()));
    }
    let rest = &pattern[open + 1..];
    let close = rest
        .find('}')
        .ok_or_else(|| invalid("'{' without '}'".into()))?;
    let body = &rest[..close];
    if body.contains('{') {
        return Err(invalid("nested braces are not supported".into()));
    }
    let alternatives: Vec<String> = if body.contains(',') {
        body.split(',').map(str::to_string).collect()
    } else if let Some((from, to)) = body.split_once("..") {
        let parse = |s: &str| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(format!(
                    "{{{body}}}: range bounds must be decimal numbers"
                )));
            }
            s.parse::<u64>()
                .map_err(|_| invalid(format!("{{{body}}}: bound {s} is too large")))
        };
        let (a, b) = (parse(from)?, parse(to)?);
        if a > b {
            return Err(invalid(format!("{{{body}}}: descending range")));
        }
        if b - a >= MAX_EXPANSION as u64 {
            return Err(invalid(format!(
                "{{{body}}}: more than {MAX_EXPANSION} paths"
            )));
        }
        let padded = |s: &str| s.len() > 1 && s.starts_with('0');
        let width = if padded(from) || padded(to) {
            from.len().max(to.len())
        } else {
            0
        };
        (a..=b).map(|n| format!("{n:0width$}")).collect()
    } else {
        return Err(invalid(format!(
            "{{{body}}}: expected a list {{a,b}} or a range {{00..09}}"
        )));
    };
    let suffixes = expand_braces(&rest[close + 1..])?;
    if alternatives.len().saturating_mul(suffixes.len()) > MAX_EXPANSION {
        return Err(invalid(format!(
            "expands to more than {MAX_EXPANSION} paths"
        )));
    }
    let mut out = Vec::with_capacity(alternatives.len() * suffixes.len());
    for alternative in &alternatives {
        for suffix in &suffixes {
            out.push(format!("{prefix}{alternative}{suffix}"));
        }
    }
    Ok(out)
}

/// An input file and its size, recorded in `run.json` so that a restart notices a changed
/// input (whose ordinals would no longer match the committed chunks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InputFile {
    pub path: String,
    pub bytes: u64,
}

/// A resolved `--input`.
#[derive(Debug)]
pub(crate) enum Input {
    /// A BLIP annotation file; image paths are relative to `root`.
    Json {
        path: PathBuf,
        root: PathBuf,
        lines: bool,
    },
    /// WebDataset shards in input order, with their file stems (the `images/<stem>/`
    /// directories of the output).
    Tars {
        paths: Vec<PathBuf>,
        stems: Vec<String>,
    },
}

/// Why a sample cannot be used, for its skipped record.
pub(crate) type Skip = (SkipKind, String);

/// Where a sample's image bytes are.
#[derive(Debug, Clone)]
pub(crate) enum ImageSource {
    File(PathBuf),
    TarMember {
        tar: usize,
        offset: u64,
        size: u64,
    },
    /// Known unusable before reading anything.
    Invalid {
        kind: SkipKind,
        reason: String,
    },
}

/// One image with its web texts.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// Position in the deterministic input order.
    pub ordinal: u64,
    /// The `image` path of the output records.
    pub image: String,
    pub web_texts: Vec<String>,
    pub source: ImageSource,
}

/// Whether enumeration goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

impl Input {
    /// Resolves `--input`: a JSON / JSON lines file, one `.tar`, a directory of `.tar`
    /// files (sorted by name) or a brace pattern of `.tar` paths.
    pub fn resolve(spec: &str, image_root: Option<&Path>) -> Result<Input, Error> {
        let invalid = |reason: String| Error::Input {
            input: spec.to_string(),
            reason,
        };
        if spec.contains('{') || spec.contains('}') {
            let paths: Vec<PathBuf> = expand_braces(spec)?
                .into_iter()
                .map(PathBuf::from)
                .collect();
            for path in &paths {
                if !is_tar(path) {
                    return Err(invalid(format!(
                        "{}: brace patterns must name .tar files",
                        path.display()
                    )));
                }
                match std::fs::metadata(path) {
                    Ok(meta) if meta.is_file() => {}
                    Ok(_) => return Err(not_regular(spec, path)),
                    Err(_) => {
                        return Err(invalid(format!("{}: no such tar file", path.display())));
                    }
                }
            }
            return Input::tars(spec, paths);
        }
        let path = PathBuf::from(spec);
        let meta = std::fs::metadata(&path).map_err(Error::io(&path))?;
        if meta.is_dir() {
            let mut paths = Vec::new();
            for entry in std::fs::read_dir(&path).map_err(Error::io(&path))? {
                let entry = entry.map_err(Error::io(&path))?;
                let p = entry.path();
                if !is_tar(&p) {
                    continue;
                }
                // A shard that cannot be read is an error, not a silently smaller data set.
                if !std::fs::metadata(&p).map_err(Error::io(&p))?.is_file() {
                    return Err(not_regular(spec, &p));
                }
                paths.push(p);
            }
            if paths.is_empty() {
                return Err(invalid("directory holds no .tar file".into()));
            }
            // File-name order is the deterministic input order every shard agrees on.
            paths.sort();
            return Input::tars(spec, paths);
        }
        // Checked before opening: opening a FIFO blocks until a writer comes.
        if !meta.is_file() {
            return Err(not_regular(spec, &path));
        }
        if is_tar(&path) {
            return Input::tars(spec, vec![path]);
        }
        let lines = match first_byte(&path)? {
            Some(b'[') => false,
            Some(b'{') => true,
            Some(_) => {
                return Err(invalid(
                    "neither a .tar, a directory, a JSON array nor JSON lines".into(),
                ));
            }
            None => return Err(invalid("empty file".into())),
        };
        let root = match image_root {
            Some(root) => root.to_path_buf(),
            None => match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            },
        };
        Ok(Input::Json { path, root, lines })
    }

    fn tars(spec: &str, paths: Vec<PathBuf>) -> Result<Input, Error> {
        let mut stems = Vec::with_capacity(paths.len());
        let mut seen = HashMap::new();
        for path in &paths {
            let name = path.file_name().unwrap_or_default();
            // The stem names the images/<stem>/ directory that annotations point into.
            let Some(name) = name.to_str() else {
                return Err(Error::NonUtf8Path {
                    path: path.clone(),
                    what: "a tar file name (its stem names the images/<stem>/ directory)",
                });
            };
            let stem = name
                .strip_suffix(".tar")
                .map(str::to_string)
                .unwrap_or_default();
            // The stem names a directory under images/.
            if stem.is_empty() || stem == "." || stem == ".." {
                return Err(Error::Input {
                    input: spec.into(),
                    reason: format!("{}: unusable tar file stem {stem:?}", path.display()),
                });
            }
            // Images are written to images/<stem>/, so two shards with one stem would collide.
            if let Some(other) = seen.insert(stem.clone(), path) {
                return Err(Error::Input {
                    input: spec.into(),
                    reason: format!(
                        "{} and {} have the same file stem {stem:?}",
                        other.display(),
                        path.display()
                    ),
                });
            }
            stems.push(stem);
        }
        Ok(Input::Tars { paths, stems })
    }

    /// `"json"`, `"json_lines"` or `"tar"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Json { lines: false, .. } => "json",
            Input::Json { lines: true, .. } => "json_lines",
            Input::Tars { .. } => "tar",
        }
    }

    /// The image root recorded for JSON inputs (tar outputs are relative to the output).
    pub fn image_root(&self) -> Option<&Path> {
        match self {
            Input::Json { root, .. } => Some(root),
            Input::Tars { .. } => None,
        }
    }

    /// The input files with their sizes.
    pub fn files(&self) -> Result<Vec<InputFile>, Error> {
        let paths: Vec<&PathBuf> = match self {
            Input::Json { path, .. } => vec![path],
            Input::Tars { paths, .. } => paths.iter().collect(),
        };
        paths
            .into_iter()
            .map(|p| {
                let bytes = std::fs::metadata(p).map_err(Error::io(p))?.len();
                let path = p.to_str().ok_or_else(|| Error::NonUtf8Path {
                    path: p.clone(),
                    what: "an input file (recorded in run.json)",
                })?;
                Ok(InputFile {
                    path: path.to_string(),
                    bytes,
                })
            })
            .collect()
    }

    /// Calls `f` with every sample in input order until it returns [`Flow::Stop`].
    pub fn for_each(&self, f: &mut dyn FnMut(Sample) -> Result<Flow, Error>) -> Result<(), Error> {
        let mut ordinal = 0u64;
        match self {
            Input::Json { path, root, lines } => {
                let mut record = |location: &dyn Fn() -> String, value: Value| {
                    let sample = json_sample(path, root, ordinal, location, value)?;
                    ordinal += 1;
                    f(sample)
                };
                if *lines {
                    for_each_line(path, &mut record)
                } else {
                    for_each_element(path, &mut record)
                }
            }
            Input::Tars { paths, stems } => {
                for (tar, (path, stem)) in paths.iter().zip(stems).enumerate() {
                    for entry in index_tar(path)? {
                        let sample = tar_sample(tar, stem, ordinal, entry);
                        ordinal += 1;
                        if f(sample)? == Flow::Stop {
                            return Ok(());
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Reads a sample's image bytes; per-image failures are skip reasons, not errors.
    pub fn read_image(
        &self,
        source: &ImageSource,
        open: &mut HashMap<usize, File>,
    ) -> Result<Vec<u8>, Skip> {
        match source {
            ImageSource::Invalid { kind, reason } => Err((*kind, reason.clone())),
            ImageSource::File(path) => {
                let unreadable = |e: std::io::Error| {
                    let kind = if e.kind() == std::io::ErrorKind::NotFound {
                        SkipKind::Missing
                    } else {
                        SkipKind::Unreadable
                    };
                    (kind, format!("{}: {e}", path.display()))
                };
                // Refuses a FIFO unopened: opening one blocks until a writer comes.
                let file = blip_core::open_file(path).map_err(|e| match e {
                    blip_core::Error::Io { source, .. } => unreadable(source),
                    other => (SkipKind::Unreadable, other.to_string()),
                })?;
                let size = file.metadata().map_err(unreadable)?.len();
                if size > MAX_IMAGE_BYTES {
                    return Err((
                        SkipKind::Unreadable,
                        format!(
                            "{}: {size} bytes, over the {MAX_IMAGE_BYTES} limit",
                            path.display()
                        ),
                    ));
                }
                let mut bytes = Vec::with_capacity(size as usize);
                BufReader::new(file)
                    .read_to_end(&mut bytes)
                    .map_err(unreadable)?;
                Ok(bytes)
            }
            ImageSource::TarMember { tar, offset, size } => {
                let Input::Tars { paths, .. } = self else {
                    return Err((SkipKind::Unreadable, "tar member of a JSON input".into()));
                };
                let Some(path) = paths.get(*tar) else {
                    return Err((SkipKind::Unreadable, format!("no tar number {tar}")));
                };
                let unreadable =
                    |e: std::io::Error| (SkipKind::Unreadable, format!("{}: {e}", path.display()));
                if *size > MAX_IMAGE_BYTES {
                    return Err((
                        SkipKind::Unreadable,
                        format!("member of {size} bytes, over the {MAX_IMAGE_BYTES} limit"),
                    ));
                }
                let file = match open.entry(*tar) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(File::open(path).map_err(unreadable)?)
                    }
                };
                file.seek(SeekFrom::Start(*offset)).map_err(unreadable)?;
                let mut bytes = vec![0; *size as usize];
                file.read_exact(&mut bytes).map_err(unreadable)?;
                Ok(bytes)
            }
        }
    }
}

fn is_tar(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tar")
}

/// An input path that exists but is not a regular file (or a directory where one is allowed).
fn not_regular(spec: &str, path: &Path) -> Error {
    Error::Input {
        input: spec.to_string(),
        reason: format!(
            "{}: not a regular file (a FIFO, socket, device or directory)",
            path.display()
        ),
    }
}

/// A member name for the outputs: valid UTF-8 as is except `\` written `\\`, invalid
/// bytes as `\xNN`. Reversible, so distinct names stay distinct (no U+FFFD).
fn escape_name(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The first non-whitespace byte (after a UTF-8 BOM), which tells a JSON array from JSON lines.
fn first_byte(path: &Path) -> Result<Option<u8>, Error> {
    let file = File::open(path).map_err(Error::io(path))?;
    let mut reader = BufReader::new(file);
    let mut first = true;
    loop {
        let buf = reader.fill_buf().map_err(Error::io(path))?;
        if buf.is_empty() {
            return Ok(None);
        }
        let mut skip = 0;
        if first && buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
            skip = 3;
        }
        first = false;
        if let Some(&b) = buf[skip..].iter().find(|b| !b.is_ascii_whitespace()) {
            return Ok(Some(b));
        }
        let n = buf.len();
        reader.consume(n);
    }
}

type RecordFn<'a> = dyn FnMut(&dyn Fn() -> String, Value) -> Result<Flow, Error> + 'a;

fn for_each_line(path: &Path, f: &mut RecordFn<'_>) -> Result<(), Error> {
    let file = File::open(path).map_err(Error::io(path))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let location = || format!("line {}", i + 1);
        let line = line.map_err(|e| Error::InvalidRecord {
            path: path.to_path_buf(),
            location: location(),
            reason: e.to_string(),
        })?;
        let line = line.trim_start_matches('\u{feff}');
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| Error::InvalidRecord {
            path: path.to_path_buf(),
            location: location(),
            reason: e.to_string(),
        })?;
        if f(&location, value)? == Flow::Stop {
            break;
        }
    }
    Ok(())
}

/// Streams the elements of a JSON array without holding the array (annotation files of
/// web-scale data sets run to gigabytes).
fn for_each_element(path: &Path, f: &mut RecordFn<'_>) -> Result<(), Error> {
    struct Elements<'a, 'b> {
        f: &'a mut RecordFn<'b>,
        failure: &'a mut Option<Error>,
        stopped: &'a mut bool,
    }
    impl<'de> Visitor<'de> for Elements<'_, '_> {
        type Value = ();
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a JSON array of {\"image\", \"caption\"} objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut index = 0u64;
            while let Some(value) = seq.next_element::<Value>()? {
                let location = || format!("element {index}");
                match (self.f)(&location, value) {
                    Ok(Flow::Continue) => {}
                    // Unwinds the parser; the caller tells this from a syntax error.
                    Ok(Flow::Stop) => {
                        *self.stopped = true;
                        return Err(A::Error::custom("stopped"));
                    }
                    Err(e) => {
                        *self.failure = Some(e);
                        return Err(A::Error::custom("record failed"));
                    }
                }
                index += 1;
            }
            Ok(())
        }
    }
    let file = File::open(path).map_err(Error::io(path))?;
    let mut reader = BufReader::new(file);
    // serde_json rejects a BOM; skip it as `first_byte` did.
    if reader
        .fill_buf()
        .map_err(Error::io(path))?
        .starts_with(&[0xEF, 0xBB, 0xBF])
    {
        reader.consume(3);
    }
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut failure = None;
    let mut stopped = false;
    let result = (&mut de).deserialize_seq(Elements {
        f,
        failure: &mut failure,
        stopped: &mut stopped,
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if stopped {
        return Ok(());
    }
    result
        .and_then(|()| de.end())
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// `{"image": path, "caption": text | [texts] | null | absent, ...other fields ignored}`.
fn json_sample(
    path: &Path,
    root: &Path,
    ordinal: u64,
    location: &dyn Fn() -> String,
    value: Value,
) -> Result<Sample, Error> {
    let invalid = |reason: String| Error::InvalidRecord {
        path: path.to_path_buf(),
        location: location(),
        reason,
    };
    let Value::Object(mut object) = value else {
        return Err(invalid(
            "expected an object {\"image\": ..., \"caption\": ...}".into(),
        ));
    };
    let image = match object.remove("image") {
        Some(Value::String(image)) if !image.is_empty() => image,
        Some(_) => return Err(invalid("\"image\" must be a non-empty string".into())),
        None if object.contains_key("url") => {
            return Err(invalid(
                "no \"image\" field (a \"url\" record: download the images first, e.g. with img2dataset)"
                    .into(),
            ));
        }
        None => return Err(invalid("no \"image\" field".into())),
    };
    let mut web_texts = Vec::new();
    match object.remove("caption") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => web_texts.push(text),
        Some(Value::Array(texts)) => {
            for text in texts {
                match text {
                    Value::String(text) => web_texts.push(text),
                    _ => return Err(invalid("\"caption\" list must hold strings".into())),
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                "\"caption\" must be a string, a list of strings or null".into(),
            ));
        }
    }
    // An empty caption carries nothing to score; the image is still captioned.
    web_texts.retain(|t| !t.trim().is_empty());
    Ok(Sample {
        ordinal,
        source: ImageSource::File(root.join(&image)),
        image,
        web_texts,
    })
}

/// The members of one key in a tar.
#[derive(Debug, Default)]
struct TarEntry {
    /// The member name up to the extension, as bytes: names that are not UTF-8 must not
    /// collide through a lossy conversion.
    key: Vec<u8>,
    /// `(extension as written, offset, size)` of every image member.
    images: Vec<(String, u64, u64)>,
    txt: Option<Result<Vec<u8>, String>>,
    json: Option<Result<Vec<u8>, String>>,
}

/// Reads the headers of a tar (seeking over image data) and the small text members,
/// grouping members by WebDataset key in order of first appearance.
fn index_tar(path: &Path) -> Result<Vec<TarEntry>, Error> {
    let tar_error = |source| Error::Tar {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(Error::io(path))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries: Vec<TarEntry> = Vec::new();
    let mut by_key: HashMap<Vec<u8>, usize> = HashMap::new();
    for entry in archive.entries_with_seek().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path_bytes().into_owned();
        let Some((key, extension)) = split_member_name(&name) else {
            continue;
        };
        // An extension that is not UTF-8 is none of ours.
        let Ok(extension) = std::str::from_utf8(extension) else {
            continue;
        };
        let lower = extension.to_ascii_lowercase();
        let is_image = IMAGE_EXTENSIONS.contains(&lower.as_str());
        if !is_image && lower != "txt" && lower != "json" {
            continue;
        }
        let index = *by_key.entry(key.to_vec()).or_insert_with(|| {
            entries.push(TarEntry {
                key: key.to_vec(),
                ..TarEntry::default()
            });
            entries.len() - 1
        });
        let size = entry.size();
        let target = &mut entries[index];
        if is_image {
            target
                .images
                .push((extension.to_string(), entry.raw_file_position(), size));
            continue;
        }
        let text = if size > MAX_TEXT_BYTES {
            Err(format!(
                "{}: {size} bytes, over the {MAX_TEXT_BYTES} limit",
                escape_name(&name)
            ))
        } else {
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).map_err(tar_error)?;
            Ok(bytes)
        };
        // A repeated member keeps the first copy, as the image rule does for determinism.
        let slot = if lower == "txt" {
            &mut target.txt
        } else {
            &mut target.json
        };
        slot.get_or_insert(text);
    }
    Ok(entries)
}

/// WebDataset's rule: the key is the member path up to the first dot of its file name,
/// the extension everything after it. Leading `./` is dropped. On bytes, as tar names
/// need not be UTF-8.
fn split_member_name(mut name: &[u8]) -> Option<(&[u8], &[u8])> {
    while let Some(rest) = name.strip_prefix(b"./") {
        name = rest;
    }
    let base = name.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    let dot = base + name[base..].iter().position(|&b| b == b'.')?;
    let (key, extension) = (&name[..dot], &name[dot + 1..]);
    if dot == base || extension.is_empty() {
        return None;
    }
    Some((key, extension))
}

fn tar_sample(tar: usize, stem: &str, ordinal: u64, entry: TarEntry) -> Sample {
    let invalid = |image: String, kind, reason: String| Sample {
        ordinal,
        image,
        web_texts: Vec::new(),
        source: ImageSource::Invalid { kind, reason },
    };
    let first_ext = entry.images.first().map(|(ext, _, _)| ext.as_str());
    // The key becomes a path in the JSON outputs: a lossy one would name no file (and two
    // keys could become one), so it is skipped, named with its bytes escaped.
    let key = match std::str::from_utf8(&entry.key) {
        Ok(key) => key,
        Err(_) => {
            let escaped = escape_name(&entry.key);
            let image = match first_ext {
                Some(ext) => format!("{}/{stem}/{escaped}.{ext}", crate::IMAGES_DIR),
                None => format!("{}/{stem}/{escaped}", crate::IMAGES_DIR),
            };
            return invalid(
                image,
                SkipKind::UnsafeKey,
                format!(
                    "key \"{escaped}\" is not valid UTF-8 (invalid bytes shown as \\xNN), so no \
                     output file can be named after it"
                ),
            );
        }
    };
    let image_path = |extension: Option<&str>| match extension {
        Some(ext) => format!("{}/{stem}/{key}.{ext}", crate::IMAGES_DIR),
        None => format!("{}/{stem}/{key}", crate::IMAGES_DIR),
    };
    // The key becomes a path under images/: refuse `..`, absolute paths and the like.
    let safe = Path::new(key)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !safe || key.contains('\\') {
        return invalid(
            image_path(first_ext),
            SkipKind::UnsafeKey,
            format!("key {key:?} is not a plain relative path"),
        );
    }
    let web_text = match (&entry.txt, &entry.json) {
        (Some(Ok(txt)), _) => Ok(Some(String::from_utf8_lossy(txt).trim().to_string())),
        (Some(Err(reason)), _) => Err(reason.clone()),
        (None, Some(Ok(json))) => match serde_json::from_slice::<Value>(json) {
            Ok(value) => Ok(match value.get("caption") {
                Some(Value::String(caption)) => Some(caption.trim().to_string()),
                _ => None,
            }),
            Err(e) => Err(format!("{key}.json: invalid JSON: {e}")),
        },
        (None, Some(Err(reason))) => Err(reason.clone()),
        (None, None) => Ok(None),
    };
    let web_text = match web_text {
        Ok(text) => text.filter(|t| !t.is_empty()),
        Err(reason) => return invalid(image_path(first_ext), SkipKind::BadMetadata, reason),
    };
    match entry.images.as_slice() {
        [] => invalid(
            image_path(None),
            SkipKind::NoImage,
            format!("key {key:?} has no image member"),
        ),
        [(ext, offset, size)] => Sample {
            ordinal,
            image: image_path(Some(ext)),
            web_texts: web_text.into_iter().collect(),
            source: ImageSource::TarMember {
                tar,
                offset: *offset,
                size: *size,
            },
        },
        several => invalid(
            image_path(first_ext),
            SkipKind::AmbiguousImage,
            format!(
                "key {key:?} has {} image members ({})",
                several.len(),
                several
                    .iter()
                    .map(|(ext, _, _)| ext.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_split_like_webdataset() {
        assert_eq!(
            split_member_name(b"000001.jpg"),
            Some((&b"000001"[..], &b"jpg"[..]))
        );
        assert_eq!(
            split_member_name(b"./a/b.c.json"),
            Some((&b"a/b"[..], &b"c.json"[..]))
        );
        assert_eq!(
            split_member_name(b"./././x/y.z/k.png"),
            Some((&b"x/y.z/k"[..], &b"png"[..]))
        );
        assert_eq!(split_member_name(b".hidden"), None);
        assert_eq!(split_member_name(b"dir/.hidden"), None);
        assert_eq!(split_member_name(b"noext"), None);
        assert_eq!(split_member_name(b"trailing."), None);
        assert_eq!(
            split_member_name(b"k\xff.png"),
            Some((&b"k\xff"[..], &b"png"[..]))
        );
    }

    #[test]
    fn escaped_names_are_distinct_and_readable() {
        assert_eq!(escape_name("café/k".as_bytes()), "café/k");
        assert_eq!(escape_name(b"k\xff"), "k\\xff");
        assert_eq!(escape_name(b"a\\b"), "a\\\\b");
        // An invalid byte and the same text spelled out do not collide.
        assert_ne!(escape_name(b"k\xff"), escape_name(b"k\\xff"));
    }
}
