//! Text generation with the image-grounded decoder: greedy, beam search and nucleus
//! sampling, one engine for captioning and VQA.
//!
//! Decoding keeps a self-attention key/value cache (each step feeds one token per row) and
//! computes the cross-attention keys/values of each image once, before the first step; beam
//! rows share their image's. Rows may carry prompts of different lengths: each row's tokens
//! sit at its own positions, so a batch gives every row what it would get alone.
//!
//! Lengths follow transformers: `max_length` and `min_length` count the whole sequence,
//! `[DEC]` and the prompt included. Beam search reproduces transformers 5's (its
//! `early_stopping=False` stopping rule, `length_penalty`, `num_return_sequences`); greedy
//! decoding equals its greedy; sampling draws from a seeded generator of ours, so a run is
//! reproducible (but draws differ from PyTorch's).

use burn::tensor::{Device, Int, Tensor, TensorData};

use blip_core::SplitMix64;

use crate::error::{Error, Result};
use crate::med::{CrossInput, KeyValue, TextAttention, TextModel, attention_bias};

/// Nucleus / top-k sampling settings.
///
/// ```
/// use blip_text::{GenerationConfig, Sampling};
///
/// let sampling = Sampling { top_p: 0.9, top_k: 50, temperature: 1.0, seed: 7 };
/// assert_eq!(GenerationConfig::blip_nucleus(7).sampling, Some(sampling.clone()));
/// let config = GenerationConfig { sampling: Some(sampling.clone()), ..GenerationConfig::default() };
/// assert!(config.validate().is_ok());
/// // A temperature of 0 cannot divide the logits.
/// let frozen = Sampling { temperature: 0.0, ..sampling };
/// assert!(GenerationConfig { sampling: Some(frozen), ..config }.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0: no limit).
    pub top_k: usize,
    /// Divide logits by this before filtering (1.0: unchanged).
    pub temperature: f64,
    /// Seed of the generator: the same seed and inputs give the same text.
    pub seed: u64,
}

/// How to decode. Lengths count the whole sequence (`[DEC]`, prompt and new tokens).
///
/// ```
/// use blip_text::GenerationConfig;
///
/// let greedy = GenerationConfig::default();
/// assert_eq!((greedy.max_length, greedy.num_beams, greedy.sampling), (20, 1, None));
/// let beam = GenerationConfig::blip_beam();
/// assert_eq!((beam.num_beams, beam.min_length), (3, 5));
/// assert!(beam.validate().is_ok());
/// // Three beams cannot return five sequences.
/// let bad = GenerationConfig { num_return_sequences: 5, ..beam };
/// assert!(bad.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Stop a sequence at this many tokens (transformers' default: 20).
    pub max_length: usize,
    /// `[SEP]` is forbidden while a sequence is shorter than this.
    pub min_length: usize,
    /// 1: greedy or sampling; more: beam search.
    pub num_beams: usize,
    /// Beam score = Σ log p / (new tokens)^length_penalty.
    pub length_penalty: f64,
    /// Sequences returned per input (≤ `num_beams` for beam search).
    pub num_return_sequences: usize,
    /// CTRL repetition penalty on every token already in the sequence (1.0: off).
    pub repetition_penalty: f64,
    /// `Some`: sample instead of taking the most likely token.
    pub sampling: Option<Sampling>,
    /// Refuse to start when the decoding state (logits of every row, key/value caches) is
    /// estimated above this many bytes ([`DEFAULT_MEMORY_LIMIT`]): a mistyped `num_beams`
    /// is an error, not an abort.
    pub max_memory_bytes: u64,
}

/// The default [`GenerationConfig::max_memory_bytes`]: 16 GiB.
pub const DEFAULT_MEMORY_LIMIT: u64 = 16 << 30;

impl Default for GenerationConfig {
    /// transformers' defaults: greedy, `max_length` 20.
    fn default() -> Self {
        Self {
            max_length: 20,
            min_length: 0,
            num_beams: 1,
            length_penalty: 1.0,
            num_return_sequences: 1,
            repetition_penalty: 1.0,
            sampling: None,
            max_memory_bytes: DEFAULT_MEMORY_LIMIT,
        }
    }
}

impl GenerationConfig {
    /// The original BLIP captioner's beam search: 3 beams, 20 tokens at most, at least 5.
    pub fn blip_beam() -> Self {
        Self {
            num_beams: 3,
            min_length: 5,
            ..Self::default()
        }
    }

    /// The original BLIP nucleus sampling (as CapFilt uses it): top-p 0.9, repetition
    /// penalty 1.1, top-k 50 (transformers' default then), at most 20 tokens, at least 5.
    pub fn blip_nucleus(seed: u64) -> Self {
        Self {
            min_length: 5,
            repetition_penalty: 1.1,
            sampling: Some(Sampling {
                top_p: 0.9,
                top_k: 50,
                temperature: 1.0,
                seed,
            }),
            ..Self::default()
        }
    }

    /// Checks the settings on their own (beams, counts, penalties, sampling ranges), as
    /// [`generate`] does first: call it once up front to refuse bad options before any image
    /// is read.
    pub fn validate(&self) -> Result<()> {
        let fail = |message: String| Err(Error::Generation(message));
        if self.num_beams == 0 || self.num_return_sequences == 0 {
            return fail("num_beams and num_return_sequences must be at least 1".into());
        }
        if self.num_beams > 1 && self.sampling.is_some() {
            return fail("beam sampling is not supported: use num_beams = 1 with sampling".into());
        }
        if self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return fail(format!(
                "num_return_sequences ({}) cannot exceed num_beams ({})",
                self.num_return_sequences, self.num_beams
            ));
        }
        if self.num_beams == 1 && self.sampling.is_none() && self.num_return_sequences > 1 {
            return fail("greedy decoding returns one sequence: sample or use beams".into());
        }
        if self.max_length == 0 {
            return fail("max_length must be at least 1".into());
        }
        let positive = |x: f64| x > 0.0 && x.is_finite(); // false for NaN too
        if !positive(self.repetition_penalty) {
            return fail("repetition_penalty must be a finite positive number".into());
        }
        if !self.length_penalty.is_finite() {
            return fail("length_penalty must be finite".into());
        }
        if let Some(s) = &self.sampling
            && !(positive(s.top_p) && s.top_p <= 1.0 && positive(s.temperature))
        {
            return fail("top_p must be in (0, 1] and temperature a finite positive number".into());
        }
        Ok(())
    }

    /// Estimated bytes of the decoding state for `inputs` inputs: per row, its logits on
    /// the device and the host (and beam search's candidate index), and the self- and
    /// cross-attention key/value caches of every layer.
    pub fn memory_estimate(
        &self,
        inputs: usize,
        vocab: usize,
        layers: usize,
        hidden: usize,
        cross_len: usize,
    ) -> u64 {
        let rows =
            (inputs as u64).saturating_mul(self.num_beams.max(self.num_return_sequences) as u64);
        let logits = (vocab as u64).saturating_mul(3 * 4 + 8);
        let caches = (layers as u64 * 2 * 4)
            .saturating_mul(hidden as u64)
            .saturating_mul((self.max_length as u64).saturating_add(cross_len as u64));
        rows.saturating_mul(logits.saturating_add(caches))
    }
}

/// One generated sequence.
///
/// ```
/// use blip_text::{CrossInput, GenerationConfig, generate};
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// let decoder = text.init_lm_head_model(&device);
/// let image = CrossInput { states: Tensor::zeros([1, 5, 32], &device), mask: None };
/// let config = GenerationConfig { max_length: 6, ..GenerationConfig::default() };
/// let out = generate(&decoder, image, &[vec![3]], &config)?;
/// let generated = &out[0][0];
/// assert_eq!(generated.token_ids[0], 3); // the prompt ([DEC]) comes first
/// assert!(generated.token_ids.len() <= 6);
/// assert!(generated.score <= 0.0); // a mean log-probability
/// # Ok::<(), blip_text::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The whole sequence as transformers returns it: `[DEC]`, prompt, new tokens, and the
    /// final `[SEP]` when the sequence ended by itself (no padding).
    pub token_ids: Vec<u32>,
    /// Σ log p(new token) / (new tokens)^length_penalty, under the processed distribution
    /// (repetition penalty, min length) — transformers' beam score, for every strategy.
    pub score: f64,
}

/// Special ids the decoding loop needs.
///
/// ```
/// use blip_text::Decoder;
/// use burn::tensor::Device;
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let decoder = text.init_lm_head_model(&Device::flex());
/// let special = decoder.special_tokens();
/// assert_eq!(special.eos, text.sep_token_id as u32); // a sequence ends at [SEP]
/// assert_eq!(special.pad, text.pad_token_id as u32);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SpecialTokens {
    /// `[SEP]`: ends a sequence.
    pub eos: u32,
    /// `[PAD]`: fills finished rows.
    pub pad: u32,
}

/// A causal text decoder with cross-attention, as [`generate`] drives it: the
/// [`TextModel`] whose embeddings and layers it runs, optionally with its own self-attention
/// blocks in place of the layers' (BLIP's pre-training decoder shares every other weight
/// with the encoder), and an LM head.
///
/// The captioning model's decoder ([`crate::TextLmHeadModel`]) implements it, and so does
/// `blip_train::BlipPretrain`, which captions with its shared weights as they are.
///
/// ```
/// use blip_text::Decoder;
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// let model = text.init_lm_head_model(&device);
/// let decoder: &dyn Decoder = &model;
/// assert!(decoder.self_attention().is_none()); // runs the layers' own blocks
/// assert_eq!(decoder.text_model().vocab_size(), 64);
/// let logits = decoder.logits(Tensor::zeros([1, 2, 32], &device));
/// assert_eq!(logits.dims(), [1, 2, 64]);
/// ```
pub trait Decoder: Sync {
    /// The text transformer: embeddings, layers (feed-forward and cross-attention).
    fn text_model(&self) -> &TextModel;
    /// One self-attention block per layer, used in place of the layers' own; `None` (the
    /// default) runs the layers as they are.
    fn self_attention(&self) -> Option<&[TextAttention]> {
        None
    }
    /// LM-head logits `[B, L, vocab]` for decoder states `[B, L, D]`.
    fn logits(&self, hidden: Tensor<3>) -> Tensor<3>;
    /// `[SEP]` (ends a sequence) and `[PAD]` (fills finished rows).
    fn special_tokens(&self) -> SpecialTokens;
}

/// Decoder state: the self-attention cache and the per-row bookkeeping.
struct State<'a> {
    model: &'a dyn Decoder,
    cache: Vec<KeyValue>,
    /// `[N, T]`: which cached keys a row may attend to (prompt padding is 0).
    key_mask: Tensor<2, Int>,
    /// Cross-attention keys/values per layer, one row per decoding row.
    cross: Vec<KeyValue>,
    cross_bias: Option<Tensor<4>>,
    /// Position of each row's next token.
    positions: Vec<usize>,
}

fn int_tensor<const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Next-token logits `[rows, 1, vocab]` read back to the host, one vector per row. A NaN or
/// infinite logit (damaged weights, a negative `layer_norm_eps`) is an error: decoding on it
/// would emit `[PAD]`s or an arbitrary token with exit status 0.
fn host_rows(t: Tensor<3>, rows: usize) -> Result<Vec<Vec<f32>>> {
    let logits = t
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| Error::Generation(format!("reading the logits back: {e:?}")))?;
    let vocab = logits.len() / rows.max(1);
    let mut out = Vec::with_capacity(rows);
    for (row, chunk) in logits.chunks(vocab.max(1)).enumerate() {
        check_finite("decoder logits", row, chunk)?;
        out.push(chunk.to_vec());
    }
    Ok(out)
}

/// A [`Error::NonFinite`] naming the row and the first bad position, if `values` has one.
pub(crate) fn check_finite(what: &'static str, row: usize, values: &[f32]) -> Result<()> {
    let Some(first) = values.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    Err(Error::NonFinite {
        what,
        detail: format!(
            "row {row}: {} at position {first}, {bad} of {} values non-finite",
            values[first],
            values.len()
        ),
    })
}

impl<'a> State<'a> {
    /// Runs the (right-padded) prompts; returns each row's next-token logits.
    fn prefill(
        model: &'a dyn Decoder,
        prompts: &[&[u32]],
        cross: CrossInput,
        row_source: &[usize],
    ) -> Result<(Self, Vec<Vec<f32>>)> {
        let n = prompts.len();
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(n * width);
        let mut mask = Vec::with_capacity(n * width);
        for p in prompts {
            ids.extend(p.iter().map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(0, width - p.len()));
            mask.extend((0..width).map(|i| i64::from(i < p.len())));
        }
        let device = cross.states.device();
        let ids = int_tensor(ids, [n, width], &device);
        let key_mask = int_tensor(mask, [n, width], &device);
        let positions = Tensor::<1, Int>::arange(0..width as i64, &device).reshape([1, width]);

        // Cross keys/values: once per image, then one row per decoding row (copied only
        // when decoding rows repeat or reorder the images).
        let [images, lk, _] = cross.states.dims();
        let rows = Tensor::<1, Int>::from_data(
            TensorData::new(
                row_source.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [n],
            ),
            &device,
        );
        let kvs = model.text_model().cross_key_values(cross.states);
        let cross_kv = if row_source.iter().copied().eq(0..images) {
            kvs
        } else {
            kvs.into_iter()
                .map(|kv| KeyValue {
                    key: kv.key.select(0, rows.clone()),
                    value: kv.value.select(0, rows.clone()),
                })
                .collect()
        };
        let cross_bias = attention_bias(
            cross.mask.map(|m| m.select(0, rows.clone())),
            n,
            1,
            lk,
            false,
            &device,
            model.text_model().dtype(),
        );

        let mut state = Self {
            model,
            cache: Vec::new(),
            key_mask: key_mask.clone(),
            cross: cross_kv,
            cross_bias,
            positions: prompts.iter().map(|p| p.len()).collect(),
        };
        let dtype = model.text_model().dtype();
        let bias = attention_bias(Some(key_mask), n, width, width, true, &device, dtype);
        let x = model.text_model().embeddings.forward_at(ids, positions);
        let hidden = state.run(x, bias, width);
        // Each row's last prompt token.
        let d = hidden.dims()[2];
        let last: Vec<i64> = prompts.iter().map(|p| p.len() as i64 - 1).collect();
        let index = int_tensor::<3>(last, [n, 1, 1], &device).repeat_dim(2, d);
        let logits = host_rows(model.logits(hidden.gather(1, index)), n)?;
        Ok((state, logits))
    }

    fn run(&mut self, x: Tensor<3>, self_bias: Option<Tensor<4>>, queries: usize) -> Tensor<3> {
        let cross_bias = self.cross_bias.clone().map(|b| {
            let [n, h, _, lk] = b.dims();
            b.expand([n, h, queries, lk])
        });
        self.model.text_model().layers_with(
            x,
            self_bias,
            &mut self.cache,
            Some((self.cross.as_slice(), cross_bias)),
            self.model.self_attention(),
        )
    }

    /// Feeds one token per row; returns the next-token logits per row.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let n = tokens.len();
        let device = self.key_mask.device();
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [n, 1]),
            &device,
        );
        let positions = Tensor::<2, Int>::from_data(
            TensorData::new(
                self.positions.iter().map(|&p| p as i64).collect::<Vec<_>>(),
                [n, 1],
            ),
            &device,
        );
        self.positions.iter_mut().for_each(|p| *p += 1);
        self.key_mask = Tensor::cat(
            vec![self.key_mask.clone(), Tensor::ones([n, 1], &device)],
            1,
        );
        let keys = self.key_mask.dims()[1];
        let dtype = self.model.text_model().dtype();
        let bias = attention_bias(
            Some(self.key_mask.clone()),
            n,
            1,
            keys,
            false,
            &device,
            dtype,
        );
        let x = self
            .model
            .text_model()
            .embeddings
            .forward_at(ids, positions);
        let hidden = self.run(x, bias, 1);
        host_rows(self.model.logits(hidden), n)
    }

    /// Reorders rows (beam search): row `i` becomes old row `order[i]`.
    fn reorder(&mut self, order: &[usize]) {
        let device = self.key_mask.device();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(
                order.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [order.len()],
            ),
            &device,
        );
        for kv in &mut self.cache {
            kv.key = kv.key.clone().select(0, index.clone());
            kv.value = kv.value.clone().select(0, index.clone());
        }
        self.key_mask = self.key_mask.clone().select(0, index);
        self.positions = order.iter().map(|&i| self.positions[i]).collect();
    }
}

/// transformers' logits processors, on one row: repetition penalty on the tokens already in
/// the sequence, then `[SEP]` forbidden below `min_length`.
fn process(scores: &mut [f32], sequence: &[u32], config: &GenerationConfig, eos: u32) {
    if config.repetition_penalty != 1.0 {
        let penalty = config.repetition_penalty as f32;
        let mut seen = sequence.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            let s = &mut scores[t as usize];
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
    if sequence.len() < config.min_length {
        scores[eos as usize] = f32::NEG_INFINITY;
    }
}

fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = scores.iter().map(|&s| ((s - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32;
    scores.iter().map(|&s| s - max - log_sum).collect()
}

fn argmax(scores: &[f32]) -> usize {
    // First maximum, as torch.argmax.
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best
}

/// Temperature, top-k, then top-p (transformers' warper order); draws one token.
///
/// The scaling is done in f64: a small temperature (1e-40) turns every f32 logit into ±inf.
/// Where even f64 overflows, the distribution is the temperature → 0 limit: the most likely
/// token.
fn sample(scores: &[f32], s: &Sampling, rng: &mut SplitMix64) -> Result<usize> {
    let scaled: Vec<f64> = scores.iter().map(|&x| x as f64 / s.temperature).collect();
    if scaled.contains(&f64::INFINITY) {
        return Ok(argmax(scores));
    }
    let mut order: Vec<usize> = (0..scaled.len())
        .filter(|&i| scaled[i].is_finite())
        .collect();
    if order.is_empty() {
        return Err(Error::Generation(
            "no token can be sampled: every candidate's score is -inf or NaN".into(),
        ));
    }
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]));
    if s.top_k > 0 && order.len() > s.top_k {
        let kth = scaled[order[s.top_k - 1]];
        order.retain(|&i| scaled[i] >= kth); // ties with the k-th stay, as transformers
    }
    let probs = {
        let max = scaled[order[0]];
        let weights: Vec<f64> = order.iter().map(|&i| (scaled[i] - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        weights.into_iter().map(|w| w / sum).collect::<Vec<_>>()
    };
    // Smallest prefix whose mass reaches top_p (at least one token).
    let mut keep = order.len();
    if s.top_p < 1.0 {
        let mut mass = 0.0;
        for (k, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= s.top_p {
                keep = k + 1;
                break;
            }
        }
    }
    Ok(order[rng.weighted(&probs[..keep])])
}

/// Generates from right-padded prompts (one per input; each starts with `[DEC]`), attending to
/// `cross` (`[B, L, D]`: image tokens, or question states for VQA). Returns
/// `num_return_sequences` sequences per input, best first for beam search.
///
/// ```
/// use blip_text::{CrossInput, GenerationConfig, generate};
/// use burn::tensor::{Device, Tensor};
///
/// # let mut text = blip_text::TextConfig::base(32);
/// # (text.vocab_size, text.hidden_size, text.intermediate_size) = (64, 32, 64);
/// # (text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings) = (1, 2, 32);
/// # (text.pad_token_id, text.cls_token_id, text.sep_token_id, text.bos_token_id, text.enc_token_id) = (0, 1, 2, 3, 4);
/// // `text`: a tiny TextConfig (vocabulary 64, width 32, one layer, [SEP] = 2, [DEC] = 3).
/// let device = Device::flex();
/// let decoder = text.init_lm_head_model(&device);
/// // Two images of 5 tokens; prompts of different lengths, each starting with [DEC].
/// let images = CrossInput { states: Tensor::zeros([2, 5, 32], &device), mask: None };
/// let prompts = [vec![3], vec![3, 10, 11]];
/// let config = GenerationConfig { max_length: 8, num_beams: 2, num_return_sequences: 2, ..GenerationConfig::default() };
/// let out = generate(&decoder, images, &prompts, &config)?;
/// assert!(out.len() == 2 && out.iter().all(|sequences| sequences.len() == 2));
/// assert!(out[1][0].token_ids.starts_with(&[3, 10, 11]));
/// assert!(out[0][0].score >= out[0][1].score); // best first
/// # Ok::<(), blip_text::Error>(())
/// ```
pub fn generate(
    model: &dyn Decoder,
    cross: CrossInput,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Vec<Generated>>> {
    config.validate()?;
    let special = model.special_tokens();
    let text = model.text_model();
    let batch = cross.states.dims()[0];
    if prompts.len() != batch {
        return Err(blip_core::Error::InputShape {
            what: "prompts",
            expected: format!("one prompt per input ({batch})"),
            found: vec![prompts.len()],
        }
        .into());
    }
    let vocab = text.vocab_size();
    for (row, p) in prompts.iter().enumerate() {
        if p.is_empty() || p.len() >= config.max_length {
            return Err(Error::Generation(format!(
                "prompt {row} has {} tokens; it needs at least [DEC] and fewer than max_length = {}",
                p.len(),
                config.max_length
            )));
        }
        if config.max_length > text.max_positions() {
            return Err(Error::TooLong {
                what: "max_length",
                length: config.max_length,
                max: text.max_positions(),
            });
        }
        if let Some((column, &id)) = p.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(Error::TokenId {
                what: "prompt",
                id: id as i64,
                row,
                column,
                vocab_size: vocab,
            });
        }
    }
    let [_, cross_len, _] = cross.states.dims();
    let estimate = config.memory_estimate(
        batch,
        vocab,
        text.encoder.layer.len(),
        text.hidden_size(),
        cross_len,
    );
    if estimate > config.max_memory_bytes {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(Error::Generation(format!(
            "{batch} inputs × {} beams/sequences would need about {:.1} GiB for logits over {vocab} \
             tokens and key/value caches of {} + {cross_len} positions, over the limit of {:.1} GiB \
             (GenerationConfig::max_memory_bytes): use fewer beams or a smaller batch",
            config.num_beams.max(config.num_return_sequences),
            gib(estimate),
            config.max_length,
            gib(config.max_memory_bytes),
        )));
    }
    let device = cross.states.device();
    blip_core::ops::on_thread_pool(&device, || {
        if config.num_beams > 1 {
            beam_search(model, cross, prompts, config, special)
        } else {
            greedy_or_sample(model, cross, prompts, config, special)
        }
    })
}

fn greedy_or_sample(
    model: &dyn Decoder,
    cross: CrossInput,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    special: SpecialTokens,
) -> Result<Vec<Vec<Generated>>> {
    let k = config.num_return_sequences;
    let source: Vec<usize> = (0..prompts.len() * k).map(|r| r / k).collect();
    let rows: Vec<&[u32]> = source.iter().map(|&b| prompts[b].as_slice()).collect();
    let (mut state, mut logits) = State::prefill(model, &rows, cross, &source)?;
    let mut sequences: Vec<Vec<u32>> = rows.iter().map(|p| p.to_vec()).collect();
    let mut sum_log_probs = vec![0f64; rows.len()];
    let mut done: Vec<bool> = vec![false; rows.len()];
    let mut rngs: Vec<SplitMix64> = config
        .sampling
        .iter()
        .flat_map(|s| {
            (0..rows.len()).map(move |r| {
                SplitMix64::new(s.seed ^ (r as u64).wrapping_mul(0xA24B_AED4_963E_E407))
            })
        })
        .collect();
    loop {
        let mut next = vec![special.pad; rows.len()];
        for r in 0..rows.len() {
            if done[r] {
                continue;
            }
            let scores = &mut logits[r];
            process(scores, &sequences[r], config, special.eos);
            let token = match &config.sampling {
                Some(s) => sample(scores, s, &mut rngs[r])?,
                None => argmax(scores),
            };
            sum_log_probs[r] += log_softmax(scores)[token] as f64;
            next[r] = token as u32;
            sequences[r].push(token as u32);
            done[r] = token as u32 == special.eos || sequences[r].len() >= config.max_length;
        }
        if done.iter().all(|&d| d) {
            break;
        }
        logits = state.step(&next)?;
    }
    Ok(collect(sequences, sum_log_probs, &rows, config, k))
}

fn collect(
    sequences: Vec<Vec<u32>>,
    sum_log_probs: Vec<f64>,
    prompts: &[&[u32]],
    config: &GenerationConfig,
    k: usize,
) -> Vec<Vec<Generated>> {
    let mut out: Vec<Vec<Generated>> = Vec::new();
    for (r, (token_ids, sum)) in sequences.into_iter().zip(sum_log_probs).enumerate() {
        let new = (token_ids.len() - prompts[r].len()).max(1) as f64;
        if r % k == 0 {
            out.push(Vec::with_capacity(k));
        }
        out.last_mut().expect("pushed above").push(Generated {
            token_ids,
            score: sum / new.powf(config.length_penalty),
        });
    }
    out
}

/// One running beam.
#[derive(Clone)]
struct Beam {
    tokens: Vec<u32>,
    score: f32,
}

/// transformers 5's vectorised beam search, per input: keep the 2·beams best continuations,
/// finish the ones among the first `beams` that end (EOS or max length) with score
/// Σ log p / (new tokens)^length_penalty, continue the best `beams` unfinished ones, stop
/// when no running beam can beat the worst of `beams` finished ones (`early_stopping=False`).
fn beam_search(
    model: &dyn Decoder,
    cross: CrossInput,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    special: SpecialTokens,
) -> Result<Vec<Vec<Generated>>> {
    const DEAD: f32 = -1.0e9;
    let beams = config.num_beams;
    let batch = prompts.len();
    let source: Vec<usize> = (0..batch * beams).map(|r| r / beams).collect();
    let rows: Vec<&[u32]> = source.iter().map(|&b| prompts[b].as_slice()).collect();
    let (mut state, mut logits) = State::prefill(model, &rows, cross, &source)?;
    let mut running: Vec<Vec<Beam>> = prompts
        .iter()
        .map(|p| {
            (0..beams)
                .map(|i| Beam {
                    tokens: p.clone(),
                    score: if i == 0 { 0.0 } else { DEAD },
                })
                .collect()
        })
        .collect();
    let mut finished: Vec<Vec<Beam>> = vec![Vec::new(); batch];
    let mut open = vec![true; batch];
    let lp = config.length_penalty;
    loop {
        let mut any_continuation = false;
        let mut order = Vec::with_capacity(batch * beams);
        let mut next_tokens = Vec::with_capacity(batch * beams);
        for b in 0..batch {
            // Candidates (beam, token, accumulated score) over every beam of this input.
            let mut candidates: Vec<(usize, usize, f32)> = Vec::with_capacity(beams * 2 * beams);
            for (i, beam) in running[b].iter().enumerate() {
                let scores = &mut logits[b * beams + i];
                let mut log_probs = log_softmax(scores);
                process(&mut log_probs, &beam.tokens, config, special.eos);
                // Only the best 2·beams of each beam can make the overall top 2·beams.
                let mut best: Vec<usize> = (0..log_probs.len()).collect();
                let keep = (2 * beams).min(best.len());
                best.select_nth_unstable_by(keep - 1, |&x, &y| {
                    log_probs[y].total_cmp(&log_probs[x])
                });
                for &t in &best[..keep] {
                    candidates.push((i, t, beam.score + log_probs[t]));
                }
            }
            // torch.topk order: score descending, lower flat index first on ties.
            candidates.sort_by(|x, y| y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
            candidates.truncate(2 * beams);
            let cur_len = running[b][0].tokens.len();
            let prompt_len = prompts[b].len();
            let hits = |&(_, t, _): &(usize, usize, f32)| {
                t as u32 == special.eos || cur_len + 1 >= config.max_length
            };
            if candidates.iter().any(|c| !hits(c)) {
                any_continuation = true;
            }
            // Finished hypotheses: candidates among the first `beams` that end here.
            if open[b] {
                for c in candidates[..beams].iter().filter(|c| hits(c)) {
                    let mut tokens = running[b][c.0].tokens.clone();
                    tokens.push(c.1 as u32);
                    let norm = ((cur_len + 1 - prompt_len) as f64).powf(lp) as f32;
                    finished[b].push(Beam {
                        tokens,
                        score: c.2 / norm,
                    });
                }
                finished[b].sort_by(|x, y| y.score.total_cmp(&x.score));
                finished[b].truncate(beams);
            }
            // Continue with the best `beams` candidates that did not end.
            let mut continuing: Vec<(usize, usize, f32)> = candidates
                .iter()
                .map(|c| if hits(c) { (c.0, c.1, c.2 + DEAD) } else { *c })
                .collect();
            continuing.sort_by(|x, y| y.2.total_cmp(&x.2));
            continuing.truncate(beams);
            let old = std::mem::take(&mut running[b]);
            for (i, t, score) in continuing {
                let mut tokens = old[i].tokens.clone();
                tokens.push(t as u32);
                running[b].push(Beam { tokens, score });
                order.push(b * beams + i);
                next_tokens.push(t as u32);
            }
            // early_stopping=False: stop once the best running beam, at its current length,
            // cannot beat the worst kept hypothesis.
            if open[b] && finished[b].len() == beams {
                let best_running =
                    running[b][0].score / ((cur_len + 1 - prompt_len) as f64).powf(lp) as f32;
                let worst = finished[b].last().expect("beams > 0").score;
                open[b] = best_running > worst;
            }
        }
        if !open.iter().any(|&o| o) || !any_continuation {
            break;
        }
        state.reorder(&order);
        logits = state.step(&next_tokens)?;
    }
    Ok(finished
        .into_iter()
        .map(|hyps| {
            hyps.into_iter()
                .take(config.num_return_sequences)
                .map(|h| Generated {
                    token_ids: h.tokens,
                    score: h.score as f64,
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nucleus(temperature: f64) -> Sampling {
        Sampling {
            top_p: 0.9,
            top_k: 0,
            temperature,
            seed: 7,
        }
    }

    #[test]
    fn a_tiny_temperature_samples_the_most_likely_token() {
        // 1e-40 overflowed every f32 logit to ±inf and left no candidate (a panic).
        let scores = [0.5f32, 2.0, -1.0, 1.9, f32::NEG_INFINITY];
        for temperature in [1e-40, 1e-300, 5e-324] {
            for seed in 0..20 {
                let mut rng = SplitMix64::new(seed);
                assert_eq!(sample(&scores, &nucleus(temperature), &mut rng).unwrap(), 1);
            }
        }
    }

    #[test]
    fn no_candidate_is_an_error_not_a_panic() {
        let scores = [f32::NEG_INFINITY; 4];
        let err = sample(&scores, &nucleus(1.0), &mut SplitMix64::new(1)).unwrap_err();
        assert!(matches!(err, Error::Generation(_)), "{err}");
        let scores = [f32::NAN; 4];
        assert!(sample(&scores, &nucleus(1.0), &mut SplitMix64::new(1)).is_err());
    }

    #[test]
    fn sampling_still_follows_the_distribution() {
        // Two tokens with probabilities 0.25 / 0.75 (top_p 1): the draws follow them.
        let scores = [0.0f32, 3f32.ln()];
        let s = Sampling {
            top_p: 1.0,
            ..nucleus(1.0)
        };
        let mut rng = SplitMix64::new(3);
        let ones = (0..4000)
            .filter(|_| sample(&scores, &s, &mut rng).unwrap() == 1)
            .count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn non_finite_values_are_located() {
        assert!(check_finite("x", 0, &[0.0, 1.0, -3.0]).is_ok());
        let err = check_finite("decoder logits", 2, &[0.0, f32::NAN, f32::INFINITY])
            .unwrap_err()
            .to_string();
        assert!(err.contains("decoder logits"), "{err}");
        assert!(err.contains("row 2: NaN at position 1, 2 of 3"), "{err}");
    }

    #[test]
    fn memory_estimate_grows_with_beams_and_refuses_absurd_ones() {
        let config = |num_beams| GenerationConfig {
            num_beams,
            ..GenerationConfig::default()
        };
        // BLIP-base: 3 beams for one image is small, 100000 beams is ~60 GB.
        let small = config(3).memory_estimate(1, 30524, 12, 768, 577);
        assert!(small < 1 << 30, "{small}");
        let huge = config(100_000).memory_estimate(1, 30524, 12, 768, 577);
        assert!(huge > DEFAULT_MEMORY_LIMIT, "{huge}");
        assert_eq!(huge / small, 100_000 / 3);
        assert_eq!(
            config(usize::MAX).memory_estimate(usize::MAX, 30524, 12, 768, 577),
            u64::MAX
        );
    }
}
