//! Writes a synthetic BLIP world and prints what it wrote.
//!
//! ```text
//! cargo run -p blip-world --example make_world -- --out world [--seed N] [--small]
//!     [--image-size 64..96] [--noise-rate 0.4] [--clean N] [--web N] [--test N] [--shard-size N]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use blip_world::{WorldConfig, generate};

const USAGE: &str = "usage: make_world --out DIR [--seed N] [--small] [--image-size N] \
[--noise-rate F] [--clean N] [--web N] [--test N] [--shard-size N]";

fn parse() -> Result<(PathBuf, WorldConfig), String> {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let mut small = false;
    let mut settings: Vec<(String, String)> = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--small" => small = true,
            "-h" | "--help" => return Err(USAGE.into()),
            "--out" | "--seed" | "--image-size" | "--noise-rate" | "--clean" | "--web"
            | "--test" | "--shard-size" => {
                let value = args.next().ok_or(format!("{arg} needs a value\n{USAGE}"))?;
                if arg == "--out" {
                    out = Some(PathBuf::from(value));
                } else {
                    settings.push((arg, value));
                }
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let mut config = if small {
        WorldConfig::small()
    } else {
        WorldConfig::default()
    };
    for (flag, value) in settings {
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}");
        match flag.as_str() {
            "--seed" => config.seed = value.parse().map_err(|e| bad(&e))?,
            "--image-size" => config.image_size = value.parse().map_err(|e| bad(&e))?,
            "--noise-rate" => config.noise_rate = value.parse().map_err(|e| bad(&e))?,
            "--clean" => config.clean_images = value.parse().map_err(|e| bad(&e))?,
            "--web" => config.web_images = value.parse().map_err(|e| bad(&e))?,
            "--test" => config.test_images = value.parse().map_err(|e| bad(&e))?,
            "--shard-size" => config.shard_size = value.parse().map_err(|e| bad(&e))?,
            _ => unreachable!(),
        }
    }
    let out = out.ok_or(format!("--out is required\n{USAGE}"))?;
    Ok((out, config))
}

fn main() -> ExitCode {
    let (out, config) = match parse() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    match generate(&config, &out) {
        Ok(summary) => {
            println!(
                "wrote {} (seed {}, {} px) in {:.1} s",
                out.display(),
                config.seed,
                config.image_size,
                start.elapsed().as_secs_f64()
            );
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
