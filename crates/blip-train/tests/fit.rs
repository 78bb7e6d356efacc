//! The training loop end to end on a tiny data set: annotations → batches → steps, metrics
//! lines, checkpoints a stopped run resumes from, and export to the HF layout that the
//! inference crates load.

use std::path::{Path, PathBuf};

use blip_text::{BlipTokenizer, Captioner, GenerationConfig, Matcher};
use blip_train::{
    BatchLoader, FitOptions, LoaderConfig, PretrainConfig, TextRecipe, TrainConfig, TrainTransform,
    Trainer, fit, load_annotations,
};
use burn::tensor::Device;

fn tokenizer() -> BlipTokenizer {
    let vocab =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/vocab.txt");
    BlipTokenizer::from_vocab(vocab).unwrap()
}

/// Eight 40-px images of four colours, two captions each, in BLIP's annotation format.
fn data_set(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let colours = [
        ("red", [220, 30, 30]),
        ("green", [30, 200, 40]),
        ("blue", [30, 40, 220]),
        ("yellow", [230, 220, 30]),
    ];
    let mut records = Vec::new();
    for i in 0..8 {
        let (name, rgb) = colours[i % 4];
        let image = image::RgbImage::from_fn(40, 40, |x, y| {
            if (x / 10 + y / 10 + i as u32).is_multiple_of(2) {
                image::Rgb(rgb)
            } else {
                image::Rgb([250, 250, 250])
            }
        });
        let file = format!("images/{i}.png");
        image.save(dir.join(&file)).unwrap();
        records.push(serde_json::json!({"image": file, "caption": [format!("a {name} board"), format!("{name} squares!")]}));
    }
    let path = dir.join("train.json");
    std::fs::write(&path, serde_json::to_string(&records).unwrap()).unwrap();
    path
}

fn loader(dir: &Path, image_size: usize) -> BatchLoader {
    let annotations = load_annotations(&data_set(dir), dir).unwrap();
    let mut config = LoaderConfig::new(4);
    config.workers = 2;
    BatchLoader::new(annotations, TrainTransform::pretrain(image_size), config).unwrap()
}

fn pretrain_config(tokenizer: &BlipTokenizer) -> PretrainConfig {
    let mut config = PretrainConfig::tiny(tokenizer.vocab_size())
        .with_tokenizer(tokenizer)
        .with_queue_size(8);
    config.blip.vision.image_size = 32;
    config
}

#[test]
fn fit_writes_metrics_and_checkpoints_and_a_stopped_run_resumes() {
    let dir = std::env::temp_dir().join(format!("blip-fit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tokenizer = tokenizer();
    let loader = loader(&dir, 32);
    assert_eq!(loader.batches_per_epoch(), 4);
    let device = Device::flex().autodiff();
    let config = pretrain_config(&tokenizer);
    let train = TrainConfig::new().with_epochs(2).with_warmup_steps(2);
    let mut options = FitOptions::new(TextRecipe::pretrain());
    options.checkpoint_dir = Some(dir.join("checkpoints"));
    options.checkpoint_every = 3;
    options.metrics = Some(dir.join("metrics.jsonl"));
    options.max_steps = Some(5);

    let mut trainer = Trainer::new(config.init(&Device::flex()), config, train, &device);
    let report = fit(&mut trainer, &loader, &tokenizer, &options).unwrap();
    assert_eq!(report.batches, 5);
    assert_eq!(report.samples, 20);
    assert_eq!(trainer.progress.step, 5);
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for key in [
        "loss_itc",
        "loss_itm",
        "loss_lm",
        "lr",
        "alpha",
        "samples_per_second",
    ] {
        assert!(
            lines[4][key].is_number(),
            "metrics lack {key}: {}",
            lines[4]
        );
    }
    // Checkpoints at step 3 and at the end of epoch 0 (step 4); `latest` is the newest.
    let root = dir.join("checkpoints");
    assert!(root.join("step-00000003").is_dir());
    let latest = Trainer::latest_checkpoint(&root).unwrap().unwrap();
    assert_eq!(latest, root.join("step-00000004"));

    // The stopped run continues from there to the end of epoch 1.
    let mut resumed = Trainer::resume(&latest, &device).unwrap();
    assert_eq!((resumed.progress.epoch, resumed.progress.batch), (1, 0));
    options.max_steps = None;
    let report = fit(&mut resumed, &loader, &tokenizer, &options).unwrap();
    assert_eq!(report.batches, 4);
    assert_eq!(resumed.progress.epoch, 2);
    assert_eq!(
        Trainer::latest_checkpoint(&root).unwrap().unwrap(),
        root.join("step-00000008")
    );

    // Exports load in the inference crates.
    let blip = resumed.config.blip.clone();
    resumed
        .model
        .save_captioner(&blip, &tokenizer, dir.join("captioner"))
        .unwrap();
    resumed
        .model
        .save_filter(&blip, &tokenizer, dir.join("filter"))
        .unwrap();
    let plain = Device::flex();
    let captioner = Captioner::from_pretrained(dir.join("captioner"), &plain).unwrap();
    let image = image::open(dir.join("images/0.png")).unwrap().to_rgb8();
    let generation = GenerationConfig {
        max_length: 6,
        ..GenerationConfig::default()
    };
    let captions = captioner
        .caption(std::slice::from_ref(&image), &[""], &generation)
        .unwrap();
    assert_eq!(captions[0][0].token_ids[0], tokenizer.dec_token_id);
    let matcher = Matcher::from_pretrained(dir.join("filter"), &plain).unwrap();
    let embeds = matcher.encode_images(&[image]).unwrap();
    let p = matcher.itm_probabilities(embeds, &["a red board"]).unwrap();
    assert!((0.0..=1.0).contains(&p[0]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn caption_fine_tuning_masks_the_prompt() {
    let dir = std::env::temp_dir().join(format!("blip-fit-caption-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tokenizer = tokenizer();
    let loader = loader(&dir, 32);
    let batch = loader.batches(0, 0).next().unwrap().unwrap();
    let train = blip_train::fit::to_train_batch(
        &batch,
        &tokenizer,
        &TextRecipe::caption(),
        &Device::flex(),
    )
    .unwrap();
    // [CLS] a picture of → 4 positions excluded: the first supervised target is the
    // caption's first word.
    assert_eq!(train.prompt_length, 4);
    let first = &train.text.input_ids[0];
    assert_eq!(
        tokenizer.decode(&first[1..4], true).unwrap(),
        "a picture of"
    );
    let labels: Vec<i64> = blip_train::lm_labels(&train.text, train.prompt_length, &Device::flex())
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap();
    let width = train.text.shape()[1];
    assert!(labels[..4].iter().all(|&l| l == -100));
    assert_eq!(labels[4], i64::from(first[4]));
    let pads = train.text.attention_mask[0]
        .iter()
        .filter(|&&m| m == 0)
        .count();
    assert!(labels[width - pads..width].iter().all(|&l| l == -100));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fine_tuning_keeps_the_momentum_encoders_and_queues_of_its_checkpoint() {
    // Trainer::new rebuilt them: the first steps contrasted against random queue vectors.
    let dir = std::env::temp_dir().join(format!("blip-keep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tokenizer = tokenizer();
    let loader = loader(&dir, 32);
    let device = Device::flex().autodiff();
    let config = pretrain_config(&tokenizer);
    let train = TrainConfig::new().with_warmup_steps(1);
    let mut options = FitOptions::new(TextRecipe::pretrain());
    options.max_steps = Some(3);
    let mut pretrained = Trainer::new(config.init(&Device::flex()), config, train, &device);
    fit(&mut pretrained, &loader, &tokenizer, &options).unwrap();
    let checkpoint = pretrained.save(&dir.join("checkpoints")).unwrap();
    let queue = |t: &Trainer| {
        let d = t.distillation.as_ref().unwrap();
        let values = |x: burn::tensor::Tensor<2>| x.into_data().try_to_vec::<f32>().unwrap();
        (
            values(d.image_queue.features.clone()),
            values(d.text_queue.features.clone()),
            d.image_queue.ptr,
        )
    };
    let saved = queue(&pretrained);
    assert_ne!(
        saved.2, 0,
        "three steps of 4 moved the pointer of an 8-wide queue"
    );

    // Retrieval fine-tuning from the checkpoint.
    let (model, mut config) = Trainer::load_model(&checkpoint, &Device::flex()).unwrap();
    config.weights = config.weights.with_lm(0.0);
    let fresh = Trainer::new(
        model.clone(),
        config.clone(),
        TrainConfig::finetune_retrieval(),
        &device,
    );
    assert_ne!(
        queue(&fresh).0,
        saved.0,
        "a new trainer starts from random queues"
    );
    let mut kept = Trainer::new(
        model.clone(),
        config.clone(),
        TrainConfig::finetune_retrieval(),
        &device,
    );
    assert!(kept.keep_distillation_of(&checkpoint).unwrap());
    assert_eq!(queue(&kept), saved);
    // It trains on from there.
    let mut options = FitOptions::new(TextRecipe::retrieval());
    options.max_steps = Some(1);
    fit(&mut kept, &loader, &tokenizer, &options).unwrap();

    // Queues of another size are refused, not silently replaced.
    let mut other = config.clone().with_queue_size(16);
    other.weights = config.weights.clone();
    let mut wrong = Trainer::new(model, other, TrainConfig::finetune_retrieval(), &device);
    let err = wrong.keep_distillation_of(&checkpoint).unwrap_err();
    assert!(err.to_string().contains("queue_size"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
