//! Message counters of one run, shared by the source, workers and sinks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one pipeline. Every input message ends in exactly one of
/// `delivered`, `dropped` or `dead_lettered`.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Messages routed to this pipeline.
    pub received: AtomicU64,
    /// Input messages whose every output reached every sink.
    pub delivered: AtomicU64,
    /// Output records written (one input can fan out to several).
    pub records_out: AtomicU64,
    /// Input messages a stage dropped on purpose.
    pub dropped: AtomicU64,
    /// Input messages stored as dead letters.
    pub dead_lettered: AtomicU64,
    /// Times a stage's circuit breaker opened.
    pub breaker_opened: AtomicU64,
    /// Messages whose device key could not be extracted, and which were
    /// keyed by their topic instead. They are also counted in `received`
    /// and end like any other message.
    pub device_key_missing: AtomicU64,
}

impl PipelineStats {
    /// Messages that reached a final state.
    pub fn finished(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
            + self.dropped.load(Ordering::Relaxed)
            + self.dead_lettered.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            breaker_opened: self.breaker_opened.load(Ordering::Relaxed),
            device_key_missing: self.device_key_missing.load(Ordering::Relaxed),
        }
    }
}

/// A copy of [`PipelineStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub delivered: u64,
    pub records_out: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
    pub breaker_opened: u64,
    pub device_key_missing: u64,
}

impl StatsSnapshot {
    /// Logs the counts of `pipeline` at INFO as one line with `message`.
    pub fn log(&self, pipeline: &str, message: &str) {
        tracing::info!(
            pipeline = %pipeline,
            received = self.received,
            delivered = self.delivered,
            records_out = self.records_out,
            dropped = self.dropped,
            dead_lettered = self.dead_lettered,
            device_key_missing = self.device_key_missing,
            "{message}"
        );
    }
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
