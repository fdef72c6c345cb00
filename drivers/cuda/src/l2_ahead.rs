//! Weights asked into L2 before the GEMV that reads them starts.
//!
//! At batch 1 a small model's GEMVs each read a few MB, too little to
//! keep HBM busy past their ramp-up: each waits on memory latency while
//! the attention between them reads almost nothing. With
//! `PIE_CUDA_L2_AHEAD=N`, each GEMV launch first forks a side stream that
//! asks L2 (`pie_l2_prefetch`, `cp.async.bulk.prefetch.L2`) for the
//! weights of the GEMV launch N launches later, so they arrive while the
//! kernels in between run. Which launch comes N later is learnt from the
//! launches themselves (a decode pass launches the same GEMVs in the same
//! order every step; the first pass of every bucket runs eagerly, before
//! its graph is recorded), and only weights up to
//! `PIE_CUDA_L2_AHEAD_MB` (default 24) in all are asked for, so a large
//! model's GEMVs, which stream at full bandwidth anyway, are left alone.
//! A prefetch only moves lines into L2: it changes no result.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg};
use pie_driver::Result;

use crate::{cuda_err, CudaDriver};

/// Most weight ranges one GEMV launch reads (q/k/v: three).
const MAX_RANGES: usize = 3;
/// Bytes each thread of `pie_l2_prefetch` asks for per request
/// (`PIE_L2_PIECE`), and requests per thread.
const PIECE: usize = 4096;
const PIECES_PER_THREAD: usize = 4;
const THREADS: usize = 128;

/// The weight ranges one GEMV launch reads: (device address, bytes).
pub(crate) type Ranges = Vec<(u64, usize)>;

/// What prefetching ahead keeps between launches.
pub(crate) struct L2Ahead {
    /// How many GEMV launches ahead (0: off).
    ahead: usize,
    /// The most bytes one launch asks for.
    max_bytes: usize,
    /// The stream the prefetches run on (created when on).
    side: Option<Arc<CudaStream>>,
    state: Mutex<State>,
    /// Prefetch launches so far (for tests).
    launches: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The first weight addresses of the last `ahead` launches.
    recent: VecDeque<u64>,
    /// A launch's first weight address → the ranges of the launch
    /// `ahead` launches after it (as last seen).
    later: HashMap<u64, Ranges>,
    /// Whether the side stream has work the main stream has not joined.
    forked: bool,
}

impl L2Ahead {
    pub(crate) fn from_env(ctx: &Arc<CudaContext>) -> Result<Self> {
        let read = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(default)
        };
        Self::new(
            ctx,
            read("PIE_CUDA_L2_AHEAD", 0),
            read("PIE_CUDA_L2_AHEAD_MB", 24) << 20,
        )
    }

    /// `ahead` launches ahead (0: off, at most 16), at most `max_bytes`
    /// a launch.
    fn new(ctx: &Arc<CudaContext>, ahead: usize, max_bytes: usize) -> Result<Self> {
        let ahead = ahead.min(16);
        let side = if ahead > 0 {
            Some(
                ctx.new_stream()
                    .map_err(cuda_err("creating the L2 prefetch stream"))?,
            )
        } else {
            None
        };
        Ok(L2Ahead {
            ahead,
            max_bytes,
            side,
            state: Mutex::new(State::default()),
            launches: AtomicU64::new(0),
        })
    }
}

impl State {
    /// Notes a launch reading `ranges`; returns the ranges of the launch
    /// expected `ahead` launches later, if known.
    fn launched(&mut self, ahead: usize, ranges: &Ranges) -> Option<Ranges> {
        let first = ranges.first()?.0;
        self.recent.push_back(first);
        if self.recent.len() > ahead {
            let before = self.recent.pop_front().expect("longer than ahead ≥ 1");
            self.later.insert(before, ranges.clone());
        }
        self.later.get(&first).cloned()
    }
}

impl CudaDriver {
    /// Before a GEMV launch reading `ranges`: asks L2, on the side
    /// stream, for the weights of the launch expected `ahead` launches
    /// later (nothing when off or not yet known).
    pub(crate) fn prefetch_ahead(&self, ranges: Ranges) -> Result<()> {
        let Some(side) = &self.l2_ahead.side else {
            return Ok(());
        };
        let mut state = self.l2_ahead.state.lock().expect("L2 ahead lock");
        let Some(later) = state.launched(self.l2_ahead.ahead, &ranges) else {
            return Ok(());
        };
        // Whole 16-byte units from 16-byte aligned addresses only.
        let later: Ranges = later
            .into_iter()
            .filter(|&(p, _)| p % 16 == 0)
            .map(|(p, b)| (p, b / 16 * 16))
            .filter(|&(_, b)| b > 0)
            .take(MAX_RANGES)
            .collect();
        let total: usize = later.iter().map(|r| r.1).sum();
        if later.is_empty() || total > self.l2_ahead.max_bytes {
            return Ok(());
        }
        // The side stream starts where the main stream is now.
        let now = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(cuda_err("recording an event"))?;
        side.wait(&now)
            .map_err(cuda_err("forking the L2 prefetch stream"))?;
        let mut args = [(0u64, 0u64); MAX_RANGES];
        for (slot, &(p, b)) in args.iter_mut().zip(&later) {
            *slot = (p, b as u64);
        }
        let widest = later.iter().map(|r| r.1).max().unwrap_or(0);
        let cfg = LaunchConfig {
            grid_dim: (
                widest.div_ceil(PIECE * PIECES_PER_THREAD * THREADS).max(1) as u32,
                later.len() as u32,
                1,
            ),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = side.launch_builder(self.kernels.get("pie_l2_prefetch"));
        for (p, bytes) in &args {
            b.arg(p).arg(bytes);
        }
        // SAFETY: each range lies inside a weight allocation the driver
        // holds for its lifetime; the kernel only reads (prefetches) it.
        unsafe { b.launch(cfg) }.map_err(cuda_err("pie_l2_prefetch"))?;
        state.forked = true;
        self.l2_ahead.launches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many prefetches ran (recorded ones count once).
    pub fn l2_prefetches(&self) -> u64 {
        self.l2_ahead.launches.load(Ordering::Relaxed)
    }

    /// This driver asking L2 for the weights of the GEMV `ahead` launches
    /// later (0: off, the default unless `PIE_CUDA_L2_AHEAD` is set).
    pub fn with_l2_ahead(mut self, ahead: usize) -> Result<Self> {
        let max_bytes = self.l2_ahead.max_bytes;
        self.l2_ahead = L2Ahead::new(&self.ctx, ahead, max_bytes)?;
        Ok(self)
    }

    /// Makes the main stream wait for the prefetches forked since the
    /// last join (a recorded graph must end with every branch joined).
    pub(crate) fn join_prefetches(&self) -> Result<()> {
        let Some(side) = &self.l2_ahead.side else {
            return Ok(());
        };
        let mut state = self.l2_ahead.state.lock().expect("L2 ahead lock");
        if std::mem::take(&mut state.forked) {
            let done = side
                .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(cuda_err("recording an event"))?;
            self.stream
                .wait(&done)
                .map_err(cuda_err("joining the L2 prefetch stream"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::State;

    /// The launch `ahead` launches later is learnt from one pass and
    /// offered from the next on, wrapping from a pass's end to the next
    /// pass's start.
    #[test]
    fn launches_learn_which_comes_ahead() {
        let mut s = State::default();
        let launch = |p: u64| vec![(p, 16 * p as usize)];
        let pass = [1u64, 2, 3, 4];
        let first: Vec<_> = pass.iter().map(|&p| s.launched(2, &launch(p))).collect();
        assert_eq!(first, vec![None, None, None, None]);
        let second: Vec<_> = pass.iter().map(|&p| s.launched(2, &launch(p))).collect();
        assert_eq!(
            second,
            vec![
                Some(launch(3)),
                Some(launch(4)),
                Some(launch(1)),
                Some(launch(2))
            ]
        );
        assert_eq!(s.launched(1, &[].to_vec()), None);
    }
}
