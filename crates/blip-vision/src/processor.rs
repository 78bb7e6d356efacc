//! [`ImageProcessor`]: decode → RGB → stretch-resize (bicubic) → rescale → normalise → batch,
//! as transformers' `BlipImageProcessor` and the original `blip_image_eval` transform do.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use fast_image_resize::images::Image as ResizeImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// CLIP's image mean, used by every BLIP checkpoint.
pub const BLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's image standard deviation, used by every BLIP checkpoint.
pub const BLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// Turns images into the normalised `[B, 3, H, W]` tensor the ViT takes.
///
/// Resizing is a straight stretch to `height × width` (aspect ratio not kept, no crop) with a
/// Catmull-Rom bicubic filter whose support widens when shrinking — PIL's and torchvision's
/// antialiased bicubic. `fast_image_resize` was chosen by measurement against transformers'
/// `BlipImageProcessor` (see `examples/resize_parity.rs` and the README).
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

    /// The resized RGB bytes (row-major, interleaved), before rescaling.
    pub fn resize(&self, image: &RgbImage) -> Vec<u8> {
        let (w, h) = image.dimensions();
        if (w as usize, h as usize) == (self.width, self.height) {
            return image.as_raw().clone();
        }
        let src = ResizeImage::from_vec_u8(w, h, image.as_raw().clone(), PixelType::U8x3)
            .expect("an RgbImage's buffer matches its dimensions");
        let mut dst = ResizeImage::new(self.width as u32, self.height as u32, PixelType::U8x3);
        Resizer::new()
            .resize(
                &src,
                &mut dst,
                &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom)),
            )
            .expect("source and destination share a pixel type");
        dst.into_vec()
    }
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
