//! [`ImageProcessor`]: decode → RGB → stretch-resize (bicubic) → rescale → normalise → batch,
//! as transformers' `BlipImageProcessor` and the original `blip_image_eval` transform do.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use image::{DynamicImage, ImageReader, RgbImage};

use crate::error::{Error, Result};

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
    pub fn open(path: impl AsRef<Path>) -> Result<RgbImage> {
        let path = path.as_ref();
        let decode = |source| Error::ImageDecode {
            path: path.to_path_buf(),
            source,
        };
        let reader = ImageReader::open(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .with_guessed_format()
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(to_rgb(reader.decode().map_err(decode)?))
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
        let images = paths.iter().map(Self::open).collect::<Result<Vec<_>>>()?;
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
