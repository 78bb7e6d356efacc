//! Shared helpers of the integration tests: fixture reading and tolerance checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// Max |Δ| allowed between our f32 outputs and transformers' (the project's parity bar).
pub const TOL: f32 = 1e-4;

/// The device the suite runs on: `BLIP_TEST_DEVICE` (`cpu`, `wgpu`, `ndarray`; a build
/// with that backend's feature), `cpu` by default.
pub fn device() -> Device {
    let name = std::env::var("BLIP_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    blip::backend_device(&name).unwrap_or_else(|e| panic!("BLIP_TEST_DEVICE: {e}"))
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The `expected.safetensors` of one fixture directory.
pub struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    pub fn open(dir: &Path) -> Self {
        let bytes = std::fs::read(dir.join("expected.safetensors")).expect("fixture exists");
        Self { bytes }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid fixture")
    }

    pub fn has(&self, key: &str) -> bool {
        self.view().names().contains(&key)
    }

    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.view().tensor(key).expect(key).shape().to_vec()
    }

    /// Values of a float tensor (f32 or f16) as f32.
    pub fn floats(&self, key: &str) -> Vec<f32> {
        let view = self.view();
        let t = view
            .tensor(key)
            .unwrap_or_else(|_| panic!("fixture has {key}"));
        match t.dtype() {
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F16 => t
                .data()
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
            other => panic!("{key}: unexpected dtype {other:?}"),
        }
    }

    pub fn bytes(&self, key: &str) -> Vec<u8> {
        let view = self.view();
        let t = view
            .tensor(key)
            .unwrap_or_else(|_| panic!("fixture has {key}"));
        assert_eq!(t.dtype(), Dtype::U8, "{key}");
        t.data().to_vec()
    }

    pub fn ints(&self, key: &str) -> Vec<i64> {
        let view = self.view();
        let t = view
            .tensor(key)
            .unwrap_or_else(|_| panic!("fixture has {key}"));
        assert_eq!(t.dtype(), Dtype::I64, "{key}");
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn float<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(self.floats(key), self.shape(key)), device)
    }

    pub fn int<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D, Int> {
        Tensor::from_data(TensorData::new(self.ints(key), self.shape(key)), device)
    }
}

/// Values of a tensor on the host.
pub fn values<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    let data = t.into_data().try_into_vec_as::<f32>().expect("f32 data");
    (shape, data)
}

/// Asserts equal shapes and every element within `tol` (`approx::abs_diff_eq!`, which a NaN
/// never passes); returns the max |Δ| seen.
#[track_caller]
pub fn assert_close<const D: usize>(
    what: &str,
    ours: Tensor<D>,
    expected: &Expected,
    key: &str,
    tol: f32,
) -> f32 {
    let (shape, got) = values(ours);
    assert_eq!(shape, expected.shape(key), "{what}: shape");
    let want = expected.floats(key);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    if std::env::var_os("BLIP_TEST_VERBOSE").is_some() {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("{what}: max |Δ| {worst:.2e} (values up to {scale:.1})");
    }
    let close = got
        .iter()
        .zip(&want)
        .all(|(g, w)| approx::abs_diff_eq!(*g, *w, epsilon = tol));
    assert!(close, "{what}: max |Δ| = {worst:e} > {tol:e}");
    worst
}

/// A scratch directory under the system's temp dir, unique to this process and `tag`,
/// removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("blip-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
