//! # BLIP on burn
//!
//! Bootstrapping Language-Image Pre-training (Li et al., 2022, arXiv 2201.12086): caption,
//! match and question images with the published BLIP checkpoints, on any burn backend.
//!
//! This facade re-exports the workspace crates:
//!
//! | crate | what |
//! |---|---|
//! | [`vision`] (`blip-vision`) | ViT encoder, image processor, checked safetensors loading |
//! | [`text`] (`blip-text`) | MED text transformer, LM head and loss, tokenizer, task models, HF loaders |
//! | `train` (`blip-train`, feature `train`) | ITC, ITM and LM pre-training losses |
//!
//! Dependency direction: `blip-vision` ← `blip-text` ← (`blip-train` ← `blip-capfilt`), and
//! this facade on top. Inference users depend on `blip` alone and compile no training code.
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
pub use blip_text as text;
/// The pre-training objectives (cargo feature `train`).
#[cfg(feature = "train")]
pub use blip_train as train;
pub use blip_vision as vision;
pub use burn::tensor::Device;

pub use blip_text::{
    BlipConfig, BlipTokenizer, Caption, Captioner, CaptioningModel, FirstToken, GenerationConfig,
    Matcher, Pretrained, QuestionAnswerer, RetrievalModel, Sampling, TextConfig, VqaModel,
    cosine_similarity, lm_loss,
};
pub use blip_vision::{ImageProcessor, VisionConfig, VisionTransformer};

/// The backends this build can run on, by the names binaries accept (`--device`).
pub const BACKENDS: &[&str] = &[
    #[cfg(feature = "flex")]
    "cpu",
    #[cfg(feature = "wgpu")]
    "wgpu",
    #[cfg(feature = "ndarray")]
    "ndarray",
];

/// A backend name that this build does not provide.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown or disabled device {name:?}: this build offers {available:?} (cargo features flex, wgpu, ndarray)"
)]
pub struct UnknownDevice {
    /// The name asked for.
    pub name: String,
    /// The names this build accepts.
    pub available: &'static [&'static str],
}

/// The device for a backend name: `cpu` (burn's flex backend), `wgpu` (GPU, or Mesa's software
/// Vulkan), `ndarray` (burn's deprecated CPU backend). Binaries take it from `--device`; the
/// library never picks one implicitly.
pub fn backend_device(name: &str) -> Result<Device, UnknownDevice> {
    match name {
        #[cfg(feature = "flex")]
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)] // users ask for it; burn keeps it working in 0.22
        "ndarray" => Ok(Device::ndarray()),
        _ => Err(UnknownDevice {
            name: name.to_string(),
            available: BACKENDS,
        }),
    }
}
