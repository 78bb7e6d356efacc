//! Numerical parity with transformers on the committed tiny checkpoints
//! (`scripts/make_fixtures.py` writes them): |Δ| ≤ 1e-4 on every compared output.

mod common;

use blip::text::{IGNORE_INDEX, cosine_similarity, lm_loss};
use blip::{CaptioningModel, RetrievalModel, VisionTransformer, VqaModel};
use burn::tensor::{Int, Tensor};
use common::{Expected, TOL, assert_close, device, fixtures};

const CONFIGS: [&str; 2] = ["tiny", "asym"];

fn check_vision(vit: &VisionTransformer, expected: &Expected, name: &str) {
    let device = device();
    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    let out = vit.forward_with_hidden_states(pixels).unwrap();
    let layers = out.hidden_states.len();
    assert!(layers >= 3, "{name}: embeddings + at least 2 layers");
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        let key = format!("vision.hidden_states.{i}");
        assert_close(&format!("{name} {key}"), h, expected, &key, TOL);
    }
    assert!(!expected.has(&format!("vision.hidden_states.{layers}")));
    assert_close(
        &format!("{name} vision last_hidden_state"),
        out.last_hidden_state,
        expected,
        "vision.last_hidden_state",
        TOL,
    );
    // Other resolutions: the position table is resized bicubically.
    for size in ["48x48", "24x24", "24x40"] {
        let px = expected.float::<4>(&format!("interp.{size}.pixel_values"), &device);
        let key = format!("interp.{size}.last_hidden_state");
        assert_close(
            &format!("{name} {key}"),
            vit.forward(px).unwrap(),
            expected,
            &key,
            TOL,
        );
    }
}

#[test]
fn captioning_matches_transformers() {
    let device = device();
    for config in CONFIGS {
        let dir = fixtures().join(format!("{config}-captioning"));
        let expected = Expected::open(&dir);
        let loaded = CaptioningModel::from_pretrained(&dir, &device).unwrap();
        check_vision(&loaded.model.vision_model, &expected, config);

        let ids = expected.int::<2>("inputs.decoder_input_ids", &device);
        let mask = expected.int::<2>("inputs.decoder_attention_mask", &device);
        let pixels = expected.float::<4>("inputs.pixel_values", &device);
        let logits = loaded.model.forward(pixels, ids, Some(mask)).unwrap();
        assert_close(
            &format!("{config} logits"),
            logits.clone(),
            &expected,
            "caption.logits",
            TOL,
        );

        let labels = expected.int::<2>("inputs.labels", &device);
        for smoothing in [0.0, 0.1] {
            let key = format!("caption.loss.smoothing_{smoothing:?}");
            let loss = lm_loss(logits.clone(), labels.clone(), smoothing).unwrap();
            assert_close(&format!("{config} {key}"), loss, &expected, &key, TOL);
        }
    }
}

#[test]
fn retrieval_matches_transformers() {
    let device = device();
    for config in CONFIGS {
        let dir = fixtures().join(format!("{config}-retrieval"));
        let expected = Expected::open(&dir);
        let model = RetrievalModel::from_pretrained(&dir, &device)
            .unwrap()
            .model;
        check_vision(&model.vision_model, &expected, config);

        let pixels = expected.float::<4>("inputs.pixel_values", &device);
        let ids = expected.int::<2>("inputs.input_ids", &device);
        let mask = expected.int::<2>("inputs.attention_mask", &device);
        let image = model.vision_model.forward(pixels).unwrap();

        let itm = model
            .itm_logits(image.clone(), ids.clone(), Some(mask.clone()))
            .unwrap();
        assert_close(
            &format!("{config} itm [CLS]"),
            itm,
            &expected,
            "itm.logits",
            TOL,
        );
        let enc_id = loaded_enc_id(&dir);
        let [b, l] = ids.dims();
        let enc_ids = Tensor::cat(
            vec![
                Tensor::<2, Int>::full([b, 1], enc_id, &device),
                ids.clone().narrow(1, 1, l - 1),
            ],
            1,
        );
        let itm_enc = model
            .itm_logits(image.clone(), enc_ids, Some(mask.clone()))
            .unwrap();
        assert_close(
            &format!("{config} itm [ENC]"),
            itm_enc,
            &expected,
            "itm_enc.logits",
            TOL,
        );

        let text_states = model
            .text_encoder
            .encode_text(ids.clone(), Some(mask.clone()))
            .unwrap();
        assert_close(
            &format!("{config} unimodal text states"),
            text_states,
            &expected,
            "text.last_hidden_state",
            TOL,
        );
        let image_feat = model.image_features(image);
        let text_feat = model.text_features(ids, Some(mask)).unwrap();
        assert_close(
            &format!("{config} image feat"),
            image_feat.clone(),
            &expected,
            "itc.image_embeds",
            TOL,
        );
        assert_close(
            &format!("{config} text feat"),
            text_feat.clone(),
            &expected,
            "itc.text_embeds",
            TOL,
        );
        assert_close(
            &format!("{config} cosine"),
            cosine_similarity(image_feat, text_feat),
            &expected,
            "itc.cosine",
            TOL,
        );
    }
}

fn loaded_enc_id(dir: &std::path::Path) -> i64 {
    blip::BlipConfig::from_hf_json(dir.join("config.json"))
        .unwrap()
        .text
        .enc_token_id as i64
}

#[test]
fn vqa_matches_transformers() {
    let device = device();
    let dir = fixtures().join("tiny-vqa");
    let expected = Expected::open(&dir);
    let model = VqaModel::from_pretrained(&dir, &device).unwrap().model;
    check_vision(&model.vision_model, &expected, "tiny-vqa");

    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    let q_ids = expected.int::<2>("inputs.input_ids", &device);
    let q_mask = expected.int::<2>("inputs.attention_mask", &device);
    let a_ids = expected.int::<2>("inputs.decoder_input_ids", &device);
    let a_mask = expected.int::<2>("inputs.decoder_attention_mask", &device);

    let image = model.vision_model.forward(pixels.clone()).unwrap();
    let question = model
        .encode_question(image, q_ids.clone(), Some(q_mask.clone()))
        .unwrap();
    assert_close(
        "vqa question states",
        question,
        &expected,
        "vqa.question_embeds",
        TOL,
    );

    let logits = model
        .forward(pixels, q_ids, Some(q_mask), a_ids, Some(a_mask))
        .unwrap();
    assert_close(
        "vqa answer logits",
        logits.clone(),
        &expected,
        "vqa.logits",
        TOL,
    );
    let labels = expected.int::<2>("inputs.labels", &device);
    assert_close(
        "vqa loss",
        lm_loss(logits, labels, 0.0).unwrap(),
        &expected,
        "vqa.loss",
        TOL,
    );
}

#[test]
fn lm_loss_ignores_padding_and_prompt_labels() {
    // Two rows whose only supervised targets differ: masking the rest must not change the
    // loss, and masking everything but one position gives that position's cross-entropy.
    let device = device();
    let logits = Tensor::<3>::from_floats(
        [[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -1.0, 0.0]]],
        &device,
    );
    let labels = Tensor::<2, Int>::from_ints([[IGNORE_INDEX, 2, IGNORE_INDEX]], &device);
    let loss: f32 = lm_loss(logits, labels, 0.0).unwrap().into_scalar();
    // position 0 predicts label 2: -log softmax([2, .5, -1])[2]
    let z = [2.0f32, 0.5, -1.0];
    let lse = z.iter().map(|v| v.exp()).sum::<f32>().ln();
    assert!(
        (loss - (lse - z[2])).abs() < 1e-5,
        "{loss} vs {}",
        lse - z[2]
    );
}

#[test]
fn vqa_question_mask_is_applied_when_asked() {
    // Row 0's question is padded, row 1's is not: masking the padding changes row 0's
    // answer logits only.
    let device = device();
    let dir = fixtures().join("tiny-vqa");
    let expected = Expected::open(&dir);
    let model = VqaModel::from_pretrained(&dir, &device).unwrap().model;
    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    let q_mask = expected.int::<2>("inputs.attention_mask", &device);
    let image = model.vision_model.forward(pixels).unwrap();
    let question = model
        .encode_question(
            image,
            expected.int::<2>("inputs.input_ids", &device),
            Some(q_mask.clone()),
        )
        .unwrap();
    let answers = expected.int::<2>("inputs.decoder_input_ids", &device);
    let answer_mask = expected.int::<2>("inputs.decoder_attention_mask", &device);
    let logits = |mask| {
        let cross = blip::text::CrossInput {
            states: question.clone(),
            mask,
        };
        common::values(
            model
                .answer_logits(cross, answers.clone(), Some(answer_mask.clone()))
                .unwrap(),
        )
        .1
    };
    let (open, masked) = (logits(None), logits(Some(q_mask)));
    let half = open.len() / 2;
    let diff =
        |r: std::ops::Range<usize>| r.map(|i| (open[i] - masked[i]).abs()).fold(0f32, f32::max);
    assert!(diff(0..half) > 1e-3, "masking row 0's padding must matter");
    assert!(
        diff(half..open.len()) < 1e-5,
        "row 1 has no padding to mask"
    );
}

#[test]
fn resizing_the_position_table_once_equals_resizing_per_call() {
    let device = device();
    let dir = fixtures().join("asym-captioning");
    let expected = Expected::open(&dir);
    let vit = CaptioningModel::from_pretrained(&dir, &device)
        .unwrap()
        .model
        .vision_model;
    let px = expected.float::<4>("interp.48x48.pixel_values", &device);
    let resized = vit.with_image_size(48);
    assert_eq!(resized.embeddings.position_embedding.dims(), [1, 37, 48]);
    assert_close(
        "with_image_size(48)",
        resized.forward(px).unwrap(),
        &expected,
        "interp.48x48.last_hidden_state",
        TOL,
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    use blip::text::Error;
    let device = device();
    let dir = fixtures().join("tiny-captioning");
    let expected = Expected::open(&dir);
    let model = CaptioningModel::from_pretrained(&dir, &device)
        .unwrap()
        .model;
    let pixels = expected.float::<4>("inputs.pixel_values", &device);

    // The ids are read back for this check on CPU devices only (on a GPU the read would
    // stall every pass; the tokenizer's ids are checked at load instead).
    if blip::core::ops::is_host(&device) {
        let out_of_vocab = Tensor::<2, Int>::from_ints([[118, 5, 120]], &device);
        match model.forward(pixels.clone().narrow(0, 0, 1), out_of_vocab, None) {
            Err(Error::TokenId {
                id,
                row,
                column,
                vocab_size,
                ..
            }) => {
                assert_eq!((id, row, column, vocab_size), (120, 0, 2, 120));
            }
            other => panic!("{other:?}"),
        }
    }
    let too_long = Tensor::<2, Int>::zeros([1, 41], &device);
    assert!(matches!(
        model.forward(pixels.clone().narrow(0, 0, 1), too_long, None),
        Err(Error::TooLong {
            length: 41,
            max: 40,
            ..
        })
    ));
    let ids = Tensor::<2, Int>::from_ints([[118, 5, 6]], &device);
    let bad_mask = Tensor::<2, Int>::ones([1, 4], &device);
    assert!(matches!(
        model.forward(pixels.clone().narrow(0, 0, 1), ids.clone(), Some(bad_mask)),
        Err(Error::Core(blip::core::Error::InputShape {
            what: "attention_mask",
            ..
        }))
    ));
    assert!(
        matches!(
            model.forward(pixels.clone(), ids.clone(), None),
            Err(Error::Core(blip::core::Error::InputShape { .. }))
        ),
        "two images for one text row"
    );
    let odd = Tensor::<4>::zeros([1, 3, 30, 32], &device);
    assert!(matches!(
        model.forward(odd, ids.clone(), None),
        Err(Error::Core(blip::core::Error::InputShape {
            what: "pixel_values",
            ..
        }))
    ));
    let grey = Tensor::<4>::zeros([1, 1, 32, 32], &device);
    assert!(model.vision_model.forward(grey).is_err());
}
