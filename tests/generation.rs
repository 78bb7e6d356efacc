//! Generation against transformers' `generate` on the committed tiny checkpoints: token ids
//! exact, beam scores to 1e-4. The fixtures record the smallest top-1 − top-2 margin of each
//! greedy run; all are far above the logits tolerance, so no pick here is a tie.

mod common;

use blip::text::{Generated, GenerationConfig, Sampling};
use blip::{CaptioningModel, VqaModel};
use common::{Expected, device, fixtures};

/// transformers' output rows, cut after `[SEP]` (padding marked -1 in the fixture).
fn expected_rows(expected: &Expected, name: &str) -> Vec<Vec<u32>> {
    let shape = expected.shape(&format!("gen.{name}.sequences"));
    expected
        .ints(&format!("gen.{name}.sequences"))
        .chunks(shape[1])
        .map(|row| row.iter().filter(|&&t| t >= 0).map(|&t| t as u32).collect())
        .collect()
}

fn check(expected: &Expected, name: &str, ours: &[Vec<Generated>], what: &str) {
    let flat: Vec<&Generated> = ours.iter().flatten().collect();
    let rows = expected_rows(expected, name);
    assert_eq!(flat.len(), rows.len(), "{what} {name}: number of sequences");
    for (i, (g, want)) in flat.iter().zip(&rows).enumerate() {
        assert_eq!(&g.token_ids, want, "{what} {name}: sequence {i}");
    }
    let key = format!("gen.{name}.scores");
    if expected.has(&key) {
        for (i, (g, want)) in flat.iter().zip(expected.floats(&key)).enumerate() {
            assert!(
                (g.score - want as f64).abs() < 1e-4,
                "{what} {name}: beam score {i}: {} vs {want}",
                g.score
            );
        }
    }
}

fn caption_config(name: &str) -> (GenerationConfig, bool) {
    let base = GenerationConfig::default();
    match name {
        "greedy_fixed" => (
            GenerationConfig {
                max_length: 10,
                min_length: 10,
                ..base
            },
            false,
        ),
        "greedy_free" => (
            GenerationConfig {
                max_length: 20,
                ..base
            },
            false,
        ),
        "greedy_processors" => (
            GenerationConfig {
                max_length: 16,
                min_length: 6,
                repetition_penalty: 1.5,
                ..base
            },
            false,
        ),
        "greedy_prompt" => (
            GenerationConfig {
                max_length: 14,
                ..base
            },
            true,
        ),
        "beam_free" => (
            GenerationConfig {
                num_beams: 3,
                max_length: 20,
                num_return_sequences: 3,
                ..base
            },
            false,
        ),
        "beam_forced" => (
            GenerationConfig {
                num_beams: 3,
                min_length: 12,
                max_length: 12,
                ..base
            },
            false,
        ),
        "beam_prompt" => (
            GenerationConfig {
                num_beams: 3,
                max_length: 16,
                min_length: 8,
                repetition_penalty: 1.3,
                length_penalty: 0.6,
                ..base
            },
            true,
        ),
        other => panic!("unknown case {other}"),
    }
}

const CASES: [&str; 7] = [
    "greedy_fixed",
    "greedy_free",
    "greedy_processors",
    "greedy_prompt",
    "beam_free",
    "beam_forced",
    "beam_prompt",
];

fn prompt(expected: &Expected, dec: u32) -> Vec<u32> {
    // The processor's "[CLS] ... [SEP]" becomes "[DEC] ...", as the captioner builds it.
    let mut ids: Vec<u32> = expected
        .ints("inputs.prompt")
        .iter()
        .map(|&t| t as u32)
        .collect();
    ids.pop();
    ids[0] = dec;
    ids
}

#[test]
fn captioning_generation_matches_transformers() {
    let device = device();
    for config_name in ["tiny", "asym"] {
        let dir = fixtures().join(format!("{config_name}-captioning"));
        let expected = Expected::open(&dir);
        let loaded = CaptioningModel::from_pretrained(&dir, &device).unwrap();
        let dec = loaded.config.text.bos_token_id as u32;
        let pixels = expected.float::<4>("inputs.pixel_values", &device);
        for name in CASES {
            let (config, with_prompt) = caption_config(name);
            let p = if with_prompt {
                prompt(&expected, dec)
            } else {
                vec![dec]
            };
            let out = loaded
                .model
                .generate(pixels.clone(), &[p.clone(), p], &config)
                .unwrap();
            check(&expected, name, &out, config_name);
        }
    }
}

#[test]
fn vqa_generation_matches_transformers() {
    let device = device();
    let dir = fixtures().join("tiny-vqa");
    let expected = Expected::open(&dir);
    let loaded = VqaModel::from_pretrained(&dir, &device).unwrap();
    let dec = loaded.config.text.bos_token_id as u32;
    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    let ids = expected.int::<2>("inputs.input_ids", &device);
    let mask = expected.int::<2>("inputs.attention_mask", &device);
    for (name, config) in [
        (
            "vqa_greedy",
            GenerationConfig {
                max_length: 10,
                ..Default::default()
            },
        ),
        (
            "vqa_beam",
            GenerationConfig {
                num_beams: 3,
                max_length: 10,
                min_length: 2,
                ..Default::default()
            },
        ),
    ] {
        let out = loaded
            .model
            .generate(
                pixels.clone(),
                ids.clone(),
                Some(mask.clone()),
                &config,
                dec,
            )
            .unwrap();
        check(&expected, name, &out, "tiny");
    }
}

#[test]
fn rows_with_different_prompts_match_each_row_alone() {
    let device = device();
    let dir = fixtures().join("asym-captioning");
    let expected = Expected::open(&dir);
    let loaded = CaptioningModel::from_pretrained(&dir, &device).unwrap();
    let dec = loaded.config.text.bos_token_id as u32;
    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    let prompts = vec![vec![dec, 11, 22, 33, 44, 55], vec![dec]];
    for config in [
        GenerationConfig {
            max_length: 18,
            ..Default::default()
        },
        GenerationConfig {
            num_beams: 3,
            max_length: 18,
            num_return_sequences: 2,
            ..Default::default()
        },
    ] {
        let together = loaded
            .model
            .generate(pixels.clone(), &prompts, &config)
            .unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let alone = loaded
                .model
                .generate(
                    pixels.clone().narrow(0, i, 1),
                    std::slice::from_ref(p),
                    &config,
                )
                .unwrap();
            assert_eq!(together[i].len(), alone[0].len());
            for (a, b) in together[i].iter().zip(&alone[0]) {
                assert_eq!(
                    a.token_ids, b.token_ids,
                    "row {i}, beams {}",
                    config.num_beams
                );
                assert!((a.score - b.score).abs() < 1e-4);
            }
            assert_eq!(&together[i][0].token_ids[..p.len()], p.as_slice());
        }
    }
}

#[test]
fn sampling_is_reproducible_and_respects_top_k() {
    let device = device();
    let dir = fixtures().join("tiny-captioning");
    let expected = Expected::open(&dir);
    let loaded = CaptioningModel::from_pretrained(&dir, &device).unwrap();
    let dec = loaded.config.text.bos_token_id as u32;
    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    let sampled = |seed, top_k, top_p| {
        let config = GenerationConfig {
            max_length: 12,
            num_return_sequences: 4,
            sampling: Some(Sampling {
                top_p,
                top_k,
                temperature: 1.0,
                seed,
            }),
            ..Default::default()
        };
        loaded
            .model
            .generate(pixels.clone(), &[vec![dec], vec![dec]], &config)
            .unwrap()
    };
    let a = sampled(7, 0, 1.0);
    assert_eq!(a, sampled(7, 0, 1.0), "same seed, same samples");
    assert_ne!(a, sampled(8, 0, 1.0), "another seed, other samples");
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|per_image| per_image.len() == 4));
    // top_k = 1 is greedy decoding.
    let greedy = loaded
        .model
        .generate(
            pixels.clone(),
            &[vec![dec], vec![dec]],
            &GenerationConfig {
                max_length: 12,
                ..Default::default()
            },
        )
        .unwrap();
    for (per_image, g) in sampled(3, 1, 1.0).iter().zip(&greedy) {
        for s in per_image {
            assert_eq!(s.token_ids, g[0].token_ids);
        }
    }
    // A tiny nucleus keeps only the most likely token too.
    for (per_image, g) in sampled(5, 0, 1e-6).iter().zip(&greedy) {
        assert_eq!(per_image[0].token_ids, g[0].token_ids);
    }
}

#[test]
fn impossible_settings_are_errors() {
    let device = device();
    let dir = fixtures().join("tiny-captioning");
    let loaded = CaptioningModel::from_pretrained(&dir, &device).unwrap();
    let expected = Expected::open(&dir);
    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    let dec = loaded.config.text.bos_token_id as u32;
    let run = |config: GenerationConfig, prompts: Vec<Vec<u32>>| {
        loaded.model.generate(pixels.clone(), &prompts, &config)
    };
    let two = || vec![vec![dec], vec![dec]];
    assert!(
        run(
            GenerationConfig {
                num_beams: 2,
                num_return_sequences: 3,
                ..Default::default()
            },
            two()
        )
        .is_err()
    );
    assert!(
        run(
            GenerationConfig {
                num_return_sequences: 2,
                ..Default::default()
            },
            two()
        )
        .is_err()
    );
    assert!(
        run(
            GenerationConfig {
                max_length: 100,
                ..Default::default()
            },
            two()
        )
        .is_err()
    );
    assert!(
        run(GenerationConfig::default(), vec![vec![dec]]).is_err(),
        "one prompt, two images"
    );
    assert!(
        run(GenerationConfig::default(), vec![vec![], vec![dec]]).is_err(),
        "empty prompt"
    );
    assert!(
        run(GenerationConfig::default(), vec![vec![dec, 500], vec![dec]]).is_err(),
        "id beyond vocab"
    );
}
