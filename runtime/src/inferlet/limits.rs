//! Per-inferlet limits: wall time (checked at epoch ticks) and linear
//! memory (a `StoreLimits` whose refusals become traps naming the limit).

use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest an inferlet may run, waiting included.
    pub time: Duration,
    /// Most linear memory, in bytes.
    pub memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: Duration::from_secs(600),
            memory: 512 << 20,
        }
    }
}

/// How often the epoch advances: the resolution of the time limit and how
/// often a busy inferlet yields its thread to others.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The limiter a store uses; remembers why it stopped an inferlet.
pub struct MemoryLimiter {
    inner: StoreLimits,
    limit: usize,
}

impl MemoryLimiter {
    pub fn new(limit: usize) -> Self {
        MemoryLimiter {
            inner: StoreLimitsBuilder::new()
                .memory_size(limit)
                .instances(8)
                .tables(64)
                .memories(4)
                .build(),
            limit,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if self.inner.memory_growing(current, desired, maximum)? {
            return Ok(true);
        }
        // A trap, not a failed `memory.grow`: Rust guests abort on a failed
        // allocation anyway, and this way the client reads which limit.
        Err(wasmtime::Error::msg(format!(
            "memory limit exceeded: the inferlet asked for {:.1} MiB of linear memory, its limit is {:.1} MiB",
            desired as f64 / (1 << 20) as f64,
            self.limit as f64 / (1 << 20) as f64
        )))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
}

/// The message for an inferlet stopped by its time limit.
pub fn time_exceeded(limit: Duration) -> String {
    format!("time limit exceeded: the inferlet ran longer than {limit:?}")
}

/// Whether `started + limit` has passed.
pub fn past(started: Instant, limit: Duration) -> bool {
    started.elapsed() > limit
}
