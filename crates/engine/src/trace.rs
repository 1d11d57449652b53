//! Per-worker timelines of one block run: what each worker did, when, on which
//! transaction. They feed the report's Gantt chart (`parex run --trace FILE`).
//!
//! Tracing off must cost nothing measurable: a worker's [`Recorder`] is then a `None`
//! epoch, and every call is one predictable branch with no clock reading and no
//! allocation. On, a span costs one clock reading and a push into the worker's own
//! vector (no shared state until the worker ends).

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What a worker was doing during a span. Gaps between a worker's spans are idle time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    /// First execution of a transaction.
    Execute,
    /// A later execution (after an abort, a misprediction or a failed merge).
    Reexecute,
    /// Checking a finished execution's reads.
    Validate,
    /// An execution abandoned because it read a value not yet final (its work is lost),
    /// or a transaction suspended before executing because it would have (block-stm: a
    /// nonce sequence's next transaction while the one before has not executed).
    Blocked,
    /// Waiting for work: spinning for a task, or for a lock or dependency to clear.
    Wait,
    /// Executing on the pre-block state to predict access sets (dag, sealevel hints) or
    /// to find the keys to prefetch (block-stm on slow storage).
    Hint,
    /// Merging a finished execution into the block's state in block order (optimistic).
    Merge,
    /// Building the block outcome after execution.
    Finalize,
}

impl SpanKind {
    pub const ALL: [SpanKind; 8] = [
        SpanKind::Execute,
        SpanKind::Reexecute,
        SpanKind::Validate,
        SpanKind::Blocked,
        SpanKind::Wait,
        SpanKind::Hint,
        SpanKind::Merge,
        SpanKind::Finalize,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SpanKind::Execute => "execute",
            SpanKind::Reexecute => "reexecute",
            SpanKind::Validate => "validate",
            SpanKind::Blocked => "blocked",
            SpanKind::Wait => "wait",
            SpanKind::Hint => "hint",
            SpanKind::Merge => "merge",
            SpanKind::Finalize => "finalize",
        }
    }
}

/// One interval of one worker. Times are nanoseconds since the run started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub worker: u32,
    pub kind: SpanKind,
    /// The transaction the span worked on, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tx: Option<u32>,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Every worker's spans of one run, sorted by worker then start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// Workers that ran (span `worker` ids are `0..workers`).
    pub workers: u32,
    /// From the start of the run to the end of its last span.
    pub wall_ns: u64,
    pub spans: Vec<Span>,
}

/// Collects the recorders of one run. Created on or off by the engine's caller.
#[derive(Debug)]
pub struct Tracer {
    epoch: Option<Instant>,
    spans: Mutex<Vec<Span>>,
    workers: Mutex<u32>,
}

impl Tracer {
    /// A tracer that records nothing (its recorders are free).
    pub fn off() -> Self {
        Self::new(false)
    }

    pub fn new(enabled: bool) -> Self {
        Self {
            epoch: enabled.then(Instant::now),
            spans: Mutex::new(Vec::new()),
            workers: Mutex::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.epoch.is_some()
    }

    /// The recorder of worker `worker` (ids should be dense from 0).
    pub fn recorder(&self, worker: usize) -> Recorder {
        Recorder {
            epoch: self.epoch,
            worker: worker as u32,
            spans: Vec::new(),
        }
    }

    /// Hands a worker's spans over (call when the worker ends).
    pub fn submit(&self, recorder: Recorder) {
        if self.epoch.is_none() {
            return;
        }
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        *workers = (*workers).max(recorder.worker + 1);
        drop(workers);
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(recorder.spans);
    }

    /// Adds the spans of `trace`, a run that started at `started`, to this one's.
    pub fn append(&self, trace: Trace, started: Instant) {
        let Some(epoch) = self.epoch else {
            return;
        };
        let shift = started.saturating_duration_since(epoch).as_nanos() as u64;
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        *workers = (*workers).max(trace.workers);
        drop(workers);
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(trace.spans.into_iter().map(|span| Span {
                start_ns: span.start_ns + shift,
                end_ns: span.end_ns + shift,
                ..span
            }));
    }

    /// The trace, if tracing was on.
    pub fn finish(self) -> Option<Trace> {
        self.epoch?;
        let mut spans = self.spans.into_inner().unwrap_or_else(|e| e.into_inner());
        spans.sort_by_key(|s| (s.worker, s.start_ns));
        let wall_ns = spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
        Some(Trace {
            workers: self.workers.into_inner().unwrap_or_else(|e| e.into_inner()),
            wall_ns,
            spans,
        })
    }
}

/// One worker's span recorder. Usage: `let t = rec.start(); ...; rec.record(kind, tx, t)`.
#[derive(Debug)]
pub struct Recorder {
    epoch: Option<Instant>,
    worker: u32,
    spans: Vec<Span>,
}

impl Recorder {
    /// A recorder that records nothing.
    pub fn off() -> Self {
        Self {
            epoch: None,
            worker: 0,
            spans: Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.epoch.is_some()
    }

    /// The current time for a span about to start (0 when off: no clock reading).
    #[inline]
    pub fn start(&self) -> u64 {
        match self.epoch {
            Some(epoch) => epoch.elapsed().as_nanos() as u64,
            None => 0,
        }
    }

    /// Records a span from `start` (a value of [`Recorder::start`]) to now.
    #[inline]
    pub fn record(&mut self, kind: SpanKind, tx: Option<usize>, start: u64) {
        if let Some(epoch) = self.epoch {
            self.push(kind, tx, start, epoch);
        }
    }

    #[cold]
    fn push(&mut self, kind: SpanKind, tx: Option<usize>, start_ns: u64, epoch: Instant) {
        let end_ns = epoch.elapsed().as_nanos() as u64;
        // Merge back-to-back waits into one span (spinning would otherwise flood the trace).
        if kind == SpanKind::Wait
            && let Some(last) = self.spans.last_mut()
            && last.kind == SpanKind::Wait
            && start_ns.saturating_sub(last.end_ns) < 2_000
        {
            last.end_ns = end_ns;
            return;
        }
        self.spans.push(Span {
            worker: self.worker,
            kind,
            tx: tx.map(|t| t as u32),
            start_ns,
            end_ns: end_ns.max(start_ns),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_records_nothing() {
        let tracer = Tracer::off();
        let mut rec = tracer.recorder(0);
        let t = rec.start();
        assert_eq!(t, 0);
        rec.record(SpanKind::Execute, Some(1), t);
        tracer.submit(rec);
        assert!(tracer.finish().is_none());
    }

    #[test]
    fn on_collects_sorted_spans_and_merges_waits() {
        let tracer = Tracer::new(true);
        let mut a = tracer.recorder(1);
        let mut b = tracer.recorder(0);
        let t = a.start();
        a.record(SpanKind::Execute, Some(3), t);
        // Waits that start no later than the previous one ended are merged (the check is
        // on the gap, so starting each at the first one's start keeps the gap at zero
        // however the test thread is scheduled).
        let waited = b.start();
        for _ in 0..10 {
            b.record(SpanKind::Wait, None, waited);
        }
        let t = b.start();
        b.record(SpanKind::Validate, Some(3), t);
        tracer.submit(a);
        tracer.submit(b);
        let trace = tracer.finish().unwrap();
        assert_eq!(trace.workers, 2);
        let kinds: Vec<_> = trace.spans.iter().map(|s| (s.worker, s.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, SpanKind::Wait),
                (0, SpanKind::Validate),
                (1, SpanKind::Execute)
            ]
        );
        assert!(trace.spans.iter().all(|s| s.start_ns <= s.end_ns));
        assert!(trace.wall_ns >= trace.spans[2].end_ns);
    }
}
