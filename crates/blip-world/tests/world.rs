//! A small world written twice: determinism, the files' formats and the labels' truth.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use blip_world::{
    Annotation, NoiseKind, TestAnnotation, TestRecord, WebLabel, WorldConfig, WorldError,
    caption_mentions, generate, image_index, scene,
};
use serde_json::Value;

fn config() -> WorldConfig {
    WorldConfig {
        seed: 99,
        image_size: 72,
        clean_images: 12,
        web_images: 120,
        test_images: 10,
        shard_size: 50,
        ..WorldConfig::default()
    }
}

fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn world_is_deterministic_and_consistent() {
    let config = config();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let summary = generate(&config, a.path()).unwrap();
    assert_eq!(generate(&config, b.path()).unwrap(), summary);
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (path, bytes) in &fa {
        assert!(fb[path] == *bytes, "{} differs", path.display());
        assert!(
            !path.to_string_lossy().contains(".tmp"),
            "left {}",
            path.display()
        );
    }
    // 12 + 120 + 10 images, 5 json(l) files, 3 shards, world.json.
    assert_eq!(fa.len(), 142 + 5 + 3 + 1);
    let root = a.path();

    // Annotation files: only {"image", "caption"}, images present.
    for name in ["clean.json", "web.json"] {
        let raw: Vec<Value> = read_json(&root.join(name));
        for entry in &raw {
            let keys: Vec<&String> = entry.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["image", "caption"], "{name}");
            assert!(root.join(entry["image"].as_str().unwrap()).is_file());
        }
    }
    let clean: Vec<Annotation> = read_json(&root.join("clean.json"));
    assert_eq!(clean.len(), 24);
    assert_eq!(summary.clean_pairs, 24);
    for pair in &clean {
        let s = scene(
            config.seed,
            image_index(&pair.image).unwrap(),
            config.image_size,
        );
        assert!(caption_mentions(&s, &pair.caption).is_exact(), "{pair:?}");
        assert!(pair.image.starts_with("images/clean/"));
    }

    // Web texts and their labels.
    let web: Vec<Annotation> = read_json(&root.join("web.json"));
    let labels: Vec<WebLabel> = read_lines(&root.join("web_labels.jsonl"));
    assert_eq!((web.len(), labels.len()), (120, 120));
    let mut counts: BTreeMap<NoiseKind, usize> = BTreeMap::new();
    for (w, label) in web.iter().zip(&labels) {
        assert_eq!((&w.image, &w.caption), (&label.image, &label.caption));
        assert_eq!(label.noisy, label.noise != NoiseKind::None);
        assert!(!label.caption.trim().is_empty());
        *counts.entry(label.noise).or_default() += 1;
        let s = scene(
            config.seed,
            image_index(&label.image).unwrap(),
            config.image_size,
        );
        let m = caption_mentions(&s, &label.caption);
        match label.noise {
            NoiseKind::None => assert!(m.is_exact(), "{label:?}"),
            NoiseKind::WrongAttribute => {
                let kind = label.attribute.expect("swapped attribute");
                assert_eq!((m.wrong(), m.tally(kind).wrong), (1, 1), "{label:?}: {m:?}");
            }
            NoiseKind::OtherImage => {
                let source = label.source.as_deref().expect("source image");
                assert_ne!(source, label.image);
                assert!(source.starts_with("images/web/"));
                let other = scene(config.seed, image_index(source).unwrap(), config.image_size);
                assert!(
                    caption_mentions(&other, &label.caption).is_exact(),
                    "{label:?}"
                );
                assert!(!m.is_exact(), "{label:?}");
            }
            NoiseKind::Unrelated => assert!(!m.mentions_anything(), "{label:?}"),
            NoiseKind::Truncated => assert!(label.attribute.is_none()),
        }
    }
    let noisy = 120 - counts.get(&NoiseKind::None).copied().unwrap_or(0);
    assert_eq!(noisy, 60, "50 % of 120");
    assert_eq!(summary.web_noisy, 60);
    for kind in NoiseKind::ALL {
        assert_eq!(
            summary.noise[&kind],
            counts.get(&kind).copied().unwrap_or(0)
        );
    }
    // 0.4 / 0.2 / 0.3 / 0.1 of 60, give or take a fallback.
    for (kind, want) in [
        (NoiseKind::OtherImage, 24),
        (NoiseKind::WrongAttribute, 12),
        (NoiseKind::Unrelated, 18),
        (NoiseKind::Truncated, 6),
    ] {
        let got = counts.get(&kind).copied().unwrap_or(0) as i64;
        assert!((got - want).abs() <= 2, "{kind:?}: {got} vs {want}");
    }

    // Test split: all captions correct, attributes are the scenes'.
    let test: Vec<TestAnnotation> = read_json(&root.join("test.json"));
    let records: Vec<TestRecord> = read_lines(&root.join("test_attributes.jsonl"));
    assert_eq!((test.len(), records.len()), (10, 10));
    for (t, r) in test.iter().zip(&records) {
        assert_eq!(t.image, r.image);
        assert_eq!(t.caption.len(), 5);
        let s = scene(config.seed, r.index, config.image_size);
        assert_eq!(&r.attributes, s.attributes());
        for c in &t.caption {
            assert!(caption_mentions(&r.attributes, c).is_exact(), "{c}");
        }
    }

    // WebDataset shards: key.png / key.txt / key.json, keys as img2dataset makes them.
    let mut k = 0;
    for shard in 0..3 {
        let tar = root.join(format!("web-shards/{shard:05}.tar"));
        let mut archive = tar::Archive::new(fs::File::open(&tar).unwrap());
        let mut members = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            members.push((name, bytes));
        }
        let samples = if shard < 2 { 50 } else { 20 };
        assert_eq!(members.len(), 3 * samples);
        for (i, triple) in members.chunks(3).enumerate() {
            let key = format!("{shard:05}{i:02}");
            let names: Vec<&str> = triple.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    format!("{key}.png"),
                    format!("{key}.txt"),
                    format!("{key}.json")
                ]
            );
            assert_eq!(triple[0].1, fs::read(root.join(&web[k].image)).unwrap());
            assert_eq!(
                String::from_utf8(triple[1].1.clone()).unwrap(),
                web[k].caption
            );
            let meta: Value = serde_json::from_slice(&triple[2].1).unwrap();
            assert_eq!(meta["caption"], web[k].caption.as_str());
            assert_eq!(meta["key"], key.as_str());
            assert_eq!(meta["status"], "success");
            assert!(meta.get("noise").is_none() && meta.get("noisy").is_none());
            let img = image::load_from_memory(&triple[0].1).unwrap();
            assert_eq!((img.width(), img.height()), (72, 72));
            k += 1;
        }
    }
    assert_eq!(k, 120);

    // world.json records the settings.
    let world: Value = read_json(&root.join("world.json"));
    let recorded: WorldConfig = serde_json::from_value(world["config"].clone()).unwrap();
    assert_eq!(recorded, config);
    assert_eq!(world["splits"]["web"]["first_index"], 12);

    // A smaller world over the same directory drops the stale shards.
    let smaller = WorldConfig {
        web_images: 30,
        ..config.clone()
    };
    let s = generate(&smaller, root).unwrap();
    assert_eq!(s.shards, 1);
    assert!(!root.join("web-shards/00001.tar").exists());
    assert!(root.join("web-shards/00000.tar").exists());
}

#[test]
fn seeds_differ_and_configs_are_checked() {
    let a = scene(1, 5, 64);
    let b = scene(2, 5, 64);
    assert!(a.attributes() != b.attributes() || a.render() != b.render());
    let dir = tempfile::tempdir().unwrap();
    let bad = WorldConfig {
        image_size: 128,
        ..config()
    };
    assert!(matches!(
        generate(&bad, dir.path()),
        Err(WorldError::InvalidConfig(_))
    ));
}
