//! The task APIs (text in, text out) on the tiny checkpoints, whose directories carry a
//! vocabulary where ids 11 22 33 read "a picture of" and every other id i reads "tok<i>".

mod common;

use blip::text::{Captioner, FirstToken, GenerationConfig, Matcher, QuestionAnswerer};
use common::{Expected, ScratchDir, device, fixtures};

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

/// A copy of a fixture directory whose output layers (the LM head's LayerNorm scale, the ITM
/// head, the image projection) hold 3e38: finite, so the load accepts them, but overflowing
/// the outputs, as diverged weights do.
fn overflowing_copy(fixture: &str, tag: &str) -> ScratchDir {
    let dir = ScratchDir::new(&format!("tasks-{fixture}-{tag}"));
    for entry in std::fs::read_dir(fixtures().join(fixture)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.0.join(path.file_name().unwrap())).unwrap();
    }
    let weights = dir.0.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        let output_layer = [
            "transform.LayerNorm.weight",
            "itm_head.weight",
            "vision_proj.weight",
        ]
        .iter()
        .any(|suffix| name.ends_with(suffix));
        if output_layer {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            for chunk in data.chunks_exact_mut(4) {
                chunk.copy_from_slice(&3e38f32.to_le_bytes());
            }
        }
        tensors.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &weights).unwrap();
    dir
}

#[test]
fn non_finite_outputs_are_errors_not_empty_captions_or_null_probabilities() {
    let device = device();
    // Captioning: the decoder's logits overflow; this gave "" and [PAD] ids with exit 0.
    let dir = overflowing_copy("tiny-captioning", "overflow");
    let pixels = Expected::open(&dir.0).float::<4>("inputs.pixel_values", &device);
    let captioner = Captioner::from_pretrained(&dir.0, &device).unwrap();
    for generation in [
        GenerationConfig::default(),
        GenerationConfig::blip_beam(),
        GenerationConfig::blip_nucleus(3),
    ] {
        let err = captioner
            .caption_pixels(pixels.clone(), &["", ""], &generation)
            .unwrap_err();
        assert!(matches!(err, blip::text::Error::NonFinite { .. }), "{err}");
    }
    // Matching: this printed `itm_probability: null`.
    let dir = overflowing_copy("tiny-retrieval", "overflow");
    let pixels = Expected::open(&dir.0).float::<4>("inputs.pixel_values", &device);
    let matcher = Matcher::from_pretrained(&dir.0, &device).unwrap();
    let embeds = matcher.model.vision_model.forward(pixels).unwrap();
    let err = matcher
        .itm_probabilities(embeds.clone(), &["tok5 tok6", "tok7"])
        .unwrap_err();
    assert!(matches!(err, blip::text::Error::NonFinite { .. }), "{err}");
    let err = matcher
        .rank_texts(embeds.narrow(0, 0, 1), &["tok5", "tok7"], 2)
        .unwrap_err();
    assert!(matches!(err, blip::text::Error::NonFinite { .. }), "{err}");
}

#[test]
fn empty_answer_candidates_are_refused() {
    // `--answers ",,red,,blue"` returned "" as the best answer.
    let device = device();
    let dir = fixtures().join("tiny-vqa");
    let pixels = Expected::open(&dir)
        .float::<4>("inputs.pixel_values", &device)
        .narrow(0, 0, 1);
    let answerer = QuestionAnswerer::from_pretrained(&dir, &device).unwrap();
    for answers in [
        vec!["", "tok5", "", "tok9"],
        vec!["tok5", "   "],
        vec!["tok5", "\u{7}"],
    ] {
        let err = answerer
            .rank_answers_pixels(pixels.clone(), "tok3 tok4", &answers, 2, 0.1)
            .unwrap_err();
        assert!(
            err.to_string().contains("answer candidate"),
            "{answers:?}: {err}"
        );
    }
    assert!(
        answerer
            .rank_answers_pixels(pixels, "tok3 tok4", &["tok5", "tok9"], 2, 0.1)
            .is_ok()
    );
}

#[test]
fn absurd_beam_counts_are_refused_before_allocating() {
    // --num-beams 100000 aborted trying to allocate 480 GB.
    let device = device();
    let dir = fixtures().join("tiny-captioning");
    let pixels = Expected::open(&dir).float::<4>("inputs.pixel_values", &device);
    let captioner = Captioner::from_pretrained(&dir, &device).unwrap();
    let generation = GenerationConfig {
        num_beams: 100_000_000,
        ..GenerationConfig::default()
    };
    let err = captioner
        .caption_pixels(pixels.clone(), &["", ""], &generation)
        .unwrap_err();
    assert!(err.to_string().contains("max_memory_bytes"), "{err}");
    // The same limit, lowered, refuses an ordinary beam search; raised, it runs.
    let tight = GenerationConfig {
        max_memory_bytes: 1000,
        ..GenerationConfig::blip_beam()
    };
    assert!(
        captioner
            .caption_pixels(pixels.clone(), &["", ""], &tight)
            .is_err()
    );
    assert!(
        captioner
            .caption_pixels(pixels, &["", ""], &GenerationConfig::blip_beam())
            .is_ok()
    );
}

#[test]
fn a_vanishing_temperature_samples_the_greedy_caption() {
    // `--sample --temperature 1e-40` panicked: every f32 logit became ±inf.
    let device = device();
    let dir = fixtures().join("tiny-captioning");
    let pixels = Expected::open(&dir).float::<4>("inputs.pixel_values", &device);
    let captioner = Captioner::from_pretrained(&dir, &device).unwrap();
    let greedy = captioner
        .caption_pixels(pixels.clone(), &["", ""], &GenerationConfig::default())
        .unwrap();
    let mut cold = GenerationConfig::blip_nucleus(1);
    cold.min_length = 0;
    cold.repetition_penalty = 1.0;
    if let Some(s) = cold.sampling.as_mut() {
        s.temperature = 1e-40;
    }
    let sampled = captioner.caption_pixels(pixels, &["", ""], &cold).unwrap();
    let ids = |c: &Vec<Vec<blip::text::Caption>>| -> Vec<Vec<u32>> {
        c.iter().map(|r| r[0].token_ids.clone()).collect()
    };
    assert_eq!(ids(&sampled), ids(&greedy));
}
