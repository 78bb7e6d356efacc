//! Captions images with a BLIP captioning checkpoint.
//!
//! ```sh
//! # with no --model: the demo captioner trained on the generated world (assets/demo), offline
//! cargo run --release --example caption -- assets/demo/images/
//! cargo run --release --example caption -- --model Salesforce/blip-image-captioning-base photo.jpg photos/
//! cargo run --release --example caption -- --model DIR --num-beams 3 --min-length 5 --json photos/
//! cargo run --release --example caption -- --model DIR --sample --top-p 0.9 --seed 1 --num-captions 3 photo.jpg
//! ```
//!
//! `--model` takes a HF model directory or a hub id found in the HF cache. Lengths count the
//! whole sequence (`[DEC]`, the prompt and the caption), as transformers does. An unreadable
//! image is reported and skipped; the exit code is non-zero if anything failed.

mod common;

use std::path::PathBuf;

use blip::text::{Captioner, GenerationConfig, Sampling};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Caption images with BLIP")]
struct Args {
    /// Image files, or directories of images.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    inputs: Vec<PathBuf>,
    /// HF model directory, or hub id in the HF cache (e.g. Salesforce/blip-image-captioning-base).
    /// Default: the tiny demo captioner trained on the generated world (assets/demo/captioner),
    /// which knows only coloured shapes.
    #[arg(long, value_name = "DIR|HUB_ID")]
    model: Option<String>,
    /// cpu (burn's flex backend), wgpu, cuda or ndarray (with the cargo features).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the weights and activations: f32, f16 or bf16 (LayerNorm and softmax
    /// still compute in f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Conditional captioning prompt, e.g. "a picture of". Default: none, as transformers;
    /// with the demo captioner (no --model), the prompt it was trained with, "a picture of".
    #[arg(long)]
    prompt: Option<String>,
    /// Beam search with this many beams (1: greedy).
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Nucleus sampling instead of greedy/beam search.
    #[arg(long)]
    sample: bool,
    /// Sampling: smallest token set with this much probability.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Sampling: at most this many candidate tokens (0: no limit).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sampling seed (same seed, same captions).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Minimum sequence length ([DEC] and prompt included).
    #[arg(long, default_value_t = 0)]
    min_length: usize,
    /// Maximum sequence length ([DEC] and prompt included).
    #[arg(long, default_value_t = 20)]
    max_length: usize,
    /// CTRL repetition penalty (1.0: off; BLIP's sampling uses 1.1).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Captions per image (≤ beams for beam search; sampling draws this many).
    #[arg(long, default_value_t = 1)]
    num_captions: usize,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    let mut errors = 0;
    let paths = common::image_paths(&args.inputs, &mut errors);
    let device = common::device(&args.device);
    let model_dir = match &args.model {
        Some(spec) => common::model_dir(spec),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo/captioner"),
    };
    let prompt = match (&args.prompt, &args.model) {
        (Some(prompt), _) => prompt.as_str(),
        (None, None) => blip_world::PROMPT.trim_end(),
        (None, Some(_)) => "",
    };
    let captioner =
        Captioner::from_pretrained_with(model_dir, &device, common::load_options(&args.dtype))
            .unwrap_or_else(|e| common::fail(&e.to_string()));
    let config = GenerationConfig {
        max_length: args.max_length,
        min_length: args.min_length,
        num_beams: args.num_beams,
        num_return_sequences: args.num_captions,
        repetition_penalty: args.repetition_penalty,
        sampling: args.sample.then_some(Sampling {
            top_p: args.top_p,
            top_k: args.top_k,
            temperature: args.temperature,
            seed: args.seed,
        }),
        ..GenerationConfig::default()
    };
    // Bad options are one error before any image is read, not one per batch after decoding.
    if let Err(e) = config.validate() {
        common::fail(&e.to_string());
    }
    let bar = common::progress(paths.len(), paths.len() > args.batch_size.max(1));
    for chunk in paths.chunks(args.batch_size.max(1)) {
        let mut images = Vec::new();
        let mut names = Vec::new();
        for path in chunk {
            // Resized as decoded: a batch holds the model's resolution, not the files'.
            match captioner.processor.load(path) {
                Ok(image) => {
                    images.push(image);
                    names.push(path);
                }
                Err(e) => {
                    bar.suspend(|| eprintln!("error: {e}"));
                    errors += 1;
                }
            }
        }
        if !images.is_empty() {
            let prompts = vec![prompt; images.len()];
            match captioner.caption(&images, &prompts, &config) {
                Ok(captions) => bar.suspend(|| {
                    for (path, captions) in names.iter().zip(captions) {
                        print_captions(path, &captions, args.json);
                    }
                }),
                Err(e) => {
                    bar.suspend(|| eprintln!("error: captioning {} images: {e}", images.len()));
                    errors += images.len();
                }
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if errors > 0 {
        eprintln!("{errors} error(s)");
        std::process::exit(1);
    }
}

fn print_captions(path: &std::path::Path, captions: &[blip::text::Caption], json: bool) {
    if json {
        let captions: Vec<serde_json::Value> = captions
            .iter()
            .map(|c| {
                serde_json::json!({
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "score": if c.score.is_finite() { Some(c.score) } else { None },
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"image": path.to_str(), "captions": captions})
        );
    } else {
        for c in captions {
            println!(
                "{}: {}",
                common::printable(&path.display().to_string()),
                common::printable(&c.text)
            );
        }
    }
}
