//! A real CapFilt run (tiny BLIP captioner and filter from the test fixtures) killed with
//! SIGKILL mid-run and started again finishes with exactly the output of an uninterrupted
//! run; and the real model's settings are checked before anything is written.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blip_capfilt::{
    BlipCapFilt, CapFiltModel, CapFiltSettings, CaptionStrategy, Error, ImageVerdict, ModelError,
    RunOptions, run,
};
use burn::tensor::Device;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The real model, slowed down so that the parent can kill the run between commits.
struct Slow(BlipCapFilt);

impl CapFiltModel for Slow {
    fn process(
        &mut self,
        images: &[image::RgbImage],
        web_texts: &[Option<String>],
    ) -> Result<Vec<ImageVerdict>, ModelError> {
        std::thread::sleep(Duration::from_millis(40));
        self.0.process(images, web_texts)
    }
    fn captioner_name(&self) -> String {
        self.0.captioner_name()
    }
    fn filter_name(&self) -> String {
        self.0.filter_name()
    }
}

fn options(input: &Path, out: &Path) -> RunOptions {
    let mut options = RunOptions::new(input.to_string_lossy(), out);
    options.chunk_size = 4;
    options.batch_size = 2;
    options.decode_threads = 1;
    options.generation = CapFiltSettings::default().to_json();
    options
}

fn run_to_end(input: &Path, out: &Path) {
    let model = BlipCapFilt::load(
        &fixture("tiny-captioning"),
        &fixture("tiny-retrieval"),
        ("tiny-captioning".into(), "tiny-retrieval".into()),
        CapFiltSettings {
            max_length: 8,
            min_length: 2,
            ..CapFiltSettings::default()
        },
        &Device::flex(),
    )
    .unwrap();
    let report = run(&options(input, out), &mut Slow(model)).unwrap();
    assert!(report.complete);
}

/// Runs only as the child process of the test below.
#[test]
fn capfilt_child() {
    let (Ok(input), Ok(out)) = (std::env::var("CAPFILT_INPUT"), std::env::var("CAPFILT_OUT"))
    else {
        return;
    };
    run_to_end(Path::new(&input), Path::new(&out));
}

fn spawn(input: &Path, out: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["capfilt_child", "--exact", "--test-threads=1"])
        .env("CAPFILT_INPUT", input)
        .env("CAPFILT_OUT", out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn committed_chunks(out: &Path) -> usize {
    std::fs::read_dir(out.join("shard-00000-of-00001/chunks"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_run_killed_mid_way_and_restarted_equals_an_uninterrupted_one() {
    let dir = std::env::temp_dir().join(format!("capfilt-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut records = Vec::new();
    for i in 0..24u8 {
        let image = image::RgbImage::from_fn(20, 20, |x, y| {
            image::Rgb([i * 10, (x as u8) * 12, (y as u8).wrapping_mul(i)])
        });
        let file = format!("images/{i}.png");
        image.save(dir.join(&file)).unwrap();
        records.push(serde_json::json!({"image": file, "caption": format!("picture number {i}")}));
    }
    let input = dir.join("web.json");
    std::fs::write(&input, serde_json::to_string(&records).unwrap()).unwrap();

    let reference = dir.join("reference");
    let mut child = spawn(&input, &reference);
    assert!(
        child.wait().unwrap().success(),
        "the uninterrupted run failed"
    );

    // Kill the run as soon as it has committed some chunks but not all (6 in total).
    let out = dir.join("killed");
    let mut kills = 0;
    for _ in 0..3 {
        let mut child = spawn(&input, &out);
        let start = Instant::now();
        while committed_chunks(&out) < 2 + 2 * kills && start.elapsed() < Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            kills += 1;
        }
        if committed_chunks(&out) >= 6 {
            break;
        }
    }
    assert!(kills >= 1, "the run was never killed mid-way");
    let mut last = spawn(&input, &out);
    assert!(last.wait().unwrap().success(), "the restarted run failed");

    for file in ["annotations.json", "provenance.jsonl", "summary.json"] {
        let want = std::fs::read_to_string(reference.join(file)).unwrap();
        let got = std::fs::read_to_string(out.join(file)).unwrap();
        assert_eq!(got, want, "{file} differs after {kills} kill(s)");
    }
    let provenance = std::fs::read_to_string(out.join("provenance.jsonl")).unwrap();
    assert_eq!(
        provenance.lines().count(),
        48,
        "24 web + 24 synthetic texts"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bad generation setting (one only the captioner can judge included) fails before the
/// output directory is touched, so that the corrected run is not refused as a run with
/// other options.
#[test]
fn bad_settings_fail_before_the_output_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    image::RgbImage::from_pixel(20, 20, image::Rgb([200, 30, 30]))
        .save(dir.path().join("images/0.png"))
        .unwrap();
    let input = dir.path().join("web.json");
    std::fs::write(
        &input,
        r#"[{"image": "images/0.png", "caption": "a red square"}]"#,
    )
    .unwrap();
    let good = CapFiltSettings {
        max_length: 8,
        min_length: 2,
        ..CapFiltSettings::default()
    };
    let mut model = BlipCapFilt::load(
        &fixture("tiny-captioning"),
        &fixture("tiny-retrieval"),
        ("tiny-captioning".into(), "tiny-retrieval".into()),
        good.clone(),
        &Device::flex(),
    )
    .unwrap();
    let prompt_tokens = model
        .captioner
        .tokenizer
        .decoder_prompt(good.prompt.trim_end())
        .unwrap()
        .len();
    let out = dir.path().join("out");
    for (setting, bad) in [
        (
            "top_p",
            CapFiltSettings {
                strategy: CaptionStrategy::Nucleus { top_p: 0.0 },
                ..good.clone()
            },
        ),
        (
            "num_beams",
            CapFiltSettings {
                strategy: CaptionStrategy::Beam { num_beams: 0 },
                ..good.clone()
            },
        ),
        (
            "num_captions",
            CapFiltSettings {
                num_captions: 0,
                ..good.clone()
            },
        ),
        // No room for a token after the prompt.
        (
            "max_length",
            CapFiltSettings {
                max_length: prompt_tokens,
                min_length: 0,
                ..good.clone()
            },
        ),
        // Past the decoder's position embeddings.
        (
            "max_length",
            CapFiltSettings {
                max_length: 1 << 20,
                ..good.clone()
            },
        ),
    ] {
        model.settings = bad.clone();
        let mut opts = options(&input, &out);
        opts.generation = bad.to_json();
        match run(&opts, &mut model) {
            Err(Error::InvalidOption { option, reason }) => {
                assert_eq!(option, setting, "{reason}")
            }
            other => panic!("{setting}: expected InvalidOption, got {other:?}"),
        }
        assert!(!out.exists(), "{setting}: the output directory was created");
    }
    model.settings = good.clone();
    let mut opts = options(&input, &out);
    opts.generation = good.to_json();
    assert!(run(&opts, &mut model).unwrap().complete);
}
