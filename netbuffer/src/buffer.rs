//! The egress buffer: packets tagged with the epoch that produced them, held until the
//! backup acknowledges that epoch, released in push order, within fixed limits.

use std::collections::vec_deque::{self, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use crate::stats::Stats;

/// Errors of the egress buffer. Every variant that refuses a packet hands it back
/// ([`Error::into_packet`]): the buffer never drops a packet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The limits given to [`EgressBuffer::new`] are unusable.
    #[error(
        "invalid egress buffer limits: max_packets {max_packets} and max_bytes {max_bytes} \
         must both be non-zero"
    )]
    InvalidLimits {
        /// The packet limit given.
        max_packets: usize,
        /// The byte limit given.
        max_bytes: usize,
    },
    /// The buffer holds too much to take this packet now. Apply backpressure: leave the
    /// guest's TX queue alone and push the packet again after the next release.
    #[error(
        "egress buffer full: {held_packets} packets / {held_bytes} bytes held (limits \
         {max_packets} / {max_bytes}), cannot take a {}-byte packet of epoch {epoch}",
        .packet.len()
    )]
    Full {
        /// Epoch the refused packet was tagged with.
        epoch: u64,
        /// Packets held when the push was refused.
        held_packets: usize,
        /// Bytes held when the push was refused.
        held_bytes: usize,
        /// The buffer's packet limit.
        max_packets: usize,
        /// The buffer's byte limit.
        max_bytes: usize,
        /// The refused packet, untouched.
        packet: Bytes,
    },
    /// The packet alone is larger than the byte limit: it could never be held, so waiting
    /// for room would stall the guest forever.
    #[error(
        "a {}-byte packet of epoch {epoch} exceeds the egress buffer's byte limit {max_bytes}",
        .packet.len()
    )]
    TooLarge {
        /// Epoch the refused packet was tagged with.
        epoch: u64,
        /// The buffer's byte limit.
        max_bytes: usize,
        /// The refused packet, untouched.
        packet: Bytes,
    },
    /// The packet is tagged with an older epoch than a packet pushed before it. Holding it
    /// would either reorder the output or release it under the wrong epoch.
    #[error(
        "packet of epoch {epoch} pushed after a packet of epoch {newest}: epochs must not go back"
    )]
    EpochWentBack {
        /// Epoch the refused packet was tagged with.
        epoch: u64,
        /// Newest epoch pushed so far.
        newest: u64,
        /// The refused packet, untouched.
        packet: Bytes,
    },
    /// The packet is tagged with an epoch the backup already acknowledged: packets must be
    /// tagged with the open (not yet committed) epoch.
    #[error("packet of epoch {epoch} pushed after epoch {acked} was acknowledged: tag packets with the open epoch")]
    EpochAlreadyAcked {
        /// Epoch the refused packet was tagged with.
        epoch: u64,
        /// Newest acknowledged epoch.
        acked: u64,
        /// The refused packet, untouched.
        packet: Bytes,
    },
}

impl Error {
    /// The packet a refused push handed back (`None` for [`Error::InvalidLimits`]).
    pub fn into_packet(self) -> Option<Bytes> {
        match self {
            Error::InvalidLimits { .. } => None,
            Error::Full { packet, .. }
            | Error::TooLarge { packet, .. }
            | Error::EpochWentBack { packet, .. }
            | Error::EpochAlreadyAcked { packet, .. } => Some(packet),
        }
    }
}

/// How much the buffer may hold at once. Bytes are packet lengths; the memory behind them
/// is the packets' own allocations (a [`Bytes`] sliced out of a larger buffer keeps the
/// larger buffer alive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most packets held at once (non-zero).
    pub max_packets: usize,
    /// Most bytes held at once (non-zero); also the largest packet that can be held.
    pub max_bytes: usize,
}

/// Whether output commit is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Packets are held until the epoch that produced them is acknowledged.
    Protected,
    /// No backup: packets are handed straight back for transmission.
    PassThrough,
}

/// What [`EgressBuffer::push`] did with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a packet returned for transmission must be transmitted"]
pub enum Pushed {
    /// Held until its epoch is acknowledged.
    Held,
    /// Pass-through mode: transmit this packet now.
    Transmit(Bytes),
}

#[derive(Debug)]
struct HeldPacket {
    epoch: u64,
    pushed_at: Instant,
    data: Bytes,
}

/// The egress buffer of one protected VM (see the crate docs).
///
/// Held packets sit in one `VecDeque` in push order. Their epochs never decrease from
/// front to back, so the packets of every acknowledged epoch form a prefix of the queue.
#[derive(Debug)]
pub struct EgressBuffer {
    limits: Limits,
    mode: Mode,
    queue: VecDeque<HeldPacket>,
    held_bytes: usize,
    /// Newest epoch pushed in protected mode.
    newest: Option<u64>,
    /// Newest epoch acknowledged.
    acked: Option<u64>,
    stats: Stats,
}

impl EgressBuffer {
    /// An empty buffer with the given limits, starting in `mode`.
    pub fn new(limits: Limits, mode: Mode) -> Result<Self, Error> {
        if limits.max_packets == 0 || limits.max_bytes == 0 {
            return Err(Error::InvalidLimits {
                max_packets: limits.max_packets,
                max_bytes: limits.max_bytes,
            });
        }
        Ok(Self {
            limits,
            mode,
            queue: VecDeque::new(),
            held_bytes: 0,
            newest: None,
            acked: None,
            stats: Stats::default(),
        })
    }

    /// Whether a packet of `len` bytes would be accepted now (always in pass-through mode).
    /// The device checks this before popping a descriptor from the guest's TX queue.
    pub fn has_room(&self, len: usize) -> bool {
        match self.mode {
            Mode::PassThrough => true,
            Mode::Protected => {
                self.queue.len() < self.limits.max_packets
                    && len <= self.limits.max_bytes - self.held_bytes
            }
        }
    }

    /// Offers a packet produced during `epoch` (the open epoch), at time `now`.
    ///
    /// In pass-through mode the packet comes back as [`Pushed::Transmit`]. In protected mode
    /// it is held until [`release`](Self::release) is called with an epoch `>= epoch`. A
    /// refused packet is handed back inside the error, never dropped; [`Error::Full`] means
    /// backpressure, the other errors are bugs of the caller.
    pub fn push(&mut self, epoch: u64, packet: Bytes, now: Instant) -> Result<Pushed, Error> {
        if self.mode == Mode::PassThrough {
            self.stats.passed_through_packets += 1;
            self.stats.passed_through_bytes += packet.len() as u64;
            return Ok(Pushed::Transmit(packet));
        }
        if let Some(newest) = self.newest.filter(|&newest| epoch < newest) {
            return Err(Error::EpochWentBack {
                epoch,
                newest,
                packet,
            });
        }
        if let Some(acked) = self.acked.filter(|&acked| epoch <= acked) {
            return Err(Error::EpochAlreadyAcked {
                epoch,
                acked,
                packet,
            });
        }
        if packet.len() > self.limits.max_bytes {
            return Err(Error::TooLarge {
                epoch,
                max_bytes: self.limits.max_bytes,
                packet,
            });
        }
        if !self.has_room(packet.len()) {
            self.stats.full_hits += 1;
            return Err(Error::Full {
                epoch,
                held_packets: self.queue.len(),
                held_bytes: self.held_bytes,
                max_packets: self.limits.max_packets,
                max_bytes: self.limits.max_bytes,
                packet,
            });
        }

        let len = packet.len();
        self.newest = Some(epoch);
        self.held_bytes += len;
        self.queue.push_back(HeldPacket {
            epoch,
            pushed_at: now,
            data: packet,
        });
        let s = &mut self.stats;
        s.pushed_packets += 1;
        s.pushed_bytes += len as u64;
        s.held_packets = self.queue.len() as u64;
        s.held_bytes = self.held_bytes as u64;
        s.peak_held_packets = s.peak_held_packets.max(s.held_packets);
        s.peak_held_bytes = s.peak_held_bytes.max(s.held_bytes);
        Ok(Pushed::Held)
    }

    /// The backup acknowledged (committed) `acked_epoch` at time `now`: hands back every
    /// held packet tagged `<= acked_epoch`, in push order, for transmission.
    ///
    /// An ack not newer than the newest one seen is stale and releases nothing. The
    /// counters are updated before this returns; dropping the iterator early discards the
    /// packets it did not yield, so transmit them all.
    pub fn release(&mut self, acked_epoch: u64, now: Instant) -> Released<'_> {
        if self.acked.is_some_and(|acked| acked_epoch <= acked) {
            return self.take_front(0, now, false);
        }
        self.acked = Some(acked_epoch);
        let n = self.queue.partition_point(|p| p.epoch <= acked_epoch);
        self.take_front(n, now, false)
    }

    /// Hands back everything held, in push order, acknowledged or not. This is the end of
    /// output commit for these packets: call it only when protection is given up (the
    /// backup is lost and the primary goes on alone).
    pub fn release_all(&mut self, now: Instant) -> Released<'_> {
        self.take_front(self.queue.len(), now, true)
    }

    /// Switches the mode at time `now`. Switching to pass-through releases everything held
    /// (as [`release_all`](Self::release_all)); switching to protected releases nothing.
    ///
    /// Protecting a buffer that holds nothing starts a new protection: its epochs are
    /// counted afresh (a guest protected again by a new backup starts at epoch 1).
    pub fn set_mode(&mut self, mode: Mode, now: Instant) -> Released<'_> {
        if mode == Mode::Protected && self.mode == Mode::PassThrough && self.queue.is_empty() {
            self.newest = None;
            self.acked = None;
        }
        self.mode = mode;
        match mode {
            Mode::PassThrough => self.release_all(now),
            Mode::Protected => self.take_front(0, now, false),
        }
    }

    fn take_front(&mut self, n: usize, now: Instant, unacked: bool) -> Released<'_> {
        let mut bytes = 0;
        for p in self.queue.range(..n) {
            bytes += p.data.len();
            self.stats
                .hold_time
                .record(now.saturating_duration_since(p.pushed_at));
        }
        self.held_bytes -= bytes;
        let s = &mut self.stats;
        s.released_packets += n as u64;
        s.released_bytes += bytes as u64;
        if unacked {
            s.released_unacked_packets += n as u64;
        }
        s.held_packets = (self.queue.len() - n) as u64;
        s.held_bytes = self.held_bytes as u64;
        Released {
            inner: self.queue.drain(..n),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The limits given at creation.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Number of packets held.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes held (sum of packet lengths).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Epoch of the oldest packet held.
    pub fn oldest_held_epoch(&self) -> Option<u64> {
        self.queue.front().map(|p| p.epoch)
    }

    /// The packets held that were pushed for `epoch`, in push order (they stay held).
    pub fn held_of(&self, epoch: u64) -> impl Iterator<Item = &Bytes> + '_ {
        let start = self.queue.partition_point(|p| p.epoch < epoch);
        self.queue
            .range(start..)
            .take_while(move |p| p.epoch == epoch)
            .map(|p| &p.data)
    }

    /// Newest epoch acknowledged so far.
    pub fn acked_epoch(&self) -> Option<u64> {
        self.acked
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// Packets released for transmission, in push order (from [`EgressBuffer::release`],
/// [`EgressBuffer::release_all`] or [`EgressBuffer::set_mode`]).
#[derive(Debug)]
#[must_use = "released packets must be transmitted"]
pub struct Released<'a> {
    inner: vec_deque::Drain<'a, HeldPacket>,
}

impl Iterator for Released<'_> {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        self.inner.next().map(|p| p.data)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl ExactSizeIterator for Released<'_> {}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    const LIMITS: Limits = Limits {
        max_packets: 4,
        max_bytes: 100,
    };

    fn pkt(tag: u8, len: usize) -> Bytes {
        Bytes::from(vec![tag; len])
    }

    fn tags(released: Released<'_>) -> Vec<u8> {
        released.map(|p| p[0]).collect()
    }

    fn held(buf: &mut EgressBuffer, epoch: u64, tag: u8, len: usize, now: Instant) {
        assert_eq!(buf.push(epoch, pkt(tag, len), now).unwrap(), Pushed::Held);
    }

    #[test]
    fn held_of_names_one_epochs_packets_and_keeps_them() {
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        let now = Instant::now();
        held(&mut buf, 3, 1, 10, now);
        held(&mut buf, 4, 2, 10, now);
        held(&mut buf, 4, 3, 10, now);
        held(&mut buf, 6, 4, 10, now);
        let of = |buf: &EgressBuffer, e| buf.held_of(e).map(|p| p[0]).collect::<Vec<_>>();
        assert_eq!(of(&buf, 4), [2, 3]);
        assert_eq!(of(&buf, 5), Vec::<u8>::new());
        assert_eq!(of(&buf, 6), [4]);
        assert_eq!(buf.len(), 4, "nothing released");
        assert_eq!(tags(buf.release(4, now)), [1, 2, 3]);
        assert_eq!(of(&buf, 4), Vec::<u8>::new());
    }

    #[test]
    fn invalid_limits() {
        for (max_packets, max_bytes) in [(0, 10), (10, 0)] {
            let err = EgressBuffer::new(
                Limits {
                    max_packets,
                    max_bytes,
                },
                Mode::Protected,
            )
            .unwrap_err();
            assert!(matches!(err, Error::InvalidLimits { .. }), "{err}");
        }
    }

    #[test]
    fn protecting_again_counts_epochs_afresh() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        held(&mut buf, 500, 1, 10, t);
        assert_eq!(tags(buf.release(500, t)), vec![1]);
        // Given up (backup lost), then protected again by a new backup from epoch 1.
        assert_eq!(tags(buf.set_mode(Mode::PassThrough, t)), Vec::<u8>::new());
        assert!(buf.set_mode(Mode::Protected, t).next().is_none());
        held(&mut buf, 1, 2, 10, t);
        assert_eq!(tags(buf.release(0, t)), Vec::<u8>::new());
        assert_eq!(tags(buf.release(1, t)), vec![2]);
        // Staying protected keeps the count: an epoch that went back is still refused.
        assert!(buf.set_mode(Mode::Protected, t).next().is_none());
        assert!(matches!(
            buf.push(1, pkt(3, 10), t),
            Err(Error::EpochAlreadyAcked { .. })
        ));
    }

    #[test]
    fn pass_through() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::PassThrough).unwrap();
        // Larger than every limit and epochs in any order: pass-through does not care.
        for (epoch, tag) in [(5, 1), (2, 2), (9, 3)] {
            let out = buf.push(epoch, pkt(tag, 1000), t).unwrap();
            assert_eq!(out, Pushed::Transmit(pkt(tag, 1000)));
        }
        assert!(buf.is_empty());
        assert!(buf.has_room(usize::MAX));
        let s = buf.stats();
        assert_eq!(
            (s.passed_through_packets, s.passed_through_bytes),
            (3, 3000)
        );
        assert_eq!((s.pushed_packets, s.held_packets), (0, 0));
    }

    #[test]
    fn hold_until_ack() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        held(&mut buf, 3, 1, 10, t);
        held(&mut buf, 3, 2, 10, t);
        assert_eq!(buf.len(), 2);
        assert_eq!(tags(buf.release(2, t)), Vec::<u8>::new());
        assert_eq!(buf.len(), 2);
        assert_eq!(tags(buf.release(3, t)), [1, 2]);
        assert!(buf.is_empty());
        assert_eq!(buf.held_bytes(), 0);
        assert_eq!(buf.acked_epoch(), Some(3));
    }

    #[test]
    fn in_order_release_across_epochs_and_partial_release() {
        let t = Instant::now();
        let limits = Limits {
            max_packets: 16,
            max_bytes: 1000,
        };
        let mut buf = EgressBuffer::new(limits, Mode::Protected).unwrap();
        for (epoch, tag) in [(1, 1), (1, 2), (2, 3), (4, 4), (4, 5), (5, 6), (7, 7)] {
            held(&mut buf, epoch, tag, 10, t);
        }
        assert_eq!(tags(buf.release(1, t)), [1, 2]);
        assert_eq!(buf.oldest_held_epoch(), Some(2));
        // Epoch 3 produced no packets; acking it releases epoch 2 only.
        assert_eq!(tags(buf.release(3, t)), [3]);
        // One ack may cover several epochs.
        assert_eq!(tags(buf.release(5, t)), [4, 5, 6]);
        assert_eq!(buf.len(), 1);
        assert_eq!(buf.held_bytes(), 10);
        assert_eq!(tags(buf.release(100, t)), [7]);
    }

    #[test]
    fn stale_ack_is_ignored() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        held(&mut buf, 5, 1, 10, t);
        assert_eq!(tags(buf.release(4, t)), Vec::<u8>::new());
        held(&mut buf, 6, 2, 10, t);
        assert_eq!(tags(buf.release(5, t)), [1]);
        // Older and repeated acks release nothing and do not move the watermark back.
        assert_eq!(tags(buf.release(3, t)), Vec::<u8>::new());
        assert_eq!(tags(buf.release(5, t)), Vec::<u8>::new());
        assert_eq!(buf.acked_epoch(), Some(5));
        assert_eq!(buf.len(), 1);
        assert_eq!(tags(buf.release(6, t)), [2]);
    }

    #[test]
    fn epoch_errors_hand_the_packet_back() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        held(&mut buf, 5, 1, 10, t);
        let err = buf.push(4, pkt(2, 10), t).unwrap_err();
        assert!(
            matches!(
                err,
                Error::EpochWentBack {
                    epoch: 4,
                    newest: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.into_packet(), Some(pkt(2, 10)));

        assert_eq!(tags(buf.release(6, t)), [1]);
        let err = buf.push(6, pkt(3, 10), t).unwrap_err();
        assert!(
            matches!(
                err,
                Error::EpochAlreadyAcked {
                    epoch: 6,
                    acked: 6,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.into_packet(), Some(pkt(3, 10)));
        assert!(buf.is_empty());
        assert_eq!(buf.stats().pushed_packets, 1);
    }

    #[test]
    fn full_is_an_error_and_nothing_is_lost() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        // Byte limit: 60 + 40 = 100 fits, one more byte does not.
        held(&mut buf, 1, 1, 60, t);
        assert!(buf.has_room(40));
        assert!(!buf.has_room(41));
        let err = buf.push(1, pkt(2, 41), t).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Full {
                    held_packets: 1,
                    held_bytes: 60,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.into_packet(), Some(pkt(2, 41)));
        held(&mut buf, 2, 2, 40, t);
        assert!(!buf.has_room(1));
        assert!(buf.has_room(0), "an empty packet needs only a packet slot");

        // Packet limit: release, then fill with four one-byte packets.
        assert_eq!(tags(buf.release(2, t)), [1, 2]);
        for tag in 3..7 {
            held(&mut buf, 3, tag, 1, t);
        }
        assert!(!buf.has_room(0));
        let err = buf.push(3, pkt(7, 1), t).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Full {
                    held_packets: 4,
                    ..
                }
            ),
            "{err}"
        );
        let refused = err.into_packet().unwrap();
        assert_eq!(buf.stats().full_hits, 2);

        // The caller retries the refused packet after the next ack; everything comes out.
        assert_eq!(tags(buf.release(3, t)).len(), 4);
        held(&mut buf, 4, 7, refused.len(), t);
        assert_eq!(buf.release(4, t).collect::<Vec<_>>(), [pkt(7, 1)]);
    }

    #[test]
    fn too_large_is_refused_and_handed_back() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        let err = buf.push(1, pkt(1, 101), t).unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { max_bytes: 100, .. }),
            "{err}"
        );
        assert_eq!(err.into_packet(), Some(pkt(1, 101)));
        assert_eq!(buf.stats().full_hits, 0);
        held(&mut buf, 1, 2, 100, t);
    }

    #[test]
    fn switch_to_pass_through_releases_everything_in_order() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        held(&mut buf, 1, 1, 10, t);
        held(&mut buf, 2, 2, 10, t);
        held(&mut buf, 3, 3, 10, t);
        assert_eq!(tags(buf.set_mode(Mode::PassThrough, t)), [1, 2, 3]);
        assert!(buf.is_empty());
        assert_eq!(buf.mode(), Mode::PassThrough);
        assert_eq!(buf.stats().released_unacked_packets, 3);
        assert_eq!(
            buf.push(3, pkt(4, 10), t).unwrap(),
            Pushed::Transmit(pkt(4, 10))
        );

        // Protection resumes with a new backup: later epochs are held again.
        assert_eq!(buf.set_mode(Mode::Protected, t).len(), 0);
        held(&mut buf, 4, 5, 10, t);
        assert_eq!(tags(buf.release_all(t)), [5]);
        assert_eq!(buf.stats().released_unacked_packets, 4);
    }

    #[test]
    fn counters_and_hold_times() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        held(&mut buf, 1, 1, 10, at(0));
        held(&mut buf, 1, 2, 20, at(100));
        held(&mut buf, 2, 3, 30, at(200));
        let _ = buf.push(2, pkt(9, 50), at(250)).unwrap_err();
        let s = *buf.stats();
        assert_eq!((s.held_packets, s.held_bytes), (3, 60));
        assert_eq!((s.pushed_packets, s.pushed_bytes), (3, 60));
        assert_eq!(s.full_hits, 1);
        assert_eq!(s.hold_time.count(), 0);

        // Epoch 1 acked at 1000 µs: holds of 1000 and 900 µs (bucket [512, 1024)).
        assert_eq!(tags(buf.release(1, at(1000))), [1, 2]);
        // Epoch 2 acked at 3200 µs: hold of 3000 µs (bucket [2048, 4096)).
        assert_eq!(tags(buf.release(2, at(3200))), [3]);
        let s = *buf.stats();
        assert_eq!((s.held_packets, s.held_bytes), (0, 0));
        assert_eq!((s.peak_held_packets, s.peak_held_bytes), (3, 60));
        assert_eq!((s.released_packets, s.released_bytes), (3, 60));
        assert_eq!(s.released_unacked_packets, 0);
        let h = s.hold_time;
        assert_eq!(h.count(), 3);
        assert_eq!(h.buckets()[10], 2);
        assert_eq!(h.buckets()[12], 1);
        assert_eq!(h.max(), Duration::from_micros(3000));
        assert_eq!(h.p50(), Some(Duration::from_micros(1024)));
        assert_eq!(h.p99(), Some(Duration::from_micros(3000)));
    }

    #[test]
    fn counters_survive_a_dropped_iterator() {
        let t = Instant::now();
        let mut buf = EgressBuffer::new(LIMITS, Mode::Protected).unwrap();
        held(&mut buf, 1, 1, 10, t);
        held(&mut buf, 1, 2, 10, t);
        let mut out = buf.release(1, t);
        assert_eq!(out.len(), 2);
        assert_eq!(out.next(), Some(pkt(1, 10)));
        drop(out);
        assert!(buf.is_empty());
        assert_eq!(buf.stats().released_packets, 2);
        assert_eq!(buf.stats().held_bytes, 0);
    }

    /// What a test engine does next.
    #[derive(Debug, Clone)]
    enum Op {
        /// Push a packet of this length, tagged with the open epoch.
        Push(usize),
        /// Close the open epoch (a checkpoint was taken); the next one opens.
        Close,
        /// The backup acks the epoch `back` epochs before the newest closed one (may be
        /// stale, may be an epoch already acked).
        Ack(u64),
        /// The backup is lost: go pass-through (releases everything), and later protect
        /// again.
        Unprotect,
        Protect,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (16usize..48).prop_map(Op::Push),
            2 => Just(Op::Close),
            3 => (0u64..3).prop_map(Op::Ack),
            1 => Just(Op::Unprotect),
            1 => Just(Op::Protect),
        ]
    }

    /// Packet `id` of `epoch`, `len` bytes: the id and epoch are written in the first 16.
    fn numbered(id: u64, epoch: u64, len: usize) -> Bytes {
        let mut v = vec![0u8; len];
        v[..8].copy_from_slice(&id.to_le_bytes());
        v[8..16].copy_from_slice(&epoch.to_le_bytes());
        Bytes::from(v)
    }

    fn decode(p: &Bytes) -> (u64, u64) {
        let id = u64::from_le_bytes(p[..8].try_into().unwrap());
        let epoch = u64::from_le_bytes(p[8..16].try_into().unwrap());
        (id, epoch)
    }

    proptest! {
        /// For any interleaving of pushes, acks and mode switches: no packet is released by
        /// an ack before its epoch is acked, nothing is released twice or lost, the output
        /// order equals the push order, and the limits always hold.
        #[test]
        fn output_commit_holds(ops in proptest::collection::vec(op(), 0..200)) {
            let t0 = Instant::now();
            let limits = Limits { max_packets: 8, max_bytes: 200 };
            let mut buf = EgressBuffer::new(limits, Mode::Protected).unwrap();
            let mut open = 1u64;
            let mut acked = 0u64; // Newest ack the buffer has seen (0: none yet).
            let mut next_id = 0u64; // Id of the next accepted packet.
            let mut next_out = 0u64; // Id of the next packet expected on the wire.
            let mut wire = |p: Bytes, max_epoch: Option<u64>| {
                let (id, epoch) = decode(&p);
                assert_eq!(id, next_out, "output order differs from push order");
                if let Some(max) = max_epoch {
                    assert!(epoch <= max, "packet of epoch {epoch} released by ack {max}");
                }
                next_out += 1;
            };
            for (step, op) in ops.into_iter().enumerate() {
                let now = t0 + Duration::from_micros(step as u64);
                match op {
                    Op::Push(len) => {
                        let room = buf.has_room(len);
                        let packet = numbered(next_id, open, len);
                        match buf.push(open, packet.clone(), now) {
                            Ok(Pushed::Held) => {
                                prop_assert!(room && buf.mode() == Mode::Protected);
                                next_id += 1;
                            }
                            Ok(Pushed::Transmit(p)) => {
                                prop_assert_eq!(buf.mode(), Mode::PassThrough);
                                next_id += 1;
                                wire(p, None);
                            }
                            Err(Error::Full { packet: back, .. }) => {
                                prop_assert!(!room);
                                prop_assert_eq!(back, packet);
                            }
                            Err(e) => panic!("unexpected error: {e}"),
                        }
                    }
                    Op::Close => open += 1,
                    Op::Ack(back) => {
                        let epoch = (open - 1).saturating_sub(back);
                        if epoch == 0 {
                            continue;
                        }
                        acked = acked.max(epoch);
                        for p in buf.release(epoch, now) {
                            wire(p, Some(acked));
                        }
                        prop_assert!(buf.oldest_held_epoch().is_none_or(|e| e > acked));
                    }
                    Op::Unprotect => {
                        for p in buf.set_mode(Mode::PassThrough, now) {
                            wire(p, None);
                        }
                        prop_assert!(buf.is_empty());
                    }
                    Op::Protect => {
                        prop_assert_eq!(buf.set_mode(Mode::Protected, now).len(), 0);
                    }
                }
                prop_assert!(buf.len() <= limits.max_packets);
                prop_assert!(buf.held_bytes() <= limits.max_bytes);
                prop_assert_eq!(buf.stats().held_packets, buf.len() as u64);
                prop_assert_eq!(buf.stats().held_bytes, buf.held_bytes() as u64);
            }
            let end = t0 + Duration::from_secs(1);
            for p in buf.release_all(end) {
                wire(p, None);
            }
            prop_assert_eq!(next_out, next_id, "a packet was lost");
            let s = buf.stats();
            prop_assert_eq!(s.pushed_packets, s.released_packets);
            prop_assert_eq!(s.pushed_packets + s.passed_through_packets, next_id);
            prop_assert_eq!(s.hold_time.count(), s.released_packets);
        }
    }
}
