//! [`fit`]: the epoch loop around [`Trainer`] — batches from a [`BatchLoader`] (prepared in
//! parallel), tokenization per the task, checkpoints, progress reports and JSON-lines metrics.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use blip_core::progress::{Progress, ProgressSink};
use blip_text::{BlipTokenizer, Padding};
use serde_json::json;

use crate::data::{Batch, BatchLoader};
use crate::error::{Result, TrainError};
use crate::pretrain::TrainBatch;
use crate::trainer::Trainer;

/// How captions become decoder/encoder inputs for a task.
///
/// ```
/// use blip_text::Padding;
/// use blip_train::TextRecipe;
///
/// let caption = TextRecipe::caption();
/// assert_eq!(caption.prompt, "a picture of ");
/// assert_eq!((caption.max_length, caption.padding), (40, Padding::Longest));
/// // Retrieval passes image ids: captions of one image are not each other's negatives.
/// assert!(TextRecipe::retrieval().image_ids && !TextRecipe::pretrain().image_ids);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TextRecipe {
    /// Prepended to every caption and excluded from the LM loss (`"a picture of "` in
    /// captioning fine-tuning, empty otherwise).
    pub prompt: String,
    /// Token limit (30 pre-training, 40 captioning, 35 retrieval).
    pub max_length: usize,
    /// Padding (`MaxLength` in pre-training and retrieval, `Longest` in captioning).
    pub padding: Padding,
    /// Pass image ids to the objectives (retrieval fine-tuning: captions of the same image
    /// are not negatives).
    pub image_ids: bool,
}

impl TextRecipe {
    /// Pre-training: 30 tokens, padded to the maximum.
    pub fn pretrain() -> Self {
        Self {
            prompt: String::new(),
            max_length: 30,
            padding: Padding::MaxLength,
            image_ids: false,
        }
    }

    /// Captioning fine-tuning: `"a picture of "` + caption, 40 tokens, padded to the longest.
    pub fn caption() -> Self {
        Self {
            prompt: "a picture of ".into(),
            max_length: 40,
            padding: Padding::Longest,
            image_ids: false,
        }
    }

    /// Retrieval (filter) fine-tuning: 35 tokens, image ids as positives.
    pub fn retrieval() -> Self {
        Self {
            prompt: String::new(),
            max_length: 35,
            padding: Padding::MaxLength,
            image_ids: true,
        }
    }
}

/// Options of [`fit`].
///
/// ```
/// use blip_train::{FitOptions, TextRecipe};
///
/// let mut options = FitOptions::new(TextRecipe::pretrain());
/// assert!(options.checkpoint_dir.is_none() && options.metrics.is_none());
/// assert_eq!(options.checkpoint_every, 1000);
/// options.checkpoint_dir = Some("runs/tiny".into());
/// options.metrics = Some("runs/tiny/metrics.jsonl".into());
/// options.max_steps = Some(500);
/// ```
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// The task's text handling.
    pub text: TextRecipe,
    /// Where checkpoints go (none: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many optimiser steps (and at each epoch's end).
    pub checkpoint_every: usize,
    /// JSON-lines file the metrics of every optimiser step are appended to.
    pub metrics: Option<PathBuf>,
    /// Where each step is reported (batches done of the whole run, the losses and
    /// throughput as the message); the library draws nothing itself.
    pub progress: Option<ProgressSink>,
    /// Stop after this many optimiser steps in total (for smoke runs and benchmarks).
    pub max_steps: Option<usize>,
}

impl FitOptions {
    /// No checkpoints, no metrics, no progress reports.
    pub fn new(text: TextRecipe) -> Self {
        Self {
            text,
            checkpoint_dir: None,
            checkpoint_every: 1000,
            metrics: None,
            progress: None,
            max_steps: None,
        }
    }
}

/// What [`fit`] did.
///
/// ```
/// use blip_train::FitReport;
///
/// let report = FitReport {
///     batches: 10,
///     samples: 80,
///     seconds: 4.0,
///     last_losses: vec![("lm".into(), 2.5)],
///     communication_seconds: 0.0,
/// };
/// assert_eq!(report.samples_per_second(), 20.0);
/// assert_eq!(FitReport::default().batches, 0);
/// ```
#[derive(Debug, Clone, Default)]
pub struct FitReport {
    /// Batches trained on in this call.
    pub batches: usize,
    /// Samples trained on in this call, by all ranks together.
    pub samples: usize,
    /// Wall time spent in model steps, seconds (data preparation overlaps it).
    pub seconds: f64,
    /// The losses of the last batch.
    pub last_losses: Vec<(String, f64)>,
    /// Of [`Self::seconds`], the time spent averaging gradients over the ranks.
    pub communication_seconds: f64,
}

impl FitReport {
    /// Training throughput.
    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.seconds.max(1e-9)
    }
}

/// A stable numeric id for an image id string (FNV-1a), for the ITC/ITM positives.
fn numeric_id(id: &str) -> i64 {
    (crate::distributed::fingerprint(id.as_bytes()) >> 1) as i64
}

/// Tokenizes a loader batch per `recipe` onto the trainer's device.
///
/// ```
/// use blip_text::BlipTokenizer;
/// use blip_train::fit::to_train_batch;
/// use blip_train::{Batch, TextRecipe};
/// use burn::tensor::Device;
///
/// let vocab = std::env::temp_dir().join(format!("blip-doc-vocab-{}.txt", std::process::id()));
/// std::fs::write(&vocab, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\npicture\nof\nred\nboard\n")?;
/// let tokenizer = BlipTokenizer::from_vocab(&vocab)?; // [CLS] = 2, a picture of = 5 6 7
/// let batch = Batch {
///     pixel_values: vec![0.0; 2 * 3 * 8 * 8],
///     image_size: 8,
///     captions: vec!["a red board".into(), "red".into()],
///     image_ids: vec!["1".into(), "2".into()],
///     indices: vec![0, 1],
/// };
/// let train = to_train_batch(&batch, &tokenizer, &TextRecipe::caption(), &Device::flex())?;
/// assert_eq!(train.pixel_values.dims(), [2, 3, 8, 8]);
/// assert_eq!(train.text.input_ids[0][..4], [2, 5, 6, 7]); // the prompt first...
/// assert_eq!(train.prompt_length, 4); // ...and excluded from the LM loss
/// # std::fs::remove_file(&vocab)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn to_train_batch(
    batch: &Batch,
    tokenizer: &BlipTokenizer,
    recipe: &TextRecipe,
    device: &burn::tensor::Device,
) -> Result<TrainBatch> {
    let texts: Vec<String> = batch
        .captions
        .iter()
        .map(|c| format!("{}{c}", recipe.prompt))
        .collect();
    let text = tokenizer.encode_batch(&texts, Some(recipe.max_length), recipe.padding)?;
    let prompt_length = if recipe.prompt.is_empty() {
        0
    } else {
        tokenizer.decoder_prompt(&recipe.prompt)?.len() // [DEC] + prompt
    };
    Ok(TrainBatch {
        pixel_values: batch.pixel_tensor(device),
        text,
        image_ids: recipe
            .image_ids
            .then(|| batch.image_ids.iter().map(|id| numeric_id(id)).collect()),
        prompt_length,
    })
}

/// Trains until `trainer.train.epochs` (or `max_steps`), continuing from
/// `trainer.progress`: a resumed trainer skips the batches its epoch already consumed.
///
/// In data-parallel training every rank calls it with its share of the data
/// ([`crate::LoaderConfig::shard`] with the rank of [`Trainer::join`]); only rank 0 writes
/// checkpoints and metrics and reports progress.
///
/// ```no_run
/// use std::path::Path;
///
/// use blip_text::BlipTokenizer;
/// use blip_train::{
///     BatchLoader, FitOptions, LoaderConfig, PretrainConfig, TextRecipe, TrainConfig,
///     TrainTransform, Trainer, fit, load_annotations,
/// };
/// use burn::tensor::Device;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let tokenizer = BlipTokenizer::from_vocab("bert-base-uncased/vocab.txt")?;
/// let config = PretrainConfig::tiny(tokenizer.vocab_size()).with_tokenizer(&tokenizer);
/// let annotations = load_annotations(Path::new("data/train.json"), Path::new("data"))?;
/// let transform = TrainTransform::pretrain(config.blip.vision.image_size);
/// let loader = BatchLoader::new(annotations, transform, LoaderConfig::new(8))?;
/// let train = TrainConfig::pretrain().with_epochs(5);
/// let device = Device::flex().autodiff();
/// let mut trainer = Trainer::new(config.init(&Device::flex()), config, train, &device);
/// let mut options = FitOptions::new(TextRecipe::pretrain());
/// options.checkpoint_dir = Some("runs/tiny".into());
/// let report = fit(&mut trainer, &loader, &tokenizer, &options)?;
/// assert_eq!(trainer.progress.epoch, 5);
/// println!("{:.1} samples/s", report.samples_per_second());
/// # Ok(())
/// # }
/// ```
pub fn fit(
    trainer: &mut Trainer,
    loader: &BatchLoader,
    tokenizer: &BlipTokenizer,
    options: &FitOptions,
) -> Result<FitReport> {
    let per_epoch = loader.batches_per_epoch();
    let collective = trainer.collective();
    let (rank, world) = (collective.rank(), collective.world_size());
    let shard = loader.config();
    if (shard.rank, shard.world_size) != (rank, world) {
        return Err(TrainError::Distributed(format!(
            "the loader is rank {} of {}, the trainer rank {rank} of {world}: shard the \
             loader's config with the trainer's rank",
            shard.rank, shard.world_size
        )));
    }
    trainer.set_global_batch(shard.batch_size)?;
    let main = trainer.is_main_rank();
    let mut metrics = match options.metrics.as_ref().filter(|_| main) {
        Some(path) => Some({
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| TrainError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| TrainError::Io {
                    path: path.clone(),
                    source,
                })?
        }),
        None => None,
    };
    let total = (trainer.train.epochs * per_epoch) as u64;
    let report_progress = |trainer: &Trainer, message: &str, finished: bool| {
        if let Some(sink) = options.progress.as_ref().filter(|_| main) {
            sink.report(Progress {
                done: (trainer.progress.epoch * per_epoch + trainer.progress.batch) as u64,
                total,
                message,
                finished,
            });
        }
    };
    report_progress(trainer, "", false);
    let mut report = FitReport::default();
    let device = trainer.device().clone();
    let checkpoint = |trainer: &Trainer| -> Result<()> {
        if let Some(dir) = options
            .checkpoint_dir
            .as_ref()
            .filter(|_| trainer.can_checkpoint())
        {
            trainer.save(dir)?;
        }
        Ok(())
    };
    let done = |trainer: &Trainer| {
        options
            .max_steps
            .is_some_and(|m| trainer.progress.step >= m)
    };
    while trainer.progress.epoch < trainer.train.epochs && !done(trainer) {
        let epoch = trainer.progress.epoch;
        for batch in loader.batches(epoch, trainer.progress.batch) {
            let batch = batch?;
            let train_batch = to_train_batch(&batch, tokenizer, &options.text, &device)?;
            let start = Instant::now();
            let step = blip_core::ops::on_thread_pool(&device, || {
                trainer.train_batch(&train_batch, per_epoch)
            })?;
            let seconds = start.elapsed().as_secs_f64();
            report.batches += 1;
            report.samples += batch.len() * world;
            report.seconds += seconds;
            report.last_losses = step.losses.clone();
            report.communication_seconds += step.communication_seconds;
            let losses: String = step
                .losses
                .iter()
                .map(|(n, v)| format!("{n} {v:.3}"))
                .collect::<Vec<_>>()
                .join(" ");
            let message = format!("{losses} | {:.1} samples/s", report.samples_per_second());
            report_progress(trainer, &message, false);
            if let (Some(file), Some(lr)) = (metrics.as_mut(), step.lr) {
                let mut line = json!({
                    "epoch": epoch,
                    "step": trainer.progress.step,
                    "batch": trainer.progress.batch,
                    "lr": lr,
                    "alpha": step.alpha,
                    "loss": step.total,
                    "grad_norm": step.grad_norm,
                    "temp": trainer.model.temperature(),
                    "samples_per_second": (batch.len() * world) as f64 / seconds.max(1e-9),
                    "communication_seconds": step.communication_seconds,
                    // The process's peak so far: training's, before any final save.
                    "peak_rss_mb": blip_core::peak_rss().map(|b| b as f64 / (1 << 20) as f64),
                });
                for (name, value) in &step.losses {
                    line[format!("loss_{name}")] = json!(value);
                }
                writeln!(file, "{line}").map_err(|source| TrainError::Io {
                    path: options.metrics.clone().unwrap_or_default(),
                    source,
                })?;
            }
            if step.lr.is_some()
                && options.checkpoint_every > 0
                && trainer
                    .progress
                    .step
                    .is_multiple_of(options.checkpoint_every)
            {
                checkpoint(trainer)?;
            }
            if done(trainer) {
                break;
            }
        }
        if done(trainer) {
            break;
        }
        trainer.end_epoch();
        checkpoint(trainer)?;
    }
    report_progress(trainer, "", true);
    Ok(report)
}
