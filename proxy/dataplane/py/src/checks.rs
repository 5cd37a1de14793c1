//! Turns for the asymmetric JWT signature checks (RS*/PS*/ES*/EdDSA, a
//! token not remembered), which run on tokio's blocking pool, at most as
//! many at a time as the data plane has threads (the checks are CPU-bound:
//! more at once would only queue for the cores; `conn::check_signature`).
//!
//! How many connections wait for a turn and how many checks run now are
//! plain numbers the brain reads at scrape time (`Listener.stats()`,
//! `loopwatch_jwt_signature_checks_waiting` and `_running`): a flood of
//! distinct tokens shows there before the handshakes time out (408).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The turns, and who waits for one.
pub struct SignatureChecks {
    turns: Arc<Semaphore>,
    size: usize,
    waiting: AtomicUsize,
}

/// The checks at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChecksNow {
    /// Connections waiting for a turn.
    pub waiting: usize,
    /// Checks holding a turn: running, or finishing for a connection gone.
    pub running: usize,
}

/// Counts one waiter while it lives: a wait given up (its connection's head
/// deadline, a stop: the future dropped) is no longer counted.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Waiting<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SignatureChecks {
    /// `size` checks at a time (0: none ever runs; tests).
    pub fn new(size: usize) -> SignatureChecks {
        SignatureChecks {
            turns: Arc::new(Semaphore::new(size)),
            size,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Wait for a turn, counted as waiting meanwhile; the turn is the check's
    /// until the permit drops. None never happens (the turns are never closed).
    pub async fn turn(&self) -> Option<OwnedSemaphorePermit> {
        let _waiting = Waiting::enter(&self.waiting);
        Arc::clone(&self.turns).acquire_owned().await.ok()
    }

    pub fn now(&self) -> ChecksNow {
        ChecksNow {
            waiting: self.waiting.load(Ordering::Relaxed),
            running: self.size.saturating_sub(self.turns.available_permits()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_and_turns_are_counted_and_a_wait_given_up_is_not() {
        let checks = SignatureChecks::new(1);
        let idle = ChecksNow {
            waiting: 0,
            running: 0,
        };
        assert_eq!(checks.now(), idle);
        let first = checks.turn().await.expect("a free turn");
        assert_eq!(
            checks.now(),
            ChecksNow {
                waiting: 0,
                running: 1
            }
        );
        {
            let mut second = Box::pin(checks.turn());
            // Polled once: it waits (the only turn is taken).
            assert!(poll_once(&mut second).await.is_none());
            assert_eq!(
                checks.now(),
                ChecksNow {
                    waiting: 1,
                    running: 1
                }
            );
            // Given up (dropped), as at a head's deadline.
        }
        assert_eq!(
            checks.now(),
            ChecksNow {
                waiting: 0,
                running: 1
            }
        );
        drop(first);
        assert_eq!(checks.now(), idle);
    }

    /// Polls a future once: its output, or None while it is pending.
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
