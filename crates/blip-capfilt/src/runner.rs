//! [`run`]: enumerate → decode (background threads) → model → commit chunk by chunk.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};

use blip_core::progress::Progress;
use blip_vision::ImageProcessor;
use image::RgbImage;

use crate::chunk::{chunk_path, list_chunks, verify_chunk, write_chunk};
use crate::input::{Flow, Input, Sample, Skip};
use crate::manifest::{self, RunManifest};
use crate::records::DoneMarker;
use crate::{
    CHUNKS_DIR, CapFiltModel, DONE_FILE, Error, LOCK_FILE, ProvenanceRecord, RUN_FILE, RunOptions,
    Shard, SkipKind, SkippedRecord, Summary, TextRecord, TextSource,
};
use blip_core::fs::{remove_stale_temps, sync_dir, write_atomic, write_atomic_no_dir_sync};

/// What one [`run`] invocation did.
///
/// ```
/// use blip_capfilt::{RunOptions, run};
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
/// # for name in ["a.png", "b.png"] { RgbImage::new(4, 4).save(dir.path().join(name))?; }
/// let input = dir.path().join("web.json");
/// std::fs::write(&input, r#"[{"image": "a.png"}, {"image": "b.png"}]"#)?;
/// let mut options = RunOptions::new(input.to_string_lossy(), dir.path().join("out"));
/// (options.chunk_size, options.max_chunks) = (1, Some(1)); // stop after one chunk
/// let first = run(&options, &mut Keep)?;
/// assert_eq!((first.chunks_committed, first.complete), (1, false));
/// options.max_chunks = None; // the restart skips the committed chunk
/// let second = run(&options, &mut Keep)?;
/// assert_eq!((second.chunks_already_done, second.chunks_committed, second.images_processed), (1, 1, 1));
/// assert!(second.complete && second.summary.is_some());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// The shard's run directory.
    pub shard_dir: PathBuf,
    /// Chunks committed by this invocation.
    pub chunks_committed: usize,
    /// Chunks found committed by an earlier invocation (skipped without decoding).
    pub chunks_already_done: usize,
    /// Images decoded and given to the model by this invocation.
    pub images_processed: u64,
    /// Images recorded as skipped by this invocation.
    pub images_skipped: u64,
    /// Every chunk of the shard is committed and its `done` marker written.
    pub complete: bool,
    /// The merged summary, when an unsharded run completed (it merges by itself).
    pub summary: Option<Summary>,
}

/// Runs CapFilt over `options.shard` of the input with `model`, resuming a killed run in
/// the same output directory. See the crate docs for the layout and guarantees.
///
/// ```
/// use blip_capfilt::{RunOptions, SkipKind, run};
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
/// RgbImage::new(4, 4).save(dir.path().join("a.png"))?;
/// let input = dir.path().join("web.json");
/// std::fs::write(&input, r#"[{"image": "a.png", "caption": "a dog"}, {"image": "gone.png", "caption": "a cat"}]"#)?;
/// let report = run(&RunOptions::new(input.to_string_lossy(), dir.path().join("out")), &mut Keep)?;
/// assert!(report.complete);
/// // A missing image is recorded as skipped; the run goes on.
/// assert_eq!((report.images_processed, report.images_skipped), (1, 1));
/// let summary = report.summary.expect("an unsharded run merges by itself");
/// assert_eq!(summary.skipped_by_kind[SkipKind::Missing.as_str()], 1);
/// assert_eq!(summary.annotations, 2); // "a dog" and the synthetic "a caption"
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn run(options: &RunOptions, model: &mut dyn CapFiltModel) -> Result<RunReport, Error> {
    // Everything that can be refused is checked before the output directory is touched,
    // so that a corrected rerun is not taken for a run with other options.
    options.validate()?;
    model.validate()?;
    let input = Input::resolve(&options.input, options.image_root.as_deref())?;
    // Tar outputs are relative to the output directory, which the summary names.
    if matches!(input, Input::Tars { .. }) && options.out_dir.to_str().is_none() {
        return Err(Error::NonUtf8Path {
            path: options.out_dir.clone(),
            what: "the output directory of a tar input (the summary's image root)",
        });
    }
    let captioner = model.captioner_name();
    let filter = model.filter_name();
    let manifest = RunManifest::new(options, &input, captioner.clone(), filter.clone())?;
    let shard = options.shard;
    let shard_dir = shard.dir(&options.out_dir);
    let chunks_dir = shard_dir.join(CHUNKS_DIR);

    // Checked before anything is created, so a refused run leaves no trace.
    let run_file = shard_dir.join(RUN_FILE);
    let recorded = match std::fs::metadata(&run_file) {
        Ok(_) => Some(RunManifest::read(&run_file)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(Error::Io {
                path: run_file,
                source,
            });
        }
    };
    // A shard that committed nothing produced nothing under its recorded options (its run
    // stopped at an input error, say): a corrected rerun replaces them instead of being
    // locked out as "options differ".
    let nothing_committed = || -> Result<bool, Error> {
        Ok(!chunks_dir.exists() || list_chunks(&chunks_dir)?.is_empty())
    };
    let mut replace = recorded.is_none();
    if let Some(recorded) = &recorded
        && let Err(changed) = manifest::check(run_file.clone(), &manifest, recorded, false)
    {
        if !nothing_committed()? {
            return Err(changed);
        }
        replace = true;
    }
    check_siblings(&options.out_dir, &manifest)?;
    std::fs::create_dir_all(&chunks_dir).map_err(Error::io(&chunks_dir))?;
    // Held until this function returns; the OS drops it when the process dies (kill -9
    // included), so it never goes stale.
    let _lock = lock_shard(&shard_dir.join(LOCK_FILE))?;
    if replace {
        // Checked again under the lock: a concurrent run of the old options may have
        // committed a chunk since.
        if recorded.is_some() && !nothing_committed()? {
            return Err(Error::OptionsChanged {
                path: run_file,
                differences: vec![
                    "a run with the recorded options committed a chunk meanwhile".into(),
                ],
            });
        }
        manifest.write(&run_file)?;
    }
    remove_stale_temps(&shard_dir)?;
    remove_stale_temps(&chunks_dir)?;
    let committed = list_chunks(&chunks_dir)?;
    // A committed chunk is trusted (its images are not read again), so it must be intact.
    for &chunk in &committed {
        verify_chunk(
            &chunk_path(&chunks_dir, chunk),
            chunk,
            "delete this chunk file and run again to redo the chunk",
        )?;
    }

    let plan = Plan {
        shard,
        chunk_size: options.chunk_size as u64,
        committed: &committed,
        max_chunks: options.max_chunks,
    };
    let mut reporter = Reporter::new(options, &input, &plan)?;
    let ctx = Context {
        options,
        captioner,
        filter,
        chunks_dir: &chunks_dir,
        keep_bytes: matches!(input, Input::Tars { .. }),
    };

    let mut report = RunReport {
        shard_dir: shard_dir.clone(),
        chunks_committed: 0,
        chunks_already_done: committed.len(),
        images_processed: 0,
        images_skipped: 0,
        complete: false,
        summary: None,
    };
    let fit = model.image_processor();
    let end = std::thread::scope(|scope| -> Result<WalkEnd, Error> {
        // One batch queued while the next decodes: decoding overlaps the model, and at
        // most three batches of pixels are alive.
        let (tx, rx) = sync_channel::<Event>(1);
        let producer =
            scope.spawn(|| produce(&input, &plan, options, ctx.keep_bytes, fit.as_ref(), tx));
        let mut buffer = ChunkBuffer::default();
        let mut end = None;
        for event in rx.iter() {
            match event {
                Event::Batch { chunk, items } => {
                    let n = items.len() as u64;
                    let (processed, skipped) =
                        process_batch(&ctx, model, chunk, items, &mut buffer)?;
                    report.images_processed += processed;
                    report.images_skipped += skipped;
                    reporter.advance(n);
                }
                Event::ChunkEnd { chunk, samples } => {
                    commit_chunk(&ctx, chunk, samples, &mut buffer)?;
                    report.chunks_committed += 1;
                }
                Event::End(walk_end) => end = Some(walk_end),
            }
        }
        drop(rx);
        match producer.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
        end.ok_or_else(|| Error::CorruptOutput {
            path: shard_dir.clone(),
            reason: "input enumeration ended without a result".into(),
        })
    });
    reporter.report(true);
    let end = end?;
    if !end.complete {
        return Ok(report);
    }
    // A committed chunk beyond the input's last one means the input changed under us.
    if let Some(&extra) = committed.range(end.chunks..).next() {
        return Err(Error::CorruptOutput {
            path: chunk_path(&chunks_dir, extra),
            reason: format!(
                "committed chunk {extra} but the input gives this shard only {} chunks; \
                 did the input change? use a new output directory",
                end.chunks
            ),
        });
    }
    let done = DoneMarker {
        chunks: end.chunks,
        samples: end.samples,
    };
    write_atomic(&shard_dir.join(DONE_FILE), |out| {
        serde_json::to_writer(&mut *out, &done)?;
        out.write_all(b"\n")
    })?;
    report.complete = true;
    if shard.count == 1 {
        report.summary = Some(crate::merge(&options.out_dir)?);
    }
    Ok(report)
}

/// Takes the shard's lock file, so that two runs of one shard cannot interleave commits.
///
/// A lock still held after [`LOCK_PATIENCE`] is another run's. The wait covers a transient
/// holder: a process forked (by any thread of ours) between our open and its exec shares
/// the lock's open file, and so the lock, until it execs.
fn lock_shard(path: &Path) -> Result<File, Error> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(Error::io(path))?;
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < LOCK_PATIENCE => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Busy {
                    path: path.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// How long [`lock_shard`] waits for a held lock before reporting [`Error::Busy`].
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Sibling shards (same output directory) must have been started with the same options.
fn check_siblings(out_dir: &Path, manifest: &RunManifest) -> Result<(), Error> {
    let entries = match std::fs::read_dir(out_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                path: out_dir.to_path_buf(),
                source,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(Error::io(out_dir))?;
        let Some(other) = entry.file_name().to_str().and_then(Shard::from_dir_name) else {
            continue;
        };
        if other == manifest.shard {
            continue;
        }
        let path = entry.path().join(RUN_FILE);
        if !path.is_file() {
            continue;
        }
        manifest::check(path.clone(), manifest, &RunManifest::read(&path)?, true)?;
    }
    Ok(())
}

/// Which samples this invocation processes, and in which chunks.
struct Plan<'a> {
    shard: Shard,
    chunk_size: u64,
    committed: &'a BTreeSet<u64>,
    max_chunks: Option<usize>,
}

enum Walk {
    /// A sample of a chunk to process.
    Sample { chunk: u64, sample: Sample },
    /// The last sample of a chunk to process has been given.
    ChunkEnd { chunk: u64, samples: u64 },
}

#[derive(Debug, Clone, Copy)]
struct WalkEnd {
    /// The input was enumerated to its end (not stopped by `max_chunks` or the consumer).
    complete: bool,
    /// Chunks and samples of this shard (meaningful when complete).
    chunks: u64,
    samples: u64,
}

/// Walks the shard's samples chunk by chunk, passing on those of uncommitted chunks.
fn walk(
    input: &Input,
    plan: &Plan,
    on: &mut dyn FnMut(Walk) -> Result<Flow, Error>,
) -> Result<WalkEnd, Error> {
    let mut local = 0u64;
    // (chunk id, whether it is processed by this invocation)
    let mut current: Option<(u64, bool)> = None;
    let mut started = 0usize;
    let mut complete = true;
    input.for_each(&mut |sample| {
        if !plan.shard.contains(sample.ordinal) {
            return Ok(Flow::Continue);
        }
        let chunk = local / plan.chunk_size;
        if current.map(|(c, _)| c) != Some(chunk) {
            if let Some((previous, true)) = current
                && on(Walk::ChunkEnd {
                    chunk: previous,
                    samples: plan.chunk_size,
                })? == Flow::Stop
            {
                complete = false;
                return Ok(Flow::Stop);
            }
            let pending = !plan.committed.contains(&chunk);
            if pending {
                if plan.max_chunks.is_some_and(|max| started >= max) {
                    complete = false;
                    return Ok(Flow::Stop);
                }
                started += 1;
            }
            current = Some((chunk, pending));
        }
        local += 1;
        if current.is_some_and(|(_, pending)| pending)
            && on(Walk::Sample { chunk, sample })? == Flow::Stop
        {
            complete = false;
            return Ok(Flow::Stop);
        }
        Ok(Flow::Continue)
    })?;
    if complete
        && let Some((last, true)) = current
        && on(Walk::ChunkEnd {
            chunk: last,
            samples: local - last * plan.chunk_size,
        })? == Flow::Stop
    {
        complete = false;
    }
    Ok(WalkEnd {
        complete,
        chunks: local.div_ceil(plan.chunk_size),
        samples: local,
    })
}

/// Reports this invocation's images to [`RunOptions::progress`]. The total needs a first
/// (cheap, no image reads) pass over the input, done only when someone listens.
struct Reporter<'a> {
    options: &'a RunOptions,
    message: String,
    done: u64,
    total: u64,
}

impl<'a> Reporter<'a> {
    fn new(options: &'a RunOptions, input: &Input, plan: &Plan) -> Result<Self, Error> {
        let mut total = 0u64;
        if options.progress.is_some() {
            walk(input, plan, &mut |w| {
                if let Walk::Sample { .. } = w {
                    total += 1;
                }
                Ok(Flow::Continue)
            })?;
        }
        let reporter = Reporter {
            options,
            message: format!("shard {}", plan.shard),
            done: 0,
            total,
        };
        reporter.report(false);
        Ok(reporter)
    }

    fn advance(&mut self, images: u64) {
        self.done += images;
        self.report(false);
    }

    fn report(&self, finished: bool) {
        if let Some(sink) = &self.options.progress {
            sink.report(Progress {
                done: self.done,
                total: self.total,
                message: &self.message,
                finished,
            });
        }
    }
}

/// Producer → model thread.
enum Event {
    Batch { chunk: u64, items: Vec<Decoded> },
    ChunkEnd { chunk: u64, samples: u64 },
    End(WalkEnd),
}

type Outcome = Result<(RgbImage, Option<Vec<u8>>), Skip>;

/// A sample with its decoded image (and raw bytes, kept to copy tar images out) or the
/// reason it is skipped.
struct Decoded {
    sample: Sample,
    outcome: Outcome,
}

/// The producer thread: enumerates, reads and decodes, in batches that never straddle a
/// chunk so that a chunk's results do not depend on where a previous run stopped.
fn produce(
    input: &Input,
    plan: &Plan,
    options: &RunOptions,
    keep_bytes: bool,
    fit: Option<&ImageProcessor>,
    tx: SyncSender<Event>,
) -> Result<(), Error> {
    let mut batch: Vec<Sample> = Vec::with_capacity(options.batch_size);
    let mut open = HashMap::new();
    let threads = options.decode_threads;
    let send_batch = |batch: &mut Vec<Sample>, chunk: u64, open: &mut HashMap<usize, File>| {
        let items = decode_batch(input, std::mem::take(batch), threads, keep_bytes, fit, open);
        // A closed channel means the model side stopped (error): stop quietly.
        match tx.send(Event::Batch { chunk, items }) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    };
    let end = walk(input, plan, &mut |w| {
        Ok(match w {
            Walk::Sample { chunk, sample } => {
                batch.push(sample);
                if batch.len() >= options.batch_size {
                    send_batch(&mut batch, chunk, &mut open)
                } else {
                    Flow::Continue
                }
            }
            Walk::ChunkEnd { chunk, samples } => {
                if !batch.is_empty() && send_batch(&mut batch, chunk, &mut open) == Flow::Stop {
                    return Ok(Flow::Stop);
                }
                match tx.send(Event::ChunkEnd { chunk, samples }) {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::Stop,
                }
            }
        })
    })?;
    // Fails only when the model side already stopped, which reports its own error.
    let _ = tx.send(Event::End(end));
    Ok(())
}

/// Reads sequentially (one pass over each tar), decodes on `threads` threads.
fn decode_batch(
    input: &Input,
    samples: Vec<Sample>,
    threads: usize,
    keep_bytes: bool,
    fit: Option<&ImageProcessor>,
    open: &mut HashMap<usize, File>,
) -> Vec<Decoded> {
    let raw: Vec<(Sample, Result<Vec<u8>, Skip>)> = samples
        .into_iter()
        .map(|sample| {
            let bytes = input.read_image(&sample.source, open);
            (sample, bytes)
        })
        .collect();
    parallel_map(raw, threads, |(sample, bytes)| {
        let outcome = bytes.and_then(|bytes| match decode(&bytes, fit) {
            Ok(image) => Ok((image, keep_bytes.then_some(bytes))),
            Err(reason) => Err((SkipKind::Corrupt, format!("{}: {reason}", sample.image))),
        });
        Decoded { sample, outcome }
    })
}

/// Decodes as `blip_vision` does (any format, alpha over white, truncated JPEGs refused),
/// resized at once to `fit`'s size when given. A decoder panic on hostile bytes is a
/// corrupt image, not a crashed run.
fn decode(bytes: &[u8], fit: Option<&ImageProcessor>) -> Result<RgbImage, String> {
    catch_unwind(AssertUnwindSafe(|| {
        let image = ImageProcessor::decode(bytes).map_err(|e| e.to_string())?;
        Ok(match fit {
            Some(processor) => processor.fit(image),
            None => image,
        })
    }))
    .unwrap_or_else(|_| Err("the image decoder panicked".to_string()))
}

/// `f` over `items` on up to `threads` scoped threads, order kept.
fn parallel_map<T: Send, U: Send>(
    items: Vec<T>,
    threads: usize,
    f: impl Fn(T) -> U + Sync,
) -> Vec<U> {
    if threads <= 1 || items.len() <= 1 {
        return items.into_iter().map(f).collect();
    }
    let per_thread = items.len().div_ceil(threads);
    let mut parts = Vec::new();
    let mut rest = items.into_iter();
    loop {
        let part: Vec<T> = rest.by_ref().take(per_thread).collect();
        if part.is_empty() {
            break;
        }
        parts.push(part);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || part.into_iter().map(f).collect::<Vec<U>>()))
            .collect();
        let mut out = Vec::new();
        for handle in handles {
            match handle.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// What the model thread needs besides the model.
struct Context<'a> {
    options: &'a RunOptions,
    captioner: String,
    filter: String,
    chunks_dir: &'a Path,
    keep_bytes: bool,
}

/// Results of the chunk being processed.
#[derive(Default)]
struct ChunkBuffer {
    records: Vec<ProvenanceRecord>,
    /// `(relative image path, bytes)` of tar images with a kept text.
    images: Vec<(String, Vec<u8>)>,
}

/// Runs the model on the decodable images of a batch and records every sample.
/// Returns (images processed, images skipped).
fn process_batch(
    ctx: &Context,
    model: &mut dyn CapFiltModel,
    chunk: u64,
    items: Vec<Decoded>,
    buffer: &mut ChunkBuffer,
) -> Result<(u64, u64), Error> {
    let shard = ctx.options.shard;
    let contract = |reason: String| Error::ModelContract {
        shard,
        chunk,
        reason,
    };
    // One model entry per web text (or one without): see the crate docs on caption lists.
    let mut images = Vec::new();
    let mut web = Vec::new();
    let mut plan = Vec::with_capacity(items.len());
    for Decoded { sample, outcome } in items {
        match outcome {
            Err(skip) => plan.push((sample, Err(skip))),
            Ok((image, bytes)) => {
                let entries = sample.web_texts.len().max(1);
                match sample.web_texts.split_last() {
                    None => {
                        images.push(image);
                        web.push(None);
                    }
                    Some((last, others)) => {
                        for text in others {
                            images.push(image.clone());
                            web.push(Some(text.clone()));
                        }
                        images.push(image);
                        web.push(Some(last.clone()));
                    }
                }
                plan.push((sample, Ok((entries, bytes))));
            }
        }
    }
    let verdicts = if images.is_empty() {
        Vec::new()
    } else {
        model
            .process(&images, &web)
            .map_err(|source| Error::Model {
                shard,
                chunk,
                source,
            })?
    };
    drop(images);
    if verdicts.len() != web.len() {
        return Err(contract(format!(
            "{} verdicts for {} images",
            verdicts.len(),
            web.len()
        )));
    }
    let check = |p: f32, what: &dyn Fn() -> String| {
        if p.is_finite() && (0.0..=1.0).contains(&p) {
            Ok(p)
        } else {
            Err(contract(format!(
                "ITM probability {p} of {} is not in [0, 1]",
                what()
            )))
        }
    };
    let threshold = ctx.options.threshold;
    let mut verdicts = verdicts.into_iter().zip(web);
    let (mut processed, mut skipped) = (0, 0);
    for (sample, outcome) in plan {
        let (entries, bytes) = match outcome {
            Err((kind, reason)) => {
                skipped += 1;
                buffer
                    .records
                    .push(ProvenanceRecord::Skipped(SkippedRecord {
                        ordinal: sample.ordinal,
                        image: sample.image,
                        kind,
                        reason,
                    }));
                continue;
            }
            Ok(x) => x,
        };
        processed += 1;
        let mut any_kept = false;
        for (entry, (verdict, web_text)) in verdicts.by_ref().take(entries).enumerate() {
            match (verdict.web, web_text) {
                (Some(scored), Some(text)) => {
                    let p = check(scored.itm_probability, &|| {
                        format!("web text of {}", sample.image)
                    })?;
                    any_kept |= p >= threshold;
                    buffer.records.push(ProvenanceRecord::Text(TextRecord {
                        ordinal: sample.ordinal,
                        image: sample.image.clone(),
                        // The input's text: the model may have scored a normalised copy.
                        text,
                        source: TextSource::Web,
                        itm_probability: p,
                        kept: p >= threshold,
                        captioner: None,
                        filter: ctx.filter.clone(),
                    }));
                }
                (None, None) => {}
                (Some(_), None) => {
                    return Err(contract(format!(
                        "web score for {}, which has no web text",
                        sample.image
                    )));
                }
                (None, Some(_)) => {
                    return Err(contract(format!(
                        "no web score for {}, which has a web text",
                        sample.image
                    )));
                }
            }
            // One caption set per image (the paper captions each image once); the repeats
            // of a multi-text image exist only to score its other web texts.
            if entry > 0 {
                continue;
            }
            for scored in verdict.synthetic {
                let p = check(scored.itm_probability, &|| {
                    format!("synthetic text {:?} of {}", scored.text, sample.image)
                })?;
                any_kept |= p >= threshold;
                buffer.records.push(ProvenanceRecord::Text(TextRecord {
                    ordinal: sample.ordinal,
                    image: sample.image.clone(),
                    text: scored.text,
                    source: TextSource::Synthetic,
                    itm_probability: p,
                    kept: p >= threshold,
                    captioner: Some(ctx.captioner.clone()),
                    filter: ctx.filter.clone(),
                }));
            }
        }
        if any_kept
            && ctx.keep_bytes
            && let Some(bytes) = bytes
        {
            buffer.images.push((sample.image, bytes));
        }
    }
    Ok((processed, skipped))
}

/// Writes the chunk's images (each atomically, directories synced), then commits the
/// chunk file by renaming it into place, so a committed chunk always has its images.
fn commit_chunk(
    ctx: &Context,
    chunk: u64,
    samples: u64,
    buffer: &mut ChunkBuffer,
) -> Result<(), Error> {
    let out_dir = &ctx.options.out_dir;
    let mut dirs = BTreeSet::new();
    for (image, bytes) in buffer.images.drain(..) {
        let dest = out_dir.join(&image);
        let dir = dest.parent().unwrap_or(out_dir).to_path_buf();
        if !dirs.contains(&dir) {
            std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        }
        write_atomic_no_dir_sync(&dest, |out| out.write_all(&bytes))?;
        dirs.insert(dir);
    }
    if !dirs.is_empty() {
        // New per-tar directories must survive a power cut too.
        let images_dir = out_dir.join(crate::IMAGES_DIR);
        for dir in dirs.iter().chain([&images_dir]) {
            sync_dir(dir)?;
        }
    }
    let records = std::mem::take(&mut buffer.records);
    write_chunk(&chunk_path(ctx.chunks_dir, chunk), chunk, samples, &records)
}
