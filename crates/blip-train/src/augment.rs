//! BLIP's training-time image augmentation (`transform_train` in `data/__init__.py`):
//! torchvision's `RandomResizedCrop` (bicubic) → `RandomHorizontalFlip(0.5)` →
//! `RandomAugment(N=2, M=5)` of `transform/randaugment.py` → normalisation with the CLIP
//! statistics.
//!
//! Every random draw comes from the [`SplitMix64`] handed in, so an augmentation is reproducible
//! from its seed. The geometric RandomAugment operations reproduce OpenCV's `warpAffine`
//! (fixed-point bilinear, constant border) that the original runs, and AutoContrast /
//! Equalize its per-channel lookup tables, including their integer quirks.

use blip_core::SplitMix64;
use blip_vision::{BLIP_MEAN, BLIP_STD, ImageProcessor, resize_bicubic_aa};
use image::RgbImage;

/// RandomAugment's magnitude in the BLIP recipe (out of `MAX_LEVEL`).
const LEVEL: f64 = 5.0;
/// RandomAugment's `MAX_LEVEL`.
const MAX_LEVEL: f64 = 10.0;
/// RandomAugment's `translate_const`: translations are in pixels, not a fraction of the size.
const TRANSLATE_CONST: f64 = 10.0;
/// Border fill of the geometric operations (`replace_value`).
const FILL: u8 = 128;
/// Number of operations RandomAugment draws per image.
const N_OPS: usize = 2;
/// The aspect-ratio range of `RandomResizedCrop` (torchvision's default).
const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// How the AutoContrast operation maps a channel.
///
/// ```
/// use blip_train::{AutoContrast, RandAugOp};
/// use image::{Rgb, RgbImage};
///
/// // Every channel spans 10..=250.
/// let image = RgbImage::from_fn(2, 1, |x, _| Rgb([if x == 0 { 10 } else { 250 }; 3]));
/// let pil = RandAugOp::AutoContrast(AutoContrast::Pil).apply(&image);
/// assert_eq!((pil.get_pixel(0, 0), pil.get_pixel(1, 0)), (&Rgb([0; 3]), &Rgb([255; 3])));
/// // BLIP's wrapped offset saturates a channel whose minimum is above 0.
/// let blip = RandAugOp::AutoContrast(AutoContrast::Blip).apply(&image);
/// assert!(blip.pixels().all(|p| *p == Rgb([255; 3])));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoContrast {
    /// Exactly what BLIP's `autocontrast_func` computes. Its offset `-low * scale` negates a
    /// `numpy.uint8`, which wraps to `256 - low`: a channel whose minimum is above 0 (and
    /// that is not constant) becomes all 255, while one whose minimum is 0 is stretched
    /// correctly. Every released BLIP checkpoint was trained this way.
    #[default]
    Blip,
    /// What the function's docstring intends (`PIL.ImageOps.autocontrast` with cutoff 0):
    /// each channel stretched linearly from `[min, max]` to `[0, 255]`.
    Pil,
}

/// The training transform of BLIP: random resized crop, horizontal flip, RandomAugment.
///
/// [`TrainTransform::apply`] returns the augmented `image_size²` RGB image; [`normalize`]
/// turns it into model input.
///
/// ```
/// use blip_train::{SplitMix64, TrainTransform, normalize};
/// use image::{Rgb, RgbImage};
///
/// let image = RgbImage::from_fn(57, 31, |x, y| Rgb([x as u8 * 4, y as u8 * 8, 128]));
/// let transform = TrainTransform::pretrain(24);
/// let augmented = transform.apply(&image, &mut SplitMix64::new(5));
/// assert_eq!(augmented.dimensions(), (24, 24));
/// // The same seed gives the same crop, flip and RandomAugment operations.
/// assert_eq!(augmented, transform.apply(&image, &mut SplitMix64::new(5)));
/// assert_eq!(normalize(&augmented).len(), 3 * 24 * 24); // model input
/// assert_eq!(TrainTransform::finetune(384).min_scale, 0.5);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTransform {
    /// Side of the square output in pixels (384 for BLIP's fine-tunes, 224 in pre-training).
    pub image_size: usize,
    /// Lower bound of the crop's area as a fraction of the image (upper bound 1).
    pub min_scale: f64,
    /// Mirror left–right with probability 0.5 (captions are left unchanged, as in BLIP).
    pub hflip: bool,
    /// Apply `RandomAugment(N=2, M=5)` with BLIP's ten operations.
    pub rand_augment: bool,
    /// Which AutoContrast RandomAugment runs.
    pub autocontrast: AutoContrast,
}

impl TrainTransform {
    /// Pre-training's transform: crop scale `(0.2, 1)`, flip, RandomAugment.
    pub fn pretrain(image_size: usize) -> Self {
        Self {
            image_size,
            min_scale: 0.2,
            hflip: true,
            rand_augment: true,
            autocontrast: AutoContrast::Blip,
        }
    }

    /// Every fine-tune's transform (captioning, retrieval, VQA, NLVR2): crop scale `(0.5, 1)`,
    /// flip, RandomAugment.
    pub fn finetune(image_size: usize) -> Self {
        Self {
            min_scale: 0.5,
            ..Self::pretrain(image_size)
        }
    }

    /// Augments one image into an `image_size × image_size` RGB image, drawing (in this
    /// order) the crop, the flip and the RandomAugment operations from `rng`.
    ///
    /// # Panics
    /// If `image` has no pixels or `image_size` is 0.
    pub fn apply(&self, image: &RgbImage, rng: &mut SplitMix64) -> RgbImage {
        let (w, h) = (image.width() as usize, image.height() as usize);
        assert!(w > 0 && h > 0, "cannot augment an empty image");
        assert!(self.image_size > 0, "image_size must be positive");
        let crop = CropBox::sample(w, h, (self.min_scale, 1.0), RATIO, rng);
        let mut region = Vec::with_capacity(crop.width * crop.height * 3);
        for row in crop.top..crop.top + crop.height {
            let start = (row * w + crop.left) * 3;
            region.extend_from_slice(&image.as_raw()[start..start + crop.width * 3]);
        }
        let size = self.image_size;
        let resized = resize_bicubic_aa(&region, crop.width, crop.height, size, size);
        let mut out = RgbImage::from_raw(size as u32, size as u32, resized)
            .expect("the resize returns size² pixels");
        if self.hflip && rng.next_f64() < 0.5 {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        if self.rand_augment {
            for op in self.sample_rand_augment(rng) {
                out = op.apply(&out);
            }
        }
        out
    }

    /// Draws RandomAugment's operations as the original does: two of the ten operations
    /// uniformly with replacement, then for each a coin (kept with probability 0.5) and, for
    /// the geometric ones, the sign of the magnitude. Returns only the kept operations, in
    /// the order they are applied.
    pub fn sample_rand_augment(&self, rng: &mut SplitMix64) -> Vec<RandAugOp> {
        let chosen: [usize; N_OPS] = std::array::from_fn(|_| uniform_index(rng, 10));
        let mut ops = Vec::with_capacity(N_OPS);
        for op in chosen {
            // `if np.random.random() > prob: continue`
            if rng.next_f64() > 0.5 {
                continue;
            }
            let signed = |rng: &mut SplitMix64, magnitude: f64| {
                if rng.next_f64() > 0.5 {
                    -magnitude
                } else {
                    magnitude
                }
            };
            ops.push(match op {
                0 => RandAugOp::Identity,
                1 => RandAugOp::AutoContrast(self.autocontrast),
                2 => RandAugOp::Brightness,
                3 => RandAugOp::Sharpness,
                4 => RandAugOp::Equalize,
                5 => RandAugOp::ShearX(signed(rng, LEVEL / MAX_LEVEL * 0.3)),
                6 => RandAugOp::ShearY(signed(rng, LEVEL / MAX_LEVEL * 0.3)),
                7 => RandAugOp::TranslateX(signed(rng, LEVEL / MAX_LEVEL * TRANSLATE_CONST)),
                8 => RandAugOp::TranslateY(signed(rng, LEVEL / MAX_LEVEL * TRANSLATE_CONST)),
                _ => {
                    // Rotate's sign test is the other way round in the original (`< 0.5`).
                    let degrees = LEVEL / MAX_LEVEL * 30.0;
                    RandAugOp::Rotate(if rng.next_f64() < 0.5 {
                        -degrees
                    } else {
                        degrees
                    })
                }
            });
        }
        ops
    }
}

/// `floor(u · n)`: a uniform index in `0..n` (as `torch.randint` / `np.random.choice`).
fn uniform_index(rng: &mut SplitMix64, n: usize) -> usize {
    ((rng.next_f64() * n as f64) as usize).min(n.saturating_sub(1))
}

/// A crop rectangle in pixels, as torchvision's `RandomResizedCrop.get_params` returns it
/// (`i, j, h, w`).
///
/// ```
/// use blip_train::{CropBox, SplitMix64};
///
/// let (scale, ratio) = ((0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0));
/// let mut rng = SplitMix64::new(7);
/// let crop = CropBox::sample(640, 480, scale, ratio, &mut rng);
/// // What torchvision's `get_params` returns for the same draws.
/// assert_eq!(crop, CropBox { top: 22, left: 172, height: 456, width: 345 });
/// // Too narrow for any try: the central crop, clamped to the ratio.
/// let narrow = CropBox::sample(33, 300, scale, ratio, &mut rng);
/// assert_eq!(narrow, CropBox { top: 128, left: 0, height: 44, width: 33 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl CropBox {
    /// torchvision's `RandomResizedCrop.get_params` for a `width × height` image: up to ten
    /// tries of an area fraction uniform in `scale` and an aspect ratio log-uniform in
    /// `ratio`, rounded half to even as Python's `round`; the first that fits is placed
    /// uniformly. If none fits, the central crop clamped to `ratio` (the whole image when its
    /// aspect ratio is within `ratio`).
    pub fn sample(
        width: usize,
        height: usize,
        scale: (f64, f64),
        ratio: (f64, f64),
        rng: &mut SplitMix64,
    ) -> Self {
        let area = (width * height) as f64;
        let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * (scale.0 + (scale.1 - scale.0) * rng.next_f64());
            let aspect = (log_lo + (log_hi - log_lo) * rng.next_f64()).exp();
            let w = (target_area * aspect).sqrt().round_ties_even() as usize;
            let h = (target_area / aspect).sqrt().round_ties_even() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                let top = uniform_index(rng, height - h + 1);
                let left = uniform_index(rng, width - w + 1);
                return Self {
                    top,
                    left,
                    height: h,
                    width: w,
                };
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < ratio.0.min(ratio.1) {
            let h = (width as f64 / ratio.0.min(ratio.1)).round_ties_even() as usize;
            (width, h)
        } else if in_ratio > ratio.0.max(ratio.1) {
            let w = (height as f64 * ratio.0.max(ratio.1)).round_ties_even() as usize;
            (w, height)
        } else {
            (width, height)
        };
        Self {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }
}

/// One operation of BLIP's RandomAugment with its magnitude resolved (M = 5 of 10).
///
/// ```
/// use blip_train::RandAugOp;
/// use image::{Rgb, RgbImage};
///
/// let image = RgbImage::from_pixel(12, 10, Rgb([200, 30, 30]));
/// // A positive offset moves the content left; the uncovered pixels are grey 128.
/// let moved = RandAugOp::TranslateX(5.0).apply(&image);
/// assert_eq!(moved.get_pixel(0, 0), &Rgb([200, 30, 30]));
/// assert_eq!(moved.get_pixel(11, 0), &Rgb([128; 3]));
/// // At BLIP's magnitude, Brightness and Sharpness change nothing.
/// assert_eq!(RandAugOp::Brightness.apply(&image), image);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RandAugOp {
    /// Leaves the image unchanged.
    Identity,
    /// Per-channel contrast stretch, see [`AutoContrast`].
    AutoContrast(AutoContrast),
    /// Brightness at M = 5: factor `5/10 · 1.8 + 0.1 = 1.0`, so the identity.
    Brightness,
    /// Sharpness at M = 5: factor 1.0, which the original returns unchanged.
    Sharpness,
    /// Per-channel histogram equalisation as `PIL.ImageOps.equalize`.
    Equalize,
    /// `x' = x + f·y` (OpenCV's `warpAffine` with `[[1, f, 0], [0, 1, 0]]`), ±0.15 in BLIP.
    ShearX(f64),
    /// `y' = y + f·x`, ±0.15 in BLIP.
    ShearY(f64),
    /// Content moves by `−offset` pixels horizontally (matrix `[[1, 0, −offset], [0, 1, 0]]`,
    /// as the original), ±5 in BLIP.
    TranslateX(f64),
    /// Content moves by `−offset` pixels vertically, ±5 in BLIP.
    TranslateY(f64),
    /// Counter-clockwise rotation in degrees about `(W/2, H/2)` (OpenCV's
    /// `getRotationMatrix2D`), ±15 in BLIP.
    Rotate(f64),
}

impl RandAugOp {
    /// Applies the operation. Geometric ones interpolate bilinearly and fill uncovered
    /// pixels with grey 128.
    pub fn apply(&self, image: &RgbImage) -> RgbImage {
        match *self {
            Self::Identity | Self::Brightness | Self::Sharpness => image.clone(),
            Self::AutoContrast(mode) => autocontrast(image, mode),
            Self::Equalize => equalize(image),
            // The original builds these matrices with `np.float32`: keep its rounding.
            Self::ShearX(f) => warp_affine(image, [1.0, f as f32 as f64, 0.0, 0.0, 1.0, 0.0]),
            Self::ShearY(f) => warp_affine(image, [1.0, 0.0, 0.0, f as f32 as f64, 1.0, 0.0]),
            Self::TranslateX(o) => {
                warp_affine(image, [1.0, 0.0, -(o as f32) as f64, 0.0, 1.0, 0.0])
            }
            Self::TranslateY(o) => {
                warp_affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, -(o as f32) as f64])
            }
            Self::Rotate(degrees) => {
                // cv2.getRotationMatrix2D((W / 2, H / 2), degrees, 1): centre as float32.
                let cx = (image.width() as f32 / 2.0) as f64;
                let cy = (image.height() as f32 / 2.0) as f64;
                let angle = degrees * (std::f64::consts::PI / 180.0); // `angle *= CV_PI/180`
                let (alpha, beta) = (angle.cos(), angle.sin());
                warp_affine(
                    image,
                    [
                        alpha,
                        beta,
                        (1.0 - alpha) * cx - beta * cy,
                        -beta,
                        alpha,
                        beta * cx + (1.0 - alpha) * cy,
                    ],
                )
            }
        }
    }
}

/// Applies a per-channel lookup table.
fn map_channels(image: &RgbImage, tables: &[[u8; 256]; 3]) -> RgbImage {
    let mut out = image.clone();
    for pixel in out.pixels_mut() {
        for c in 0..3 {
            pixel[c] = tables[c][pixel[c] as usize];
        }
    }
    out
}

/// BLIP's `autocontrast_func` (cutoff 0): per channel `v·scale + offset` with
/// `scale = 255 / (max − min)`, clipped and truncated to u8; constant channels are kept.
fn autocontrast(image: &RgbImage, mode: AutoContrast) -> RgbImage {
    let tables = std::array::from_fn(|c| {
        let mut table: [u8; 256] = std::array::from_fn(|v| v as u8);
        let (low, high) = image.pixels().fold((u8::MAX, u8::MIN), |(lo, hi), p| {
            (lo.min(p[c]), hi.max(p[c]))
        });
        if high > low {
            let scale = 255.0 / f64::from(high - low);
            let offset = match mode {
                // `-low` on a numpy uint8 scalar wraps around.
                AutoContrast::Blip => f64::from(low.wrapping_neg()) * scale,
                AutoContrast::Pil => -f64::from(low) * scale,
            };
            for (v, entry) in table.iter_mut().enumerate() {
                *entry = (v as f64 * scale + offset).clamp(0.0, 255.0) as u8;
            }
        }
        table
    });
    map_channels(image, &tables)
}

/// BLIP's `equalize_func` (= `PIL.ImageOps.equalize`) per channel: `step` is the pixel
/// count without the last occupied bin, divided by 255; `lut[v] = (step/2 + #{< v}) / step`.
/// A channel with `step == 0` (few pixels outside its brightest level) is kept.
fn equalize(image: &RgbImage) -> RgbImage {
    let tables = std::array::from_fn(|c| {
        let mut hist = [0u64; 256];
        for p in image.pixels() {
            hist[p[c] as usize] += 1;
        }
        let last = hist.iter().rposition(|&n| n > 0);
        let below_last: u64 = last.map_or(0, |l| hist[..l].iter().sum());
        let step = below_last / 255;
        let mut table: [u8; 256] = std::array::from_fn(|v| v as u8);
        if step > 0 {
            let mut acc = step / 2;
            for (v, entry) in table.iter_mut().enumerate() {
                *entry = (acc / step).min(255) as u8;
                acc += hist[v];
            }
        }
        table
    });
    map_channels(image, &tables)
}

/// OpenCV's `warpAffine(img, m, (W, H), flags=INTER_LINEAR, borderValue=(128,)*3)` for
/// `uint8` images, reproduced in its fixed-point arithmetic (OpenCV 4.5, what BLIP ran):
/// the inverse map is evaluated in 1/1024 pixel units, rounded to 1/32 pixel, and the four
/// neighbours are weighted in 1/32768 units; neighbours outside the image read the fill.
fn warp_affine(image: &RgbImage, m: [f64; 6]) -> RgbImage {
    const AB_BITS: u32 = 10;
    const INTER_BITS: u32 = 5;
    const TAB: i32 = 1 << INTER_BITS;
    const ROUND_DELTA: i32 = (1 << AB_BITS) / TAB / 2;
    let ab_scale = f64::from(1u32 << AB_BITS);
    let (w, h) = (image.width() as i32, image.height() as i32);

    // The inverse of `m`, computed as warpAffine does it.
    let d = m[0] * m[4] - m[1] * m[3];
    let d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (a11, a12, a21, a22) = (m[4] * d, -m[1] * d, -m[3] * d, m[0] * d);
    let b1 = -a11 * m[2] - a12 * m[5];
    let b2 = -a21 * m[2] - a22 * m[5];

    // `saturate_cast<int>(double)`: round half to even, saturate.
    let to_int = |v: f64| v.round_ties_even().clamp(i32::MIN as f64, i32::MAX as f64) as i32;
    let adelta: Vec<i32> = (0..w).map(|x| to_int(a11 * x as f64 * ab_scale)).collect();
    let bdelta: Vec<i32> = (0..w).map(|x| to_int(a21 * x as f64 * ab_scale)).collect();

    let src = image.as_raw();
    let mut out = vec![0u8; src.len()];
    for y in 0..h {
        let x0 = to_int((a12 * y as f64 + b1) * ab_scale).wrapping_add(ROUND_DELTA);
        let y0 = to_int((a22 * y as f64 + b2) * ab_scale).wrapping_add(ROUND_DELTA);
        for x in 0..w {
            let xx = x0.wrapping_add(adelta[x as usize]) >> (AB_BITS - INTER_BITS);
            let yy = y0.wrapping_add(bdelta[x as usize]) >> (AB_BITS - INTER_BITS);
            let sx = (xx >> INTER_BITS).clamp(i16::MIN as i32, i16::MAX as i32);
            let sy = (yy >> INTER_BITS).clamp(i16::MIN as i32, i16::MAX as i32);
            let (fx, fy) = (xx & (TAB - 1), yy & (TAB - 1));
            // OpenCV's table of bilinear weights (products of (1 − t, t) in 1/32 steps,
            // times 32768). At fraction (0, 0) the 32768 saturates to 32767 and the missing
            // unit lands on the bottom-right neighbour; it never changes a result.
            let weights = if fx == 0 && fy == 0 {
                [32767, 0, 0, 1]
            } else {
                [
                    (TAB - fy) * (TAB - fx) * 32,
                    (TAB - fy) * fx * 32,
                    fy * (TAB - fx) * 32,
                    fy * fx * 32,
                ]
            };
            let neighbours = [(sx, sy), (sx + 1, sy), (sx, sy + 1), (sx + 1, sy + 1)];
            let at = ((y * w + x) * 3) as usize;
            for c in 0..3 {
                let mut sum = 0i32;
                for (&(nx, ny), weight) in neighbours.iter().zip(weights) {
                    let value = if (0..w).contains(&nx) && (0..h).contains(&ny) {
                        src[((ny * w + nx) * 3) as usize + c]
                    } else {
                        FILL
                    };
                    sum += i32::from(value) * weight;
                }
                out[at + c] = ((sum + (1 << 14)) >> 15).clamp(0, 255) as u8;
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("same size as the input")
}

/// `ToTensor` + `Normalize(BLIP_MEAN, BLIP_STD)` of an RGB image: `3·H·W` values,
/// channel-major, `(v/255 − mean)/std` (the same arithmetic as inference preprocessing).
///
/// ```
/// use blip_train::normalize;
/// use blip_vision::{BLIP_MEAN, BLIP_STD};
/// use image::{Rgb, RgbImage};
///
/// let image = RgbImage::from_pixel(2, 2, Rgb([255, 0, 128]));
/// let values = normalize(&image);
/// assert_eq!(values.len(), 3 * 2 * 2); // channel-major: R R R R G G G G B B B B
/// assert!((values[0] - (1.0 - BLIP_MEAN[0]) / BLIP_STD[0]).abs() < 1e-5);
/// assert!((values[4] - (0.0 - BLIP_MEAN[1]) / BLIP_STD[1]).abs() < 1e-5);
/// ```
pub fn normalize(image: &RgbImage) -> Vec<f32> {
    // An ImageProcessor of the image's own size does not resize: only its normalisation runs.
    ImageProcessor {
        height: image.height() as usize,
        width: image.width() as usize,
        mean: BLIP_MEAN,
        std: BLIP_STD,
    }
    .pixel_values(image)
}
