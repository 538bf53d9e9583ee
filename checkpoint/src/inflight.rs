//! The primary's window of unacknowledged epochs: what keeps it from queueing unboundedly.
//!
//! At most `max_epochs` epochs (and about `max_bytes` encoded bytes) may be sent and not yet
//! acknowledged. The primary asks [`InFlight::pacing`] before each checkpoint: with room to
//! spare it checkpoints on schedule; with one slot left it lengthens the epoch (fewer,
//! larger epochs cost less per page); with the window full it must not checkpoint at all and
//! throttles the guest until an ack frees a slot. A slow backup therefore slows the guest
//! instead of growing a queue (DESIGN.md invariant 4).
//!
//! Acks are cumulative: `Ack {E}` releases every epoch up to E. An ack for an epoch that
//! was never sent, or was already released, is an error (a confused or hostile peer).
//!
//! [`SharedInFlight`] wraps the window for use from two threads (the epoch loop and the
//! ack reader) and lets the epoch loop wait for room without polling.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Errors of the in-flight window.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InFlightError {
    /// The window has no room for another epoch.
    #[error("cannot send epoch {epoch}: {in_flight} epochs ({bytes} bytes) already await an ack (limit {max_epochs} epochs, {max_bytes} bytes)")]
    Full {
        /// The epoch refused.
        epoch: u64,
        /// Epochs in flight.
        in_flight: usize,
        /// Bytes in flight.
        bytes: u64,
        /// Epoch limit.
        max_epochs: usize,
        /// Byte limit.
        max_bytes: u64,
    },
    /// Epochs must be sent in order.
    #[error("epoch {got} sent out of order: expected epoch {expected}")]
    OutOfOrder {
        /// The epoch sent.
        got: u64,
        /// The epoch expected.
        expected: u64,
    },
    /// An ack names an epoch that is not in flight.
    #[error(
        "ack for epoch {epoch}, but epochs in flight are {first}..={last} (last acked {acked})"
    )]
    UnexpectedAck {
        /// The epoch acked.
        epoch: u64,
        /// Oldest epoch in flight (0 if none).
        first: u64,
        /// Newest epoch sent.
        last: u64,
        /// Last epoch acked before.
        acked: u64,
    },
}

/// What the primary should do about its next checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Checkpoint on schedule.
    Normal,
    /// One slot left: lengthen the epoch.
    Lengthen,
    /// Window full: do not checkpoint; throttle the guest until an ack arrives.
    Throttle,
}

/// One acknowledged epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// The epoch.
    pub epoch: u64,
    /// Encoded bytes it had.
    pub bytes: u64,
    /// Time from [`InFlight::sent`] to the ack.
    pub latency: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    epoch: u64,
    bytes: u64,
    sent: Instant,
}

/// The window of sent, unacknowledged epochs.
#[derive(Debug)]
pub struct InFlight {
    max_epochs: usize,
    max_bytes: u64,
    pending: VecDeque<Pending>,
    bytes: u64,
    last_sent: u64,
    last_acked: u64,
}

impl InFlight {
    /// A window of at most `max_epochs` epochs (at least 1) and `max_bytes` bytes; one
    /// epoch larger than `max_bytes` is still allowed when nothing else is in flight.
    /// `last_committed` is the epoch the backup already holds (0 at the start).
    pub fn new(max_epochs: usize, max_bytes: u64, last_committed: u64) -> Self {
        Self {
            max_epochs: max_epochs.max(1),
            max_bytes,
            pending: VecDeque::with_capacity(max_epochs.max(1)),
            bytes: 0,
            last_sent: last_committed,
            last_acked: last_committed,
        }
    }

    /// Whether an epoch of `bytes` encoded bytes may be sent now.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.pending.is_empty()
            || (self.pending.len() < self.max_epochs && self.bytes + bytes <= self.max_bytes)
    }

    /// What to do about the next checkpoint.
    pub fn pacing(&self) -> Pacing {
        let n = self.pending.len();
        if n >= self.max_epochs || (n > 0 && self.bytes >= self.max_bytes) {
            Pacing::Throttle
        } else if n + 1 >= self.max_epochs && n > 0 {
            Pacing::Lengthen
        } else {
            Pacing::Normal
        }
    }

    /// Records that `epoch` (the next one) was sent with `bytes` encoded bytes.
    pub fn sent(&mut self, epoch: u64, bytes: u64) -> Result<(), InFlightError> {
        if epoch != self.last_sent + 1 {
            return Err(InFlightError::OutOfOrder {
                got: epoch,
                expected: self.last_sent + 1,
            });
        }
        if !self.has_room(bytes) {
            return Err(InFlightError::Full {
                epoch,
                in_flight: self.pending.len(),
                bytes: self.bytes,
                max_epochs: self.max_epochs,
                max_bytes: self.max_bytes,
            });
        }
        self.pending.push_back(Pending {
            epoch,
            bytes,
            sent: Instant::now(),
        });
        self.bytes += bytes;
        self.last_sent = epoch;
        Ok(())
    }

    /// Records a cumulative ack; returns the newest epoch it released.
    pub fn acked(&mut self, epoch: u64) -> Result<Acked, InFlightError> {
        if epoch <= self.last_acked || epoch > self.last_sent {
            return Err(InFlightError::UnexpectedAck {
                epoch,
                first: self.pending.front().map_or(0, |p| p.epoch),
                last: self.last_sent,
                acked: self.last_acked,
            });
        }
        let now = Instant::now();
        let mut last = None;
        while let Some(p) = self.pending.front().copied() {
            if p.epoch > epoch {
                break;
            }
            self.pending.pop_front();
            self.bytes -= p.bytes;
            last = Some(p);
        }
        self.last_acked = epoch;
        let p = last.unwrap_or(Pending {
            epoch,
            bytes: 0,
            sent: now,
        });
        Ok(Acked {
            epoch,
            bytes: p.bytes,
            latency: now.saturating_duration_since(p.sent),
        })
    }

    /// Epochs in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Encoded bytes in flight.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Newest epoch sent.
    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// Newest epoch acknowledged (committed on the backup).
    pub fn last_acked(&self) -> u64 {
        self.last_acked
    }

    /// How long the oldest unacknowledged epoch has waited.
    pub fn oldest_wait(&self) -> Option<Duration> {
        self.pending.front().map(|p| p.sent.elapsed())
    }
}

/// An [`InFlight`] window shared between the epoch loop and the ack reader.
#[derive(Debug)]
pub struct SharedInFlight {
    window: Mutex<InFlight>,
    changed: Condvar,
}

impl SharedInFlight {
    /// Wraps a window.
    pub fn new(window: InFlight) -> Self {
        Self {
            window: Mutex::new(window),
            changed: Condvar::new(),
        }
    }

    /// Locks the window for inspection or update.
    pub fn lock(&self) -> MutexGuard<'_, InFlight> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an ack and wakes waiters.
    pub fn acked(&self, epoch: u64) -> Result<Acked, InFlightError> {
        let r = self.lock().acked(epoch);
        self.changed.notify_all();
        r
    }

    /// Waits until an epoch of `bytes` fits, at most `timeout`; returns whether it fits.
    pub fn wait_for_room(&self, bytes: u64, timeout: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |w| !w.has_room(bytes))
            .unwrap_or_else(|e| e.into_inner());
        guard.has_room(bytes)
    }

    /// Waits until `epoch` is acknowledged, at most `timeout`; returns whether it is.
    pub fn wait_acked(&self, epoch: u64, timeout: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |w| w.last_acked() < epoch)
            .unwrap_or_else(|e| e.into_inner());
        guard.last_acked() >= epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds_epochs_and_paces_the_primary() {
        let mut w = InFlight::new(3, 1 << 20, 0);
        assert_eq!(w.pacing(), Pacing::Normal);
        w.sent(1, 100).unwrap();
        assert_eq!(w.pacing(), Pacing::Normal);
        w.sent(2, 100).unwrap();
        assert_eq!(w.pacing(), Pacing::Lengthen);
        w.sent(3, 100).unwrap();
        assert_eq!(w.pacing(), Pacing::Throttle);
        let err = w.sent(4, 100).unwrap_err();
        assert!(
            matches!(err, InFlightError::Full { in_flight: 3, .. }),
            "{err}"
        );
        assert_eq!(w.len(), 3);

        // Cumulative ack of 2 releases 1 and 2.
        let a = w.acked(2).unwrap();
        assert_eq!((a.epoch, a.bytes), (2, 100));
        assert_eq!((w.len(), w.bytes(), w.last_acked()), (1, 100, 2));
        w.sent(4, 100).unwrap();
        assert_eq!(
            w.sent(6, 1).unwrap_err(),
            InFlightError::OutOfOrder {
                got: 6,
                expected: 5
            }
        );
    }

    #[test]
    fn byte_limit_applies_but_one_large_epoch_may_go_alone() {
        let mut w = InFlight::new(8, 1000, 10);
        w.sent(11, 5000).unwrap();
        assert_eq!(w.pacing(), Pacing::Throttle);
        assert!(w.sent(12, 1).is_err());
        w.acked(11).unwrap();
        w.sent(12, 600).unwrap();
        assert!(!w.has_room(500));
        assert!(w.has_room(400));
    }

    #[test]
    fn stray_acks_are_errors() {
        let mut w = InFlight::new(4, 1 << 20, 0);
        w.sent(1, 1).unwrap();
        assert!(w.acked(2).is_err(), "never sent");
        w.acked(1).unwrap();
        let err = w.acked(1).unwrap_err().to_string();
        assert_eq!(
            err,
            "ack for epoch 1, but epochs in flight are 0..=1 (last acked 1)"
        );
    }

    #[test]
    fn shared_window_wakes_a_waiting_sender() {
        let shared = SharedInFlight::new(InFlight::new(1, 1 << 20, 0));
        shared.lock().sent(1, 10).unwrap();
        assert!(!shared.wait_for_room(10, Duration::from_millis(1)));
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(shared.wait_for_room(10, Duration::from_secs(30)));
                assert!(shared.wait_acked(1, Duration::from_secs(30)));
            });
            shared.acked(1).unwrap();
        });
        assert!(shared.lock().is_empty());
    }
}
