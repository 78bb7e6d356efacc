//! The losses against `scripts/loss_reference.py` (the original formulas in PyTorch): values
//! and gradients to 1e-5.

use std::path::Path;

use blip_train::{hard_negative_weights, itc_loss, itm_loss, lm_loss};
use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

struct Reference(Vec<u8>);

impl Reference {
    fn open() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/losses/expected.safetensors");
        Self(std::fs::read(path).expect("reference exists"))
    }

    fn get(&self, key: &str) -> (Vec<usize>, Vec<u8>, Dtype) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("{key}"));
        (t.shape().to_vec(), t.data().to_vec(), t.dtype())
    }

    fn floats(&self, key: &str) -> Vec<f32> {
        let (_, data, dtype) = self.get(key);
        assert_eq!(dtype, Dtype::F32);
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn float<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let shape = self.get(key).0;
        Tensor::from_data(TensorData::new(self.floats(key), shape), device)
    }

    fn int<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D, Int> {
        let (shape, data, dtype) = self.get(key);
        assert_eq!(dtype, Dtype::I64);
        let values: Vec<i64> = data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

#[track_caller]
fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "{what}: max |Δ| {worst:e}");
}

fn device() -> Device {
    Device::flex().autodiff()
}

#[test]
fn itc_loss_and_gradients_match_the_original() {
    let (r, device) = (Reference::open(), device());
    let image_feat = r.float::<2>("itc.image_feat", &device).require_grad();
    let text_feat = r.float::<2>("itc.text_feat", &device).require_grad();
    let temp = r.float::<1>("itc.temp", &device).require_grad();
    let loss = itc_loss(
        image_feat.clone(),
        text_feat.clone(),
        r.float("itc.image_feat_m", &device),
        r.float("itc.text_feat_m", &device),
        r.float("itc.image_queue", &device),
        r.float("itc.text_queue", &device),
        temp.clone(),
        r.floats("itc.alpha")[0] as f64,
        None,
    );
    assert_close("itc loss", values(loss.clone()), r.floats("itc.loss"));
    let grads = loss.backward();
    assert_close(
        "d itc / d image_feat",
        values(image_feat.grad(&grads).unwrap()),
        r.floats("itc.grad.image_feat"),
    );
    assert_close(
        "d itc / d text_feat",
        values(text_feat.grad(&grads).unwrap()),
        r.floats("itc.grad.text_feat"),
    );
    assert_close(
        "d itc / d temp",
        values(temp.grad(&grads).unwrap()),
        r.floats("itc.grad.temp"),
    );
}

#[test]
fn hard_negative_weights_exclude_the_pair_itself() {
    let (r, device) = (Reference::open(), Device::flex());
    let image_feat = r.float::<2>("itc.image_feat", &device);
    let text_feat = r.float::<2>("itc.text_feat", &device);
    let temp = r.floats("itc.temp")[0];
    // The original's sim_i2t[:, :B] / sim_t2i[:, :B]: online features vs momentum features.
    let sim_i2t = image_feat.matmul(r.float::<2>("itc.text_feat_m", &device).transpose()) / temp;
    let sim_t2i = text_feat.matmul(r.float::<2>("itc.image_feat_m", &device).transpose()) / temp;
    let i2t = values(hard_negative_weights(sim_i2t));
    assert_close("weights i2t", i2t.clone(), r.floats("itm.weights_i2t"));
    assert_close(
        "weights t2i",
        values(hard_negative_weights(sim_t2i)),
        r.floats("itm.weights_t2i"),
    );
    let b = (i2t.len() as f64).sqrt() as usize;
    for i in 0..b {
        assert_eq!(i2t[i * b + i], 0.0, "row {i} must not draw itself");
    }
}

#[test]
fn itm_loss_and_gradient_match_the_original() {
    let (r, device) = (Reference::open(), device());
    let logits = r.float::<2>("itm.logits", &device).require_grad();
    let loss = itm_loss(logits.clone());
    assert_close("itm loss", values(loss.clone()), r.floats("itm.loss"));
    let grads = loss.backward();
    assert_close(
        "d itm / d logits",
        values(logits.grad(&grads).unwrap()),
        r.floats("itm.grad.logits"),
    );
}

#[test]
fn lm_loss_and_gradient_match_the_original() {
    let (r, device) = (Reference::open(), device());
    let logits = r.float::<3>("lm.logits", &device).require_grad();
    let loss = lm_loss(logits.clone(), r.int("lm.labels", &device), 0.1);
    assert_close("lm loss", values(loss.clone()), r.floats("lm.loss"));
    let grads = loss.backward();
    assert_close(
        "d lm / d logits",
        values(logits.grad(&grads).unwrap()),
        r.floats("lm.grad.logits"),
    );
}
