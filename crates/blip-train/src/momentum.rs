//! The state ITC distillation keeps across steps: momentum encoders, feature queues and the
//! learnable temperature's range.

use blip_core::update::moving_average;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Distribution, Tensor};

/// The error of a queue whose size the batch does not divide.
///
/// ```
/// use blip_train::FeatureQueue;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let mut queue = FeatureQueue::new(2, 6, &device);
/// let err = queue.enqueue(Tensor::zeros([4, 2], &device)).unwrap_err();
/// assert_eq!((err.queue, err.batch), (6, 4)); // 4 does not divide 6
/// assert!(err.to_string().contains("cannot take batches of 4"));
/// ```
#[derive(Debug, thiserror::Error)]
#[error(
    "a feature queue of {queue} entries cannot take batches of {batch}: the batch must divide the queue size (the original asserts it)"
)]
pub struct QueueSizeError {
    /// Queue size `K`.
    pub queue: usize,
    /// Batch size `B`.
    pub batch: usize,
}

/// Exponential moving average of parameters: `θ_m ← m·θ_m + (1 − m)·θ` for every float
/// parameter of `momentum`, paired by position with `online`'s (the two modules must have
/// the same structure, as BLIP's `visual_encoder`/`visual_encoder_m` do). No gradient flows.
///
/// ```
/// use blip_train::momentum_update;
/// use burn::module::Param;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let linear = |w: [[f32; 2]; 2]| -> Linear {
///     let mut l = LinearConfig::new(2, 2).with_bias(false).init(&device);
///     l.weight = Param::from_tensor(Tensor::from_floats(w, &device));
///     l
/// };
/// let online = linear([[1.0, 2.0], [3.0, 4.0]]);
/// let momentum = momentum_update(&online, linear([[0.0; 2]; 2]), 0.9);
/// // θ_m ← 0.9·θ_m + 0.1·θ
/// let w = momentum.weight.val().into_data().try_into_vec_as::<f32>().unwrap();
/// for (got, want) in w.iter().zip([0.1, 0.2, 0.3, 0.4]) {
///     assert!((got - want).abs() < 1e-6);
/// }
/// ```
pub fn momentum_update<M: Module>(online: &M, momentum: M, m: f64) -> M {
    let mut collect = Collect(Vec::new());
    online.visit(&mut collect);
    let mut update = Update {
        online: collect.0.into_iter(),
        m,
    };
    momentum.map(&mut update)
}

/// An independent copy of `online` for a momentum encoder (the original's `copy_params`):
/// same values, new parameter ids, detached and excluded from gradient tracking. (A plain
/// `clone` would share the parameters' lazy initialisation, so freezing the copy would
/// freeze the online model too.)
///
/// ```
/// use blip_train::momentum_copy;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::tensor::Device;
///
/// let online = LinearConfig::new(2, 2).init(&Device::flex());
/// let copy = momentum_copy(&online);
/// assert_ne!(copy.weight.id, online.weight.id); // a parameter of its own...
/// let values = |l: &Linear| l.weight.val().into_data().try_into_vec_as::<f32>().unwrap();
/// assert_eq!(values(&copy), values(&online)); // ...with the same values
/// ```
pub fn momentum_copy<M: Module>(online: &M) -> M {
    online.clone().map(&mut Fresh).no_grad()
}

struct Fresh;

impl ModuleMapper for Fresh {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        Param::initialized(ParamId::new(), param.val().detach())
    }
}

struct Collect(Vec<Tensor<1>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val().detach();
        let n = value.shape().num_elements();
        self.0.push(value.reshape([n]));
    }
}

struct Update {
    online: std::vec::IntoIter<Tensor<1>>,
    m: f64,
}

impl ModuleMapper for Update {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let online = self
            .online
            .next()
            .expect("online and momentum modules have the same parameters");
        let m = self.m;
        // The momentum encoders stay in f32 when the online model computes in half
        // precision (mixed-precision training): `moving_average` casts to the average's dtype.
        param.map(|value| moving_average(value, online, m))
    }
}

/// A FIFO of L2-normalised features stored as columns (`[D, K]`), as BLIP's `image_queue` /
/// `text_queue`: a batch overwrites the `B` oldest columns.
///
/// ```
/// use blip_train::FeatureQueue;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let mut queue = FeatureQueue::new(2, 4, &device); // K = 4 random unit vectors of width 2
/// assert_eq!((queue.len(), queue.ptr), (4, 0));
/// // A batch of B = 2 features ([B, D]) overwrites the two oldest columns.
/// queue.enqueue(Tensor::from_floats([[1.0, 0.0], [0.0, 1.0]], &device))?;
/// assert_eq!(queue.ptr, 2);
/// let head = queue.features.clone().narrow(1, 0, 2);
/// assert_eq!(head.into_data().try_into_vec_as::<f32>().unwrap(), [1.0, 0.0, 0.0, 1.0]);
/// queue.enqueue(Tensor::zeros([2, 2], &device))?;
/// assert_eq!(queue.ptr, 0); // wrapped around
/// # Ok::<(), blip_train::QueueSizeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct FeatureQueue {
    /// `[D, K]` features, one per column.
    pub features: Tensor<2>,
    /// Column where the next batch is written.
    pub ptr: usize,
}

impl FeatureQueue {
    /// A queue of `size` random unit vectors of width `dim` (the original initialisation).
    pub fn new(dim: usize, size: usize, device: &Device) -> Self {
        let random = Tensor::<2>::random([dim, size], Distribution::Normal(0.0, 1.0), device);
        let norm = random
            .clone()
            .powi_scalar(2)
            .sum_dim(0)
            .sqrt()
            .clamp_min(1e-12);
        Self {
            features: random / norm,
            ptr: 0,
        }
    }

    /// Number of entries `K`.
    pub fn len(&self) -> usize {
        self.features.dims()[1]
    }

    /// Whether the queue holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes a batch of features `[B, D]` over the oldest `B` columns, after the loss has
    /// used the queue (the original enqueues last). A queue of size 0 keeps nothing: ITC
    /// then contrasts within the batch only.
    pub fn enqueue(&mut self, batch: Tensor<2>) -> Result<(), QueueSizeError> {
        let [b, d] = batch.dims();
        let k = self.len();
        if k == 0 {
            return Ok(());
        }
        if b == 0 || !k.is_multiple_of(b) {
            return Err(QueueSizeError { queue: k, batch: b });
        }
        self.features = self
            .features
            .clone()
            .slice_assign([0..d, self.ptr..self.ptr + b], batch.detach().transpose());
        self.ptr = (self.ptr + b) % k;
        Ok(())
    }
}

/// The learnable temperature kept in BLIP's range: clamped to [0.001, 0.5] before every
/// forward pass (its initial value is 0.07).
///
/// ```
/// use blip_train::clamp_temperature;
/// use burn::tensor::{Device, Tensor};
///
/// let temp = Tensor::<1>::from_floats([0.0001, 0.07, 0.9], &Device::flex());
/// let clamped = clamp_temperature(temp).into_data().try_into_vec_as::<f32>().unwrap();
/// assert_eq!(clamped, [0.001, 0.07, 0.5]);
/// ```
pub fn clamp_temperature(temp: Tensor<1>) -> Tensor<1> {
    temp.clamp(0.001, 0.5)
}
