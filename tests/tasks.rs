//! The task APIs (text in, text out) on the tiny checkpoints, whose directories carry a
//! vocabulary where ids 11 22 33 read "a picture of" and every other id i reads "tok<i>".

mod common;

use blip::text::tasks::replace_first;
use blip::text::{Captioner, FirstToken, GenerationConfig, Matcher, QuestionAnswerer};
use common::{Expected, device, fixtures};

fn texts(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected_text.json")).unwrap()).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn captioner_decodes_what_transformers_decodes() {
    let device = device();
    for config in ["tiny", "asym"] {
        let dir = fixtures().join(format!("{config}-captioning"));
        let expected = Expected::open(&dir);
        let want = texts(&dir);
        let captioner = Captioner::from_pretrained(&dir, &device).unwrap();
        let pixels = expected.float::<4>("inputs.pixel_values", &device);
        for (name, prompt, generation) in [
            ("greedy_free", "", GenerationConfig::default()),
            (
                "greedy_prompt",
                "a picture of",
                GenerationConfig {
                    max_length: 14,
                    ..Default::default()
                },
            ),
            (
                "beam_free",
                "",
                GenerationConfig {
                    num_beams: 3,
                    num_return_sequences: 3,
                    ..Default::default()
                },
            ),
        ] {
            let captions = captioner
                .caption_pixels(pixels.clone(), &[prompt, prompt], &generation)
                .unwrap();
            let got: Vec<String> = captions.into_iter().flatten().map(|c| c.text).collect();
            assert_eq!(got, strings(&want[name]), "{config} {name}");
        }
    }
}

#[test]
fn matcher_scores_pairs_and_ranks_by_itm_plus_cosine() {
    let device = device();
    let dir = fixtures().join("tiny-retrieval");
    let expected = Expected::open(&dir);
    let candidates = strings(&texts(&dir)["texts"]);
    let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let mut matcher = Matcher::from_pretrained(&dir, &device).unwrap();
    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    let images = matcher.model.vision_model.forward(pixels).unwrap();

    for (first, key) in [
        (FirstToken::Cls, "itm.logits"),
        (FirstToken::Enc, "itm_enc.logits"),
    ] {
        matcher.first_token = first;
        let probs = matcher
            .itm_probabilities(images.clone(), &candidates)
            .unwrap();
        let logits = expected.floats(key);
        for (i, p) in probs.iter().enumerate() {
            let (l0, l1) = (logits[2 * i] as f64, logits[2 * i + 1] as f64);
            let want = 1.0 / (1.0 + (l0 - l1).exp());
            assert!((p - want).abs() < 1e-4, "{first:?} pair {i}: {p} vs {want}");
        }
    }
    matcher.first_token = FirstToken::Cls;

    let cosine = expected.floats("itc.cosine"); // [images, texts]
    for image in 0..2 {
        let one = images.clone().narrow(0, image, 1);
        let ranked = matcher.rank_texts(one.clone(), &candidates, 2).unwrap();
        assert_eq!(ranked.len(), 2);
        assert!(ranked[0].score >= ranked[1].score);
        for r in &ranked {
            assert!((r.cosine - cosine[image * 2 + r.index] as f64).abs() < 1e-4);
            // score = ITM match logit + cosine, the logit recomputed through the model API
            let (ids, mask) = matcher
                .tokenizer
                .encode_batch(
                    &[candidates[r.index]],
                    Some(35),
                    blip::text::Padding::Longest,
                )
                .unwrap()
                .to_tensors(&device);
            let logits = common::values(
                matcher
                    .model
                    .itm_logits(one.clone(), ids, Some(mask))
                    .unwrap(),
            )
            .1;
            assert!((r.score - (logits[1] as f64 + r.cosine)).abs() < 1e-4);
        }
        // k = 1 keeps the best ITC text.
        let best_itc = if cosine[image * 2] >= cosine[image * 2 + 1] {
            0
        } else {
            1
        };
        assert_eq!(
            matcher.rank_texts(one, &candidates, 1).unwrap()[0].index,
            best_itc
        );
    }
    let by_image = matcher.rank_images(images, candidates[1], 2).unwrap();
    assert_eq!(by_image.len(), 2);
    for r in &by_image {
        assert!((r.cosine - cosine[r.index * 2 + 1] as f64).abs() < 1e-4);
    }
}

#[test]
fn vqa_rank_mode_matches_the_original_scoring() {
    let device = device();
    let dir = fixtures().join("tiny-vqa");
    let expected = Expected::open(&dir);
    let rank = texts(&dir)["rank"].clone();
    let answerer = QuestionAnswerer::from_pretrained(&dir, &device).unwrap();
    let answers = strings(&rank["answers"]);
    let answers: Vec<&str> = answers.iter().map(String::as_str).collect();
    // The fixture's image 1, through the model directly (its pixels are not an image file).
    let pixels = expected
        .float::<4>("inputs.pixel_values", &device)
        .narrow(0, 1, 1);
    let ranked = answerer
        .rank_answers_pixels(
            pixels,
            rank["question"].as_str().unwrap(),
            &answers,
            rank["k"].as_u64().unwrap() as usize,
            rank["label_smoothing"].as_f64().unwrap(),
        )
        .unwrap();
    let want_indices: Vec<usize> = serde_json::from_value(rank["indices"].clone()).unwrap();
    let want_scores: Vec<f64> = serde_json::from_value(rank["scores"].clone()).unwrap();
    assert_eq!(
        ranked.iter().map(|r| r.index).collect::<Vec<_>>(),
        want_indices
    );
    for (r, want) in ranked.iter().zip(want_scores) {
        assert!((r.score - want).abs() < 1e-3, "{} vs {want}", r.score);
    }
}

#[test]
fn replace_first_swaps_only_column_zero() {
    let device = device();
    let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_ints(
        [[101, 5, 6], [101, 7, 0]],
        &device,
    );
    let out = replace_first(ids, 119)
        .into_data()
        .try_into_vec_as::<i64>()
        .unwrap();
    assert_eq!(out, vec![119, 5, 6, 119, 7, 0]);
}
