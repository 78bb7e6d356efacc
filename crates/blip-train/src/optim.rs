//! The optimiser of the original training scripts, and gradient clipping.

use blip_core::update::{AdamWStep, adamw};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{
    AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};

/// AdamW as BLIP trains: betas (0.9, 0.999), eps 1e-8, weight decay 0.05 applied to every
/// parameter (the original builds no parameter groups). burn's `AdamWConfig` defaults differ
/// (eps 1e-5, decay 1e-4), hence this constructor.
///
/// ```
/// use blip_train::blip_adamw;
/// use burn::module::Param;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::GradientsParams;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex().autodiff();
/// let mut model = LinearConfig::new(2, 1).with_bias(false).init(&device);
/// model.weight = Param::from_tensor(Tensor::from_floats([[0.5], [0.5]], &device));
/// let x = Tensor::<2>::from_floats([[1.0, 2.0]], &device);
/// let loss = |m: &Linear| m.forward(x.clone()).powi_scalar(2).sum(); // (x·w)²
/// let before: f32 = loss(&model).into_scalar();
/// let mut optim = blip_adamw().init();
/// for _ in 0..10 {
///     let grads = GradientsParams::from_grads(loss(&model).backward(), &model);
///     model = optim.step(1e-2, model, grads);
/// }
/// assert!(loss(&model).into_scalar::<f32>() < before);
/// ```
pub fn blip_adamw() -> BlipAdamW {
    BlipAdamW {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.05,
    }
}

/// AdamW with decoupled weight decay (PyTorch's `AdamW`; [`blip_adamw`] has BLIP's
/// settings). Each parameter's step is one pass of [`blip_core::update::adamw`] over its
/// values and moments, where burn's `AdamW` makes a dozen. The moments are kept as burn's
/// `AdamWState`, so a saved optimiser record (`optimizer.bpk`) is the one burn's `AdamW`
/// writes and reads.
#[derive(Clone, Debug, PartialEq)]
pub struct BlipAdamW {
    /// Decay of the first moment, `β₁`.
    pub beta_1: f32,
    /// Decay of the second moment, `β₂`.
    pub beta_2: f32,
    /// `ε`, added to `√v̂`.
    pub epsilon: f32,
    /// Decoupled weight decay `λ`.
    pub weight_decay: f32,
}

impl BlipAdamW {
    /// The optimiser of a whole module: every float parameter in one group.
    pub fn init(&self) -> ModuleOptimizer {
        ModuleOptimizer::from(self.clone())
    }
}

impl Optimizer for BlipAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (time, moments) = match state {
            Some(AdamWState { momentum }) => (
                momentum.time + 1,
                Some((momentum.moment_1, momentum.moment_2)),
            ),
            None => (1, None),
        };
        let step = AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time,
        };
        let (tensor, m, v) = adamw(tensor, grad, moments, &step);
        let state = AdamWState::new(AdaptiveMomentumState::new(time, m, v));
        (tensor, Some(state))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

/// Clips gradients by their global norm, as PyTorch's `clip_grad_norm_`: with
/// `‖g‖ = sqrt(Σ_params Σ g²)` over every parameter of `module` together, each gradient is
/// scaled by `min(1, max_norm / (‖g‖ + 1e-6))`. (burn's own `GradientClipping::Norm` clips
/// each tensor separately.) Returns the gradients and the norm before clipping.
///
/// ```
/// use blip_train::clip_grad_norm;
/// use burn::nn::LinearConfig;
/// use burn::optim::GradientsParams;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex().autodiff();
/// let model = LinearConfig::new(2, 1).with_bias(false).init(&device);
/// // d/dW Σ(x·W) = xᵀ = [3, 4]: a gradient of norm 5.
/// let x = Tensor::<2>::from_floats([[3.0, 4.0]], &device);
/// let grads = GradientsParams::from_grads(model.forward(x).sum().backward(), &model);
/// let (clipped, norm) = clip_grad_norm(&model, grads, 1.0);
/// assert!((norm - 5.0).abs() < 1e-5); // the norm before clipping
/// let g = clipped.get::<2>(model.weight.id).unwrap();
/// let g = g.into_data().try_into_vec_as::<f32>().unwrap();
/// assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5); // scaled to norm 1
/// ```
pub fn clip_grad_norm<M: Module>(
    module: &M,
    mut grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let mut norm = SquaredNorm {
        grads: &grads,
        sum: 0.0,
    };
    module.visit(&mut norm);
    let total = norm.sum.sqrt();
    let scale = (max_norm / (total + 1e-6)).min(1.0);
    if scale < 1.0 {
        module.visit(&mut Scale {
            grads: &mut grads,
            scale,
        });
    }
    (grads, total)
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: f64,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s: f32 = g.powi_scalar(2).sum().into_scalar();
            self.sum += s as f64;
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    scale: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g * self.scale);
        }
    }
}
