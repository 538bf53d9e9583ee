//! The wire protocol between primary and backup.
//!
//! ```text
//!  primary                                                  backup
//!     |-- Hello {version, page size, RAM layout, vCPUs, id,  -->|
//!     |          disks (size, read-only)}                       |
//!     |<-- HelloOk  | Refuse {reason}  (both sides then exit) --|
//!     |<-- DiskSums {disk, first chunk, SHA-256/128 each} x N --|  the backup's images
//!     |-- DiskSync {disk, offset, bytes done/total, data} x N ->|  chunks that differ,
//!     |                                                         |  written straight to
//!     |                                                         |  the backup's image
//!     |-- SyncPages {bytes done/total, pages} x N ------------->|  pre-copy while the
//!     |                                                         |  guest runs: written
//!     |   pause, harvest dirty set, copy pages, capture state,  |  straight to RAM (no
//!     |   resume; encode on workers                             |  epoch committed yet)
//!     |-- EpochBegin {E, page count, state length} ------------>|  open staging for E
//!     |-- Pages {E, (pfn, encoding, payload)...} x M ---------->|  decode into staging
//!     |-- DiskWrites {E, disk, (offset, data)...} x D --------->|  the epoch's disk writes
//!     |-- Output {E, released, the guest's frames of E} ------->|  only if E has output
//!     |-- State {E, vCPU + device blob} ----------------------->|
//!     |-- EpochCommit {E, pages, frames, disk frames, digest} ->|  verify all, apply
//!     |<-- Ack {E}  | Nack {E, reason} -------------------------|  whole or not at all
//!     |   output commit: packets of E leave the primary         |
//!     |<-- Heartbeat {last epoch} ----------------------------->|  both ways after 100 ms
//!     |                                                         |  without sending, even
//!     |                                                         |  between an epoch's frames
//!     |-- End {E, digest of RAM + state} ---------------------->|  backup compares
//!
//!   planned switchover, after the final epoch E is acknowledged:
//!     |-- Handover {E, the old primary's backup listener} ----->|  can it run E?
//!     |<-- Handover {E, ""} (taken) | Refuse {reason} ----------|
//!     |-- End {E, digest} (taken) ----------------------------->|  promotes E, protects
//!     |   refused: the guest resumes on the primary, epochs go on  it to the listener
//! ```
//!
//! A backup that stops in order (SIGTERM, `POST /stop`) sends `Leave` first: it drops its
//! replica and will never promote, so the primary goes on unprotected without fencing it.
//!
//! `Output` carries the network frames the guest sent during epoch E, held by the
//! primary's egress buffer until `Ack {E}` comes back. The backup keeps them with the
//! committed epoch (they count in the epoch's digest) and, should it promote, sends them
//! on its tap before the guest runs: output that the backup had acknowledged but the dead
//! primary had not yet let out reaches the client without waiting for the guest's
//! retransmission timer. An epoch whose output fits no single frame sends several.
//!
//! `Handover`, `Leave` and `Output` were added without a version bump: an older peer
//! rejects them as an unknown kind and the link breaks, which each side handles as the
//! other lost (fencing as configured; the primary keeps the guest).
//!
//! The primary may send epoch E+1 before `Ack {E}` arrives, up to a small window (see
//! [`InFlight`](crate::inflight::InFlight)); the backup applies epochs strictly in order.
//! The first epoch is 1: committing it turns the pre-copied RAM into a consistent image.
//!
//! Every message is one frame: a fixed 24-byte little-endian [`FrameHeader`] followed by
//! the payload. The CRC32 covers the header bytes before the `crc` field and the payload.
//! Decoding validates magic, version, kind, flags, the length bound [`MAX_PAYLOAD_LEN`],
//! the CRC and then the payload structure; every error names what failed. The version is
//! bumped on any incompatible change; a peer with another version is refused.
//!
//! Payloads (all integers little-endian):
//!
//! | kind | header epoch | payload |
//! | --- | --- | --- |
//! | Hello | 0 | version u16, d u16, page size u32, vCPUs u32, n u32, guest id u64, flags u64, n x (gpa u64, len u64), d x (size u64, flags u64: bit 0 read-only) |
//! | HelloOk | 0 | none |
//! | Refuse | 0 | reason, UTF-8 |
//! | SyncPages | 0 | bytes done u64, bytes total u64, page batch |
//! | EpochBegin | E | page count u64, state length u64 |
//! | Pages | E | page batch |
//! | State | E | the blob |
//! | EpochCommit | E | page count u64, frame count u32, disk frame count u32, state length u64, digest u64 |
//! | Ack | E | none |
//! | Nack | E | reason, UTF-8 |
//! | Heartbeat | last epoch | none |
//! | End | E | digest u64 |
//! | Handover | E | primary: the old primary's backup listener, UTF-8 `host:port`, or empty; backup: empty (taken) |
//! | Leave | committed epoch | why, UTF-8, empty for an operator's stop (backup to primary: it stops in order and drops its replica) |
//! | DiskSums | 0 | disk u32, count u32, first chunk u64, count x 16-byte sum (backup to primary) |
//! | DiskSync | 0 | disk u32, 0 u32, offset u64, bytes done u64, bytes total u64, data |
//! | DiskWrites | E | disk u32, count u32, count x (offset u64, length u32), the data of each in order |
//! | Output | E | released u64 (the last epoch whose output the primary had let out when it sent this), n u32, 0 u32, n x (length u32, frame) |
//!
//! Disks: the initial sync compares images in [`DISK_CHUNK`]-byte chunks (the last one may
//! be shorter); a chunk's sum is the first 16 bytes of its SHA-256, so equal sums mean
//! equal chunks (a collision would need 2^64 work). Offsets and lengths in `DiskWrites` are
//! multiples of 512 and lie inside the disk; `DiskSync` data is at most one chunk and lies
//! inside the image. `EpochCommit`'s digest covers the epoch's disk writes, in order.
//!
//! Every 0 in this table is checked: a frame with anything else there is malformed, so a
//! message has exactly one encoding.
//!
//! A page batch is `count u32` then `count` entries of `pfn u64, encoding u8, length u16`
//! followed by `length` payload bytes (see [`codec`](crate::codec)).

mod batch;
mod message;

use thiserror::Error;

use crate::codec::CodecError;

pub use batch::{PageBatch, PageEntry, PageIter, PagesFrameBuilder};
pub use message::{
    decode_frame, DiskInfo, Hello, MemoryRegion, Message, DISK_WRITES_HEADER_LEN,
    DISK_WRITE_ENTRY_LEN, OUTPUT_FIXED_LEN,
};

/// Frame magic, `"LKSP"` on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"LKSP");
/// Protocol version spoken by this build (2: disks in `Hello`, `DiskSums`, `DiskSync`,
/// `DiskWrites`, and `EpochCommit`'s disk frame count; 3: the `Rle` page encoding).
pub const PROTOCOL_VERSION: u16 = 3;
/// Length of the frame header.
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted (bounds the receive buffer).
pub const MAX_PAYLOAD_LEN: usize = 16 << 20;
/// Largest reason string in `Refuse` and `Nack`.
pub const MAX_REASON_LEN: usize = 4096;
/// Largest number of memory regions in `Hello`.
pub const MAX_REGIONS: usize = 256;
/// Largest number of disks in `Hello`.
pub const MAX_DISKS: usize = 16;
/// The unit of the disks' initial sync: images are compared and sent in chunks of this
/// many bytes (1 MiB).
pub const DISK_CHUNK: u64 = 1 << 20;
/// Bytes of a disk chunk's sum.
pub const DISK_SUM_LEN: usize = 16;
/// Disk writes are whole 512-byte sectors (virtio-blk's sector).
pub const DISK_SECTOR: u64 = 512;
/// Bytes of a page-batch entry before its payload.
pub const ENTRY_HEADER_LEN: usize = 11;
/// Offset of the `crc` field in the header.
const CRC_OFFSET: usize = 20;

/// Errors from encoding or decoding frames.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The frame does not start with the lockstep magic.
    #[error("bad frame magic {got:#010x} (expected {MAGIC:#010x}): the peer is not speaking the lockstep protocol")]
    BadMagic {
        /// The magic received.
        got: u32,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: the peer speaks version {got}, this build speaks version {PROTOCOL_VERSION}")]
    Version {
        /// The version received.
        got: u16,
    },
    /// The message kind is unknown.
    #[error("unknown message kind {kind} at epoch {epoch}")]
    UnknownKind {
        /// The kind byte received.
        kind: u8,
        /// Epoch in the header.
        epoch: u64,
    },
    /// Flags this version does not define are set.
    #[error("{kind:?} frame at epoch {epoch} has unknown flags {flags:#04x}")]
    UnknownFlags {
        /// Kind of the frame.
        kind: MessageKind,
        /// Epoch in the header.
        epoch: u64,
        /// The flags received.
        flags: u8,
    },
    /// The payload is longer than allowed.
    #[error("{kind:?} frame at epoch {epoch} announces a {len}-byte payload, more than the maximum {max}")]
    TooLarge {
        /// Kind of the frame.
        kind: MessageKind,
        /// Epoch in the header.
        epoch: u64,
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The CRC does not match.
    #[error("frame checksum mismatch at epoch {epoch} ({kind:?} frame, {len}-byte payload): expected {expected:#010x}, got {got:#010x}")]
    Checksum {
        /// Kind of the frame.
        kind: MessageKind,
        /// Epoch in the header.
        epoch: u64,
        /// Payload length.
        len: usize,
        /// CRC carried by the frame.
        expected: u32,
        /// CRC computed over what arrived.
        got: u32,
    },
    /// Fewer bytes than a complete frame.
    #[error("incomplete frame: {have} bytes, {need} needed")]
    Incomplete {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The payload does not have the structure its kind requires.
    #[error("malformed {kind:?} frame at epoch {epoch}: {reason}")]
    Malformed {
        /// Kind of the frame.
        kind: MessageKind,
        /// Epoch in the header.
        epoch: u64,
        /// What is wrong.
        reason: String,
    },
    /// A page entry names an unknown encoding.
    #[error("{kind:?} frame at epoch {epoch}, entry {entry}: {source}")]
    Encoding {
        /// Kind of the frame.
        kind: MessageKind,
        /// Epoch in the header.
        epoch: u64,
        /// Index of the entry in the batch.
        entry: u32,
        /// The codec's complaint.
        source: CodecError,
    },
    /// A message is too large to be encoded.
    #[error("cannot encode {kind:?}: {reason}")]
    Encode {
        /// Kind of the message.
        kind: MessageKind,
        /// What is too large.
        reason: String,
    },
}

/// The kind byte of a frame.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Primary introduces itself.
    Hello = 1,
    /// Backup accepts the primary.
    HelloOk = 2,
    /// Either side refuses the other.
    Refuse = 3,
    /// Pre-copy pages, before the first epoch.
    SyncPages = 4,
    /// An epoch starts.
    EpochBegin = 5,
    /// A batch of an epoch's pages.
    Pages = 6,
    /// The epoch's vCPU and device state.
    State = 7,
    /// The epoch is complete.
    EpochCommit = 8,
    /// The backup committed an epoch.
    Ack = 9,
    /// The backup rejected an epoch.
    Nack = 10,
    /// Liveness.
    Heartbeat = 11,
    /// Clean end of replication.
    End = 12,
    /// Planned switchover: the backup promotes after `End`.
    Handover = 13,
    /// The backup stops in order and drops its replica: it will never promote.
    Leave = 14,
    /// The backup's sums of its disk images' chunks (initial sync).
    DiskSums = 15,
    /// A chunk of a disk image the backup lacks (initial sync).
    DiskSync = 16,
    /// An epoch's disk writes.
    DiskWrites = 17,
    /// The network frames the guest sent during an epoch (held for its ack).
    Output = 18,
}

impl MessageKind {
    const ALL: [MessageKind; 18] = [
        MessageKind::Hello,
        MessageKind::HelloOk,
        MessageKind::Refuse,
        MessageKind::SyncPages,
        MessageKind::EpochBegin,
        MessageKind::Pages,
        MessageKind::State,
        MessageKind::EpochCommit,
        MessageKind::Ack,
        MessageKind::Nack,
        MessageKind::Heartbeat,
        MessageKind::End,
        MessageKind::Handover,
        MessageKind::Leave,
        MessageKind::DiskSums,
        MessageKind::DiskSync,
        MessageKind::DiskWrites,
        MessageKind::Output,
    ];

    /// Parses the kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v).wrapping_sub(1)).copied()
    }
}

/// The fixed frame header, little-endian on the wire in field order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// A [`MessageKind`] byte.
    pub kind: u8,
    /// Reserved, zero in version 1.
    pub flags: u8,
    /// The epoch the frame belongs to (see the table in the module docs).
    pub epoch: u64,
    /// Length of the payload that follows.
    pub payload_len: u32,
    /// CRC32 of the header bytes before this field and of the payload.
    pub crc: u32,
}

const _: () = assert!(std::mem::size_of::<FrameHeader>() == HEADER_LEN);

impl FrameHeader {
    /// The header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = self.kind;
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Parses and validates a header: magic, version, kind, flags and length bound.
    /// The CRC is checked by [`decode_frame`] once the payload is there.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(b);
        let h = FrameHeader {
            magic: r.u32_or_zero(),
            version: r.u16_or_zero(),
            kind: r.u8_or_zero(),
            flags: r.u8_or_zero(),
            epoch: r.u64_or_zero(),
            payload_len: r.u32_or_zero(),
            crc: r.u32_or_zero(),
        };
        if h.magic != MAGIC {
            return Err(ProtocolError::BadMagic { got: h.magic });
        }
        if h.version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version { got: h.version });
        }
        let kind = h.message_kind()?;
        if h.flags != 0 {
            return Err(ProtocolError::UnknownFlags {
                kind,
                epoch: h.epoch,
                flags: h.flags,
            });
        }
        if h.payload_len as usize > MAX_PAYLOAD_LEN {
            return Err(ProtocolError::TooLarge {
                kind,
                epoch: h.epoch,
                len: h.payload_len as usize,
                max: MAX_PAYLOAD_LEN,
            });
        }
        Ok(h)
    }

    /// The kind, validated.
    pub fn message_kind(&self) -> Result<MessageKind, ProtocolError> {
        MessageKind::from_u8(self.kind).ok_or(ProtocolError::UnknownKind {
            kind: self.kind,
            epoch: self.epoch,
        })
    }

    /// Header plus payload length.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// The CRC of a frame: the header bytes before the `crc` field, then the payload.
pub fn frame_crc(header: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..CRC_OFFSET]);
    h.update(payload);
    h.finalize()
}

/// The header of a `State` frame carrying `state`, so that the blob can be sent after it
/// without being copied into a frame buffer.
pub fn state_frame_header(epoch: u64, state: &[u8]) -> Result<[u8; HEADER_LEN], ProtocolError> {
    if state.len() > MAX_PAYLOAD_LEN {
        return Err(ProtocolError::Encode {
            kind: MessageKind::State,
            reason: format!("{}-byte state, at most {MAX_PAYLOAD_LEN}", state.len()),
        });
    }
    let mut h = FrameHeader {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        kind: MessageKind::State as u8,
        flags: 0,
        epoch,
        payload_len: state.len() as u32,
        crc: 0,
    };
    h.crc = frame_crc(&h.to_bytes(), state);
    Ok(h.to_bytes())
}

/// Fills in the payload length and CRC of a frame laid out in `frame`.
fn seal_frame(frame: &mut [u8]) {
    let payload_len = (frame.len() - HEADER_LEN) as u32;
    frame[16..20].copy_from_slice(&payload_len.to_le_bytes());
    let (head, payload) = frame.split_at_mut(HEADER_LEN);
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(head);
    let crc = frame_crc(&hb, payload);
    head[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// Little-endian reader over a byte slice; never panics.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.b.split_first_chunk::<N>()?;
        self.b = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|a| a[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    // For fields whose presence the caller checked through the payload length.
    fn u8_or_zero(&mut self) -> u8 {
        self.u8().unwrap_or(0)
    }
    fn u16_or_zero(&mut self) -> u16 {
        self.u16().unwrap_or(0)
    }
    fn u32_or_zero(&mut self) -> u32 {
        self.u32().unwrap_or(0)
    }
    fn u64_or_zero(&mut self) -> u64 {
        self.u64().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_page, encode_page};
    use crate::PAGE_SIZE;
    use bytes::{Bytes, BytesMut};
    use proptest::prelude::*;

    fn batch_frame(epoch: u64, n: u64) -> (Bytes, Vec<[u8; PAGE_SIZE]>) {
        let mut b = PagesFrameBuilder::pages(epoch, 64 << 10);
        let mut pages = Vec::new();
        for i in 0..n {
            let mut p = [0u8; PAGE_SIZE];
            p[..8].copy_from_slice(&(i * 0x0101_0101).to_le_bytes());
            b.push(100 + i, |out| encode_page(&p, None, out));
            pages.push(p);
        }
        (b.finish(), pages)
    }

    fn sample_messages() -> Vec<Message> {
        let (frame, _) = batch_frame(7, 3);
        let Message::Pages { pages, .. } = Message::decode(&frame).unwrap().0 else {
            panic!("not pages");
        };
        vec![
            Message::Hello(Hello::new(
                2,
                vec![MemoryRegion {
                    gpa: 0,
                    len: 512 << 20,
                }],
                42,
            )),
            Message::HelloOk,
            Message::Refuse {
                reason: "vCPU count differs: backup 2, primary 4".into(),
            },
            Message::SyncPages {
                bytes_done: 4096,
                bytes_total: 1 << 30,
                pages: pages.clone(),
            },
            Message::EpochBegin {
                epoch: 7,
                page_count: 3,
                state_len: 5,
            },
            Message::Pages { epoch: 7, pages },
            Message::State {
                epoch: 7,
                bytes: Bytes::from_static(b"state"),
            },
            Message::EpochCommit {
                epoch: 7,
                page_count: 3,
                frame_count: 1,
                disk_frames: 0,
                state_len: 5,
                digest: 0xdead_beef_cafe_f00d,
            },
            Message::Ack { epoch: 7 },
            Message::Nack {
                epoch: 8,
                reason: "digest mismatch".into(),
            },
            Message::Heartbeat { epoch: 7 },
            Message::End {
                epoch: 7,
                digest: 1,
            },
            Message::Handover {
                epoch: 7,
                new_backup: "127.0.0.1:7602".into(),
            },
            Message::Leave {
                epoch: 7,
                reason: String::new(),
            },
            Message::Output {
                epoch: 7,
                released: 5,
                frames: vec![Bytes::from_static(&[0xff; 60]), Bytes::from_static(b"x")],
            },
            Message::Output {
                epoch: 1,
                released: 0,
                frames: Vec::new(),
            },
        ]
    }

    #[test]
    fn every_message_roundtrips_bit_exact() {
        let mut buf = BytesMut::new();
        let msgs = sample_messages();
        for m in &msgs {
            m.encode(&mut buf).unwrap();
        }
        // All frames back to back in one buffer, as a stream would carry them.
        let mut stream = buf.freeze();
        for m in &msgs {
            let (got, used) = Message::decode(&stream).unwrap();
            assert_eq!(&got, m);
            assert_eq!(got.to_frame().unwrap(), stream.slice(..used));
            let _ = stream.split_to(used);
        }
        assert!(stream.is_empty());
    }

    #[test]
    fn state_header_matches_the_encoded_state_frame() {
        let state = b"vcpu and device state";
        let msg = Message::State {
            epoch: 3,
            bytes: Bytes::from_static(state),
        };
        let mut both = state_frame_header(3, state).unwrap().to_vec();
        both.extend_from_slice(state);
        assert_eq!(msg.to_frame().unwrap(), Bytes::from(both));
    }

    #[test]
    fn builder_frames_decode_to_the_pages_pushed() {
        let (frame, pages) = batch_frame(9, 5);
        let (msg, used) = Message::decode(&frame).unwrap();
        assert_eq!(used, frame.len());
        let Message::Pages {
            epoch,
            pages: batch,
        } = msg
        else {
            panic!("{msg:?}");
        };
        assert_eq!((epoch, batch.len()), (9, 5));
        for (i, e) in batch.iter().enumerate() {
            assert_eq!(e.pfn, 100 + i as u64);
            let mut dest = [0xffu8; PAGE_SIZE];
            decode_page(e.encoding, e.payload, &mut dest).unwrap();
            assert!(dest == pages[i]);
        }
        let mut s = PagesFrameBuilder::sync(1024);
        s.push(1, |out| encode_page(&[0; PAGE_SIZE], None, out));
        let Message::SyncPages {
            bytes_done,
            bytes_total,
            pages,
        } = Message::decode(&s.finish_sync(4096, 8192)).unwrap().0
        else {
            panic!("not sync");
        };
        assert_eq!((bytes_done, bytes_total, pages.len()), (4096, 8192, 1));
    }

    #[test]
    fn header_errors_name_what_failed() {
        let frame = Message::Ack { epoch: 17 }.to_frame().unwrap();
        let corrupt = |at: usize, v: u8| {
            let mut f = frame.to_vec();
            f[at] = v;
            Message::decode(&Bytes::from(f)).unwrap_err()
        };
        assert!(matches!(corrupt(0, b'X'), ProtocolError::BadMagic { .. }));
        assert_eq!(
            corrupt(4, 9).to_string(),
            format!(
                "protocol version mismatch: the peer speaks version 9, this build speaks version \
                 {PROTOCOL_VERSION}"
            )
        );
        assert!(matches!(
            corrupt(6, 200),
            ProtocolError::UnknownKind { kind: 200, .. }
        ));
        assert!(matches!(corrupt(7, 1), ProtocolError::UnknownFlags { .. }));
        let err = corrupt(20, frame[20] ^ 1).to_string();
        assert!(
            err.starts_with(
                "frame checksum mismatch at epoch 17 (Ack frame, 0-byte payload): expected 0x"
            ),
            "{err}"
        );
        let mut big = frame.to_vec();
        big[16..20].copy_from_slice(&(MAX_PAYLOAD_LEN as u32 + 1).to_le_bytes());
        assert!(matches!(
            Message::decode(&Bytes::from(big)).unwrap_err(),
            ProtocolError::TooLarge { .. }
        ));
        assert_eq!(
            Message::decode(&frame.slice(..10)).unwrap_err(),
            ProtocolError::Incomplete { need: 24, have: 10 }
        );
    }

    /// Re-seals a frame after editing its payload so only the structure check can object.
    fn resealed(mut f: Vec<u8>) -> Bytes {
        let len = (f.len() - HEADER_LEN) as u32;
        f[16..20].copy_from_slice(&len.to_le_bytes());
        seal_frame(&mut f);
        Bytes::from(f)
    }

    #[test]
    fn malformed_payloads_are_rejected_after_a_good_crc() {
        let (frame, _) = batch_frame(3, 2);
        let mut f = frame.to_vec();
        f[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&3u32.to_le_bytes());
        let err = Message::decode(&resealed(f)).unwrap_err().to_string();
        assert!(err.contains("entry 2 of 3 is cut short"), "{err}");

        let mut f = frame.to_vec();
        f.push(0);
        let err = Message::decode(&resealed(f)).unwrap_err().to_string();
        assert!(err.contains("1 trailing bytes after 2 entries"), "{err}");

        let mut f = frame.to_vec();
        f[HEADER_LEN + 4 + 8] = 77; // first entry's encoding byte
        let err = Message::decode(&resealed(f)).unwrap_err().to_string();
        assert!(err.contains("entry 0: unknown page encoding 77"), "{err}");

        let mut f = Message::Refuse { reason: "x".into() }
            .to_frame()
            .unwrap()
            .to_vec();
        f[HEADER_LEN] = 0xff;
        assert!(Message::decode(&resealed(f))
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));

        let mut f = Message::Ack { epoch: 1 }.to_frame().unwrap().to_vec();
        f.extend_from_slice(&[1, 2]);
        assert!(Message::decode(&resealed(f))
            .unwrap_err()
            .to_string()
            .contains("payload is 2 bytes, expected 0"));
    }

    #[test]
    fn malformed_output_is_rejected() {
        let frame = |released: u64, count: u32, body: &[u8]| {
            let mut f = Message::Ack { epoch: 9 }.to_frame().unwrap().to_vec();
            f[6] = MessageKind::Output as u8;
            f.extend_from_slice(&released.to_le_bytes());
            f.extend_from_slice(&count.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(body);
            Message::decode(&resealed(f))
        };
        let one = [3u32.to_le_bytes().as_slice(), b"abc"].concat();
        assert!(matches!(
            frame(8, 1, &one).unwrap().0,
            Message::Output { epoch: 9, released: 8, ref frames } if frames[0] == b"abc"[..]
        ));
        let err = |r: Result<(Message, usize), ProtocolError>| r.unwrap_err().to_string();
        assert!(err(frame(9, 1, &one)).contains("after epoch 9's output was let out"));
        assert!(err(frame(8, 2, &one)).contains("2 frames announced in a 23-byte payload"));
        assert!(err(frame(8, 1, &one[..6])).contains("frame 0: 3 bytes announced, 2 left"));
        assert!(err(frame(8, 1, &[0, 0, 0, 0])).contains("frame 0: 0 bytes announced"));
        assert!(err(frame(8, 0, &one)).contains("7 bytes after the last of 0 frames"));
        let big = Message::Output {
            epoch: 2,
            released: 1,
            frames: vec![Bytes::from(vec![1u8; MAX_PAYLOAD_LEN])],
        };
        assert!(matches!(big.to_frame(), Err(ProtocolError::Encode { .. })));
        let empty = Message::Output {
            epoch: 2,
            released: 1,
            frames: vec![Bytes::new()],
        };
        assert!(matches!(
            empty.to_frame(),
            Err(ProtocolError::Encode { .. })
        ));
    }

    #[test]
    fn hello_differences_name_each_mismatch() {
        let backup = Hello::new(
            2,
            vec![MemoryRegion {
                gpa: 0,
                len: 0x1000_0000,
            }],
            1,
        );
        assert!(backup
            .differences(&backup.clone(), "backup", "primary")
            .is_empty());
        let mut primary = backup.clone();
        primary.vcpu_count = 4;
        primary.regions[0].len = 0x2000_0000;
        let d = backup.differences(&primary, "backup", "primary");
        assert_eq!(
            d,
            vec![
                "vCPU count differs: backup 2, primary 4".to_string(),
                "memory layout differs: backup [0x0+0x10000000], primary [0x0+0x20000000]"
                    .to_string(),
            ]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_single_byte_corruption_is_an_error(
            which in 0usize..12,
            at in any::<prop::sample::Index>(),
            x in 1u8..=255,
        ) {
            let frame = sample_messages()[which].to_frame().unwrap();
            let mut f = frame.to_vec();
            let i = at.index(f.len());
            f[i] ^= x;
            prop_assert!(Message::decode(&Bytes::from(f)).is_err(), "corruption at {} accepted", i);
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut f in prop::collection::vec(any::<u8>(), 0..200), kind in 1u8..=12) {
            // Give random payloads a valid header so the payload parsers get exercised.
            if f.len() >= HEADER_LEN {
                f[..4].copy_from_slice(&MAGIC.to_le_bytes());
                f[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                f[6] = kind;
                f[7] = 0;
                let _ = Message::decode(&resealed(f.clone()));
            }
            let _ = Message::decode(&Bytes::from(f));
        }
    }
}
