//! What the command-line examples share: model resolution, image discovery, JSON output.
#![allow(dead_code)] // each example uses its part

use std::path::{Path, PathBuf};

use blip::Device;
use blip::text::hub::{cache_dir, find_or_download};

/// Extensions of the files a directory argument contributes (the formats `image` decodes).
const IMAGE_EXTENSIONS: [&str; 13] = [
    "jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "webp", "ico", "pnm", "tga", "qoi", "exr",
];

/// The device named on the command line, or exit with the list of available ones.
pub fn device(name: &str) -> Device {
    blip::backend_device(name).unwrap_or_else(|e| fail(&e.to_string()))
}

/// Load options for `--dtype` (`f32`, `f16`, `bf16`), or exit naming the accepted ones.
pub fn load_options(dtype: &str) -> blip::LoadOptions {
    let dtype = blip::float_dtype(dtype).unwrap_or_else(|e| fail(&e.to_string()));
    blip::LoadOptions::default().with_dtype(dtype)
}

/// A local model directory, or a hub id from the HF cache (downloaded into it if missing and
/// the machine is online), or exit saying what to download and where.
pub fn model_dir(spec: &str) -> PathBuf {
    find_or_download(spec, &cache_dir()).unwrap_or_else(|e| fail(&e.to_string()))
}

/// Keeps glibc's allocator to one heap ("arena") for a training run (`examples/pretrain`). By default each thread
/// that allocates gets a heap of its own, and memory freed into one heap does not serve the
/// next step's allocations from another: a BLIP-base step's peak memory drifted between 7.4
/// and 9.1 GB across identical runs, and stays at 5.7 GB with one heap, at the same speed
/// (docs/training-profile.md). Elsewhere (another libc, another OS) it does nothing.
pub fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes a tuning parameter; it is called before the run's
    // threads start allocating.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

pub fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// Files named on the command line plus the images inside named directories (sorted).
/// Problems (a missing path, an empty directory, a name that is not UTF-8) are reported and
/// counted, not fatal. A name that is not UTF-8 cannot be written to JSON faithfully (it
/// would name a file that does not exist), so it is refused rather than mangled.
pub fn image_paths(inputs: &[PathBuf], errors: &mut usize) -> Vec<PathBuf> {
    let mut paths = image_paths_any(inputs, errors);
    paths.retain(|p| {
        let utf8 = p.to_str().is_some();
        if !utf8 {
            eprintln!(
                "error: {}: the file name is not valid UTF-8; rename the file",
                printable(&p.display().to_string())
            );
            *errors += 1;
        }
        utf8
    });
    paths
}

/// `text` with control characters (terminal escape sequences among them) written as
/// escapes, for tables and plain-text output.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn image_paths_any(inputs: &[PathBuf], errors: &mut usize) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.is_file() && is_image(p))
                        .collect()
                })
                .unwrap_or_default();
            if found.is_empty() {
                eprintln!("error: {}: no images in this directory", input.display());
                *errors += 1;
            }
            found.sort();
            paths.extend(found);
        } else {
            // A missing file is reported when it fails to open, in input order.
            paths.push(input.clone());
        }
    }
    paths
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A progress bar on stderr for long runs (hidden when stderr is not a terminal).
pub fn progress(total: usize, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images  {per_sec}  eta {eta}",
        )
        .expect("valid template"),
    );
    bar
}

/// A progress bar on stderr drawn from a library call's [`blip::core::progress`] reports
/// (CapFilt runs, training): `unit` names what is counted.
#[allow(dead_code)] // not every example runs a long library call
pub fn progress_sink(unit: &'static str) -> blip::core::progress::ProgressSink {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} {{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}  eta {{eta}}"
    )) {
        bar.set_style(style);
    }
    blip::core::progress::ProgressSink::new(move |p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
        bar.set_message(p.message.to_string());
        if p.finished {
            bar.finish_and_clear();
        }
    })
}
