//! The training loop's state and step: AdamW, the original LR schedules, global-norm
//! clipping, gradient accumulation, and checkpoints that resume exactly.
//!
//! burn's `Learner` cannot drive BLIP (its step cannot update momentum encoders or queues),
//! so [`Trainer`] owns everything a step changes and [`Trainer::save`] /
//! [`Trainer::resume`] write and read all of it. In data-parallel training
//! ([`Trainer::join`]) each rank owns a `Trainer`; rank 0 writes the checkpoints, which
//! resume on any number of ranks.
//!
//! A checkpoint is a directory `step-NNNNNNNN/` under the checkpoint root, written as
//! `step-NNNNNNNN.partial/` and renamed when complete; the file `latest` (replaced
//! atomically) names the newest one. A crash at any moment leaves the previous checkpoint
//! and `latest` intact.
//!
//! | file | content |
//! |---|---|
//! | `model.safetensors` | [`BlipPretrain`], original key names (`text_decoder.attention.N.*` are the decoder's own self-attention blocks) |
//! | `momentum.safetensors` | the `*_m` encoders, queues (`image_queue`, `text_queue`) |
//! | `optimizer.bpk` | AdamW moments (burnpack, burn's optimiser record) |
//! | `state.json` | step, epoch, position in the epoch (and the global batch it counts), each rank's RNG, queue pointer and ids, configs, run options, parameter ids |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blip_core::SplitMix64;
use blip_core::checkpoint::{SafetensorsHeader, load_safetensors, save_safetensors};

use crate::model::PRETRAIN_KEYS;
use blip_core::dropout;
use blip_core::precision::cast_module;
use burn::config::Config;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, ModuleOptimizer};
use burn::tensor::{Device, FloatDType, Shape, Tensor};
use serde_json::json;

use crate::data::DROPOUT_STREAM;
use crate::distributed::{
    Collective, SingleProcess, all_reduce_mean_gradients, broadcast_module, fingerprint,
    json_differences,
};
use crate::error::{Result, TrainError};
use crate::losses::alpha_ramp;
use crate::model::{BlipPretrain, MomentumEncoders, PretrainConfig};
use crate::momentum::FeatureQueue;
use crate::optim::{blip_adamw, clip_grad_norm};
use crate::pretrain::{
    Distillation, Objective, TrainBatch, clamp_model_temperature, compute_losses_with,
};
use crate::schedule::{cosine_lr, step_decay_lr, warmup_lr};
use blip_core::rng::derive_seed;

/// How the learning rate moves.
///
/// ```
/// use blip_train::{LrSchedule, PretrainConfig, TrainConfig, Trainer};
/// use burn::tensor::Device;
///
/// let train = TrainConfig::finetune_caption(); // cosine from 1e-5 to 0 over 5 epochs
/// assert_eq!(train.schedule, LrSchedule::Cosine);
/// let config = PretrainConfig::tiny(30524);
/// let model = config.init(&Device::flex());
/// let mut trainer = Trainer::new(model, config, train, &Device::flex().autodiff());
/// assert_eq!(trainer.learning_rate(), 1e-5);
/// for _ in 0..5 {
///     trainer.end_epoch();
/// }
/// assert!(trainer.learning_rate().abs() < 1e-18);
/// ```
#[derive(Config, Debug, PartialEq, Copy)]
pub enum LrSchedule {
    /// Pre-training: epoch 0 warms up linearly per step, each later epoch `e` runs at
    /// `max(min_lr, init_lr·decay^e)`.
    StepDecay,
    /// Fine-tuning: cosine over epochs from `init_lr` to `min_lr`, no warm-up.
    Cosine,
}

/// Optimisation settings (the original `configs/*.yaml`).
///
/// ```
/// use blip_train::{LrSchedule, TrainConfig};
///
/// let train = TrainConfig::new()
///     .with_init_lr(1e-4)
///     .with_grad_accumulation(4)
///     .with_clip_grad_norm(Some(1.0));
/// // The rest keeps the original pre-training settings.
/// assert_eq!((train.warmup_steps, train.epochs), (3000, 20));
/// assert_eq!(train.schedule, LrSchedule::StepDecay);
/// assert_eq!(TrainConfig::pretrain(), TrainConfig::new());
/// assert_eq!(TrainConfig::finetune_retrieval().alpha_ramp_epochs, 1);
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct TrainConfig {
    /// Peak learning rate (3e-4 pre-training ViT-B, 1e-5 caption/retrieval fine-tuning).
    #[config(default = 3e-4)]
    pub init_lr: f64,
    /// Floor of the schedule.
    #[config(default = 1e-6)]
    pub min_lr: f64,
    /// Warm-up start (step decay only).
    #[config(default = 1e-6)]
    pub warmup_lr: f64,
    /// Warm-up length in optimiser steps (3000; step decay only).
    #[config(default = 3000)]
    pub warmup_steps: usize,
    /// Per-epoch decay factor (0.9 in the code, 0.85 in the paper).
    #[config(default = 0.9)]
    pub lr_decay_rate: f64,
    /// The schedule.
    #[config(default = "LrSchedule::StepDecay")]
    pub schedule: LrSchedule,
    /// Number of epochs (20 pre-training, 5 captioning, 6 retrieval).
    #[config(default = 20)]
    pub epochs: usize,
    /// Batches whose gradients are summed before one optimiser step (1 = none). The loss
    /// of each is divided by this, so the step equals one on the concatenated batch.
    #[config(default = 1)]
    pub grad_accumulation: usize,
    /// Clip the global gradient norm to this (none in the original).
    #[config(default = "None")]
    pub clip_grad_norm: Option<f64>,
    /// Epochs over which ITC's `α` ramps up (2 pre-training, 1 retrieval).
    #[config(default = 2)]
    pub alpha_ramp_epochs: usize,
    /// Seed of negative sampling (data order and augmentation have their own).
    #[config(default = 0)]
    pub seed: u64,
    /// Mixed precision: the online model computes in this type (bf16) while the master
    /// weights, their gradients, AdamW's state, the momentum encoders and the queues stay
    /// f32, and the losses are reduced in f32. `None`: f32 throughout. f16 is refused: it
    /// needs loss scaling, which is not built.
    #[config(default = "None")]
    pub mixed_precision: Option<FloatDType>,
}

impl TrainConfig {
    /// The original pre-training schedule.
    pub fn pretrain() -> Self {
        Self::new()
    }

    /// The original captioning fine-tuning: cosine from 1e-5 to 0 over 5 epochs.
    pub fn finetune_caption() -> Self {
        Self::new()
            .with_init_lr(1e-5)
            .with_min_lr(0.0)
            .with_schedule(LrSchedule::Cosine)
            .with_epochs(5)
    }

    /// The original retrieval fine-tuning: cosine from 1e-5 to 0 over 6 epochs, `α` ramped
    /// over the first.
    pub fn finetune_retrieval() -> Self {
        Self::new()
            .with_init_lr(1e-5)
            .with_min_lr(0.0)
            .with_schedule(LrSchedule::Cosine)
            .with_epochs(6)
            .with_alpha_ramp_epochs(1)
    }
}

/// Where training stands. `batch` counts the batches consumed in the current epoch (what a
/// resumed data loader skips), `step` the optimiser steps overall.
///
/// ```
/// use blip_train::{PretrainConfig, Progress, TrainConfig, Trainer};
/// use burn::tensor::Device;
/// # use blip_text::Encoded;
/// # use blip_train::TrainBatch;
/// # use burn::tensor::Tensor;
///
/// let config = PretrainConfig::tiny(30524);
/// let device = Device::flex().autodiff();
/// # let s = config.blip.vision.image_size;
/// # let batch = TrainBatch {
/// #     pixel_values: Tensor::zeros([2, 3, s, s], &device),
/// #     text: Encoded {
/// #         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
/// #         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
/// #     },
/// #     image_ids: None,
/// #     prompt_length: 0,
/// # };
/// // `batch`: two images and their captions (see `TrainBatch`).
/// let train = TrainConfig::new().with_grad_accumulation(2); // two batches per optimiser step
/// let mut trainer = Trainer::new(config.init(&Device::flex()), config, train, &device);
/// trainer.train_batch(&batch, 10)?;
/// assert_eq!(trainer.progress, Progress { epoch: 0, batch: 1, step: 0 });
/// trainer.train_batch(&batch, 10)?;
/// assert_eq!(trainer.progress, Progress { epoch: 0, batch: 2, step: 1 });
/// trainer.end_epoch();
/// assert_eq!(trainer.progress, Progress { epoch: 1, batch: 0, step: 1 });
/// # Ok::<(), blip_train::TrainError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Batches consumed in this epoch.
    pub batch: usize,
    /// Optimiser steps taken.
    pub step: usize,
}

/// What one call of [`Trainer::train_batch`] did.
///
/// ```
/// use blip_train::{PretrainConfig, TrainConfig, Trainer};
/// use burn::tensor::Device;
/// # use blip_text::Encoded;
/// # use blip_train::TrainBatch;
/// # use burn::tensor::Tensor;
///
/// let config = PretrainConfig::tiny(30524);
/// let device = Device::flex().autodiff();
/// # let s = config.blip.vision.image_size;
/// # let batch = TrainBatch {
/// #     pixel_values: Tensor::zeros([2, 3, s, s], &device),
/// #     text: Encoded {
/// #         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
/// #         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
/// #     },
/// #     image_ids: None,
/// #     prompt_length: 0,
/// # };
/// // `batch`: two images and their captions (see `TrainBatch`).
/// let train = TrainConfig::new().with_grad_accumulation(2).with_clip_grad_norm(Some(1.0));
/// let mut trainer = Trainer::new(config.init(&Device::flex()), config, train, &device);
/// let first = trainer.train_batch(&batch, 10)?;
/// assert!(first.lr.is_none() && first.grad_norm.is_none()); // gradients kept, no step yet
/// let second = trainer.train_batch(&batch, 10)?;
/// assert_eq!(second.lr, Some(1e-6)); // the warm-up's first learning rate
/// assert!(second.grad_norm.is_some_and(|norm| norm > 0.0));
/// let names: Vec<&str> = second.losses.iter().map(|(name, _)| name.as_str()).collect();
/// assert_eq!(names, ["itc", "itm", "lm"]);
/// # Ok::<(), blip_train::TrainError>(())
/// ```
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Each objective's value.
    pub losses: Vec<(String, f64)>,
    /// The weighted total.
    pub total: f64,
    /// ITC distillation weight used.
    pub alpha: f64,
    /// Learning rate, when this batch completed an optimiser step.
    pub lr: Option<f64>,
    /// Global gradient norm before clipping, when a step was taken.
    pub grad_norm: Option<f64>,
    /// Seconds spent averaging the gradients over the ranks (0 on one rank).
    pub communication_seconds: f64,
}

/// The model, its distillation state and optimiser, and the position in training.
///
/// ```
/// use blip_text::Encoded;
/// use blip_train::{PretrainConfig, TrainBatch, TrainConfig, Trainer};
/// use burn::tensor::{Device, Tensor};
///
/// # fn main() -> blip_train::Result<()> {
/// let config = PretrainConfig::tiny(30524);
/// let s = config.blip.vision.image_size;
/// let device = Device::flex().autodiff();
/// let batch = TrainBatch {
///     pixel_values: Tensor::zeros([2, 3, s, s], &device),
///     text: Encoded {
///         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
///         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
///     },
///     image_ids: None,
///     prompt_length: 0,
/// };
/// let train = TrainConfig::new();
/// let mut trainer = Trainer::new(config.init(&Device::flex()), config, train, &device);
/// let report = trainer.train_batch(&batch, 100)?;
/// assert!(report.total.is_finite() && report.lr.is_some());
/// // A checkpoint, and a trainer restored from it as a restarted run would be.
/// let root = std::env::temp_dir().join(format!("blip-doc-trainer-{}", std::process::id()));
/// let checkpoint = trainer.save(&root)?;
/// assert_eq!(Trainer::latest_checkpoint(&root)?, Some(checkpoint.clone()));
/// let resumed = Trainer::resume(&checkpoint, &device)?;
/// assert_eq!(resumed.progress, trainer.progress);
/// # std::fs::remove_dir_all(&root).ok();
/// # Ok(())
/// # }
/// ```
pub struct Trainer {
    /// The trainable model.
    pub model: BlipPretrain,
    /// Momentum encoders and queues (`None` when ITC and ITM are off).
    pub distillation: Option<Distillation>,
    /// Model hyper-parameters and loss weights.
    pub config: PretrainConfig,
    /// Optimisation settings.
    pub train: TrainConfig,
    /// Position in training.
    pub progress: Progress,
    /// Negative-sampling generator.
    pub rng: SplitMix64,
    optimizer: ModuleOptimizer,
    accumulator: GradientsAccumulator<BlipPretrain>,
    pending: usize,
    device: Device,
    objectives: Vec<Box<dyn Objective>>,
    /// Objectives a resumed checkpoint was trained with, by name, with their saved
    /// state: each must be added again before training goes on.
    awaited: BTreeMap<String, serde_json::Value>,
    /// The ranks training together.
    collective: Arc<dyn Collective>,
    /// Each rank's negative-sampling state, as a resumed checkpoint saved them.
    saved_rngs: Vec<u64>,
    /// Every rank's negative-sampling state after the last optimiser step (several ranks
    /// only), so that rank 0 can save them without another exchange.
    rank_rngs: Vec<u64>,
    /// Samples per (global) batch of the data [`Self::progress`] counts, once known.
    global_batch: Option<usize>,
    /// What else defines the run (data, batch size, task), saved in checkpoints.
    run_options: serde_json::Value,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("progress", &self.progress)
            .field("config", &self.config)
            .field("train", &self.train)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A trainer starting at step 0. `device` should be an autodiff device
    /// (`Device::flex().autodiff()`); `model` is moved onto it.
    pub fn new(
        model: BlipPretrain,
        config: PretrainConfig,
        train: TrainConfig,
        device: &Device,
    ) -> Self {
        // `fork` keeps a plain module plain; parameters read from files on a plain device
        // are not marked trainable: mark every one, then `train` turns tracking on.
        let model = model.fork(device).map(&mut Trainable).train();
        let distillation = config
            .weights
            .contrastive()
            .then(|| Distillation::new(&model, &config, device));
        let rng = SplitMix64::new(train.seed);
        Self {
            model,
            distillation,
            config,
            train,
            progress: Progress::default(),
            rng,
            optimizer: blip_adamw().init(),
            accumulator: GradientsAccumulator::new(),
            pending: 0,
            device: device.clone(),
            objectives: Vec::new(),
            awaited: BTreeMap::new(),
            collective: Arc::new(SingleProcess),
            saved_rngs: Vec::new(),
            rank_rngs: Vec::new(),
            global_batch: None,
            run_options: serde_json::Value::Null,
        }
    }

    /// Records what else defines this run besides the configs (the data files, the global
    /// batch, the task: whatever a resumed run must keep). They are saved in checkpoints,
    /// and a trainer resumed from a checkpoint that recorded other options refuses them,
    /// naming what differs: that checkpoint belongs to another run. [`Self::join`]
    /// compares them across ranks.
    ///
    /// ```
    /// use blip_train::{PretrainConfig, TrainConfig, Trainer};
    /// use burn::tensor::Device;
    /// use serde_json::json;
    ///
    /// # fn main() -> blip_train::Result<()> {
    /// let config = PretrainConfig::tiny(30524);
    /// let device = Device::flex().autodiff();
    /// let mut trainer = Trainer::new(config.init(&Device::flex()), config, TrainConfig::new(), &device);
    /// trainer.set_run_options(json!({"data": "coco.json", "batch": 64}))?;
    /// let root = std::env::temp_dir().join(format!("blip-doc-options-{}", std::process::id()));
    /// let checkpoint = trainer.save(&root)?;
    /// let mut resumed = Trainer::resume(&checkpoint, &device)?;
    /// let err = resumed.set_run_options(json!({"data": "cc3m.json", "batch": 64})).unwrap_err();
    /// assert!(err.to_string().contains("data: \"coco.json\" vs \"cc3m.json\""), "{err}");
    /// resumed.set_run_options(json!({"data": "coco.json", "batch": 64}))?;
    /// # std::fs::remove_dir_all(&root).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_run_options(&mut self, options: serde_json::Value) -> Result<()> {
        if !self.run_options.is_null() {
            let differences = json_differences(&self.run_options, &options, 8);
            if !differences.is_empty() {
                return Err(TrainError::Distributed(format!(
                    "the checkpoint was written by another run: {} (checkpoint vs now)",
                    differences.join(", ")
                )));
            }
        }
        self.run_options = options;
        Ok(())
    }

    /// Makes this trainer one rank of data-parallel training over `collective` (before its
    /// first step, on every rank at once):
    ///
    /// 1. the ranks' settings are compared by hash: the model and training configs, the
    ///    position in training, and the [run options](Self::set_run_options). Ranks started
    ///    differently are refused, with what differs;
    /// 2. rank 0's weights, momentum encoders and queues are copied to every rank;
    /// 3. each rank draws its own hard negatives and dropout masks (rank 0 keeps the
    ///    single-process streams; a resumed run takes the streams its checkpoint saved).
    ///
    /// From then on every optimiser step averages the gradients over the ranks, the queues
    /// take every rank's momentum features, and only rank 0 writes checkpoints.
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// use blip_train::{Collective, LocalGroup, PretrainConfig, TrainConfig, Trainer};
    /// use burn::tensor::Device;
    /// use serde_json::json;
    ///
    /// let config = PretrainConfig::tiny(30524).with_queue_size(8);
    /// let device = Device::flex().autodiff();
    /// // Two ranks as threads; the second was started with another learning rate.
    /// let errors: Vec<String> = std::thread::scope(|s| {
    ///     let handles: Vec<_> = LocalGroup::ranks(2)
    ///         .into_iter()
    ///         .map(|rank| {
    ///             let (config, device) = (config.clone(), device.clone());
    ///             s.spawn(move || {
    ///                 let lr = if rank.rank() == 0 { 3e-4 } else { 1e-4 };
    ///                 let train = TrainConfig::new().with_init_lr(lr);
    ///                 let model = config.init(&Device::flex());
    ///                 let mut trainer = Trainer::new(model, config, train, &device);
    ///                 trainer.set_run_options(json!({"batch": 8})).unwrap();
    ///                 trainer.join(Arc::new(rank)).unwrap_err().to_string()
    ///             })
    ///         })
    ///         .collect();
    ///     handles.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert!(errors[1].contains("train.init_lr: 0.0003 vs 0.0001"), "{}", errors[1]);
    /// ```
    pub fn join(&mut self, collective: Arc<dyn Collective>) -> Result<()> {
        let (rank, world) = (collective.rank(), collective.world_size());
        let settings = json!({
            "config": serde_json::to_value(&self.config).expect("configs serialise"),
            "train": serde_json::to_value(&self.train).expect("configs serialise"),
            "progress": [self.progress.epoch, self.progress.batch, self.progress.step],
            "objectives": self.objective_names(),
            "options": self.run_options,
        });
        let text = serde_json::to_string(&settings).expect("JSON serialises");
        let hashes = collective.all_gather_i64(&[fingerprint(text.as_bytes()) as i64])?;
        if hashes.iter().any(|&h| h != hashes[0]) {
            // Rare: the full settings are exchanged only to say what differs.
            let all = collective.all_gather_bytes(text.as_bytes())?;
            let reference: serde_json::Value =
                serde_json::from_slice(&all[0]).unwrap_or(serde_json::Value::Null);
            let mut message = Vec::new();
            for (other, bytes) in all.iter().enumerate().skip(1) {
                let theirs = serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null);
                let differences = json_differences(&reference, &theirs, 8);
                if !differences.is_empty() {
                    message.push(format!(
                        "rank {other} differs from rank 0 in {}",
                        differences.join(", ")
                    ));
                }
            }
            return Err(TrainError::Distributed(format!(
                "the ranks were started with different settings: {} (this is rank {rank})",
                message.join("; ")
            )));
        }
        // Handed over as `new` takes a fresh model: plain values, forked and marked trainable.
        self.model = broadcast_module(self.model.clone(), collective.as_ref(), 0)?
            .fork(&self.device)
            .map(&mut Trainable)
            .train();
        if let Some(d) = &self.distillation {
            let record = broadcast_module(DistillationRecord::of(d), collective.as_ref(), 0)?;
            let received = Distillation {
                momentum: record.momentum,
                image_queue: FeatureQueue {
                    features: record.image_queue.val(),
                    ptr: d.image_queue.ptr,
                },
                text_queue: FeatureQueue {
                    features: record.text_queue.val(),
                    ptr: d.text_queue.ptr,
                },
                idx_queue: d.idx_queue.clone(),
            };
            self.adopt_distillation(received)?;
        }
        self.rng = match self.saved_rngs.get(rank) {
            Some(&state) if self.saved_rngs.len() == world => SplitMix64::new(state),
            _ if rank == 0 => self.rng.clone(),
            _ => SplitMix64::new(derive_seed(
                self.train.seed,
                &[RANK_STREAM, rank as u64, self.progress.step as u64],
            )),
        };
        self.collective = collective;
        Ok(())
    }

    /// The ranks this trainer trains with ([`SingleProcess`] unless [`Self::join`]ed).
    ///
    /// ```
    /// use blip_train::{PretrainConfig, TrainConfig, Trainer};
    /// use burn::tensor::Device;
    ///
    /// let config = PretrainConfig::tiny(30524);
    /// let device = Device::flex().autodiff();
    /// let trainer = Trainer::new(config.init(&Device::flex()), config, TrainConfig::new(), &device);
    /// assert_eq!(trainer.collective().world_size(), 1);
    /// assert!(trainer.is_main_rank()); // rank 0 writes checkpoints
    /// assert_eq!(trainer.global_batch(), None); // until `fit` or `set_global_batch`
    /// ```
    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    /// Whether this rank writes checkpoints, metrics and progress (rank 0).
    pub fn is_main_rank(&self) -> bool {
        self.collective.rank() == 0
    }

    /// Samples per global batch of the data [`Self::progress`] counts, when known (set by
    /// [`Self::set_global_batch`], saved in checkpoints).
    pub fn global_batch(&self) -> Option<usize> {
        self.global_batch
    }

    /// Declares the global batch the next batches have (what [`crate::fit()`] does with its
    /// loader's). A resumed run whose checkpoint counted batches of another size (another
    /// number of ranks, or batch size) has its position in the epoch rescaled to the
    /// samples consumed, rounded down to whole batches: at most one batch of samples is
    /// seen twice.
    ///
    /// ```
    /// use blip_train::{PretrainConfig, TrainConfig, Trainer};
    /// use burn::tensor::Device;
    ///
    /// let config = PretrainConfig::tiny(30524);
    /// let device = Device::flex().autodiff();
    /// let mut trainer = Trainer::new(config.init(&Device::flex()), config, TrainConfig::new(), &device);
    /// trainer.set_global_batch(16)?;
    /// trainer.progress.batch = 3; // 48 samples of this epoch consumed
    /// trainer.set_global_batch(32)?; // resumed with twice the ranks
    /// assert_eq!(trainer.progress.batch, 1);
    /// # Ok::<(), blip_train::TrainError>(())
    /// ```
    pub fn set_global_batch(&mut self, global_batch: usize) -> Result<()> {
        if global_batch == 0 {
            return Err(TrainError::Batch("a global batch of 0 samples".into()));
        }
        if let Some(old) = self.global_batch.filter(|&old| old != global_batch) {
            if self.pending != 0 {
                return Err(TrainError::Batch(format!(
                    "the global batch changes from {old} to {global_batch} with accumulated \
                     batches pending"
                )));
            }
            self.progress.batch = self.progress.batch * old / global_batch;
        }
        self.global_batch = Some(global_batch);
        Ok(())
    }

    /// Adds a loss to BLIP's three for every following step (see [`Objective`]). Its
    /// terms appear in [`StepReport::losses`] and the metrics; its name and
    /// [`Objective::save_state`] go into checkpoints. A resumed trainer hands the saved
    /// state back here ([`Objective::load_state`]).
    pub fn add_objective(&mut self, mut objective: impl Objective + 'static) -> Result<()> {
        let name = objective.name().to_string();
        if ["itc", "itm", "lm"].contains(&name.as_str())
            || self.objectives.iter().any(|o| o.name() == name)
        {
            return Err(TrainError::Batch(format!(
                "an objective named `{name}` is already part of training"
            )));
        }
        if let Some(state) = self.awaited.remove(&name) {
            objective.load_state(&state)?;
        }
        self.objectives.push(Box::new(objective));
        Ok(())
    }

    /// The names of the extra objectives, in the order they run.
    pub fn objective_names(&self) -> Vec<String> {
        self.objectives
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    }

    /// The learning rate of the next optimiser step (from the schedule, the epoch and, in
    /// the warm-up, the optimiser steps taken in this epoch).
    pub fn learning_rate(&self) -> f64 {
        let t = &self.train;
        let Progress { epoch, .. } = self.progress;
        match t.schedule {
            LrSchedule::StepDecay if epoch == 0 => {
                let step_in_epoch = self.progress.batch / t.grad_accumulation.max(1);
                warmup_lr(step_in_epoch, t.warmup_steps, t.warmup_lr, t.init_lr)
            }
            LrSchedule::StepDecay => step_decay_lr(epoch, t.init_lr, t.min_lr, t.lr_decay_rate),
            LrSchedule::Cosine => cosine_lr(epoch, t.epochs, t.init_lr, t.min_lr),
        }
    }

    /// One batch: losses, backward, and (every `grad_accumulation` batches) clipping and an
    /// AdamW step. `batches_per_epoch` drives the `α` ramp.
    pub fn train_batch(
        &mut self,
        batch: &TrainBatch,
        batches_per_epoch: usize,
    ) -> Result<StepReport> {
        let alpha = alpha_ramp(
            self.config.alpha,
            self.progress.epoch,
            self.progress.batch,
            batches_per_epoch,
            self.train.alpha_ramp_epochs,
        );
        if let Some(name) = self.awaited.keys().next() {
            return Err(TrainError::Batch(format!(
                "the checkpoint was trained with objective `{name}`: add it again \
                 (Trainer::add_objective) before training on"
            )));
        }
        let model = clamp_model_temperature(self.model.clone());
        // Mixed precision: a half-precision view of the f32 master weights, cast inside the
        // autodiff graph, so that the gradients arrive at the master weights in f32.
        let compute = match self.train.mixed_precision {
            Some(dtype) => {
                check_mixed_precision(&model.temp.val().device(), dtype)?;
                let mut compute = cast_module(model.clone(), dtype);
                // ITC's temperature is a scalar of the losses, not of the model's products.
                compute.temp = model.temp.clone();
                compute
            }
            None => model.clone(),
        };
        let rates = self.config.dropout_rates()?;
        let collective = self.collective.clone();
        let losses = dropout::train(rates, self.dropout_key(), || {
            compute_losses_with(
                &compute,
                self.distillation.as_mut(),
                &self.config,
                batch,
                alpha,
                &mut self.rng,
                &mut self.objectives,
                collective.as_ref(),
            )
        })?;
        let accumulation = self.train.grad_accumulation.max(1);
        let values = losses.values();
        let total = losses.total.clone().into_scalar::<f32>() as f64;
        let grads = losses.gradients(&model, 1.0 / accumulation as f64, collective.as_ref())?;
        // The compute view shares the weights' buffers (all of them in f32); released here
        // so that the optimiser step below finds them unshared.
        drop(compute);
        self.accumulator.accumulate(&model, grads);
        self.model = model;
        self.pending += 1;
        let mut report = StepReport {
            losses: values,
            total,
            alpha,
            lr: None,
            grad_norm: None,
            communication_seconds: 0.0,
        };
        if self.pending == accumulation {
            let lr = self.learning_rate();
            // DDP: one average over the ranks per optimiser step, after accumulation.
            let start = std::time::Instant::now();
            let grads = all_reduce_mean_gradients(
                &self.model,
                self.accumulator.grads(),
                collective.as_ref(),
            )?;
            report.communication_seconds = start.elapsed().as_secs_f64();
            let (grads, norm) = match self.train.clip_grad_norm {
                Some(max) => clip_grad_norm(&self.model, grads, max),
                None => (grads, f64::NAN),
            };
            // The optimiser writes each weight in place where nothing else holds its buffer:
            // it gets the model itself, and a stand-in without weights holds its place.
            let stand_in = self.model.clone().map(&mut Emptied);
            let model = std::mem::replace(&mut self.model, stand_in);
            self.model = self.optimizer.step(lr, model, grads);
            self.pending = 0;
            self.progress.step += 1;
            if collective.world_size() > 1 {
                let states = collective.all_gather_i64(&[self.rng.state() as i64])?;
                self.rank_rngs = states.into_iter().map(|s| s as u64).collect();
            }
            report.lr = Some(lr);
            report.grad_norm = norm.is_finite().then_some(norm);
        }
        self.progress.batch += 1;
        Ok(report)
    }

    /// The dropout stream of the next batch: a function of the seed and the position in
    /// training only, so a resumed run draws the masks an uninterrupted one would.
    /// Ranks other than 0 draw their own masks (rank 0 keeps the single-process stream).
    fn dropout_key(&self) -> u64 {
        let Progress { epoch, batch, .. } = self.progress;
        let position = [DROPOUT_STREAM, epoch as u64, batch as u64];
        match self.collective.rank() {
            0 => derive_seed(self.train.seed, &position),
            rank => derive_seed(self.train.seed, &[&position[..], &[rank as u64]].concat()),
        }
    }

    /// Marks the end of an epoch (the data loader starts the next one from its first batch).
    pub fn end_epoch(&mut self) {
        self.progress.epoch += 1;
        self.progress.batch = 0;
    }

    /// Writes a checkpoint of everything a step changes under `root` and points `latest` at
    /// it. Only between optimiser steps: gradients accumulated for an unfinished step are
    /// not part of a checkpoint.
    ///
    /// In data-parallel training rank 0 alone writes (with every rank's negative-sampling
    /// state, gathered at each optimiser step); on the other ranks it writes nothing and
    /// returns the directory rank 0 writes. It exchanges nothing, so calling it on rank 0
    /// only is fine too.
    pub fn save(&self, root: &Path) -> Result<PathBuf> {
        if self.pending != 0 {
            return Err(TrainError::Checkpoint {
                path: root.to_path_buf(),
                message: format!(
                    "{} of {} accumulated batches pending: save after an optimiser step",
                    self.pending, self.train.grad_accumulation
                ),
            });
        }
        let rngs = match self.rank_rngs.len() {
            n if n > 1 && n == self.collective.world_size() => self.rank_rngs.clone(),
            _ => vec![self.rng.state()],
        };
        let name = format!("step-{:08}", self.progress.step);
        let final_dir = root.join(&name);
        if !self.is_main_rank() {
            return Ok(final_dir);
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        std::fs::create_dir_all(root).map_err(io(root))?;
        let partial = root.join(format!("{name}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;

        save_safetensors(
            &self.model,
            &partial.join("model.safetensors"),
            &PRETRAIN_KEYS,
        )?;
        if let Some(d) = &self.distillation {
            let record = DistillationRecord::of(d);
            save_safetensors(
                &record,
                &partial.join("momentum.safetensors"),
                &PRETRAIN_KEYS,
            )?;
        }
        let optimizer_path = partial.join("optimizer.bpk");
        self.optimizer
            .save(&optimizer_path)
            .map_err(|e| TrainError::Checkpoint {
                path: optimizer_path.clone(),
                message: e.to_string(),
            })?;
        let state = json!({
            "progress": {"epoch": self.progress.epoch, "batch": self.progress.batch, "step": self.progress.step},
            "rng": self.rng.state().to_string(),
            "rngs": rngs.iter().map(u64::to_string).collect::<Vec<_>>(),
            "world_size": self.collective.world_size(),
            "global_batch": self.global_batch,
            "options": self.run_options,
            "queue_ptr": self.distillation.as_ref().map(|d| d.image_queue.ptr),
            "idx_queue": self.distillation.as_ref().map(|d| d.idx_queue.clone()),
            "param_ids": params(&self.model).iter().map(|(id, _)| id.val().to_string()).collect::<Vec<_>>(),
            "config": serde_json::to_value(&self.config).expect("configs serialise"),
            "train": serde_json::to_value(&self.train).expect("configs serialise"),
            "objectives": self
                .objectives
                .iter()
                .map(|o| (o.name().to_string(), o.save_state()))
                .chain(self.awaited.clone())
                .collect::<serde_json::Map<_, _>>(),
        });
        write_synced(
            &partial.join("state.json"),
            serde_json::to_string_pretty(&state)
                .expect("JSON serialises")
                .as_bytes(),
        )?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        std::fs::rename(&partial, &final_dir).map_err(io(&final_dir))?;
        let latest = root.join("latest");
        write_synced(&latest, name.as_bytes())?;
        Ok(final_dir)
    }

    /// The checkpoint `latest` names under `root`, if any.
    pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
        let latest = root.join("latest");
        match std::fs::read_to_string(&latest) {
            Ok(name) => Ok(Some(root.join(name.trim()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TrainError::Io {
                path: latest,
                source,
            }),
        }
    }

    /// The model and its config from a checkpoint directory written by [`Self::save`],
    /// without the training state: the starting point of a fine-tuning run (or of a new
    /// model's pre-training from an old one).
    pub fn load_model(dir: &Path, device: &Device) -> Result<(BlipPretrain, PretrainConfig)> {
        let (_, config) = read_state(dir)?;
        let header = SafetensorsHeader::read(&dir.join("model.safetensors"))?;
        let model = load_safetensors(config.init(device), &header, &PRETRAIN_KEYS)?;
        Ok((model, config))
    }

    /// Restores a trainer from a checkpoint directory written by [`Self::save`]: the next
    /// batch continues exactly where the saved run was.
    pub fn resume(dir: &Path, device: &Device) -> Result<Self> {
        let bad = |message: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message,
        };
        let (state, config) = read_state(dir)?;
        let train: TrainConfig = serde_json::from_value(state["train"].clone())
            .map_err(|e| bad(format!("state.json `train`: {e}")))?;
        let number = |v: &serde_json::Value, what: &str| {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("state.json: `{what}` missing")))
        };
        let progress = Progress {
            epoch: number(&state["progress"]["epoch"], "progress.epoch")?,
            batch: number(&state["progress"]["batch"], "progress.batch")?,
            step: number(&state["progress"]["step"], "progress.step")?,
        };
        let rng = state["rng"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .map(SplitMix64::new)
            .ok_or_else(|| bad("state.json: `rng` missing".into()))?;
        let ids: Vec<ParamId> = state["param_ids"]
            .as_array()
            .ok_or_else(|| bad("state.json: `param_ids` missing".into()))?
            .iter()
            .map(|v| {
                v.as_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(ParamId::from)
            })
            .collect::<Option<_>>()
            .ok_or_else(|| bad("state.json: malformed `param_ids`".into()))?;

        // `new` draws fresh queues of the config's size before the saved ones replace
        // them: that size must first be the saved one, so a config cannot claim more.
        let momentum = config
            .weights
            .contrastive()
            .then(|| saved_queues_header(dir, &config))
            .transpose()?;
        // Everything is read on the plain device and handed over the way `new` takes a
        // fresh model (values read from files are results of ops, not graph leaves).
        let plain = device.clone().inner();
        let header = SafetensorsHeader::read(&dir.join("model.safetensors"))?;
        let model = load_safetensors(config.init(&plain), &header, &PRETRAIN_KEYS)?;
        // The optimiser's moments are keyed by parameter id: give the loaded parameters the
        // ids they had when saved.
        let expected = params(&model).len();
        if ids.len() != expected {
            return Err(bad(format!(
                "{} parameter ids saved, the model has {expected}",
                ids.len()
            )));
        }
        let model = model.map(&mut SetIds(ids.into_iter()));
        let mut trainer = Self::new(model, config, train, device);
        // Both are there exactly when the run computes ITC or ITM.
        if let (Some(fresh), Some(header)) = (&trainer.distillation, &momentum) {
            let saved = read_distillation(dir, header, &state, fresh, &plain)?;
            trainer.adopt_distillation(saved)?;
        }
        let optimizer_path = dir.join("optimizer.bpk");
        check_optimizer_record(&optimizer_path, &params(&trainer.model))?;
        trainer.optimizer =
            trainer
                .optimizer
                .load(&optimizer_path)
                .map_err(|e| TrainError::Checkpoint {
                    path: optimizer_path,
                    message: e.to_string(),
                })?;
        trainer.progress = progress;
        trainer.rng = rng;
        trainer.global_batch = state["global_batch"].as_u64().map(|n| n as usize);
        trainer.run_options = state["options"].clone();
        trainer.saved_rngs = match state["rngs"].as_array() {
            Some(rngs) => rngs
                .iter()
                .map(|v| v.as_str().and_then(|s| s.parse().ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("state.json: malformed `rngs`".into()))?,
            None => Vec::new(),
        };
        if let Some(objectives) = state["objectives"].as_object() {
            trainer.awaited = objectives
                .iter()
                .map(|(name, state)| (name.clone(), state.clone()))
                .collect();
        }
        Ok(trainer)
    }

    /// Takes over momentum encoders and queues from elsewhere, in place of the fresh ones
    /// [`Self::new`] made: the original's `load_checkpoint` keeps them when fine-tuning
    /// starts from a pre-training checkpoint, so the first steps contrast against the
    /// pre-trained queue instead of random vectors. See [`Self::keep_distillation_of`]
    /// (a checkpoint of ours) and [`crate::original::OriginalCheckpoint::pretrain`] (a
    /// `.pth` file). Not calling it is the documented way to start them afresh.
    ///
    /// Queues of another size than `config.queue_size` are an error (the original drops
    /// such tensors silently): set `queue_size` to the checkpoint's, or start afresh. So is
    /// a trainer whose objectives need no distillation (ITC and ITM off).
    pub fn adopt_distillation(&mut self, saved: Distillation) -> Result<()> {
        let current = replaceable(self.distillation.as_mut())?;
        let size = |q: &FeatureQueue| q.features.dims();
        check_queue_shape(size(&saved.image_queue), size(&current.image_queue))?;
        check_queue_shape(size(&saved.text_queue), size(&current.text_queue))?;
        // Rebuilt from host data: forked values keep a link to the ops that read them,
        // which a later backward would find already consumed.
        let record = DistillationRecord::of(&saved)
            .map(&mut FromData(self.device.clone()))
            .no_grad();
        current.momentum = record.momentum;
        current.image_queue = FeatureQueue {
            features: record.image_queue.val().detach(),
            ptr: saved.image_queue.ptr,
        };
        current.text_queue = FeatureQueue {
            features: record.text_queue.val().detach(),
            ptr: saved.text_queue.ptr,
        };
        if saved.idx_queue.len() == current.idx_queue.len() {
            current.idx_queue = saved.idx_queue;
        }
        Ok(())
    }

    /// [`Self::adopt_distillation`] of the momentum encoders and queues saved in the
    /// checkpoint directory `dir` (written by [`Self::save`]). Returns whether it held
    /// any (a checkpoint of a run without ITC and ITM has none).
    pub fn keep_distillation_of(&mut self, dir: &Path) -> Result<bool> {
        let (state, config) = read_state(dir)?;
        let current = replaceable(self.distillation.as_ref())?;
        // Compared before reading: the current state is the layout the file is read into.
        let [dim, queue] = current.image_queue.features.dims();
        check_queue_shape(
            [config.blip.image_text_hidden_size, config.queue_size],
            [dim, queue],
        )?;
        let path = dir.join("momentum.safetensors");
        if !path.is_file() {
            return Ok(false);
        }
        let header = SafetensorsHeader::read(&path)?;
        let plain = self.device.clone().inner();
        let saved = read_distillation(dir, &header, &state, current, &plain)?;
        self.adopt_distillation(saved).map(|()| true)
    }

    /// Whether a checkpoint can be written now (no accumulated gradients pending).
    pub fn can_checkpoint(&self) -> bool {
        self.pending == 0
    }

    /// The device training runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// Stream tag of the negative-sampling generators of ranks other than 0.
const RANK_STREAM: u64 = 4;

/// A checkpoint's `state.json` and the model config it records.
fn read_state(dir: &Path) -> Result<(serde_json::Value, PretrainConfig)> {
    let bad = |message: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io {
        path: path.clone(),
        source,
    })?;
    let state: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    let mut config = state["config"].clone();
    // Checkpoints written before `negative_all_rank` existed trained without it (burn's
    // configs do not fill in missing fields).
    if let Some(fields) = config.as_object_mut() {
        fields
            .entry("negative_all_rank")
            .or_insert(serde_json::Value::Bool(false));
    }
    let config: PretrainConfig =
        serde_json::from_value(config).map_err(|e| bad(format!("state.json `config`: {e}")))?;
    config.validate(&path)?;
    Ok((state, config))
}

/// The trainer's distillation state, which [`Trainer::adopt_distillation`] replaces; an
/// error for a run without ITC and ITM.
fn replaceable<T>(distillation: Option<T>) -> Result<T> {
    distillation.ok_or_else(|| {
        TrainError::Batch("distillation state: this run computes neither ITC nor ITM".into())
    })
}

/// Queues of `saved` shape may replace queues of `current` shape only when they are equal.
fn check_queue_shape(saved: [usize; 2], current: [usize; 2]) -> Result<()> {
    if saved == current {
        return Ok(());
    }
    Err(TrainError::Batch(format!(
        "distillation state: queues of shape {saved:?} saved, this run's are {current:?}: set \
         queue_size to the checkpoint's, or do not keep them"
    )))
}

/// The header of `dir`'s `momentum.safetensors`, once its queues are checked to have the
/// shape `config` gives them (`[image_text_hidden_size, queue_size]`): nothing is read or
/// drawn at that size before.
fn saved_queues_header(dir: &Path, config: &PretrainConfig) -> Result<SafetensorsHeader> {
    let path = dir.join("momentum.safetensors");
    if !path.is_file() {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: "momentum.safetensors missing".into(),
        });
    }
    let header = SafetensorsHeader::read(&path)?;
    let config_shape = vec![config.blip.image_text_hidden_size, config.queue_size];
    for queue in ["image_queue", "text_queue"] {
        let key = PRETRAIN_KEYS.to_checkpoint(queue);
        let saved = match header.tensors.get(&key) {
            Some(info) if info.shape == config_shape => continue,
            Some(info) => format!("{:?}", info.shape),
            None => "absent".into(),
        };
        return Err(TrainError::Checkpoint {
            path,
            message: format!(
                "`{key}` is {saved}; state.json's image_text_hidden_size and queue_size make \
                 {config_shape:?}"
            ),
        });
    }
    Ok(header)
}

/// The momentum encoders and queues of checkpoint directory `dir` (`header`: its
/// `momentum.safetensors`), read into the layout of `template` (the trainer's own, same
/// architecture and queue size) on `device` (a plain one).
fn read_distillation(
    dir: &Path,
    header: &SafetensorsHeader,
    state: &serde_json::Value,
    template: &Distillation,
    device: &Device,
) -> Result<Distillation> {
    let bad = |message: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    let record = load_safetensors(
        DistillationRecord::of(template).fork(device),
        header,
        &PRETRAIN_KEYS,
    )?;
    let ptr = state["queue_ptr"]
        .as_u64()
        .map(|n| n as usize)
        .filter(|&ptr| ptr < template.image_queue.len())
        .ok_or_else(|| bad("state.json: `queue_ptr` missing or beyond the queue".into()))?;
    let idx_queue = state["idx_queue"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_i64()).collect())
        .filter(|q: &Vec<i64>| q.len() == template.idx_queue.len())
        .ok_or_else(|| bad("state.json: `idx_queue` missing or of the wrong size".into()))?;
    Ok(Distillation {
        momentum: record.momentum,
        image_queue: FeatureQueue {
            features: record.image_queue.val(),
            ptr,
        },
        text_queue: FeatureQueue {
            features: record.text_queue.val(),
            ptr,
        },
        idx_queue,
    })
}

/// The momentum encoders and queues as one module, so one safetensors file holds them.
#[derive(Module, Debug)]
struct DistillationRecord {
    momentum: MomentumEncoders,
    image_queue: Param<Tensor<2>>,
    text_queue: Param<Tensor<2>>,
}

impl DistillationRecord {
    fn of(d: &Distillation) -> Self {
        Self {
            momentum: d.momentum.clone(),
            image_queue: Param::from_tensor(d.image_queue.features.clone()),
            text_queue: Param::from_tensor(d.text_queue.features.clone()),
        }
    }
}

/// Writes `path` atomically and durably ([`blip_core::fs::write_atomic`]).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    blip_core::fs::write_atomic(path, |out| out.write_all(bytes)).map_err(|e| TrainError::Io {
        path: e.path,
        source: e.source,
    })
}

/// Float parameters' ids and shapes, in visiting order.
fn params<M: Module>(module: &M) -> Vec<(ParamId, Shape)> {
    struct Params(Vec<(ParamId, Shape)>);
    impl ModuleVisitor for Params {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push((param.id, param.lazy_shape()));
        }
    }
    let mut params = Params(Vec::new());
    module.visit(&mut params);
    params.0
}

/// Checks a saved optimiser record against the model's parameters before burn's loader
/// reads it. That loader takes a record on trust: a tensor that names no parameter panics
/// there, and a moment of another shape than its parameter panics at the first step or,
/// with as many values (a transposed one), silently steps the wrong weights. Only
/// metadata is read; burnpack leaves tensor data on disk until it is used.
fn check_optimizer_record(path: &Path, params: &[(ParamId, Shape)]) -> Result<()> {
    let bad = |message: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let shapes: std::collections::HashMap<u64, &Shape> =
        params.iter().map(|(id, shape)| (id.val(), shape)).collect();
    // burn keys a parameter's state by the id before the first `.` of each entry's name.
    let parameter = |name: &str| {
        name.split_once('.')
            .and_then(|(id, _)| id.parse::<u64>().ok())
            .and_then(|id| Some((id, *shapes.get(&id)?)))
            .ok_or_else(|| bad(format!("`{name}` names no parameter of the model")))
    };
    let reader = burn_pack::Reader::from_file_exact(path).map_err(|e| bad(e.to_string()))?;
    for (name, rank) in reader.scalars() {
        if name.ends_with(".__rank") {
            let (_, shape) = parameter(name)?;
            if usize::try_from(*rank).ok() != Some(shape.num_dims()) {
                return Err(bad(format!(
                    "`{name}` is {rank:?}, its parameter has {} dimensions",
                    shape.num_dims()
                )));
            }
        }
    }
    for tensor in reader.into_tensors().map_err(|e| bad(e.to_string()))? {
        let (id, shape) = parameter(&tensor.name)?;
        if tensor.param_id != Some(id) {
            return Err(bad(format!(
                "tensor `{}` carries parameter id {:?}, its name says {id}",
                tensor.name, tensor.param_id
            )));
        }
        if tensor.shape != *shape || !tensor.dtype.is_float() {
            return Err(bad(format!(
                "tensor `{}` is {:?} {:?}, its parameter is {:?}",
                tensor.name,
                tensor.dtype,
                tensor.shape.as_slice(),
                shape.as_slice()
            )));
        }
    }
    Ok(())
}

/// Every value copied through host memory onto `device`, under a new parameter id.
struct FromData(Device);

impl ModuleMapper for FromData {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        Param::initialized(
            ParamId::new(),
            Tensor::from_data(param.val().into_data(), &self.0),
        )
    }
}

/// Every weight replaced by an empty tensor under the same id: a module that holds no
/// weight buffers.
struct Emptied;

impl ModuleMapper for Emptied {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, value, mapper) = param.consume();
        let empty = Tensor::empty([0; D], (&value.device(), value.dtype()));
        Param::from_mapped_value(id, empty, mapper)
    }
}

struct Trainable;

impl ModuleMapper for Trainable {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad(true)
    }
}

struct SetIds(std::vec::IntoIter<ParamId>);

impl ModuleMapper for SetIds {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, value, mapper) = param.consume();
        let id = self.0.next().unwrap_or(id);
        Param::from_mapped_value(id, value, mapper)
    }
}

/// The mixed-precision compute type must be bf16, on a device that computes in it.
fn check_mixed_precision(device: &Device, dtype: FloatDType) -> Result<()> {
    if dtype != FloatDType::BF16 {
        return Err(blip_core::Error::UnsupportedDType {
            dtype: blip_core::precision::dtype_name(dtype),
            device: format!("{device:?}"),
            reason: "mixed-precision training computes in bf16 (f16 needs loss scaling, \
                     which is not built)",
        }
        .into());
    }
    Ok(blip_core::precision::check_dtype(device, dtype)?)
}
