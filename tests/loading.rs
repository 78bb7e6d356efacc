//! A wrong or damaged checkpoint is a typed error naming the file, key and shapes: never a
//! panic, never a silently random weight. Each test damages a copy of a tiny fixture.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blip::text::Error;
use blip::vision::Error as VisionError;
use blip::{CaptioningModel, RetrievalModel, VqaModel};
use common::{Expected, assert_close, device, fixtures};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// A scratch copy of a fixture directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(fixture: &str, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "blip-loading-{fixture}-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for file in [
            "config.json",
            "model.safetensors",
            "expected.safetensors",
            "vocab.txt",
        ] {
            std::fs::copy(fixtures().join(fixture).join(file), dir.join(file)).unwrap();
        }
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn weights(&self) -> PathBuf {
        self.0.join("model.safetensors")
    }

    fn read(&self) -> Tensors {
        let bytes = std::fs::read(self.weights()).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect()
    }

    fn write(&self, tensors: &Tensors) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(k, (dtype, shape, data))| {
                (
                    k.clone(),
                    TensorView::new(*dtype, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &self.weights()).unwrap();
    }

    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.0.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vision_error(result: Result<impl std::fmt::Debug, Error>) -> VisionError {
    match result {
        Err(Error::Core(e)) => e,
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

const KEY: &str = "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight";

#[test]
fn missing_tensor_names_its_key_and_shape() {
    let scratch = Scratch::copy_of("tiny-captioning", "missing");
    let mut tensors = scratch.read();
    tensors.remove(KEY).unwrap();
    scratch.write(&tensors);
    match vision_error(CaptioningModel::from_pretrained(scratch.path(), &device())) {
        VisionError::MissingTensor {
            key,
            expected,
            path,
        } => {
            assert_eq!(key, KEY);
            assert_eq!(expected, vec![32, 32]);
            assert_eq!(path, scratch.weights());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unexpected_tensor_is_reported() {
    let scratch = Scratch::copy_of("tiny-captioning", "extra");
    let mut tensors = scratch.read();
    tensors.insert(
        "text_decoder.pooler.dense.bias".into(),
        (Dtype::F32, vec![1], vec![0; 4]),
    );
    scratch.write(&tensors);
    let err = vision_error(CaptioningModel::from_pretrained(scratch.path(), &device()));
    assert!(
        matches!(&err, VisionError::UnexpectedTensor { key, shape, .. }
            if key == "text_decoder.pooler.dense.bias" && shape == &vec![1]),
        "{err:?}"
    );
    assert!(err.to_string().contains("pooler"), "{err}");
}

#[test]
fn config_contradicting_weights_names_both_shapes() {
    let scratch = Scratch::copy_of("tiny-captioning", "config");
    scratch.edit_config(|c| c["text_config"]["intermediate_size"] = 48.into());
    match vision_error(CaptioningModel::from_pretrained(scratch.path(), &device())) {
        VisionError::ShapeMismatch {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(
                key,
                "text_decoder.bert.encoder.layer.0.intermediate.dense.bias"
            );
            assert_eq!(expected, vec![48]);
            assert_eq!(found, vec![64]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn fewer_layers_in_config_than_in_file_is_an_error() {
    let scratch = Scratch::copy_of("tiny-retrieval", "layers");
    scratch.edit_config(|c| c["vision_config"]["num_hidden_layers"] = 1.into());
    let err = vision_error(RetrievalModel::from_pretrained(scratch.path(), &device()));
    assert!(
        matches!(&err, VisionError::UnexpectedTensor { key, .. } if key.starts_with("vision_model.encoder.layers.1.")),
        "{err:?}"
    );
}

#[test]
fn integer_tensor_where_a_weight_belongs_is_a_dtype_error() {
    let scratch = Scratch::copy_of("tiny-captioning", "dtype");
    let mut tensors = scratch.read();
    let key = "text_decoder.cls.predictions.bias";
    let (_, shape, data) = tensors.remove(key).unwrap();
    tensors.insert(key.into(), (Dtype::I32, shape, data));
    scratch.write(&tensors);
    match vision_error(CaptioningModel::from_pretrained(scratch.path(), &device())) {
        VisionError::DType { key: k, found, .. } => {
            assert_eq!(k, key);
            assert_eq!(found, "I32");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_file_is_reported_with_both_lengths() {
    let scratch = Scratch::copy_of("tiny-vqa", "truncated");
    let bytes = std::fs::read(scratch.weights()).unwrap();
    std::fs::write(scratch.weights(), &bytes[..bytes.len() - 1000]).unwrap();
    match vision_error(VqaModel::from_pretrained(scratch.path(), &device())) {
        VisionError::Truncated {
            expected, found, ..
        } => {
            assert_eq!(expected, bytes.len() as u64);
            assert_eq!(found, bytes.len() as u64 - 1000);
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(scratch.weights(), &bytes[..20]).unwrap();
    let err = vision_error(VqaModel::from_pretrained(scratch.path(), &device()));
    assert!(matches!(err, VisionError::Truncated { .. }), "{err:?}");
}

#[test]
fn garbage_is_not_a_safetensors_file() {
    let scratch = Scratch::copy_of("tiny-captioning", "garbage");
    let mut junk = 16u64.to_le_bytes().to_vec();
    junk.extend(b"{not json at all");
    std::fs::write(scratch.weights(), junk).unwrap();
    let err = vision_error(CaptioningModel::from_pretrained(scratch.path(), &device()));
    assert!(
        matches!(err, VisionError::InvalidCheckpoint { .. }),
        "{err:?}"
    );
}

#[test]
fn wrong_family_is_reported_not_loaded() {
    let err = vision_error(CaptioningModel::from_pretrained(
        fixtures().join("tiny-retrieval"),
        &device(),
    ));
    assert!(
        matches!(&err, VisionError::MissingTensor { key, .. } if key.starts_with("text_decoder.")),
        "{err:?}"
    );
}

#[test]
fn missing_files_are_named() {
    let dir = std::env::temp_dir().join(format!("blip-loading-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = CaptioningModel::from_pretrained(&dir, &device()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingFile {
                file: "config.json",
                ..
            }
        ),
        "{err:?}"
    );
    std::fs::copy(
        fixtures().join("tiny-vqa/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = VqaModel::from_pretrained(&dir, &device()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingFile {
                file: "model.safetensors",
                ..
            }
        ),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

const DECODER_WEIGHT: &str = "text_decoder.cls.predictions.decoder.weight";
const WORD_EMBEDDINGS: &str = "text_decoder.bert.embeddings.word_embeddings.weight";

#[test]
fn stored_tied_decoder_weight_must_equal_the_embeddings() {
    let scratch = Scratch::copy_of("tiny-captioning", "tied");
    let mut tensors = scratch.read();
    let embeddings = tensors[WORD_EMBEDDINGS].clone();
    tensors.insert(DECODER_WEIGHT.into(), embeddings.clone());
    scratch.write(&tensors);
    CaptioningModel::from_pretrained(scratch.path(), &device()).expect("an equal alias loads");

    let (dtype, shape, mut data) = embeddings;
    data[0] ^= 0x55;
    tensors.insert(DECODER_WEIGHT.into(), (dtype, shape, data));
    scratch.write(&tensors);
    let err = vision_error(CaptioningModel::from_pretrained(scratch.path(), &device()));
    assert!(
        matches!(&err, VisionError::Config { message, .. } if message.contains(DECODER_WEIGHT)),
        "{err:?}"
    );
}

#[test]
fn half_precision_checkpoints_are_widened_to_f32() {
    let scratch = Scratch::copy_of("tiny-captioning", "f16");
    let tensors: Tensors = scratch
        .read()
        .into_iter()
        .map(|(k, (_, shape, data))| {
            let halves = data
                .chunks_exact(4)
                .flat_map(|b| {
                    half::f16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            (k, (Dtype::F16, shape, halves))
        })
        .collect();
    scratch.write(&tensors);
    let device = device();
    let model = CaptioningModel::from_pretrained(scratch.path(), &device)
        .unwrap()
        .model;
    let expected = Expected::open(scratch.path());
    let pixels = expected.float::<4>("inputs.pixel_values", &device);
    // f16 weights: close to the f32 reference, not equal.
    let worst = assert_close(
        "f16 vision",
        model.vision_model.forward(pixels).unwrap(),
        &expected,
        "vision.last_hidden_state",
        0.1,
    );
    assert!(worst > 1e-6, "weights were not rounded to f16: {worst}");
}

#[test]
fn save_pretrained_writes_back_the_same_checkpoint() {
    let device = device();
    for fixture in ["tiny-captioning", "asym-retrieval", "tiny-vqa"] {
        let source = fixtures().join(fixture);
        let out =
            std::env::temp_dir().join(format!("blip-roundtrip-{fixture}-{}", std::process::id()));
        let config = blip::BlipConfig::from_hf_json(source.join("config.json")).unwrap();
        match fixture {
            "tiny-captioning" => CaptioningModel::from_pretrained(&source, &device)
                .unwrap()
                .model
                .save_pretrained(&config, &out),
            "asym-retrieval" => RetrievalModel::from_pretrained(&source, &device)
                .unwrap()
                .model
                .save_pretrained(&config, &out),
            _ => VqaModel::from_pretrained(&source, &device)
                .unwrap()
                .model
                .save_pretrained(&config, &out),
        }
        .unwrap();
        let original = std::fs::read(source.join("model.safetensors")).unwrap();
        let written = std::fs::read(out.join("model.safetensors")).unwrap();
        let (a, b) = (
            SafeTensors::deserialize(&original).unwrap(),
            SafeTensors::deserialize(&written).unwrap(),
        );
        let mut names_a = a.names();
        let mut names_b = b.names();
        names_a.sort();
        names_b.sort();
        assert_eq!(names_a, names_b, "{fixture}: keys");
        for name in names_a {
            let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
            assert_eq!(x.shape(), y.shape(), "{fixture}: {name}");
            assert!(x.data() == y.data(), "{fixture}: {name} bytes differ");
        }
        let reread = blip::BlipConfig::from_hf_json(out.join("config.json")).unwrap();
        assert_eq!(reread, config, "{fixture}: config.json round trip");
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| {
                name.to_string_lossy()
                    .ends_with(blip::core::fs::TEMP_SUFFIX)
            })
            .collect();
        assert!(
            leftovers.is_empty(),
            "{fixture}: temp files left: {leftovers:?}"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Rewrites `model.safetensors` with `edit` applied to its JSON header; the data section is
/// kept as it is. The header is padded to its old length plus 256 bytes, so that `edit` is
/// told the data start (its second argument) before it writes offsets.
fn edit_header(scratch: &Scratch, edit: impl FnOnce(&mut serde_json::Value, u64)) {
    let bytes = std::fs::read(scratch.weights()).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let pad_to = header_len + 256;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    edit(&mut header, 8 + pad_to as u64);
    let mut json = serde_json::to_vec(&header).unwrap();
    assert!(json.len() <= pad_to);
    json.resize(pad_to, b' ');
    let mut out = (pad_to as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(scratch.weights(), out).unwrap();
}

#[test]
fn offsets_that_wrap_around_2_pow_64_are_refused() {
    // An entry whose start is 2^64 - data_start pointed back into the header bytes: the
    // wrapped sum passed the bounds check, and the captions were garbage with exit 0.
    let scratch = Scratch::copy_of("tiny-captioning", "wrap");
    edit_header(&scratch, |header, data_start| {
        let entry = &mut header[KEY];
        let [start, end] = [0, 1].map(|i| entry["data_offsets"][i].as_u64().unwrap());
        let wrapped = 0u64.wrapping_sub(data_start);
        entry["data_offsets"] = serde_json::json!([wrapped, wrapped + (end - start)]);
    });
    let err = vision_error(CaptioningModel::from_pretrained(scratch.path(), &device()));
    assert!(
        matches!(
            err,
            VisionError::Truncated { .. } | VisionError::InvalidCheckpoint { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn overlapping_and_unaddressable_entries_are_refused() {
    let scratch = Scratch::copy_of("tiny-captioning", "overlap");
    // Two entries sharing their bytes.
    edit_header(&scratch, |header, _| {
        let other = "text_decoder.bert.encoder.layer.1.crossattention.self.value.weight";
        header[other]["data_offsets"] = header[KEY]["data_offsets"].clone();
    });
    let err = vision_error(CaptioningModel::from_pretrained(scratch.path(), &device()));
    assert!(err.to_string().contains("overlap"), "{err}");

    // A shape whose byte size overflows u64.
    let scratch = Scratch::copy_of("tiny-captioning", "hugeshape");
    edit_header(&scratch, |header, _| {
        header[KEY]["shape"] = serde_json::json!([u64::MAX / 2, 4]);
    });
    let err = vision_error(CaptioningModel::from_pretrained(scratch.path(), &device()));
    assert!(
        matches!(err, VisionError::InvalidCheckpoint { .. }),
        "{err:?}"
    );
}

#[test]
fn a_config_claiming_more_layers_than_the_file_holds_is_refused_before_allocation() {
    // 10^6 layers took 7.8 GB before the weights were checked; now the header is read first.
    for (section, layers) in [
        ("vision_config", 1000),
        ("text_config", 1000),
        ("vision_config", 1_000_000),
        ("text_config", 1_000_000_000),
    ] {
        let scratch = Scratch::copy_of("tiny-captioning", "manylayers");
        scratch.edit_config(|c| c[section]["num_hidden_layers"] = layers.into());
        let err = vision_error(CaptioningModel::from_pretrained(scratch.path(), &device()));
        match err {
            VisionError::Config { message, .. } => {
                assert!(message.contains(&layers.to_string()), "{message}");
                assert!(message.contains("num_hidden_layers"), "{message}");
            }
            other => panic!("{section} {layers}: {other:?}"),
        }
    }
}

#[test]
fn non_finite_weights_are_refused_at_load() {
    for (value, dtype) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let scratch = Scratch::copy_of("tiny-retrieval", "nan");
        let mut tensors = scratch.read();
        let key = "text_encoder.encoder.layer.0.output.dense.weight";
        let (_, _, data) = tensors.get_mut(key).unwrap();
        data[8..12].copy_from_slice(&value.to_le_bytes());
        data[20..24].copy_from_slice(&value.to_le_bytes());
        scratch.write(&tensors);
        match vision_error(RetrievalModel::from_pretrained(scratch.path(), &device())) {
            VisionError::NonFiniteTensor { key: k, count, .. } => {
                assert_eq!(k, key, "{dtype}");
                assert_eq!(count, 2, "{dtype}");
            }
            other => panic!("{dtype}: {other:?}"),
        }
    }
}

#[test]
fn a_tokenizer_of_another_vocabulary_is_refused() {
    // A 10-token vocabulary with a 120-token model decoded captions as "a a".
    let scratch = Scratch::copy_of("tiny-captioning", "smallvocab");
    let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb\nc\nd\ne\n";
    std::fs::write(scratch.path().join("vocab.txt"), vocab).unwrap();
    let err = CaptioningModel::from_pretrained(scratch.path(), &device()).unwrap_err();
    match &err {
        Error::Tokenizer { path, message } => {
            assert!(path.ends_with("vocab.txt"), "{err}");
            assert!(
                message.contains("12 tokens") && message.contains("120"),
                "{err}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// The child half of [`hub_ids_load_from_the_hf_cache`]: `from_pretrained` with a hub id,
/// in a process whose `HF_HUB_CACHE` points at the cache the parent built.
#[test]
fn hub_id_child() {
    if std::env::var_os("BLIP_HUB_CHILD").is_none() {
        return; // only meaningful as the child of the test below
    }
    let loaded = CaptioningModel::from_pretrained("org/tiny-captioning", &device()).unwrap();
    assert!(loaded.tokenizer.is_some());
    let err = CaptioningModel::from_pretrained("org/not-cached", &device()).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
}

#[test]
fn hub_ids_load_from_the_hf_cache() {
    let cache = std::env::temp_dir().join(format!("blip-hub-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--org--tiny-captioning");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let fixture = fixtures().join("tiny-captioning");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), snapshot.join(file)).unwrap();
    }
    blip::BlipTokenizer::from_vocab(fixture.join("vocab.txt"))
        .unwrap()
        .save(snapshot.join("tokenizer.json"))
        .unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["hub_id_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("BLIP_HUB_CHILD", "1")
        .env("HF_HUB_CACHE", &cache)
        .env("HF_ENDPOINT", "http://127.0.0.1:9") // nothing listens: no download succeeds
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(String::from_utf8_lossy(&child.stdout).contains("1 passed"));
    std::fs::remove_dir_all(&cache).unwrap();
}
