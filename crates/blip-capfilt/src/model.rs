//! [`BlipCapFilt`]: the paper's captioner and filter behind [`CapFiltModel`].
//!
//! Per image: the captioner (an image-grounded decoder fine-tuned with LM) writes
//! `num_captions` synthetic captions with the prompt `"a picture of "` — nucleus sampling
//! (top-p 0.9, repetition penalty 1.1, 5–20 tokens, as the original demo) by default, or beam
//! search for the paper's Table 2 comparison; the prompt is cut from the text as the original
//! `BLIP_Decoder.generate` does. The filter (an image-grounded encoder fine-tuned with
//! ITC + ITM) scores the web text and each synthetic caption with the ITM head, after the
//! original `pre_caption` normalisation, starting its input with `[ENC]` as the original
//! retrieval model was trained (`[CLS]` for transformers-trained filters).

use std::path::Path;

use blip_core::pre_caption;
use blip_text::{Captioner, FirstToken, GenerationConfig, Matcher, Sampling};
use burn::tensor::Device;
use image::RgbImage;

use crate::{CapFiltModel, Error, ImageVerdict, ModelError, ScoredText};

/// How synthetic captions are written.
///
/// ```
/// use blip_capfilt::{CapFiltSettings, CaptionStrategy};
///
/// let beam = CapFiltSettings { strategy: CaptionStrategy::Beam { num_beams: 3 }, ..CapFiltSettings::default() };
/// assert!(beam.validate().is_ok());
/// assert_eq!(beam.to_json()["strategy"], serde_json::json!({"beam": {"num_beams": 3}}));
/// let nucleus = CapFiltSettings { strategy: CaptionStrategy::Nucleus { top_p: 1.5 }, ..beam };
/// assert!(nucleus.validate().is_err()); // top_p must be in (0, 1]
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum CaptionStrategy {
    /// Nucleus sampling with this top-p (the paper: 0.9).
    Nucleus {
        /// Cumulative probability kept.
        top_p: f64,
    },
    /// Beam search with this many beams (the paper's Table 2 baseline: less diverse,
    /// fewer captions filtered).
    Beam {
        /// Number of beams.
        num_beams: usize,
    },
}

/// Settings of [`BlipCapFilt`].
///
/// ```
/// use blip_capfilt::{CapFiltSettings, CaptionStrategy, Error};
///
/// let settings = CapFiltSettings::default();
/// assert_eq!(settings.strategy, CaptionStrategy::Nucleus { top_p: 0.9 });
/// assert_eq!((settings.num_captions, settings.min_length, settings.max_length), (1, 5, 20));
/// assert_eq!(settings.to_json()["prompt"], "a picture of ");
/// let bad = CapFiltSettings { min_length: 30, ..settings };
/// assert!(matches!(bad.validate(), Err(Error::InvalidOption { option: "min_length", .. })));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CapFiltSettings {
    /// Sampling or beam search.
    pub strategy: CaptionStrategy,
    /// Synthetic captions per image (the paper: 1).
    pub num_captions: usize,
    /// Decoder prompt, cut from the synthetic texts.
    pub prompt: String,
    /// Minimum length in tokens, the prompt included (original: 5).
    pub min_length: usize,
    /// Maximum length in tokens, the prompt included (original demo: 20).
    pub max_length: usize,
    /// Repetition penalty (hard-coded 1.1 in the original sampling).
    pub repetition_penalty: f64,
    /// Seed of sampling; each image's generator is derived from it and the image's pixels,
    /// so a caption does not depend on the batch or shard the image lands in.
    pub seed: u64,
    /// First token of the filter's ITM input.
    pub first_token: FirstToken,
    /// Words kept by `pre_caption` before scoring (30).
    pub max_words: usize,
}

impl Default for CapFiltSettings {
    fn default() -> Self {
        Self {
            strategy: CaptionStrategy::Nucleus { top_p: 0.9 },
            num_captions: 1,
            prompt: "a picture of ".into(),
            min_length: 5,
            max_length: 20,
            repetition_penalty: 1.1,
            seed: 0,
            first_token: FirstToken::Enc,
            max_words: 30,
        }
    }
}

impl CapFiltSettings {
    /// Checks every setting that would make generation or scoring fail, or run something
    /// other than what `run.json` records: top-p in (0, 1] (nucleus sampling), at least
    /// one beam (beam search), at least one caption, a finite positive repetition
    /// penalty, `max_length >= 1`, `min_length <= max_length`, and at least one word kept
    /// for scoring. The one place these settings are checked: [`run`](crate::run) calls
    /// it (through [`CapFiltModel::validate`]) before writing anything, so a bad value
    /// fails at once with [`Error::InvalidOption`] and does not lock the output
    /// directory; a front end can call it before loading the models. What needs the
    /// captioner (prompt length, position limit) is checked by [`BlipCapFilt`]'s
    /// [`CapFiltModel::validate`].
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |option, reason: String| Err(Error::InvalidOption { option, reason });
        match self.strategy {
            CaptionStrategy::Nucleus { top_p } => {
                // `!(p > 0.0)` is true for NaN too.
                if !(top_p > 0.0 && top_p <= 1.0) {
                    return invalid("top_p", format!("{top_p} is not in (0, 1]"));
                }
            }
            CaptionStrategy::Beam { num_beams } => {
                if num_beams == 0 {
                    return invalid("num_beams", "must be at least 1".into());
                }
                // Raising the beams to the caption count would run other settings than
                // run.json records.
                if num_beams < self.num_captions {
                    return invalid(
                        "num_beams",
                        format!(
                            "{num_beams} beams cannot return num_captions = {} captions",
                            self.num_captions
                        ),
                    );
                }
            }
        }
        if self.num_captions == 0 {
            return invalid("num_captions", "must be at least 1".into());
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return invalid(
                "repetition_penalty",
                format!(
                    "{} is not a finite positive number (1.0: no penalty)",
                    self.repetition_penalty
                ),
            );
        }
        if self.max_length == 0 {
            return invalid("max_length", "must be at least 1".into());
        }
        if self.min_length > self.max_length {
            return invalid(
                "min_length",
                format!("{} exceeds max_length {}", self.min_length, self.max_length),
            );
        }
        if self.max_words == 0 {
            return invalid(
                "max_words",
                "must be at least 1 (0 would score empty texts)".into(),
            );
        }
        Ok(())
    }

    /// The generation config for one image whose sampling seed is `seed`.
    fn generation(&self, seed: u64) -> GenerationConfig {
        let base = GenerationConfig {
            max_length: self.max_length,
            min_length: self.min_length,
            num_return_sequences: self.num_captions,
            repetition_penalty: self.repetition_penalty,
            ..GenerationConfig::default()
        };
        match self.strategy {
            CaptionStrategy::Nucleus { top_p } => GenerationConfig {
                sampling: Some(Sampling {
                    top_p,
                    top_k: 0,
                    temperature: 1.0,
                    seed,
                }),
                ..base
            },
            CaptionStrategy::Beam { num_beams } => GenerationConfig { num_beams, ..base },
        }
    }

    /// The settings as recorded in a run's `run.json`.
    pub fn to_json(&self) -> serde_json::Value {
        let strategy = match self.strategy {
            CaptionStrategy::Nucleus { top_p } => serde_json::json!({"nucleus": {"top_p": top_p}}),
            CaptionStrategy::Beam { num_beams } => {
                serde_json::json!({"beam": {"num_beams": num_beams}})
            }
        };
        serde_json::json!({
            "strategy": strategy,
            "num_captions": self.num_captions,
            "prompt": self.prompt,
            "min_length": self.min_length,
            "max_length": self.max_length,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "first_token": format!("{:?}", self.first_token),
            "max_words": self.max_words,
        })
    }
}

/// FNV-1a of the pixels, mixed with the run seed: a per-image sampling seed.
fn image_seed(seed: u64, image: &RgbImage) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &b in image.as_raw() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ (u64::from(image.width()) << 32 | u64::from(image.height()))
}

/// Captioner + filter from two HF-layout model directories.
///
/// ```
/// use blip_capfilt::{BlipCapFilt, CapFiltModel, CapFiltSettings};
/// use burn::tensor::Device;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # use blip_text::{BlipConfig, CaptioningModel, RetrievalModel, TextConfig};
/// let device = Device::flex();
/// let dir = tempfile::tempdir()?;
/// let (captioner, filter) = (dir.path().join("captioner"), dir.path().join("filter"));
/// # let text = TextConfig::new(13, 32, 32, 64, 1, 2).with_sep_token_id(3).with_bos_token_id(11).with_enc_token_id(12);
/// # let config = BlipConfig::new(blip_vision::VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16), text);
/// # CaptioningModel::new(&config, &device).save_pretrained(&config, &captioner)?;
/// # RetrievalModel::new(&config, &device).save_pretrained(&config, &filter)?;
/// # for model in [&captioner, &filter] {
/// #     std::fs::write(model.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\npicture\nof\nred\nblue\ncircle\n")?;
/// # }
/// // `captioner` and `filter`: HF-layout directories (here tiny random models).
/// let names = ("captioner".to_string(), "filter".to_string());
/// let mut model = BlipCapFilt::load(&captioner, &filter, names, CapFiltSettings::default(), &device)?;
/// model.validate()?;
/// let verdicts = model.process(&[image::RgbImage::new(32, 32)], &[Some("a red circle".to_string())])?;
/// assert_eq!(verdicts[0].synthetic.len(), 1); // num_captions
/// let web = verdicts[0].web.as_ref().expect("the web text is scored");
/// assert!(web.text == "a red circle" && (0.0..=1.0).contains(&web.itm_probability));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BlipCapFilt {
    /// The captioner.
    pub captioner: Captioner,
    /// The filter.
    pub filter: Matcher,
    /// Generation and scoring settings.
    pub settings: CapFiltSettings,
    captioner_name: String,
    filter_name: String,
}

impl BlipCapFilt {
    /// Loads the captioner (`BlipForConditionalGeneration` layout) and the filter
    /// (`BlipForImageTextRetrieval` layout); `*_name` are what provenance records (e.g. the
    /// hub ids or paths given on the command line).
    pub fn load(
        captioner: &Path,
        filter: &Path,
        names: (String, String),
        settings: CapFiltSettings,
        device: &Device,
    ) -> blip_text::Result<Self> {
        let captioner_model = Captioner::from_pretrained(captioner, device)?;
        let mut filter_model = Matcher::from_pretrained(filter, device)?;
        filter_model.first_token = settings.first_token;
        Ok(Self {
            captioner: captioner_model,
            filter: filter_model,
            settings,
            captioner_name: names.0,
            filter_name: names.1,
        })
    }

    /// Synthetic captions of one image, prompt removed.
    fn captions(&self, image: &RgbImage) -> blip_text::Result<Vec<String>> {
        let generation = self
            .settings
            .generation(image_seed(self.settings.seed, image));
        let prompt = self.settings.prompt.trim_end();
        let captions =
            self.captioner
                .caption(std::slice::from_ref(image), &[prompt], &generation)?;
        Ok(captions
            .into_iter()
            .flatten()
            .map(|c| c.text_after(prompt).to_string())
            .collect())
    }
}

impl CapFiltModel for BlipCapFilt {
    /// [`CapFiltSettings::validate`], then what needs the captioner: the prompt (as
    /// generation uses it) must leave room for a token under `max_length`, and
    /// `max_length` must fit the decoder's position embeddings.
    fn image_processor(&self) -> Option<blip_vision::ImageProcessor> {
        // One size for both networks (the usual 384): resize once, as decoded.
        (self.captioner.processor == self.filter.processor)
            .then(|| self.captioner.processor.clone())
    }

    fn validate(&self) -> Result<(), Error> {
        self.settings.validate()?;
        let prompt = self.settings.prompt.trim_end();
        let tokens = self
            .captioner
            .tokenizer
            .decoder_prompt(prompt)
            .map_err(|e| Error::InvalidOption {
                option: "prompt",
                reason: format!("{prompt:?} cannot be tokenised: {e}"),
            })?;
        let max_length = self.settings.max_length;
        if tokens.len() >= max_length {
            return Err(Error::InvalidOption {
                option: "max_length",
                reason: format!(
                    "{max_length} leaves no room after the prompt {prompt:?} ({} tokens with \
                     [DEC]); it must be at least {}",
                    tokens.len(),
                    tokens.len() + 1
                ),
            });
        }
        let positions = self.captioner.model.text_decoder.bert.max_positions();
        if max_length > positions {
            return Err(Error::InvalidOption {
                option: "max_length",
                reason: format!("{max_length} exceeds the captioner's {positions} positions"),
            });
        }
        Ok(())
    }

    fn process(
        &mut self,
        images: &[RgbImage],
        web_texts: &[Option<String>],
    ) -> Result<Vec<ImageVerdict>, ModelError> {
        // Captions per image (each with its own seed); every text then scored in one ITM
        // batch against its image's tokens, computed once per image.
        let synthetic = images
            .iter()
            .map(|image| self.captions(image))
            .collect::<blip_text::Result<Vec<_>>>()?;
        let embeds = self.filter.encode_images(images)?;
        let mut rows = Vec::new();
        let mut texts = Vec::new();
        for (i, (web, captions)) in web_texts.iter().zip(&synthetic).enumerate() {
            for text in web.iter().chain(captions) {
                rows.push(i as i64);
                texts.push(pre_caption(text, self.settings.max_words));
            }
        }
        let probabilities = if texts.is_empty() {
            Vec::new()
        } else {
            let index = burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(rows, [texts.len()]),
                &embeds.device(),
            );
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.filter
                .itm_probabilities(embeds.select(0, index), &refs)?
        };
        let mut scores = probabilities.into_iter();
        let mut next = |text: &str| ScoredText {
            text: text.to_string(),
            itm_probability: scores.next().unwrap_or(0.0) as f32,
        };
        Ok(web_texts
            .iter()
            .zip(synthetic)
            .map(|(web, captions)| ImageVerdict {
                web: web.as_deref().map(&mut next),
                synthetic: captions.iter().map(|c| next(c)).collect(),
            })
            .collect())
    }

    fn captioner_name(&self) -> String {
        self.captioner_name.clone()
    }

    fn filter_name(&self) -> String {
        self.filter_name.clone()
    }
}
