//! Loading the original salesforce/BLIP `.pth` checkpoints: tiny random state dicts in the
//! original key layout (`scripts/make_pth_fixtures.py`), compared with transformers run on
//! the same weights converted as its conversion script did (|Δ| ≤ 1e-4), and the typed
//! errors of files that do not fit.

mod common;

use std::path::{Path, PathBuf};

use blip_text::ids_tensor;
use blip_text::{BlipConfig, Encoded, TextConfig};
use blip_train::original::{Family, OriginalCheckpoint, hf_to_original, original_to_hf};
use blip_train::{PretrainConfig, TrainError};
use blip_vision::VisionConfig;
use burn::tensor::{DType, Device, Tensor};
use common::{Fixture, assert_all_close, values};

const TOL: f32 = 1e-4;
const VOCAB: usize = 40;
const PAD: u32 = 0;
const CLS: u32 = 1;
const SEP: u32 = 2;
const DEC: u32 = 3;
const ENC: u32 = 4;

fn dir() -> PathBuf {
    common::fixtures().join("original")
}

fn open(name: &str) -> OriginalCheckpoint {
    OriginalCheckpoint::open(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn device() -> Device {
    Device::flex()
}

#[track_caller]
fn assert_close<const D: usize>(what: &str, got: Tensor<D>, expected: &Fixture, key: &str) {
    let (shape, want) = expected.floats(key);
    assert_eq!(got.dims().to_vec(), shape, "{what}: shape");
    assert_all_close(what, &values(got), &want, TOL);
}

// ---- configs matching the fixtures --------------------------------------------------------

fn text(encoder_width: usize) -> TextConfig {
    let mut text =
        TextConfig::new(VOCAB, 8, encoder_width, 16, 2, 2).with_max_position_embeddings(16);
    (text.pad_token_id, text.cls_token_id, text.sep_token_id) = (0, 1, 2);
    (text.bos_token_id, text.enc_token_id) = (3, 4);
    text
}

/// Vision width 16, text width 8, at `image_size` px (patches of 4).
fn blip(image_size: usize) -> BlipConfig {
    let vision = VisionConfig::new(16, 24, 2, 2, image_size)
        .with_patch_size(4)
        .with_layer_norm_eps(1e-6);
    BlipConfig::new(vision, text(16)).with_image_text_hidden_size(8)
}

/// The VQA fixture: vision width = text width = 8.
fn vqa_blip(image_size: usize) -> BlipConfig {
    let vision = VisionConfig::new(8, 16, 2, 2, image_size)
        .with_patch_size(4)
        .with_layer_norm_eps(1e-6);
    BlipConfig::new(vision, text(8)).with_image_text_hidden_size(8)
}

fn pretrain_config() -> PretrainConfig {
    PretrainConfig::new(blip(16)).with_queue_size(16)
}

/// Row 0 padded, row 1 full; `first` in place of `[CLS]`.
fn text_rows(first: u32) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let ids = vec![
        vec![first, 5, 17, 22, 9, SEP, PAD, PAD],
        vec![first, 33, 7, 38, 12, 26, 21, SEP],
    ];
    let mask = ids
        .iter()
        .map(|r| r.iter().map(|&t| u32::from(t != PAD)).collect())
        .collect();
    (ids, mask)
}

fn encoded(first: u32) -> Encoded {
    let (input_ids, attention_mask) = text_rows(first);
    Encoded {
        input_ids,
        attention_mask,
    }
}

// ---- opening ------------------------------------------------------------------------------

#[test]
fn opens_every_tensor_with_its_shape_and_dtype() {
    let ckpt = open("pretrain.pth");
    assert!(ckpt.is_nested(), "the state dict is under \"model\"");
    assert_eq!(ckpt.family(), Some(Family::Pretrain));
    assert_eq!(ckpt.shape("temp"), Some(&[][..]), "temp is 0-d");
    assert_eq!(ckpt.dtype("temp"), Some(DType::F32));
    assert_eq!(
        ckpt.shape("visual_encoder.blocks.1.attn.qkv.weight"),
        Some(&[48, 16][..])
    );
    assert_eq!(
        ckpt.dtype("text_encoder.embeddings.position_ids"),
        Some(DType::I64)
    );
    assert_eq!(ckpt.shape("image_queue"), Some(&[8, 16][..]));
    // `optimizer`, `config` and `epoch` beside `model` are not read.
    assert!(ckpt.keys().all(|k| !k.starts_with("optimizer")));
    let temp = ckpt
        .values("temp")
        .unwrap()
        .try_into_vec_as::<f32>()
        .unwrap();
    assert!((temp[0] - 0.0634).abs() < 1e-7, "{temp:?}");

    for (name, family) in [
        ("captioning.pth", Family::Captioning),
        ("retrieval.pth", Family::Retrieval),
        ("vqa.pth", Family::Vqa),
    ] {
        assert_eq!(open(name).family(), Some(family), "{name}");
    }
    // A bare state dict (no "model" key) in PyTorch's pre-1.6 container.
    let bare = open("pretrain_unshared.pth");
    assert!(!bare.is_nested());
    assert_eq!(bare.family(), Some(Family::Pretrain));
}

#[test]
fn vit_renames_follow_the_conversion_script() {
    for (original, hf) in [
        (
            "visual_encoder.cls_token",
            "vision_model.embeddings.class_embedding",
        ),
        (
            "visual_encoder.pos_embed",
            "vision_model.embeddings.position_embedding",
        ),
        (
            "visual_encoder.patch_embed.proj.weight",
            "vision_model.embeddings.patch_embedding.weight",
        ),
        (
            "visual_encoder.blocks.11.norm1.bias",
            "vision_model.encoder.layers.11.layer_norm1.bias",
        ),
        (
            "visual_encoder.blocks.0.attn.qkv.weight",
            "vision_model.encoder.layers.0.self_attn.qkv.weight",
        ),
        (
            "visual_encoder.blocks.0.attn.proj.bias",
            "vision_model.encoder.layers.0.self_attn.projection.bias",
        ),
        (
            "visual_encoder.blocks.2.mlp.fc2.weight",
            "vision_model.encoder.layers.2.mlp.fc2.weight",
        ),
        (
            "visual_encoder.norm.weight",
            "vision_model.post_layernorm.weight",
        ),
        (
            "text_encoder.encoder.layer.0.attention.self.query.weight",
            "text_encoder.encoder.layer.0.attention.self.query.weight",
        ),
        (
            "text_decoder.cls.predictions.transform.LayerNorm.bias",
            "text_decoder.cls.predictions.transform.LayerNorm.bias",
        ),
    ] {
        assert_eq!(original_to_hf(original), hf, "{original}");
        assert_eq!(hf_to_original(hf), original, "{hf}");
    }
}

#[test]
fn key_renames_round_trip_on_every_fixture_key() {
    for name in ["pretrain.pth", "captioning.pth", "retrieval.pth", "vqa.pth"] {
        for key in open(name).keys() {
            let hf = original_to_hf(key);
            assert_eq!(hf_to_original(&hf), key, "{name}: {key} → {hf}");
            if key.starts_with("visual_encoder.") {
                assert!(hf.starts_with("vision_model."), "{key} → {hf}");
                for old in [".blocks.", ".attn.", ".norm1.", ".pos_embed", ".cls_token"] {
                    assert!(!hf.contains(old), "{key} → {hf}");
                }
            }
        }
    }
}

// ---- parity with transformers -------------------------------------------------------------

#[test]
fn captioning_file_matches_transformers_with_a_resized_position_table() {
    let device = device();
    let expected = Fixture::open("original/expected.safetensors");
    // The file's table is for 16 px (17 rows), the model runs at 24 px (37 rows).
    let config = blip(24);
    let model = open("captioning.pth").captioning(&config, &device).unwrap();
    assert_eq!(
        model
            .vision_model
            .embeddings
            .position_embedding
            .val()
            .dims(),
        [1, 37, 16]
    );
    let (ids, mask) = text_rows(DEC);
    let logits = model
        .forward(
            expected.float::<4>("captioning.pixel_values", &device),
            ids_tensor(&ids, &device),
            Some(ids_tensor(&mask, &device)),
        )
        .unwrap();
    assert_close("captioning logits", logits, &expected, "captioning.logits");
}

#[test]
fn retrieval_file_matches_transformers() {
    let device = device();
    let expected = Fixture::open("original/expected.safetensors");
    let model = open("retrieval.pth").retrieval(&blip(16), &device).unwrap();
    let px = expected.float::<4>("retrieval.pixel_values", &device);
    let image_embeds = model.vision_model.forward(px).unwrap();
    let (ids, mask) = text_rows(ENC);
    let itm = model
        .itm_logits(
            image_embeds.clone(),
            ids_tensor(&ids, &device),
            Some(ids_tensor(&mask, &device)),
        )
        .unwrap();
    assert_close("ITM logits", itm, &expected, "retrieval.itm_logits");
    assert_close(
        "ITC image features",
        model.image_features(image_embeds),
        &expected,
        "retrieval.image_feat",
    );
    let (ids, mask) = text_rows(CLS);
    let text = model
        .text_features(ids_tensor(&ids, &device), Some(ids_tensor(&mask, &device)))
        .unwrap();
    assert_close("ITC text features", text, &expected, "retrieval.text_feat");
}

#[test]
fn vqa_file_matches_transformers_with_a_resized_position_table() {
    let device = device();
    let expected = Fixture::open("original/expected.safetensors");
    // The file's table is for 24 px (37 rows, as 480 px files), the model runs at 16 px.
    let model = open("vqa.pth").vqa(&vqa_blip(16), &device).unwrap();
    assert_eq!(
        model
            .vision_model
            .embeddings
            .position_embedding
            .val()
            .dims(),
        [1, 17, 8]
    );
    let (ids, mask) = text_rows(ENC);
    let answers = expected.rows("vqa.answer_ids");
    let answer_mask: Vec<Vec<u32>> = answers
        .iter()
        .map(|r| r.iter().map(|&t| u32::from(t != PAD)).collect())
        .collect();
    let logits = model
        .forward(
            expected.float::<4>("vqa.pixel_values", &device),
            ids_tensor(&ids, &device),
            Some(ids_tensor(&mask, &device)),
            ids_tensor(&answers, &device),
            Some(ids_tensor(&answer_mask, &device)),
        )
        .unwrap();
    assert_close("VQA answer logits", logits, &expected, "vqa.logits");
}

#[test]
fn pretraining_file_loads_model_and_distillation_state() {
    let device = device();
    let expected = Fixture::open("original/expected.safetensors");
    let ckpt = open("pretrain.pth");
    let (model, distillation) = ckpt.pretrain(&pretrain_config(), &device).unwrap();
    let px = expected.float::<4>("pretrain.pixel_values", &device);
    let image_embeds = model.image_embeds(px.clone()).unwrap();
    let (ids, mask) = text_rows(CLS);

    // The decoder: shared encoder layers with the decoder's own self-attention and LM head.
    let logits = model
        .decoder_logits(image_embeds.clone(), &ids, &mask)
        .unwrap();
    assert_close(
        "decoder logits",
        logits,
        &expected,
        "pretrain.decoder_logits",
    );
    let itm = model.itm_logits(image_embeds.clone(), &ids, &mask).unwrap();
    assert_close("ITM logits", itm, &expected, "pretrain.itm_logits");
    assert_close(
        "ITC image features",
        model.image_features(image_embeds),
        &expected,
        "pretrain.image_feat",
    );
    let text = model.text_features(&encoded(CLS), &device).unwrap();
    assert_close("ITC text features", text, &expected, "pretrain.text_feat");
    let (_, temp) = expected.floats("pretrain.temp");
    assert!((model.temperature() - temp[0] as f64).abs() < 1e-7);

    let d = distillation.expect("the file has momentum encoders and queues");
    assert_close(
        "momentum image features",
        d.momentum.image_features(px).unwrap(),
        &expected,
        "pretrain_m.image_feat",
    );
    assert_close(
        "momentum text features",
        d.momentum.text_features(&encoded(CLS), &device).unwrap(),
        &expected,
        "pretrain_m.text_feat",
    );
    let [dim, k] = d.image_queue.features.dims();
    assert_eq!((dim, k), (8, 16));
    assert_close(
        "image queue",
        d.image_queue.features.clone().reshape([dim * k]),
        &expected,
        "pretrain.image_queue",
    );
    assert_close(
        "text queue",
        d.text_queue.features.clone().reshape([dim * k]),
        &expected,
        "pretrain.text_queue",
    );
    assert_eq!((d.image_queue.ptr, d.text_queue.ptr), (6, 6), "queue_ptr");
    assert_eq!(d.idx_queue, vec![-100; 16]);
}

#[test]
fn task_models_load_from_a_pretraining_file() {
    // What transformers' conversion did with model_base_capfilt_large.pth: momentum, queues,
    // `temp` and the other task's modules are dropped.
    let device = device();
    let expected = Fixture::open("original/expected.safetensors");
    let ckpt = open("pretrain.pth");
    let px = expected.float::<4>("pretrain.pixel_values", &device);

    let captioner = ckpt.captioning(&blip(16), &device).unwrap();
    let (ids, mask) = text_rows(DEC);
    let logits = captioner
        .forward(
            px.clone(),
            ids_tensor(&ids, &device),
            Some(ids_tensor(&mask, &device)),
        )
        .unwrap();
    assert_close(
        "captioning logits",
        logits,
        &expected,
        "pretrain.decoder_logits",
    );

    let retrieval = ckpt.retrieval(&blip(16), &device).unwrap();
    let image_embeds = retrieval.vision_model.forward(px).unwrap();
    let (ids, mask) = text_rows(ENC);
    let itm = retrieval
        .itm_logits(
            image_embeds,
            ids_tensor(&ids, &device),
            Some(ids_tensor(&mask, &device)),
        )
        .unwrap();
    assert_close("ITM logits", itm, &expected, "pretrain.itm_logits");
}

// ---- errors -------------------------------------------------------------------------------

fn vision_error(result: Result<impl std::fmt::Debug, TrainError>) -> blip_core::Error {
    match result {
        Err(TrainError::Core(e)) => e,
        other => panic!("expected a blip_core::Error, got {other:?}"),
    }
}

fn checkpoint_error(result: Result<impl std::fmt::Debug, TrainError>) -> (PathBuf, String) {
    match result {
        Err(TrainError::Checkpoint { path, message }) => (path, message),
        other => panic!("expected TrainError::Checkpoint, got {other:?}"),
    }
}

#[test]
fn missing_tensor_names_the_original_key() {
    let device = device();
    // One more ViT block than the file has: reported under its original (timm) name.
    let mut config = blip(16);
    config.vision.num_hidden_layers = 3;
    let path = dir().join("retrieval.pth");
    let error = vision_error(open("retrieval.pth").retrieval(&config, &device));
    match &error {
        blip_core::Error::MissingTensor {
            path: p,
            key,
            expected,
        } => {
            assert_eq!(p, &path);
            assert!(key.starts_with("visual_encoder.blocks.2."), "{key}");
            assert!(!expected.is_empty());
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
    assert!(error.to_string().contains("retrieval.pth"), "{error}");

    // One more decoder layer in the pre-training model: its own self-attention block.
    let mut config = pretrain_config();
    config.blip.text.num_hidden_layers = 3;
    match vision_error(open("pretrain.pth").pretrain(&config, &device)) {
        blip_core::Error::MissingTensor { key, .. } => {
            assert!(
                key.starts_with("text_decoder.bert.encoder.layer.2.attention."),
                "{key}"
            );
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
}

#[test]
fn shape_mismatch_reports_both_shapes() {
    let device = device();
    let mut config = blip(16);
    config.text.vocab_size = VOCAB + 1;
    match vision_error(open("captioning.pth").captioning(&config, &device)) {
        blip_core::Error::ShapeMismatch {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, "text_decoder.bert.embeddings.word_embeddings.weight");
            assert_eq!(expected, vec![VOCAB + 1, 8]);
            assert_eq!(found, vec![VOCAB, 8]);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    // A queue of another length than the config's.
    let config = pretrain_config().with_queue_size(32);
    match vision_error(open("pretrain.pth").pretrain(&config, &device)) {
        blip_core::Error::ShapeMismatch {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, "image_queue");
            assert_eq!((expected, found), (vec![8, 32], vec![8, 16]));
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
}

#[test]
fn unused_tensor_is_reported() {
    // One decoder layer fewer than the file has.
    let mut config = blip(16);
    config.text.num_hidden_layers = 1;
    match vision_error(open("captioning.pth").captioning(&config, &device())) {
        blip_core::Error::UnexpectedTensor { key, .. } => {
            assert!(
                key.starts_with("text_decoder.bert.encoder.layer.1."),
                "{key}"
            );
        }
        other => panic!("expected UnexpectedTensor, got {other}"),
    }
}

#[test]
fn files_of_another_family_are_refused() {
    let device = device();
    let (path, message) = checkpoint_error(open("captioning.pth").retrieval(&blip(24), &device));
    assert_eq!(path, dir().join("captioning.pth"));
    assert!(message.contains("captioning checkpoint"), "{message}");
    let (_, message) = checkpoint_error(open("retrieval.pth").captioning(&blip(16), &device));
    assert!(message.contains("retrieval checkpoint"), "{message}");
    let (_, message) = checkpoint_error(open("vqa.pth").captioning(&vqa_blip(16), &device));
    assert!(message.contains("VQA checkpoint"), "{message}");
    let (_, message) =
        checkpoint_error(open("retrieval.pth").pretrain(&pretrain_config(), &device));
    assert!(message.contains("pre-training"), "{message}");
}

#[test]
fn unequal_shared_copy_is_refused() {
    let device = device();
    let key = "text_decoder.bert.encoder.layer.1.intermediate.dense.weight";
    let ckpt = open("pretrain_unshared.pth");
    let (path, message) = checkpoint_error(ckpt.pretrain(&pretrain_config(), &device));
    assert_eq!(path, dir().join("pretrain_unshared.pth"));
    assert!(message.contains(key), "{message}");
    assert!(
        message.contains("text_encoder.encoder.layer.1.intermediate.dense.weight"),
        "{message}"
    );
    // Task models load the decoder as its own tensors: the same file is a valid captioner.
    ckpt.captioning(&blip(16), &device).unwrap();
}

#[test]
fn files_that_are_not_checkpoints_are_typed_errors() {
    // Not a pickle or a PyTorch archive.
    let (path, message) =
        checkpoint_error(OriginalCheckpoint::open(dir().join("expected.safetensors")));
    assert_eq!(path, dir().join("expected.safetensors"));
    assert!(message.contains("PyTorch"), "{message}");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    checkpoint_error(OriginalCheckpoint::open(&manifest));
    // Absent.
    match OriginalCheckpoint::open(dir().join("absent.pth")) {
        Err(TrainError::Io { path, source }) => {
            assert_eq!(path, dir().join("absent.pth"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected TrainError::Io, got {other:?}"),
    }
}
