//! Counters of the scheduler's work, read by `/metrics` and by tests to see
//! how well passes were batched. Updated with relaxed atomics: each value
//! is exact, a set of them read together may straddle a step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Stats {
    /// Driver calls (steps that ran a batch).
    pub batches: AtomicU64,
    /// Passes answered (finished or failed).
    pub passes: AtomicU64,
    /// Passes that failed.
    pub failed_passes: AtomicU64,
    /// Tokens run through the driver (prompt chunks and decode tokens).
    pub tokens: AtomicU64,
    /// Passes waiting or running now.
    pub queue_depth: AtomicU64,
    /// Tokens and sequences in the latest batch.
    pub last_batch_tokens: AtomicU64,
    pub last_batch_seqs: AtomicU64,
    /// Wall time of the latest step and of every step so far (planning,
    /// driver call and answering), in nanoseconds.
    pub last_step_ns: AtomicU64,
    pub total_step_ns: AtomicU64,
    /// Of that, time inside the driver.
    pub total_driver_ns: AtomicU64,
}

impl Stats {
    pub(crate) fn record_batch(&self, tokens: usize, seqs: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.last_batch_tokens
            .store(tokens as u64, Ordering::Relaxed);
        self.last_batch_seqs.store(seqs as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_step(&self, step: Duration, driver: Duration) {
        let ns = step.as_nanos() as u64;
        self.last_step_ns.store(ns, Ordering::Relaxed);
        self.total_step_ns.fetch_add(ns, Ordering::Relaxed);
        self.total_driver_ns
            .fetch_add(driver.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
