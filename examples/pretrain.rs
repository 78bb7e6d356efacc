//! Pre-train (or fine-tune) a BLIP model on a BLIP-format data set.
//!
//! ```sh
//! # pre-train a tiny BLIP on the CPU, checkpointing as it goes (rerun with --resume)
//! cargo run --release --features train --example pretrain -- \
//!     --annotations data/train.json --image-root data --size tiny --epochs 5 \
//!     --checkpoint-dir runs/tiny --metrics runs/tiny/metrics.jsonl
//! # fine-tune a captioner and a filter from it, exported in the HF layout
//! cargo run --release --features train --example pretrain -- --task caption \
//!     --init runs/tiny/step-00000500 --annotations data/clean.json --export-captioner out/captioner
//! cargo run --release --features train --example pretrain -- --task retrieval \
//!     --init runs/tiny/step-00000500 --annotations data/clean.json --export-filter out/filter
//! # pre-train a new model on the clean set plus CapFilt's output (see examples/capfilt.rs)
//! cargo run --release --features train --example pretrain -- --annotations data/clean.json \
//!     --annotations cleaned/annotations.json --image-root data --image-root data/web-root
//! # start as BLIP does: the ViT from DeiT-B, the text transformers from BERT
//! cargo run --release --features train --example pretrain -- --annotations data/train.json \
//!     --size base --init-vision deit-base-patch16-224 --init-text bert-base-uncased \
//!     --tokenizer bert-base-uncased/vocab.txt
//! # training throughput at base size (random weights), a few steps
//! cargo run --release --features train --example pretrain -- --annotations data/train.json \
//!     --size base --batch-size 4 --max-steps 3
//! ```

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use blip::BlipTokenizer;
use blip::train::original::OriginalCheckpoint;
use blip::train::{
    BatchLoader, Collective, FitOptions, LoaderConfig, LocalGroup, PretrainConfig, SingleProcess,
    TextRecipe, TrainConfig, TrainTransform, Trainer, fit, load_annotations, text_config_of,
    vision_config_of,
};
use burn::module::Module;
use clap::{Parser, ValueEnum};
use common::fail;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Task {
    /// ITC + ITM + LM on image–text pairs, step-decay schedule.
    Pretrain,
    /// Captioner: LM on "a picture of " + caption (prompt masked), cosine schedule.
    Caption,
    /// Filter: ITC + ITM with image ids, cosine schedule.
    Retrieval,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Augment {
    Blip,
    Mild,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Distributed {
    /// One process, one device.
    None,
    /// One process per rank, started by `mpirun -np N` or Slurm's `srun` (build with the
    /// `mpi` feature); each rank drives its local rank's GPU with `--device cuda`.
    Mpi,
    /// One process, `--ranks` threads, one device each (`cuda:0`, `cuda:1`, ... with
    /// `--device cuda`; CPU ranks share the cores).
    Threads,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Size {
    /// ViT and MED of width 64, 2 layers (a few MB).
    Tiny,
    /// BLIP with ViT-B/16.
    Base,
    /// BLIP with ViT-L/16.
    Large,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Pre-train or fine-tune BLIP on a BLIP-format data set")]
struct Args {
    /// BLIP annotation file: a JSON array or JSON lines of {"image", "caption"}. Repeat it
    /// to train on several (e.g. a clean set and CapFilt's `annotations.json`).
    #[arg(long, required = true)]
    annotations: Vec<PathBuf>,
    /// Directory the image paths are relative to, one per `--annotations` in order (default:
    /// each annotation file's own directory).
    #[arg(long)]
    image_root: Vec<PathBuf>,
    /// `vocab.txt` or `tokenizer.json` (default: bert-base-uncased from the test fixtures).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "pretrain")]
    task: Task,
    /// Model size for a model trained from scratch (ignored with --init/--resume).
    #[arg(long, value_enum, default_value = "tiny")]
    size: Size,
    /// Input resolution (default: 64 tiny, 224 base/large).
    #[arg(long)]
    image_size: Option<usize>,
    /// Start from the weights of this checkpoint directory (a fine-tuning run), or of an
    /// original salesforce/BLIP pre-training `.pth` file (`model_base.pth`,
    /// `model_base_capfilt_large.pth`).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Start the ViT from an ImageNet checkpoint (a transformers ViT/DeiT or timm ViT
    /// directory or `.safetensors` file), as BLIP starts from DeiT-B; only without --init.
    #[arg(long, conflicts_with = "init")]
    init_vision: Option<PathBuf>,
    /// Start the text encoder and decoder from a BERT checkpoint (transformers `BertModel`
    /// or `BertForMaskedLM`, e.g. bert-base-uncased); only without --init.
    #[arg(long, conflicts_with = "init")]
    init_text: Option<PathBuf>,
    /// With --init: start the momentum encoders and ITC queues afresh instead of keeping
    /// the checkpoint's (the original keeps them).
    #[arg(long)]
    reset_distillation: bool,
    /// Continue the run in --checkpoint-dir from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Samples per optimiser step's batch, over all ranks together (each of N ranks takes
    /// batch-size / N; N must divide it).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long)]
    epochs: Option<usize>,
    /// Peak learning rate (default: the task's, 3e-4 pre-training, 1e-5 fine-tuning).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long, default_value_t = 1)]
    grad_accumulation: usize,
    /// Clip the global gradient norm.
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    /// Mixed precision: compute in bf16, keep the weights and optimiser state in f32.
    #[arg(long, value_name = "bf16")]
    mixed_precision: Option<String>,
    /// ITC queue size (default: the model size's; the batch must divide it).
    #[arg(long)]
    queue_size: Option<usize>,
    /// Momentum of the ITC momentum encoders (BLIP: 0.995).
    #[arg(long)]
    momentum: Option<f64>,
    /// Seed of the initialisation, the data order, augmentation and dropout: two runs with
    /// the same seed and thread count train alike.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Append per-step metrics as JSON lines to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Write the trained captioner here in the HF layout.
    #[arg(long)]
    export_captioner: Option<PathBuf>,
    /// Write the trained filter (ITM + ITC) here in the HF layout.
    #[arg(long)]
    export_filter: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Threads decoding and augmenting images.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Training augmentation: the original's (crop 0.2–1 pre-training, 0.5–1 fine-tuning,
    /// flip, RandAugment), `mild` (crop 0.8–1 only: for data whose captions name colours and
    /// sides, which flips and colour operations falsify) or `none`.
    #[arg(long, value_enum, default_value = "blip")]
    augment: Augment,
    /// Data-parallel training: gradients averaged over the ranks at every step, the ITC
    /// queues fed by every rank, checkpoints written by rank 0 in the usual format.
    #[arg(long, value_enum, default_value = "none")]
    distributed: Distributed,
    /// Number of ranks with `--distributed threads`.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
}

fn tokenizer(path: Option<&PathBuf>) -> BlipTokenizer {
    let path = path.cloned().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/vocab.txt")
    });
    let loaded = if path.extension().is_some_and(|e| e == "json") {
        BlipTokenizer::from_file(&path)
    } else {
        BlipTokenizer::from_vocab(&path)
    };
    loaded.unwrap_or_else(|e| fail(&e.to_string()))
}

fn main() {
    common::one_malloc_arena();
    let args = Args::parse();
    // Processes started by a launcher without --distributed mpi would each train alone
    // and overwrite each other's checkpoints.
    // (Set by the launcher for the processes it starts; a Slurm batch script's own
    // environment has none of them.)
    let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| Some((*k, std::env::var(k).ok()?.parse::<usize>().ok()?)))
        .filter(|&(_, n)| n > 1);
    if let (Some((variable, n)), false) = (launched, args.distributed == Distributed::Mpi) {
        fail(&format!(
            "started as one of {n} processes ({variable}={n}) without --distributed mpi: \
             each would train alone; pass --distributed mpi"
        ));
    }
    match args.distributed {
        Distributed::None => run(&args, Arc::new(SingleProcess)),
        Distributed::Mpi => {
            #[cfg(feature = "mpi")]
            {
                let mpi =
                    blip::train::MpiCollective::init().unwrap_or_else(|e| fail(&e.to_string()));
                run(&args, Arc::new(mpi));
            }
            #[cfg(not(feature = "mpi"))]
            fail(
                "--distributed mpi needs a build with the `mpi` feature (cargo build --features mpi)",
            );
        }
        Distributed::Threads => {
            if args.ranks == 0 {
                fail("--ranks 0: at least one rank");
            }
            LocalGroup::run(args.ranks, |rank| run(&args, Arc::new(rank)))
                .unwrap_or_else(|e| fail(&e.to_string()));
        }
    }
}

/// One rank's training (the only one without --distributed). An error ends the whole
/// process: under mpirun, the launcher then ends the other ranks.
fn run(args: &Args, collective: Arc<dyn Collective>) {
    let (rank, world) = (collective.rank(), collective.world_size());
    // Rank r of several drives GPU r of its machine.
    let device_name = match args.device.as_str() {
        "cuda" if world > 1 => format!("cuda:{}", collective.local_rank()),
        name => name.to_string(),
    };
    let device = common::device(&device_name);
    let train_device = device.clone().autodiff();
    let tokenizer = tokenizer(args.tokenizer.as_ref());
    let or_fail = |e: blip::train::TrainError| -> ! {
        match world {
            1 => fail(&e.to_string()),
            _ => fail(&format!("rank {rank}: {e}")),
        }
    };
    let main_rank = rank == 0;

    let (recipe, mut train) = match args.task {
        Task::Pretrain => (TextRecipe::pretrain(), TrainConfig::pretrain()),
        Task::Caption => (TextRecipe::caption(), TrainConfig::finetune_caption()),
        Task::Retrieval => (TextRecipe::retrieval(), TrainConfig::finetune_retrieval()),
    };
    train =
        train
            .with_seed(args.seed)
            .with_grad_accumulation(args.grad_accumulation)
            .with_clip_grad_norm(args.clip_grad_norm)
            .with_mixed_precision(args.mixed_precision.as_deref().map(|name| {
                blip::float_dtype(name).unwrap_or_else(|e| common::fail(&e.to_string()))
            }));
    if let Some(lr) = args.lr {
        train = train.with_init_lr(lr);
    }
    if let Some(epochs) = args.epochs {
        train = train.with_epochs(epochs);
    }
    if let Some(warmup) = args.warmup_steps {
        train = train.with_warmup_steps(warmup);
    }

    let requested_train = train.clone();
    let resume_from = match (&args.checkpoint_dir, args.resume) {
        (Some(dir), true) => Trainer::latest_checkpoint(dir).unwrap_or_else(|e| or_fail(e)),
        (None, true) => fail("--resume needs --checkpoint-dir"),
        _ => None,
    };
    let mut trainer = if let Some(checkpoint) = &resume_from {
        if main_rank {
            eprintln!("resuming from {}", checkpoint.display());
        }
        Trainer::resume(checkpoint, &train_device).unwrap_or_else(|e| or_fail(e))
    } else {
        let preset = |size: Size| {
            let mut config = match size {
                Size::Tiny => PretrainConfig::tiny(tokenizer.vocab_size()),
                Size::Base => PretrainConfig::base(),
                Size::Large => PretrainConfig::large(),
            }
            .with_tokenizer(&tokenizer);
            if let Some(size) = args.image_size {
                config.blip.vision.image_size = size;
            }
            config
        };
        let (model, mut config, saved_distillation) = match &args.init {
            // An original salesforce/BLIP file (`model_base.pth`): its ViT width says
            // whether it is BLIP-base or -large; anything else takes --size.
            Some(file) if file.is_file() => {
                let checkpoint = OriginalCheckpoint::open(file).unwrap_or_else(|e| or_fail(e));
                let width = checkpoint
                    .shape("visual_encoder.cls_token")
                    .and_then(|s| s.last().copied());
                let config = preset(match width {
                    Some(768) => Size::Base,
                    Some(1024) => Size::Large,
                    _ => args.size,
                });
                let (model, distillation) = checkpoint
                    .pretrain(&config, &device)
                    .unwrap_or_else(|e| or_fail(e));
                (model, config, distillation)
            }
            Some(dir) => {
                let (model, config) =
                    Trainer::load_model(dir, &device).unwrap_or_else(|e| or_fail(e));
                (model, config, None)
            }
            None => {
                let mut config = preset(args.size);
                // Sizes follow the checkpoints the encoders start from.
                if let Some(dir) = &args.init_text {
                    config.blip.text = text_config_of(dir, config.blip.text.clone())
                        .unwrap_or_else(|e| or_fail(e));
                }
                if let Some(dir) = &args.init_vision {
                    config.blip.vision = vision_config_of(dir, config.blip.vision.clone())
                        .unwrap_or_else(|e| or_fail(e));
                }
                config.blip.text.encoder_hidden_size = config.blip.vision.hidden_size;
                // The initialisation is part of what --seed fixes.
                device.seed(args.seed);
                let mut model = config.init(&device);
                if let Some(dir) = &args.init_vision {
                    let (m, report) = model.init_vision_from(dir).unwrap_or_else(|e| or_fail(e));
                    if main_rank {
                        eprintln!("ViT: {report}");
                    }
                    model = m;
                }
                if let Some(dir) = &args.init_text {
                    let (m, report) = model.init_text_from(dir).unwrap_or_else(|e| or_fail(e));
                    if main_rank {
                        eprintln!("text: {report}");
                    }
                    model = m;
                }
                (model, config, None)
            }
        };
        config.weights = match args.task {
            Task::Pretrain => config.weights.with_itc(1.0).with_itm(1.0).with_lm(1.0),
            Task::Caption => config.weights.with_itc(0.0).with_itm(0.0).with_lm(1.0),
            Task::Retrieval => config.weights.with_itc(1.0).with_itm(1.0).with_lm(0.0),
        };
        config.max_length = recipe.max_length;
        if let Some(m) = args.momentum {
            config.momentum = m;
        }
        if let Some(k) = args.queue_size {
            config.queue_size = k;
        } else if config.queue_size % args.batch_size != 0 {
            // the largest multiple of the batch that fits the preset's queue
            config.queue_size = (config.queue_size / args.batch_size).max(1) * args.batch_size;
        }
        let mut trainer = Trainer::new(model, config, train, &train_device);
        // As the original's load_checkpoint: fine-tuning from a pre-training checkpoint
        // keeps its momentum encoders and queues (unless asked not to).
        if let Some(init) = args.init.as_ref().filter(|_| !args.reset_distillation)
            && trainer.distillation.is_some()
        {
            let kept = match saved_distillation {
                Some(saved) => trainer.adopt_distillation(saved).map(|()| true),
                None if init.is_dir() => trainer.keep_distillation_of(init),
                None => Ok(false),
            }
            .unwrap_or_else(|e| or_fail(e));
            if kept && main_rank {
                eprintln!(
                    "kept the momentum encoders and queues of {} (--reset-distillation starts them afresh)",
                    init.display()
                );
            }
        }
        trainer
    };
    if trainer.config.blip.text.vocab_size != tokenizer.vocab_size() {
        fail(&format!(
            "the model's vocabulary has {} tokens, the tokenizer {}: pass the tokenizer it was trained with",
            trainer.config.blip.text.vocab_size,
            tokenizer.vocab_size()
        ));
    }

    if args.image_root.len() > args.annotations.len() {
        fail("more --image-root than --annotations");
    }
    let mut annotations = Vec::new();
    for (i, file) in args.annotations.iter().enumerate() {
        let root = args
            .image_root
            .get(i)
            .cloned()
            .unwrap_or_else(|| file.parent().map(PathBuf::from).unwrap_or_default());
        annotations.extend(load_annotations(file, &root).unwrap_or_else(|e| fail(&e.to_string())));
    }
    let image_size = trainer.config.blip.vision.image_size;
    let original = match args.task {
        Task::Pretrain => TrainTransform::pretrain(image_size),
        _ => TrainTransform::finetune(image_size),
    };
    let transform = match args.augment {
        Augment::Blip => original,
        Augment::Mild | Augment::None => TrainTransform {
            min_scale: if args.augment == Augment::Mild {
                0.8
            } else {
                1.0
            },
            hflip: false,
            rand_augment: false,
            ..original
        },
    };
    let mut loader_config = LoaderConfig::new(args.batch_size).shard(rank, world);
    loader_config.workers = args.workers.max(1);
    loader_config.seed = args.seed;
    loader_config.max_words = 30;
    let loader = BatchLoader::new(annotations, transform, loader_config)
        .unwrap_or_else(|e| fail(&e.to_string()));
    // What a resumed run, and every rank, must share besides the configs; the number of
    // ranks, devices, workers and step limits may change.
    let run_options = serde_json::json!({
        "task": format!("{:?}", args.task),
        "annotations": args.annotations,
        "image_root": args.image_root,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "augment": format!("{:?}", args.augment),
        "vocab_size": tokenizer.vocab_size(),
        "train": serde_json::to_value(&requested_train).expect("configs serialise"),
    });
    trainer
        .set_run_options(run_options)
        .unwrap_or_else(|e| or_fail(e));
    trainer.join(collective).unwrap_or_else(|e| or_fail(e));

    let mut options = FitOptions::new(recipe);
    options.checkpoint_dir = args.checkpoint_dir.clone();
    options.checkpoint_every = args.checkpoint_every;
    options.metrics = args.metrics.clone();
    options.progress = main_rank.then(|| common::progress_sink("batches"));
    options.max_steps = args.max_steps;
    if main_rank {
        eprintln!(
            "{} parameters, {} pairs, {} batches per epoch of {} samples ({} ranks), {} epochs",
            trainer.model.num_params(),
            loader.annotations().len(),
            loader.batches_per_epoch(),
            args.batch_size,
            world,
            trainer.train.epochs
        );
    }
    let start = Instant::now();
    let report = fit(&mut trainer, &loader, &tokenizer, &options).unwrap_or_else(|e| or_fail(e));
    if !main_rank {
        return;
    }
    let losses: Vec<String> = report
        .last_losses
        .iter()
        .map(|(n, v)| format!("{n} {v:.4}"))
        .collect();
    println!(
        "trained {} batches ({} samples) in {:.1} s: {:.2} samples/s in model steps; last losses: {}",
        report.batches,
        report.samples,
        start.elapsed().as_secs_f64(),
        report.samples_per_second(),
        losses.join(", ")
    );
    if world > 1 {
        println!(
            "{world} ranks: {:.3} s per batch averaging gradients, {:.1} % of the model steps' time",
            report.communication_seconds / report.batches.max(1) as f64,
            100.0 * report.communication_seconds / report.seconds.max(1e-9)
        );
    }
    let blip = trainer.config.blip.clone();
    if let Some(dir) = &args.export_captioner {
        trainer
            .model
            .save_captioner(&blip, &tokenizer, dir)
            .unwrap_or_else(|e| or_fail(e));
        println!("captioner written to {}", dir.display());
    }
    if let Some(dir) = &args.export_filter {
        trainer
            .model
            .save_filter(&blip, &tokenizer, dir)
            .unwrap_or_else(|e| or_fail(e));
        println!("filter written to {}", dir.display());
    }
}
