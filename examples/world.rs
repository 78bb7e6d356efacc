//! The paper's CapFilt experiment (Tables 1 and 2) in miniature, on a generated world whose
//! noise is known, on the CPU:
//!
//! 1. generate the world (clean, noisy web and test splits; `blip-world`);
//! 2. pre-train a tiny BLIP (ITC + ITM + LM) on clean + web;
//! 3. fine-tune a captioner (LM) and, separately, a filter (ITC + ITM) on the clean split;
//! 4. CapFilt over the web split, with nucleus sampling and, for Table 2, beam search;
//! 5. pre-train new models on clean + each bootstrapped set;
//! 6. evaluate every pre-trained model on the test split: zero-shot retrieval (ITC top-k,
//!    ITM re-rank) recall@1/5 both ways, and captioning after fine-tuning on the clean split
//!    (exact attributes, CIDEr); the filter's precision/recall against the noise labels and
//!    the noise ratios.
//!
//! ```sh
//! cargo run --release --features capfilt --example world -- --out runs/world
//! ```
//!
//! Every stage writes its result under `--out` and is skipped when it is already there, so
//! an interrupted experiment continues where it stopped; training stages resume from their
//! checkpoints. `results.json` and `results.md` hold the table.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use blip::Device;
use blip::capfilt::{BlipCapFilt, CapFiltSettings, CaptionStrategy, RunOptions, Summary, run};
use blip::text::{BlipTokenizer, Captioner, GenerationConfig, Padding};
use blip::train::{
    BatchLoader, BlipPretrain, FitOptions, LoaderConfig, PretrainConfig, TextRecipe, TrainConfig,
    TrainTransform, Trainer, fit, load_annotations, pre_caption,
};
use blip::vision::ImageProcessor;
use blip_world::{TestRecord, WebLabel, WorldConfig, caption_mentions, cider, generate};
use burn::tensor::{Int, Tensor, TensorData};
use clap::Parser;
use common::fail;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "CapFilt on a generated world: the paper's Tables 1 and 2 in miniature")]
struct Args {
    /// Output directory (the world, checkpoints, models, results).
    #[arg(long, default_value = "runs/world")]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A small world and short training: a smoke run of every stage in about a minute.
    #[arg(long)]
    small: bool,
    /// Pre-training epochs.
    #[arg(long, default_value_t = 15)]
    pretrain_epochs: usize,
    /// Captioner fine-tuning epochs.
    #[arg(long, default_value_t = 6)]
    finetune_epochs: usize,
    /// Filter fine-tuning epochs (ITM is the slower objective to learn from scratch).
    #[arg(long, default_value_t = 30)]
    filter_epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak pre-training learning rate (fine-tuning uses a quarter).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// ViT patch size: 8 gives a 64-px image 64 patches, enough to tell a star from a ball.
    #[arg(long, default_value_t = 8)]
    patch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

struct Experiment {
    out: PathBuf,
    world: PathBuf,
    tokenizer: BlipTokenizer,
    device: Device,
    args: Args,
}

fn or_fail<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| fail(&e.to_string()))
}

/// A JSON array of records (the world's and CapFilt's annotation files).
fn read_records(path: &Path) -> Vec<Value> {
    or_fail(serde_json::from_str(&or_fail(std::fs::read_to_string(
        path,
    ))))
}

fn write_json(path: &Path, value: &Value) {
    let tmp = path.with_extension("partial");
    or_fail(std::fs::write(
        &tmp,
        serde_json::to_string_pretty(value).unwrap() + "\n",
    ));
    or_fail(std::fs::rename(&tmp, path));
}

/// Words of every text of the world, as a WordPiece vocabulary with BLIP's special tokens:
/// a tiny model learns faster over 262 tokens than over bert-base-uncased's 30522.
fn write_vocabulary(world: &Path, path: &Path) {
    let mut words = std::collections::BTreeSet::new();
    for file in ["clean.json", "web.json", "test.json"] {
        let records = read_records(&world.join(file));
        for record in records {
            let texts: Vec<String> = match &record["caption"] {
                Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
                Value::String(s) => vec![s.clone()],
                _ => vec![],
            };
            for text in texts.iter().map(String::as_str).chain(["a picture of"]) {
                for word in text.to_lowercase().split_whitespace() {
                    let mut current = String::new();
                    for c in word.chars() {
                        if c.is_alphanumeric() {
                            current.push(c);
                        } else {
                            if !current.is_empty() {
                                words.insert(std::mem::take(&mut current));
                            }
                            words.insert(c.to_string());
                        }
                    }
                    if !current.is_empty() {
                        words.insert(current);
                    }
                }
            }
        }
    }
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .map(String::from)
        .to_vec();
    vocab.extend(words);
    or_fail(std::fs::write(path, vocab.join("\n") + "\n"));
}

impl Experiment {
    fn stage(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// Trains (or resumes) a model for `task` on `annotations` (relative to the world
    /// directory), starting from `init` or from scratch; returns the final model.
    fn train(
        &self,
        name: &str,
        task: &str,
        init: Option<&BlipPretrain>,
        annotations: &Path,
        epochs: usize,
    ) -> (BlipPretrain, PretrainConfig) {
        let dir = self.stage(name);
        let done = dir.join("final");
        if done.join("state.json").is_file() {
            return or_fail(Trainer::load_model(&done, &self.device));
        }
        let train_device = self.device.clone().autodiff();
        // The world's captions name colours and sides: BLIP's flips and RandAugment
        // (AutoContrast, Equalize) would make them false, so only a mild crop is kept.
        let transform = TrainTransform {
            min_scale: 0.8,
            hflip: false,
            rand_augment: false,
            ..TrainTransform::pretrain(64)
        };
        let (recipe, train) = match task {
            "pretrain" => (
                TextRecipe::pretrain(),
                TrainConfig::pretrain()
                    .with_init_lr(self.args.lr)
                    .with_warmup_steps(200)
                    .with_lr_decay_rate(0.9),
            ),
            "caption" => (
                TextRecipe::caption(),
                TrainConfig::finetune_caption().with_init_lr(self.args.lr / 4.0),
            ),
            _ => (
                TextRecipe::retrieval(),
                TrainConfig::finetune_retrieval().with_init_lr(self.args.lr / 4.0),
            ),
        };
        let train = train.with_epochs(epochs).with_seed(self.args.seed);
        let checkpoints = dir.join("checkpoints");
        let mut trainer = match or_fail(Trainer::latest_checkpoint(&checkpoints)) {
            Some(latest) => or_fail(Trainer::resume(&latest, &train_device)),
            None => {
                let mut config = PretrainConfig::tiny(self.tokenizer.vocab_size())
                    .with_tokenizer(&self.tokenizer)
                    .with_queue_size(self.args.batch_size * 16);
                config.max_length = recipe.max_length;
                config.blip.vision.patch_size = self.args.patch_size;
                config.weights = match task {
                    "pretrain" => config.weights,
                    "caption" => config.weights.with_itc(0.0).with_itm(0.0),
                    _ => config.weights.with_lm(0.0),
                };
                let model = match init {
                    Some(model) => model.clone(),
                    None => config.init(&self.device),
                };
                Trainer::new(model, config, train, &train_device)
            }
        };
        let annotations = or_fail(load_annotations(annotations, &self.world));
        let mut loader = LoaderConfig::new(self.args.batch_size);
        loader.seed = self.args.seed;
        loader.workers = 2;
        let loader = or_fail(BatchLoader::new(annotations, transform, loader));
        let mut options = FitOptions::new(recipe);
        options.checkpoint_dir = Some(checkpoints);
        options.checkpoint_every = 200;
        options.metrics = Some(dir.join("metrics.jsonl"));
        options.progress = Some(common::progress_sink("batches"));
        eprintln!(
            "== {name}: {task}, {} pairs, {epochs} epochs",
            loader.annotations().len()
        );
        let start = Instant::now();
        let report = or_fail(fit(&mut trainer, &loader, &self.tokenizer, &options));
        eprintln!(
            "   {:.0} s, {:.0} samples/s, last losses {:?}",
            start.elapsed().as_secs_f64(),
            report.samples_per_second(),
            report.last_losses
        );
        or_fail(std::fs::create_dir_all(&dir));
        let saved = or_fail(trainer.save(&dir.join("final-root")));
        or_fail(std::fs::rename(saved, &done));
        or_fail(Trainer::load_model(&done, &self.device))
    }

    /// CapFilt over the web split with `strategy`; returns its summary.
    fn capfilt(&self, name: &str, strategy: CaptionStrategy) -> Summary {
        let out = self.stage(name);
        let settings = CapFiltSettings {
            strategy,
            seed: self.args.seed,
            ..CapFiltSettings::default()
        };
        let mut model = or_fail(BlipCapFilt::load(
            &self.stage("captioner"),
            &self.stage("filter"),
            ("captioner".into(), "filter".into()),
            settings.clone(),
            &self.device,
        ));
        let mut options = RunOptions::new(self.world.join("web.json").to_string_lossy(), &out);
        options.image_root = Some(self.world.clone());
        options.generation = settings.to_json();
        options.batch_size = 16;
        options.chunk_size = 256;
        options.progress = Some(common::progress_sink("images"));
        eprintln!("== {name}");
        let report = or_fail(run(&options, &mut model));
        report
            .summary
            .unwrap_or_else(|| fail("CapFilt did not complete"))
    }

    /// Zero-shot retrieval on the test split: ITC over everything, ITM re-ranking of the
    /// top `k`, score = ITM logit + cosine (the original evaluation).
    fn retrieval(
        &self,
        model: &BlipPretrain,
        test: &[TestRecord],
        captions: &[Vec<String>],
    ) -> Value {
        let k = 8;
        let processor = ImageProcessor::new(64);
        let images: Vec<_> = test
            .iter()
            .map(|r| or_fail(ImageProcessor::open(self.world.join(&r.image))))
            .collect();
        let pixels = processor.preprocess(&images, &self.device);
        let embeds = or_fail(model.image_embeds(pixels));
        let image_feat = model.image_features(embeds.clone());
        let texts: Vec<(usize, String)> = captions
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.iter().map(move |t| (i, pre_caption(t, 30))))
            .collect();
        let encoded = or_fail(self.tokenizer.encode_batch(
            &texts.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
            Some(35),
            Padding::MaxLength,
        ));
        let text_feat = or_fail(model.text_features(&encoded, &self.device));
        let sims: Vec<f32> = image_feat
            .matmul(text_feat.transpose())
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let (n_img, n_txt) = (images.len(), texts.len());
        // ITM logits (class 1) for a list of (image, text) pairs, in batches.
        let itm = |pairs: &[(usize, usize)]| -> Vec<f32> {
            let mut out = Vec::new();
            for chunk in pairs.chunks(256) {
                let index = Tensor::<1, Int>::from_data(
                    TensorData::new(
                        chunk.iter().map(|&(i, _)| i as i64).collect::<Vec<_>>(),
                        [chunk.len()],
                    ),
                    &self.device,
                );
                let ids: Vec<Vec<u32>> = chunk
                    .iter()
                    .map(|&(_, t)| encoded.input_ids[t].clone())
                    .collect();
                let mask: Vec<Vec<u32>> = chunk
                    .iter()
                    .map(|&(_, t)| encoded.attention_mask[t].clone())
                    .collect();
                let logits =
                    or_fail(model.itm_logits(embeds.clone().select(0, index), &ids, &mask));
                let values: Vec<f32> = logits.into_data().try_into_vec::<f32>().unwrap();
                out.extend(values.chunks(2).map(|l| l[1]));
            }
            out
        };
        let top = |scores: Vec<(usize, f32)>| {
            let mut s = scores;
            s.sort_by(|a, b| b.1.total_cmp(&a.1));
            s.truncate(k);
            s
        };
        // For each query, the rank of its first match among its ITC top k re-scored by ITM;
        // `pair(query, candidate)` names the (image, text) they form.
        let ranks = |queries: usize,
                     candidates: usize,
                     pair: &dyn Fn(usize, usize) -> (usize, usize),
                     matches: &dyn Fn(usize, usize) -> bool| {
            let sim = |q, c| {
                let (i, t) = pair(q, c);
                sims[i * n_txt + t]
            };
            let chosen: Vec<Vec<usize>> = (0..queries)
                .map(|q| {
                    top((0..candidates).map(|c| (c, sim(q, c))).collect())
                        .into_iter()
                        .map(|(c, _)| c)
                        .collect()
                })
                .collect();
            let pairs: Vec<(usize, usize)> = chosen
                .iter()
                .enumerate()
                .flat_map(|(q, cs)| cs.iter().map(move |&c| pair(q, c)))
                .collect();
            let mut logits = itm(&pairs).into_iter();
            chosen
                .iter()
                .enumerate()
                .map(|(q, cs)| {
                    let mut scored: Vec<(usize, f32)> = cs
                        .iter()
                        .map(|&c| (c, logits.next().unwrap_or(f32::NAN) + sim(q, c)))
                        .collect();
                    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
                    scored
                        .iter()
                        .position(|&(c, _)| matches(q, c))
                        .unwrap_or(usize::MAX)
                })
                .collect::<Vec<usize>>()
        };
        let i2t_rank = ranks(n_img, n_txt, &|i, t| (i, t), &|i, t| texts[t].0 == i);
        let t2i_rank = ranks(n_txt, n_img, &|t, i| (i, t), &|t, i| texts[t].0 == i);
        let recall = |ranks: &[usize], at: usize| {
            100.0 * ranks.iter().filter(|&&r| r < at).count() as f64 / ranks.len() as f64
        };
        json!({
            "tr@1": recall(&i2t_rank, 1), "tr@5": recall(&i2t_rank, 5),
            "ir@1": recall(&t2i_rank, 1), "ir@5": recall(&t2i_rank, 5),
        })
    }

    /// Captioning on the test split with a fine-tuned captioner directory: beam search
    /// (3 beams, 5–20 tokens, prompt "a picture of"), exact attributes and CIDEr.
    fn captioning(&self, captioner: &Path, test: &[TestRecord], captions: &[Vec<String>]) -> Value {
        let captioner = or_fail(Captioner::from_pretrained(captioner, &self.device));
        let generation = GenerationConfig {
            num_beams: 3,
            max_length: 20,
            min_length: 5,
            ..GenerationConfig::default()
        };
        let mut produced = Vec::new();
        for batch in test.chunks(16) {
            let images: Vec<_> = batch
                .iter()
                .map(|r| or_fail(ImageProcessor::open(self.world.join(&r.image))))
                .collect();
            let prompts = vec!["a picture of"; images.len()];
            for c in or_fail(captioner.caption(&images, &prompts, &generation)) {
                produced.push(c[0].text_after("a picture of").to_string());
            }
        }
        let exact = test
            .iter()
            .zip(&produced)
            .filter(|(r, c)| caption_mentions(&r.attributes, c).is_exact())
            .count();
        json!({
            "exact_attributes": 100.0 * exact as f64 / test.len() as f64,
            "cider": 100.0 * cider(&produced, captions),
            "examples": produced.iter().take(5).collect::<Vec<_>>(),
        })
    }

    /// The filter's web-text decisions against the noise labels.
    fn filter_quality(&self, capfilt: &str) -> Value {
        let labels: HashMap<(String, String), bool> =
            or_fail(std::fs::read_to_string(self.world.join("web_labels.jsonl")))
                .lines()
                .map(|l| {
                    let w: WebLabel = or_fail(serde_json::from_str(l));
                    ((w.image, w.caption), w.noisy)
                })
                .collect();
        let (mut removed_noisy, mut removed, mut noisy) = (0usize, 0usize, 0usize);
        for line in or_fail(std::fs::read_to_string(
            self.stage(capfilt).join("provenance.jsonl"),
        ))
        .lines()
        {
            let record: Value = or_fail(serde_json::from_str(line));
            if record["record"] != "text" || record["source"] != "web" {
                continue;
            }
            let key = (
                record["image"].as_str().unwrap_or_default().to_string(),
                record["text"].as_str().unwrap_or_default().to_string(),
            );
            let is_noisy = labels.get(&key).copied().unwrap_or(false);
            let kept = record["kept"].as_bool().unwrap_or(true);
            noisy += usize::from(is_noisy);
            removed += usize::from(!kept);
            removed_noisy += usize::from(!kept && is_noisy);
        }
        json!({
            "precision": 100.0 * removed_noisy as f64 / removed.max(1) as f64,
            "recall": 100.0 * removed_noisy as f64 / noisy.max(1) as f64,
        })
    }
}

fn main() {
    let args = Args::parse();
    let device = common::device(&args.device);
    let out = args.out.clone();
    let world = out.join("world");
    let start = Instant::now();
    if !world.join("world.json").is_file() {
        let mut config = if args.small {
            WorldConfig::small()
        } else {
            WorldConfig::default()
        };
        config.seed = args.seed;
        eprintln!("== world: {}", or_fail(generate(&config, &world)));
    }
    let vocab = out.join("vocab.txt");
    if !vocab.is_file() {
        write_vocabulary(&world, &vocab);
    }
    let tokenizer = or_fail(BlipTokenizer::from_vocab(&vocab));
    let (pre_epochs, ft_epochs, filter_epochs) = if args.small {
        (1, 1, 1)
    } else {
        (
            args.pretrain_epochs,
            args.finetune_epochs,
            args.filter_epochs,
        )
    };
    let experiment = Experiment {
        out: out.clone(),
        world: world.clone(),
        tokenizer,
        device,
        args,
    };
    let test: Vec<TestRecord> =
        or_fail(std::fs::read_to_string(world.join("test_attributes.jsonl")))
            .lines()
            .map(|l| or_fail(serde_json::from_str(l)))
            .collect();
    let test_captions: Vec<Vec<String>> = {
        let records = read_records(&world.join("test.json"));
        records
            .iter()
            .map(|r| {
                r["caption"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    };

    // 2. pre-train on clean + noisy web
    let noisy = out.join("pretrain_noisy.json");
    if !noisy.is_file() {
        let mut records = read_records(&world.join("clean.json"));
        let web = read_records(&world.join("web.json"));
        records.extend(web);
        write_json(&noisy, &Value::Array(records));
    }
    let (base, _) = experiment.train("pretrain-noisy", "pretrain", None, &noisy, pre_epochs);

    // 3. captioner and filter, fine-tuned separately from the same pre-trained model
    let clean = world.join("clean.json");
    let finetune_exports = |from: &BlipPretrain, tag: &str| {
        let captioner_dir = experiment.stage(&format!("captioner{tag}"));
        if !captioner_dir.join("model.safetensors").is_file() {
            let (model, config) = experiment.train(
                &format!("finetune-caption{tag}"),
                "caption",
                Some(from),
                &clean,
                ft_epochs,
            );
            or_fail(model.save_captioner(&config.blip, &experiment.tokenizer, &captioner_dir));
        }
        captioner_dir
    };
    finetune_exports(&base, "");
    if !experiment
        .stage("filter")
        .join("model.safetensors")
        .is_file()
    {
        let (model, config) = experiment.train(
            "finetune-filter",
            "retrieval",
            Some(&base),
            &clean,
            filter_epochs,
        );
        or_fail(model.save_filter(
            &config.blip,
            &experiment.tokenizer,
            experiment.stage("filter"),
        ));
    }

    // 4. CapFilt with nucleus sampling and with beam search
    let nucleus = experiment.capfilt("capfilt-nucleus", CaptionStrategy::Nucleus { top_p: 0.9 });
    let beam = experiment.capfilt("capfilt-beam", CaptionStrategy::Beam { num_beams: 3 });

    // 5. new models pre-trained on clean + bootstrapped web data
    let mut results = json!({"seconds": {}});
    let mut rows = Vec::new();
    let models: Vec<(&str, &str, BlipPretrain)> = {
        let mut models = vec![("noisy web (no CapFilt)", "", base)];
        for (name, summary) in [("nucleus", &nucleus), ("beam", &beam)] {
            let data = out.join(format!("pretrain_{name}.json"));
            if !data.is_file() {
                let mut records = read_records(&world.join("clean.json"));
                let kept: Vec<Value> = read_records(
                    &experiment
                        .stage(&format!("capfilt-{name}"))
                        .join("annotations.json"),
                );
                assert_eq!(
                    Path::new(&summary.image_root),
                    world.as_path(),
                    "paths relative to the world"
                );
                records.extend(kept);
                write_json(&data, &Value::Array(records));
            }
            let (model, _) = experiment.train(
                &format!("pretrain-{name}"),
                "pretrain",
                None,
                &data,
                pre_epochs,
            );
            models.push((
                if name == "nucleus" {
                    "CapFilt, nucleus"
                } else {
                    "CapFilt, beam"
                },
                if name == "nucleus" {
                    "-nucleus"
                } else {
                    "-beam"
                },
                model,
            ));
        }
        models
    };

    // 6. evaluation
    for (label, tag, model) in &models {
        let retrieval = experiment.retrieval(model, &test, &test_captions);
        let captioner = finetune_exports(model, tag);
        let captioning = experiment.captioning(&captioner, &test, &test_captions);
        let noise = match *tag {
            "-nucleus" => nucleus.synthetic_noise_ratio,
            "-beam" => beam.synthetic_noise_ratio,
            _ => None,
        };
        rows.push(json!({"pre-training data": label, "retrieval": retrieval, "captioning": captioning, "synthetic_noise_ratio": noise}));
    }
    results["models"] = Value::Array(rows.clone());
    results["filter_vs_labels"] = experiment.filter_quality("capfilt-nucleus");
    results["noise_ratio"] = json!({
        "web_removed": nucleus.web_noise_ratio,
        "synthetic_removed_nucleus": nucleus.synthetic_noise_ratio,
        "synthetic_removed_beam": beam.synthetic_noise_ratio,
    });
    results["seconds"] = json!(start.elapsed().as_secs_f64());
    write_json(&out.join("results.json"), &results);

    let pct = |v: &Value| v.as_f64().map_or("–".into(), |x| format!("{x:.1}"));
    let mut md = String::from(
        "| pre-training data | synthetic noise ratio | TR@1 | TR@5 | IR@1 | IR@5 | caption exact attributes | CIDEr |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in &rows {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row["pre-training data"].as_str().unwrap_or_default(),
            row["synthetic_noise_ratio"]
                .as_f64()
                .map_or("n/a".into(), |x| format!("{:.0} %", 100.0 * x)),
            pct(&row["retrieval"]["tr@1"]),
            pct(&row["retrieval"]["tr@5"]),
            pct(&row["retrieval"]["ir@1"]),
            pct(&row["retrieval"]["ir@5"]),
            pct(&row["captioning"]["exact_attributes"]),
            pct(&row["captioning"]["cider"]),
        );
    }
    md += &format!(
        "\nFilter on the web texts (nucleus run) against the noise labels: precision {} %, recall {} %; web texts removed: {}.\n",
        pct(&results["filter_vs_labels"]["precision"]),
        pct(&results["filter_vs_labels"]["recall"]),
        nucleus
            .web_noise_ratio
            .map_or("n/a".into(), |x| format!("{:.0} %", 100.0 * x)),
    );
    or_fail(std::fs::write(out.join("results.md"), &md));
    println!("{md}");
    eprintln!("total {:.0} s", start.elapsed().as_secs_f64());
}
