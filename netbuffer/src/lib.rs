//! The egress buffer of output commit.
//!
//! A protected guest runs ahead of its backup: the state it has right now is committed on
//! the backup only when the epoch that produced it is acknowledged. Any packet the guest
//! sends is a promise about that state (an answer, a TCP ACK), so it must not reach the
//! world before the backup remembers the state behind it — otherwise a failover could
//! resume a guest that has forgotten what the client was already told. This crate holds
//! those packets.
//!
//! The engine tags each packet it takes from the guest's virtio-net TX queue with the open
//! epoch and [`push`](EgressBuffer::push)es it here; when the backup acks epoch `E` it
//! calls [`release(E)`](EgressBuffer::release) and transmits what comes out, in order, to
//! the tap. Without a backup the buffer is in [`Mode::PassThrough`] and packets come
//! straight back. When the backup is lost, [`set_mode`](EgressBuffer::set_mode) to
//! pass-through releases everything held, in order, and the primary goes on unprotected.
//! There is no KVM, tap or thread here: the caller owns the buffer and passes the time in
//! (`Instant`), so behaviour and hold-time figures are deterministic under test.
//!
//! ```
//! use std::time::Instant;
//! use netbuffer::{EgressBuffer, Limits, Mode, Pushed};
//!
//! let limits = Limits { max_packets: 1024, max_bytes: 1 << 20 };
//! let mut buf = EgressBuffer::new(limits, Mode::Protected)?;
//! let now = Instant::now();
//! assert_eq!(buf.push(7, vec![0u8; 60].into(), now)?, Pushed::Held);
//! assert_eq!(buf.release(6, now).len(), 0); // epoch 7 not committed yet
//! for packet in buf.release(7, now) {
//!     assert_eq!(packet.len(), 60); // transmit to the tap
//! }
//! # Ok::<(), netbuffer::Error>(())
//! ```
//!
//! # Invariants upheld
//!
//! **2. No packet leaves the primary before the epoch that produced it is committed on the
//! backup.** In protected mode a pushed packet is handed back only by `release(E)` with
//! `E >=` its epoch, or by an explicit [`release_all`](EgressBuffer::release_all) /
//! switch to pass-through, which is the caller giving protection up. Acks only move
//! forward: an ack not newer than the newest one seen releases nothing. Packets are kept
//! in push order and their epochs may not decrease ([`Error::EpochWentBack`]) nor name an
//! already acknowledged epoch ([`Error::EpochAlreadyAcked`]), so what an ack releases is
//! always a prefix of the queue and the wire sees exactly the guest's order.
//!
//! **4. Memory stays bounded whatever the rate.** The buffer never holds more than
//! [`Limits`] (packets and bytes). A push that does not fit fails with [`Error::Full`] and
//! hands the packet back; the caller stops taking descriptors from the TX queue
//! ([`has_room`](EgressBuffer::has_room) lets it check first), so a slow backup throttles
//! the guest's sending instead of growing a queue. Nothing is ever dropped silently: every
//! refused packet comes back inside its error ([`Error::into_packet`]).
//!
//! [`Stats`] counts held, pushed, released and passed-through packets and bytes, the
//! times the buffer was full, and a log2 histogram of hold times with p50/p99.

mod buffer;
mod stats;

pub use buffer::{EgressBuffer, Error, Limits, Mode, Pushed, Released};
pub use stats::{HoldHistogram, Stats, HOLD_BUCKETS};
