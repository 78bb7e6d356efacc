//! The VQA fine-tuning objective of the original `BLIP_VQA.forward(train=True)`.

use blip_text::CrossInput;
use blip_text::{Encoded, VqaModel, lm_labels, lm_loss_per_sequence};
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{Result, TrainError};

/// A VQA training batch: questions as the tokenizer encodes them (`[CLS]` first; the loss
/// puts `[ENC]` there, as the original encodes them), and for each question its candidate
/// answers with their weights (VQA v2's soft scores).
///
/// ```
/// use blip_text::{Encoded, VqaModel};
/// use blip_train::{PretrainConfig, VqaBatch, vqa_loss};
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let blip = PretrainConfig::tiny(30524).blip; // BERT's ids: [DEC] 30522, [ENC] 30523
/// let s = blip.vision.image_size;
/// let encoded = |rows: Vec<Vec<u32>>| Encoded {
///     attention_mask: rows.iter().map(|r| vec![1; r.len()]).collect(),
///     input_ids: rows,
/// };
/// // One question with two candidate answers, weighted by their VQA v2 scores.
/// let batch = VqaBatch {
///     pixel_values: Tensor::zeros([1, 3, s, s], &device),
///     questions: encoded(vec![vec![101, 2054, 3609, 102]]),
///     answers: encoded(vec![vec![101, 2417, 102], vec![101, 2630, 102]]),
///     answers_per_question: vec![2],
///     weights: vec![0.7, 0.3],
/// };
/// let model = VqaModel::new(&blip, &device);
/// // Counts that do not add up are refused before the model runs.
/// let bad = VqaBatch { answers_per_question: vec![1], ..batch.clone() };
/// assert!(vqa_loss(&model, &bad, 30522, 30523, 0.1).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct VqaBatch {
    /// `[B, 3, S, S]` pixels.
    pub pixel_values: Tensor<4>,
    /// `B` questions (`[CLS]` first; replaced by `[ENC]`).
    pub questions: Encoded,
    /// All answers, grouped by question (`[CLS]` first; replaced by `[DEC]`).
    pub answers: Encoded,
    /// How many answers each question has (`Σ = answers`).
    pub answers_per_question: Vec<usize>,
    /// One weight per answer.
    pub weights: Vec<f32>,
}

/// The answer-LM loss of VQA fine-tuning:
///
/// `L = (1/B) · Σ_q Σ_{a ∈ answers(q)} w_a · Σ_t CE_ε(answer_a, t)`
///
/// where each answer is decoded (`[DEC]` first, causal) cross-attending to its question's
/// states — the question encoded with cross-attention to the image, repeated once per
/// answer, padding masked — and `CE_ε` is the per-token cross-entropy with label smoothing
/// `ε` (0.1 in the original), summed over the answer's tokens (padding excluded).
///
/// The questions' first token becomes `enc_token_id` (`[ENC]`) and the answers'
/// `dec_token_id` (`[DEC]`) here, so a batch holds the tokenizer's output as it is.
///
/// ```
/// # use blip_text::{Encoded, VqaModel};
/// # use blip_train::{PretrainConfig, VqaBatch};
/// # use burn::tensor::{Device, Tensor};
/// use blip_train::vqa_loss;
///
/// # let device = Device::flex();
/// # let blip = PretrainConfig::tiny(30524).blip; // BERT's ids: [DEC] 30522, [ENC] 30523
/// # let s = blip.vision.image_size;
/// # let encoded = |rows: Vec<Vec<u32>>| Encoded {
/// #     attention_mask: rows.iter().map(|r| vec![1; r.len()]).collect(),
/// #     input_ids: rows,
/// # };
/// # let batch = VqaBatch {
/// #     pixel_values: Tensor::zeros([1, 3, s, s], &device),
/// #     questions: encoded(vec![vec![101, 2054, 3609, 102]]),
/// #     answers: encoded(vec![vec![101, 2417, 102], vec![101, 2630, 102]]),
/// #     answers_per_question: vec![2],
/// #     weights: vec![0.7, 0.3],
/// # };
/// # let model = VqaModel::new(&blip, &device);
/// // `batch`: one question, two answers weighted 0.7 and 0.3 (see `VqaBatch`).
/// let loss: f32 = vqa_loss(&model, &batch, 30522, 30523, 0.1)?.into_scalar();
/// assert!(loss.is_finite() && loss > 0.0);
/// // Each answer's loss is scaled by its weight: doubling every weight doubles the loss.
/// let doubled = VqaBatch { weights: vec![1.4, 0.6], ..batch.clone() };
/// let twice: f32 = vqa_loss(&model, &doubled, 30522, 30523, 0.1)?.into_scalar();
/// assert!((twice - 2.0 * loss).abs() <= 1e-4 * loss);
/// # Ok::<(), blip_train::TrainError>(())
/// ```
pub fn vqa_loss(
    model: &VqaModel,
    batch: &VqaBatch,
    dec_token_id: u32,
    enc_token_id: u32,
    label_smoothing: f64,
) -> Result<Tensor<1>> {
    let [b, _, _, _] = batch.pixel_values.dims();
    let n = batch.answers.input_ids.len();
    if batch.questions.input_ids.len() != b
        || batch.answers_per_question.len() != b
        || batch.answers_per_question.iter().sum::<usize>() != n
        || batch.weights.len() != n
    {
        return Err(TrainError::Batch(format!(
            "{b} images, {} questions, answer counts {:?} for {n} answers and {} weights",
            batch.questions.input_ids.len(),
            batch.answers_per_question,
            batch.weights.len()
        )));
    }
    let device = batch.pixel_values.device();
    let image_embeds = model.vision_model.forward(batch.pixel_values.clone())?;
    let questions = batch.questions.with_first_token(enc_token_id);
    let (question_ids, question_mask) = questions.to_tensors(&device);
    let question =
        model.encode_question(image_embeds, question_ids, Some(question_mask.clone()))?;
    // Each question's states (and mask) repeated once per answer.
    let owner: Vec<i64> = batch
        .answers_per_question
        .iter()
        .enumerate()
        .flat_map(|(q, &k)| std::iter::repeat_n(q as i64, k))
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(owner, [n]), &device);
    let cross = CrossInput {
        states: question.select(0, index.clone()),
        mask: Some(question_mask.select(0, index)),
    };
    let answers = batch.answers.with_first_token(dec_token_id);
    let (answer_ids, answer_mask) = answers.to_tensors(&device);
    let labels = lm_labels(&answers, 0, &device);
    let logits = model.answer_logits(cross, answer_ids, Some(answer_mask))?;
    let per_answer = lm_loss_per_sequence(logits, labels, label_smoothing);
    let weights = Tensor::<1>::from_data(TensorData::new(batch.weights.clone(), [n]), &device);
    Ok((per_answer * weights).sum() / b as f64)
}
