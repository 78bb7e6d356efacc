//! The command-line examples on hostile input: each test runs the example binary that
//! `cargo test` builds (built here first when a filtered run skipped it) and checks its exit
//! status, standard output and error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ScratchDir, fixtures};

/// The example's executable beside this test's (`target/<profile>/examples/<name>`).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building example {name}");
    }
    path
}

/// Runs `name` with `args`, killed after 120 s (a hang fails the test instead of stalling it).
fn run(name: &str, args: &[&std::ffi::OsStr]) -> Output {
    let mut child = Command::new(example(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{name} {args:?} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

fn demo_image() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/images/020500.png")
}

#[cfg(unix)]
#[test]
fn caption_refuses_non_utf8_names_and_fifos_and_captions_the_rest() {
    use std::os::unix::ffi::OsStrExt;
    let scratch = ScratchDir::new("cli-names");
    let good = scratch.0.join("good.png");
    std::fs::copy(demo_image(), &good).unwrap();
    // A name with byte 0xFF became U+FFFD in the JSON: a file that does not exist.
    let bad = scratch.0.join(std::ffi::OsStr::from_bytes(b"bad-\xff.png"));
    std::fs::copy(demo_image(), &bad).unwrap();
    // A FIFO blocked the run forever.
    let fifo = scratch.0.join("fifo.png");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let out = run(
        "caption",
        &[
            os("--json"),
            good.as_os_str(),
            bad.as_os_str(),
            fifo.as_os_str(),
        ],
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(lines[0]["image"], good.to_str().unwrap());
    assert!(!stdout.contains('\u{FFFD}'), "{stdout}");
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

#[test]
fn caption_with_a_vanishing_temperature_runs_and_bad_options_fail_once() {
    let image = demo_image();
    let out = run(
        "caption",
        &[
            os("--sample"),
            os("--temperature"),
            os("1e-40"),
            image.as_os_str(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    // An invalid option is one error before any image is read, not one per batch.
    let out = run(
        "caption",
        &[
            os("--sample"),
            os("--top-p"),
            os("0"),
            os("--batch-size"),
            os("1"),
            image.as_os_str(),
            image.as_os_str(),
            image.as_os_str(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.matches("top_p").count(), 1, "{stderr}");
}

#[test]
fn the_plain_demo_command_says_the_prompt_once() {
    // What a new user runs first: no --model, no --prompt.
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/images");
    let out = run("caption", &[images.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    for line in lines {
        let (_, caption) = line.split_once(": ").unwrap();
        // The demo was trained with BLIP's prompt, and its captions follow it exactly once.
        let rest = caption.strip_prefix("a picture of ").expect(line);
        assert!(!rest.is_empty() && !rest.contains("picture"), "{line}");
    }
}

#[test]
fn caption_runs_in_half_precision_and_refuses_an_unknown_dtype() {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/images");
    let captions = |dtype: &str| {
        let out = run("caption", &[os("--dtype"), os(dtype), images.as_os_str()]);
        assert!(out.status.success(), "{dtype}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // f16 keeps 11 bits of mantissa: on the six demo images it says what f32 says. bf16
    // (8 bits) names one shape differently, where the demo captioner is least sure.
    assert_eq!(captions("f16"), captions("f32"));
    let bf16 = captions("bf16");
    assert_eq!(bf16.lines().count(), 6, "{bf16}");
    assert!(
        bf16.lines().all(|l| l.contains(": a picture of ")),
        "{bf16}"
    );
    let out = run(
        "caption",
        &[os("--dtype"), os("fp8"), demo_image().as_os_str()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("unknown dtype \"fp8\""), "{stderr}");
}

#[test]
fn a_path_that_does_not_exist_is_not_sent_to_the_hub() {
    let out = run(
        "caption",
        &[os("--model"), os("./no/such/dir"), demo_image().as_os_str()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("no such directory"), "{stderr}");
    assert!(!stderr.contains("download"), "{stderr}");
}

#[test]
fn retrieve_escapes_control_characters_in_its_table() {
    let model = fixtures().join("tiny-retrieval");
    let out = run(
        "retrieve",
        &[
            os("--model"),
            model.as_os_str(),
            os("--text"),
            os("\u{1b}[31mred\u{1b}[0m"),
            demo_image().as_os_str(),
        ],
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains('\u{1b}'), "{stdout:?}");
    assert!(stdout.contains("\\u{1b}[31mred"), "{stdout:?}");
}

#[test]
fn vqa_refuses_empty_answer_candidates() {
    let model = fixtures().join("tiny-vqa");
    let out = run(
        "vqa",
        &[
            os("--model"),
            model.as_os_str(),
            os("--question"),
            os("what colour?"),
            os("--answers"),
            os(",,red,,blue"),
            demo_image().as_os_str(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("answer candidate 0 is empty"), "{stderr}");
    assert!(out.stdout.is_empty());
}
