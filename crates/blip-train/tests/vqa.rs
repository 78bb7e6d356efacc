//! The VQA answer-LM objective: equal to each answer decoded alone and weighted, and a few
//! AdamW steps on it fit a batch.

use blip_text::{CrossInput, Encoded, VqaModel, lm_loss_per_sequence};
use blip_train::{PretrainConfig, VqaBatch, blip_adamw, vqa_loss};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor};

fn encoded(rows: &[&[u32]]) -> Encoded {
    let width = rows.iter().map(|r| r.len()).max().unwrap();
    Encoded {
        input_ids: rows
            .iter()
            .map(|r| {
                let mut v = r.to_vec();
                v.resize(width, 0);
                v
            })
            .collect(),
        attention_mask: rows
            .iter()
            .map(|r| (0..width).map(|i| u32::from(i < r.len())).collect())
            .collect(),
    }
}

fn setup(device: &Device) -> (VqaModel, VqaBatch) {
    device.seed(11); // weights and pixels are random: fix them
    let mut blip = PretrainConfig::tiny(40).blip;
    blip.vision.image_size = 32;
    let model = VqaModel::new(&blip, device);
    let batch = VqaBatch {
        pixel_values: Tensor::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), device),
        // [CLS] = 1 first, as the tokenizer writes them; the loss puts [ENC] = 4 there.
        questions: encoded(&[&[1, 7, 8, 9, 2], &[1, 10, 2]]),
        answers: encoded(&[&[1, 20, 2], &[1, 21, 22, 2], &[1, 23, 2]]),
        answers_per_question: vec![2, 1],
        weights: vec![0.6, 0.4, 1.0],
    };
    (model, batch)
}

#[test]
fn the_loss_is_the_weighted_sum_of_each_answer_alone() {
    let device = Device::flex();
    let (model, batch) = setup(&device);
    let got: f32 = vqa_loss(&model, &batch, 3, 4, 0.1).unwrap().into_scalar();
    let embeds = model
        .vision_model
        .forward(batch.pixel_values.clone())
        .unwrap();
    let mut want = 0f32;
    for (a, (&q, &w)) in [0usize, 0, 1].iter().zip(&batch.weights).enumerate() {
        // the question alone, unpadded: the batched loss masks the padding instead
        let qlen = batch.questions.attention_mask[q]
            .iter()
            .filter(|&&m| m == 1)
            .count();
        let mut question_ids = batch.questions.input_ids[q][..qlen].to_vec();
        question_ids[0] = 4; // [ENC], as the original encodes questions
        let question = Encoded {
            input_ids: vec![question_ids],
            attention_mask: vec![vec![1; qlen]],
        };
        let (qids, qmask) = question.to_tensors(&device);
        let states = model
            .encode_question(embeds.clone().narrow(0, q, 1), qids, Some(qmask))
            .unwrap();
        let len = batch.answers.attention_mask[a]
            .iter()
            .filter(|&&m| m == 1)
            .count();
        let mut answer = batch.answers.input_ids[a][..len].to_vec();
        answer[0] = 3;
        let answer = Encoded {
            input_ids: vec![answer],
            attention_mask: vec![vec![1; len]],
        };
        let (ids, _) = answer.to_tensors(&device);
        let logits = model
            .answer_logits(CrossInput { states, mask: None }, ids.clone(), None)
            .unwrap();
        let loss: f32 = lm_loss_per_sequence(logits, ids, 0.1).into_scalar();
        want += w * loss;
    }
    want /= 2.0;
    assert!(
        (got - want).abs() < 1e-4,
        "batched {got}, one by one {want}"
    );
}

#[test]
fn a_few_steps_fit_the_answers() {
    let device = Device::flex().autodiff();
    let (model, batch) = setup(&device);
    let mut model = model.train();
    let mut optim = blip_adamw().init();
    let first: f32 = vqa_loss(&model, &batch, 3, 4, 0.0).unwrap().into_scalar();
    let mut last = first;
    for _ in 0..100 {
        let loss = vqa_loss(&model, &batch, 3, 4, 0.0).unwrap();
        last = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
    }
    assert!(last < 0.1 * first, "loss fell from {first} to {last}");
}
