//! Data-parallel training: the [`Collective`] operations a step needs across ranks, and
//! where BLIP's original is distributed.
//!
//! Each rank holds a full copy of the model and trains on its own share of every global
//! batch ([`crate::LoaderConfig::shard`], PyTorch's `DistributedSampler`). Across ranks:
//!
//! | where | what | original |
//! |---|---|---|
//! | [`crate::Trainer::join`] | rank 0's weights, momentum encoders and queues are copied to every rank; the ranks' options are compared by hash | DDP's broadcast at construction |
//! | every optimiser step | gradients are averaged ([`all_reduce_mean_gradients`]) | DDP |
//! | before the queues | momentum features (and image ids) of every rank are enqueued, in rank order | `concat_all_gather` in `_dequeue_and_enqueue` |
//! | retrieval ITM, with `negative_all_rank` | hard negatives are drawn from every rank's images and texts, and gradients flow back to the rank that owns each image | `all_gather_with_grad` |
//! | checkpoints, metrics, progress | rank 0 only | `is_main_process()` |
//!
//! Three implementations: [`SingleProcess`] (one rank, nothing exchanged), [`LocalGroup`]
//! (ranks as threads of one process, one device each, exchanging through host memory) and,
//! with the `mpi` feature, `MpiCollective` (ranks as processes started by `mpirun` or
//! Slurm's `srun`, on one machine or many).
//!
//! Every reduction sums the ranks' values in rank order, so all ranks compute the same
//! result bit for bit, and a [`LocalGroup`] run reproduces an MPI run of as many ranks.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Result, TrainError};

/// The operations data-parallel training exchanges between ranks.
///
/// Every rank must call the same operations in the same order (a collective call is a
/// meeting point). An implementation provides [`Self::all_reduce_sum`] and
/// [`Self::all_gather_bytes`]; the rest are built on them.
///
/// ```
/// use blip_train::{Collective, SingleProcess};
///
/// let one = SingleProcess;
/// assert_eq!((one.rank(), one.world_size()), (0, 1));
/// let mut values = [1.0, 2.0];
/// one.all_reduce_sum(&mut values)?; // a sum over one rank changes nothing
/// assert_eq!(values, [1.0, 2.0]);
/// assert_eq!(one.all_gather_f32(&values)?, vec![1.0, 2.0]);
/// # Ok::<(), blip_train::TrainError>(())
/// ```
pub trait Collective: Send + Sync + fmt::Debug {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// The rank's index among the ranks of its machine (which GPU it drives).
    fn local_rank(&self) -> usize {
        self.rank()
    }

    /// Replaces `values` by their element-wise sum over all ranks (every rank passes the
    /// same length).
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;

    /// Every rank's `bytes` (of any length), in rank order.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Ends every rank of the run at once, after an error on this one (MPI's
    /// `MPI_Abort`). Threads of a [`LocalGroup`] are told instead by the rank leaving
    /// the group, so the default does nothing.
    fn abort(&self, code: i32) {
        let _ = code;
    }

    /// Every rank's `values`, concatenated in rank order. Each rank passes the same length.
    fn all_gather_f32(&self, values: &[f32]) -> Result<Vec<f32>> {
        gather_equal(self, values, "all_gather_f32")
    }

    /// Every rank's `values`, concatenated in rank order. Each rank passes the same length.
    fn all_gather_i64(&self, values: &[i64]) -> Result<Vec<i64>> {
        gather_equal(self, values, "all_gather_i64")
    }

    /// Replaces `values` on every rank by rank `root`'s.
    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()> {
        if self.rank() != root {
            values.fill(0.0);
        }
        self.all_reduce_sum(values)
    }
}

/// Every rank's `values` (as many on each), concatenated in rank order.
fn gather_equal<C: Collective + ?Sized, T: bytemuck::Pod>(
    collective: &C,
    values: &[T],
    what: &str,
) -> Result<Vec<T>> {
    let parts = collective.all_gather_bytes(bytemuck::cast_slice(values))?;
    same_lengths(&parts, std::mem::size_of_val(values), what)?;
    Ok(parts
        .iter()
        .flat_map(|p| bytemuck::pod_collect_to_vec::<u8, T>(p))
        .collect())
}

/// The values of `T` a rank sent as `bytes` (`bytemuck::cast_slice` of them), or `None`
/// when the bytes are not whole values.
pub(crate) fn values_of<T: bytemuck::Pod>(bytes: &[u8]) -> Option<Vec<T>> {
    bytes
        .len()
        .is_multiple_of(std::mem::size_of::<T>())
        .then(|| bytemuck::pod_collect_to_vec(bytes))
}

fn same_lengths(parts: &[Vec<u8>], expected: usize, what: &str) -> Result<()> {
    match parts.iter().position(|p| p.len() != expected) {
        None => Ok(()),
        Some(rank) => Err(TrainError::Distributed(format!(
            "{what}: rank {rank} sent {} bytes, this rank {expected}",
            parts[rank].len()
        ))),
    }
}

/// One rank: training as without distribution.
///
/// ```
/// use blip_train::{Collective, SingleProcess};
///
/// assert_eq!(SingleProcess.all_gather_i64(&[7, 8])?, vec![7, 8]);
/// # Ok::<(), blip_train::TrainError>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
}

/// Ranks as threads of one process, one per device (several GPUs of one machine, or
/// tests): [`LocalGroup::run`] starts them, or each [`LocalGroup::ranks`] member goes to a
/// thread of your own. Values are exchanged through host memory.
///
/// Ranks must not share one rayon pool: a pool worker waiting in an exchange can be holding
/// another rank's task on its stack, which then never runs. [`LocalGroup::run`] gives each
/// rank its own pool; threads of your own should do the same when they train on the CPU.
///
/// A member dropped while others still wait (its thread returned an error or panicked)
/// ends their waits with an error naming it, so no rank hangs.
///
/// ```
/// use blip_train::{Collective, LocalGroup};
///
/// let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let handles: Vec<_> = LocalGroup::ranks(3)
///         .into_iter()
///         .map(|rank| {
///             s.spawn(move || {
///                 let mut values = vec![rank.rank() as f32, 1.0];
///                 rank.all_reduce_sum(&mut values).map(|()| values)
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
/// });
/// assert!(sums.iter().all(|s| s == &[3.0, 3.0])); // 0 + 1 + 2, and 1 + 1 + 1
/// ```
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    state: Mutex<Round>,
    turn: Condvar,
}

/// One meeting of the ranks: what each deposited, and what the last arrival published.
struct Round {
    generation: u64,
    deposits: Vec<Option<Vec<u8>>>,
    arrived: usize,
    published: Arc<Vec<Vec<u8>>>,
    left: Option<usize>,
}

impl fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.size)
            .finish()
    }
}

impl LocalGroup {
    /// `n` connected ranks (`n ≥ 1`), rank `i` at index `i`.
    pub fn ranks(n: usize) -> Vec<Self> {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            size: n,
            state: Mutex::new(Round {
                generation: 0,
                deposits: vec![None; n],
                arrived: 0,
                published: Arc::new(Vec::new()),
                left: None,
            }),
            turn: Condvar::new(),
        });
        (0..n)
            .map(|rank| Self {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Runs `f` on `n` ranks (`n ≥ 1`), each on its own thread inside its own rayon pool
    /// with an equal share of the current pool's threads (at least one), and returns their
    /// results in rank order. A rank that panics leaves the group, so the others' next
    /// exchange fails instead of waiting; the first panic is raised again once every rank
    /// has ended.
    ///
    /// ```
    /// use blip_train::{Collective, LocalGroup};
    ///
    /// let ranks = LocalGroup::run(2, |rank| {
    ///     let mut values = [1.0, rank.rank() as f32];
    ///     rank.all_reduce_sum(&mut values).map(|()| values)
    /// })?;
    /// for values in ranks {
    ///     assert_eq!(values?, [2.0, 1.0]);
    /// }
    /// # Ok::<(), blip_train::TrainError>(())
    /// ```
    pub fn run<T: Send>(n: usize, f: impl Fn(LocalGroup) -> T + Sync) -> Result<Vec<T>> {
        let n = n.max(1);
        let threads = (rayon::current_num_threads() / n).max(1);
        let pools = (0..n)
            .map(|_| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| TrainError::Distributed(format!("a thread pool per rank: {e}")))?;
        let f = &f;
        let results: Vec<std::thread::Result<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = Self::ranks(n)
                .into_iter()
                .zip(&pools)
                .map(|(rank, pool)| s.spawn(move || pool.install(move || f(rank))))
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect())
    }

    /// Deposits this rank's bytes and returns everyone's once all have arrived.
    fn exchange(&self, bytes: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let left = |rank| {
            TrainError::Distributed(format!(
                "rank {rank} left the group (its thread ended with an error)"
            ))
        };
        let mut round = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rank) = round.left {
            return Err(left(rank));
        }
        let generation = round.generation;
        round.deposits[self.rank] = Some(bytes);
        round.arrived += 1;
        if round.arrived == self.shared.size {
            let all = round
                .deposits
                .iter_mut()
                .map(|d| d.take().unwrap_or_default());
            round.published = Arc::new(all.collect());
            round.arrived = 0;
            round.generation += 1;
            self.shared.turn.notify_all();
            return Ok(round.published.clone());
        }
        // The published result of this round stays until every rank has deposited again,
        // which this rank has not: it is still there when this rank wakes.
        while round.generation == generation {
            if let Some(rank) = round.left {
                return Err(left(rank));
            }
            round = self
                .shared
                .turn
                .wait(round)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(round.published.clone())
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        let mut round = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        round.left.get_or_insert(self.rank);
        self.shared.turn.notify_all();
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        if self.shared.size == 1 {
            return Ok(());
        }
        let all = self.exchange(bytemuck::cast_slice(values).to_vec())?;
        same_lengths(&all, std::mem::size_of_val(values), "all_reduce_sum")?;
        // Summed in rank order from zero on every rank: the same result everywhere, and
        // the one MPI's reduction of two ranks gives.
        values.fill(0.0);
        for part in all.iter() {
            for (v, x) in values
                .iter_mut()
                .zip(bytemuck::pod_collect_to_vec::<u8, f32>(part))
            {
                *v += x;
            }
        }
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self.exchange(bytes.to_vec())?.as_ref().clone())
    }
}

/// Gradients summed over at most this many values per exchange, so averaging a large
/// model's gradients never holds a second copy of all of them in one buffer.
const BUCKET: usize = 1 << 24;

/// Averages the gradients of `module`'s parameters over all ranks (DDP's all-reduce),
/// bucket by bucket in the module's visiting order. A parameter with a gradient on any
/// rank gets the average, counting a rank without one as zero; one without a gradient
/// anywhere stays without.
///
/// ```
/// use blip_train::{SingleProcess, all_reduce_mean_gradients};
/// use burn::nn::LinearConfig;
/// use burn::optim::GradientsParams;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex().autodiff();
/// let model = LinearConfig::new(2, 1).init(&device);
/// let x = Tensor::<2>::from_floats([[3.0, 4.0]], &device);
/// let grads = GradientsParams::from_grads(model.forward(x).sum().backward(), &model);
/// let grads = all_reduce_mean_gradients(&model, grads, &SingleProcess)?;
/// assert!(grads.get::<2>(model.weight.id).is_some());
/// # Ok::<(), blip_train::TrainError>(())
/// ```
pub fn all_reduce_mean_gradients<M: Module>(
    module: &M,
    mut grads: GradientsParams,
    collective: &dyn Collective,
) -> Result<GradientsParams> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(grads);
    }
    // Each parameter's gradient as host values (removed), in visiting order.
    let mut take = Take {
        grads: &mut grads,
        taken: Vec::new(),
        device: None,
    };
    module.visit(&mut take);
    let (taken, device) = (std::mem::take(&mut take.taken), take.device.take());
    let present: Vec<u8> = taken
        .iter()
        .map(|(_, _, g)| u8::from(g.is_some()))
        .collect();
    let everywhere = collective.all_gather_bytes(&present)?;
    same_lengths(&everywhere, present.len(), "gradient layout")?;
    let any: Vec<bool> = (0..present.len())
        .map(|i| everywhere.iter().any(|p| p[i] != 0))
        .collect();
    let mut reduced: Vec<(ParamId, TensorData)> = Vec::new();
    let mut bucket: Vec<f32> = Vec::new();
    let mut members: Vec<(ParamId, Vec<usize>)> = Vec::new();
    let scale = 1.0 / world as f32;
    let mut flush = |bucket: &mut Vec<f32>, members: &mut Vec<(ParamId, Vec<usize>)>| {
        collective.all_reduce_sum(bucket)?;
        let mut offset = 0;
        for (id, shape) in members.drain(..) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = bucket[offset..offset + n]
                .iter()
                .map(|v| v * scale)
                .collect();
            reduced.push((id, TensorData::new(values, shape)));
            offset += n;
        }
        bucket.clear();
        Ok::<(), TrainError>(())
    };
    for ((id, shape, own), &needed) in taken.into_iter().zip(&any) {
        if !needed {
            continue;
        }
        let n: usize = shape.iter().product();
        match own {
            Some(values) => bucket.extend_from_slice(&values),
            None => bucket.resize(bucket.len() + n, 0.0),
        }
        members.push((id, shape));
        if bucket.len() >= BUCKET {
            flush(&mut bucket, &mut members)?;
        }
    }
    if !members.is_empty() {
        flush(&mut bucket, &mut members)?;
    }
    // A rank without any gradient of its own puts the average on the model's device.
    let Some(device) = device.or_else(|| module_device(module)) else {
        return Ok(grads);
    };
    let mut put = Put {
        grads: &mut grads,
        reduced: reduced.into_iter().collect(),
        device,
    };
    module.visit(&mut put);
    Ok(grads)
}

/// The plain device of `module`'s first parameter (gradients live there).
fn module_device<M: Module>(module: &M) -> Option<Device> {
    struct First(Option<Device>);
    impl ModuleVisitor for First {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.0.is_none() {
                self.0 = Some(param.val().device().inner());
            }
        }
    }
    let mut first = First(None);
    module.visit(&mut first);
    first.0
}

/// Removes each parameter's gradient, as host values, in visiting order.
struct Take<'a> {
    grads: &'a mut GradientsParams,
    taken: Vec<(ParamId, Vec<usize>, Option<Vec<f32>>)>,
    device: Option<Device>,
}

impl ModuleVisitor for Take<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = self.grads.remove::<D>(param.id).map(|g| {
            self.device.get_or_insert_with(|| g.device());
            g.into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("converted to f32")
        });
        self.taken
            .push((param.id, param.val().dims().to_vec(), values));
    }
}

struct Put<'a> {
    grads: &'a mut GradientsParams,
    reduced: std::collections::HashMap<ParamId, TensorData>,
    device: Device,
}

impl ModuleVisitor for Put<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(data) = self.reduced.remove(&param.id) {
            self.grads
                .register(param.id, Tensor::<D>::from_data(data, &self.device));
        }
    }
}

/// Every float parameter of `module` replaced by rank `root`'s (DDP's broadcast at
/// construction: ranks that initialised their models apart start from the same weights).
/// Parameter ids are kept; the values are new leaves on the plain (non-autodiff) device,
/// as values read from a file are: fork the module onto an autodiff device to train it
/// ([`crate::Trainer::join`] does).
///
/// ```
/// use blip_train::{SingleProcess, broadcast_module};
/// use burn::nn::LinearConfig;
/// use burn::tensor::Device;
///
/// let model = LinearConfig::new(2, 1).init(&Device::flex());
/// let same = broadcast_module(model.clone(), &SingleProcess, 0)?;
/// assert_eq!(same.weight.val().into_data(), model.weight.val().into_data());
/// # Ok::<(), blip_train::TrainError>(())
/// ```
pub fn broadcast_module<M: Module>(
    module: M,
    collective: &dyn Collective,
    root: usize,
) -> Result<M> {
    if collective.world_size() == 1 {
        return Ok(module);
    }
    let mut values = Flatten(Vec::new());
    module.visit(&mut values);
    let mut flat = values.0;
    collective.broadcast_f32(&mut flat, root)?;
    let mut unflatten = Unflatten {
        values: flat,
        offset: 0,
    };
    Ok(module.map(&mut unflatten))
}

struct Flatten(Vec<f32>);

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        self.0
            .extend_from_slice(data.as_slice::<f32>().expect("converted to f32"));
    }
}

struct Unflatten {
    values: Vec<f32>,
    offset: usize,
}

impl burn::module::ModuleMapper for Unflatten {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = param.id;
        let value = param.val();
        let n = value.shape().num_elements();
        let data = TensorData::new(
            self.values[self.offset..self.offset + n].to_vec(),
            value.dims().to_vec(),
        );
        self.offset += n;
        // A new leaf on the plain device, as values read from a file are.
        let fresh = Tensor::<D>::from_data(data, &value.device().inner());
        Param::initialized(id, fresh)
    }
}

/// A 64-bit FNV-1a hash of `bytes`: the ranks' options compared at start, image ids made
/// numeric.
pub(crate) fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The paths (`a.b.c`) where two JSON values differ, with both values, at most `limit`.
pub(crate) fn json_differences(
    a: &serde_json::Value,
    b: &serde_json::Value,
    limit: usize,
) -> Vec<String> {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for key in keys {
                    let null = serde_json::Value::Null;
                    let child = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    walk(
                        x.get(key).unwrap_or(&null),
                        y.get(key).unwrap_or(&null),
                        &child,
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: {a} vs {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(a, b, "", &mut out);
    out.truncate(limit);
    out
}

#[cfg(feature = "mpi")]
mod mpi_collective {
    use std::sync::Mutex;

    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{Collective, fmt};
    use crate::error::{Result, TrainError};

    /// Ranks as MPI processes (`mpirun -np N`, Slurm's `srun`), on one machine or many:
    /// the all-reduce and all-gather run through the MPI library (Open MPI, MPICH).
    ///
    /// Rank and world size come from MPI; the local rank (which GPU a rank drives) from
    /// the launcher's environment (`OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID`,
    /// `SLURM_LOCALID`), else from the ranks sharing this machine's memory. Dropping it
    /// finalises MPI. A rank that exits without finalising, or calls
    /// [`Collective::abort`], makes the launcher end the others.
    ///
    /// ```no_run
    /// use blip_train::{Collective, MpiCollective};
    ///
    /// // Started as `mpirun -np 2 my-trainer`.
    /// let mpi = MpiCollective::init()?;
    /// let mut values = [mpi.rank() as f32];
    /// mpi.all_reduce_sum(&mut values)?;
    /// assert_eq!(values, [1.0]); // 0 + 1
    /// # Ok::<(), blip_train::TrainError>(())
    /// ```
    pub struct MpiCollective {
        // Calls are serialised by this lock (MPI initialised at `Threading::Serialized`).
        world: Mutex<SimpleCommunicator>,
        rank: usize,
        size: usize,
        local_rank: usize,
        // Dropped last: finalises MPI.
        _universe: Universe,
    }

    // SAFETY: the communicator is a handle of the MPI library, which was initialised for
    // calls from any thread as long as they do not overlap; the mutex guarantees that.
    unsafe impl Send for MpiCollective {}
    // SAFETY: as above; every use of the handle goes through the mutex.
    unsafe impl Sync for MpiCollective {}

    impl fmt::Debug for MpiCollective {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("MpiCollective")
                .field("rank", &self.rank)
                .field("world_size", &self.size)
                .field("local_rank", &self.local_rank)
                .finish()
        }
    }

    impl MpiCollective {
        /// Initialises MPI (once per process) and joins its world.
        pub fn init() -> Result<Self> {
            let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| {
                    TrainError::Distributed("MPI was already initialised in this process".into())
                })?;
            if threading < mpi::Threading::Serialized {
                return Err(TrainError::Distributed(format!(
                    "the MPI library gives threading level {threading:?}; training calls MPI \
                     from its worker thread and needs Serialized"
                )));
            }
            let world = universe.world();
            let rank = world.rank() as usize;
            let size = world.size() as usize;
            let from_env = [
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID",
                "SLURM_LOCALID",
            ]
            .iter()
            .find_map(|k| std::env::var(k).ok()?.parse().ok());
            let local_rank = match from_env {
                Some(local) => local,
                None => world
                    .split_shared(rank as i32)
                    .rank()
                    .try_into()
                    .unwrap_or(0),
            };
            Ok(Self {
                world: Mutex::new(world),
                rank,
                size,
                local_rank,
                _universe: universe,
            })
        }

        fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
            self.world.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.size
        }

        fn local_rank(&self) -> usize {
            self.local_rank
        }

        fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
            if self.size == 1 {
                return Ok(());
            }
            let send = values.to_vec();
            // MPI's default error handler ends the job on a failed call: no error returns.
            self.world()
                .all_reduce_into(&send[..], values, SystemOperation::sum());
            Ok(())
        }

        fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
            let world = self.world();
            let mut lengths = vec![0u64; self.size];
            world.all_gather_into(&(bytes.len() as u64), &mut lengths[..]);
            let longest = lengths.iter().copied().max().unwrap_or(0) as usize;
            if longest == 0 {
                return Ok(vec![Vec::new(); self.size]);
            }
            let mut padded = bytes.to_vec();
            padded.resize(longest, 0);
            let mut all = vec![0u8; longest * self.size];
            world.all_gather_into(&padded[..], &mut all[..]);
            Ok(all
                .chunks(longest)
                .zip(&lengths)
                .map(|(part, &n)| part[..n as usize].to_vec())
                .collect())
        }

        fn abort(&self, code: i32) {
            self.world().abort(code)
        }
    }
}

#[cfg(feature = "mpi")]
pub use mpi_collective::MpiCollective;
