//! The CapFilt runner end to end with a fake deterministic model: inputs, sharding,
//! restarts, option checks, skipped images and the summary's noise ratios.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use blip_capfilt::{
    Annotation, CapFiltModel, CapFiltSettings, CaptionStrategy, Error, ImageVerdict, ModelError,
    ProvenanceRecord, RunOptions, ScoredText, Shard, SkipKind, Summary, TextSource, expand_braces,
    merge, run,
};
use image::{ImageFormat, Rgb, RgbImage};
use serde_json::{Value, json};

const RED: [u8; 3] = [200, 20, 20];
const GREEN: [u8; 3] = [20, 200, 20];
const BLUE: [u8; 3] = [20, 20, 200];
const GREY: [u8; 3] = [128, 128, 128];
const COLOURS: [[u8; 3]; 4] = [RED, GREEN, BLUE, GREY];

/// "Captions" an image by its mean colour and scores a text 0.9 if it names that colour,
/// 0.5 if it says "maybe", else 0.1. Grey images get "a blurry photo", which fails.
#[derive(Default)]
struct FakeModel {
    /// Model entries seen (images, repeated once per extra web text).
    seen: usize,
    fault: Option<Fault>,
    name: Option<String>,
    /// Generation settings, checked as the real model checks them: up front in
    /// `validate`, and (as generation would fail) in every `process` call.
    settings: Option<CapFiltSettings>,
    /// The processor images are resized to as decoded, and the sizes `process` saw.
    fit: Option<blip_vision::ImageProcessor>,
    sizes: Vec<(u32, u32)>,
}

#[derive(Clone, Copy)]
enum Fault {
    Fail,
    NanScore,
    TooFewVerdicts,
}

fn colour_name(image: &RgbImage) -> &'static str {
    let mut sum = [0u64; 3];
    for p in image.pixels() {
        for c in 0..3 {
            sum[c] += p[c] as u64;
        }
    }
    let [r, g, b] = sum;
    if r > 2 * g.max(b) {
        "red"
    } else if g > 2 * r.max(b) {
        "green"
    } else if b > 2 * r.max(g) {
        "blue"
    } else {
        "grey"
    }
}

fn score(text: &str, colour: &str) -> f32 {
    if text.contains(colour) {
        0.9
    } else if text.contains("maybe") {
        0.5
    } else {
        0.1
    }
}

impl CapFiltModel for FakeModel {
    fn process(
        &mut self,
        images: &[RgbImage],
        web_texts: &[Option<String>],
    ) -> Result<Vec<ImageVerdict>, ModelError> {
        assert_eq!(images.len(), web_texts.len());
        self.seen += images.len();
        self.sizes.extend(images.iter().map(RgbImage::dimensions));
        if let Some(settings) = &self.settings {
            settings.validate().map_err(|e| e.to_string())?;
        }
        match self.fault {
            Some(Fault::Fail) => return Err("out of GPU memory".into()),
            Some(Fault::TooFewVerdicts) => return Ok(Vec::new()),
            _ => {}
        }
        let nan = matches!(self.fault, Some(Fault::NanScore));
        Ok(images
            .iter()
            .zip(web_texts)
            .map(|(image, web)| {
                let colour = colour_name(image);
                let caption = if colour == "grey" {
                    "a blurry photo".to_string()
                } else {
                    format!("a {colour} square")
                };
                ImageVerdict {
                    web: web.as_ref().map(|t| ScoredText {
                        text: t.to_lowercase(),
                        itm_probability: score(t, colour),
                    }),
                    synthetic: vec![ScoredText {
                        itm_probability: if nan {
                            f32::NAN
                        } else {
                            score(&caption, colour)
                        },
                        text: caption,
                    }],
                }
            })
            .collect())
    }

    fn validate(&self) -> Result<(), Error> {
        match &self.settings {
            Some(settings) => settings.validate(),
            None => Ok(()),
        }
    }

    fn image_processor(&self) -> Option<blip_vision::ImageProcessor> {
        self.fit.clone()
    }

    fn captioner_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| "fake-captioner".into())
    }

    fn filter_name(&self) -> String {
        "fake-filter".into()
    }
}

fn png(colour: [u8; 3]) -> Vec<u8> {
    let mut bytes = Vec::new();
    RgbImage::from_pixel(4, 3, Rgb(colour))
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .unwrap();
    bytes
}

fn jpeg(colour: [u8; 3]) -> Vec<u8> {
    let mut bytes = Vec::new();
    RgbImage::from_pixel(8, 8, Rgb(colour))
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Jpeg)
        .unwrap();
    bytes
}

fn write_tar(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        if name.contains("..") {
            // `append_data` refuses `..`; a hostile shard can still hold it.
            header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, data.as_slice()).unwrap();
        } else {
            builder
                .append_data(&mut header, name, data.as_slice())
                .unwrap();
        }
    }
    builder.finish().unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn provenance(out: &Path) -> Vec<ProvenanceRecord> {
    read(&out.join("provenance.jsonl"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn annotations(out: &Path) -> Vec<Annotation> {
    serde_json::from_str(&read(&out.join("annotations.json"))).unwrap()
}

fn summary_file(out: &Path) -> Summary {
    serde_json::from_str(&read(&out.join("summary.json"))).unwrap()
}

/// Every file under `dir` (relative path → bytes).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The merged outputs that must not depend on sharding or interruptions.
fn assert_same_output(a: &Path, b: &Path) {
    assert_eq!(
        read(&a.join("provenance.jsonl")),
        read(&b.join("provenance.jsonl"))
    );
    assert_eq!(
        read(&a.join("annotations.json")),
        read(&b.join("annotations.json"))
    );
    assert_eq!(tree(&a.join("images")), tree(&b.join("images")));
    let (sa, mut sb) = (summary_file(a), summary_file(b));
    // The image root of tar runs is the output directory itself.
    if sa.input_kind == "tar" {
        sb.image_root = sa.image_root.clone();
    }
    // The shard count differs by design.
    sb.shards = sa.shards;
    assert_eq!(sa, sb);
}

fn options(input: &Path, out: &Path) -> RunOptions {
    let mut options = RunOptions::new(input.to_string_lossy(), out);
    options.chunk_size = 3;
    options.batch_size = 2;
    options
}

/// The hand-checked data set of the JSON tests (see `json_array_counts_and_noise_ratios`).
fn small_json_records(images: &Path) -> Vec<Value> {
    std::fs::create_dir_all(images).unwrap();
    std::fs::write(images.join("0.png"), png(RED)).unwrap();
    std::fs::write(images.join("1.png"), png(GREEN)).unwrap();
    std::fs::write(images.join("2.png"), png(GREY)).unwrap();
    std::fs::write(images.join("3.png"), png(BLUE)).unwrap();
    std::fs::write(images.join("5.png"), b"not a png at all").unwrap();
    std::fs::write(images.join("6.jpg"), jpeg(RED)).unwrap();
    vec![
        json!({"image": "img/0.png", "caption": "A red car"}),
        json!({"image": "img/1.png", "caption": "a red car", "url": "http://x"}),
        json!({"image": "img/2.png"}),
        json!({"image": "img/3.png", "caption": ["blue sky", "maybe"]}),
        json!({"image": "img/4.png", "caption": "a red car"}),
        json!({"image": "img/5.png", "caption": "a red car"}),
        json!({"image": "img/6.jpg", "caption": ""}),
    ]
}

#[test]
fn json_array_counts_and_noise_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let records = small_json_records(&dir.path().join("img"));
    let json = dir.path().join("ann.json");
    std::fs::write(&json, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    let out = dir.path().join("out");
    let mut model = FakeModel::default();
    let report = run(&options(&json, &out), &mut model).unwrap();

    assert!(report.complete);
    assert_eq!(report.chunks_committed, 3);
    assert_eq!(report.images_processed, 5);
    assert_eq!(report.images_skipped, 2);
    // Image 3 has two web texts: the model sees it twice.
    assert_eq!(model.seen, 6);

    let summary = report.summary.expect("an unsharded run merges");
    assert_eq!(summary, summary_file(&out));
    assert_eq!(summary.images, 7);
    assert_eq!(summary.images_skipped, 2);
    assert_eq!(
        summary.skipped_by_kind,
        BTreeMap::from([("corrupt".to_string(), 1), ("missing".to_string(), 1)])
    );
    assert_eq!(summary.images_with_kept_text, 4);
    // Web: 0 kept, 1 removed, 3 "blue sky" kept, 3 "maybe" kept (0.5 >= threshold).
    assert_eq!((summary.web_texts, summary.web_kept), (4, 3));
    assert_eq!(summary.web_noise_ratio, Some(0.25));
    // Synthetic: one per image (3 twice seen, captioned once); 0, 1, 3, 6 kept, the grey
    // 2 removed.
    assert_eq!((summary.synthetic_texts, summary.synthetic_kept), (5, 4));
    assert_eq!(summary.synthetic_noise_ratio, Some(0.2));
    assert_eq!(summary.annotations, 7);
    assert_eq!(summary.input_kind, "json");
    assert_eq!(summary.image_root, dir.path().to_string_lossy());
    assert_eq!(
        (summary.captioner.as_str(), summary.filter.as_str()),
        ("fake-captioner", "fake-filter")
    );
    assert!(
        summary.to_string().contains("noise ratio 20.0%"),
        "{summary}"
    );

    let ann = |image: &str, caption: &str| Annotation {
        image: image.into(),
        caption: caption.into(),
    };
    assert_eq!(
        annotations(&out),
        [
            // The input's web text is recorded, not the model's normalised copy.
            ann("img/0.png", "A red car"),
            ann("img/0.png", "a red square"),
            ann("img/1.png", "a green square"),
            ann("img/3.png", "blue sky"),
            ann("img/3.png", "a blue square"),
            ann("img/3.png", "maybe"),
            ann("img/6.jpg", "a red square"),
        ]
    );

    let records = provenance(&out);
    assert_eq!(records.len(), 11);
    let ordinals: Vec<u64> = records.iter().map(ProvenanceRecord::ordinal).collect();
    assert!(ordinals.windows(2).all(|w| w[0] <= w[1]), "{ordinals:?}");
    for record in &records {
        match record {
            ProvenanceRecord::Text(t) => {
                assert_eq!(t.filter, "fake-filter");
                assert_eq!(t.kept, t.itm_probability >= 0.5);
                match t.source {
                    TextSource::Web => assert_eq!(t.captioner, None),
                    TextSource::Synthetic => {
                        assert_eq!(t.captioner.as_deref(), Some("fake-captioner"))
                    }
                }
            }
            ProvenanceRecord::Skipped(s) => match s.ordinal {
                4 => {
                    assert_eq!(s.kind, SkipKind::Missing);
                    assert!(s.reason.contains("4.png"), "{}", s.reason);
                }
                5 => {
                    assert_eq!(s.kind, SkipKind::Corrupt);
                    assert!(s.reason.contains("img/5.png"), "{}", s.reason);
                }
                other => panic!("unexpected skip of {other}: {s:?}"),
            },
        }
    }
    let web_1 = records
        .iter()
        .find_map(|r| match r {
            ProvenanceRecord::Text(t) if t.ordinal == 1 && t.source == TextSource::Web => Some(t),
            _ => None,
        })
        .unwrap();
    assert!(!web_1.kept);
    assert_eq!(web_1.itm_probability, 0.1);
    // Raw line format, as documented.
    let first_line = read(&out.join("provenance.jsonl"))
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        first_line,
        r#"{"record":"text","ordinal":0,"image":"img/0.png","text":"A red car","source":"web","itm_probability":0.9,"kept":true,"filter":"fake-filter"}"#
    );
}

#[test]
fn json_lines_match_the_json_array() {
    let dir = tempfile::tempdir().unwrap();
    let records = small_json_records(&dir.path().join("img"));
    let json = dir.path().join("ann.json");
    std::fs::write(&json, serde_json::to_string(&records).unwrap()).unwrap();
    // The JSON lines file lives elsewhere, so its image root is given explicitly.
    std::fs::create_dir(dir.path().join("lists")).unwrap();
    let jsonl = dir.path().join("lists/ann.jsonl");
    let mut lines: Vec<String> = records.iter().map(Value::to_string).collect();
    lines.insert(2, String::new());
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();

    let (out_a, out_b) = (dir.path().join("a"), dir.path().join("b"));
    run(&options(&json, &out_a), &mut FakeModel::default()).unwrap();
    let mut opts = options(&jsonl, &out_b);
    opts.image_root = Some(dir.path().to_path_buf());
    let report = run(&opts, &mut FakeModel::default()).unwrap();
    assert_eq!(report.summary.unwrap().input_kind, "json_lines");
    assert_eq!(
        read(&out_a.join("provenance.jsonl")),
        read(&out_b.join("provenance.jsonl"))
    );
    assert_eq!(
        read(&out_a.join("annotations.json")),
        read(&out_b.join("annotations.json"))
    );
}

/// Two img2dataset-style shards covering every member layout and failure.
fn tar_fixture(dir: &Path) -> PathBuf {
    let shards = dir.join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    write_tar(
        &shards.join("00000.tar"),
        &[
            ("k0.png", png(RED)),
            ("k0.txt", b"a red car\n".to_vec()),
            ("k1.png", png(GREEN)),
            (
                "k1.json",
                br#"{"caption": "a cat", "url": "http://x"}"#.to_vec(),
            ),
            ("k2.png", png(GREY)),
            ("k3.txt", b"a caption without image".to_vec()),
            ("k4.png", b"\x89PNG truncated".to_vec()),
            ("k4.txt", b"a red car".to_vec()),
            ("sub/k5.png", png(BLUE)),
            ("sub/k5.txt", b"blue".to_vec()),
            ("../evil.png", png(RED)),
            ("k6.jpg", jpeg(RED)),
            ("k6.json", br#"{"caption": null}"#.to_vec()),
            ("k7.png", png(RED)),
            ("k7.webp", png(RED)),
            ("k8.cls", b"3".to_vec()),
        ],
    );
    write_tar(
        &shards.join("00001.tar"),
        &[
            ("k0.txt", b"blue water".to_vec()),
            ("k0.png", png(BLUE)),
            ("k9.png", png(GREY)),
            ("k9.txt", b"maybe grey".to_vec()),
        ],
    );
    shards
}

#[test]
fn tar_inputs_copy_the_kept_images() {
    let dir = tempfile::tempdir().unwrap();
    let shards = tar_fixture(dir.path());
    let out = dir.path().join("out");
    let report = run(&options(&shards, &out), &mut FakeModel::default()).unwrap();
    let summary = report.summary.unwrap();
    assert_eq!(summary.input_kind, "tar");
    assert_eq!(summary.image_root, out.to_string_lossy());
    // k0 k1 k2 k3 k4 sub/k5 ../evil k6 k7 | k0 k9 (k8 has no image or caption member)
    assert_eq!(summary.images, 11);
    assert_eq!(
        summary.skipped_by_kind,
        BTreeMap::from([
            ("ambiguous_image".to_string(), 1),
            ("corrupt".to_string(), 1),
            ("no_image".to_string(), 1),
            ("unsafe_key".to_string(), 1),
        ])
    );
    assert_eq!((summary.web_texts, summary.web_kept), (5, 4));

    let files = tree(&out.join("images"));
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    // k2 (grey, no web text) has no kept text; k9's web text "maybe grey" is kept.
    assert_eq!(
        names,
        [
            "00000/k0.png",
            "00000/k1.png",
            "00000/k6.jpg",
            "00000/sub/k5.png",
            "00001/k0.png",
            "00001/k9.png"
        ]
    );
    assert_eq!(files["00000/k0.png"], png(RED), "bytes copied unchanged");
    assert_eq!(files["00000/k6.jpg"], jpeg(RED));
    assert!(!dir.path().join("evil.png").exists());
    assert!(!out.join("evil.png").exists());
    // Every annotation resolves against the image root, as BLIP's loader reads it.
    for a in annotations(&out) {
        assert!(a.image.starts_with("images/"), "{}", a.image);
        assert!(
            Path::new(&summary.image_root).join(&a.image).is_file(),
            "{}",
            a.image
        );
    }
    let records = provenance(&out);
    let skipped: BTreeMap<String, (SkipKind, String)> = records
        .iter()
        .filter_map(|r| match r {
            ProvenanceRecord::Skipped(s) => Some((s.image.clone(), (s.kind, s.reason.clone()))),
            _ => None,
        })
        .collect();
    assert_eq!(skipped["images/00000/k3"].0, SkipKind::NoImage);
    assert_eq!(skipped["images/00000/k4.png"].0, SkipKind::Corrupt);
    assert_eq!(skipped["images/00000/k7.png"].0, SkipKind::AmbiguousImage);
    assert!(skipped["images/00000/k7.png"].1.contains("png, webp"));
    assert_eq!(skipped["images/00000/../evil.png"].0, SkipKind::UnsafeKey);
    // `.txt` trailing newline trimmed, `.json` caption read.
    let web: Vec<&str> = records
        .iter()
        .filter_map(|r| match r {
            ProvenanceRecord::Text(t) if t.source == TextSource::Web => Some(t.text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        web,
        ["a red car", "a cat", "blue", "blue water", "maybe grey"]
    );
}

#[test]
fn brace_patterns_single_tars_and_directories_agree() {
    assert_eq!(
        expand_braces("s/{08..11}.tar").unwrap(),
        ["s/08.tar", "s/09.tar", "s/10.tar", "s/11.tar"]
    );
    assert_eq!(expand_braces("{9..10}").unwrap(), ["9", "10"]);
    assert_eq!(
        expand_braces("{a,b}-{0..1}.tar").unwrap(),
        ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    );
    assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
    for bad in ["{1..0}", "{0..1", "0..1}", "{a{b}}", "{x..y}", "{}"] {
        assert!(
            matches!(expand_braces(bad), Err(Error::Input { .. })),
            "{bad}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let shards = tar_fixture(dir.path());
    let by_dir = dir.path().join("by-dir");
    run(&options(&shards, &by_dir), &mut FakeModel::default()).unwrap();
    for (i, pattern) in ["{00000..00001}.tar", "{00000,00001}.tar"]
        .iter()
        .enumerate()
    {
        let out = dir.path().join(format!("by-pattern-{i}"));
        let input = format!("{}/{pattern}", shards.display());
        let mut opts = options(&shards, &out);
        opts.input = input;
        run(&opts, &mut FakeModel::default()).unwrap();
        assert_eq!(
            read(&by_dir.join("provenance.jsonl")),
            read(&out.join("provenance.jsonl"))
        );
        assert_eq!(tree(&by_dir.join("images")), tree(&out.join("images")));
    }
    // One tar: the first shard's records, same ordinals.
    let single = dir.path().join("single");
    run(
        &options(&shards.join("00000.tar"), &single),
        &mut FakeModel::default(),
    )
    .unwrap();
    let all = provenance(&by_dir);
    let first: Vec<_> = all
        .into_iter()
        .filter(|r| match r {
            ProvenanceRecord::Text(t) => t.image.starts_with("images/00000/"),
            ProvenanceRecord::Skipped(s) => s.image.starts_with("images/00000/"),
        })
        .collect();
    assert_eq!(provenance(&single), first);

    let mut opts = options(&shards, &dir.path().join("missing"));
    opts.input = format!("{}/{{00000..00002}}.tar", shards.display());
    let err = run(&opts, &mut FakeModel::default()).unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "{err}");
    assert!(err.to_string().contains("00002.tar"), "{err}");
}

/// A data set of `n` JSON samples (every 7th image missing, every 5th caption wrong).
fn generated_json(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut records = Vec::new();
    for k in 0..n {
        let colour = COLOURS[k % 4];
        let name = format!("img/{k:03}.png");
        if k % 7 != 3 {
            std::fs::write(dir.join(&name), png(colour)).unwrap();
        }
        let caption = match k % 5 {
            0 => Value::Null,
            1 => json!("a cat"),
            _ => json!(format!(
                "a {} thing",
                ["red", "green", "blue", "grey"][k % 4]
            )),
        };
        records.push(json!({"image": name, "caption": caption}));
    }
    let path = dir.join("ann.json");
    std::fs::write(&path, serde_json::to_string(&records).unwrap()).unwrap();
    path
}

fn sharded_equals_unsharded(input: &Path, root: &Path) {
    let whole = root.join("whole");
    run(&options(input, &whole), &mut FakeModel::default()).unwrap();

    let sharded = root.join("sharded");
    for index in [1, 0] {
        let mut opts = options(input, &sharded);
        opts.shard = Shard::new(index, 3).unwrap();
        let report = run(&opts, &mut FakeModel::default()).unwrap();
        assert!(report.complete);
        assert!(
            report.summary.is_none(),
            "sharded runs leave merging to merge()"
        );
    }
    match merge(&sharded) {
        Err(Error::MissingShards { missing, .. }) => {
            assert_eq!(missing, [Shard::new(2, 3).unwrap()]);
        }
        other => panic!("expected MissingShards, got {other:?}"),
    }
    let mut opts = options(input, &sharded);
    opts.shard = "2/3".parse().unwrap();
    run(&opts, &mut FakeModel::default()).unwrap();
    let summary = merge(&sharded).unwrap();
    assert_eq!(summary.shards, 3);
    assert_same_output(&whole, &sharded);
}

#[test]
fn shards_merge_to_the_unsharded_output() {
    let dir = tempfile::tempdir().unwrap();
    let json = generated_json(&dir.path().join("json"), 23);
    sharded_equals_unsharded(&json, &dir.path().join("json-out"));
    let shards = tar_fixture(dir.path());
    sharded_equals_unsharded(&shards, &dir.path().join("tar-out"));
}

#[test]
fn interrupted_runs_resume_to_the_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let json = generated_json(&dir.path().join("data"), 20);
    let reference = dir.path().join("reference");
    let mut reference_model = FakeModel::default();
    run(&options(&json, &reference), &mut reference_model).unwrap();

    // Stop after two chunks (samples 0..6), as a kill would between commits.
    let out = dir.path().join("out");
    let mut opts = options(&json, &out);
    opts.max_chunks = Some(2);
    let report = run(&opts, &mut FakeModel::default()).unwrap();
    assert!(!report.complete);
    assert_eq!(report.chunks_committed, 2);
    assert!(report.summary.is_none());
    let shard_dir = out.join("shard-00000-of-00001");
    assert!(!shard_dir.join("done").exists());
    assert!(!out.join("annotations.json").exists());
    // A kill mid-write leaves a temp file; the committed chunks' images may even vanish,
    // since a restart must not read them again.
    std::fs::write(
        shard_dir.join("chunks/.00000002.jsonl.tmp"),
        b"{\"chunk\":2,\"sam",
    )
    .unwrap();
    for k in 0..6 {
        let _ = std::fs::remove_file(dir.path().join(format!("data/img/{k:03}.png")));
    }

    opts.max_chunks = None;
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = reports.clone();
    opts.progress = Some(blip_core::progress::ProgressSink::new(move |p| {
        log.lock()
            .unwrap()
            .push((p.done, p.total, p.finished, p.message.to_string()))
    }));
    let mut model = FakeModel::default();
    let report = run(&opts, &mut model).unwrap();
    assert!(report.complete);
    assert_eq!(report.chunks_already_done, 2);
    assert_eq!(report.chunks_committed, 5);
    // Progress counts this invocation's samples (the committed chunks are not redone), in
    // order, and ends with a finished report at the total.
    let reports = reports.lock().unwrap().clone();
    let (done, total, finished, message) = reports.last().unwrap().clone();
    assert!(finished && done == total && total > 0, "{reports:?}");
    assert_eq!(message, "shard 0/1");
    assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0), "{reports:?}");
    assert_eq!(reports.iter().filter(|r| r.2).count(), 1);
    // Samples 0..6 hold one missing image (3): five decodable images were not redone.
    assert_eq!(model.seen, reference_model.seen - 5);
    assert!(!shard_dir.join("chunks/.00000002.jsonl.tmp").exists());
    assert_same_output(&reference, &out);

    // A finished run restarted does nothing and changes nothing.
    let mut model = FakeModel::default();
    let report = run(&opts, &mut model).unwrap();
    assert_eq!((model.seen, report.chunks_committed), (0, 0));
    assert_same_output(&reference, &out);
}

#[test]
fn one_chunk_at_a_time_and_a_lost_last_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let shards = tar_fixture(dir.path());
    let reference = dir.path().join("reference");
    run(&options(&shards, &reference), &mut FakeModel::default()).unwrap();

    // Many interruptions: one chunk per invocation.
    let out = dir.path().join("out");
    let mut opts = options(&shards, &out);
    opts.max_chunks = Some(1);
    let mut invocations = 0;
    while !run(&opts, &mut FakeModel::default()).unwrap().complete {
        invocations += 1;
        assert!(invocations < 10);
    }
    assert_eq!(invocations, 3, "11 samples in chunks of 3");
    assert_same_output(&reference, &out);

    // A crash after the last chunk's images were written but before its rename.
    let chunks = out.join("shard-00000-of-00001/chunks");
    std::fs::remove_file(chunks.join("00000003.jsonl")).unwrap();
    std::fs::write(chunks.join(".00000003.jsonl.tmp"), b"partial").unwrap();
    assert!(matches!(merge(&out), Err(Error::CorruptOutput { .. })));
    let mut model = FakeModel::default();
    let report = run(&options(&shards, &out), &mut model).unwrap();
    assert_eq!(report.chunks_committed, 1);
    assert_eq!(
        model.seen, 2,
        "only the last chunk (k0, k9 of 00001.tar) is redone"
    );
    assert_same_output(&reference, &out);
}

#[test]
fn changed_options_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let json = generated_json(&dir.path().join("data"), 10);
    let out = dir.path().join("out");
    let mut base = options(&json, &out);
    base.max_chunks = Some(1);
    base.generation = json!({"top_p": 0.9, "max_length": 20});
    run(&base, &mut FakeModel::default()).unwrap();

    let expect_changed =
        |opts: &RunOptions, model: &mut FakeModel, field: &str| match run(opts, model) {
            Err(Error::OptionsChanged { path, differences }) => {
                assert!(path.ends_with("run.json"), "{}", path.display());
                assert!(
                    differences.iter().any(|d| d.starts_with(field)),
                    "{differences:?}"
                );
            }
            other => panic!("expected OptionsChanged for {field}, got {other:?}"),
        };
    let mut opts = base.clone();
    opts.threshold = 0.6;
    expect_changed(
        &opts,
        &mut FakeModel::default(),
        "threshold: recorded 0.5, now 0.6",
    );
    let mut opts = base.clone();
    opts.chunk_size = 4;
    expect_changed(&opts, &mut FakeModel::default(), "chunk_size");
    let mut opts = base.clone();
    opts.generation = json!({"top_p": 0.95, "max_length": 20});
    expect_changed(&opts, &mut FakeModel::default(), "generation");
    let mut model = FakeModel {
        name: Some("other-captioner".into()),
        ..FakeModel::default()
    };
    expect_changed(&base, &mut model, "captioner");
    // A sibling shard of another split would mix orderings.
    let mut opts = base.clone();
    opts.shard = Shard::new(1, 2).unwrap();
    expect_changed(&opts, &mut FakeModel::default(), "shard");
    // Batch size and progress are not part of the output's identity.
    let mut opts = base.clone();
    opts.batch_size = 5;
    opts.progress = Some(blip_core::progress::ProgressSink::new(|_| {}));
    run(&opts, &mut FakeModel::default()).unwrap();
    // A changed input file.
    let text = read(&json);
    std::fs::write(&json, text.replace("a cat", "a dog and a cat")).unwrap();
    expect_changed(&base, &mut FakeModel::default(), "input_files");

    let error = Error::OptionsChanged {
        path: "x/run.json".into(),
        differences: vec!["threshold: recorded 0.5, now 0.6".into()],
    };
    assert!(
        error
            .to_string()
            .contains("threshold: recorded 0.5, now 0.6")
    );
}

#[test]
fn model_failures_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let json = generated_json(&dir.path().join("data"), 4);
    for (fault, check) in [
        (
            Fault::Fail,
            (|e: &Error| {
                matches!(e, Error::Model { chunk: 0, .. })
                    && e.to_string().contains("out of GPU memory")
            }) as fn(&Error) -> bool,
        ),
        (Fault::NanScore, |e| {
            matches!(e, Error::ModelContract { .. }) && e.to_string().contains("NaN")
        }),
        (Fault::TooFewVerdicts, |e| {
            matches!(e, Error::ModelContract { .. }) && e.to_string().contains("0 verdicts")
        }),
    ] {
        let out = dir.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        let mut model = FakeModel {
            fault: Some(fault),
            ..FakeModel::default()
        };
        let err = run(&options(&json, &out), &mut model).unwrap_err();
        assert!(check(&err), "{err}");
        // Nothing was committed for the failed chunk.
        let chunks = tree(&out.join("shard-00000-of-00001/chunks"));
        assert!(chunks.is_empty(), "{chunks:?}");
    }
}

#[test]
fn malformed_inputs_name_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cases = [
        (
            write("a.json", r#"[{"image": "x.png"}, {"caption": "no image"}]"#),
            "element 1",
        ),
        (
            write("b.json", r#"[{"url": "http://x", "caption": "c"}]"#),
            "img2dataset",
        ),
        (
            write("c.jsonl", "{\"image\": \"x.png\"}\n{\"image\": 3}\n"),
            "line 2",
        ),
        (
            write("d.json", r#"[{"image": "x.png", "caption": 7}]"#),
            "caption",
        ),
        (write("e.json", r#"[{"image": "x.png"}"#), "invalid JSON"),
        (write("f.txt", "hello"), "neither"),
    ];
    for (path, needle) in &cases {
        let err = run(&options(path, &out), &mut FakeModel::default()).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{}: {err}",
            path.display()
        );
        assert!(
            err.to_string()
                .contains(&*path.file_name().unwrap().to_string_lossy())
                || matches!(err, Error::Input { .. }),
            "{err}"
        );
    }
    // The output directory is not locked by those failed runs: nothing was committed, so
    // the input, corrected, runs into the same directory.
    let fixed = write("a.json", r#"[{"image": "x.png", "caption": "a dog"}]"#);
    run(&options(&fixed, &out), &mut FakeModel::default()).unwrap();
    // Once a chunk is committed, other options are refused.
    let other = write("g.json", r#"[{"image": "y.png", "caption": "a cat"}]"#);
    let err = run(&options(&other, &out), &mut FakeModel::default()).unwrap_err();
    assert!(matches!(err, Error::OptionsChanged { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&out);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = run(&options(&empty, &out), &mut FakeModel::default()).unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "{err}");
    let err = run(
        &options(&dir.path().join("nope.json"), &out),
        &mut FakeModel::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");

    let mut opts = options(&dir.path().join("a.json"), &out);
    opts.threshold = f32::NAN;
    assert!(matches!(
        run(&opts, &mut FakeModel::default()),
        Err(Error::InvalidOption {
            option: "threshold",
            ..
        })
    ));
    let never_run = dir.path().join("never-run");
    std::fs::create_dir(&never_run).unwrap();
    assert!(matches!(merge(&never_run), Err(Error::NoRun { .. })));
}

#[test]
fn shard_specs_parse() {
    assert_eq!(
        "1/3".parse::<Shard>().unwrap(),
        Shard { index: 1, count: 3 }
    );
    assert_eq!(Shard::new(2, 3).unwrap().to_string(), "2/3");
    for bad in ["3/3", "0/0", "a/2", "1", "-1/2"] {
        assert!(
            matches!(bad.parse::<Shard>(), Err(Error::InvalidShard { .. })),
            "{bad}"
        );
    }
    let shard = Shard::new(1, 3).unwrap();
    assert!(shard.contains(4) && !shard.contains(5));
    assert_eq!(
        shard.dir(Path::new("out")),
        Path::new("out/shard-00001-of-00003")
    );
}

#[test]
fn a_shard_runs_once_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let json = generated_json(&dir.path().join("data"), 4);
    let out = dir.path().join("out");
    let mut opts = options(&json, &out);
    opts.max_chunks = Some(0);
    run(&opts, &mut FakeModel::default()).unwrap();
    // Another process working on the shard holds its lock.
    let lock = std::fs::File::options()
        .write(true)
        .open(out.join("shard-00000-of-00001/lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let err = run(&options(&json, &out), &mut FakeModel::default()).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    drop(lock);
    assert!(
        run(&options(&json, &out), &mut FakeModel::default())
            .unwrap()
            .complete
    );
}

/// Chunk `chunk` of an unsharded run in `out`.
fn chunk_file(out: &Path, chunk: u64) -> PathBuf {
    out.join(format!("shard-00000-of-00001/chunks/{chunk:08}.jsonl"))
}

/// Writes `files` (relative path → bytes, as [`tree`] returns them) under `dir`.
fn write_tree(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (rel, bytes) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

#[test]
fn chunk_headers_carry_the_record_count_and_sha256() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let json = generated_json(&dir.path().join("data"), 7);
    let out = dir.path().join("out");
    run(&options(&json, &out), &mut FakeModel::default()).unwrap();
    for chunk in 0..3 {
        let text = read(&chunk_file(&out, chunk));
        let (header, body) = text.split_once('\n').unwrap();
        let header: Value = serde_json::from_str(header).unwrap();
        let digest: String = Sha256::digest(body.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            header,
            json!({
                "chunk": chunk,
                "samples": if chunk < 2 { 3 } else { 1 },
                "records": body.lines().count(),
                "sha256": digest,
            })
        );
    }
}

#[test]
fn damaged_chunks_are_refused_by_merge_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let json = generated_json(&dir.path().join("data"), 20);
    let reference = dir.path().join("reference");
    run(&options(&json, &reference), &mut FakeModel::default()).unwrap();
    let finished = tree(&reference);

    // Chunk 1 (samples 3..6): a skipped missing image, then 3 texts of 4 and 5.
    type Damage = fn(&str) -> String;
    let cases: [(&str, Damage, &str); 5] = [
        (
            "three lines removed",
            |text| {
                let mut lines: Vec<&str> = text.lines().collect();
                lines.drain(1..4);
                lines.join("\n") + "\n"
            },
            "header says 4 record lines, found 1",
        ),
        (
            "cut after a whole line",
            |text| {
                let end = text[..text.len() - 1].rfind('\n').unwrap();
                text[..=end].to_string()
            },
            "header says 4 record lines, found 3",
        ),
        (
            "cut mid-line",
            |text| text[..text.len() - 10].to_string(),
            "cut short",
        ),
        (
            "a byte altered",
            |text| {
                let (header, body) = text.split_once('\n').unwrap();
                format!("{header}\n{}", body.replacen("0.9", "0.1", 1))
            },
            "record bytes have SHA-256",
        ),
        (
            "a line added",
            |text| {
                let last = text.lines().last().unwrap();
                format!("{text}{last}\n")
            },
            "header says 4 record lines, found 5",
        ),
    ];
    for (i, (what, damage, needle)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("damaged-{i}"));
        write_tree(&out, &finished);
        let chunk = chunk_file(&out, 1);
        let original = read(&chunk);
        let damaged = damage(&original);
        assert_ne!(damaged, original, "{what}: no damage done");
        std::fs::write(&chunk, &damaged).unwrap();

        let expect_corrupt = |result: Result<_, Error>, recovery: &str| match result {
            Err(Error::CorruptOutput { path, reason }) => {
                assert_eq!(path, chunk, "{what}: {reason}");
                assert!(reason.contains(needle), "{what}: {reason}");
                assert!(reason.contains(recovery), "{what}: {reason}");
            }
            other => panic!("{what}: expected CorruptOutput, got {other:?}"),
        };
        expect_corrupt(merge(&out).map(|_| ()), "delete this chunk file");
        // The failed merge left the earlier outputs as they were.
        assert_eq!(
            read(&out.join("provenance.jsonl")),
            read(&reference.join("provenance.jsonl")),
            "{what}"
        );
        // A restart does not trust the chunk either.
        let mut model = FakeModel::default();
        expect_corrupt(
            run(&options(&json, &out), &mut model).map(|_| ()),
            "delete this chunk file and run again",
        );
        assert_eq!(model.seen, 0, "{what}");

        // The documented recovery: delete the chunk, run again.
        std::fs::remove_file(&chunk).unwrap();
        let mut model = FakeModel::default();
        let report = run(&options(&json, &out), &mut model).unwrap();
        assert_eq!(report.chunks_committed, 1, "{what}");
        assert_eq!(
            model.seen, 2,
            "{what}: images 4 and 5 redone (3 is missing)"
        );
        assert_same_output(&reference, &out);
    }

    // An unfinished run: the damaged chunk stops the restart before any work.
    let out = dir.path().join("unfinished");
    let mut opts = options(&json, &out);
    opts.max_chunks = Some(2);
    run(&opts, &mut FakeModel::default()).unwrap();
    let chunk = chunk_file(&out, 0);
    let text = read(&chunk).replacen("\"kept\":false", "\"kept\":true ", 1);
    std::fs::write(&chunk, text).unwrap();
    opts.max_chunks = None;
    let mut model = FakeModel::default();
    match run(&opts, &mut model) {
        Err(Error::CorruptOutput { path, reason }) => {
            assert_eq!(path, chunk);
            assert!(reason.contains("SHA-256"), "{reason}");
        }
        other => panic!("expected CorruptOutput, got {other:?}"),
    }
    assert_eq!(model.seen, 0);
    assert!(!out.join("shard-00000-of-00001/done").exists());
}

#[test]
fn invalid_generation_settings_fail_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let json = generated_json(&dir.path().join("data"), 5);
    let out = dir.path().join("out");
    let good = CapFiltSettings::default();
    let with = |f: fn(&mut CapFiltSettings)| {
        let mut settings = good.clone();
        f(&mut settings);
        settings
    };
    let cases = [
        (
            "top_p",
            with(|s| s.strategy = CaptionStrategy::Nucleus { top_p: 0.0 }),
        ),
        (
            "top_p",
            with(|s| s.strategy = CaptionStrategy::Nucleus { top_p: 1.5 }),
        ),
        (
            "top_p",
            with(|s| s.strategy = CaptionStrategy::Nucleus { top_p: f64::NAN }),
        ),
        (
            "num_beams",
            with(|s| s.strategy = CaptionStrategy::Beam { num_beams: 0 }),
        ),
        ("num_captions", with(|s| s.num_captions = 0)),
        ("max_length", with(|s| s.max_length = 0)),
        ("min_length", with(|s| s.min_length = 21)),
        ("repetition_penalty", with(|s| s.repetition_penalty = 0.0)),
        (
            "repetition_penalty",
            with(|s| s.repetition_penalty = f64::INFINITY),
        ),
        ("max_words", with(|s| s.max_words = 0)),
    ];
    for (setting, bad) in cases {
        let mut opts = options(&json, &out);
        opts.generation = bad.to_json();
        let mut model = FakeModel {
            settings: Some(bad.clone()),
            ..FakeModel::default()
        };
        match run(&opts, &mut model) {
            Err(Error::InvalidOption { option, reason }) => {
                assert_eq!(option, setting, "{reason}");
            }
            other => panic!("{setting}: expected InvalidOption, got {other:?}"),
        }
        // Refused before any image was decoded or given to the model, and before the
        // output directory was touched (no run.json to refuse the corrected rerun).
        assert_eq!(model.seen, 0, "{setting}");
        assert!(!out.exists(), "{setting}: the output directory was created");

        opts.generation = good.to_json();
        model.settings = Some(good.clone());
        let report = run(&opts, &mut model).unwrap();
        assert!(report.complete, "{setting}");
        std::fs::remove_dir_all(&out).unwrap();
    }
    // The nucleus bounds and a beam search are accepted.
    for ok in [
        with(|s| s.strategy = CaptionStrategy::Nucleus { top_p: 1.0 }),
        with(|s| s.strategy = CaptionStrategy::Beam { num_beams: 1 }),
        with(|s| s.min_length = s.max_length),
    ] {
        ok.validate().unwrap();
    }
}

/// Runs `f` on its own thread and fails, instead of hanging the test run, when it has not
/// returned within a minute (the FIFO tests: opening a FIFO blocks until a writer comes).
#[cfg(unix)]
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(value) => value,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what}: blocked"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[cfg(unix)]
#[test]
fn fifos_are_refused_or_skipped_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let expect_not_regular = |opts: RunOptions, name: &str| {
        let out = opts.out_dir.clone();
        let err =
            within_a_minute(name, move || run(&opts, &mut FakeModel::default())).expect_err(name);
        assert!(matches!(err, Error::Input { .. }), "{name}: {err}");
        let message = err.to_string();
        assert!(message.contains(name), "{message}");
        assert!(message.contains("not a regular file"), "{message}");
        assert!(!out.exists(), "{name}: the output directory was created");
    };

    // --input a FIFO, read as JSON or as a tar.
    for name in ["input.json", "input.tar"] {
        let fifo = root.join(name);
        mkfifo(&fifo);
        expect_not_regular(options(&fifo, &root.join("out")), name);
    }
    // A FIFO among the shards of a directory (it would be silently left out), or named by
    // a brace pattern.
    let shards = tar_fixture(&root);
    mkfifo(&shards.join("00002.tar"));
    expect_not_regular(options(&shards, &root.join("out")), "00002.tar");
    let mut opts = options(&shards, &root.join("out"));
    opts.input = format!("{}/{{00000..00002}}.tar", shards.display());
    expect_not_regular(opts, "00002.tar");

    // A FIFO as an image of a JSON input: skipped as unreadable, the rest processed.
    let images = root.join("img");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("0.png"), png(RED)).unwrap();
    mkfifo(&images.join("1.png"));
    std::fs::write(images.join("2.png"), png(GREEN)).unwrap();
    let records = json!([
        {"image": "img/0.png", "caption": "a red car"},
        {"image": "img/1.png", "caption": "a red car"},
        {"image": "img/2.png", "caption": "a green car"},
    ]);
    let input = root.join("ann.json");
    std::fs::write(&input, records.to_string()).unwrap();
    let out = root.join("json-out");
    let opts = options(&input, &out);
    let report = within_a_minute("FIFO image", move || {
        run(&opts, &mut FakeModel::default()).unwrap()
    });
    assert_eq!((report.images_processed, report.images_skipped), (2, 1));
    let skipped: Vec<_> = provenance(&out)
        .into_iter()
        .filter_map(|r| match r {
            ProvenanceRecord::Skipped(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(
        (skipped[0].ordinal, skipped[0].kind),
        (1, SkipKind::Unreadable)
    );
    assert_eq!(skipped[0].image, "img/1.png");
    assert!(
        skipped[0].reason.contains("not a regular file"),
        "{}",
        skipped[0].reason
    );
}

/// A tar whose member names are raw bytes (not necessarily UTF-8).
#[cfg(unix)]
fn write_tar_bytes(path: &Path, members: &[(&[u8], Vec<u8>)]) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        builder.append(&header, data.as_slice()).unwrap();
    }
    builder.finish().unwrap();
}

#[cfg(unix)]
#[test]
fn non_utf8_names_are_never_written_lossily() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Tar keys that are not UTF-8 are skipped, named with their bytes escaped; two of them
    // that differ only in an invalid byte stay two samples.
    let shards = root.join("shards");
    std::fs::create_dir(&shards).unwrap();
    write_tar_bytes(
        &shards.join("t.tar"),
        &[
            (b"k\xff.png", png(RED)),
            (b"k\xff.txt", b"a red car".to_vec()),
            (b"k\xfe.png", png(GREEN)),
            (b"ok.png", png(BLUE)),
            (b"ok.txt", b"blue".to_vec()),
        ],
    );
    let out = root.join("out");
    let summary = run(&options(&shards, &out), &mut FakeModel::default())
        .unwrap()
        .summary
        .unwrap();
    for file in ["provenance.jsonl", "annotations.json", "summary.json"] {
        let text = read(&out.join(file));
        assert!(!text.contains('\u{fffd}'), "{file}: {text}");
    }
    assert_eq!(summary.images, 3);
    let skipped: BTreeMap<String, SkipKind> = provenance(&out)
        .into_iter()
        .filter_map(|r| match r {
            ProvenanceRecord::Skipped(s) => Some((s.image, s.kind)),
            _ => None,
        })
        .collect();
    assert_eq!(
        skipped,
        BTreeMap::from([
            (r"images/t/k\xfe.png".to_string(), SkipKind::UnsafeKey),
            (r"images/t/k\xff.png".to_string(), SkipKind::UnsafeKey),
        ])
    );
    for a in annotations(&out) {
        assert!(
            Path::new(&summary.image_root).join(&a.image).is_file(),
            "{}",
            a.image
        );
    }

    let expect_non_utf8 = |opts: &RunOptions, path: &Path| {
        match run(opts, &mut FakeModel::default()) {
            Err(Error::NonUtf8Path { path: got, what }) => assert_eq!(got, path, "{what}"),
            other => panic!("{}: expected NonUtf8Path, got {other:?}", path.display()),
        }
        assert!(!opts.out_dir.exists(), "the output directory was created");
    };
    // A tar file name (its stem would name images/<stem>/).
    let bad_shards = root.join("bad-shards");
    std::fs::create_dir(&bad_shards).unwrap();
    let bad_tar = bad_shards.join(OsStr::from_bytes(b"\xff.tar"));
    write_tar(&bad_tar, &[("k.png", png(RED))]);
    expect_non_utf8(&options(&bad_shards, &root.join("out-2")), &bad_tar);
    // The image root of a JSON input, which the summary names.
    let image_root = root.join(OsStr::from_bytes(b"img\xff"));
    std::fs::create_dir(&image_root).unwrap();
    std::fs::write(image_root.join("0.png"), png(RED)).unwrap();
    let input = root.join("ann.json");
    std::fs::write(&input, r#"[{"image": "0.png", "caption": "red"}]"#).unwrap();
    let mut opts = options(&input, &root.join("out-3"));
    opts.image_root = Some(image_root.clone());
    expect_non_utf8(&opts, &image_root);
    // The output directory of a tar input, the summary's image root.
    let bad_out = root.join(OsStr::from_bytes(b"out\xff"));
    expect_non_utf8(&options(&shards, &bad_out), &bad_out);
}

#[test]
fn images_are_resized_as_decoded_and_truncated_jpegs_are_skipped() {
    // A batch held full-resolution decodes until the model resized them: memory grew with
    // the input's resolution. With the model's processor, the runner resizes at decode.
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("img");
    std::fs::create_dir_all(&images).unwrap();
    let big = RgbImage::from_pixel(300, 200, Rgb(RED));
    big.save(images.join("big.png")).unwrap();
    let whole = jpeg(BLUE);
    std::fs::write(images.join("whole.jpg"), &whole).unwrap();
    std::fs::write(images.join("cut.jpg"), &whole[..whole.len() / 2]).unwrap();
    let json = dir.path().join("in.json");
    let records = json!([
        {"image": "img/big.png", "caption": "a red thing"},
        {"image": "img/whole.jpg", "caption": "a blue thing"},
        {"image": "img/cut.jpg", "caption": "a blue thing"},
    ]);
    std::fs::write(&json, records.to_string()).unwrap();
    let mut model = FakeModel {
        fit: Some(blip_vision::ImageProcessor::new(16)),
        ..FakeModel::default()
    };
    let out = dir.path().join("out");
    run(&options(&json, &out), &mut model).unwrap();
    assert_eq!(model.sizes, vec![(16, 16), (16, 16)]);
    let provenance = read(&out.join("provenance.jsonl"));
    let skipped: Vec<Value> = provenance
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["record"] == "skipped")
        .collect();
    assert_eq!(skipped.len(), 1, "{provenance}");
    assert_eq!(skipped[0]["image"], "img/cut.jpg");
    assert!(
        skipped[0]["reason"].as_str().unwrap().contains("truncated"),
        "{provenance}"
    );
    // The colours survive the resize: the verdicts are the same as at full size.
    assert!(provenance.contains("a red square"), "{provenance}");
}
