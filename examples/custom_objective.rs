//! A fourth loss beside ITC, ITM and LM, written outside the crates: it trains, appears in
//! the metrics, is saved in the checkpoint and comes back on resume.
//!
//! ```sh
//! cargo run --release --features train --example custom_objective -- --out runs/objective
//! ```
//!
//! The objective here is *alignment* (Wang & Isola 2020): the mean squared distance between
//! the ITC features of matching image–text pairs, `mean_i ‖v_i − t_i‖²`, weighted 0.5. It
//! keeps a count of the steps it has seen as state, to show that state surviving a resume.
//! The data are 16 generated 32-px images of four colours with two captions each.

mod common;

use std::path::{Path, PathBuf};

use blip::BlipTokenizer;
use blip::train::{
    BatchLoader, FitOptions, LoaderConfig, Objective, PretrainConfig, StepOutputs, Term,
    TextRecipe, TrainConfig, TrainTransform, Trainer, fit, load_annotations,
};
use clap::Parser;
use common::fail;

#[derive(Parser)]
#[command(about = "Train a tiny BLIP with an extra loss, save, resume")]
struct Args {
    /// Directory for the generated data, checkpoints and metrics.
    #[arg(long, default_value = "runs/objective")]
    out: PathBuf,
    /// Weight of the alignment term.
    #[arg(long, default_value_t = 0.5)]
    weight: f64,
}

/// `mean_i ‖v_i − t_i‖²` over the batch's matching pairs.
struct Alignment {
    weight: f64,
    steps: u64,
}

impl Objective for Alignment {
    fn name(&self) -> &str {
        "align"
    }

    fn terms(&mut self, step: &StepOutputs<'_>) -> blip::train::Result<Vec<Term>> {
        self.steps += 1;
        let (Some(v), Some(t)) = (&step.image_features, &step.text_features) else {
            return Ok(vec![]); // ITC and ITM are off: no features to align
        };
        let loss = (v.clone() - t.clone()).powi_scalar(2).sum_dim(1).mean();
        Ok(vec![Term {
            name: "align".into(),
            weight: self.weight,
            loss,
        }])
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "steps": self.steps })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> blip::train::Result<()> {
        self.steps = state["steps"].as_u64().unwrap_or(0);
        Ok(())
    }
}

/// 16 images of four colours in BLIP's annotation format.
fn data_set(dir: &Path) -> PathBuf {
    let colours = [
        ("red", [220, 30, 30]),
        ("green", [30, 200, 40]),
        ("blue", [30, 40, 220]),
        ("yellow", [230, 220, 30]),
    ];
    std::fs::create_dir_all(dir.join("images")).unwrap_or_else(|e| fail(&e.to_string()));
    let mut records = Vec::new();
    for i in 0..16u32 {
        let (name, rgb) = colours[i as usize % 4];
        let image = image::RgbImage::from_fn(32, 32, |x, y| {
            if (x / 8 + y / 8 + i).is_multiple_of(2) {
                image::Rgb(rgb)
            } else {
                image::Rgb([250, 250, 250])
            }
        });
        let file = format!("images/{i}.png");
        image
            .save(dir.join(&file))
            .unwrap_or_else(|e| fail(&e.to_string()));
        records.push(serde_json::json!({
            "image": file,
            "caption": [format!("a {name} board"), format!("{name} squares")],
        }));
    }
    let path = dir.join("train.json");
    std::fs::write(&path, serde_json::to_string(&records).expect("JSON"))
        .unwrap_or_else(|e| fail(&e.to_string()));
    path
}

fn main() {
    let args = Args::parse();
    let or_fail = |e: blip::train::TrainError| -> ! { fail(&e.to_string()) };
    let tokenizer = BlipTokenizer::from_vocab(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/vocab.txt"),
    )
    .unwrap_or_else(|e| fail(&e.to_string()));
    let annotations = load_annotations(&data_set(&args.out), &args.out).unwrap_or_else(|e| {
        fail(&e.to_string());
    });
    let loader = BatchLoader::new(
        annotations,
        TrainTransform::pretrain(32),
        LoaderConfig::new(8),
    )
    .unwrap_or_else(|e| fail(&e.to_string()));
    let mut config = PretrainConfig::tiny(tokenizer.vocab_size())
        .with_tokenizer(&tokenizer)
        .with_queue_size(16);
    config.blip.vision.image_size = 32;
    let device = blip::backend_device("cpu").unwrap_or_else(|e| fail(&e.to_string()));
    let train_device = device.clone().autodiff();
    let train = TrainConfig::new().with_epochs(4).with_warmup_steps(2);
    let mut options = FitOptions::new(TextRecipe::pretrain());
    options.metrics = Some(args.out.join("metrics.jsonl"));
    options.max_steps = Some(4);

    // Four steps with the extra loss, then a checkpoint.
    let mut trainer = Trainer::new(config.init(&device), config, train, &train_device);
    let alignment = |weight| Alignment { weight, steps: 0 };
    trainer
        .add_objective(alignment(args.weight))
        .unwrap_or_else(|e| or_fail(e));
    let report = fit(&mut trainer, &loader, &tokenizer, &options).unwrap_or_else(|e| or_fail(e));
    println!("before the stop: {:?}", report.last_losses);

    let checkpoint = trainer
        .save(&args.out.join("checkpoints"))
        .unwrap_or_else(|e| or_fail(e));

    // A new process would do this: resume, give the objective back, go on.
    let mut resumed = Trainer::resume(&checkpoint, &train_device).unwrap_or_else(|e| or_fail(e));
    resumed
        .add_objective(alignment(args.weight))
        .unwrap_or_else(|e| or_fail(e));
    options.max_steps = None;
    let report = fit(&mut resumed, &loader, &tokenizer, &options).unwrap_or_else(|e| or_fail(e));
    println!("after the resume: {:?}", report.last_losses);
    println!(
        "metrics (loss_align per step) in {}",
        args.out.join("metrics.jsonl").display()
    );
}
