//! What the integration tests share: the safetensors fixtures under the repository's
//! `tests/fixtures/`, and the tolerance check.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// Vocabulary size of [`tiny_config`]: ids 0..5 are the special tokens, 5.. words.
pub const VOCAB: usize = 40;

/// The tiny pre-training config on a 40-token vocabulary ([PAD] 0, [CLS] 1, [SEP] 2,
/// [DEC] 3, [ENC] 4), 32-px images and queues of 8.
pub fn tiny_config() -> blip_train::PretrainConfig {
    let mut config = blip_train::PretrainConfig::tiny(VOCAB);
    let text = &mut config.blip.text;
    (text.pad_token_id, text.cls_token_id, text.sep_token_id) = (0, 1, 2);
    (text.bos_token_id, text.enc_token_id) = (3, 4);
    config.blip.vision.image_size = 32;
    config.with_queue_size(8)
}

/// The repository's `tests/fixtures/`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// One safetensors file of the fixtures, read whole.
pub struct Fixture(Vec<u8>);

impl Fixture {
    /// `relative` to [`fixtures`].
    pub fn open(relative: &str) -> Self {
        let path = fixtures().join(relative);
        Self(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    /// The parsed file.
    pub fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.0).expect("a safetensors file")
    }

    /// Whether the file holds `key`.
    pub fn has(&self, key: &str) -> bool {
        self.tensors().tensor(key).is_ok()
    }

    /// An f32 tensor's shape and values.
    pub fn floats(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let st = self.tensors();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("fixture has {key}"));
        assert_eq!(t.dtype(), Dtype::F32, "{key}");
        let values = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), values)
    }

    /// An i64 tensor's shape and values.
    pub fn ints(&self, key: &str) -> (Vec<usize>, Vec<i64>) {
        let st = self.tensors();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("fixture has {key}"));
        assert_eq!(t.dtype(), Dtype::I64, "{key}");
        let values = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), values)
    }

    /// The first value of an f32 tensor.
    pub fn scalar(&self, key: &str) -> f32 {
        self.floats(key).1[0]
    }

    /// The rows of a 2-d i64 tensor, as token ids.
    pub fn rows(&self, key: &str) -> Vec<Vec<u32>> {
        let (shape, values) = self.ints(key);
        values
            .chunks(shape[1])
            .map(|r| r.iter().map(|&v| v as u32).collect())
            .collect()
    }

    /// An f32 tensor on `device`.
    pub fn float<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let (shape, values) = self.floats(key);
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// An i64 tensor on `device`.
    pub fn int<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D, Int> {
        let (shape, values) = self.ints(key);
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// The values of a tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

/// Asserts `got` and `want` have the same length and every pair is within `tol`
/// (`approx::abs_diff_eq!`), naming `what` and the worst element.
#[track_caller]
pub fn assert_all_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| !approx::abs_diff_eq!(**g, **w, epsilon = tol))
        .max_by(|a, b| {
            let d = |(_, (g, w)): &(usize, (&f32, &f32))| (*g - *w).abs();
            d(a).total_cmp(&d(b))
        });
    if let Some((i, (g, w))) = worst {
        panic!(
            "{what}: element {i} is {g}, expected {w} (|Δ| {} > {tol})",
            (g - w).abs()
        );
    }
}
