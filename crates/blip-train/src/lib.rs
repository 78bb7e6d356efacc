//! BLIP's pre-training objectives as plain functions over tensors.
//!
//! Each loss takes the tensors it needs and returns a 1-element tensor, with its formula in
//! the doc comment, so a researcher can combine them by weights or add a fourth without
//! touching the others:
//!
//! * [`itc_loss`]: image–text contrastive loss with momentum-distilled soft targets over a
//!   feature queue (ALBEF/BLIP);
//! * [`itm_loss`]: image–text matching on positives and mined hard negatives, with
//!   [`hard_negative_weights`] and [`sample_negatives`] (seeded) for the mining;
//! * [`lm_loss`]: the decoder's label-smoothed language-modelling loss (from `blip-text`,
//!   where captioning fine-tuning and inference also use it).
//!
//! The distillation state lives beside them: [`momentum_update`] (the EMA of the momentum
//! encoders), [`FeatureQueue`] (the image/text feature queues) and [`clamp_temperature`].
//!
//! Around them: the pre-training model with the encoder/decoder weight sharing
//! ([`model`]), one weighted step of the objectives ([`pretrain`]), the optimiser loop with
//! exactly resumable checkpoints ([`trainer`]), and the data pipeline (annotations,
//! `pre_caption`, the original augmentation, batches prepared in parallel).
//!
//! This crate builds on the inference crates (`blip-core` ← `blip-vision` ← `blip-text` ←
//! `blip-train`).

#![warn(missing_docs)]

mod augment;
mod data;
mod distributed;
mod error;
pub mod fit;
pub mod init;
mod losses;
pub mod model;
mod momentum;
mod optim;
pub mod original;
pub mod pretrain;
mod schedule;
pub mod trainer;
mod vqa;

pub use augment::{AutoContrast, CropBox, RandAugOp, TrainTransform, normalize};
pub use blip_core::{SplitMix64, pre_caption, pre_question};
pub use blip_text::{lm_labels, lm_loss};
pub use data::{
    Annotation, Batch, BatchLoader, Batches, DataError, LoaderConfig, Location, load_annotations,
};
#[cfg(feature = "mpi")]
pub use distributed::MpiCollective;
pub use distributed::{
    Collective, LocalGroup, SingleProcess, all_reduce_mean_gradients, broadcast_module,
};
pub use error::{Result, TrainError};
pub use fit::{FitOptions, FitReport, TextRecipe, fit};
pub use init::{InitReport, InitSource, text_config_of, vision_config_of};
pub use losses::{
    alpha_ramp, hard_negative_weights, itc_loss, itm_labels, itm_loss, sample_negatives,
};
pub use model::{BlipPretrain, LossWeights, MomentumEncoders, PretrainConfig, SharedDecoder};
pub use momentum::{
    FeatureQueue, QueueSizeError, clamp_temperature, momentum_copy, momentum_update,
};
pub use optim::{BlipAdamW, blip_adamw, clip_grad_norm};
pub use original::{Family, OriginalCheckpoint};
pub use pretrain::{
    Distillation, Losses, Objective, StepOutputs, Term, TrainBatch, compute_losses,
    compute_losses_with,
};
pub use schedule::{cosine_lr, step_decay_lr, warmup_lr};
pub use trainer::{LrSchedule, Progress, StepReport, TrainConfig, Trainer};
pub use vqa::{VqaBatch, vqa_loss};
