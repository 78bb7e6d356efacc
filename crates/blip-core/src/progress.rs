//! Progress of long library calls (a CapFilt run, `blip_train::fit`), reported to a callback
//! the application gives: the library itself draws nothing, so a program picks its own
//! progress bar, log line or UI, or nothing at all.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use blip_core::progress::{Progress, ProgressSink};
//!
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! let sink = ProgressSink::new(move |p: Progress<'_>| log.lock().unwrap().push((p.done, p.total)));
//! sink.report(Progress { done: 3, total: 10, message: "shard 0", finished: false });
//! assert_eq!(*seen.lock().unwrap(), [(3, 10)]);
//! ```

use std::fmt;
use std::sync::Arc;

/// One progress report.
///
/// ```
/// use blip_core::progress::Progress;
///
/// let last = Progress { done: 10, total: 10, message: "shard 2/2", finished: true };
/// let copy = last; // `Copy`: cheap to keep the last report
/// assert_eq!(copy, last);
/// assert!(last.finished && last.done == last.total);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress<'a> {
    /// Units done so far (images, batches), counting those of earlier runs that a resumed
    /// run skips.
    pub done: u64,
    /// Units in the whole call (`done` reaches it when the call completes).
    pub total: u64,
    /// What the call is doing now (`shard 0/2`, the last losses and throughput).
    pub message: &'a str,
    /// The last report of the call, success or not.
    pub finished: bool,
}

/// A callback receiving [`Progress`] reports, called from the thread that runs the work.
/// Cheap to clone.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use blip_core::progress::{Progress, ProgressSink};
///
/// let done = Arc::new(AtomicU64::new(0));
/// let seen = done.clone();
/// let sink = ProgressSink::new(move |p: Progress<'_>| seen.store(p.done, Ordering::Relaxed));
/// let clone = sink.clone(); // clones share the callback
/// clone.report(Progress { done: 7, total: 10, message: "batch 7", finished: false });
/// assert_eq!(done.load(Ordering::Relaxed), 7);
/// assert_eq!(format!("{sink:?}"), "ProgressSink(..)");
/// ```
#[derive(Clone)]
pub struct ProgressSink(Arc<dyn Fn(Progress<'_>) + Send + Sync>);

impl ProgressSink {
    /// A sink calling `f` with every report.
    pub fn new(f: impl Fn(Progress<'_>) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Hands `progress` to the callback.
    pub fn report(&self, progress: Progress<'_>) {
        (self.0)(progress)
    }
}

impl fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProgressSink(..)")
    }
}
