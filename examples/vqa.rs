//! Answers a question about images with a BLIP VQA checkpoint, by generation or by ranking
//! a list of candidate answers (the original BLIP's rank mode).
//!
//! ```sh
//! cargo run --release --example vqa -- --model Salesforce/blip-vqa-base \
//!     --question "how many dogs are there?" photo.jpg
//! cargo run --release --example vqa -- --model DIR --question "what color is the car?" \
//!     --answers red,blue,green,white photo.jpg
//! ```

mod common;

use std::path::PathBuf;

use blip::text::{FirstToken, GenerationConfig, QuestionAnswerer};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Visual question answering with BLIP")]
struct Args {
    /// Image files, or directories of images.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    inputs: Vec<PathBuf>,
    /// The question.
    #[arg(long)]
    question: String,
    /// Rank these comma-separated answers instead of generating one.
    #[arg(long, value_delimiter = ',')]
    answers: Vec<String>,
    /// Rank mode: how many answers (by first-token probability) are scored in full.
    #[arg(long, default_value_t = 128)]
    k: usize,
    /// HF model directory, or hub id in the HF cache (e.g. Salesforce/blip-vqa-base).
    #[arg(long, value_name = "DIR|HUB_ID")]
    model: String,
    /// cpu (burn's flex backend), wgpu, cuda or ndarray (with the cargo features).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the weights and activations: f32, f16 or bf16 (LayerNorm and softmax
    /// still compute in f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Beams for generation (the original uses 3).
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Maximum answer length ([DEC] included).
    #[arg(long, default_value_t = 10)]
    max_length: usize,
    /// Start the question with [ENC] as the original BLIP (default [CLS], as transformers).
    #[arg(long)]
    enc: bool,
    /// One JSON object per image.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    let mut errors = 0;
    let paths = common::image_paths(&args.inputs, &mut errors);
    let device = common::device(&args.device);
    let mut vqa = QuestionAnswerer::from_pretrained_with(
        common::model_dir(&args.model),
        &device,
        common::load_options(&args.dtype),
    )
    .unwrap_or_else(|e| common::fail(&e.to_string()));
    if args.enc {
        vqa.first_token = FirstToken::Enc;
    }
    let config = GenerationConfig {
        num_beams: args.num_beams,
        max_length: args.max_length,
        ..GenerationConfig::default()
    };
    if let Err(e) = config.validate() {
        common::fail(&e.to_string());
    }
    let answers: Vec<&str> = args.answers.iter().map(String::as_str).collect();
    for path in paths {
        let result = vqa
            .processor
            .load(&path)
            .map_err(blip::text::Error::from)
            .and_then(|image| {
                if answers.is_empty() {
                    let out = vqa.answer(
                        std::slice::from_ref(&image),
                        &[args.question.as_str()],
                        &config,
                    )?;
                    let best = &out[0][0];
                    Ok(serde_json::json!({"answer": best.text, "score": best.score}))
                } else {
                    let ranked = vqa.rank_answers(&image, &args.question, &answers, args.k, 0.1)?;
                    let list: Vec<serde_json::Value> = ranked
                        .iter()
                        .map(|r| serde_json::json!({"answer": answers[r.index], "score": r.score}))
                        .collect();
                    Ok(serde_json::json!({"answer": answers[ranked[0].index], "ranked": list}))
                }
            });
        match result {
            Ok(value) if args.json => {
                println!(
                    "{}",
                    serde_json::json!({"image": path.to_str(), "result": value})
                );
            }
            Ok(value) => println!(
                "{}: {}",
                common::printable(&path.display().to_string()),
                common::printable(value["answer"].as_str().unwrap_or(""))
            ),
            Err(e) => {
                eprintln!("error: {e}");
                errors += 1;
            }
        }
    }
    if errors > 0 {
        eprintln!("{errors} error(s)");
        std::process::exit(1);
    }
}
