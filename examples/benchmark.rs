//! Full-size BLIP-base figures on this machine: f32 GEMM rate, checkpoint load time, ViT
//! forward time at 384 px, peak memory against the weight file, captioning (greedy, 3 beams,
//! batch 8) and ITM times. `scripts/bench_torch.py` measures the same in PyTorch.
//!
//! ```sh
//! cargo run --release --example benchmark -- [--device cpu|wgpu|cuda] [--dtype f32|f16|bf16] [--dir DIR] [--runs N]
//! ```
//!
//! The first run writes a random BLIP-base captioning checkpoint (HF layout, ~0.9 GB) to
//! `DIR` (default `target/blip-base-random`). The load and forward are measured in a child
//! process, so that its peak resident memory is the loader's and the model's alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use blip::core::precision::cast_module;
use blip::text::GenerationConfig;
use blip::{
    BlipConfig, CaptioningModel, Device, FloatDType, LoadOptions, RetrievalModel, backend_device,
};
use burn::tensor::{Distribution, Int, Tensor};

struct Args {
    device: String,
    dtype: String,
    dir: PathBuf,
    runs: usize,
    child: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        device: "cpu".into(),
        dtype: "f32".into(),
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/blip-base-random"),
        runs: 5,
        child: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--device" => args.device = value(),
            "--dtype" => args.dtype = value(),
            "--dir" => args.dir = value().into(),
            "--runs" => {
                args.runs = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--runs takes a number"))
            }
            "--child" => args.child = true,
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    args
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("error: {problem}");
    }
    eprintln!(
        "usage: benchmark [--device cpu|wgpu|cuda|ndarray] [--dtype f32|f16|bf16] [--dir DIR] [--runs N]"
    );
    std::process::exit(2)
}

fn sync(t: Tensor<3>) {
    // Reading one value forces the computation on asynchronous backends.
    let _ = t.narrow(2, 0, 1).narrow(1, 0, 1).into_data();
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// f32 GEMM rate (GFLOP/s) on the ViT's largest matmul shape, [577, 768] · [768, 3072].
fn gemm_rate(device: &Device, runs: usize) -> f64 {
    let a = Tensor::<3>::random([1, 577, 768], Distribution::Default, device);
    let b = Tensor::<3>::random([1, 768, 3072], Distribution::Default, device);
    sync(a.clone().matmul(b.clone()));
    let times: Vec<f64> = (0..runs.max(3) * 4)
        .map(|_| {
            let start = Instant::now();
            sync(a.clone().matmul(b.clone()));
            start.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * 577.0 * 768.0 * 3072.0 / median(times) / 1e9
}

/// FLOPs of one ViT forward (matmuls and attention; norms and activations are noise).
fn vit_flops(config: &BlipConfig) -> f64 {
    let v = &config.vision;
    let (t, d, m) = (
        v.num_positions() as f64,
        v.hidden_size as f64,
        v.intermediate_size as f64,
    );
    let patches = t - 1.0;
    let patch_embed = 2.0 * patches * d * (3 * v.patch_size * v.patch_size) as f64;
    let per_layer =
        2.0 * t * d * 3.0 * d + 2.0 * 2.0 * t * t * d + 2.0 * t * d * d + 2.0 * 2.0 * t * d * m;
    patch_embed + per_layer * v.num_hidden_layers as f64
}

fn child(args: &Args) {
    let device = backend_device(&args.device).unwrap_or_else(|e| usage(&e.to_string()));
    let dtype = blip::float_dtype(&args.dtype).unwrap_or_else(|e| usage(&e.to_string()));
    let weights = args.dir.join("model.safetensors");
    let file_size = std::fs::metadata(&weights).expect("weights written").len();
    let start = Instant::now();
    let options = LoadOptions::default().with_dtype(dtype);
    let loaded = CaptioningModel::from_pretrained_with(&args.dir, &device, options)
        .unwrap_or_else(|e| usage(&e.to_string()));
    let load = start.elapsed().as_secs_f64();
    let config = loaded.config;
    let vit = loaded.model.vision_model.clone();
    let size = config.vision.image_size;
    let pixels = Tensor::<4>::random([1, 3, size, size], Distribution::Normal(0.0, 1.0), &device);
    sync(vit.forward(pixels.clone()).unwrap()); // warm-up
    let times: Vec<f64> = (0..args.runs)
        .map(|_| {
            let start = Instant::now();
            sync(vit.forward(pixels.clone()).unwrap());
            start.elapsed().as_secs_f64()
        })
        .collect();
    let forward = median(times);
    let flops = vit_flops(&config);
    let gemm = gemm_rate(&device, args.runs);
    let peak = blip::core::peak_rss().unwrap_or(0);
    let model = CaptioningModel {
        vision_model: vit,
        text_decoder: loaded.model.text_decoder,
    };
    println!("f32 GEMM rate ([577,768]x[768,3072])   {gemm:>9.1} GFLOP/s");
    println!(
        "checkpoint load                       {load:>9.2} s    ({:.0} MB file)",
        file_size as f64 / 1e6
    );
    println!(
        "ViT-B/16 forward at {size} (batch 1)     {forward:>9.3} s    ({:.0} GFLOP, {:.1} GFLOP/s, {:.2}x the GEMM-rate bound)",
        flops / 1e9,
        flops / forward / 1e9,
        forward / (flops / gemm / 1e9)
    );
    println!(
        "peak resident memory                  {:>9.0} MB   ({:.2}x the weight file)",
        peak as f64 / 1e6,
        peak as f64 / file_size as f64
    );
    captioning(&model, &config, &device, dtype, args.runs);
}

/// Times `f` (after one warm-up run): median seconds.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Captioning and ITM figures: vision + 20 decoded tokens (forced, so every run decodes
/// the same amount), 3 beams, batch 8, and one ITM pair.
fn captioning(
    model: &CaptioningModel,
    config: &BlipConfig,
    device: &Device,
    dtype: FloatDType,
    runs: usize,
) {
    let size = config.vision.image_size;
    let dec = config.text.bos_token_id as u32;
    let pixels =
        |b| Tensor::<4>::random([b, 3, size, size], Distribution::Normal(0.0, 1.0), device);
    let forced = GenerationConfig {
        min_length: 21,
        max_length: 21,
        ..GenerationConfig::default()
    };
    let caption = |b: usize, g: GenerationConfig| {
        let px = pixels(b);
        move || {
            let out = model
                .generate(px.clone(), &vec![vec![dec]; b], &g)
                .expect("generates");
            assert_eq!(out[0][0].token_ids.len(), 21);
        }
    };
    let greedy = time(runs, caption(1, forced.clone()));
    let beams = GenerationConfig {
        num_beams: 3,
        ..forced.clone()
    };
    let beam = time(runs, caption(1, beams));
    let batch8 = time(runs.min(3), caption(8, forced));
    println!("caption, greedy, vision + 20 tokens     {greedy:>9.3} s");
    println!(
        "caption, 3 beams, vision + 20 tokens    {beam:>9.3} s    ({:.2}x greedy)",
        beam / greedy
    );
    println!(
        "images/s, greedy 20 tokens             {:>9.2} at batch 1, {:.2} at batch 8 ({:.2}x)",
        1.0 / greedy,
        8.0 / batch8,
        greedy * 8.0 / batch8
    );
    let itm_model = cast_module(RetrievalModel::new(config, device), dtype);
    let ids = Tensor::<2, Int>::ones([1, 35], device);
    let px = pixels(1);
    let itm = time(runs, || {
        let image = itm_model.vision_model.forward(px.clone()).expect("vision");
        let logits = itm_model.itm_logits(image, ids.clone(), None).expect("itm");
        let _ = logits.into_data();
    });
    println!("ITM, one pair (vision + 35 tokens)     {itm:>9.3} s");
}

fn main() {
    let args = parse_args();
    if args.child {
        return child(&args);
    }
    if !args.dir.join("model.safetensors").is_file() {
        eprintln!(
            "writing a random BLIP-base checkpoint to {} ...",
            args.dir.display()
        );
        let device = Device::flex();
        let config = BlipConfig::base();
        CaptioningModel::new(&config, &device)
            .save_pretrained(&config, &args.dir)
            .expect("write the random checkpoint");
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "machine: {} ({threads} threads), device {}, dtype {}",
        cpu_name(),
        args.device,
        args.dtype
    );
    let status = Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--child",
            "--device",
            &args.device,
            "--dtype",
            &args.dtype,
            "--runs",
            &args.runs.to_string(),
        ])
        .arg("--dir")
        .arg(&args.dir)
        .status()
        .expect("run the measurement");
    std::process::exit(status.code().unwrap_or(1));
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
