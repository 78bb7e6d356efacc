//! One forward pass of BLIP's objectives on a batch (the original `BLIP_Pretrain.forward`,
//! and with image ids `BLIP_Retrieval.forward`), combined by [`crate::LossWeights`].

use blip_core::SplitMix64;
use blip_core::precision::to_f32;
use blip_text::Encoded;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::distributed::{Collective, SingleProcess, values_of};
use crate::error::{Result, TrainError};
use crate::losses::{hard_negative_weights, itc_loss, itm_loss, sample_negatives};
use crate::model::{BlipPretrain, MomentumEncoders, PretrainConfig};
use crate::momentum::{FeatureQueue, clamp_temperature, momentum_update};
use blip_text::lm_labels;

/// What ITC distillation keeps across steps: the momentum encoders and the feature queues
/// (plus, in retrieval fine-tuning, the image ids of the queued features).
///
/// ```
/// use blip_train::{Distillation, PretrainConfig};
/// use burn::tensor::Device;
///
/// let device = Device::flex();
/// let config = PretrainConfig::tiny(30524).with_queue_size(8);
/// let model = config.init(&device);
/// let state = Distillation::new(&model, &config, &device);
/// // Queues of `queue_size` random unit vectors of the ITC width (32 in the tiny config).
/// assert_eq!(state.image_queue.features.dims(), [32, 8]);
/// assert_eq!((state.text_queue.len(), state.text_queue.ptr), (8, 0));
/// assert_eq!(state.idx_queue, vec![-100; 8]); // no image ids queued yet
/// ```
#[derive(Debug, Clone)]
pub struct Distillation {
    /// The EMA encoders.
    pub momentum: MomentumEncoders,
    /// Momentum image features `[256, K]`.
    pub image_queue: FeatureQueue,
    /// Momentum text features `[256, K]`.
    pub text_queue: FeatureQueue,
    /// Image id of each queued pair (`idx_queue`, initialised to −100), kept when batches
    /// carry image ids.
    pub idx_queue: Vec<i64>,
}

impl Distillation {
    /// Momentum copies of `model` and fresh queues of random unit vectors.
    pub fn new(model: &BlipPretrain, config: &PretrainConfig, device: &Device) -> Self {
        let dim = config.blip.image_text_hidden_size;
        Self {
            momentum: model.momentum_copy(),
            image_queue: FeatureQueue::new(dim, config.queue_size, device),
            text_queue: FeatureQueue::new(dim, config.queue_size, device),
            idx_queue: vec![-100; config.queue_size],
        }
    }
}

/// A training batch: images, their captions tokenized with `[CLS]` first (padded), and
/// optionally the image id of each pair (retrieval fine-tuning: captions of one image are
/// not each other's negatives).
///
/// ```
/// use blip_text::Encoded;
/// use blip_train::{LossWeights, PretrainConfig, SplitMix64, TrainBatch, compute_losses};
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let config = PretrainConfig::tiny(30524) // BERT's ids: [CLS] 101, [SEP] 102, [PAD] 0
///     .with_weights(LossWeights::new().with_itc(0.0).with_itm(0.0)); // LM only
/// let s = config.blip.vision.image_size;
/// let batch = TrainBatch {
///     pixel_values: Tensor::zeros([2, 3, s, s], &device),
///     text: Encoded {
///         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
///         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
///     },
///     image_ids: None,
///     prompt_length: 0,
/// };
/// let model = config.init(&device);
/// let mut rng = SplitMix64::new(0);
/// assert_eq!(compute_losses(&model, None, &config, &batch, 0.0, &mut rng)?.terms.len(), 1);
/// // Image ids, when given, are one per pair.
/// let bad = TrainBatch { image_ids: Some(vec![7]), ..batch.clone() };
/// assert!(compute_losses(&model, None, &config, &bad, 0.0, &mut rng).is_err());
/// # Ok::<(), blip_train::TrainError>(())
/// ```
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// `[B, 3, S, S]` normalised pixels.
    pub pixel_values: Tensor<4>,
    /// Captions, one per image.
    pub text: Encoded,
    /// Image ids, one per pair.
    pub image_ids: Option<Vec<i64>>,
    /// Leading decoder positions (`[DEC]` + prompt) excluded from the LM loss: 0 in
    /// pre-training, 4 for `"a picture of "` in captioning fine-tuning.
    pub prompt_length: usize,
}

/// The objectives' values for one batch.
///
/// ```
/// use blip_train::{LossWeights, PretrainConfig, SplitMix64, compute_losses};
///
/// let weights = LossWeights::new().with_itc(0.0).with_itm(0.0).with_lm(2.0);
/// let config = PretrainConfig::tiny(30524).with_weights(weights);
/// # use blip_text::Encoded;
/// # use blip_train::TrainBatch;
/// # use burn::tensor::{Device, Tensor};
/// # let device = Device::flex();
/// # let s = config.blip.vision.image_size;
/// # let batch = TrainBatch {
/// #     pixel_values: Tensor::zeros([2, 3, s, s], &device),
/// #     text: Encoded {
/// #         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
/// #         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
/// #     },
/// #     image_ids: None,
/// #     prompt_length: 0,
/// # };
/// // `batch`: two images and their captions (see `TrainBatch`).
/// let model = config.init(&device);
/// let losses = compute_losses(&model, None, &config, &batch, 0.0, &mut SplitMix64::new(0))?;
/// let values = losses.values();
/// assert_eq!(values.len(), 1);
/// assert_eq!(values[0].0, "lm"); // the only objective with a weight
/// // The total is the weighted sum, 2·L_lm.
/// let total: f32 = losses.total.into_scalar();
/// assert!((f64::from(total) - 2.0 * values[0].1).abs() < 1e-4);
/// # Ok::<(), blip_train::TrainError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Losses {
    /// `(name, loss)` of each computed objective (`"itc"`, `"itm"`, `"lm"`, then those of
    /// extra [`Objective`]s), each `[1]`.
    pub terms: Vec<(String, Tensor<1>)>,
    /// `Σ weight·loss`, what is differentiated. Differentiate it with
    /// [`Self::gradients`]: in retrieval across ranks (`negative_all_rank`) part of the
    /// image encoder's gradient comes from the other ranks' losses.
    pub total: Tensor<1>,
    /// The image tokens other ranks drew negatives from, when they did.
    shared_images: Option<SharedImages>,
}

/// The original's `all_gather_with_grad` of the image tokens: the losses of this step
/// saw this rank's tokens as the leaf `leaf` (cut from the ViT's graph at `tracked`) and
/// the other ranks' as the leaves `others` (rank order, this rank's slot `None`).
#[derive(Debug, Clone)]
struct SharedImages {
    tracked: Tensor<3>,
    leaf: Tensor<3>,
    others: Vec<Option<Tensor<3>>>,
}

impl Losses {
    /// `(name, value)` of each computed objective, read back to the host.
    pub fn values(&self) -> Vec<(String, f64)> {
        self.terms
            .iter()
            .map(|(name, t)| (name.clone(), t.clone().into_scalar::<f32>() as f64))
            .collect()
    }

    /// The gradients of `scale · total` for `model`'s parameters (not yet averaged over
    /// ranks). Where other ranks drew hard negatives from this rank's images, their
    /// gradients with respect to those image tokens are summed here through `collective`
    /// and carried back through the ViT, as the original's `GatherLayer` does; every
    /// rank must then call this at the same point.
    ///
    /// ```
    /// use blip_train::{Distillation, PretrainConfig, SingleProcess, SplitMix64, compute_losses};
    /// # use blip_text::Encoded;
    /// # use blip_train::TrainBatch;
    /// # use burn::tensor::{Device, Tensor};
    ///
    /// let device = Device::flex().autodiff();
    /// let config = PretrainConfig::tiny(30524);
    /// let model = config.init(&device);
    /// let mut state = Distillation::new(&model, &config, &device);
    /// # let s = config.blip.vision.image_size;
    /// # let batch = TrainBatch {
    /// #     pixel_values: Tensor::zeros([2, 3, s, s], &device),
    /// #     text: Encoded {
    /// #         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
    /// #         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
    /// #     },
    /// #     image_ids: None,
    /// #     prompt_length: 0,
    /// # };
    /// // `batch`: two images and their captions (see `TrainBatch`).
    /// let mut rng = SplitMix64::new(0);
    /// let losses = compute_losses(&model, Some(&mut state), &config, &batch, 0.4, &mut rng)?;
    /// // Half the gradient, as for one of two accumulated batches.
    /// let grads = losses.gradients(&model, 0.5, &SingleProcess)?;
    /// assert!(grads.get::<1>(model.temp.id).is_some());
    /// # Ok::<(), blip_train::TrainError>(())
    /// ```
    pub fn gradients(
        self,
        model: &BlipPretrain,
        scale: f64,
        collective: &dyn Collective,
    ) -> Result<burn::optim::GradientsParams> {
        use burn::optim::GradientsParams;
        let grads = (self.total * scale).backward();
        let Some(shared) = self.shared_images else {
            return Ok(GradientsParams::from_grads(grads, model));
        };
        let dims = shared.leaf.dims();
        let per_rank: usize = dims.iter().product();
        let world = collective.world_size();
        let mut sent = vec![0f32; per_rank * world];
        for (rank, other) in shared.others.iter().enumerate() {
            if let Some(g) = other.as_ref().and_then(|t| t.grad(&grads)) {
                let values = g
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .map_err(|e| TrainError::Distributed(format!("image token gradient: {e:?}")))?;
                sent[rank * per_rank..(rank + 1) * per_rank].copy_from_slice(&values);
            }
        }
        collective.all_reduce_sum(&mut sent)?;
        let rank = collective.rank();
        let plain = shared.leaf.device().inner();
        let received = Tensor::<3>::from_data(
            TensorData::new(sent[rank * per_rank..(rank + 1) * per_rank].to_vec(), dims),
            (&plain, shared.leaf.dtype()),
        );
        let own = match shared.leaf.grad(&grads) {
            Some(g) => g + received,
            None => received,
        };
        let params = GradientsParams::from_grads(grads, model);
        let device = shared.tracked.device();
        let upstream = Tensor::<3>::from_data(own.into_data(), &device);
        let encoder = (shared.tracked * upstream).sum().backward();
        let encoder = GradientsParams::from_grads(encoder, model);
        let mut accumulator = burn::optim::GradientsAccumulator::<BlipPretrain>::new();
        accumulator.accumulate(model, params);
        accumulator.accumulate(model, encoder);
        Ok(accumulator.grads())
    }
}

/// What one step computed, handed to every extra [`Objective`] after BLIP's three. The
/// tensors are the step's own (on the training device, in its autodiff graph): a term
/// built from them trains what produced them.
///
/// ```
/// use blip_train::{
///     Objective, Result, SingleProcess, SplitMix64, StepOutputs, Term, compute_losses_with,
/// };
/// # use blip_train::{LossWeights, PretrainConfig};
///
/// /// Checks what an LM-only step hands over.
/// struct Inspect;
///
/// impl Objective for Inspect {
///     fn name(&self) -> &str {
///         "inspect"
///     }
///     fn terms(&mut self, step: &StepOutputs<'_>) -> Result<Vec<Term>> {
///         assert!(step.itm_logits.is_none() && step.image_features.is_none()); // ITC/ITM off
///         let states = step.decoder_states.as_ref().expect("LM ran");
///         assert_eq!(states.dims(), [2, 4, 64]); // [B, L, D]
///         Ok(vec![])
///     }
/// }
/// # let config = PretrainConfig::tiny(30524)
/// #     .with_weights(LossWeights::new().with_itc(0.0).with_itm(0.0)); // LM only
/// # use blip_text::Encoded;
/// # use blip_train::TrainBatch;
/// # use burn::tensor::{Device, Tensor};
/// # let device = Device::flex();
/// # let s = config.blip.vision.image_size;
/// # let batch = TrainBatch {
/// #     pixel_values: Tensor::zeros([2, 3, s, s], &device),
/// #     text: Encoded {
/// #         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
/// #         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
/// #     },
/// #     image_ids: None,
/// #     prompt_length: 0,
/// # };
/// # let model = config.init(&device);
/// // `config` (LM only), `model` and `batch` as in the `TrainBatch` example.
/// let mut extra: Vec<Box<dyn Objective>> = vec![Box::new(Inspect)];
/// let mut rng = SplitMix64::new(0);
/// compute_losses_with(&model, None, &config, &batch, 0.0, &mut rng, &mut extra, &SingleProcess)?;
/// # Ok::<(), blip_train::TrainError>(())
/// ```
#[derive(Debug)]
pub struct StepOutputs<'a> {
    /// The model, as the step ran it.
    pub model: &'a BlipPretrain,
    /// The batch (this rank's share, in data-parallel training).
    pub batch: &'a TrainBatch,
    /// The ranks training together ([`SingleProcess`] for one): an objective that needs
    /// every rank's values (a larger pool of negatives) gathers them here.
    pub collective: &'a dyn Collective,
    /// ViT tokens `[B, 1 + N, D]`.
    pub image_embeds: Tensor<3>,
    /// Online ITC features `v` `[B, 256]` (L2-normalised), when ITC or ITM ran.
    pub image_features: Option<Tensor<2>>,
    /// Online ITC features `t` `[B, 256]` (L2-normalised), when ITC or ITM ran.
    pub text_features: Option<Tensor<2>>,
    /// The learnt temperature `τ` `[1]`, when ITC or ITM ran.
    pub temperature: Option<Tensor<1>>,
    /// ITM logits `[3B, 2]` of (text, image), (text, negative image), (negative text,
    /// image), when ITM ran.
    pub itm_logits: Option<Tensor<2>>,
    /// Decoder states `[B, L, D]` on `[DEC]` + caption, before the LM head, when LM ran
    /// (`model.text_decoder.lm_head.forward(states, word_embeddings)` gives the logits).
    pub decoder_states: Option<Tensor<3>>,
}

/// One named, weighted loss term: `weight · loss` joins the step's total, and `name`
/// (`loss_<name>` in the metrics) its reports.
///
/// ```
/// use blip_train::{
///     Objective, Result, SingleProcess, SplitMix64, StepOutputs, Term, compute_losses_with,
/// };
/// # use blip_train::{LossWeights, PretrainConfig};
///
/// /// Reports its term under a name BLIP's LM already has.
/// struct Clash;
///
/// impl Objective for Clash {
///     fn name(&self) -> &str {
///         "clash"
///     }
///     fn terms(&mut self, step: &StepOutputs<'_>) -> Result<Vec<Term>> {
///         let loss = step.image_embeds.clone().powi_scalar(2).mean();
///         Ok(vec![Term { name: "lm".into(), weight: 0.1, loss }])
///     }
/// }
/// # let config = PretrainConfig::tiny(30524)
/// #     .with_weights(LossWeights::new().with_itc(0.0).with_itm(0.0)); // LM only
/// # use blip_text::Encoded;
/// # use blip_train::TrainBatch;
/// # use burn::tensor::{Device, Tensor};
/// # let device = Device::flex();
/// # let s = config.blip.vision.image_size;
/// # let batch = TrainBatch {
/// #     pixel_values: Tensor::zeros([2, 3, s, s], &device),
/// #     text: Encoded {
/// #         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
/// #         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
/// #     },
/// #     image_ids: None,
/// #     prompt_length: 0,
/// # };
/// # let model = config.init(&device);
/// // `config` (LM only), `model` and `batch` as in the `TrainBatch` example.
/// let mut extra: Vec<Box<dyn Objective>> = vec![Box::new(Clash)];
/// let mut rng = SplitMix64::new(0);
/// let one = SingleProcess;
/// let err = compute_losses_with(&model, None, &config, &batch, 0.0, &mut rng, &mut extra, &one);
/// assert!(err.unwrap_err().to_string().contains("already taken"));
/// ```
#[derive(Debug, Clone)]
pub struct Term {
    /// Metrics name; must not repeat BLIP's (`itc`, `itm`, `lm`) or another term's.
    pub name: String,
    /// Weight in the total.
    pub weight: f64,
    /// The loss, `[1]`.
    pub loss: Tensor<1>,
}

/// A loss added to BLIP's ITC + ITM + LM from outside the crate ([`crate::Trainer::add_objective`]):
/// each step it sees what the step computed ([`StepOutputs`]) and returns weighted terms.
///
/// ```
/// use blip_train::{Objective, Result, StepOutputs, Term};
///
/// /// Alignment (Wang & Isola 2020): mean ‖v_i − t_i‖² of matching pairs' ITC features.
/// struct Alignment(f64);
///
/// impl Objective for Alignment {
///     fn name(&self) -> &str {
///         "align"
///     }
///     fn terms(&mut self, step: &StepOutputs<'_>) -> Result<Vec<Term>> {
///         let (Some(v), Some(t)) = (&step.image_features, &step.text_features) else {
///             return Ok(vec![]); // ITC and ITM are off: nothing to align
///         };
///         let loss = (v.clone() - t.clone()).powi_scalar(2).sum_dim(1).mean();
///         Ok(vec![Term { name: "align".into(), weight: self.0, loss }])
///     }
/// }
/// ```
pub trait Objective: Send {
    /// The objective's name: checkpoints record it, and a resumed trainer refuses to train
    /// on until an objective of that name is added again.
    fn name(&self) -> &str;

    /// The terms this objective adds for one step.
    fn terms(&mut self, step: &StepOutputs<'_>) -> Result<Vec<Term>>;

    /// State to keep in checkpoints (a running statistic, a schedule position); `null`
    /// by default.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restores what [`Self::save_state`] returned, when a resumed trainer gets this
    /// objective back.
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// The temperature clamp the original applies in place before every forward pass
/// (`temp.clamp_(0.001, 0.5)` under `no_grad`): the parameter keeps its id and stays a leaf.
///
/// ```
/// use blip_train::PretrainConfig;
/// use blip_train::pretrain::clamp_model_temperature;
/// use burn::tensor::Device;
///
/// let config = PretrainConfig::tiny(30524).with_temp(0.9); // above BLIP's range
/// let model = config.init(&Device::flex().autodiff());
/// let id = model.temp.id;
/// let model = clamp_model_temperature(model);
/// assert!((model.temperature() - 0.5).abs() < 1e-6);
/// assert_eq!(model.temp.id, id); // the same parameter, clamped in place
/// assert!(model.temp.val().is_require_grad()); // and still trained
/// // A model only evaluated (no autodiff) is clamped too.
/// let plain = clamp_model_temperature(config.init(&Device::flex()));
/// assert!((plain.temperature() - 0.5).abs() < 1e-6);
/// ```
pub fn clamp_model_temperature(mut model: BlipPretrain) -> BlipPretrain {
    // The parameter keeps whether it is trained: on a device without autodiff (a
    // model only evaluated) asking for a gradient would panic.
    model.temp = model.temp.map(|t| {
        let trained = t.is_require_grad();
        clamp_temperature(t.detach())
            .detach()
            .set_require_grad(trained)
    });
    model
}

/// `[rows, columns]` with 1 where the two image ids are equal.
fn same_image(rows: &[i64], columns: &[i64], device: &Device) -> Tensor<2> {
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|&i| columns.iter().map(move |&j| f32::from(i == j)))
        .collect();
    Tensor::from_data(TensorData::new(values, [rows.len(), columns.len()]), device)
}

/// The `[B, B + K]` ITC targets of retrieval fine-tuning: every column whose image id equals
/// the row's (batch and queue) shares the target mass equally.
fn id_positives(ids: &[i64], queue: &[i64], device: &Device) -> Tensor<2> {
    let all: Vec<i64> = ids.iter().chain(queue).copied().collect();
    let same = same_image(ids, &all, device);
    same.clone() / same.sum_dim(1) // each row has its own pair, so never 0
}

fn select_rows(rows: &[Vec<u32>], index: &[usize]) -> Vec<Vec<u32>> {
    index.iter().map(|&i| rows[i].clone()).collect()
}

/// What ITM's hard negatives are drawn from: this rank's image tokens and texts, or every
/// rank's in rank order.
struct Candidates {
    images: Tensor<3>,
    text: Encoded,
}

impl Candidates {
    fn local(images: &Tensor<3>, text: &Encoded) -> Self {
        Self {
            images: images.clone(),
            text: text.clone(),
        }
    }
}

/// `[B, D]` rows of every rank, concatenated in rank order (`concat_all_gather`: values
/// only, no gradient).
fn all_gather_rows(rows: Tensor<2>, collective: &dyn Collective) -> Result<Tensor<2>> {
    if collective.world_size() == 1 {
        return Ok(rows);
    }
    let [_, d] = rows.dims();
    let device = rows.device();
    let values = rows.detach().into_data().convert::<f32>();
    let values = values
        .as_slice::<f32>()
        .map_err(|e| TrainError::Distributed(format!("features to gather: {e:?}")))?;
    let all = collective.all_gather_f32(values)?;
    let n = all.len() / d.max(1);
    Ok(Tensor::from_data(TensorData::new(all, [n, d]), &device))
}

/// Every rank's image tokens `[W·B, L, D]` in rank order: this rank's are `own` (in the
/// graph), the others' are new leaves whose gradients [`Losses::gradients`] sends back.
fn gather_image_tokens(
    own: &Tensor<3>,
    collective: &dyn Collective,
) -> Result<(Tensor<3>, Vec<Option<Tensor<3>>>)> {
    let dims = own.dims();
    let device = own.device();
    let values = own.clone().detach().into_data().convert::<f32>();
    let values = values
        .as_slice::<f32>()
        .map_err(|e| TrainError::Distributed(format!("image tokens to gather: {e:?}")))?;
    let all = collective.all_gather_f32(values)?;
    let per_rank = values.len();
    let mut parts = Vec::new();
    let mut others = Vec::new();
    for (rank, chunk) in all.chunks(per_rank.max(1)).enumerate() {
        if rank == collective.rank() {
            parts.push(own.clone());
            others.push(None);
        } else {
            let data = TensorData::new(chunk.to_vec(), dims);
            let leaf = Tensor::<3>::from_data(data, (&device, own.dtype())).require_grad();
            parts.push(leaf.clone());
            others.push(Some(leaf));
        }
    }
    Ok((Tensor::cat(parts, 0), others))
}

/// Every rank's captions in rank order, padded to the longest rank's width.
fn gather_text(text: &Encoded, collective: &dyn Collective) -> Result<Encoded> {
    let width = text.input_ids.first().map_or(0, Vec::len);
    // [width, ids row by row, masks row by row]
    let mut sent = vec![width as u32];
    for row in text.input_ids.iter().chain(&text.attention_mask) {
        sent.extend_from_slice(row);
    }
    let parts = collective.all_gather_bytes(bytemuck::cast_slice(&sent))?;
    let mut ids = Vec::new();
    let mut masks = Vec::new();
    for (rank, part) in parts.iter().enumerate() {
        let malformed = || TrainError::Distributed(format!("captions of rank {rank}: malformed"));
        let received = values_of::<u32>(part).ok_or_else(malformed)?;
        let (&w, values) = received.split_first().ok_or_else(malformed)?;
        let w = w as usize;
        if w == 0 || !values.len().is_multiple_of(2 * w) {
            return Err(malformed());
        }
        let rows: Vec<Vec<u32>> = values.chunks(w).map(<[u32]>::to_vec).collect();
        let (i, m) = rows.split_at(rows.len() / 2);
        ids.extend_from_slice(i);
        masks.extend_from_slice(m);
    }
    let widest = ids.iter().map(Vec::len).max().unwrap_or(0);
    Ok(pad_rows(
        &Encoded {
            input_ids: ids,
            attention_mask: masks,
        },
        widest,
    ))
}

/// `text` with every row padded to `width` (id 0, mask 0); wider rows are kept.
fn pad_rows(text: &Encoded, width: usize) -> Encoded {
    let pad = |rows: &[Vec<u32>]| -> Vec<Vec<u32>> {
        rows.iter()
            .map(|r| {
                let mut r = r.clone();
                if r.len() < width {
                    r.resize(width, 0);
                }
                r
            })
            .collect()
    };
    Encoded {
        input_ids: pad(&text.input_ids),
        attention_mask: pad(&text.attention_mask),
    }
}

/// Computes the weighted objectives of one batch, updating the momentum encoders first and
/// the queues last, in the original order:
///
/// 1. image tokens, online ITC features `v`, `t`;
/// 2. momentum update `θ_m ← m·θ_m + (1 − m)·θ`, then momentum features `v_m`, `t_m`;
/// 3. [`itc_loss`] against `[v_m | Q_v]`, `[t_m | Q_t]` with distillation weight `alpha`;
/// 4. ITM: one hard negative image per text and one hard negative text per image, drawn
///    from `rng` ([`hard_negative_weights`]; with image ids, every same-image pair is
///    excluded instead of only the diagonal), [`itm_loss`] on positives + negatives;
/// 5. LM: decoder on `[DEC]` + caption, [`blip_text::lm_loss`] (computed by [`BlipPretrain::decoder_loss`]) with the config's label smoothing;
/// 6. enqueue `v_m`, `t_m` (and the image ids).
///
/// An objective whose weight is 0 is skipped; ITC/ITM need `distillation`.
///
/// ```
/// use blip_train::{Distillation, PretrainConfig, SplitMix64, compute_losses};
/// use burn::optim::GradientsParams;
/// use burn::tensor::Device;
/// # use blip_text::Encoded;
/// # use blip_train::TrainBatch;
/// # use burn::tensor::Tensor;
///
/// let device = Device::flex().autodiff();
/// let config = PretrainConfig::tiny(30524); // ITC, ITM and LM, each of weight 1
/// let model = config.init(&device);
/// let mut distillation = Distillation::new(&model, &config, &device);
/// # let s = config.blip.vision.image_size;
/// # let batch = TrainBatch {
/// #     pixel_values: Tensor::zeros([2, 3, s, s], &device),
/// #     text: Encoded {
/// #         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
/// #         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
/// #     },
/// #     image_ids: None,
/// #     prompt_length: 0,
/// # };
/// // `batch`: two images and their captions (see `TrainBatch`).
/// let mut rng = SplitMix64::new(0); // draws the hard negatives
/// let losses = compute_losses(&model, Some(&mut distillation), &config, &batch, 0.4, &mut rng)?;
/// let names: Vec<String> = losses.terms.iter().map(|(name, _)| name.clone()).collect();
/// assert_eq!(names, ["itc", "itm", "lm"]);
/// assert_eq!(distillation.image_queue.ptr, 2); // the batch's momentum features, queued last
/// let grads = GradientsParams::from_grads(losses.total.backward(), &model);
/// assert!(grads.get::<1>(model.temp.id).is_some()); // ITC trains the temperature
/// # Ok::<(), blip_train::TrainError>(())
/// ```
pub fn compute_losses(
    model: &BlipPretrain,
    distillation: Option<&mut Distillation>,
    config: &PretrainConfig,
    batch: &TrainBatch,
    alpha: f64,
    rng: &mut SplitMix64,
) -> Result<Losses> {
    compute_losses_with(
        model,
        distillation,
        config,
        batch,
        alpha,
        rng,
        &mut [],
        &SingleProcess,
    )
}

/// [`compute_losses`], then the terms of each extra objective, added to the total; across
/// the ranks of `collective` ([`SingleProcess`] for one), the queues take every rank's
/// momentum features and, with `negative_all_rank`, retrieval draws its negatives from
/// every rank (see [`crate::Collective`]).
///
/// ```
/// use blip_train::{
///     Objective, Result, SingleProcess, SplitMix64, StepOutputs, Term, compute_losses_with,
/// };
/// # use blip_train::{LossWeights, PretrainConfig};
///
/// /// A small penalty on the image tokens' magnitude.
/// struct Norm;
///
/// impl Objective for Norm {
///     fn name(&self) -> &str {
///         "norm"
///     }
///     fn terms(&mut self, step: &StepOutputs<'_>) -> Result<Vec<Term>> {
///         let loss = step.image_embeds.clone().powi_scalar(2).mean();
///         Ok(vec![Term { name: "norm".into(), weight: 0.5, loss }])
///     }
/// }
/// # let config = PretrainConfig::tiny(30524)
/// #     .with_weights(LossWeights::new().with_itc(0.0).with_itm(0.0)); // LM only
/// # use blip_text::Encoded;
/// # use blip_train::TrainBatch;
/// # use burn::tensor::{Device, Tensor};
/// # let device = Device::flex();
/// # let s = config.blip.vision.image_size;
/// # let batch = TrainBatch {
/// #     pixel_values: Tensor::zeros([2, 3, s, s], &device),
/// #     text: Encoded {
/// #         input_ids: vec![vec![101, 1037, 3899, 102], vec![101, 4937, 102, 0]],
/// #         attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
/// #     },
/// #     image_ids: None,
/// #     prompt_length: 0,
/// # };
/// # let model = config.init(&device);
/// // `config` (LM only), `model` and `batch` as in the `TrainBatch` example.
/// let mut extra: Vec<Box<dyn Objective>> = vec![Box::new(Norm)];
/// let mut rng = SplitMix64::new(0);
/// let one = SingleProcess;
/// let losses =
///     compute_losses_with(&model, None, &config, &batch, 0.0, &mut rng, &mut extra, &one)?;
/// let values = losses.values(); // BLIP's (here LM only), then the extra terms
/// assert_eq!((values[0].0.as_str(), values[1].0.as_str()), ("lm", "norm"));
/// let total: f32 = losses.total.into_scalar();
/// assert!((f64::from(total) - (values[0].1 + 0.5 * values[1].1)).abs() < 1e-3);
/// # Ok::<(), blip_train::TrainError>(())
/// ```
// Each argument is state the step reads or changes on its own terms (the distillation
// state and the generator are updated, the collective is shared with the trainer); a struct
// bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn compute_losses_with(
    model: &BlipPretrain,
    distillation: Option<&mut Distillation>,
    config: &PretrainConfig,
    batch: &TrainBatch,
    alpha: f64,
    rng: &mut SplitMix64,
    objectives: &mut [Box<dyn Objective>],
    collective: &dyn Collective,
) -> Result<Losses> {
    let [b, _, _, _] = batch.pixel_values.dims();
    model.check_text(&batch.text, b)?;
    if let Some(ids) = &batch.image_ids
        && ids.len() != b
    {
        return Err(TrainError::Batch(format!(
            "{} image ids for {b} images",
            ids.len()
        )));
    }
    let device = batch.pixel_values.device();
    let w = &config.weights;
    let contrastive = w.contrastive();
    let world = collective.world_size();
    let image_embeds = model.image_embeds(batch.pixel_values.clone())?;
    // Negatives from every rank: this step's losses see the image tokens as a leaf, so
    // the gradient other ranks send for them can join before the ViT's backward pass.
    let negatives_everywhere = world > 1
        && config.negative_all_rank
        && w.itm != 0.0
        && batch.image_ids.is_some()
        && device.is_autodiff();
    let (image_embeds, mut shared_images) = if negatives_everywhere {
        let leaf = image_embeds.clone().detach().require_grad();
        let shared = SharedImages {
            tracked: image_embeds,
            leaf: leaf.clone(),
            others: Vec::new(),
        };
        (leaf, Some(shared))
    } else {
        (image_embeds, None)
    };
    let mut terms: Vec<(String, Tensor<1>, f64)> = Vec::new();
    let mut outputs = StepOutputs {
        model,
        batch,
        collective,
        image_embeds: image_embeds.clone(),
        image_features: None,
        text_features: None,
        temperature: None,
        itm_logits: None,
        decoder_states: None,
    };

    if contrastive {
        let Some(state) = distillation else {
            return Err(TrainError::Batch(
                "ITC/ITM need the momentum encoders and queues (`Distillation`)".into(),
            ));
        };
        let k = state.image_queue.len();
        // Every rank's momentum features enter the queue: the global batch must divide it.
        if b == 0 || !k.is_multiple_of(b * world) {
            return Err(crate::momentum::QueueSizeError {
                queue: k,
                batch: b * world,
            }
            .into());
        }
        // Features, temperature and logits enter the losses in f32 whatever the model's
        // precision (mixed-precision training computes the model in half).
        let temp = to_f32(model.temp.val());
        let image_feat = to_f32(model.image_features(image_embeds.clone()));
        let text_feat = to_f32(model.text_features(&batch.text, &device)?);

        // The online encoders' handles (no copy) stand in for the momentum encoders while
        // these are updated: not shared, their buffers are written in place.
        let online = model.momentum_sources();
        let momentum = std::mem::replace(&mut state.momentum, online.clone());
        state.momentum = momentum_update(&online, momentum, config.momentum);
        outputs.image_features = Some(image_feat.clone());
        outputs.text_features = Some(text_feat.clone());
        outputs.temperature = Some(temp.clone());
        let image_feat_m = state.momentum.image_features(batch.pixel_values.clone())?;
        let text_feat_m = state.momentum.text_features(&batch.text, &device)?;

        if w.itc != 0.0 {
            let positives = batch
                .image_ids
                .as_ref()
                .map(|ids| id_positives(ids, &state.idx_queue, &device));
            let loss = itc_loss(
                image_feat.clone(),
                text_feat.clone(),
                image_feat_m.clone(),
                text_feat_m.clone(),
                state.image_queue.features.clone(),
                state.text_queue.features.clone(),
                temp.clone(),
                alpha,
                positives,
            );
            terms.push(("itc".into(), loss, w.itc));
        }

        if w.itm != 0.0 {
            let inv_temp = temp.detach().recip().reshape([1, 1]);
            // Negatives are drawn from the candidates of every rank (`negative_all_rank`)
            // or of this one.
            let mut candidates = Candidates::local(&image_embeds, &batch.text);
            let (w_i2t, w_t2i) = match &batch.image_ids {
                Some(ids) if negatives_everywhere => {
                    let all_ids = collective.all_gather_i64(ids)?;
                    let keep = same_image(ids, &all_ids, &device).neg() + 1.0;
                    let image_world = all_gather_rows(image_feat.clone().detach(), collective)?;
                    let text_world = all_gather_rows(text_feat.clone().detach(), collective)?;
                    let i2t = image_feat.clone().detach().matmul(text_world.transpose())
                        * inv_temp.clone();
                    let t2i = text_feat.clone().detach().matmul(image_world.transpose()) * inv_temp;
                    let (tokens, others) = gather_image_tokens(&image_embeds, collective)?;
                    if let Some(shared) = shared_images.as_mut() {
                        shared.others = others;
                    }
                    candidates = Candidates {
                        images: tokens,
                        text: gather_text(&batch.text, collective)?,
                    };
                    (softmax(i2t, 1) * keep.clone(), softmax(t2i, 1) * keep)
                }
                None => (
                    hard_negative_weights(
                        image_feat
                            .clone()
                            .detach()
                            .matmul(text_feat_m.clone().transpose())
                            * inv_temp.clone(),
                    ),
                    hard_negative_weights(
                        text_feat
                            .clone()
                            .detach()
                            .matmul(image_feat_m.clone().transpose())
                            * inv_temp,
                    ),
                ),
                Some(ids) => {
                    // Retrieval: online × online similarities, plain softmax, every pair of
                    // the same image zeroed (`BLIP_Retrieval`).
                    let keep = same_image(ids, ids, &device).neg() + 1.0;
                    let sim = image_feat
                        .clone()
                        .detach()
                        .matmul(text_feat.clone().detach().transpose())
                        * inv_temp;
                    (
                        softmax(sim.clone(), 1) * keep.clone(),
                        softmax(sim.transpose(), 1) * keep,
                    )
                }
            };
            let negative_images = sample_negatives(w_t2i, rng)?;
            let negative_texts = sample_negatives(w_i2t, rng)?;
            let neg_index = Tensor::<1, Int>::from_data(
                TensorData::new(
                    negative_images
                        .iter()
                        .map(|&i| i as i64)
                        .collect::<Vec<_>>(),
                    [b],
                ),
                &device,
            );
            // One pass over 3B rows: (text_i, image_i), (text_i, negative image),
            // (negative text, image_i).
            let images = Tensor::cat(
                vec![
                    image_embeds.clone(),
                    candidates.images.select(0, neg_index),
                    image_embeds.clone(),
                ],
                0,
            );
            // Candidate texts may be padded longer than this rank's: one width for all rows.
            let width = candidates.text.input_ids.first().map_or(0, Vec::len);
            let own = pad_rows(&batch.text, width);
            let ids = [
                own.input_ids.clone(),
                own.input_ids.clone(),
                select_rows(&candidates.text.input_ids, &negative_texts),
            ]
            .concat();
            let mask = [
                own.attention_mask.clone(),
                own.attention_mask.clone(),
                select_rows(&candidates.text.attention_mask, &negative_texts),
            ]
            .concat();
            let logits = to_f32(model.itm_logits(images, &ids, &mask)?);
            outputs.itm_logits = Some(logits.clone());
            terms.push(("itm".into(), itm_loss(logits), w.itm));
        }

        // `concat_all_gather`: every rank enqueues the momentum features of all, in rank
        // order, so the queues stay identical across ranks.
        state
            .image_queue
            .enqueue(all_gather_rows(image_feat_m, collective)?)?;
        state
            .text_queue
            .enqueue(all_gather_rows(text_feat_m, collective)?)?;
        if let Some(ids) = batch.image_ids.as_ref().filter(|_| k > 0) {
            let ids = collective.all_gather_i64(ids)?;
            let n = state.idx_queue.len();
            let ptr = (n + state.image_queue.ptr - ids.len()) % n;
            state.idx_queue[ptr..ptr + ids.len()].copy_from_slice(&ids);
        }
    }

    if w.lm != 0.0 {
        let states = model.decoder_states(
            image_embeds,
            &batch.text.input_ids,
            &batch.text.attention_mask,
        )?;
        let labels = lm_labels(&batch.text, batch.prompt_length, &device);
        outputs.decoder_states = Some(states.clone());
        terms.push((
            "lm".into(),
            model.decoder_loss(states, labels, config.label_smoothing)?,
            w.lm,
        ));
    }

    for objective in objectives.iter_mut() {
        for term in objective.terms(&outputs)? {
            if terms.iter().any(|(name, _, _)| *name == term.name) {
                return Err(TrainError::Batch(format!(
                    "objective `{}` adds a term `{}`, a name already taken this step",
                    objective.name(),
                    term.name
                )));
            }
            if term.loss.dims() != [1] {
                return Err(TrainError::Batch(format!(
                    "objective `{}`: term `{}` has shape {:?}, a loss is [1]",
                    objective.name(),
                    term.name,
                    term.loss.dims()
                )));
            }
            if term.weight != 0.0 {
                terms.push((term.name, term.loss, term.weight));
            }
        }
    }

    let total = terms
        .iter()
        .map(|(_, loss, weight)| loss.clone() * *weight)
        .reduce(|a, b| a + b)
        .ok_or_else(|| TrainError::Batch("every loss weight is 0: nothing to train".into()))?;
    Ok(Losses {
        terms: terms
            .into_iter()
            .map(|(name, loss, _)| (name, loss))
            .collect(),
        total,
        shared_images,
    })
}
