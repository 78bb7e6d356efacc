//! Measures image resamplers against transformers' `BlipImageProcessor` on the committed
//! sample images, in grey levels (0–255), and times them. The winner is what
//! `ImageProcessor` uses.
//!
//! ```sh
//! cargo run --release --example resize_parity
//! ```

use std::path::Path;
use std::time::Instant;

use blip::ImageProcessor;
use blip::vision::resize_bicubic_aa;
use fast_image_resize::images::Image as ResizeImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use safetensors::{Dtype, SafeTensors};

const SIZE: usize = 384;
const IMAGES: [&str; 6] = [
    "chelsea.png",
    "astronaut.png",
    "coffee.png",
    "camera.png",
    "logo.png",
    "rocket.jpg",
];

/// A resampler under test: RGB image → `SIZE × SIZE` interleaved RGB bytes.
type Resampler = fn(&RgbImage) -> Vec<u8>;

fn fast_image_resize_u8(image: &RgbImage) -> Vec<u8> {
    let (w, h) = image.dimensions();
    let src = ResizeImage::from_vec_u8(w, h, image.as_raw().clone(), PixelType::U8x3).unwrap();
    let mut dst = ResizeImage::new(SIZE as u32, SIZE as u32, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    Resizer::new().resize(&src, &mut dst, &options).unwrap();
    dst.into_vec()
}

fn image_crate(image: &RgbImage) -> Vec<u8> {
    image::imageops::resize(
        image,
        SIZE as u32,
        SIZE as u32,
        image::imageops::FilterType::CatmullRom,
    )
    .into_raw()
}

fn ours(image: &RgbImage) -> Vec<u8> {
    let (w, h) = image.dimensions();
    resize_bicubic_aa(image.as_raw(), w as usize, h as usize, SIZE, SIZE)
}

/// transformers' resized pixels (uint8 levels, CHW) as HWC.
fn reference(tensors: &SafeTensors, name: &str) -> Vec<u8> {
    let view = tensors.tensor(name).unwrap();
    assert_eq!(view.dtype(), Dtype::U8);
    let chw = view.data();
    let plane = SIZE * SIZE;
    (0..3 * plane)
        .map(|i| chw[(i % 3) * plane + i / 3])
        .collect()
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let methods: [(&str, Resampler); 3] = [
        ("blip-vision (torchvision fixed point)", ours),
        ("fast_image_resize U8x3 CatmullRom", fast_image_resize_u8),
        ("image::imageops CatmullRom", image_crate),
    ];
    println!(
        "max |Δ| in grey levels (0-255) vs transformers' BlipImageProcessor (torchvision backend)"
    );
    print!("{:<40}", "method");
    for name in IMAGES {
        print!("{name:>14}");
    }
    println!("{:>12}", "ms/image");
    for (label, method) in methods {
        print!("{label:<40}");
        let mut elapsed = 0.0;
        for name in IMAGES {
            let image = ImageProcessor::open(dir.join(name)).unwrap();
            let want = reference(&tensors, name);
            let start = Instant::now();
            let got = method(&image);
            elapsed += start.elapsed().as_secs_f64();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(&a, &b)| a.abs_diff(b))
                .max()
                .unwrap();
            print!("{worst:>14}");
        }
        println!("{:>12.1}", elapsed * 1e3 / IMAGES.len() as f64);
    }
}
