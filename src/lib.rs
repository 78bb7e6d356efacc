//! # BLIP on burn
//!
//! Bootstrapping Language-Image Pre-training (Li et al., 2022, arXiv 2201.12086): caption,
//! match and question images with the published BLIP checkpoints, on any burn backend.
//!
//! This facade re-exports the workspace crates:
//!
//! | module | crate | what |
//! |---|---|---|
//! | [`core`] | `blip-core` | checked safetensors IO, errors, atomic writes, the RNG, text cleaning, dropout |
//! | [`vision`] | `blip-vision` | ViT encoder, image processor |
//! | [`text`] | `blip-text` | MED text transformer, LM head and loss, tokenizer, generation, task models, HF loaders |
//! | `train` | `blip-train` (feature `train`) | ITC, ITM and LM objectives, pre-training model, trainer, data, `.pth` loading |
//! | `capfilt` | `blip-capfilt` (feature `capfilt`) | CapFilt: captioner + filter over a data set, resumable |
//!
//! Dependency direction: `blip-core` ← `blip-vision` ← `blip-text` ← `blip-train` ←
//! `blip-capfilt`, and this facade on top. Inference users depend on `blip` alone and
//! compile no training code.
//!
//! ```no_run
//! use blip::{CaptioningModel, ImageProcessor, backend_device};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = backend_device("cpu")?; // explicit, never Device::default()
//! let captioner = CaptioningModel::from_pretrained("blip-image-captioning-base", &device)?;
//! let size = captioner.config.vision.image_size;
//! let pixels = ImageProcessor::new(size).preprocess_paths(&["cat.jpg"], &device)?;
//! # let _ = pixels;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

/// CapFilt, the dataset bootstrapping loop (cargo feature `capfilt`).
#[cfg(feature = "capfilt")]
pub use blip_capfilt as capfilt;
/// What the model crates share: checkpoint IO, errors, atomic writes, the RNG, text cleaning.
pub use blip_core as core;
pub use blip_text as text;
/// The pre-training objectives (cargo feature `train`).
#[cfg(feature = "train")]
pub use blip_train as train;
pub use blip_vision as vision;
pub use burn::tensor::{Device, FloatDType};

pub use blip_core::precision::float_dtype;
pub use blip_text::{
    BlipConfig, BlipTokenizer, Caption, Captioner, CaptioningModel, FirstToken, GenerationConfig,
    LoadOptions, Matcher, Pretrained, QuestionAnswerer, RetrievalModel, Sampling, TextConfig,
    VqaModel, cosine_similarity, lm_loss,
};
pub use blip_vision::{ImageProcessor, VisionConfig, VisionTransformer};

/// The backends this build can run on, by the names binaries accept (`--device`).
pub const BACKENDS: &[&str] = &[
    #[cfg(feature = "flex")]
    "cpu",
    #[cfg(feature = "wgpu")]
    "wgpu",
    #[cfg(feature = "cuda")]
    "cuda",
    #[cfg(feature = "ndarray")]
    "ndarray",
];

/// Every backend name, with the cargo feature that provides it.
const FEATURES: &[(&str, &str)] = &[
    ("cpu", "flex"),
    ("flex", "flex"),
    ("wgpu", "wgpu"),
    ("cuda", "cuda"),
    ("ndarray", "ndarray"),
];

/// Why a backend name gives no device.
///
/// ```
/// use blip::{DeviceError, backend_device};
///
/// let err = backend_device("tpu").unwrap_err();
/// assert!(matches!(&err, DeviceError::Unknown { name, available }
///     if name == "tpu" && *available == blip::BACKENDS));
/// assert!(err.to_string().starts_with("unknown device \"tpu\""));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No backend has this name.
    #[error("unknown device {name:?}: this build offers {available:?}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names this build accepts.
        available: &'static [&'static str],
    },
    /// The backend exists but this build was compiled without it.
    #[error(
        "device {name:?} needs the cargo feature `{feature}`, which this build lacks \
         (it offers {available:?}): rebuild with `--features {feature}`"
    )]
    Disabled {
        /// The name asked for.
        name: String,
        /// The feature that provides it.
        feature: &'static str,
        /// The names this build accepts.
        available: &'static [&'static str],
    },
    /// The backend is built in, but this machine cannot run it (no GPU, no driver).
    #[error("device {name:?} cannot run on this machine: {reason}")]
    Unavailable {
        /// The name asked for.
        name: String,
        /// What the backend reported.
        reason: String,
    },
}

/// The name of [`DeviceError`] before it had variants.
///
/// ```
/// let err: blip::UnknownDevice = blip::backend_device("tpu").unwrap_err();
/// assert!(matches!(err, blip::DeviceError::Unknown { .. }));
/// ```
pub type UnknownDevice = DeviceError;

/// The device for a backend name: `cpu` (burn's flex backend), `wgpu` (GPU, or Mesa's
/// software Vulkan), `cuda` (NVIDIA GPU 0; `cuda:N` for GPU `N`), `ndarray` (burn's
/// deprecated CPU backend).
/// Binaries take it from `--device`; the library never picks one implicitly.
///
/// A GPU backend is tried once with a tiny computation, so that a machine without the GPU or
/// its driver gets [`DeviceError::Unavailable`] here, naming the cause, instead of a panic
/// inside the backend at the first real operation.
///
/// ```
/// let err = blip::backend_device("tpu").unwrap_err();
/// assert!(err.to_string().contains("unknown device"));
/// if !blip::BACKENDS.contains(&"cuda") {
///     // A build without CUDA says which feature gives it, for every GPU index.
///     let err = blip::backend_device("cuda:1").unwrap_err();
///     assert!(err.to_string().contains("cuda"), "{err}");
///     assert!(matches!(err, blip::DeviceError::Disabled { feature: "cuda", .. }));
/// }
/// ```
pub fn backend_device(name: &str) -> Result<Device, DeviceError> {
    match name {
        #[cfg(feature = "flex")]
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => probe(name, Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "cuda")]
        "cuda" => probe(name, Device::cuda(0)),
        // One GPU of several (a rank of data-parallel training drives its local rank's).
        #[cfg(feature = "cuda")]
        _ if cuda_index(name).is_some() => {
            probe(name, Device::cuda(cuda_index(name).unwrap_or_default()))
        }
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)] // users ask for it; burn keeps it working in 0.22
        "ndarray" => Ok(Device::ndarray()),
        _ => Err(
            match FEATURES
                .iter()
                .find(|(n, _)| *n == name || (*n == "cuda" && cuda_index(name).is_some()))
            {
                Some(&(_, feature)) => DeviceError::Disabled {
                    name: name.to_string(),
                    feature,
                    available: BACKENDS,
                },
                None => DeviceError::Unknown {
                    name: name.to_string(),
                    available: BACKENDS,
                },
            },
        ),
    }
}

/// `N` of a device name `cuda:N`.
fn cuda_index(name: &str) -> Option<usize> {
    name.strip_prefix("cuda:")?.parse().ok()
}

/// Runs a tiny computation on `device`; a backend that panics (no adapter, no driver) is
/// reported as [`DeviceError::Unavailable`] with its message.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn probe(name: &str, device: Device) -> Result<Device, DeviceError> {
    use std::panic::{AssertUnwindSafe, catch_unwind, set_hook, take_hook};
    let unavailable = |reason: String| DeviceError::Unavailable {
        name: name.to_string(),
        reason,
    };
    // The backends report a missing driver by panicking; their message becomes the error,
    // so the default hook's report would only repeat it.
    let hook = take_hook();
    set_hook(Box::new(|_| {}));
    let result = catch_unwind(AssertUnwindSafe(|| {
        let x = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
        (x * 2.0).sum().into_scalar::<f32>()
    }));
    set_hook(hook);
    match result {
        Ok(12.0) => Ok(device),
        Ok(sum) => Err(unavailable(format!("a test sum gave {sum}, not 12"))),
        Err(payload) => Err(unavailable(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the backend panicked".into()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_backend_left_out_of_the_build_names_its_feature() {
        let err = backend_device("cuda").unwrap_err();
        assert!(
            matches!(
                err,
                DeviceError::Disabled {
                    feature: "cuda",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }

    #[test]
    fn an_unknown_name_lists_what_the_build_offers() {
        let err = backend_device("tpu").unwrap_err();
        assert!(matches!(err, DeviceError::Unknown { .. }), "{err:?}");
        assert!(err.to_string().contains(&format!("{BACKENDS:?}")), "{err}");
    }
}
