//! [`ImageProcessor`]: decode → RGB → stretch-resize (bicubic) → rescale → normalise → batch,
//! as transformers' `BlipImageProcessor` and the original `blip_image_eval` transform do.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use image::{DynamicImage, ImageReader, RgbImage};

use blip_core::{Error, Result};

/// CLIP's image mean, used by every BLIP checkpoint (digits as published).
#[allow(clippy::excessive_precision)]
pub const BLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's image standard deviation, used by every BLIP checkpoint (digits as published).
#[allow(clippy::excessive_precision)]
pub const BLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// Turns images into the normalised `[B, 3, H, W]` tensor the ViT takes.
///
/// Resizing is a straight stretch to `height × width` (aspect ratio not kept, no crop) with
/// the antialiased bicubic filter in torchvision's fixed-point arithmetic, which is what
/// transformers' `BlipImageProcessor` runs: the output equals it exactly. Chosen by
/// measurement over `fast_image_resize` and the `image` crate, which land up to 2–4 grey
/// levels away (`cargo run --release --example resize_parity`, figures in the README).
///
/// ```
/// use blip_vision::{BLIP_MEAN, BLIP_STD, ImageProcessor};
/// use burn::tensor::Device;
/// use image::{Rgb, RgbImage};
///
/// let processor = ImageProcessor::new(32);
/// let white = RgbImage::from_pixel(64, 48, Rgb([255, 255, 255]));
/// let pixels = processor.preprocess(&[white], &Device::flex());
/// assert_eq!(pixels.dims(), [1, 3, 32, 32]); // stretched to 32 × 32, channel-major
/// let values = pixels.into_data().to_vec::<f32>().unwrap();
/// let red = (1.0 - BLIP_MEAN[0]) / BLIP_STD[0];
/// assert!(values[..32 * 32].iter().all(|v| (v - red).abs() < 1e-5));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Output height in pixels.
    pub height: usize,
    /// Output width in pixels.
    pub width: usize,
    /// Per-channel mean subtracted after rescaling to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl ImageProcessor {
    /// BLIP's processor for square `size × size` inputs (384 for the task checkpoints).
    pub fn new(size: usize) -> Self {
        Self {
            height: size,
            width: size,
            mean: BLIP_MEAN,
            std: BLIP_STD,
        }
    }

    /// Decodes any format the `image` crate reads (format guessed from the content) and
    /// converts it to RGB: grey is replicated, transparency composited over white.
    ///
    /// The `image` crate's default limits refuse decompression bombs. A JPEG that ends
    /// before its last scan does (a truncated file, which the JPEG decoder would fill with
    /// grey) is an error, as it is in PIL. Anything but a regular file is refused unopened.
    pub fn open(path: impl AsRef<Path>) -> Result<RgbImage> {
        let path = path.as_ref();
        Self::decode(&blip_core::read_file(path)?).map_err(|source| Error::ImageDecode {
            path: path.to_path_buf(),
            source,
        })
    }

    /// [`Self::open`] for an image already in memory (a tar member, a download).
    pub fn decode(bytes: &[u8]) -> std::result::Result<RgbImage, image::ImageError> {
        if is_truncated_jpeg(bytes) {
            return Err(image::ImageError::Decoding(
                image::error::DecodingError::new(
                    image::ImageFormat::Jpeg.into(),
                    "the file is truncated: no end-of-image marker after the last scan",
                ),
            ));
        }
        let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
        Ok(to_rgb(reader.decode()?))
    }

    /// [`Self::open`], then resized to this processor's size at once. Images kept this way
    /// (a batch waiting for the model) cost the model's resolution, not the file's: 16
    /// decoded 12000² photos are 6.9 GB, 16 at 384² are 7 MB. The values equal those of
    /// resizing later: [`Self::resize`] leaves an image of the right size unchanged.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<RgbImage> {
        Self::open(path).map(|image| self.fit(image))
    }

    /// `image` resized to this processor's size (unchanged when it has that size already),
    /// the original dropped: what [`Self::load`] does after decoding.
    pub fn fit(&self, image: RgbImage) -> RgbImage {
        if image.dimensions() == (self.width as u32, self.height as u32) {
            return image;
        }
        let resized = self.resize(&image);
        drop(image);
        RgbImage::from_raw(self.width as u32, self.height as u32, resized)
            .expect("the resampler returns width · height · 3 values")
    }

    /// Resizes and normalises one RGB image into `3·H·W` values, channel-major.
    pub fn pixel_values(&self, image: &RgbImage) -> Vec<f32> {
        let resized = self.resize(image);
        let plane = self.height * self.width;
        let mut out = vec![0f32; 3 * plane];
        for (i, pixel) in resized.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (pixel[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// Preprocesses a batch of decoded images into `[B, 3, H, W]` on `device`.
    pub fn preprocess(&self, images: &[RgbImage], device: &Device) -> Tensor<4> {
        let mut values = Vec::with_capacity(images.len() * 3 * self.height * self.width);
        for image in images {
            values.extend(self.pixel_values(image));
        }
        Tensor::from_data(
            TensorData::new(values, [images.len(), 3, self.height, self.width]),
            device,
        )
    }

    /// Opens and preprocesses image files; the first unreadable file is the error.
    pub fn preprocess_paths<P: AsRef<Path>>(
        &self,
        paths: &[P],
        device: &Device,
    ) -> Result<Tensor<4>> {
        let images = paths
            .iter()
            .map(|p| self.load(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.preprocess(&images, device))
    }

    /// The resized RGB values (row-major, interleaved, rounded to whole grey levels), before
    /// rescaling.
    pub fn resize(&self, image: &RgbImage) -> Vec<u8> {
        let (w, h) = image.dimensions();
        if (w as usize, h as usize) == (self.width, self.height) {
            return image.as_raw().clone();
        }
        resize_bicubic_aa(
            image.as_raw(),
            w as usize,
            h as usize,
            self.width,
            self.height,
        )
    }
}

/// Whether `bytes` is a JPEG (SOI marker) with no end-of-image marker after its last
/// start-of-scan: the file was cut inside the compressed data. A marker byte pair can only
/// appear as a marker in scan data (0xFF is stuffed as FF 00 there), and the last SOS is
/// the main image's, after any EXIF thumbnail.
fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let Some(last_scan) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return true;
    };
    !bytes[last_scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// The taps of a 1-D antialiased bicubic resize from `input` to `output` samples, in the
/// fixed point torchvision uses for `uint8` images: per output sample the first input index
/// and `i16` weights, plus the number of fractional bits of those weights.
fn aa_taps(input: usize, output: usize) -> (Vec<(usize, Vec<i32>)>, u32) {
    const A: f64 = -0.5; // Keys' cubic, as PIL and torchvision's antialiased bicubic
    let cubic = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
        } else {
            0.0
        }
    };
    let scale = input as f64 / output as f64;
    let (support, invscale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale) // widen the kernel when shrinking: antialiasing
    } else {
        (2.0, 1.0)
    };
    let mut max_weight = 0f64;
    let taps: Vec<(usize, Vec<f64>)> = (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let start = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(input as i64);
            let mut weights: Vec<f64> = (start..end)
                .map(|j| cubic((j as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            max_weight = weights.iter().fold(max_weight, |m, &w| m.max(w));
            (start as usize, weights)
        })
        .collect();
    // As many fractional bits as keep the largest weight within i16.
    let mut precision = 0u32;
    while precision < 22
        && ((0.5 + max_weight * (1u64 << (precision + 1)) as f64) as i64) < (1 << 15)
    {
        precision += 1;
    }
    let unit = (1u64 << precision) as f64;
    let fixed = taps
        .into_iter()
        .map(|(start, weights)| {
            let weights = weights
                .iter()
                .map(|w| {
                    let v = w * unit;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i16 as i32
                })
                .collect();
            (start, weights)
        })
        .collect();
    (fixed, precision)
}

/// One separable pass of a fixed-point resize over `lines` lines of `len` samples of
/// 3 channels, reading sample `k` of line `l` at `get(l, k)`: rounds half up, clamps to u8.
fn resample_pass(
    taps: &(Vec<(usize, Vec<i32>)>, u32),
    lines: usize,
    get: impl Fn(usize, usize, usize) -> u8,
    mut put: impl FnMut(usize, usize, usize, u8),
) {
    let (taps, precision) = taps;
    let initial = 1i32 << (precision - 1);
    for line in 0..lines {
        for (o, (start, weights)) in taps.iter().enumerate() {
            for c in 0..3 {
                let sum = weights.iter().enumerate().fold(initial, |acc, (k, w)| {
                    acc + w * get(line, start + k, c) as i32
                });
                put(line, o, c, (sum >> precision).clamp(0, 255) as u8);
            }
        }
    }
}

/// Separable antialiased bicubic (Keys, a = −0.5) resize of interleaved RGB bytes with
/// torchvision's `uint8` arithmetic (i16 weights, horizontal pass first, each pass rounded
/// to u8) — what transformers' `BlipImageProcessor` runs, reproduced exactly.
///
/// ```
/// use blip_vision::resize_bicubic_aa;
///
/// let grey = vec![200u8; 8 * 6 * 3]; // 8 × 6 RGB
/// let out = resize_bicubic_aa(&grey, 8, 6, 4, 3);
/// assert_eq!(out.len(), 4 * 3 * 3);
/// assert!(out.iter().all(|&v| v == 200));
/// assert_eq!(resize_bicubic_aa(&grey, 8, 6, 8, 6), grey); // same size: unchanged
/// ```
pub fn resize_bicubic_aa(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let mut horizontal = src.to_vec();
    if out_w != w {
        horizontal = vec![0u8; h * out_w * 3];
        resample_pass(
            &aa_taps(w, out_w),
            h,
            |y, x, c| src[(y * w + x) * 3 + c],
            |y, x, c, v| horizontal[(y * out_w + x) * 3 + c] = v,
        );
    }
    if out_h == h {
        return horizontal;
    }
    let mut out = vec![0u8; out_h * out_w * 3];
    resample_pass(
        &aa_taps(h, out_h),
        out_w,
        |x, y, c| horizontal[(y * out_w + x) * 3 + c],
        |x, y, c, v| out[(y * out_w + x) * 3 + c] = v,
    );
    out
}

/// RGB conversion as transformers 5 does it: transparency is composited over white, grey
/// channels replicated, higher bit depths scaled to 8 bits.
///
/// ```
/// use blip_vision::to_rgb;
/// use image::{DynamicImage, GrayImage, Luma, Rgba, RgbaImage};
///
/// let transparent = RgbaImage::from_pixel(1, 1, Rgba([0, 0, 0, 0]));
/// assert_eq!(to_rgb(DynamicImage::ImageRgba8(transparent)).get_pixel(0, 0).0, [255, 255, 255]);
/// let grey = GrayImage::from_pixel(1, 1, Luma([77]));
/// assert_eq!(to_rgb(DynamicImage::ImageLuma8(grey)).get_pixel(0, 0).0, [77, 77, 77]);
/// ```
pub fn to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut rgb = RgbImage::new(w, h);
    for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = src[3] as u32;
        for c in 0..3 {
            dst[c] = ((src[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Rgba, RgbaImage};

    fn scratch_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("blip-proc-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn a_truncated_jpeg_is_an_error_not_a_grey_image() {
        let whole = jpeg(64, 48);
        let ok = scratch_file("whole.jpg", &whole);
        assert_eq!(ImageProcessor::open(&ok).unwrap().dimensions(), (64, 48));
        // Trailing bytes after the end marker are tolerated, as by PIL.
        let mut padded = whole.clone();
        padded.extend_from_slice(b"trailing");
        let padded_path = scratch_file("padded.jpg", &padded);
        assert!(ImageProcessor::open(&padded_path).is_ok());
        for cut in [whole.len() - 2, whole.len() * 2 / 3, whole.len() / 2] {
            let path = scratch_file(&format!("cut{cut}.jpg"), &whole[..cut]);
            let err = ImageProcessor::open(&path).unwrap_err();
            assert!(
                matches!(&err, Error::ImageDecode { .. }) && err.to_string().contains("truncated"),
                "cut at {cut}: {err}"
            );
            std::fs::remove_file(path).unwrap();
        }
        std::fs::remove_file(ok).unwrap();
        std::fs::remove_file(padded_path).unwrap();
    }

    #[test]
    fn load_keeps_only_the_model_resolution_and_changes_no_value() {
        let path = scratch_file("big.jpg", &jpeg(300, 200));
        let p = ImageProcessor::new(32);
        let loaded = p.load(&path).unwrap();
        assert_eq!(loaded.dimensions(), (32, 32));
        let full = ImageProcessor::open(&path).unwrap();
        assert_eq!(p.pixel_values(&loaded), p.pixel_values(&full));
        std::fs::remove_file(path).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let path = std::env::temp_dir().join(format!("blip-proc-{}-fifo.jpg", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let (send, receive) = std::sync::mpsc::channel();
        let fifo = path.clone();
        std::thread::spawn(move || send.send(ImageProcessor::open(&fifo).map(|_| ())));
        let result = receive
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO must not block");
        let err = result.unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let mut img = RgbaImage::new(1, 2);
        img.put_pixel(0, 0, Rgba([0, 0, 0, 0]));
        img.put_pixel(0, 1, Rgba([10, 20, 30, 255]));
        let rgb = to_rgb(DynamicImage::ImageRgba8(img));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(0, 1).0, [10, 20, 30]);
    }

    #[test]
    fn grey_is_replicated() {
        let img = GrayImage::from_pixel(2, 2, image::Luma([77]));
        let rgb = to_rgb(DynamicImage::ImageLuma8(img));
        assert!(rgb.pixels().all(|p| p.0 == [77, 77, 77]));
    }

    #[test]
    fn normalisation_is_channel_major() {
        let p = ImageProcessor::new(2);
        let img = RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 128]));
        let v = p.pixel_values(&img);
        assert_eq!(v.len(), 12);
        assert!((v[0] - (1.0 - BLIP_MEAN[0]) / BLIP_STD[0]).abs() < 1e-6);
        assert!((v[4] - (0.0 - BLIP_MEAN[1]) / BLIP_STD[1]).abs() < 1e-6);
        assert!((v[11] - (128.0 / 255.0 - BLIP_MEAN[2]) / BLIP_STD[2]).abs() < 1e-6);
    }
}
