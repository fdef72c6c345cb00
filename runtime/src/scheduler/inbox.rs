//! The planner's inbox: passes from the inferlets, results from the
//! executor, shutdown from the last handle — with wake-ups coalesced.
//!
//! With a channel, every submitted pass woke the parked planner: at 256
//! decoding inferlets that was ~50 wake-ups (two context switches and a
//! futex call each) per step, for a planner that only needs the last of
//! them — it waits for a decode cohort to gather anyway. Here the planner
//! says, before it sleeps, how many queued passes are worth waking for
//! ([`Wake`]); a sender wakes it only when its message meets that, and a
//! result or shutdown always does.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::planner::Msg;

/// What the sleeping planner waits for, besides results and shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// This many queued passes (at least one).
    Passes(usize),
    /// Only a result or shutdown (new passes cannot be planned yet).
    ResultsOnly,
}

#[derive(Default)]
pub(super) struct Inbox {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    msgs: Vec<Msg>,
    /// Passes in `msgs`.
    passes: usize,
    /// `msgs` holds a result or a shutdown.
    urgent: bool,
    /// What the planner sleeps for; None while it is awake.
    waiting_for: Option<Wake>,
    /// The planner is gone: nothing sent is read any more.
    closed: bool,
}

impl State {
    fn satisfies(&self, wake: Wake) -> bool {
        self.urgent
            || match wake {
                Wake::Passes(n) => self.passes >= n.max(1),
                Wake::ResultsOnly => false,
            }
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `msg`, waking the planner if it sleeps for what `msg` brings;
    /// gives `msg` back when the planner has stopped.
    pub fn send(&self, msg: Msg) -> Result<(), Msg> {
        let mut s = self.lock();
        if s.closed {
            return Err(msg);
        }
        match &msg {
            Msg::Jobs(jobs) => s.passes += jobs.len(),
            Msg::Done(_) | Msg::Shutdown => s.urgent = true,
        }
        s.msgs.push(msg);
        let wake = s.waiting_for.is_some_and(|w| s.satisfies(w));
        if wake {
            s.waiting_for = None;
            drop(s);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Everything queued, without waiting.
    pub fn drain(&self) -> Vec<Msg> {
        Self::take(&mut self.lock())
    }

    /// Waits until the queue holds what `wake` asks for (or a result or
    /// shutdown), or until `timeout`; then returns everything queued.
    pub fn wait(&self, wake: Wake, timeout: Option<Duration>) -> Vec<Msg> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.lock();
        while !s.satisfies(wake) {
            s.waiting_for = Some(wake);
            s = match deadline {
                None => self.wake.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    self.wake
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        s.waiting_for = None;
        Self::take(&mut s)
    }

    /// Refuses later messages (the planner stops) and returns what was
    /// queued but never read.
    pub fn close(&self) -> Vec<Msg> {
        let mut s = self.lock();
        s.closed = true;
        Self::take(&mut s)
    }

    fn take(s: &mut State) -> Vec<Msg> {
        s.passes = 0;
        s.urgent = false;
        std::mem::take(&mut s.msgs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn shutdown_after(inbox: &Arc<Inbox>, delay: Duration) -> std::thread::JoinHandle<()> {
        let inbox = inbox.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            inbox.send(Msg::Shutdown).ok().unwrap();
        })
    }

    #[test]
    fn a_waiting_planner_sleeps_through_too_few_passes() {
        let inbox = Arc::new(Inbox::default());
        inbox.send(Msg::Jobs(Vec::new())).ok().unwrap();
        // An empty job list counts zero passes: not enough for Passes(1).
        let started = Instant::now();
        let got = inbox.wait(Wake::Passes(1), Some(Duration::from_millis(30)));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(got.len(), 1, "the timeout still returns what is queued");
    }

    fn one_pass() -> Msg {
        let req = super::super::PassRequest {
            tokens: vec![1],
            ..Default::default()
        };
        Msg::Jobs(vec![super::super::planner::Job::new(
            req,
            0,
            None,
            Box::new(|_| {}),
        )])
    }

    #[test]
    fn the_planner_wakes_when_the_expected_passes_are_queued() {
        let inbox = Arc::new(Inbox::default());
        let sender = {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    std::thread::sleep(Duration::from_millis(15));
                    inbox.send(one_pass()).ok().unwrap();
                }
            })
        };
        let started = Instant::now();
        let got = inbox.wait(Wake::Passes(3), Some(Duration::from_secs(10)));
        // Not woken by the first two: all three arrive together.
        assert_eq!(got.len(), 3);
        assert!(started.elapsed() >= Duration::from_millis(45));
        assert!(started.elapsed() < Duration::from_secs(10));
        sender.join().unwrap();
    }

    #[test]
    fn results_and_shutdown_always_wake() {
        let inbox = Arc::new(Inbox::default());
        let sender = shutdown_after(&inbox, Duration::from_millis(20));
        let got = inbox.wait(Wake::ResultsOnly, None);
        assert!(matches!(got.as_slice(), [Msg::Shutdown]));
        sender.join().unwrap();
    }

    #[test]
    fn a_closed_inbox_gives_messages_back() {
        let inbox = Inbox::default();
        inbox.send(Msg::Shutdown).ok().unwrap();
        assert_eq!(inbox.close().len(), 1);
        assert!(inbox.send(Msg::Shutdown).is_err());
    }

    #[test]
    fn queued_messages_satisfy_a_wait_at_once() {
        let inbox = Inbox::default();
        inbox.send(Msg::Shutdown).ok().unwrap();
        let started = Instant::now();
        assert_eq!(inbox.wait(Wake::Passes(5), None).len(), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(inbox.drain().is_empty());
    }
}
