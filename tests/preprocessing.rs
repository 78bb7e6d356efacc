//! Image preprocessing and tokenization against transformers' `BlipImageProcessor` and
//! bert-base-uncased tokenizer (fixtures from `scripts/make_fixtures.py`).

mod common;

use blip::ImageProcessor;
use blip::text::{BlipTokenizer, Padding};
use blip::vision::{BLIP_MEAN, BLIP_STD, Error as VisionError};
use common::{Expected, fixtures};

/// The acceptance bar: 2 grey levels per pixel.
const MAX_LEVELS: u8 = 2;

#[test]
fn image_processor_matches_blip_image_processor() {
    let dir = fixtures().join("images");
    let expected = Expected::open(&dir);
    let processor = ImageProcessor::new(384);
    for name in [
        "chelsea.png",
        "astronaut.png",
        "coffee.png",
        "camera.png",
        "logo.png",
        "rocket.jpg",
    ] {
        let image = ImageProcessor::open(dir.join(name)).unwrap();
        let ours = processor.resize(&image); // HWC
        let theirs = expected.bytes(name); // CHW
        assert_eq!(expected.shape(name), vec![3, 384, 384]);
        let plane = 384 * 384;
        let worst = (0..3 * plane)
            .map(|i| ours[(i % plane) * 3 + i / plane].abs_diff(theirs[i]))
            .max()
            .unwrap();
        // PNGs decode identically, so the resampler must be exact; JPEG decoders differ
        // (zune-jpeg here, libjpeg-turbo in PIL) by a level or two.
        let bound = if name.ends_with(".jpg") {
            MAX_LEVELS
        } else {
            0
        };
        assert!(
            worst <= bound,
            "{name}: max |Δ| {worst} grey levels > {bound}"
        );

        // And the normalised tensor is exactly those levels rescaled and normalised.
        let values = processor.pixel_values(&image);
        for i in [0, plane + 77, 3 * plane - 1] {
            let (c, p) = (i / plane, i % plane);
            let want = (ours[p * 3 + c] as f32 / 255.0 - BLIP_MEAN[c]) / BLIP_STD[c];
            assert!((values[i] - want).abs() < 1e-6);
        }
    }
}

#[test]
fn unreadable_images_are_typed_errors_naming_the_path() {
    let missing = fixtures().join("images/no-such-image.png");
    match ImageProcessor::open(&missing) {
        Err(VisionError::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected an Io error, got {other:?}"),
    }
    let not_an_image = fixtures().join("tokenizer/vocab.txt");
    match ImageProcessor::open(&not_an_image) {
        Err(VisionError::ImageDecode { path, .. }) => assert_eq!(path, not_an_image),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

fn tokenizer_expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("tokenizer/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rows(value: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(value.clone()).unwrap()
}

fn check_tokenizer(tokenizer: &BlipTokenizer, source: &str) {
    let expected = tokenizer_expected();
    assert_eq!(
        tokenizer.dec_token_id,
        expected["dec_token_id"].as_u64().unwrap() as u32
    );
    assert_eq!(
        tokenizer.enc_token_id,
        expected["enc_token_id"].as_u64().unwrap() as u32
    );
    assert_eq!(
        tokenizer.vocab_size(),
        expected["vocab_size"].as_u64().unwrap() as usize
    );
    let texts: Vec<String> = serde_json::from_value(expected["texts"].clone()).unwrap();
    let ids = rows(&expected["ids"]);
    let decoded: Vec<String> = serde_json::from_value(expected["decoded"].clone()).unwrap();
    for ((text, want), want_text) in texts.iter().zip(&ids).zip(&decoded) {
        let got = tokenizer.encode(text).unwrap();
        assert_eq!(&got, want, "{source}: ids of {text:?}");
        let text_back = tokenizer.decode(&got, true).unwrap();
        assert_eq!(&text_back, want_text, "{source}: decode of {text:?}");
    }
    let batch = &expected["batch"];
    let texts: Vec<String> = serde_json::from_value(batch["texts"].clone()).unwrap();
    let max = batch["max_length"].as_u64().unwrap() as usize;
    let encoded = tokenizer
        .encode_batch(&texts, Some(max), Padding::Longest)
        .unwrap();
    assert_eq!(
        encoded.input_ids,
        rows(&batch["input_ids"]),
        "{source}: batch ids"
    );
    assert_eq!(
        encoded.attention_mask,
        rows(&batch["attention_mask"]),
        "{source}: batch mask"
    );
}

#[test]
fn tokenizer_from_tokenizer_json_matches_transformers() {
    // A bert-base-uncased tokenizer.json with fixed padding/truncation at 128 and no
    // [DEC]/[ENC]: both must be dealt with.
    let tokenizer = BlipTokenizer::from_file(fixtures().join("tokenizer/tokenizer.json")).unwrap();
    check_tokenizer(&tokenizer, "tokenizer.json");
}

#[test]
fn tokenizer_from_vocab_txt_matches_transformers() {
    let tokenizer = BlipTokenizer::from_vocab(fixtures().join("tokenizer/vocab.txt")).unwrap();
    check_tokenizer(&tokenizer, "vocab.txt");
}

#[test]
fn max_length_padding_pads_every_row_to_the_limit() {
    let tokenizer = BlipTokenizer::from_vocab(fixtures().join("tokenizer/vocab.txt")).unwrap();
    let encoded = tokenizer
        .encode_batch(
            &["a dog", "a dog on a very long beach with many words"],
            Some(6),
            Padding::MaxLength,
        )
        .unwrap();
    assert_eq!(encoded.shape(), [2, 6]);
    assert_eq!(encoded.input_ids[0][..4], [101, 1037, 3899, 102]);
    assert_eq!(encoded.input_ids[0][4..], [0, 0]);
    assert_eq!(encoded.attention_mask[0], [1, 1, 1, 1, 0, 0]);
    assert_eq!(
        *encoded.input_ids[1].last().unwrap(),
        102,
        "truncation keeps [SEP]"
    );
    assert_eq!(encoded.attention_mask[1], [1; 6]);
    // [CLS] and [SEP] alone fill a limit of 2; a limit of 1 cannot hold them.
    let two = tokenizer
        .encode_batch(&["a dog"], Some(2), Padding::MaxLength)
        .unwrap();
    assert_eq!(two.input_ids, [[101, 102]]);
    let err = tokenizer
        .encode_batch(&["a dog"], Some(1), Padding::MaxLength)
        .unwrap_err();
    assert!(err.to_string().contains("max_length 1"), "{err}");
}

#[test]
fn missing_tokenizer_file_is_a_typed_error() {
    let err = BlipTokenizer::from_file(fixtures().join("tokenizer/nope.json")).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");
}
