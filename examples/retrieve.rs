//! Matches images against texts with a BLIP retrieval checkpoint: ITM match probability and
//! ITC cosine similarity for every (image, text) pair.
//!
//! ```sh
//! cargo run --release --example retrieve -- --model Salesforce/blip-itm-base-coco \
//!     --text "a dog on a beach" --text "a cat on a sofa" photo1.jpg photos/
//! ```

mod common;

use std::path::PathBuf;

use blip::text::{FirstToken, Matcher, cosine_similarity};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Image-text matching with BLIP (ITM probabilities, ITC similarities)")]
struct Args {
    /// Image files, or directories of images.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    inputs: Vec<PathBuf>,
    /// Texts to match (repeat the flag).
    #[arg(long = "text", required = true)]
    texts: Vec<String>,
    /// HF model directory, or hub id in the HF cache (e.g. Salesforce/blip-itm-base-coco).
    #[arg(long, value_name = "DIR|HUB_ID")]
    model: String,
    /// cpu (burn's flex backend), wgpu, cuda or ndarray (with the cargo features).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the weights and activations: f32, f16 or bf16 (LayerNorm and softmax
    /// still compute in f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Start the ITM text with [ENC] as the original BLIP does (default [CLS], as transformers).
    #[arg(long)]
    enc: bool,
    /// One JSON object per image instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    let mut errors = 0;
    let paths = common::image_paths(&args.inputs, &mut errors);
    let device = common::device(&args.device);
    let mut matcher = Matcher::from_pretrained_with(
        common::model_dir(&args.model),
        &device,
        common::load_options(&args.dtype),
    )
    .unwrap_or_else(|e| common::fail(&e.to_string()));
    if args.enc {
        matcher.first_token = FirstToken::Enc;
    }
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let text_features = matcher
        .text_features(&texts)
        .unwrap_or_else(|e| common::fail(&e.to_string()));
    if !args.json {
        println!("{:<40} {:>8} {:>8}  text", "image", "ITM p", "ITC cos");
    }
    for path in paths {
        let result = matcher
            .processor
            .load(&path)
            .map_err(blip::text::Error::from)
            .and_then(|image| {
                let embeds = matcher.encode_images(std::slice::from_ref(&image))?;
                let [_, t, d] = embeds.dims();
                let probs = matcher
                    .itm_probabilities(embeds.clone().expand([texts.len(), t, d]), &texts)?;
                let cosine =
                    cosine_similarity(matcher.model.image_features(embeds), text_features.clone())
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .expect("f32 similarities");
                Ok((probs, cosine))
            });
        match result {
            Ok((probs, cosine)) => {
                if args.json {
                    let matches: Vec<serde_json::Value> = texts
                        .iter()
                        .zip(probs.iter().zip(&cosine))
                        .map(|(t, (p, c))| serde_json::json!({"text": t, "itm_probability": p, "itc_cosine": c}))
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"image": path.to_str(), "matches": matches})
                    );
                } else {
                    let name = common::printable(&path.display().to_string());
                    for (t, (p, c)) in texts.iter().zip(probs.iter().zip(&cosine)) {
                        let t = common::printable(t);
                        println!("{name:<40} {p:>8.4} {c:>8.4}  {t}");
                    }
                }
            }
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
