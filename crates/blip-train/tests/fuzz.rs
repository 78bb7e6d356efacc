//! Bounded-time fuzzing of the parsers that read a user's files: the safetensors header (and
//! the HF loader behind it), the original `.pth` reader, `config.json`, and `tokenizer.json`
//! (plus encoding and decoding arbitrary text and ids with the real tokenizer).
//!
//! Each target first replays every file of `tests/fuzz-corpus/<target>/` and its fixture
//! seeds, then proptest mutates those seeds (byte flips, inserts, deletions, truncations,
//! "magic" numbers and strings; JSON-aware edits of headers and configs; ZIP-member and
//! pickle-opcode edits of `.pth` files) for `BLIP_FUZZ_SECONDS` (default 3) per target.
//!
//! A case fails when the parser panics, runs longer than `BLIP_FUZZ_CASE_TIMEOUT` seconds
//! (default 30), or asks for one allocation larger than `BLIP_FUZZ_MAX_ALLOC` bytes (default
//! 256 MiB; one over 4 GiB is refused, which aborts the process). An `Err` is never a failure:
//! rejecting bad input is the parsers' job. The shrunk failing input is written into the
//! corpus as `crash-<hash>.<ext>` (unless `BLIP_FUZZ_SAVE=0`), so that it is replayed from
//! then on. `BLIP_FUZZ_SEED` repeats a run; `scripts/fuzz.sh SECONDS` runs a long one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use blip_core::checkpoint::SafetensorsHeader;
use blip_text::{BlipConfig, BlipTokenizer, CaptioningModel, Padding, TextConfig};
use blip_train::PretrainConfig;
use blip_train::original::{Family, OriginalCheckpoint};
use blip_vision::VisionConfig;
use burn::tensor::Device;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde::{Deserialize, Serialize};
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------

/// One parser under test.
struct Target {
    /// Its corpus folder under `tests/fuzz-corpus/`.
    name: &'static str,
    /// Extension of the inputs saved into the corpus.
    ext: &'static str,
    /// How its inputs are mutated.
    format: Format,
    /// Extra seeds, relative to the workspace root (replayed and mutated like the corpus).
    fixtures: &'static [&'static str],
    /// Runs the parser on one input inside `dir`; returns how far the input got.
    run: fn(&[u8], &Path) -> &'static str,
}

const SAFETENSORS: Target = Target {
    name: "safetensors",
    ext: "safetensors",
    format: Format::Safetensors,
    fixtures: &["tests/fixtures/tiny-captioning/model.safetensors"],
    run: target_safetensors,
};

const PTH: Target = Target {
    name: "pth",
    ext: "pth",
    format: Format::Pth,
    fixtures: &[
        "tests/fixtures/original/captioning.pth",
        "tests/fixtures/original/retrieval.pth",
        // PyTorch's pre-1.6 (non-ZIP) container.
        "tests/fixtures/original/pretrain_unshared.pth",
        "tests/fixtures/original/vqa.pth",
    ],
    run: target_pth,
};

const CONFIG: Target = Target {
    name: "config",
    ext: "json",
    format: Format::Json,
    fixtures: &[
        "tests/fixtures/tiny-captioning/config.json",
        "tests/fixtures/tiny-retrieval/config.json",
        "tests/fixtures/tiny-vqa/config.json",
        "tests/fixtures/asym-captioning/config.json",
    ],
    run: target_config,
};

const TOKENIZER: Target = Target {
    name: "tokenizer",
    ext: "json",
    format: Format::Json,
    fixtures: &["tests/fixtures/tokenizer/tokenizer.json"],
    run: target_tokenizer_json,
};

const TOKENIZER_IO: Target = Target {
    name: "tokenizer-io",
    ext: "json",
    format: Format::Json,
    fixtures: &[],
    run: target_tokenizer_io,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn corpus_dir(target: &Target) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target.name)
}

/// The tiny captioning `config.json` the safetensors target loads its weights against.
fn tiny_config() -> &'static [u8] {
    static CONFIG: OnceLock<Vec<u8>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        std::fs::read(workspace().join("tests/fixtures/tiny-captioning/config.json"))
            .expect("the tiny captioning fixture exists")
    })
}

/// Returns `stage`; with `BLIP_FUZZ_TRACE=1`, prints why the input was refused (to see which
/// checks the mutations reach).
fn refused(stage: &'static str, error: impl fmt::Display) -> &'static str {
    if settings().trace {
        eprintln!("{stage}: {error}");
    }
    stage
}

/// `SafetensorsHeader::read`; `bytes` of every tensor; then the HF captioning loader.
fn target_safetensors(bytes: &[u8], dir: &Path) -> &'static str {
    let config = dir.join("config.json");
    if !config.is_file() {
        std::fs::write(&config, tiny_config()).expect("write config.json");
    }
    let path = dir.join("model.safetensors");
    std::fs::write(&path, bytes).expect("write the input");
    let header = match SafetensorsHeader::read(&path) {
        Ok(header) => header,
        Err(e) => return refused("header refused", e),
    };
    for key in header.tensors.keys() {
        let _ = header.bytes(key);
    }
    match CaptioningModel::from_pretrained(dir, &Device::flex()) {
        Ok(_) => "loaded",
        Err(e) => refused("header read, load refused", e),
    }
}

/// `OriginalCheckpoint::open`, then the shape, dtype and values of every key.
fn target_pth(bytes: &[u8], dir: &Path) -> &'static str {
    let path = dir.join("model.pth");
    std::fs::write(&path, bytes).expect("write the input");
    let checkpoint = match OriginalCheckpoint::open(&path) {
        Ok(checkpoint) => checkpoint,
        Err(e) => return refused("refused", e),
    };
    let keys: Vec<String> = checkpoint.keys().map(str::to_owned).collect();
    let mut read = 0;
    for key in &keys {
        let _ = checkpoint.shape(key);
        let _ = checkpoint.dtype(key);
        match checkpoint.values(key) {
            Ok(_) => read += 1,
            Err(e) => {
                refused("value refused", e);
            }
        }
    }
    let _ = checkpoint.is_nested();
    if read < keys.len() {
        return "opened, some values refused";
    }
    // The loaders, with the tiny configs the fixtures were made for (tests/original.rs).
    let device = Device::flex();
    let loaded = match checkpoint.family() {
        Some(Family::Captioning) => checkpoint
            .captioning(&original_config(16, 24), &device)
            .map(drop),
        Some(Family::Retrieval) => checkpoint
            .retrieval(&original_config(16, 16), &device)
            .map(drop),
        Some(Family::Vqa) => checkpoint.vqa(&original_config(8, 16), &device).map(drop),
        Some(Family::Pretrain) => {
            let config = PretrainConfig::new(original_config(16, 16)).with_queue_size(16);
            checkpoint.pretrain(&config, &device).map(drop)
        }
        Some(Family::Nlvr) | None => return "opened, no loader",
    };
    match loaded {
        Ok(()) => "loaded",
        Err(e) => refused("opened, model refused", e),
    }
}

/// The configs of `tests/fixtures/original`: vision width `width` (16, or 8 for VQA) with
/// patches of 4 at `image_size` px, text width 8, a 40-token vocabulary.
fn original_config(width: usize, image_size: usize) -> BlipConfig {
    let intermediate = if width == 16 { 24 } else { 16 };
    let vision = VisionConfig::new(width, intermediate, 2, 2, image_size)
        .with_patch_size(4)
        .with_layer_norm_eps(1e-6);
    let mut text = TextConfig::new(40, 8, width, 16, 2, 2).with_max_position_embeddings(16);
    (text.pad_token_id, text.cls_token_id, text.sep_token_id) = (0, 1, 2);
    (text.bos_token_id, text.enc_token_id) = (3, 4);
    BlipConfig::new(vision, text).with_image_text_hidden_size(8)
}

/// `BlipConfig::from_hf_json` (and `VisionConfig::from_hf_json`) only: no model is built from
/// a fuzzed config. A config that parses must survive `to_hf_json` → `from_hf_json` unchanged.
fn target_config(bytes: &[u8], dir: &Path) -> &'static str {
    let path = dir.join("config.json");
    std::fs::write(&path, bytes).expect("write the input");
    let _ = VisionConfig::from_hf_json(&path);
    let config = match BlipConfig::from_hf_json(&path) {
        Ok(config) => config,
        Err(e) => return refused("refused", e),
    };
    let _ = (
        config.vision.grid_size(),
        config.vision.num_positions(),
        config.text.head_dim(),
    );
    let again = dir.join("config-again.json");
    let json = config.to_hf_json("BlipForConditionalGeneration");
    std::fs::write(&again, serde_json::to_vec(&json).expect("serialises")).expect("write");
    let mut reread = BlipConfig::from_hf_json(&again)
        .unwrap_or_else(|e| panic!("to_hf_json of a parsed config does not parse: {e}"));
    // serde_json (without its `float_roundtrip` feature) may parse a float 1 ULP off its
    // nearest value ("1e-25" reads as 9.999999999999999e-26, which prints and reads back as
    // 1e-25): floats match within a few ULP.
    for (back, original) in [
        (
            &mut reread.vision.layer_norm_eps,
            config.vision.layer_norm_eps,
        ),
        (&mut reread.text.layer_norm_eps, config.text.layer_norm_eps),
        (
            &mut reread.text.label_smoothing,
            config.text.label_smoothing,
        ),
    ] {
        if (*back - original).abs() <= 4.0 * f64::EPSILON * original.abs() {
            *back = original;
        }
    }
    assert_eq!(
        reread, config,
        "to_hf_json → from_hf_json changed the config"
    );
    "parsed"
}

/// `BlipTokenizer::from_file`; a tokenizer that loads then encodes and decodes a little.
fn target_tokenizer_json(bytes: &[u8], dir: &Path) -> &'static str {
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, bytes).expect("write the input");
    let tokenizer = match BlipTokenizer::from_file(&path) {
        Ok(tokenizer) => tokenizer,
        Err(e) => return refused("refused", e),
    };
    let texts = ["a photo of a cat", "", "[SEP] ##ing 中文 🙂 é [DEC]"];
    let _ = tokenizer.encode_batch(&texts, Some(8), Padding::Longest);
    let _ = tokenizer.encode_batch(&texts, Some(4), Padding::MaxLength);
    let _ = tokenizer.decoder_prompt("a picture of");
    let _ = tokenizer.decoder_prompt("");
    let vocab = u32::try_from(tokenizer.vocab_size()).unwrap_or(u32::MAX);
    let ids = [
        0,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.dec_token_id,
        vocab.saturating_sub(1),
        vocab,
        vocab.saturating_add(1),
        u32::MAX,
    ];
    let _ = tokenizer.decode(&ids, true);
    let _ = tokenizer.decode(&ids, false);
    "loaded"
}

/// One call sequence on the real tokenizer (`tests/fixtures/tokenizer/tokenizer.json`),
/// stored in the corpus as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IoCase {
    texts: Vec<String>,
    ids: Vec<u32>,
    max_length: Option<usize>,
    pad_to_max: bool,
    skip_special: bool,
}

/// `max_length` with `Padding::MaxLength` is the width the caller asks every row to be padded
/// to, so its size is the caller's choice: kept to this much here.
const MAX_PADDED_WIDTH: usize = 4096;

fn real_tokenizer() -> &'static BlipTokenizer {
    static TOKENIZER: OnceLock<BlipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        BlipTokenizer::from_file(workspace().join("tests/fixtures/tokenizer/tokenizer.json"))
            .expect("the tokenizer fixture loads")
    })
}

/// `encode`, `encode_batch`, `decoder_prompt` and `decode` of arbitrary text and ids.
fn target_tokenizer_io(bytes: &[u8], _dir: &Path) -> &'static str {
    let Ok(case) = serde_json::from_slice::<IoCase>(bytes) else {
        return "not a case";
    };
    let tokenizer = real_tokenizer();
    let (padding, max_length) = if case.pad_to_max {
        let max = case.max_length.map(|m| m.min(MAX_PADDED_WIDTH));
        (Padding::MaxLength, max)
    } else {
        (Padding::Longest, case.max_length)
    };
    if let Ok(encoded) = tokenizer.encode_batch(&case.texts, max_length, padding) {
        let [rows, width] = encoded.shape();
        assert_eq!(rows, case.texts.len(), "one row per text");
        assert!(
            encoded.input_ids.iter().all(|r| r.len() == width)
                && encoded.attention_mask.iter().all(|r| r.len() == width),
            "rows of unequal width"
        );
        if let (Padding::MaxLength, Some(max), true) = (padding, max_length, rows > 0) {
            assert_eq!(width, max, "MaxLength pads to max_length");
        }
    }
    for text in &case.texts {
        if let Ok(ids) = tokenizer.encode(text) {
            let _ = tokenizer.decode(&ids, case.skip_special);
        }
        let _ = tokenizer.decoder_prompt(text);
    }
    let _ = tokenizer.decode(&case.ids, case.skip_special);
    "ran"
}

#[test]
fn fuzz_safetensors() {
    fuzz_mutations(&SAFETENSORS);
}

#[test]
fn fuzz_pth() {
    fuzz_mutations(&PTH);
}

#[test]
fn fuzz_config() {
    fuzz_mutations(&CONFIG);
}

#[test]
fn fuzz_tokenizer_json() {
    fuzz_mutations(&TOKENIZER);
}

#[test]
fn fuzz_tokenizer_io() {
    fuzz(&TOKENIZER_IO, io_case(), |case| {
        serde_json::to_vec(case).expect("a case serialises")
    });
}

/// The harness itself: a panic, an oversized allocation and a hang are each caught.
#[test]
fn harness_catches_panics_allocations_and_hangs() {
    fn panics(_: &[u8], _: &Path) -> &'static str {
        panic!("deliberate")
    }
    fn allocates(_: &[u8], _: &Path) -> &'static str {
        let bytes = vec![0u8; settings().max_alloc + 1];
        std::hint::black_box(&bytes);
        "allocated"
    }
    fn hangs(_: &[u8], _: &Path) -> &'static str {
        std::thread::sleep(Duration::from_secs(2));
        "slept"
    }
    const fn target(run: fn(&[u8], &Path) -> &'static str) -> Target {
        Target {
            name: "harness",
            ext: "bin",
            format: Format::Json,
            fixtures: &[],
            run,
        }
    }
    const PANICS: Target = target(panics);
    const ALLOCATES: Target = target(allocates);
    const HANGS: Target = target(hangs);

    let _serial = lock(&SERIAL);
    install_panic_hook();
    let dir = settings().workdir.join("harness");
    let long = Duration::from_secs(30);
    match run_case_within(&PANICS, vec![], &dir, long) {
        Err(Failure::Panic {
            message, location, ..
        }) => assert!(
            message == "deliberate" && location.contains("fuzz.rs"),
            "{location}"
        ),
        other => panic!("a panic was not caught: {other:?}"),
    }
    match run_case_within(&ALLOCATES, vec![], &dir, long) {
        Err(Failure::Alloc(bytes)) => assert!(bytes > settings().max_alloc),
        other => panic!("an oversized allocation was not caught: {other:?}"),
    }
    match run_case_within(&HANGS, vec![], &dir, Duration::from_millis(100)) {
        Err(Failure::Hang(_)) => {}
        other => panic!("a hang was not caught: {other:?}"),
    }
    assert_eq!(
        SOFT_LIMIT.load(Relaxed),
        usize::MAX,
        "the guard is off between cases"
    );
}

// ---------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------

struct Settings {
    duration: Duration,
    seed: u64,
    case_timeout: Duration,
    max_alloc: usize,
    shrink_ms: u32,
    save: bool,
    trace: bool,
    workdir: PathBuf,
}

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, default: f64| {
            var(name).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
            })
        };
        let seed = var("BLIP_FUZZ_SEED").map_or_else(
            || {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            },
            |v| v.parse().expect("BLIP_FUZZ_SEED is an integer"),
        );
        Settings {
            duration: Duration::from_secs_f64(number("BLIP_FUZZ_SECONDS", 3.0)),
            seed,
            case_timeout: Duration::from_secs_f64(number("BLIP_FUZZ_CASE_TIMEOUT", 30.0)),
            max_alloc: number("BLIP_FUZZ_MAX_ALLOC", (256u64 << 20) as f64) as usize,
            shrink_ms: (number("BLIP_FUZZ_SHRINK_SECONDS", 30.0) * 1000.0) as u32,
            save: var("BLIP_FUZZ_SAVE").is_none_or(|v| v != "0"),
            trace: var("BLIP_FUZZ_TRACE").is_some_and(|v| v != "0"),
            workdir: var("BLIP_FUZZ_WORKDIR").map_or_else(
                || std::env::temp_dir().join(format!("blip-fuzz-{}", std::process::id())),
                PathBuf::from,
            ),
        }
    })
}

// ---------------------------------------------------------------------------------------
// The allocation guard
// ---------------------------------------------------------------------------------------

#[global_allocator]
static GUARD: Guard = Guard;

/// The system allocator, watching the size of each single request while a case runs.
struct Guard;

/// The largest single allocation a case may ask for; `usize::MAX` outside cases.
static SOFT_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The largest request over `SOFT_LIMIT` seen in the current case.
static OVERSIZED: AtomicUsize = AtomicUsize::new(0);
/// Requests over this are refused (the process then aborts): granting them could take the
/// machine's memory. The input is the file left in the work directory.
const HARD_LIMIT: usize = 4 << 30;

fn admit(size: usize) -> bool {
    if size <= SOFT_LIMIT.load(Relaxed) {
        return true;
    }
    OVERSIZED.fetch_max(size, Relaxed);
    if size <= HARD_LIMIT {
        return true;
    }
    // No allocation here: format the number by hand.
    let mut digits = [0u8; 20];
    let mut n = size;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut err = std::io::stderr();
    let _ = err.write_all(b"\nfuzz: refusing one allocation of ");
    let _ = err.write_all(&digits[at..]);
    let _ = err
        .write_all(b" bytes; the input being parsed is the file left in the fuzz work directory\n");
    false
}

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if admit(layout.size()) {
            // SAFETY: forwarded unchanged.
            unsafe { System.alloc(layout) }
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if admit(layout.size()) {
            // SAFETY: forwarded unchanged.
            unsafe { System.alloc_zeroed(layout) }
        } else {
            std::ptr::null_mut()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if admit(new_size) {
            // SAFETY: forwarded unchanged.
            unsafe { System.realloc(ptr, layout, new_size) }
        } else {
            std::ptr::null_mut()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running one case
// ---------------------------------------------------------------------------------------

/// Why a case failed.
#[derive(Debug, Clone)]
enum Failure {
    Panic {
        message: String,
        location: String,
        backtrace: String,
    },
    Hang(Duration),
    Alloc(usize),
}

impl Failure {
    /// What makes two failures the same bug.
    fn signature(&self) -> String {
        match self {
            Failure::Panic { location, .. } => format!("panic at {location}"),
            Failure::Hang(_) => "hang".into(),
            Failure::Alloc(_) => "oversized allocation".into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Panic {
                message, location, ..
            } => write!(f, "panicked at {location}: {message}"),
            Failure::Hang(limit) => write!(f, "still running after {limit:?}"),
            Failure::Alloc(bytes) => write!(
                f,
                "asked for {bytes} bytes in one allocation (limit {})",
                settings().max_alloc
            ),
        }
    }
}

/// Cases run one at a time, across the tests too: the allocation guard and the panic record
/// are global.
static SERIAL: Mutex<()> = Mutex::new(());
static CAPTURE: AtomicBool = AtomicBool::new(false);
static PANICKED: Mutex<Option<Failure>> = Mutex::new(None);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// While a case runs, panics are recorded (the first one wins) instead of printed.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CAPTURE.load(Relaxed) {
                return default(info);
            }
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "<non-string panic payload>".into());
            let location = info
                .location()
                .map_or_else(|| "<unknown>".into(), |l| l.to_string());
            let backtrace = std::backtrace::Backtrace::force_capture().to_string();
            let mut record = lock(&PANICKED);
            if record.is_none() {
                *record = Some(Failure::Panic {
                    message,
                    location,
                    backtrace,
                });
            }
        }));
    });
}

/// Runs `target` on `input` in a worker thread, watching for panics, hangs and oversized
/// allocations. A hung worker is left behind (the process ends it).
fn run_case(target: &'static Target, input: Vec<u8>, dir: &Path) -> Result<&'static str, Failure> {
    run_case_within(target, input, dir, settings().case_timeout)
}

fn run_case_within(
    target: &'static Target,
    input: Vec<u8>,
    dir: &Path,
    timeout: Duration,
) -> Result<&'static str, Failure> {
    let settings = settings();
    let dir = dir.to_path_buf();
    *lock(&PANICKED) = None;
    OVERSIZED.store(0, Relaxed);
    CAPTURE.store(true, Relaxed);
    SOFT_LIMIT.store(settings.max_alloc, Relaxed);
    let (done, wait) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{}", target.name))
        .spawn(move || {
            let _ = done.send((target.run)(&input, &dir));
        })
        .expect("spawn a worker");
    let outcome = match wait.recv_timeout(timeout) {
        Ok(stage) => {
            let _ = worker.join();
            Ok(stage)
        }
        Err(RecvTimeoutError::Disconnected) => {
            let _ = worker.join();
            Err(lock(&PANICKED).take().unwrap_or(Failure::Panic {
                message: "the worker died without a recorded panic".into(),
                location: "<unknown>".into(),
                backtrace: String::new(),
            }))
        }
        Err(RecvTimeoutError::Timeout) => Err(Failure::Hang(timeout)),
    };
    SOFT_LIMIT.store(usize::MAX, Relaxed);
    CAPTURE.store(false, Relaxed);
    match (outcome, OVERSIZED.swap(0, Relaxed)) {
        (Ok(_), bytes) if bytes > 0 => Err(Failure::Alloc(bytes)),
        (outcome, _) => outcome,
    }
}

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

/// Every file of the target's corpus folder and its fixtures, by name.
fn seeds(target: &Target) -> Vec<(String, Vec<u8>)> {
    let mut seeds = vec![];
    if let Ok(entries) = std::fs::read_dir(corpus_dir(target)) {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if path.is_file() && !name.starts_with('.') && !name.starts_with("README") {
                let bytes = std::fs::read(&path).expect("read a corpus file");
                seeds.push((format!("fuzz-corpus/{}/{name}", target.name), bytes));
            }
        }
    }
    for fixture in target.fixtures {
        let bytes = std::fs::read(workspace().join(fixture)).expect("read a fixture seed");
        seeds.push((fixture.to_string(), bytes));
    }
    seeds
}

/// FNV-1a, for names of saved inputs and per-target seeds.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes a failing input into the target's corpus folder; returns where it went.
fn save_input(target: &Target, bytes: &[u8]) -> String {
    if !settings().save {
        return "not saved (BLIP_FUZZ_SAVE=0)".into();
    }
    let dir = corpus_dir(target);
    let path = dir.join(format!("crash-{:016x}.{}", fnv(bytes), target.ext));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, bytes)) {
        Ok(()) => format!("saved as {}", path.display()),
        Err(e) => format!("could not be saved as {}: {e}", path.display()),
    }
}

fn describe(failure: &Failure) -> String {
    match failure {
        Failure::Panic { backtrace, .. } => {
            // The frames in this workspace's crates are the useful ones: `N: function` lines,
            // each followed by its `at file:line` line.
            let mut function = "";
            let mut frames = vec![];
            for line in backtrace.lines().map(str::trim) {
                match line.strip_prefix("at ") {
                    Some(at) if at.contains("/crates/") && !at.contains("tests/fuzz.rs") => {
                        frames.push(format!("{function}\n        at {at}"));
                    }
                    Some(_) => {}
                    None => function = line.split_once(": ").map_or(line, |(_, f)| f),
                }
            }
            frames.truncate(8);
            format!("{failure}\n    in {}", frames.join("\n    in "))
        }
        _ => failure.to_string(),
    }
}

/// Seeds larger than this are replayed but not mutated (the real 466 KB `tokenizer.json`
/// would take most of the time; a cut-down copy of it is in the corpus).
const MAX_SEED: usize = 300 << 10;

/// Removes a target's work directory (and the work directory, once empty) however the run ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A mutation-based target: a seed picked from the corpus and fixtures, then 1–6 mutations.
fn fuzz_mutations(target: &'static Target) {
    let seeds: Vec<Vec<u8>> = seeds(target)
        .into_iter()
        .map(|(_, b)| b)
        .filter(|b| b.len() <= MAX_SEED)
        .collect();
    assert!(!seeds.is_empty(), "{}: no seeds", target.name);
    // Half the cases start from the fixtures (listed last): real files reach the deepest.
    let fixtures = target
        .fixtures
        .iter()
        .filter(|f| {
            std::fs::metadata(workspace().join(f)).is_ok_and(|m| m.len() as usize <= MAX_SEED)
        })
        .count();
    let seed = prop_oneof![0..seeds.len(), seeds.len() - fixtures.max(1)..seeds.len()];
    let strategy = (seed, vec(mutation(target.format), 1..=6));
    let format = target.format;
    fuzz(target, strategy, move |(seed, mutations)| {
        mutate(format, &seeds[*seed], mutations)
    });
}

/// Replays the corpus, then runs proptest batches of `strategy` until the time is spent.
fn fuzz<C: Clone + fmt::Debug>(
    target: &'static Target,
    strategy: impl Strategy<Value = C>,
    to_bytes: impl Fn(&C) -> Vec<u8>,
) {
    let _serial = lock(&SERIAL);
    install_panic_hook();
    let settings = settings();
    let dir = settings.workdir.join(target.name);
    std::fs::create_dir_all(&dir).expect("create the fuzz work directory");
    let _cleanup = RemoveOnDrop(dir.clone());
    let mut failures = vec![];
    let mut known = BTreeSet::new();

    let replay = seeds(target);
    let started = Instant::now();
    for (name, bytes) in &replay {
        if let Err(failure) = run_case(target, bytes.clone(), &dir) {
            known.insert(failure.signature());
            failures.push(format!("{name}: {}", describe(&failure)));
        }
    }
    let replay_time = started.elapsed();

    let seed = settings.seed ^ fnv(target.name.as_bytes());
    let deadline = Instant::now() + settings.duration;
    let known = RefCell::new(known);
    let stages = RefCell::new(BTreeMap::<&str, usize>::new());
    let mut batch = 0u64;
    while Instant::now() < deadline {
        let rng_seed = seed.wrapping_add(batch).to_le_bytes().repeat(4);
        let config = Config {
            cases: 64,
            failure_persistence: None,
            max_shrink_time: settings.shrink_ms,
            max_shrink_iters: 100_000,
            source_file: None,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &rng_seed));
        let failing = Cell::new(false);
        let last_failure = RefCell::new(None);
        let result = runner.run(&strategy, |case| {
            // Past the deadline, only a shrink in progress goes on.
            if !failing.get() && Instant::now() >= deadline {
                return Ok(());
            }
            match run_case(target, to_bytes(&case), &dir) {
                Ok(stage) => {
                    *stages.borrow_mut().entry(stage).or_default() += 1;
                    Ok(())
                }
                // Already reported: let the search go on for other bugs.
                Err(failure) if known.borrow().contains(&failure.signature()) => {
                    *stages.borrow_mut().entry("known failure").or_default() += 1;
                    Ok(())
                }
                Err(failure) => {
                    failing.set(true);
                    let reason = failure.to_string();
                    *last_failure.borrow_mut() = Some(failure);
                    Err(TestCaseError::fail(reason))
                }
            }
        });
        if let Err(TestError::Fail(_, case)) = result {
            let failure = last_failure.take().expect("a failing case was recorded");
            known.borrow_mut().insert(failure.signature());
            let bytes = to_bytes(&case);
            failures.push(format!(
                "{} (batch seed {}): {}\n    minimal case: {case:?}\n    input {}",
                target.name,
                seed.wrapping_add(batch),
                describe(&failure),
                save_input(target, &bytes)
            ));
        }
        batch += 1;
    }

    let stages = stages.into_inner();
    let cases: usize = stages.values().sum();
    println!(
        "fuzz {}: {} corpus inputs replayed in {:.1} s; {cases} cases in {:.1} s \
         (BLIP_FUZZ_SEED={}): {stages:?}",
        target.name,
        replay.len(),
        replay_time.as_secs_f64(),
        settings.duration.as_secs_f64(),
        settings.seed,
    );
    assert!(
        failures.is_empty(),
        "{} failure(s) in {}:\n{}",
        failures.len(),
        target.name,
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------

/// How a target's inputs are taken apart for mutation.
#[derive(Debug, Clone, Copy)]
enum Format {
    /// 8-byte little-endian header length, JSON header, data.
    Safetensors,
    /// A ZIP of `data.pkl` and storages, or the legacy stream of pickles and storages.
    Pth,
    /// One JSON document.
    Json,
}

/// A position in the input; `hot` ones fall in the part that matters most (the safetensors
/// header, the ZIP central directory).
#[derive(Debug, Clone)]
struct Pos {
    hot: bool,
    at: u32,
}

#[derive(Debug, Clone)]
enum ByteOp {
    Flip(u8),
    Set(u8),
    Insert(Vec<u8>),
    Delete(u16),
    Truncate,
    /// Inserts (or overwrites with) one of [`MAGIC_TEXT`].
    Magic {
        text: usize,
        overwrite: bool,
    },
}

/// A node of a JSON document, numbered in pre-order; a `shallow` one is picked among the
/// nodes outside containers of more than 256 children.
#[derive(Debug, Clone)]
struct Node {
    shallow: bool,
    n: u32,
}

#[derive(Debug, Clone)]
enum JsonEdit {
    Number(usize),
    Text(usize),
    Null,
    Bool(bool),
    EmptyArray,
    EmptyObject,
    /// An array of `len % 5` copies of one magic number (shapes, offsets).
    Array {
        number: usize,
        len: u8,
    },
    Remove,
    Duplicate,
    /// Renames an object member to one of [`MAGIC_TEXT`].
    Rename(usize),
    /// ±1, ×2, ÷2, negation… of a number; longer/shorter strings and arrays.
    Tweak(u8),
    /// Replaces the node by a copy of another.
    CopyFrom(u32),
}

/// Edits of one tensor of a safetensors file after which its offsets still tile the data
/// section (the bytes are cut or zero-padded to fit), to get past the header's own checks to
/// the loader's key, shape and dtype checks and the conversions behind them.
#[derive(Debug, Clone)]
enum TensorEdit {
    /// One of [`DTYPES`].
    Dtype(usize),
    /// Reversed, flattened, a 1 added, the last dimension dropped, emptied, the first doubled,
    /// or a scalar.
    Shape(u8),
    /// The key renamed to one of [`MAGIC_TEXT`] or given a suffix.
    Rename(usize),
    Remove,
    /// A copy under another key.
    Duplicate,
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
    "U16", "U32", "U64",
];

#[derive(Debug, Clone)]
enum PickleEdit {
    /// The next integer opcode takes one of [`MAGIC_INT`].
    Int(usize),
    /// The next `GLOBAL` names one of [`GLOBALS`].
    Global(usize),
    /// The next string takes one of [`MAGIC_TEXT`].
    Text(usize),
    Drop,
    Dup,
    Swap,
}

#[derive(Debug, Clone)]
enum Mutation {
    Bytes(Pos, ByteOp),
    /// On the whole document (JSON) or on the safetensors header, length fixed up.
    Json(Node, JsonEdit),
    /// On one tensor of a safetensors file, the file kept self-consistent.
    Tensor(u32, TensorEdit),
    /// Overwrites the safetensors header length.
    HeaderLen(usize),
    /// On the bytes of one ZIP member, CRC fixed up.
    Member(u32, Pos, ByteOp),
    DropMember(u32),
    /// On the opcodes of `data.pkl` (or the legacy stream), CRC fixed up.
    Pickle(u32, PickleEdit),
}

const MAGIC_TEXT: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "18446744073709551616",
    "18446744073709551615",
    "18446744073709551552",
    "-1",
    "0",
    "-0",
    "1e-999",
    "4294967296",
    "9223372036854775808",
    "340282366920938463463374607431768211457",
    "0.5",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "[]",
    "{}",
    "",
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "U8",
    "BOOL",
    "F8_E4M3",
    "C64",
    "gelu",
    "relu",
    "[PAD]",
    "[CLS]",
    "[SEP]",
    "[DEC]",
    "[ENC]",
    "[UNK]",
    "##",
    "__metadata__",
    "data_offsets",
    "shape",
    "dtype",
    "vision_config",
    "text_config",
    "(a|a)*b",
    "(?<=x)y",
    "\\p{L}+",
    "\u{10FFFF}",
    "\u{FEFF}",
    "é",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
];

/// Integers for JSON numbers.
fn magic_number(i: usize) -> Value {
    let f = |x: f64| Value::Number(serde_json::Number::from_f64(x).expect("finite"));
    match i % 33 {
        0 => 0.into(),
        1 => 1.into(),
        2 => (-1).into(),
        3 => 2.into(),
        4 => 255.into(),
        5 => 65_536.into(),
        6 => i32::MAX.into(),
        7 => (1u64 << 31).into(),
        8 => u32::MAX.into(),
        9 => (1u64 << 32).into(),
        10 => ((1u64 << 53) + 1).into(),
        11 => i64::MAX.into(),
        12 => (1u64 << 63).into(),
        13 => (u64::MAX - 63).into(),
        14 => u64::MAX.into(),
        15 => 100_000_000.into(),
        16 => 100_000_001.into(),
        17 => f(1e9),
        18 => f(1e30),
        19 => f(-1e9),
        20 => f(0.5),
        21 => f(-0.0),
        22 => f(1e-300),
        23 => f(f64::MAX),
        24 => i64::MIN.into(),
        25 => 16_384.into(),
        26 => 16_385.into(),
        27 => (1u64 << 20).into(),
        28 => ((1u64 << 20) + 1).into(),
        29 => 1024.into(),
        30 => 1025.into(),
        31 => 30_524.into(),
        _ => (u64::MAX / 2 + 1).into(),
    }
}

/// Integers for pickle opcodes.
const MAGIC_INT: &[i128] = &[
    0,
    1,
    -1,
    2,
    3,
    255,
    256,
    65_535,
    65_536,
    i32::MAX as i128,
    i32::MIN as i128,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 53,
    i64::MAX as i128,
    i64::MIN as i128,
    1 << 63,
    (1 << 64) - 64,
    (1 << 64) - 1,
    1 << 64,
    100_000_000,
    -100,
];

const GLOBALS: &[(&str, &str)] = &[
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "ComplexFloatStorage"),
    ("torch", "QInt8Storage"),
    ("torch", "UntypedStorage"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("torch", "Size"),
    ("torch", "device"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("os", "system"),
    ("", ""),
];

fn pos() -> impl Strategy<Value = Pos> {
    (any::<bool>(), any::<u32>()).prop_map(|(hot, at)| Pos { hot, at })
}

fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        3 => any::<u8>().prop_map(ByteOp::Flip),
        2 => any::<u8>().prop_map(ByteOp::Set),
        2 => vec(any::<u8>(), 1..16).prop_map(ByteOp::Insert),
        2 => prop_oneof![1u16..16, any::<u16>()].prop_map(ByteOp::Delete),
        1 => Just(ByteOp::Truncate),
        3 => (any::<usize>(), any::<bool>())
            .prop_map(|(text, overwrite)| ByteOp::Magic { text, overwrite }),
    ]
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        6 => any::<usize>().prop_map(JsonEdit::Number),
        2 => any::<usize>().prop_map(JsonEdit::Text),
        1 => Just(JsonEdit::Null),
        1 => any::<bool>().prop_map(JsonEdit::Bool),
        1 => Just(JsonEdit::EmptyArray),
        1 => Just(JsonEdit::EmptyObject),
        2 => (any::<usize>(), any::<u8>())
            .prop_map(|(number, len)| JsonEdit::Array { number, len }),
        3 => Just(JsonEdit::Remove),
        1 => Just(JsonEdit::Duplicate),
        1 => any::<usize>().prop_map(JsonEdit::Rename),
        4 => any::<u8>().prop_map(JsonEdit::Tweak),
        1 => any::<u32>().prop_map(JsonEdit::CopyFrom),
    ]
}

fn tensor_edit() -> impl Strategy<Value = TensorEdit> {
    prop_oneof![
        3 => any::<usize>().prop_map(TensorEdit::Dtype),
        4 => any::<u8>().prop_map(TensorEdit::Shape),
        1 => any::<usize>().prop_map(TensorEdit::Rename),
        1 => Just(TensorEdit::Remove),
        1 => Just(TensorEdit::Duplicate),
    ]
}

fn pickle_edit() -> impl Strategy<Value = PickleEdit> {
    prop_oneof![
        5 => any::<usize>().prop_map(PickleEdit::Int),
        2 => any::<usize>().prop_map(PickleEdit::Global),
        2 => any::<usize>().prop_map(PickleEdit::Text),
        1 => Just(PickleEdit::Drop),
        1 => Just(PickleEdit::Dup),
        1 => Just(PickleEdit::Swap),
    ]
}

fn mutation(format: Format) -> BoxedStrategy<Mutation> {
    let bytes = (pos(), byte_op()).prop_map(|(p, op)| Mutation::Bytes(p, op));
    let node = (any::<bool>(), any::<u32>()).prop_map(|(shallow, n)| Node { shallow, n });
    let json = (node, json_edit()).prop_map(|(n, e)| Mutation::Json(n, e));
    match format {
        Format::Safetensors => prop_oneof![
            3 => bytes,
            6 => json,
            2 => any::<usize>().prop_map(Mutation::HeaderLen),
            5 => (any::<u32>(), tensor_edit()).prop_map(|(t, e)| Mutation::Tensor(t, e)),
        ]
        .boxed(),
        Format::Pth => prop_oneof![
            2 => bytes,
            3 => (any::<u32>(), pos(), byte_op()).prop_map(|(m, p, op)| Mutation::Member(m, p, op)),
            1 => any::<u32>().prop_map(Mutation::DropMember),
            6 => (any::<u32>(), pickle_edit()).prop_map(|(n, e)| Mutation::Pickle(n, e)),
        ]
        .boxed(),
        Format::Json => prop_oneof![2 => bytes, 6 => json].boxed(),
    }
}

/// Inputs are kept under this size, whatever the mutations (duplicating a large node doubles
/// the document).
const MAX_INPUT: usize = 4 << 20;

fn mutate(format: Format, seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut buf = seed.to_vec();
    for m in mutations {
        let before = buf.clone();
        apply(format, &mut buf, m);
        if buf.len() > MAX_INPUT {
            buf = before;
        }
    }
    buf
}

fn apply(format: Format, buf: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Bytes(pos, op) => {
            let hot = hot_range(format, buf);
            let at = resolve(pos, buf.len(), hot);
            byte_op_at(buf, at, op);
        }
        Mutation::Json(node, edit) => match format {
            Format::Json => {
                if let Some(edited) = edit_json_text(buf, node, edit) {
                    *buf = edited;
                }
            }
            Format::Safetensors => {
                let Some(range) = safetensors_header(buf) else {
                    return;
                };
                if let Some(header) = edit_json_text(&buf[range.clone()], node, edit) {
                    let data = buf.split_off(range.end);
                    buf.clear();
                    buf.extend_from_slice(&(header.len() as u64).to_le_bytes());
                    buf.extend_from_slice(&header);
                    buf.extend_from_slice(&data);
                }
            }
            Format::Pth => {}
        },
        Mutation::Tensor(tensor, edit) => {
            if let Some(edited) = edit_tensor(buf, *tensor, edit) {
                *buf = edited;
            }
        }
        Mutation::HeaderLen(i) => {
            if buf.len() < 8 {
                buf.resize(8, 0);
            }
            let current = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            let len = buf.len() as u64;
            let values = [
                0,
                1,
                7,
                8,
                current.wrapping_sub(1),
                current.wrapping_add(1),
                len - 8,
                len - 7,
                len,
                100_000_000,
                100_000_001,
                1 << 32,
                1 << 63,
                u64::MAX - 7,
                u64::MAX - 8,
                u64::MAX - 63,
                u64::MAX,
            ];
            buf[..8].copy_from_slice(&values[i % values.len()].to_le_bytes());
        }
        Mutation::Member(member, pos, op) => {
            edit_member(buf, |members| {
                let i = *member as usize % members.len();
                let data = &mut members[i].data;
                let hot = 0..data.len().min(64);
                let at = resolve(pos, data.len(), hot);
                byte_op_at(data, at, op);
                members[i].dirty = true;
            });
        }
        Mutation::DropMember(member) => {
            edit_member(buf, |members| {
                members.remove(*member as usize % members.len());
            });
        }
        Mutation::Pickle(nth, edit) => {
            let mut zipped = false;
            edit_member(buf, |members| {
                zipped = true;
                if let Some(pkl) = members.iter_mut().find(|m| m.name.ends_with(b"data.pkl")) {
                    edit_pickle(&mut pkl.data, *nth, edit);
                    pkl.dirty = true;
                }
            });
            if !zipped {
                edit_pickle(buf, *nth, edit);
            }
        }
    }
}

fn hot_range(format: Format, buf: &[u8]) -> Range<usize> {
    let front = 0..buf.len().min(4096);
    match format {
        Format::Safetensors => safetensors_header(buf).map_or(front, |r| 0..r.end),
        Format::Pth => zip_central_directory(buf).map_or(front, |start| start..buf.len()),
        Format::Json => 0..buf.len(),
    }
}

fn resolve(pos: &Pos, len: usize, hot: Range<usize>) -> usize {
    if pos.hot && !hot.is_empty() {
        hot.start + pos.at as usize % hot.len()
    } else {
        pos.at as usize % (len + 1)
    }
}

fn byte_op_at(buf: &mut Vec<u8>, at: usize, op: &ByteOp) {
    let at = at.min(buf.len());
    match op {
        ByteOp::Flip(bit) => {
            if let Some(b) = buf.get_mut(at) {
                *b ^= 1 << (bit % 8);
            }
        }
        ByteOp::Set(value) => {
            if let Some(b) = buf.get_mut(at) {
                *b = *value;
            }
        }
        ByteOp::Insert(bytes) => {
            buf.splice(at..at, bytes.iter().copied());
        }
        ByteOp::Delete(n) => {
            let end = (at + *n as usize).min(buf.len());
            buf.drain(at..end);
        }
        ByteOp::Truncate => buf.truncate(at),
        ByteOp::Magic { text, overwrite } => {
            let text = MAGIC_TEXT[text % MAGIC_TEXT.len()].as_bytes();
            let end = if *overwrite {
                (at + text.len()).min(buf.len())
            } else {
                at
            };
            buf.splice(at..end, text.iter().copied());
        }
    }
}

// JSON ----------------------------------------------------------------------------------

/// The edited document, or `None` when `text` is not JSON.
fn edit_json_text(text: &[u8], node: &Node, edit: &JsonEdit) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(text).ok()?;
    edit_json(&mut value, node, edit);
    serde_json::to_vec(&value).ok()
}

/// Containers with more children than `limit` count as leaves (a shallow pick skips the
/// entries of a 30 000-token vocabulary and reaches the structure around it).
fn children(v: &Value, limit: usize) -> usize {
    match v {
        Value::Array(items) if items.len() <= limit => items.len(),
        Value::Object(map) if map.len() <= limit => map.len(),
        _ => 0,
    }
}

fn count_nodes(v: &Value, limit: usize) -> usize {
    1 + match v {
        _ if children(v, limit) == 0 => 0,
        Value::Array(items) => items.iter().map(|c| count_nodes(c, limit)).sum(),
        Value::Object(map) => map.values().map(|c| count_nodes(c, limit)).sum(),
        _ => 0,
    }
}

/// The `n`-th node in pre-order (the root is 0).
fn nth_node(v: &Value, n: usize, limit: usize) -> Option<&Value> {
    fn go<'a>(v: &'a Value, n: usize, limit: usize, counter: &mut usize) -> Option<&'a Value> {
        if *counter == n {
            return Some(v);
        }
        let children: Vec<&Value> = match v {
            _ if children(v, limit) == 0 => vec![],
            Value::Array(items) => items.iter().collect(),
            Value::Object(map) => map.values().collect(),
            _ => vec![],
        };
        children.into_iter().find_map(|child| {
            *counter += 1;
            go(child, n, limit, counter)
        })
    }
    go(v, n, limit, &mut 0)
}

fn edit_json(root: &mut Value, node: &Node, edit: &JsonEdit) {
    let limit = if node.shallow { 256 } else { usize::MAX };
    let count = count_nodes(root, limit);
    let target = node.n as usize % count;
    let donor = match edit {
        JsonEdit::CopyFrom(other) => nth_node(root, *other as usize % count, limit).cloned(),
        _ => None,
    };
    if target == 0 {
        match edit {
            JsonEdit::Remove => *root = Value::Null,
            JsonEdit::Duplicate => *root = Value::Array(vec![root.clone(), root.clone()]),
            JsonEdit::Rename(_) => {}
            _ => replace_node(root, edit, &donor),
        }
        return;
    }
    walk_json(root, target, &mut 0, edit, &donor, limit);
}

/// Finds node `target` below `v` (whose own number is `*counter`) and edits it in its parent.
fn walk_json(
    v: &mut Value,
    target: usize,
    counter: &mut usize,
    edit: &JsonEdit,
    donor: &Option<Value>,
    limit: usize,
) -> bool {
    if children(v, limit) == 0 {
        return false;
    }
    match v {
        Value::Array(items) => {
            for i in 0..items.len() {
                *counter += 1;
                if *counter == target {
                    match edit {
                        JsonEdit::Remove => {
                            items.remove(i);
                        }
                        JsonEdit::Duplicate => {
                            let copy = items[i].clone();
                            items.insert(i, copy);
                        }
                        JsonEdit::Rename(_) => {}
                        _ => replace_node(&mut items[i], edit, donor),
                    }
                    return true;
                }
                if walk_json(&mut items[i], target, counter, edit, donor, limit) {
                    return true;
                }
            }
        }
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                *counter += 1;
                if *counter == target {
                    match edit {
                        JsonEdit::Remove => {
                            map.remove(&key);
                        }
                        JsonEdit::Duplicate => {
                            let copy = map[&key].clone();
                            map.insert(format!("{key}_"), copy);
                        }
                        JsonEdit::Rename(text) => {
                            if let Some(value) = map.remove(&key) {
                                map.insert(MAGIC_TEXT[text % MAGIC_TEXT.len()].into(), value);
                            }
                        }
                        _ => replace_node(map.get_mut(&key).expect("a key"), edit, donor),
                    }
                    return true;
                }
                let child = map.get_mut(&key).expect("a key");
                if walk_json(child, target, counter, edit, donor, limit) {
                    return true;
                }
            }
        }
        _ => {}
    }
    false
}

fn replace_node(v: &mut Value, edit: &JsonEdit, donor: &Option<Value>) {
    *v = match edit {
        JsonEdit::Number(i) => magic_number(*i),
        JsonEdit::Text(i) => Value::String(MAGIC_TEXT[i % MAGIC_TEXT.len()].into()),
        JsonEdit::Null => Value::Null,
        JsonEdit::Bool(b) => Value::Bool(*b),
        JsonEdit::EmptyArray => Value::Array(vec![]),
        JsonEdit::EmptyObject => Value::Object(Default::default()),
        JsonEdit::Array { number, len } => {
            Value::Array(vec![magic_number(*number); *len as usize % 5])
        }
        JsonEdit::Tweak(kind) => tweak(v, *kind),
        JsonEdit::CopyFrom(_) => donor.clone().unwrap_or(Value::Null),
        JsonEdit::Remove | JsonEdit::Duplicate | JsonEdit::Rename(_) => return,
    };
}

fn tweak(v: &Value, kind: u8) -> Value {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64().map(i128::from).or(n.as_u64().map(i128::from)) {
                let t = match kind % 6 {
                    0 => i + 1,
                    1 => i - 1,
                    2 => i * 2,
                    3 => i / 2,
                    4 => -i,
                    _ => i + 8,
                };
                u64::try_from(t)
                    .map(Value::from)
                    .or_else(|_| i64::try_from(t).map(Value::from))
                    .unwrap_or_else(|_| Value::from(t as f64))
            } else {
                let x = n.as_f64().unwrap_or(0.0);
                let t = match kind % 4 {
                    0 => x * 2.0,
                    1 => -x,
                    2 => x + 1.0,
                    _ => x.trunc(),
                };
                serde_json::Number::from_f64(t).map_or(Value::Null, Value::Number)
            }
        }
        Value::String(s) => Value::String(match kind % 3 {
            0 => format!("{s}x"),
            1 => String::new(),
            _ => s.repeat(2),
        }),
        Value::Array(items) => {
            let mut items = items.clone();
            if kind.is_multiple_of(2) {
                if let Some(last) = items.last().cloned() {
                    items.push(last);
                }
            } else {
                items.pop();
            }
            Value::Array(items)
        }
        Value::Bool(b) => Value::Bool(!b),
        Value::Null => Value::from(0),
        Value::Object(map) => {
            let mut map = map.clone();
            if let Some(first) = map.keys().next().cloned() {
                map.remove(&first);
            }
            Value::Object(map)
        }
    }
}

// Safetensors ---------------------------------------------------------------------------

/// Where the JSON header lies, when the length prefix fits the file.
fn safetensors_header(buf: &[u8]) -> Option<Range<usize>> {
    let len = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(len).ok()?)?;
    (end <= buf.len()).then_some(8..end)
}

struct Entry {
    key: String,
    dtype: String,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn dtype_width(dtype: &str) -> u64 {
    match dtype {
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => 1,
    }
}

/// The file with one tensor edited and the data section laid out anew; `None` when the file
/// does not parse this far or the edit would make a tensor larger than 4 MiB.
fn edit_tensor(buf: &[u8], tensor: u32, edit: &TensorEdit) -> Option<Vec<u8>> {
    let range = safetensors_header(buf)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&buf[range.clone()]).ok()?;
    let data = &buf[range.end..];
    let mut metadata = None;
    let mut entries = vec![];
    for (key, info) in header {
        if key == "__metadata__" {
            metadata = Some(info);
            continue;
        }
        let offsets = info.get("data_offsets")?.as_array()?;
        let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
        let bytes = data.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)?;
        entries.push(Entry {
            key,
            dtype: info.get("dtype")?.as_str()?.to_string(),
            shape: info
                .get("shape")?
                .as_array()?
                .iter()
                .map(Value::as_u64)
                .collect::<Option<_>>()?,
            data: bytes.to_vec(),
        });
    }
    if entries.is_empty() {
        return None;
    }
    let i = tensor as usize % entries.len();
    let e = &mut entries[i];
    match edit {
        TensorEdit::Dtype(d) => e.dtype = DTYPES[d % DTYPES.len()].into(),
        TensorEdit::Shape(kind) => {
            let numel = e.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?;
            e.shape = match kind % 7 {
                0 => e.shape.iter().rev().copied().collect(),
                1 => vec![numel],
                2 => [1].iter().chain(&e.shape).copied().collect(),
                3 => e.shape[..e.shape.len().saturating_sub(1)].to_vec(),
                4 => [0].iter().chain(e.shape.iter().skip(1)).copied().collect(),
                5 => e
                    .shape
                    .iter()
                    .enumerate()
                    .map(|(j, &d)| if j == 0 { d.saturating_mul(2) } else { d })
                    .collect(),
                _ => vec![],
            };
        }
        TensorEdit::Rename(t) => {
            e.key = match MAGIC_TEXT[t % MAGIC_TEXT.len()] {
                "" => format!("{}.x", e.key),
                text => text.into(),
            }
        }
        TensorEdit::Remove => {
            entries.remove(i);
        }
        TensorEdit::Duplicate => {
            let copy = Entry {
                key: format!("{}_", e.key),
                dtype: e.dtype.clone(),
                shape: e.shape.clone(),
                data: e.data.clone(),
            };
            entries.insert(i + 1, copy);
        }
    }
    let mut header = serde_json::Map::new();
    if let Some(metadata) = metadata {
        header.insert("__metadata__".into(), metadata);
    }
    let mut data = vec![];
    for e in entries {
        let len = e
            .shape
            .iter()
            .try_fold(dtype_width(&e.dtype), |n, &d| n.checked_mul(d))
            .filter(|&n| n <= 4 << 20)?;
        let start = data.len();
        data.extend(
            e.data
                .iter()
                .copied()
                .chain(std::iter::repeat(0))
                .take(len as usize),
        );
        header.insert(
            e.key,
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&header).ok()?;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    Some(out)
}

// ZIP -----------------------------------------------------------------------------------

struct Member {
    name: Vec<u8>,
    method: u16,
    crc: u32,
    uncompressed: u32,
    data: Vec<u8>,
    dirty: bool,
}

fn le(buf: &[u8], at: usize, n: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(n)?)?;
    Some(
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
    )
}

fn end_of_central_directory(buf: &[u8]) -> Option<usize> {
    let last = buf.len().checked_sub(22)?;
    (last.saturating_sub(65_535)..=last)
        .rev()
        .find(|&i| buf[i..i + 4] == [0x50, 0x4b, 5, 6])
}

fn zip_central_directory(buf: &[u8]) -> Option<usize> {
    let eocd = end_of_central_directory(buf)?;
    let start = le(buf, eocd + 16, 4)? as usize;
    (start < buf.len()).then_some(start)
}

fn zip_read(buf: &[u8]) -> Option<Vec<Member>> {
    let eocd = end_of_central_directory(buf)?;
    let entries = le(buf, eocd + 10, 2)?;
    let mut p = le(buf, eocd + 16, 4)? as usize;
    if entries == 0 || entries == 0xffff {
        return None;
    }
    let mut members = vec![];
    for _ in 0..entries {
        if le(buf, p, 4)? != 0x0201_4b50 {
            return None;
        }
        let method = le(buf, p + 10, 2)? as u16;
        let crc = le(buf, p + 16, 4)? as u32;
        let size = le(buf, p + 20, 4)? as usize;
        let uncompressed = le(buf, p + 24, 4)? as u32;
        let name_len = le(buf, p + 28, 2)? as usize;
        let extra_len = le(buf, p + 30, 2)? as usize;
        let comment_len = le(buf, p + 32, 2)? as usize;
        let local = le(buf, p + 42, 4)? as usize;
        let name = buf.get(p + 46..p + 46 + name_len)?.to_vec();
        if le(buf, local, 4)? != 0x0403_4b50 {
            return None;
        }
        let start =
            local + 30 + le(buf, local + 26, 2)? as usize + le(buf, local + 28, 2)? as usize;
        let data = buf.get(start..start.checked_add(size)?)?.to_vec();
        members.push(Member {
            name,
            method,
            crc,
            uncompressed,
            data,
            dirty: false,
        });
        p += 46 + name_len + extra_len + comment_len;
    }
    Some(members)
}

/// A ZIP of `members` with PyTorch's layout: each member's data 64-byte aligned.
fn zip_write(members: &[Member]) -> Vec<u8> {
    let (mut out, mut central) = (vec![], vec![]);
    let u16le = |v: usize| (v as u16).to_le_bytes();
    let u32le = |v: usize| (v as u32).to_le_bytes();
    for m in members {
        let offset = out.len();
        let crc = if m.dirty && m.method == 0 {
            crc32(&m.data)
        } else {
            m.crc
        };
        let uncompressed = if m.method == 0 {
            m.data.len()
        } else {
            m.uncompressed as usize
        };
        let pad = (64 - (offset + 30 + m.name.len() + 4) % 64) % 64;
        let mut fixed = vec![];
        fixed.extend_from_slice(&u16le(20)); // version needed
        fixed.extend_from_slice(&u16le(0)); // flags
        fixed.extend_from_slice(&m.method.to_le_bytes());
        fixed.extend_from_slice(&u16le(0)); // time
        fixed.extend_from_slice(&u16le(0x21)); // date
        fixed.extend_from_slice(&crc.to_le_bytes());
        fixed.extend_from_slice(&u32le(m.data.len()));
        fixed.extend_from_slice(&u32le(uncompressed));
        fixed.extend_from_slice(&u16le(m.name.len()));
        out.extend_from_slice(&[0x50, 0x4b, 3, 4]);
        out.extend_from_slice(&fixed);
        out.extend_from_slice(&u16le(4 + pad));
        out.extend_from_slice(&m.name);
        out.extend_from_slice(&[0x46, 0x42]);
        out.extend_from_slice(&u16le(pad));
        out.extend(std::iter::repeat_n(b'Z', pad));
        out.extend_from_slice(&m.data);

        central.extend_from_slice(&[0x50, 0x4b, 1, 2]);
        central.extend_from_slice(&u16le(20)); // version made by
        central.extend_from_slice(&fixed);
        central.extend_from_slice(&u16le(0)); // extra
        central.extend_from_slice(&u16le(0)); // comment
        central.extend_from_slice(&u16le(0)); // disk
        central.extend_from_slice(&u16le(0)); // internal attributes
        central.extend_from_slice(&u32le(0)); // external attributes
        central.extend_from_slice(&u32le(offset));
        central.extend_from_slice(&m.name);
    }
    let start = out.len();
    out.extend_from_slice(&central);
    out.extend_from_slice(&[0x50, 0x4b, 5, 6, 0, 0, 0, 0]);
    out.extend_from_slice(&u16le(members.len()));
    out.extend_from_slice(&u16le(members.len()));
    out.extend_from_slice(&u32le(central.len()));
    out.extend_from_slice(&u32le(start));
    out.extend_from_slice(&u16le(0));
    out
}

/// Applies `edit` to the members of a ZIP and rewrites it; does nothing to a non-ZIP.
fn edit_member(buf: &mut Vec<u8>, edit: impl FnOnce(&mut Vec<Member>)) {
    if let Some(mut members) = zip_read(buf) {
        edit(&mut members);
        *buf = zip_write(&members);
    }
}

fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        (0..8).fold(crc ^ u32::from(b), |c, _| {
            if c & 1 == 1 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            }
        })
    })
}

// Pickle --------------------------------------------------------------------------------

/// `(start, length)` of each opcode with its argument, through consecutive pickles (the legacy
/// container is several in a row); stops at the first opcode it does not know.
fn pickle_ops(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut ops = vec![];
    let mut p = 0;
    while p < buf.len() {
        let op = buf[p];
        let line = |from: usize| -> Option<usize> {
            Some(buf.get(from..)?.iter().position(|&b| b == b'\n')? + 1)
        };
        let arg = match op {
            b'(' | b'.' | b'0' | b'1' | b'2' | b'N' | b')' | b']' | b'}' | b'a' | b'b' | b'e'
            | b'l' | b'd' | b'o' | b'R' | b's' | b't' | b'u' | b'Q' | 0x85 | 0x86 | 0x87 | 0x88
            | 0x89 | 0x81 | 0x92 | 0x93 | 0x94 | 0x8f | 0x90 | 0x91 | 0x97 | 0x98 => Some(0),
            b'K' | b'q' | b'h' | 0x80 => Some(1),
            b'M' => Some(2),
            b'J' | b'r' | b'j' => Some(4),
            b'G' | 0x95 => Some(8),
            b'U' | b'C' | 0x8c | 0x8a => le(buf, p + 1, 1).map(|n| 1 + n as usize),
            b'T' | b'B' | b'X' | 0x8b => le(buf, p + 1, 4).map(|n| 4 + n as usize),
            0x8d | 0x8e | 0x96 => le(buf, p + 1, 8).map(|n| 8 + n as usize),
            b'c' | b'i' => line(p + 1).and_then(|a| Some(a + line(p + 1 + a)?)),
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' => line(p + 1),
            _ => None,
        };
        let Some(len) = arg.map(|a| a + 1).filter(|len| p + len <= buf.len()) else {
            break;
        };
        ops.push((p, len));
        p += len;
        if op == b'.' && buf.get(p) != Some(&0x80) {
            break;
        }
    }
    ops
}

/// The shortest pickle opcode pushing `v`.
fn encode_int(v: i128) -> Vec<u8> {
    if (0..256).contains(&v) {
        vec![b'K', v as u8]
    } else if (0..65_536).contains(&v) {
        let mut out = vec![b'M'];
        out.extend_from_slice(&(v as u16).to_le_bytes());
        out
    } else if let Ok(v) = i32::try_from(v) {
        let mut out = vec![b'J'];
        out.extend_from_slice(&v.to_le_bytes());
        out
    } else {
        let bytes = v.to_le_bytes();
        let mut n = bytes.len();
        while n > 1 {
            let (top, sign) = (bytes[n - 1], bytes[n - 2] & 0x80);
            if (top == 0 && sign == 0) || (top == 0xff && sign != 0) {
                n -= 1;
            } else {
                break;
            }
        }
        let mut out = vec![0x8a, n as u8];
        out.extend_from_slice(&bytes[..n]);
        out
    }
}

fn edit_pickle(buf: &mut Vec<u8>, nth: u32, edit: &PickleEdit) {
    let ops = pickle_ops(buf);
    if ops.is_empty() {
        return;
    }
    let i = nth as usize % ops.len();
    // The first opcode from `i` on (wrapping) that `wanted` accepts.
    let find = |wanted: &dyn Fn(u8) -> bool| {
        (i..ops.len())
            .chain(0..i)
            .map(|j| ops[j])
            .find(|&(start, _)| wanted(buf[start]))
    };
    let (replace, with) = match edit {
        PickleEdit::Int(v) => {
            let Some(op) = find(&|op| matches!(op, b'K' | b'M' | b'J' | 0x8a)) else {
                return;
            };
            (op, encode_int(MAGIC_INT[v % MAGIC_INT.len()]))
        }
        PickleEdit::Global(g) => {
            let Some(op) = find(&|op| op == b'c') else {
                return;
            };
            let (module, name) = GLOBALS[g % GLOBALS.len()];
            (op, format!("c{module}\n{name}\n").into_bytes())
        }
        PickleEdit::Text(t) => {
            let Some(op) = find(&|op| matches!(op, b'X' | b'U' | b'T' | 0x8c)) else {
                return;
            };
            let text = MAGIC_TEXT[t % MAGIC_TEXT.len()].as_bytes();
            let mut with = vec![b'X'];
            with.extend_from_slice(&(text.len() as u32).to_le_bytes());
            with.extend_from_slice(text);
            (op, with)
        }
        PickleEdit::Drop => (ops[i], vec![]),
        PickleEdit::Dup => {
            let (start, len) = ops[i];
            ((start, 0), buf[start..start + len].to_vec())
        }
        PickleEdit::Swap => {
            let Some(&(next, next_len)) = ops.get(i + 1) else {
                return;
            };
            let (start, len) = ops[i];
            let mut with = buf[next..next + next_len].to_vec();
            with.extend_from_slice(&buf[start..start + len]);
            ((start, len + next_len), with)
        }
    };
    let (start, len) = replace;
    buf.splice(start..start + len, with);
}

// ---------------------------------------------------------------------------------------
// The tokenizer-io cases
// ---------------------------------------------------------------------------------------

const PIECES: &[&str] = &[
    "[CLS]",
    "[SEP]",
    "[PAD]",
    "[DEC]",
    "[ENC]",
    "[UNK]",
    "[MASK]",
    "##",
    "##s",
    " ",
    "a",
    "photo",
    "of",
    "unaffable",
    "é",
    "e\u{301}",
    "中",
    "🙂",
    "\u{0}",
    "\t",
    "\n",
    "\u{200B}",
    "\u{FEFF}",
    "ǅ",
    "İ",
    "ß",
    "ﬁ",
    "𝔘",
    "\u{10FFFF}",
    "\u{FFFD}",
];

fn io_case() -> impl Strategy<Value = IoCase> {
    let piece = prop_oneof![
        3 => any::<char>().prop_map(String::from),
        3 => proptest::sample::select(PIECES).prop_map(String::from),
        1 => (1usize..300).prop_map(|n| "x".repeat(n)),
    ];
    let text = prop_oneof![
        4 => vec(piece, 0..24).prop_map(|pieces| pieces.concat()),
        1 => any::<String>(),
    ];
    let id = prop_oneof![
        4 => 0u32..31_000,
        1 => 30_515u32..30_530,
        1 => any::<u32>(),
    ];
    let max_length = proptest::option::of(prop_oneof![0usize..8, 8usize..600, any::<usize>()]);
    (
        vec(text, 0..5),
        vec(id, 0..48),
        max_length,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(texts, ids, max_length, pad_to_max, skip_special)| IoCase {
                texts,
                ids,
                max_length,
                pad_to_max,
                skip_special,
            },
        )
}

// ---------------------------------------------------------------------------------------
// Seed generation
// ---------------------------------------------------------------------------------------

/// Writes the generated seeds of `tests/fuzz-corpus/` (run with `--ignored` after changing it).
#[test]
#[ignore = "writes the generated corpus seeds"]
fn write_fuzz_seeds() {
    let write = |target: &Target, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let safetensors = |header: &str, data: &[u8]| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    };
    write(&SAFETENSORS, "empty.safetensors", &safetensors("{}", &[]));
    // Known bug: a header length of 2^64 - 8 or more.
    let mut huge = (u64::MAX - 7).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    write(&SAFETENSORS, "bug-header-len-u64-max.safetensors", &huge);
    write(
        &SAFETENSORS,
        "metadata-only.safetensors",
        &safetensors(r#"{"__metadata__":{"format":"pt"}}"#, &[]),
    );
    write(
        &SAFETENSORS,
        "three-tensors.safetensors",
        &safetensors(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[],"data_offsets":[16,18]},"c":{"dtype":"I64","shape":[0,4],"data_offsets":[18,18]}}"#,
            &[0x3f; 18],
        ),
    );

    // Regressions: offsets and shapes near 2^64 once overflowed while the header was checked.
    write(
        &SAFETENSORS,
        "data-offsets-u64-max.safetensors",
        &safetensors(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,18446744073709551615]}}"#,
            &[0; 4],
        ),
    );
    write(
        &SAFETENSORS,
        "shape-product-overflow.safetensors",
        &safetensors(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
            &[],
        ),
    );
    write(
        &SAFETENSORS,
        "overlapping-offsets.safetensors",
        &safetensors(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 12],
        ),
    );

    let base = BlipConfig::base().to_hf_json("BlipForConditionalGeneration");
    write(
        &CONFIG,
        "base.json",
        serde_json::to_string_pretty(&base).unwrap().as_bytes(),
    );
    write(&CONFIG, "empty.json", b"{}");
    // Regressions: sizes near 2^64 once overflowed while the config was read.
    write(
        &CONFIG,
        "bos-token-id-u64-max.json",
        br#"{"text_config": {"bos_token_id": 18446744073709551615}}"#,
    );
    // A float serde_json reads 1 ULP off (the round trip allows for it).
    write(
        &CONFIG,
        "eps-1e-25.json",
        br#"{"vision_config": {"layer_norm_eps": 1e-25}}"#,
    );
    write(
        &CONFIG,
        "image-size-near-u64-max.json",
        br#"{"vision_config": {"image_size": 18446744073709551552, "patch_size": 16}}"#,
    );
    write(
        &CONFIG,
        "hub-base.json",
        br#"{"architectures": ["BlipForConditionalGeneration"], "model_type": "blip", "text_config": {"num_attention_heads": 12}, "vision_config": {"dropout": 0.0, "initializer_range": 0.02}}"#,
    );

    // A small WordPiece tokenizer with BertProcessing, and the real one's layout
    // (TemplateProcessing) with its vocabulary cut to the first 2000 ids.
    let dir = std::env::temp_dir().join(format!("blip-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vocab = workspace().join("tests/fixtures/tiny-captioning/vocab.txt");
    let small = dir.join("tokenizer.json");
    BlipTokenizer::from_vocab(&vocab)
        .unwrap()
        .save(&small)
        .unwrap();
    let from_vocab = std::fs::read_to_string(&small).unwrap();
    write(&TOKENIZER, "from-vocab.json", from_vocab.as_bytes());
    // Known bugs (see tests/fuzz-corpus/README.md): a file cut short inside `decoder`, ...
    let cut = from_vocab.find("\"decoder\"").unwrap();
    let cut = cut + from_vocab[cut..].find("\"WordPiece\"").unwrap() + "\"WordPiece\"".len();
    write(
        &TOKENIZER,
        "bug-truncated-in-decoder.json",
        &from_vocab.as_bytes()[..cut],
    );
    let edited = |edit: &dyn Fn(&mut Value)| {
        let mut json: Value = serde_json::from_str(&from_vocab).unwrap();
        edit(&mut json);
        serde_json::to_string_pretty(&json).unwrap().into_bytes()
    };
    // ... no post-processor (`encode` adds no `[CLS]`), ...
    write(
        &TOKENIZER,
        "bug-no-post-processor.json",
        &edited(&|json| json["post_processor"] = Value::Null),
    );
    // ... a template naming a special token it does not define, ...
    write(
        &TOKENIZER,
        "bug-template-without-its-special-token.json",
        &edited(&|json| {
            json["post_processor"] = serde_json::json!({
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "[SEP]", "type_id": 0}}
                ],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"[SEP]": {"id": "[SEP]", "ids": [102], "tokens": ["[SEP]"]}}
            })
        }),
    );
    // ... a BPE decoder, which underflows decoding ids that leave no token, ...
    write(
        &TOKENIZER,
        "bug-bpe-decoder-no-tokens.json",
        &edited(&|json| {
            json["decoder"] = serde_json::json!({"type": "BPEDecoder", "suffix": "</w>"})
        }),
    );
    // ... and a vocabulary id of u32::MAX.
    write(
        &TOKENIZER,
        "bug-vocab-id-u32-max.json",
        &edited(&|json| json["model"]["vocab"]["[UNK]"] = u32::MAX.into()),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let real = std::fs::read(workspace().join("tests/fixtures/tokenizer/tokenizer.json")).unwrap();
    let mut real: Value = serde_json::from_slice(&real).unwrap();
    let vocab = real["model"]["vocab"].as_object_mut().unwrap();
    vocab.retain(|_, id| id.as_u64().is_some_and(|id| id < 2000));
    write(
        &TOKENIZER,
        "template-2000.json",
        &serde_json::to_vec(&real).unwrap(),
    );

    let case = IoCase {
        texts: vec![
            String::new(),
            "[CLS] a photo [SEP] of [DEC] a ##s cat [ENC]".into(),
            "中文 🙂 e\u{301} İ ß ﬁ \u{0}\u{FEFF}".into(),
            "x".repeat(200),
        ],
        ids: vec![0, 101, 102, 30_522, 30_523, 30_524, 30_525, u32::MAX],
        max_length: Some(5),
        pad_to_max: true,
        skip_special: true,
    };
    write(
        &TOKENIZER_IO,
        "specials.json",
        &serde_json::to_vec(&case).unwrap(),
    );
    let case = IoCase {
        max_length: Some(0),
        pad_to_max: false,
        skip_special: false,
        ..case
    };
    write(
        &TOKENIZER_IO,
        "max-length-0.json",
        &serde_json::to_vec(&case).unwrap(),
    );
}
