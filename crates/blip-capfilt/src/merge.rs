//! [`merge`]: joins the committed chunks of all shards, in input order, into the final
//! annotation, provenance and summary files.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

use crate::chunk::verify_chunk;
use crate::chunk::{chunk_path, list_chunks};
use crate::manifest::{self, FORMAT_VERSION, RunManifest};
use crate::records::{DoneMarker, noise_ratio};
use crate::{
    ANNOTATIONS_FILE, Annotation, CHUNKS_DIR, DONE_FILE, Error, PROVENANCE_FILE, ProvenanceRecord,
    RUN_FILE, SUMMARY_FILE, Shard, Summary, TextSource,
};
use blip_core::fs::{AtomicFile, write_atomic};

/// Merges the shards in `out_dir` into `annotations.json`, `provenance.jsonl` and
/// `summary.json` (each written atomically), records in input order: the result is the
/// same whatever the number of shards. Errors naming the shards that have no `done`
/// marker, and when shards were run with different options.
///
/// ```
/// use blip_capfilt::{RunOptions, Shard, merge, run};
///
/// # use blip_capfilt::{CapFiltModel, ImageVerdict, ModelError, ScoredText};
/// # use image::RgbImage;
/// # struct Keep; // keeps every text, and captions every image "a caption"
/// # impl CapFiltModel for Keep {
/// #     fn process(&mut self, _: &[RgbImage], web: &[Option<String>]) -> Result<Vec<ImageVerdict>, ModelError> {
/// #         let keep = |text: &str| ScoredText { text: text.into(), itm_probability: 1.0 };
/// #         Ok(web.iter().map(|w| ImageVerdict { web: w.as_deref().map(keep), synthetic: vec![keep("a caption")] }).collect())
/// #     }
/// #     fn captioner_name(&self) -> String { "captioner".into() }
/// #     fn filter_name(&self) -> String { "filter".into() }
/// # }
/// // `Keep`: a model that keeps every text and captions every image "a caption".
/// let dir = tempfile::tempdir()?;
/// # for name in ["a.png", "b.png", "c.png"] { RgbImage::new(4, 4).save(dir.path().join(name))?; }
/// let input = dir.path().join("web.json");
/// std::fs::write(&input, r#"[{"image": "a.png"}, {"image": "b.png"}, {"image": "c.png"}]"#)?;
/// let out = dir.path().join("out");
/// for index in 0..2 {
///     let mut options = RunOptions::new(input.to_string_lossy(), &out);
///     options.shard = Shard::new(index, 2)?;
///     assert!(run(&options, &mut Keep)?.summary.is_none()); // shards do not merge by themselves
/// }
/// let summary = merge(&out)?;
/// assert_eq!((summary.shards, summary.images, summary.annotations), (2, 3, 3));
/// assert!(out.join("annotations.json").is_file());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn merge(out_dir: &Path) -> Result<Summary, Error> {
    let mut found: BTreeMap<Shard, PathBuf> = BTreeMap::new();
    for entry in std::fs::read_dir(out_dir).map_err(Error::io(out_dir))? {
        let entry = entry.map_err(Error::io(out_dir))?;
        if let Some(shard) = entry.file_name().to_str().and_then(Shard::from_dir_name) {
            found.insert(shard, entry.path());
        }
    }
    let Some(count) = found.keys().map(|s| s.count).max() else {
        return Err(Error::NoRun {
            out_dir: out_dir.to_path_buf(),
        });
    };
    if let Some(other) = found.keys().find(|s| s.count != count) {
        return Err(Error::CorruptOutput {
            path: out_dir.to_path_buf(),
            reason: format!(
                "holds shards of runs split {} and {count} ways; one output directory per split",
                other.count
            ),
        });
    }
    let missing: Vec<Shard> = (0..count)
        .map(|index| Shard { index, count })
        .filter(|s| {
            found
                .get(s)
                .is_none_or(|dir| !dir.join(DONE_FILE).is_file())
        })
        .collect();
    if !missing.is_empty() {
        return Err(Error::MissingShards {
            out_dir: out_dir.to_path_buf(),
            missing,
        });
    }

    let mut reference: Option<RunManifest> = None;
    let mut readers = Vec::with_capacity(count);
    let mut expected_samples = 0u64;
    for (shard, dir) in &found {
        let path = dir.join(RUN_FILE);
        let recorded = RunManifest::read(&path)?;
        if recorded.format != FORMAT_VERSION {
            return Err(Error::CorruptOutput {
                path,
                reason: format!(
                    "written in CapFilt output format {}, this version reads format \
                     {FORMAT_VERSION}; run again into a new output directory",
                    recorded.format
                ),
            });
        }
        match &reference {
            Some(first) => manifest::check(path, first, &recorded, true)?,
            None => reference = Some(recorded),
        }
        let done_path = dir.join(DONE_FILE);
        let done: DoneMarker = read_json(&done_path)?;
        expected_samples += done.samples;
        let chunks_dir = dir.join(CHUNKS_DIR);
        let committed = list_chunks(&chunks_dir)?;
        if let Some(chunk) = (0..done.chunks).find(|c| !committed.contains(c)) {
            return Err(Error::CorruptOutput {
                path: chunk_path(&chunks_dir, chunk),
                reason: format!(
                    "missing, yet the shard is marked done with {} chunks; rerun shard {shard}",
                    done.chunks
                ),
            });
        }
        if let Some(&extra) = committed.range(done.chunks..).next() {
            return Err(Error::CorruptOutput {
                path: chunk_path(&chunks_dir, extra),
                reason: format!("beyond the {} chunks of the done marker", done.chunks),
            });
        }
        readers.push(ShardReader::new(*shard, &chunks_dir, done.chunks));
    }
    let Some(manifest) = reference else {
        return Err(Error::NoRun {
            out_dir: out_dir.to_path_buf(),
        });
    };

    // Tar outputs are relative to the output directory: it must be nameable exactly.
    let image_root = match &manifest.image_root {
        Some(root) => root.clone(),
        None => out_dir
            .to_str()
            .ok_or_else(|| Error::NonUtf8Path {
                path: out_dir.to_path_buf(),
                what: "the output directory of a tar input (the summary's image root)",
            })?
            .to_string(),
    };
    let mut summary = Summary {
        input: manifest.input.clone(),
        input_kind: manifest.input_kind.clone(),
        image_root,
        shards: count,
        captioner: manifest.captioner.clone(),
        filter: manifest.filter.clone(),
        threshold: manifest.threshold,
        images: 0,
        images_skipped: 0,
        skipped_by_kind: BTreeMap::new(),
        images_with_kept_text: 0,
        web_texts: 0,
        web_kept: 0,
        synthetic_texts: 0,
        synthetic_kept: 0,
        annotations: 0,
        web_noise_ratio: None,
        synthetic_noise_ratio: None,
    };

    let mut provenance = AtomicFile::create(&out_dir.join(PROVENANCE_FILE))?;
    let mut annotations = AtomicFile::create(&out_dir.join(ANNOTATIONS_FILE))?;
    annotations
        .writer()
        .write_all(b"[")
        .map_err(Error::io(annotations.temp()))?;

    // Shards hold disjoint ordinals, each in increasing order: a k-way merge on the
    // ordinal restores the input order.
    let mut heap = BinaryHeap::new();
    for (i, reader) in readers.iter_mut().enumerate() {
        if let Some(ordinal) = reader.peek_ordinal()? {
            heap.push(Reverse((ordinal, i)));
        }
    }
    while let Some(Reverse((ordinal, i))) = heap.pop() {
        let reader = &mut readers[i];
        let mut kept_any = false;
        while reader.peek_ordinal()? == Some(ordinal) {
            let Some(record) = reader.next()? else { break };
            serde_json::to_writer(provenance.writer(), &record)
                .map_err(std::io::Error::from)
                .and_then(|()| provenance.writer().write_all(b"\n"))
                .map_err(Error::io(provenance.temp()))?;
            match record {
                ProvenanceRecord::Skipped(skipped) => {
                    summary.images_skipped += 1;
                    *summary
                        .skipped_by_kind
                        .entry(skipped.kind.as_str().to_string())
                        .or_default() += 1;
                }
                ProvenanceRecord::Text(text) => {
                    let (total, kept) = match text.source {
                        TextSource::Web => (&mut summary.web_texts, &mut summary.web_kept),
                        TextSource::Synthetic => {
                            (&mut summary.synthetic_texts, &mut summary.synthetic_kept)
                        }
                    };
                    *total += 1;
                    if text.kept {
                        *kept += 1;
                        kept_any = true;
                        let entry = Annotation {
                            image: text.image,
                            caption: text.text,
                        };
                        let separator: &[u8] = if summary.annotations == 0 {
                            b"\n"
                        } else {
                            b",\n"
                        };
                        let out = annotations.writer();
                        out.write_all(separator)
                            .and_then(|()| Ok(serde_json::to_writer(&mut *out, &entry)?))
                            .map_err(Error::io(annotations.temp()))?;
                        summary.annotations += 1;
                    }
                }
            }
        }
        summary.images_with_kept_text += u64::from(kept_any);
        if let Some(next) = reader.peek_ordinal()? {
            if next <= ordinal {
                return Err(reader.corrupt(format!(
                    "ordinal {next} after {ordinal}: records out of order"
                )));
            }
            heap.push(Reverse((next, i)));
        }
    }
    summary.images = readers.iter().map(|r| r.samples).sum();
    if summary.images != expected_samples {
        return Err(Error::CorruptOutput {
            path: out_dir.to_path_buf(),
            reason: format!(
                "chunk headers count {} images, done markers {expected_samples}",
                summary.images
            ),
        });
    }
    summary.web_noise_ratio = noise_ratio(summary.web_texts, summary.web_kept);
    summary.synthetic_noise_ratio = noise_ratio(summary.synthetic_texts, summary.synthetic_kept);

    let close: &[u8] = if summary.annotations == 0 {
        b"]\n"
    } else {
        b"\n]\n"
    };
    annotations
        .writer()
        .write_all(close)
        .map_err(Error::io(annotations.temp()))?;
    provenance.commit()?;
    annotations.commit()?;
    write_atomic(&out_dir.join(SUMMARY_FILE), |out| {
        serde_json::to_writer_pretty(&mut *out, &summary)?;
        out.write_all(b"\n")
    })?;
    Ok(summary)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::CorruptOutput {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Streams one shard's records, chunk after chunk, checking that they belong to it.
struct ShardReader {
    shard: Shard,
    chunks_dir: PathBuf,
    chunks: u64,
    next_chunk: u64,
    /// The open chunk: its path, lines and the number of the last line read.
    current: Option<(PathBuf, Lines<BufReader<File>>, u64)>,
    peeked: Option<ProvenanceRecord>,
    /// Images counted by the chunk headers read so far.
    samples: u64,
}

impl ShardReader {
    fn new(shard: Shard, chunks_dir: &Path, chunks: u64) -> ShardReader {
        ShardReader {
            shard,
            chunks_dir: chunks_dir.to_path_buf(),
            chunks,
            next_chunk: 0,
            current: None,
            peeked: None,
            samples: 0,
        }
    }

    fn corrupt(&self, reason: String) -> Error {
        let (path, line) = match &self.current {
            Some((path, _, line)) => (path.clone(), *line),
            None => (self.chunks_dir.clone(), 0),
        };
        Error::CorruptOutput {
            path,
            reason: format!("line {line}: {reason}"),
        }
    }

    fn peek_ordinal(&mut self) -> Result<Option<u64>, Error> {
        if self.peeked.is_none() {
            self.peeked = self.read()?;
        }
        Ok(self.peeked.as_ref().map(ProvenanceRecord::ordinal))
    }

    fn next(&mut self) -> Result<Option<ProvenanceRecord>, Error> {
        match self.peeked.take() {
            Some(record) => Ok(Some(record)),
            None => self.read(),
        }
    }

    fn read(&mut self) -> Result<Option<ProvenanceRecord>, Error> {
        loop {
            if self.current.is_none() {
                if self.next_chunk >= self.chunks {
                    return Ok(None);
                }
                self.open_chunk()?;
            }
            let Some((path, lines, number)) = self.current.as_mut() else {
                continue;
            };
            let Some(line) = lines.next() else {
                self.current = None;
                continue;
            };
            *number += 1;
            let line = line.map_err(Error::io(path.as_path()))?;
            let record: ProvenanceRecord = serde_json::from_str(&line)
                .map_err(|e| self.corrupt(format!("not a provenance record: {e}")))?;
            if !self.shard.contains(record.ordinal()) {
                return Err(self.corrupt(format!(
                    "ordinal {} does not belong to shard {}",
                    record.ordinal(),
                    self.shard
                )));
            }
            return Ok(Some(record));
        }
    }

    fn open_chunk(&mut self) -> Result<(), Error> {
        let chunk = self.next_chunk;
        let path = chunk_path(&self.chunks_dir, chunk);
        // Count and checksum first, so that no record of a damaged chunk is merged.
        let header = verify_chunk(
            &path,
            chunk,
            &format!(
                "delete this chunk file and run shard {} again (same options) to redo \
                 the chunk, then merge",
                self.shard
            ),
        )?;
        self.samples += header.samples;
        let file = File::open(&path).map_err(Error::io(&path))?;
        let mut lines = BufReader::new(file).lines();
        // The header, verified above.
        if let Some(line) = lines.next() {
            line.map_err(Error::io(&path))?;
        }
        self.current = Some((path, lines, 1));
        self.next_chunk += 1;
        Ok(())
    }
}
