//! Waking inferlets whose passes finished, once per scheduler step.
//!
//! A reply runs on the scheduler's planner thread. Waking the inferlet's
//! tokio task from there goes through the runtime's shared inject queue
//! (and may unpark a worker): about 0.3-0.4 µs of planner time per pass,
//! most of the planner's per-pass cost. Instead each reply only records
//! whom to wake; after a step's replies the scheduler calls [`Wakes::flush`]
//! (see `Scheduler::after_replies`), which hands the whole list to a
//! dispatcher task in one message. Its wake-ups run on a tokio worker,
//! where they are pushes onto that worker's own queue.

use std::sync::{Arc, Mutex};

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, Notify};

type Batch = Vec<Arc<Notify>>;

#[derive(Default)]
pub struct Wakes {
    /// Inferlets to wake at the next flush.
    pending: Mutex<Batch>,
    /// The dispatcher task's inbox, while one runs.
    dispatcher: Mutex<Option<mpsc::UnboundedSender<Batch>>>,
}

impl Wakes {
    /// Wakes `inferlet` at the next flush.
    pub fn defer(&self, inferlet: Arc<Notify>) {
        lock(&self.pending).push(inferlet);
    }

    /// Wakes everyone deferred since the last flush: through the
    /// dispatcher, or here when there is none (or it is gone).
    pub fn flush(&self) {
        let batch = std::mem::take(&mut *lock(&self.pending));
        if batch.is_empty() {
            return;
        }
        let unsent = match lock(&self.dispatcher).as_ref() {
            Some(tx) => tx.send(batch).err().map(|e| e.0),
            None => Some(batch),
        };
        unsent.into_iter().flatten().for_each(|n| n.notify_one());
    }

    /// Starts a dispatcher on the current runtime if none runs. Only on a
    /// multi-thread runtime, whose workers run it for as long as the
    /// runtime lives; a current-thread runtime runs tasks only while
    /// someone blocks on it, so wake-ups could wait there.
    pub fn ensure_dispatcher(&self) {
        let Ok(handle) = Handle::try_current() else {
            return;
        };
        if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
            return;
        }
        let mut dispatcher = lock(&self.dispatcher);
        if dispatcher.as_ref().is_some_and(|tx| !tx.is_closed()) {
            return;
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Batch>();
        handle.spawn(async move {
            while let Some(batch) = rx.recv().await {
                batch.into_iter().for_each(|n| n.notify_one());
            }
        });
        *dispatcher = Some(tx);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
