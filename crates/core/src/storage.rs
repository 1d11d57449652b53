//! Pre-block state storage.

use std::collections::HashMap;
use std::hash::Hash;
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
/// hides it only by keeping more reads in flight than it has cores.
#[derive(Clone, Debug)]
pub struct LatencyStorage<S> {
    inner: S,
    latency: Duration,
}

impl<S> LatencyStorage<S> {
    pub fn new(inner: S, latency: Duration) -> Self {
        Self { inner, latency }
    }
    pub fn latency(&self) -> Duration {
        self.latency
    }
}

impl<S: Storage> Storage for LatencyStorage<S> {
    type Key = S::Key;
    type Value = S::Value;
    fn read(&self, key: &S::Key) -> Result<Option<S::Value>, StorageError> {
        if !self.latency.is_zero() {
            wait(self.latency);
        }
        self.inner.read(key)
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
        assert_eq!(slow.read_latency(), Duration::from_micros(300));
        let by_ref = &slow;
        assert_eq!(
            <&_ as Storage>::read_latency(&by_ref),
            Duration::from_micros(300)
        );
    }
}
