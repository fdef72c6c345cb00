//! Device time of replayed decode steps (`PIE_CUDA_STEP_TIMING=1`): CUDA
//! events around each graph replay, summed per batch bucket and printed to
//! stderr when the driver is dropped. Next to a step's wall time (`pie
//! bench`), it splits a step into GPU work and what the host adds around
//! it (staging the inputs, launching, sampling, copying tokens back).

use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, CudaStream};
use pie_driver::{DriverError, Result};

/// Replays timed per bucket: count, total and fastest device milliseconds.
#[derive(Default)]
struct Totals {
    replays: u64,
    total_ms: f64,
    min_ms: f64,
}

pub struct StepTiming {
    /// Replays whose end event may not have been reached yet.
    pending: Vec<(usize, CudaEvent, CudaEvent)>,
    totals: BTreeMap<usize, Totals>,
}

fn event_err(e: cudarc::driver::DriverError) -> DriverError {
    DriverError::Invalid(format!("CUDA: timing a decode step: {e}"))
}

impl StepTiming {
    /// On when `PIE_CUDA_STEP_TIMING=1`.
    pub fn from_env() -> Option<Self> {
        std::env::var("PIE_CUDA_STEP_TIMING")
            .is_ok_and(|v| v == "1")
            .then(|| StepTiming {
                pending: Vec::new(),
                totals: BTreeMap::new(),
            })
    }

    /// Marks the start of a replay on `stream`; earlier replays that have
    /// finished are added up first. Without waiting for the others: greedy
    /// generation queues a step before the one before it has run, and a
    /// wait here would hold the host back until it had (timing would slow
    /// down what it times).
    pub fn start(&mut self, stream: &Arc<CudaStream>) -> Result<CudaEvent> {
        self.settle(false)?;
        stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(event_err)
    }

    /// Marks the end of `bucket`'s replay that began at `start`.
    pub fn finish(
        &mut self,
        bucket: usize,
        start: CudaEvent,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let end = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(event_err)?;
        self.pending.push((bucket, start, end));
        Ok(())
    }

    /// Adds up the pending replays that have finished, or (`wait`) all of
    /// them once they have. One stream runs them in order, so the finished
    /// ones come first.
    fn settle(&mut self, wait: bool) -> Result<()> {
        let finished = if wait {
            self.pending.len()
        } else {
            self.pending
                .iter()
                .take_while(|(_, _, end)| end.is_complete())
                .count()
        };
        for (bucket, start, end) in self.pending.drain(..finished) {
            let ms = f64::from(start.elapsed_ms(&end).map_err(event_err)?);
            let t = self.totals.entry(bucket).or_default();
            t.min_ms = if t.replays == 0 { ms } else { t.min_ms.min(ms) };
            t.replays += 1;
            t.total_ms += ms;
        }
        Ok(())
    }

    /// One line per bucket: replays, mean and fastest device time.
    pub fn report(&mut self) -> String {
        if let Err(e) = self.settle(true) {
            return format!("cuda step timing: {e}");
        }
        self.totals
            .iter()
            .map(|(bucket, t)| {
                format!(
                    "cuda step timing: batch bucket {bucket}: {} replays, device {:.3} ms mean, {:.3} ms fastest",
                    t.replays,
                    t.total_ms / t.replays as f64,
                    t.min_ms
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for StepTiming {
    fn drop(&mut self) {
        let report = self.report();
        if !report.is_empty() {
            eprintln!("{report}");
        }
    }
}
