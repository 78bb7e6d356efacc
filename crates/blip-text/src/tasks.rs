//! Task APIs over the three model families: images and text in, captions, match scores and
//! answers out. Each bundles a model with its tokenizer and image processor.

use std::path::Path;

use blip_vision::ImageProcessor;
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;

use crate::config::BlipConfig;
use crate::error::{Error, Result};
use crate::generate::{Generated, GenerationConfig};
use crate::hf::{LoadOptions, Pretrained};
use crate::loss::{lm_labels, lm_loss_per_sequence};
use crate::med::CrossInput;
use crate::models::{CaptioningModel, RetrievalModel, VqaModel, cosine_similarity};
use crate::tokenizer::{BlipTokenizer, Encoded, Padding, ids_tensor};

/// What every task holds around its model, from a loaded directory: the model, its
/// tokenizer (required), an image processor at the config's size, and the config.
fn task_parts<M>(
    loaded: Pretrained<M>,
    dir: &Path,
) -> Result<(M, BlipTokenizer, ImageProcessor, BlipConfig)> {
    let tokenizer = loaded.tokenizer.ok_or_else(|| Error::MissingFile {
        dir: dir.to_path_buf(),
        file: "tokenizer.json",
    })?;
    let processor = ImageProcessor::new(loaded.config.vision.image_size);
    Ok((loaded.model, tokenizer, processor, loaded.config))
}

/// A generated caption or answer.
///
/// ```
/// use blip_text::Caption;
///
/// let caption = Caption { text: "a picture of a dog on a mat".into(), token_ids: vec![], score: -0.4 };
/// assert_eq!(caption.text_after("A picture of"), "a dog on a mat");
/// // A prompt the text does not start with leaves it whole.
/// assert_eq!(caption.text_after("a photo of"), "a picture of a dog on a mat");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    /// Decoded text, special tokens dropped (the prompt included, as transformers decodes).
    pub text: String,
    /// The whole generated sequence, starting with `[DEC]`.
    pub token_ids: Vec<u32>,
    /// Length-normalised log-probability (see [`Generated::score`]).
    pub score: f64,
}

impl Caption {
    /// The text without the prompt it was generated from (the original `BLIP_Decoder`
    /// returns captions this way): `prompt` is matched as the uncased tokenizer decodes it.
    pub fn text_after(&self, prompt: &str) -> &str {
        let text = self.text.trim();
        let prompt = prompt.trim().to_lowercase();
        text.strip_prefix(prompt.as_str()).unwrap_or(text).trim()
    }
}

fn to_captions(
    tokenizer: &BlipTokenizer,
    generated: Vec<Vec<Generated>>,
) -> Result<Vec<Vec<Caption>>> {
    generated
        .into_iter()
        .map(|per_input| {
            per_input
                .into_iter()
                .map(|g| {
                    Ok(Caption {
                        text: tokenizer.decode(&g.token_ids, true)?,
                        token_ids: g.token_ids,
                        score: g.score,
                    })
                })
                .collect()
        })
        .collect()
}

/// Image captioning with a `BlipForConditionalGeneration` checkpoint.
///
/// ```
/// use blip_text::{BlipConfig, CaptioningModel, Captioner, GenerationConfig, TextConfig};
/// use blip_vision::VisionConfig;
/// use burn::tensor::Device;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("blip-text-doc-captioner-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # std::fs::write(dir.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\npicture\n")?;
/// # let text = TextConfig::new(13, 32, 32, 64, 1, 2).with_sep_token_id(3).with_bos_token_id(11).with_enc_token_id(12);
/// # let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// let device = Device::flex();
/// // A HF-layout directory: config.json, model.safetensors and the vocabulary (here a
/// // tiny random model and a 13-token vocab.txt).
/// CaptioningModel::new(&config, &device).save_pretrained(&config, &dir)?;
/// let captioner = Captioner::from_pretrained(&dir, &device)?;
/// let generation = GenerationConfig { max_length: 6, ..GenerationConfig::default() };
/// let captions = captioner.caption(&[image::RgbImage::new(40, 40)], &["a picture"], &generation)?;
/// let caption = &captions[0][0];
/// assert!(caption.token_ids.starts_with(&captioner.tokenizer.decoder_prompt("a picture")?));
/// assert!(caption.token_ids.len() <= 6 && caption.text.starts_with("a picture"));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Captioner {
    /// The model.
    pub model: CaptioningModel,
    /// Its tokenizer.
    pub tokenizer: BlipTokenizer,
    /// Its image processor (size from the config).
    pub processor: ImageProcessor,
    /// Its config.
    pub config: BlipConfig,
    device: Device,
}

impl Captioner {
    /// Loads a HF captioning directory (it must hold a tokenizer).
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(dir, device, LoadOptions::default())
    }

    /// [`Self::from_pretrained`] with [`LoadOptions`] (e.g. half precision).
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let (model, tokenizer, processor, config) = task_parts(
            CaptioningModel::from_pretrained_with(dir, device, options)?,
            dir,
        )?;
        Ok(Self {
            model,
            tokenizer,
            processor,
            config,
            device: device.clone(),
        })
    }

    /// Captions a batch of images, each with its own prompt (`""` for none, or e.g.
    /// `"a picture of"`): `num_return_sequences` captions per image.
    pub fn caption(
        &self,
        images: &[RgbImage],
        prompts: &[&str],
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<Caption>>> {
        if prompts.len() != images.len() {
            return Err(blip_core::Error::InputShape {
                what: "prompts",
                expected: format!("one per image ({})", images.len()),
                found: vec![prompts.len()],
            }
            .into());
        }
        let pixels = self.processor.preprocess(images, &self.device);
        self.caption_pixels(pixels, prompts, config)
    }

    /// Captions already-normalised pixels `[B, 3, H, W]`.
    pub fn caption_pixels(
        &self,
        pixel_values: Tensor<4>,
        prompts: &[&str],
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<Caption>>> {
        let prompts = prompts
            .iter()
            .map(|p| self.tokenizer.decoder_prompt(p))
            .collect::<Result<Vec<_>>>()?;
        let generated = self.model.generate(pixel_values, &prompts, config)?;
        to_captions(&self.tokenizer, generated)
    }
}

/// Which token opens the text for the image-grounded encoder (ITM, VQA questions).
///
/// ```
/// use blip_text::{FirstToken, ids_tensor};
/// use burn::tensor::{Device, Int, Tensor};
///
/// let ids = ids_tensor(&[vec![101, 7, 102]], &Device::flex());
/// let read = |t: Tensor<2, Int>| t.into_data().try_into_vec_as::<i64>().unwrap();
/// assert_eq!(read(FirstToken::Cls.apply(ids.clone(), 30523)), [101, 7, 102]);
/// assert_eq!(read(FirstToken::Enc.apply(ids, 30523)), [30523, 7, 102]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstToken {
    /// `[CLS]`, as transformers (and its converted checkpoints' demos) do: the default for HF
    /// checkpoints.
    Cls,
    /// `[ENC]`, as the original BLIP training and retrieval evaluation do.
    Enc,
}

impl FirstToken {
    /// Tokenized `ids` (`[CLS]` first) as the image-grounded encoder takes them: unchanged
    /// for [`Cls`](Self::Cls), column 0 replaced by `enc_token_id` for [`Enc`](Self::Enc).
    pub fn apply(self, ids: Tensor<2, Int>, enc_token_id: usize) -> Tensor<2, Int> {
        match self {
            Self::Cls => ids,
            Self::Enc => replace_first(ids, enc_token_id),
        }
    }
}

/// An item ranked by [`Matcher::rank_texts`] / [`Matcher::rank_images`].
///
/// ```
/// use blip_text::{BlipConfig, Matcher, RetrievalModel, TextConfig};
/// use blip_vision::VisionConfig;
/// use burn::tensor::Device;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("blip-text-doc-ranked-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # std::fs::write(dir.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\npicture\n")?;
/// # let text = TextConfig::new(13, 32, 32, 64, 1, 2).with_sep_token_id(3).with_bos_token_id(11).with_enc_token_id(12);
/// # let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// # let device = Device::flex();
/// # RetrievalModel::new(&config, &device).save_pretrained(&config, &dir)?;
/// // `dir`: a tiny random retrieval model with its vocabulary.
/// let matcher = Matcher::from_pretrained(&dir, &device)?;
/// let image = matcher.encode_images(&[image::RgbImage::new(32, 32)])?;
/// let texts = ["a red circle", "a blue square", "a picture"];
/// let ranked = matcher.rank_texts(image, &texts, 2)?;
/// assert_eq!(ranked.len(), 2);
/// assert_ne!(ranked[0].index, ranked[1].index);
/// for r in &ranked {
///     assert!(r.index < texts.len() && (0.0..=1.0).contains(&r.itm_probability));
///     assert!(r.cosine.abs() <= 1.0 + 1e-5);
/// }
/// assert!(ranked[0].score >= ranked[1].score); // best first
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// Index into the candidates.
    pub index: usize,
    /// ITM match logit + ITC cosine, the original retrieval evaluation's score.
    pub score: f64,
    /// ITC cosine similarity.
    pub cosine: f64,
    /// ITM match probability.
    pub itm_probability: f64,
}

/// Image–text matching and retrieval with a `BlipForImageTextRetrieval` checkpoint.
///
/// ```
/// use blip_text::{BlipConfig, Matcher, RetrievalModel, TextConfig};
/// use blip_vision::VisionConfig;
/// use burn::tensor::Device;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("blip-text-doc-matcher-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # std::fs::write(dir.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\npicture\n")?;
/// # let text = TextConfig::new(13, 32, 32, 64, 1, 2).with_sep_token_id(3).with_bos_token_id(11).with_enc_token_id(12);
/// # let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// let device = Device::flex();
/// // A HF-layout directory (here a tiny random model and a 13-token vocab.txt).
/// RetrievalModel::new(&config, &device).save_pretrained(&config, &dir)?;
/// let matcher = Matcher::from_pretrained(&dir, &device)?;
/// let images = matcher.encode_images(&[image::RgbImage::new(32, 32), image::RgbImage::new(48, 48)])?;
/// let probabilities = matcher.itm_probabilities(images.clone(), &["a red circle", "a blue square"])?;
/// assert!(probabilities.iter().all(|p| (0.0..=1.0).contains(p)));
/// let ranked = matcher.rank_images(images, "a red circle", 2)?;
/// assert!(ranked.len() == 2 && ranked[0].score >= ranked[1].score);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Matcher {
    /// The model.
    pub model: RetrievalModel,
    /// Its tokenizer.
    pub tokenizer: BlipTokenizer,
    /// Its image processor.
    pub processor: ImageProcessor,
    /// Its config.
    pub config: BlipConfig,
    /// First token of the image-grounded encoder's input.
    pub first_token: FirstToken,
    /// Texts are truncated to this many tokens (35, as BLIP's retrieval).
    pub max_length: usize,
    device: Device,
}

impl Matcher {
    /// Loads a HF retrieval directory; the ITM input starts with `[CLS]` as transformers'.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(dir, device, LoadOptions::default())
    }

    /// [`Self::from_pretrained`] with [`LoadOptions`] (e.g. half precision).
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let (model, tokenizer, processor, config) = task_parts(
            RetrievalModel::from_pretrained_with(dir, device, options)?,
            dir,
        )?;
        Ok(Self {
            model,
            tokenizer,
            processor,
            config,
            first_token: FirstToken::Cls,
            max_length: 35,
            device: device.clone(),
        })
    }

    /// Image tokens `[B, T, D]` for a batch of images.
    pub fn encode_images(&self, images: &[RgbImage]) -> Result<Tensor<3>> {
        let pixels = self.processor.preprocess(images, &self.device);
        Ok(self.model.vision_model.forward(pixels)?)
    }

    fn tokens(&self, texts: &[&str]) -> Result<(Tensor<2, Int>, Tensor<2, Int>)> {
        let encoded =
            self.tokenizer
                .encode_batch(texts, Some(self.max_length), Padding::Longest)?;
        Ok(encoded.to_tensors(&self.device))
    }

    /// ITM logits `[N, 2]` (host) for text `i` with image `i`, first token per `first_token`.
    fn itm_logits(&self, image_embeds: Tensor<3>, texts: &[&str]) -> Result<Vec<f32>> {
        let (ids, mask) = self.tokens(texts)?;
        let ids = self.first_token.apply(ids, self.config.text.enc_token_id);
        host(
            "ITM logits",
            self.model.itm_logits(image_embeds, ids, Some(mask))?,
        )
    }

    /// ITM match probabilities for pairs: text `i` with image `i` of `image_embeds`.
    pub fn itm_probabilities(&self, image_embeds: Tensor<3>, texts: &[&str]) -> Result<Vec<f64>> {
        Ok(self
            .itm_logits(image_embeds, texts)?
            .chunks(2)
            .map(|l| match_probability(l[0], l[1]))
            .collect())
    }

    /// Normalised ITC text features `[N, 256]`.
    pub fn text_features(&self, texts: &[&str]) -> Result<Tensor<2>> {
        let (ids, mask) = self.tokens(texts)?;
        self.model.text_features(ids, Some(mask))
    }

    /// Ranks `texts` for one image (`[1, T, D]` tokens): ITC cosine for all, then the ITM
    /// head re-scores the `k` best, as the original retrieval evaluation does. Returns the
    /// re-ranked top `k`, best first.
    pub fn rank_texts(
        &self,
        image_embeds: Tensor<3>,
        texts: &[&str],
        k: usize,
    ) -> Result<Vec<Ranked>> {
        let cosine = host(
            "ITC similarities",
            cosine_similarity(
                self.model.image_features(image_embeds.clone()),
                self.text_features(texts)?,
            ),
        )?;
        let top = top_k(&cosine, k);
        let chosen: Vec<&str> = top.iter().map(|&i| texts[i]).collect();
        let [_, t, d] = image_embeds.dims();
        let logits = self.itm_logits(image_embeds.expand([chosen.len(), t, d]), &chosen)?;
        Ok(rerank(&top, &cosine, &logits))
    }

    /// Ranks images (tokens `[N, T, D]`) for one text, as [`rank_texts`](Self::rank_texts).
    pub fn rank_images(
        &self,
        image_embeds: Tensor<3>,
        text: &str,
        k: usize,
    ) -> Result<Vec<Ranked>> {
        let cosine = host(
            "ITC similarities",
            cosine_similarity(
                self.model.image_features(image_embeds.clone()),
                self.text_features(&[text])?,
            ),
        )?;
        let top = top_k(&cosine, k);
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(
                top.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [top.len()],
            ),
            &self.device,
        );
        let logits = self.itm_logits(image_embeds.select(0, index), &vec![text; top.len()])?;
        Ok(rerank(&top, &cosine, &logits))
    }
}

/// softmax([no, yes])[1].
fn match_probability(no: f32, yes: f32) -> f64 {
    1.0 / (1.0 + ((no - yes) as f64).exp())
}

/// Candidates `top` (indices into `cosine`) re-scored by their ITM logits (`[k, 2]`, host).
fn rerank(top: &[usize], cosine: &[f32], logits: &[f32]) -> Vec<Ranked> {
    let mut ranked: Vec<Ranked> = top
        .iter()
        .enumerate()
        .map(|(j, &i)| Ranked {
            index: i,
            score: logits[2 * j + 1] as f64 + cosine[i] as f64,
            cosine: cosine[i] as f64,
            itm_probability: match_probability(logits[2 * j], logits[2 * j + 1]),
        })
        .collect();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
    ranked
}

/// Indices of the `k` largest values, largest first.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order.truncate(k.max(1));
    order
}

/// A model output read back to the host; NaN or ±inf is an [`Error::NonFinite`] naming
/// `what`, never a `null` probability or a silently arbitrary ranking.
fn host<const D: usize>(what: &'static str, t: Tensor<D>) -> Result<Vec<f32>> {
    let values = t
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| Error::Generation(format!("reading {what} back: {e:?}")))?;
    crate::generate::check_finite(what, 0, &values)?;
    Ok(values)
}

/// `ids` with column 0 replaced by `token` (`[ENC]` or `[DEC]` over `[CLS]`).
pub(crate) fn replace_first(ids: Tensor<2, Int>, token: usize) -> Tensor<2, Int> {
    let [b, l] = ids.dims();
    let device = ids.device();
    let first = Tensor::<2, Int>::full([b, 1], token as i64, &device);
    if l == 1 {
        return first;
    }
    Tensor::cat(vec![first, ids.narrow(1, 1, l - 1)], 1)
}

/// An answer ranked by [`QuestionAnswerer::rank_answers`].
///
/// ```
/// use blip_text::{BlipConfig, QuestionAnswerer, TextConfig, VqaModel};
/// use blip_vision::VisionConfig;
/// use burn::tensor::Device;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("blip-text-doc-rankedanswer-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # std::fs::write(dir.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\npicture\n")?;
/// # let text = TextConfig::new(13, 32, 32, 64, 1, 2).with_sep_token_id(3).with_bos_token_id(11).with_enc_token_id(12);
/// # let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// # let device = Device::flex();
/// # VqaModel::new(&config, &device).save_pretrained(&config, &dir)?;
/// // `dir`: a tiny random VQA model with its vocabulary.
/// let vqa = QuestionAnswerer::from_pretrained(&dir, &device)?;
/// let answers = ["red", "blue", "square"];
/// let ranked = vqa.rank_answers(&image::RgbImage::new(32, 32), "is it red", &answers, 2, 0.1)?;
/// assert_eq!(ranked.len(), 2); // the 2 likeliest first tokens, rescored
/// assert!(ranked.iter().all(|r| r.index < answers.len() && r.score <= 0.0));
/// assert!(ranked[0].score >= ranked[1].score);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RankedAnswer {
    /// Index into the candidate answers.
    pub index: usize,
    /// −(label-smoothed LM loss summed over the answer's tokens): the original rank score.
    pub score: f64,
}

/// Visual question answering with a `BlipForQuestionAnswering` checkpoint.
///
/// ```
/// use blip_text::{BlipConfig, GenerationConfig, QuestionAnswerer, TextConfig, VqaModel};
/// use blip_vision::VisionConfig;
/// use burn::tensor::Device;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("blip-text-doc-vqa-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # std::fs::write(dir.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\npicture\n")?;
/// # let text = TextConfig::new(13, 32, 32, 64, 1, 2).with_sep_token_id(3).with_bos_token_id(11).with_enc_token_id(12);
/// # let config = BlipConfig::new(VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// let device = Device::flex();
/// // A HF-layout directory (here a tiny random model and a 13-token vocab.txt).
/// VqaModel::new(&config, &device).save_pretrained(&config, &dir)?;
/// let vqa = QuestionAnswerer::from_pretrained(&dir, &device)?;
/// let image = image::RgbImage::new(32, 32);
/// let generation = GenerationConfig { max_length: 4, ..GenerationConfig::default() };
/// let answers = vqa.answer(std::slice::from_ref(&image), &["is it red"], &generation)?;
/// assert_eq!(answers[0][0].token_ids[0], vqa.tokenizer.dec_token_id);
/// assert!(answers[0][0].token_ids.len() <= 4);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct QuestionAnswerer {
    /// The model.
    pub model: VqaModel,
    /// Its tokenizer.
    pub tokenizer: BlipTokenizer,
    /// Its image processor.
    pub processor: ImageProcessor,
    /// Its config.
    pub config: BlipConfig,
    /// First token of the question: `[CLS]` (transformers, default) or `[ENC]` (original).
    pub first_token: FirstToken,
    device: Device,
}

impl QuestionAnswerer {
    /// Loads a HF VQA directory.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(dir, device, LoadOptions::default())
    }

    /// [`Self::from_pretrained`] with [`LoadOptions`] (e.g. half precision).
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let (model, tokenizer, processor, config) =
            task_parts(VqaModel::from_pretrained_with(dir, device, options)?, dir)?;
        Ok(Self {
            model,
            tokenizer,
            processor,
            config,
            first_token: FirstToken::Cls,
            device: device.clone(),
        })
    }

    fn questions(&self, questions: &[&str]) -> Result<(Tensor<2, Int>, Tensor<2, Int>)> {
        let encoded = self
            .tokenizer
            .encode_batch(questions, Some(35), Padding::Longest)?;
        let (ids, mask) = encoded.to_tensors(&self.device);
        Ok((
            self.first_token.apply(ids, self.config.text.enc_token_id),
            mask,
        ))
    }

    /// Answers one question per image by generation.
    pub fn answer(
        &self,
        images: &[RgbImage],
        questions: &[&str],
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<Caption>>> {
        if questions.len() != images.len() {
            return Err(blip_core::Error::InputShape {
                what: "questions",
                expected: format!("one per image ({})", images.len()),
                found: vec![questions.len()],
            }
            .into());
        }
        let pixels = self.processor.preprocess(images, &self.device);
        let (ids, mask) = self.questions(questions)?;
        let generated = self.model.generate(
            pixels,
            ids,
            Some(mask),
            config,
            self.config.text.bos_token_id as u32,
        )?;
        to_captions(&self.tokenizer, generated)
    }

    /// Ranks candidate answers for one image and question, as the original rank mode: the
    /// `k` candidates whose first token is likeliest after `[DEC]` are scored by their whole
    /// sequence (label-smoothed LM loss, `label_smoothing` 0.1 in the original), best first.
    pub fn rank_answers(
        &self,
        image: &RgbImage,
        question: &str,
        answers: &[&str],
        k: usize,
        label_smoothing: f64,
    ) -> Result<Vec<RankedAnswer>> {
        let pixels = self
            .processor
            .preprocess(std::slice::from_ref(image), &self.device);
        self.rank_answers_pixels(pixels, question, answers, k, label_smoothing)
    }

    /// As [`rank_answers`](Self::rank_answers), for one already-normalised image
    /// `[1, 3, H, W]`.
    pub fn rank_answers_pixels(
        &self,
        pixels: Tensor<4>,
        question: &str,
        answers: &[&str],
        k: usize,
        label_smoothing: f64,
    ) -> Result<Vec<RankedAnswer>> {
        if answers.is_empty() {
            return Ok(vec![]);
        }
        // An empty candidate scores only [SEP], which can beat every real answer.
        if let Some((i, blank)) = answers
            .iter()
            .enumerate()
            .find(|(_, a)| a.trim().is_empty())
        {
            return Err(Error::Encode {
                text: blank.to_string(),
                message: format!("answer candidate {i} is empty: every candidate needs a word"),
            });
        }
        let (q_ids, q_mask) = self.questions(&[question])?;
        let image_embeds = self.model.vision_model.forward(pixels)?;
        let states = self
            .model
            .encode_question(image_embeds, q_ids, Some(q_mask.clone()))?;
        let dec = self.config.text.bos_token_id as u32;
        // First-token probabilities after [DEC].
        let first = self.model.answer_logits(
            CrossInput {
                states: states.clone(),
                mask: Some(q_mask.clone()),
            },
            ids_tensor(&[vec![dec]], &self.device),
            None,
        )?;
        let first = host(
            "first-token probabilities",
            burn::tensor::activation::softmax(
                blip_core::precision::to_f32(first.reshape([1, -1])),
                1,
            ),
        )?;
        let encoded = self
            .tokenizer
            .encode_batch(answers, None, Padding::Longest)?;
        // A candidate the tokenizer reduces to [CLS] [SEP] (control characters only) is as
        // empty as "".
        if let Some(i) = encoded
            .attention_mask
            .iter()
            .position(|m| m.iter().filter(|&&k| k == 1).count() <= 2)
        {
            return Err(Error::Encode {
                text: answers[i].to_string(),
                message: format!("answer candidate {i} has no token: every candidate needs a word"),
            });
        }
        let first_probs: Vec<f32> = encoded
            .input_ids
            .iter()
            .map(|ids| first[ids.get(1).copied().unwrap_or(0) as usize])
            .collect();
        let top = top_k(&first_probs, k);
        // Whole-answer scores for the top k.
        let rows: Vec<Vec<u32>> = top.iter().map(|&i| encoded.input_ids[i].clone()).collect();
        let rows = crate::tokenizer::with_first_token(&rows, dec);
        let masks: Vec<Vec<u32>> = top
            .iter()
            .map(|&i| encoded.attention_mask[i].clone())
            .collect();
        let n = rows.len();
        let [_, lq, d] = states.dims();
        let logits = self.model.answer_logits(
            CrossInput {
                states: states.expand([n, lq, d]),
                mask: Some(q_mask.expand([n, lq])),
            },
            ids_tensor(&rows, &self.device),
            Some(ids_tensor(&masks, &self.device)),
        )?;
        let answers = Encoded {
            input_ids: rows,
            attention_mask: masks,
        };
        let labels = lm_labels(&answers, 0, &self.device);
        let losses = host(
            "answer losses",
            lm_loss_per_sequence(logits, labels, label_smoothing),
        )?;
        let mut ranked: Vec<RankedAnswer> = top
            .iter()
            .zip(losses)
            .map(|(&index, loss)| RankedAnswer {
                index,
                score: -(loss as f64),
            })
            .collect();
        ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(ranked)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Int, Tensor};

    #[test]
    fn replace_first_swaps_only_column_zero() {
        let ids = Tensor::<2, Int>::from_ints([[101, 5, 6], [101, 7, 0]], &Device::flex());
        let out = super::replace_first(ids, 119)
            .into_data()
            .try_into_vec_as::<i64>()
            .unwrap();
        assert_eq!(out, vec![119, 5, 6, 119, 7, 0]);
    }
}
