//! `checkpoint`: ship a running guest's epochs from the primary to the backup.
//!
//! This crate knows nothing of KVM. The engine owns the VM, pauses the vCPUs, harvests
//! the dirty set and captures vCPU and device state into an opaque blob; this crate
//! encodes, frames, sends, receives, verifies and applies.
//!
//! # The epoch pipeline
//!
//! ```text
//!  primary (engine)                      primary (checkpoint)             backup (checkpoint)
//!  pause vCPUs
//!  harvest dirty set
//!  copy dirty pages to staging  ----->  StagedPages
//!  capture vCPU + device state  ----->  state blob
//!  resume vCPUs
//!                                       EpochEncoder: W workers encode
//!                                       (zero / XOR delta / LZ4 / raw)
//!                                       send_epoch: Begin, Pages.., State,
//!                                       Commit over io_uring TCP  ------>  Staging: decode into
//!                                                                          staging, verify all,
//!                                                                          apply whole
//!                                       InFlight window  <-------------  Ack {epoch}
//!  netbuffer releases the epoch's packets
//! ```
//!
//! Only the first four steps stop the guest; the copy to staging is a memcpy (~0.8 µs a
//! page), everything after it runs while the guest does.
//!
//! # Modules
//!
//! - [`codec`]: one page as Zero, XOR delta (zero-run or LZ4), LZ4 or Raw.
//! - [`delta_cache`]: the primary's bounded memory of what the backup holds (XOR bases).
//! - [`encode`]: the parallel epoch encoder and `send_epoch` / `send_sync`.
//! - [`protocol`]: frames and messages (header, CRC, validation, sequence diagram).
//! - [`transport`]: TCP over io_uring, batched sends, receive timeouts.
//! - [`handshake`]: `Hello` / `HelloOk` / `Refuse`.
//! - [`inflight`]: the bounded window of unacknowledged epochs and pacing advice.
//! - [`staging`]: the backup's staging area and atomic commit.
//! - [`digest`]: the 64-bit digest of RAM + state printed by both sides at the end.
//!
//! # Invariants (DESIGN.md) and how this crate upholds them
//!
//! **1. The backup's state is always exactly some committed epoch.** [`staging::Staging`]
//! never writes guest memory before an epoch's `EpochCommit` has been checked: epoch
//! number (last committed + 1), page and frame counts, state length, no duplicate or
//! out-of-range page, and the digest of every decoded page plus the state against the
//! primary's. Only then are the staged pages copied in and the state blob replaced, in one
//! call. Any failure discards the staged epoch. XOR deltas decode against the committed
//! page, and the digest check catches a primary whose delta base is wrong.
//!
//! **4. Memory stays bounded on both sides.** The primary: the
//! [`inflight::InFlight`] window allows at most K unacknowledged epochs and tells the
//! engine to lengthen epochs, then to throttle the guest; the encoder hands frames over a
//! bounded channel, so a slow network stalls the workers; the delta cache has a fixed
//! capacity. The backup: a frame payload is at most [`protocol::MAX_PAYLOAD_LEN`], checked
//! from the header before the payload is read; staging holds at most one copy of each
//! guest page (duplicates are refused) and a state blob of bounded length.
//!
//! **5. Bad input never damages committed state.** Every frame is checked (magic, version,
//! kind, flags, length bound, CRC32, payload structure) before anything acts on it; page
//! payloads are decoded with bounds checks and never panic (property-tested); a bad frame
//! or a bad epoch yields a one-line error naming what failed (for example
//! `frame checksum mismatch at epoch 17 (Pages frame, 262144-byte payload): expected
//! 0x1c2d3e4f, got 0x0a0b0c0d`), and by invariant 1 the committed epoch is untouched.
//! A configuration mismatch is refused during the handshake on both sides with the
//! differences named.
//!
//! # Using it
//!
//! Primary: [`transport::Connection::connect`], [`handshake::primary_handshake`],
//! [`Connection::split`](transport::Connection::split) (acks are read on another thread
//! and fed to [`inflight::SharedInFlight::acked`]), [`encode::send_sync`] for pre-copy, then
//! per epoch: consult [`inflight::InFlight::pacing`], record
//! [`inflight::InFlight::sent`], and [`encode::send_epoch`]. At the end send
//! `Message::End` with [`digest::digest_regions`] of RAM and state.
//!
//! Backup: [`transport::Connection::accept`], [`handshake::backup_handshake`], then loop
//! `recv` → [`staging::Staging::handle`] → on `Step::Committed` send `Ack`, on an error
//! send `Nack` with the error text; on `Step::End` print both digests.

pub mod codec;
pub mod delta_cache;
pub mod digest;
pub mod disk;
pub mod encode;
pub mod handshake;
pub mod inflight;
pub mod protocol;
pub mod staging;
pub mod tls;
pub mod transport;

/// Size of a guest page: the unit of dirty tracking, encoding and transfer.
pub const PAGE_SIZE: usize = 4096;
