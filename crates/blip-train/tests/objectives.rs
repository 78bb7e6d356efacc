//! The losses against `scripts/loss_reference.py` (the original formulas in PyTorch): values
//! and gradients to 1e-5.

mod common;

use blip_train::{hard_negative_weights, itc_loss, itm_loss, lm_loss};
use burn::tensor::Device;
use common::{Fixture, assert_all_close, values};

/// `scripts/loss_reference.py`'s output.
struct Reference;

impl Reference {
    fn open() -> Fixture {
        Fixture::open("losses/expected.safetensors")
    }
}

#[track_caller]
fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>) {
    assert_all_close(what, &got, &want, 1e-5);
}

fn device() -> Device {
    Device::flex().autodiff()
}

#[test]
fn itc_loss_and_gradients_match_the_original() {
    let (r, device) = (Reference::open(), device());
    let image_feat = r.float::<2>("itc.image_feat", &device).require_grad();
    let text_feat = r.float::<2>("itc.text_feat", &device).require_grad();
    let temp = r.float::<1>("itc.temp", &device).require_grad();
    let loss = itc_loss(
        image_feat.clone(),
        text_feat.clone(),
        r.float("itc.image_feat_m", &device),
        r.float("itc.text_feat_m", &device),
        r.float("itc.image_queue", &device),
        r.float("itc.text_queue", &device),
        temp.clone(),
        r.floats("itc.alpha").1[0] as f64,
        None,
    );
    assert_close("itc loss", values(loss.clone()), r.floats("itc.loss").1);
    let grads = loss.backward();
    assert_close(
        "d itc / d image_feat",
        values(image_feat.grad(&grads).unwrap()),
        r.floats("itc.grad.image_feat").1,
    );
    assert_close(
        "d itc / d text_feat",
        values(text_feat.grad(&grads).unwrap()),
        r.floats("itc.grad.text_feat").1,
    );
    assert_close(
        "d itc / d temp",
        values(temp.grad(&grads).unwrap()),
        r.floats("itc.grad.temp").1,
    );
}

#[test]
fn hard_negative_weights_exclude_the_pair_itself() {
    let (r, device) = (Reference::open(), Device::flex());
    let image_feat = r.float::<2>("itc.image_feat", &device);
    let text_feat = r.float::<2>("itc.text_feat", &device);
    let temp = r.floats("itc.temp").1[0];
    // The original's sim_i2t[:, :B] / sim_t2i[:, :B]: online features vs momentum features.
    let sim_i2t = image_feat.matmul(r.float::<2>("itc.text_feat_m", &device).transpose()) / temp;
    let sim_t2i = text_feat.matmul(r.float::<2>("itc.image_feat_m", &device).transpose()) / temp;
    let i2t = values(hard_negative_weights(sim_i2t));
    assert_close("weights i2t", i2t.clone(), r.floats("itm.weights_i2t").1);
    assert_close(
        "weights t2i",
        values(hard_negative_weights(sim_t2i)),
        r.floats("itm.weights_t2i").1,
    );
    let b = (i2t.len() as f64).sqrt() as usize;
    for i in 0..b {
        assert_eq!(i2t[i * b + i], 0.0, "row {i} must not draw itself");
    }
}

#[test]
fn itm_loss_and_gradient_match_the_original() {
    let (r, device) = (Reference::open(), device());
    let logits = r.float::<2>("itm.logits", &device).require_grad();
    let loss = itm_loss(logits.clone());
    assert_close("itm loss", values(loss.clone()), r.floats("itm.loss").1);
    let grads = loss.backward();
    assert_close(
        "d itm / d logits",
        values(logits.grad(&grads).unwrap()),
        r.floats("itm.grad.logits").1,
    );
}

#[test]
fn lm_loss_and_gradient_match_the_original() {
    let (r, device) = (Reference::open(), device());
    let logits = r.float::<3>("lm.logits", &device).require_grad();
    let loss = lm_loss(logits.clone(), r.int("lm.labels", &device), 0.1).unwrap();
    assert_close("lm loss", values(loss.clone()), r.floats("lm.loss").1);
    let grads = loss.backward();
    assert_close(
        "d lm / d logits",
        values(logits.grad(&grads).unwrap()),
        r.floats("lm.grad.logits").1,
    );
}

mod state {
    use super::values;
    use blip_train::{FeatureQueue, clamp_temperature, momentum_update};
    use burn::module::Param;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, Tensor};

    fn linear(weight: [[f32; 2]; 2], bias: [f32; 2], device: &Device) -> Linear {
        let mut l = LinearConfig::new(2, 2).init(device);
        l.weight = Param::from_tensor(Tensor::from_floats(weight, device));
        l.bias = Some(Param::from_tensor(Tensor::from_floats(bias, device)));
        l
    }

    #[test]
    fn momentum_update_moves_each_parameter_by_one_minus_m() {
        let device = Device::flex();
        let online = linear([[1.0, 2.0], [3.0, 4.0]], [10.0, 20.0], &device);
        let momentum = linear([[0.0; 2]; 2], [0.0, 100.0], &device);
        let ids = (momentum.weight.id, momentum.bias.as_ref().unwrap().id);
        let updated = momentum_update(&online, momentum, 0.9);
        let w = values(updated.weight.val());
        for (got, want) in w.iter().zip([0.1, 0.2, 0.3, 0.4]) {
            assert!((got - want).abs() < 1e-6, "{w:?}");
        }
        let b = values(updated.bias.as_ref().unwrap().val());
        assert!(
            (b[0] - 1.0).abs() < 1e-5 && (b[1] - 92.0).abs() < 1e-4,
            "{b:?}"
        );
        assert_eq!(
            (updated.weight.id, updated.bias.unwrap().id),
            ids,
            "same parameters, new values"
        );
        // The online module is untouched.
        assert_eq!(values(online.weight.val()), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn queue_overwrites_the_oldest_columns_and_wraps() {
        let device = Device::flex();
        let mut queue = FeatureQueue::new(2, 6, &device);
        let norms: Vec<f32> = values(queue.features.clone().powi_scalar(2).sum_dim(0));
        assert!(
            norms.iter().all(|n| (n - 1.0).abs() < 1e-5),
            "unit columns: {norms:?}"
        );
        for step in 0..4 {
            let v = step as f32;
            queue
                .enqueue(Tensor::from_floats([[v, -v], [v + 0.5, -v - 0.5]], &device))
                .unwrap();
        }
        // Steps 0, 1, 2 filled columns 0..6; step 3 overwrote columns 0 and 1.
        assert_eq!(queue.ptr, 2);
        let f = values(queue.features.clone()); // row-major [2, 6]
        assert_eq!(&f[0..6], &[3.0, 3.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(&f[6..12], &[-3.0, -3.5, -1.0, -1.5, -2.0, -2.5]);
        let err = queue.enqueue(Tensor::zeros([4, 2], &device)).unwrap_err();
        assert_eq!((err.queue, err.batch), (6, 4));
    }

    #[test]
    fn temperature_is_clamped_to_blips_range() {
        let device = Device::flex();
        let t = clamp_temperature(Tensor::from_floats([0.0001, 0.07, 0.9], &device));
        assert_eq!(values(t), vec![0.001, 0.07, 0.5]);
    }
}

mod sampling {
    use blip_train::{SplitMix64, alpha_ramp, sample_negatives};
    use burn::tensor::{Device, Tensor};

    #[test]
    fn negatives_follow_the_weights_never_the_pair_and_repeat_with_the_seed() {
        let device = Device::flex();
        let weights = || {
            Tensor::<2>::from_floats([[0.0, 0.9, 0.1], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]], &device)
        };
        let mut rng = SplitMix64::new(42);
        let mut counts = [[0usize; 3]; 3];
        for _ in 0..2000 {
            for (i, j) in sample_negatives(weights(), &mut rng)
                .unwrap()
                .into_iter()
                .enumerate()
            {
                counts[i][j] += 1;
            }
        }
        for (i, row) in counts.iter().enumerate() {
            assert_eq!(row[i], 0, "row {i} drew its own pair");
        }
        assert_eq!(counts[2][1], 2000, "a one-hot row always draws its index");
        let share = counts[0][1] as f64 / 2000.0;
        assert!(
            (share - 0.9).abs() < 0.03,
            "row 0 drew index 1 {share} of the time"
        );
        let share = counts[1][0] as f64 / 2000.0;
        assert!(
            (share - 0.5).abs() < 0.04,
            "row 1 drew index 0 {share} of the time"
        );
        let draw = |seed| sample_negatives(weights(), &mut SplitMix64::new(seed)).unwrap();
        assert_eq!(draw(7), draw(7));
    }

    #[test]
    fn a_row_without_a_candidate_is_an_error_not_its_own_pair() {
        // Row 1's only other sample shares its image (retrieval fine-tuning masks it): the
        // silent fallback drew index 0, the pair itself for row 0 of a batch of one.
        let device = Device::flex();
        let weights = Tensor::<2>::from_floats([[0.0, 1.0], [0.0, 0.0]], &device);
        let err = sample_negatives(weights, &mut SplitMix64::new(1)).unwrap_err();
        assert!(err.to_string().contains("row 1 has no candidate"), "{err}");
        let one = Tensor::<2>::from_floats([[0.0]], &device);
        assert!(sample_negatives(one, &mut SplitMix64::new(1)).is_err());
        let nan = Tensor::<2>::from_floats([[0.0, f32::NAN], [1.0, 0.0]], &device);
        assert!(sample_negatives(nan, &mut SplitMix64::new(1)).is_err());
    }

    #[test]
    fn alpha_ramps_linearly_then_holds() {
        assert_eq!(alpha_ramp(0.4, 0, 0, 100, 2), 0.0);
        assert!((alpha_ramp(0.4, 0, 50, 100, 2) - 0.1).abs() < 1e-12);
        assert!((alpha_ramp(0.4, 1, 0, 100, 2) - 0.2).abs() < 1e-12);
        assert_eq!(alpha_ramp(0.4, 2, 0, 100, 2), 0.4);
        assert_eq!(alpha_ramp(0.4, 5, 17, 100, 2), 0.4);
        assert!((alpha_ramp(0.4, 0, 50, 100, 1) - 0.2).abs() < 1e-12);
    }
}

mod optimiser {
    use super::{Reference, values};
    use blip_train::blip_adamw;
    use burn::module::Param;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor};

    #[test]
    fn two_adamw_steps_equal_torchs() {
        let r = Reference::open();
        let device = Device::flex().autodiff();
        let mut model: Linear = LinearConfig::new(3, 2).init(&device);
        // torch stores [out, in]; burn [in, out].
        model.weight = Param::from_tensor(r.float::<2>("adamw.weight0", &device).transpose());
        model.bias = Some(Param::from_tensor(r.float::<1>("adamw.bias0", &device)));
        let (x, c) = (
            r.float::<2>("adamw.x", &device),
            r.float::<2>("adamw.c", &device),
        );
        let mut optim = blip_adamw().init();
        for step in 1..=2 {
            let loss = (model.forward(x.clone()) * c.clone()).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-2, model, grads);
            let w: Tensor<2> = model.weight.val().transpose();
            super::assert_close(
                &format!("weight after step {step}"),
                values(w),
                r.floats(&format!("adamw.weight{step}")).1,
            );
            let b = values(model.bias.as_ref().unwrap().val());
            super::assert_close(
                &format!("bias after step {step}"),
                b,
                r.floats(&format!("adamw.bias{step}")).1,
            );
        }
    }
}

/// The optimiser record (`optimizer.bpk`) is burn's AdamW's: a record either optimiser wrote
/// resumes in the other, and the next step is the same to float rounding.
#[test]
fn adamw_records_resume_across_burns_and_ours() {
    use blip_train::blip_adamw;
    use burn::module::Param;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
    use burn::tensor::Device;

    let r = Reference::open();
    let device = Device::flex().autodiff();
    let burns = || -> ModuleOptimizer {
        AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-8)
            .with_weight_decay(0.05)
            .init()
    };
    let (x, c) = (
        r.float::<2>("adamw.x", &device),
        r.float::<2>("adamw.c", &device),
    );
    // The second step's gradient is the first's negated: a step without the first's
    // moments moves the other way.
    let grads = |model: &Linear, sign: f32| {
        let loss = (model.forward(x.clone()) * c.clone() * sign).sum();
        GradientsParams::from_grads(loss.backward(), model)
    };
    let weight = |model: &Linear| values(model.weight.val());
    for ours_first in [true, false] {
        let mut model: Linear = LinearConfig::new(3, 2).init(&device);
        model.weight = Param::from_tensor(r.float::<2>("adamw.weight0", &device).transpose());
        let mut first = if ours_first {
            blip_adamw().init()
        } else {
            burns()
        };
        let model = first.step(1e-2, model.clone(), grads(&model, 1.0));
        let record = first.into_bytes().unwrap();
        let resumed = if ours_first {
            burns()
        } else {
            blip_adamw().init()
        };
        let mut resumed = resumed.from_bytes(record).unwrap();
        let continued = first.step(1e-2, model.clone(), grads(&model, -1.0));
        let fresh = blip_adamw()
            .init()
            .step(1e-2, model.clone(), grads(&model, -1.0));
        let resumed = resumed.step(1e-2, model.clone(), grads(&model, -1.0));
        assert_close(
            "weight after a resumed step",
            weight(&resumed),
            weight(&continued),
        );
        // Without the record's moments and step count, the step would differ.
        let apart = weight(&fresh)
            .iter()
            .zip(weight(&continued))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(apart > 1e-3, "a fresh step is only {apart} away");
    }
}

mod clipping {
    use super::{Reference, values};
    use blip_train::clip_grad_norm;
    use burn::module::Param;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor};

    #[test]
    fn global_norm_clipping_equals_torchs() {
        let r = Reference::open();
        let device = Device::flex().autodiff();
        let mut model: Linear = LinearConfig::new(3, 2).init(&device);
        model.weight = Param::from_tensor(r.float::<2>("clip.weight", &device).transpose());
        model.bias = Some(Param::from_tensor(r.float::<1>("clip.bias", &device)));
        let (x, c) = (
            r.float::<2>("adamw.x", &device),
            r.float::<2>("adamw.c", &device),
        );
        let loss = (model.forward(x) * c).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (clipped, norm) = clip_grad_norm(&model, grads, 0.5);
        assert!(
            (norm - r.floats("clip.norm").1[0] as f64).abs() < 1e-4,
            "norm {norm}"
        );
        let w: Tensor<2> = clipped.get::<2>(model.weight.id).unwrap().transpose();
        super::assert_close(
            "clipped weight grad",
            values(w),
            r.floats("clip.grad.weight").1,
        );
        let b: Tensor<1> = clipped.get::<1>(model.bias.as_ref().unwrap().id).unwrap();
        super::assert_close("clipped bias grad", values(b), r.floats("clip.grad.bias").1);
    }
}
