//! The committed demo captioner (`assets/demo/captioner`, trained by
//! `examples/world.rs --demo`) captions 300 generated scenes it has never seen as the README
//! says: with BLIP's prompt said once, and the attributes right as often as reported.

mod common;

use std::path::Path;

use blip::text::{Captioner, GenerationConfig};
use blip_world::{CaptionScore, PROMPT, caption_mentions, scene};

/// The showcase's targets. The committed model measures 0.996, 0.977 and 0.887 on this
/// protocol (docs/world.md); one near-tied beam that another CPU's rounding decides the
/// other way moves a share by about 0.003. Chance is 1/6 for colours and 1/5 for shapes.
const COLOUR: f64 = 0.95;
const SHAPE: f64 = 0.90;
const EVERY_ATTRIBUTE: f64 = 0.60;

/// Openings that say the prompt, or a paraphrase of it, a second time.
const REPEATS: [&str; 5] = [
    "a picture",
    "a photo",
    "an image",
    "a drawing",
    "picture of",
];

#[test]
fn the_demo_captioner_names_the_attributes_of_unseen_scenes() {
    let device = common::device();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/captioner");
    let captioner = Captioner::from_pretrained(&dir, &device).unwrap();
    // The original captioner's evaluation: 3 beams, 5 to 20 tokens.
    let generation = GenerationConfig::blip_beam();
    // Seed 777 is not the demo world's (1): none of these scenes was trained on.
    let scenes: Vec<_> = (0..300).map(|i| scene(777, i, 64)).collect();
    let mut score = CaptionScore::default();
    for chunk in scenes.chunks(25) {
        let images: Vec<_> = chunk.iter().map(|s| s.render()).collect();
        let prompts = vec![PROMPT; images.len()];
        let captions = captioner.caption(&images, &prompts, &generation).unwrap();
        for (s, c) in chunk.iter().zip(captions) {
            let full = c[0].text.trim();
            assert!(full.starts_with(PROMPT.trim_end()), "{full:?}");
            let text = c[0].text_after(PROMPT);
            assert!(
                REPEATS.iter().all(|r| !text.contains(r)),
                "the caption repeats its prompt: {full:?}"
            );
            let found = caption_mentions(s, text);
            score.add(&found);
            if std::env::var_os("BLIP_TEST_VERBOSE").is_some() {
                println!("{} {text}", if found.is_exact() { "ok " } else { "   " });
            }
        }
    }
    println!(
        "colour right {:.3} ({} mentions), shape right {:.3} ({} mentions), every attribute right in {:.3} of {} captions",
        score.colour_right(),
        score.colour.mentions(),
        score.shape_right(),
        score.shape.mentions(),
        score.exact_share(),
        score.captions
    );
    // Every caption names at least one object, so the shares are over ≥ 300 mentions.
    assert!(score.shape.mentions() >= 300, "{score:?}");
    assert!(score.colour_right() >= COLOUR, "{score:?}");
    assert!(score.shape_right() >= SHAPE, "{score:?}");
    assert!(score.exact_share() >= EVERY_ATTRIBUTE, "{score:?}");
}
