//! CapFilt over a web data set: a captioner writes synthetic captions, a filter keeps the
//! texts (web and synthetic) its ITM head matches to the image.
//!
//! ```sh
//! cargo run --release --features capfilt --example capfilt -- \
//!     --captioner Salesforce/blip-image-captioning-large --filter Salesforce/blip-itm-large-coco \
//!     --first-token cls --input web.json --out cleaned/
//! # one share of LAION-style shards per machine (a Slurm array, a Kubernetes indexed Job) ...
//! cargo run --release --features capfilt --example capfilt -- --captioner C --filter F \
//!     --input 'shards/{00000..00999}.tar' --out cleaned/ --shard $TASK_INDEX/64
//! # ... then, once every shard is done, anywhere:
//! cargo run --release --features capfilt --example capfilt -- --merge --out cleaned/
//! ```
//!
//! A run killed at any moment and started again with the same command finishes with the
//! output of an uninterrupted run.

mod common;

use std::path::PathBuf;

use blip::capfilt::{BlipCapFilt, CapFiltSettings, CaptionStrategy, RunOptions, Shard, merge, run};
use blip::text::FirstToken;
use clap::{Parser, ValueEnum};
use common::fail;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum First {
    /// `[ENC]`, as the original retrieval model (the paper's filter) was trained.
    Enc,
    /// `[CLS]`, as transformers runs its ITM checkpoints.
    Cls,
}

#[derive(Parser, Debug)]
#[command(about = "CapFilt: caption and filter a web image-text data set")]
struct Args {
    /// Captioner: a HF captioning directory or hub id.
    #[arg(long, required_unless_present = "merge")]
    captioner: Option<String>,
    /// Filter: a HF ITM/retrieval directory or hub id.
    #[arg(long, required_unless_present = "merge")]
    filter: Option<String>,
    /// BLIP JSON / JSON lines, a .tar, a directory of .tar files, or a brace pattern.
    #[arg(long, required_unless_present = "merge")]
    input: Option<String>,
    /// Image root of a JSON input (default: the JSON file's directory).
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Only merge the shards already in --out.
    #[arg(long)]
    merge: bool,
    /// The share of the input this run takes, `i/N`.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Samples per atomically committed chunk.
    #[arg(long, default_value_t = 256)]
    chunk_size: usize,
    /// Keep a text when its ITM match probability is at least this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Beam search with this many beams instead of nucleus sampling.
    #[arg(long)]
    beam: Option<usize>,
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Synthetic captions per image.
    #[arg(long, default_value_t = 1)]
    num_captions: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 5)]
    min_length: usize,
    #[arg(long, default_value_t = 20)]
    max_length: usize,
    #[arg(long, default_value_t = 1.1)]
    repetition_penalty: f64,
    #[arg(long, default_value = "a picture of ")]
    prompt: String,
    #[arg(long, value_enum, default_value = "enc")]
    first_token: First,
    /// Stop after committing this many chunks (the rest on a later run).
    #[arg(long)]
    max_chunks: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let args = Args::parse();
    let print = |summary: &blip::capfilt::Summary| {
        if args.json {
            println!(
                "{}",
                serde_json::to_string(summary).expect("a summary serialises")
            );
        } else {
            println!("{summary}");
        }
    };
    if args.merge {
        match merge(&args.out) {
            Ok(summary) => print(&summary),
            Err(e) => fail(&e.to_string()),
        }
        return;
    }
    let (Some(captioner), Some(filter), Some(input)) = (&args.captioner, &args.filter, &args.input)
    else {
        fail("--captioner, --filter and --input are required");
    };
    let device = common::device(&args.device);
    let settings = CapFiltSettings {
        strategy: match args.beam {
            Some(num_beams) => CaptionStrategy::Beam { num_beams },
            None => CaptionStrategy::Nucleus { top_p: args.top_p },
        },
        num_captions: args.num_captions,
        prompt: args.prompt.clone(),
        min_length: args.min_length,
        max_length: args.max_length,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        first_token: match args.first_token {
            First::Enc => FirstToken::Enc,
            First::Cls => FirstToken::Cls,
        },
        ..CapFiltSettings::default()
    };
    // Before loading the models: a bad option fails at once (run checks it again, with
    // the captioner's prompt and position limits, before writing anything).
    settings.validate().unwrap_or_else(|e| fail(&e.to_string()));
    let mut model = BlipCapFilt::load(
        &common::model_dir(captioner),
        &common::model_dir(filter),
        (captioner.clone(), filter.clone()),
        settings.clone(),
        &device,
    )
    .unwrap_or_else(|e| fail(&e.to_string()));
    let mut options = RunOptions::new(input.clone(), &args.out);
    options.image_root = args.image_root.clone();
    options.shard = args.shard;
    options.batch_size = args.batch_size;
    options.chunk_size = args.chunk_size;
    options.threshold = args.threshold;
    options.generation = settings.to_json();
    options.max_chunks = args.max_chunks;
    options.progress = (!args.quiet).then(|| common::progress_sink("images"));
    let report = run(&options, &mut model).unwrap_or_else(|e| fail(&e.to_string()));
    eprintln!(
        "shard {}: {} chunks committed now, {} before; {} images processed, {} skipped",
        args.shard,
        report.chunks_committed,
        report.chunks_already_done,
        report.images_processed,
        report.images_skipped
    );
    match &report.summary {
        Some(summary) => print(summary),
        None if report.complete => {
            eprintln!("shard complete; run with --merge once every shard is done")
        }
        None => eprintln!("stopped early; run the same command again to continue"),
    }
}
