//! Pre-execution: every transaction executed in parallel on the *pre-block* state,
//! ignoring the others, recording what it read (with the values seen) and wrote.
//!
//! This is the hint pass of the `dag` engine, `sealevel`'s `--hints preexec`, and the
//! first phase of `optimistic`. A pre-execution is exact for a transaction none of
//! whose reads was written earlier in the block; for the others it is a prediction.

use parex_core::{ReadError, ReadView, Storage, TxIndex, Vm, VmError, VmExecution};

/// A key read from a prediction, with the predicted value.
pub type Predicted<V> = (<V as Vm>::Key, Option<<V as Vm>::Value>);

/// One transaction executed on the pre-block state.
pub struct PreExecution<V: Vm> {
    /// Keys read from the pre-block state, in the order first read, each once, with the
    /// value seen.
    pub reads: Vec<(V::Key, Option<V::Value>)>,
    /// The one key read from a prediction instead ([`preexecute_predicted`]), with the
    /// predicted value, if the execution read it. (Boxed: mostly absent, and inline it
    /// made every pre-execution, which the engines move around, twice as large.)
    pub predicted: Option<Box<Predicted<V>>>,
    /// The execution (writes and output), or why it failed. A failure may be an artefact
    /// of the stale view (e.g. a nonce not yet bumped by an earlier transaction).
    pub result: Result<VmExecution<V>, VmError>,
}

impl<V: Vm> PreExecution<V> {
    /// The keys the execution wrote (none if it failed).
    pub fn written_keys(&self) -> impl Iterator<Item = &V::Key> {
        self.result
            .iter()
            .flat_map(|e| e.writes.iter().map(|(k, _)| k))
    }
}

/// Executes `tx` alone on the pre-block state.
pub fn preexecute<V, S>(vm: &V, storage: &S, tx: TxIndex) -> PreExecution<V>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    preexecute_predicted(vm, storage, tx, None)
}

/// [`preexecute`], except that one key reads `prediction`'s value instead of the
/// pre-block one: the sender's account as an earlier pre-execution of the same sender
/// left it, say, so that a nonce sequence's later transactions do not fail on the
/// pre-block nonce before reading anything else.
pub fn preexecute_predicted<V, S>(
    vm: &V,
    storage: &S,
    tx: TxIndex,
    prediction: Option<(V::Key, Option<V::Value>)>,
) -> PreExecution<V>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    preexecute_checked(vm, storage, tx, prediction, None)
}

/// Asked before each read of the pre-block state, with the reads so far and the key about
/// to be read: `true` (what was or would be read is out of date) stops the execution
/// there, its read failing with [`ReadError::Aborted`].
pub(crate) type StaleCheck<'c, K, V> = &'c mut dyn FnMut(&[(K, Option<V>)], &K) -> bool;

/// [`preexecute_predicted`], stopped early when `stale` says so (a failed pre-execution,
/// which no engine commits).
pub(crate) fn preexecute_checked<V, S>(
    vm: &V,
    storage: &S,
    tx: TxIndex,
    prediction: Option<(V::Key, Option<V::Value>)>,
    stale: Option<StaleCheck<'_, V::Key, V::Value>>,
) -> PreExecution<V>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let mut view = RecordingView {
        storage,
        reads: Vec::new(),
        prediction,
        predicted: false,
        stale,
    };
    let result = crate::execute_caught(vm, tx, &mut view);
    PreExecution {
        reads: view.reads,
        predicted: view.prediction.filter(|_| view.predicted).map(Box::new),
        result,
    }
}

/// Reads the pre-block state, remembering each key read (once) and its value; the
/// predicted key reads its prediction, and is remembered apart.
struct RecordingView<'a, 'c, K, V, S> {
    storage: &'a S,
    reads: Vec<(K, Option<V>)>,
    prediction: Option<(K, Option<V>)>,
    predicted: bool,
    stale: Option<StaleCheck<'c, K, V>>,
}

impl<K, V, S> ReadView<K, V> for RecordingView<'_, '_, K, V, S>
where
    K: Clone + Eq,
    V: Clone,
    S: Storage<Key = K, Value = V>,
{
    fn read(&mut self, key: &K) -> Result<Option<V>, ReadError> {
        // Executions read a few dozen keys at most: a scan beats hashing.
        if let Some((_, value)) = self.reads.iter().find(|(k, _)| k == key) {
            return Ok(value.clone());
        }
        if let Some((_, value)) = self.prediction.as_ref().filter(|(k, _)| k == key) {
            self.predicted = true;
            return Ok(value.clone());
        }
        if let Some(stale) = &mut self.stale
            && stale(&self.reads, key)
        {
            return Err(ReadError::Aborted);
        }
        let value = self.storage.read(key)?;
        self.reads.push((key.clone(), value.clone()));
        Ok(value)
    }
}
