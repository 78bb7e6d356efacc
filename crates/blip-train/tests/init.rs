//! Pre-training initialised from unimodal checkpoints (`scripts/make_init_fixtures.py`,
//! fixtures in `tests/fixtures/init/`): a transformers ViT, DeiT or timm ViT into the ViT,
//! a transformers BERT into the text encoder and decoder, checked against transformers'
//! own outputs; and the typed errors of a checkpoint of the wrong family or size.

mod common;

use blip_text::{BlipConfig, TextConfig};
use blip_train::{BlipPretrain, InitSource, PretrainConfig, TrainError};
use blip_vision::VisionConfig;
use burn::tensor::Device;
use common::{Fixture, assert_all_close, fixtures, values};

/// Parity with transformers' float64 outputs, as the inference parity tests.
const TOL: f32 = 1e-4;

/// The fixtures' sizes: ViT width 32, 2 layers, 4 heads, 8-px patches (eps 1e-6); BERT
/// vocabulary 40 (+ `[DEC]`, `[ENC]`), width 32, 2 layers, 64 of its 80 positions.
fn config(image_size: usize) -> PretrainConfig {
    let vision = VisionConfig::new(32, 64, 2, 4, image_size)
        .with_patch_size(8)
        .with_layer_norm_eps(1e-6);
    let mut text = TextConfig::base(32);
    text.vocab_size = 42;
    text.hidden_size = 32;
    text.intermediate_size = 64;
    text.num_hidden_layers = 2;
    text.num_attention_heads = 4;
    text.max_position_embeddings = 64;
    (text.pad_token_id, text.cls_token_id, text.sep_token_id) = (0, 1, 2);
    (text.bos_token_id, text.enc_token_id) = (40, 41);
    PretrainConfig::new(BlipConfig::new(vision, text).with_image_text_hidden_size(16))
        .with_queue_size(8)
}

fn model(image_size: usize) -> BlipPretrain {
    config(image_size).init(&Device::flex())
}

fn dir(name: &str) -> std::path::PathBuf {
    fixtures().join("init").join(name)
}

fn vit_output(model: &BlipPretrain, pixels: &str) -> Vec<f32> {
    let pixels = Fixture::open("init/expected.safetensors").float::<4>(pixels, &Device::flex());
    values(model.visual_encoder.forward(pixels).unwrap())
}

#[test]
fn a_transformers_vit_gives_transformers_outputs_at_its_resolution_and_another() {
    let expected = Fixture::open("init/expected.safetensors");
    let (model32, report) = model(32).init_vision_from(dir("vit")).unwrap();
    assert_eq!(report.source, InitSource::HfVit);
    assert!(report.fresh.is_empty(), "{report}");
    assert_all_close(
        "ViT at 32 px",
        &vit_output(&model32, "pixels32"),
        &expected.floats("vit.out32").1,
        TOL,
    );
    // At 48 px the 4×4 position grid is resized to 6×6 once, at initialisation, as
    // transformers' `interpolate_pos_encoding` does on every call.
    let (model48, report) = model(48).init_vision_from(dir("vit")).unwrap();
    assert!(report.notes[0].contains("4×4 to a 6×6"), "{report}");
    assert_all_close(
        "ViT at 48 px",
        &vit_output(&model48, "pixels48"),
        &expected.floats("vit.out48").1,
        TOL,
    );
}

#[test]
fn deit_and_timm_layouts_of_the_same_weights_give_the_same_vit() {
    let (reference, _) = model(32).init_vision_from(dir("vit")).unwrap();
    let want = vit_output(&reference, "pixels32");
    let (deit, report) = model(32).init_vision_from(dir("deit")).unwrap();
    assert_eq!(report.source, InitSource::HfDeit);
    assert!(report.notes.iter().any(|n| n.contains("distillation")));
    assert_all_close("from DeiT", &vit_output(&deit, "pixels32"), &want, 0.0);
    // timm's file holds a classifier head too, which is not part of the ViT.
    let file = dir("timm").join("model.safetensors");
    let (timm, report) = model(32).init_vision_from(&file).unwrap();
    assert_eq!(report.source, InitSource::Timm);
    assert_all_close("from timm", &vit_output(&timm, "pixels32"), &want, 0.0);
}

#[test]
fn bert_sets_the_encoder_and_the_decoders_self_attention_and_leaves_cross_attention_fresh() {
    let expected = Fixture::open("init/expected.safetensors");
    let fresh = model(32);
    let cross_before = values(
        fresh.text_encoder.encoder.layer[0]
            .crossattention
            .as_ref()
            .unwrap()
            .self_attention
            .query
            .weight
            .val(),
    );
    let added_rows_before = values(fresh.text_encoder.embeddings.word_embeddings.weight.val());
    let (model, report) = fresh.init_text_from(dir("bert")).unwrap();
    assert_eq!(report.source, InitSource::Bert);

    // The unimodal encoder is BERT without token types (the fixture's are zero).
    let device = Device::flex();
    let ids = expected.int::<2>("bert.ids", &device);
    let mask = expected.int::<2>("bert.mask", &device);
    let states = model.text_encoder.encode_text(ids, Some(mask)).unwrap();
    assert_all_close(
        "BERT states",
        &values(states),
        &expected.floats("bert.out").1,
        TOL,
    );

    // The decoder's own self-attention is BERT's too; cross-attention kept its values.
    let encoder = &model.text_encoder.encoder.layer[1].attention;
    let decoder = &model.text_decoder.attention[1];
    assert_eq!(
        values(encoder.self_attention.key.weight.val()),
        values(decoder.self_attention.key.weight.val())
    );
    let cross = &model.text_encoder.encoder.layer[0].crossattention;
    let cross_after = values(cross.as_ref().unwrap().self_attention.query.weight.val());
    assert_eq!(cross_after, cross_before);
    assert!(
        report
            .fresh
            .iter()
            .any(|k| k.contains("crossattention.self_attention.query.weight")),
        "{report}"
    );
    // BLIP's two added tokens keep their rows; BERT's 40 come from the file.
    let rows = values(model.text_encoder.embeddings.word_embeddings.weight.val());
    assert_eq!(rows[40 * 32..], added_rows_before[40 * 32..]);
    assert_ne!(rows[..40 * 32], added_rows_before[..40 * 32]);
    let notes = report.notes.join("; ");
    assert!(notes.contains("2 vocabulary rows added"), "{notes}");
    assert!(notes.contains("cut from 80 to 64"), "{notes}");
    assert!(notes.contains("no `cls.predictions`"), "{notes}");
}

#[test]
fn bert_for_masked_lm_also_sets_the_lm_head() {
    let (model, report) = model(32).init_text_from(dir("bert-mlm")).unwrap();
    assert_eq!(report.source, InitSource::BertForMaskedLm);
    for key in [
        "text_decoder.lm_head.transform.dense.weight",
        "text_decoder.lm_head.bias",
    ] {
        assert!(report.loaded.iter().any(|k| k == key), "{key}: {report}");
    }
    // Same encoder weights as the BertModel fixture.
    let (plain, _) = self::model(32).init_text_from(dir("bert")).unwrap();
    assert_eq!(
        values(
            model.text_encoder.encoder.layer[0]
                .output
                .dense
                .weight
                .val()
        ),
        values(
            plain.text_encoder.encoder.layer[0]
                .output
                .dense
                .weight
                .val()
        )
    );
    let bias = values(model.text_decoder.lm_head.bias.val());
    assert_eq!(
        bias[40..],
        [0.0, 0.0],
        "added tokens' bias stays at its init"
    );
}

fn error_of<T: std::fmt::Debug>(result: blip_train::Result<T>) -> String {
    result.unwrap_err().to_string()
}

#[test]
fn a_checkpoint_of_another_family_or_size_is_a_typed_error() {
    // Families swapped.
    let err = error_of(model(32).init_text_from(dir("vit")));
    assert!(err.contains("not a BERT checkpoint"), "{err}");
    let err = error_of(model(32).init_vision_from(dir("bert")));
    assert!(err.contains("not a ViT checkpoint"), "{err}");

    // A wider ViT: the first tensor names its key and both shapes.
    let mut wide = config(32);
    wide.blip.vision.hidden_size = 64;
    wide.blip.vision.intermediate_size = 128;
    wide.blip.text.encoder_hidden_size = 64;
    let result = wide.init(&Device::flex()).init_vision_from(dir("vit"));
    match result {
        Err(TrainError::Core(blip_core::Error::ShapeMismatch {
            key,
            expected,
            found,
            ..
        })) => {
            assert_eq!(key, "embeddings.cls_token");
            assert_eq!((expected, found), (vec![1, 1, 64], vec![1, 1, 32]));
        }
        other => panic!("{other:?}"),
    }

    // Another depth.
    let mut deep = config(32);
    deep.blip.text.num_hidden_layers = 3;
    let err = error_of(deep.init(&Device::flex()).init_text_from(dir("bert")));
    assert!(
        err.contains("2 layers") && err.contains("config has 3"),
        "{err}"
    );

    // A vocabulary smaller than BERT's cannot hold it.
    let mut small = config(32);
    small.blip.text.vocab_size = 30;
    (small.blip.text.bos_token_id, small.blip.text.enc_token_id) = (28, 29);
    let err = error_of(small.init(&Device::flex()).init_text_from(dir("bert")));
    assert!(
        err.contains("embeddings.word_embeddings.weight")
            && err.contains("[30, 32]")
            && err.contains("[40, 32]"),
        "{err}"
    );
}

#[test]
fn sizes_follow_the_checkpoints_config() {
    let mut base = config(32);
    base.blip.text.hidden_size = 768;
    base.blip.text.num_hidden_layers = 12;
    let text = blip_train::text_config_of(dir("bert"), base.blip.text.clone()).unwrap();
    assert_eq!(
        (
            text.hidden_size,
            text.num_hidden_layers,
            text.max_position_embeddings
        ),
        (32, 2, 80)
    );
    assert_eq!(
        text.vocab_size, 42,
        "BLIP's tokenizer decides the vocabulary"
    );
    let mut vision = base.blip.vision.clone();
    vision.hidden_size = 768;
    let from_vit = blip_train::vision_config_of(dir("deit"), vision.clone()).unwrap();
    assert_eq!((from_vit.hidden_size, from_vit.patch_size), (32, 8));
    // timm's config declares no sizes: the given ones stay.
    assert_eq!(
        blip_train::vision_config_of(dir("timm"), vision.clone()).unwrap(),
        vision
    );
}
