//! Pre-block state storage.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::vm::{ReadError, ReadView};

/// Reading the pre-block state failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("storage read failed: {0}")]
pub struct StorageError(pub String);

/// The pre-block state, read-only and shared by all workers.
pub trait Storage: Send + Sync {
    type Key;
    type Value;
    /// The value of `key` before the block, or `None` if it does not exist.
    fn read(&self, key: &Self::Key) -> Result<Option<Self::Value>, StorageError>;

    /// The values of `keys` before the block, in the same order, read together: storage
    /// with a deep queue (an SSD) serves them in about the time of one read, so that an
    /// engine that knows several keys ahead loads them with one wait. By default, one
    /// read after another.
    fn read_many(&self, keys: &[Self::Key]) -> Vec<Result<Option<Self::Value>, StorageError>> {
        keys.iter().map(|key| self.read(key)).collect()
    }

    /// About how long one read blocks (zero for memory). Engines use it to keep enough
    /// reads in flight: with slow reads, more workers than cores.
    fn read_latency(&self) -> Duration {
        Duration::ZERO
    }
}

/// The pre-block state as a [`ReadView`] (reads go straight to storage): what a VM's
/// declarations and other pre-block lookups read through.
pub struct PreBlockView<'a, S: ?Sized>(pub &'a S);

impl<S: Storage + ?Sized> ReadView<S::Key, S::Value> for PreBlockView<'_, S> {
    fn read(&mut self, key: &S::Key) -> Result<Option<S::Value>, ReadError> {
        Ok(self.0.read(key)?)
    }
}

/// Storage held in a hash map.
#[derive(Clone, Debug)]
pub struct InMemoryStorage<K, V> {
    entries: HashMap<K, V, alloy_primitives::map::DefaultHashBuilder>,
}

impl<K: Eq + Hash, V> Default for InMemoryStorage<K, V> {
    fn default() -> Self {
        Self {
            entries: HashMap::default(),
        }
    }
}

impl<K: Eq + Hash, V> InMemoryStorage<K, V> {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, key: K, value: V) {
        self.entries.insert(key, value);
    }
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter()
    }
}

impl<K, V> FromIterator<(K, V)> for InMemoryStorage<K, V>
where
    K: Eq + Hash,
{
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        Self {
            entries: iter.into_iter().collect(),
        }
    }
}

impl<K, V> Storage for InMemoryStorage<K, V>
where
    K: Eq + Hash + Send + Sync,
    V: Clone + Send + Sync,
{
    type Key = K;
    type Value = V;
    #[inline]
    fn read(&self, key: &K) -> Result<Option<V>, StorageError> {
        Ok(self.entries.get(key).cloned())
    }
}

/// Adds a fixed delay to every read, modelling a disk-backed node (`--latency-us`).
///
/// The delay blocks the calling thread (like a synchronous disk read), so an engine
/// hides it only by keeping more reads in flight than it has cores: from more threads,
/// or by reading keys together ([`Storage::read_many`]: one delay for every
/// [`LatencyStorage::QUEUE_DEPTH`] keys, as an SSD's queue serves that many reads at
/// once).
#[derive(Debug)]
pub struct LatencyStorage<S> {
    inner: S,
    latency: Duration,
    /// Delays waited so far (reads one by one, and batches).
    waits: AtomicU64,
}

impl<S: Clone> Clone for LatencyStorage<S> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.latency)
    }
}

impl<S> LatencyStorage<S> {
    /// Reads served together by one delay of [`Storage::read_many`] (a modest queue
    /// depth for an NVMe SSD, which serves hundreds).
    pub const QUEUE_DEPTH: usize = 64;

    pub fn new(inner: S, latency: Duration) -> Self {
        Self {
            inner,
            latency,
            waits: AtomicU64::new(0),
        }
    }
    pub fn latency(&self) -> Duration {
        self.latency
    }
    /// How many delays reads have waited so far: one per read, one per batch of up to
    /// [`Self::QUEUE_DEPTH`] keys of `read_many`.
    pub fn waits(&self) -> u64 {
        self.waits.load(Relaxed)
    }
    fn wait(&self) {
        if !self.latency.is_zero() {
            self.waits.fetch_add(1, Relaxed);
            wait(self.latency);
        }
    }
}

impl<S: Storage> Storage for LatencyStorage<S> {
    type Key = S::Key;
    type Value = S::Value;
    fn read(&self, key: &S::Key) -> Result<Option<S::Value>, StorageError> {
        self.wait();
        self.inner.read(key)
    }
    fn read_many(&self, keys: &[S::Key]) -> Vec<Result<Option<S::Value>, StorageError>> {
        for _ in keys.chunks(Self::QUEUE_DEPTH) {
            self.wait();
        }
        self.inner.read_many(keys)
    }
    fn read_latency(&self) -> Duration {
        self.latency + self.inner.read_latency()
    }
}

/// Waits for `duration` the way a blocking disk read does: the thread sleeps and its core
/// is free for other work meanwhile.
fn wait(duration: Duration) {
    std::thread::sleep(duration);
}

impl<S: Storage + ?Sized> Storage for &S {
    type Key = S::Key;
    type Value = S::Value;
    fn read(&self, key: &S::Key) -> Result<Option<S::Value>, StorageError> {
        (**self).read(key)
    }
    fn read_many(&self, keys: &[S::Key]) -> Vec<Result<Option<S::Value>, StorageError>> {
        (**self).read_many(keys)
    }
    fn read_latency(&self) -> Duration {
        (**self).read_latency()
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    type Key = S::Key;
    type Value = S::Value;
    fn read(&self, key: &S::Key) -> Result<Option<S::Value>, StorageError> {
        (**self).read(key)
    }
    fn read_many(&self, keys: &[S::Key]) -> Vec<Result<Option<S::Value>, StorageError>> {
        (**self).read_many(keys)
    }
    fn read_latency(&self) -> Duration {
        (**self).read_latency()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn latency_wrapper_delays_and_passes_values_through() {
        let mut s = InMemoryStorage::new();
        s.insert(1u32, 10u64);
        let slow = LatencyStorage::new(s, Duration::from_micros(300));
        let start = Instant::now();
        assert_eq!(slow.read(&1).unwrap(), Some(10));
        assert_eq!(slow.read(&2).unwrap(), None);
        assert!(start.elapsed() >= Duration::from_micros(600));
        assert_eq!(slow.waits(), 2);
        assert_eq!(slow.read_latency(), Duration::from_micros(300));
        let by_ref = &slow;
        assert_eq!(
            <&_ as Storage>::read_latency(&by_ref),
            Duration::from_micros(300)
        );
    }

    #[test]
    fn keys_read_together_wait_once_per_queue_depth() {
        let depth = LatencyStorage::<()>::QUEUE_DEPTH;
        let s: InMemoryStorage<usize, usize> = (0..depth).map(|k| (k, k * 10)).collect();
        let slow = LatencyStorage::new(s, Duration::from_micros(50));
        let keys: Vec<usize> = (0..=depth).collect();
        let start = Instant::now();
        let got = slow.read_many(&keys);
        // One key more than the queue holds: two delays, and every value as `read` gives.
        assert_eq!(slow.waits(), 2);
        assert!(start.elapsed() >= Duration::from_micros(100));
        let one_by_one: Vec<_> = keys.iter().map(|k| slow.read(k)).collect();
        assert_eq!(got, one_by_one);
        assert_eq!(got[depth], Ok(None));
        assert_eq!(slow.waits(), 2 + keys.len() as u64);
        // Through a reference, and with no delay at all: nothing waited.
        let by_ref = &slow;
        assert_eq!(
            Storage::read_many(&by_ref, &keys[..3]),
            one_by_one[..3].to_vec()
        );
        let fast = LatencyStorage::new(InMemoryStorage::<usize, usize>::new(), Duration::ZERO);
        assert_eq!(fast.read_many(&[1, 2]), vec![Ok(None), Ok(None)]);
        assert_eq!(fast.waits(), 0);
    }
}
