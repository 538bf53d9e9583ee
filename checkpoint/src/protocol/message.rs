//! The messages of the protocol: their payload layouts, encoding and decoding.

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    frame_crc, seal_frame, FrameHeader, MessageKind, PageBatch, ProtocolError, Reader, DISK_CHUNK,
    DISK_SECTOR, DISK_SUM_LEN, HEADER_LEN, MAGIC, MAX_DISKS, MAX_PAYLOAD_LEN, MAX_REASON_LEN,
    MAX_REGIONS, PROTOCOL_VERSION,
};
use crate::PAGE_SIZE;

/// Bytes of an `Output` payload before its frames (released epoch, count, reserved).
pub const OUTPUT_FIXED_LEN: usize = 16;

/// A guest memory region: guest-physical address and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A disk of the guest, as `Hello` describes it: both sides must have the same disks, in
/// the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// The image's size in bytes.
    pub size: u64,
    /// The guest may only read it.
    pub readonly: bool,
}

/// The primary's introduction; the backup compares it with its own configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u16,
    /// Guest page size.
    pub page_size: u32,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Identifies the protected VM (both sides are configured with it).
    pub guest_id: u64,
    /// Feature flags; both sides must agree.
    pub flags: u64,
    /// Guest RAM layout.
    pub regions: Vec<MemoryRegion>,
    /// The guest's disks (`--disk`), in order.
    pub disks: Vec<DiskInfo>,
}

impl Hello {
    /// A `Hello` for this build's version and page size.
    pub fn new(vcpu_count: u32, regions: Vec<MemoryRegion>, guest_id: u64) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            page_size: PAGE_SIZE as u32,
            vcpu_count,
            guest_id,
            flags: 0,
            regions,
            disks: Vec::new(),
        }
    }

    /// The same, with the guest's disks.
    pub fn with_disks(mut self, disks: Vec<DiskInfo>) -> Self {
        self.disks = disks;
        self
    }

    /// Every difference between `self` (the local configuration) and `peer`, one phrase
    /// each; empty when they are compatible.
    pub fn differences(&self, peer: &Hello, local_name: &str, peer_name: &str) -> Vec<String> {
        let mut d = Vec::new();
        let mut diff = |what: &str, l: String, p: String| {
            if l != p {
                d.push(format!("{what} differs: {local_name} {l}, {peer_name} {p}"));
            }
        };
        diff(
            "protocol version",
            self.version.to_string(),
            peer.version.to_string(),
        );
        diff(
            "page size",
            self.page_size.to_string(),
            peer.page_size.to_string(),
        );
        diff(
            "vCPU count",
            self.vcpu_count.to_string(),
            peer.vcpu_count.to_string(),
        );
        diff(
            "guest id (the hash of the pair's --name: the names differ)",
            format!("{:#x}", self.guest_id),
            format!("{:#x}", peer.guest_id),
        );
        diff(
            "feature flags",
            format!("{:#x}", self.flags),
            format!("{:#x}", peer.flags),
        );
        let layout = |r: &[MemoryRegion]| {
            let parts: Vec<String> = r
                .iter()
                .map(|m| format!("{:#x}+{:#x}", m.gpa, m.len))
                .collect();
            format!("[{}]", parts.join(", "))
        };
        diff(
            "memory layout",
            layout(&self.regions),
            layout(&peer.regions),
        );
        diff(
            "number of disks (--disk)",
            self.disks.len().to_string(),
            peer.disks.len().to_string(),
        );
        for (i, (l, p)) in self.disks.iter().zip(&peer.disks).enumerate() {
            diff(
                &format!("disk {i} image size (bytes)"),
                l.size.to_string(),
                p.size.to_string(),
            );
            let mode = |d: &DiskInfo| if d.readonly { "readonly" } else { "read-write" };
            diff(&format!("disk {i} mode"), mode(l).into(), mode(p).into());
        }
        d
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Primary introduces itself.
    Hello(Hello),
    /// Backup accepts.
    HelloOk,
    /// The configuration is refused; the reason names what differs.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Pre-copy pages.
    SyncPages {
        /// Guest bytes sent so far, this frame included.
        bytes_done: u64,
        /// Guest bytes this pre-copy round sends.
        bytes_total: u64,
        /// The pages.
        pages: PageBatch,
    },
    /// An epoch starts.
    EpochBegin {
        /// The epoch.
        epoch: u64,
        /// Dirty pages in the epoch.
        page_count: u64,
        /// Length of the state blob.
        state_len: u64,
    },
    /// Some of the epoch's pages.
    Pages {
        /// The epoch.
        epoch: u64,
        /// The pages.
        pages: PageBatch,
    },
    /// The epoch's vCPU and device state (opaque to this crate).
    State {
        /// The epoch.
        epoch: u64,
        /// The blob.
        bytes: Bytes,
    },
    /// The epoch is complete; the backup verifies and applies it.
    EpochCommit {
        /// The epoch.
        epoch: u64,
        /// Pages sent in the epoch.
        page_count: u64,
        /// `Pages` frames sent in the epoch.
        frame_count: u32,
        /// `DiskWrites` frames sent in the epoch.
        disk_frames: u32,
        /// Length of the state blob.
        state_len: u64,
        /// [`Digest`](crate::digest::Digest) of the epoch's pages and state.
        digest: u64,
    },
    /// The backup committed `epoch`.
    Ack {
        /// The epoch.
        epoch: u64,
    },
    /// The backup rejected `epoch` and stays on its last committed one.
    Nack {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// Liveness, carrying the sender's last epoch.
    Heartbeat {
        /// Last epoch sent (primary) or committed (backup).
        epoch: u64,
    },
    /// Replication ends cleanly after `epoch`.
    End {
        /// The final epoch.
        epoch: u64,
        /// Digest of the primary's RAM and state at that epoch.
        digest: u64,
    },
    /// Planned switchover after `End` at `epoch`: the backup promotes that epoch. The old
    /// primary has stopped its guest for good; `new_backup` is where it now listens as
    /// the new backup (`host:port`), empty when it stops instead.
    Handover {
        /// The final epoch (the one `End` named).
        epoch: u64,
        /// The old primary's backup listener, or empty.
        new_backup: String,
    },
    /// The backup stops in order after committed `epoch` and drops its replica.
    Leave {
        /// The backup's last committed epoch.
        epoch: u64,
        /// Why, when it is not an operator's stop (its disk failed, say); may be empty.
        reason: String,
    },
    /// The backup's sums of chunks `first..first + sums.len()` of its image of `disk`
    /// (initial sync; see [`DISK_CHUNK`]).
    DiskSums {
        /// The disk (index in `Hello`).
        disk: u32,
        /// Index of the first chunk.
        first: u64,
        /// One sum per chunk.
        sums: Vec<[u8; DISK_SUM_LEN]>,
    },
    /// Bytes of `disk` at `offset` that the backup's image lacks (initial sync).
    DiskSync {
        /// The disk.
        disk: u32,
        /// Byte offset in the image.
        offset: u64,
        /// Bytes of this disk's sync sent so far, this frame included.
        bytes_done: u64,
        /// Bytes this disk's sync sends.
        bytes_total: u64,
        /// The bytes (at most one chunk).
        data: Bytes,
    },
    /// Writes the guest completed on `disk` during `epoch`, in completion order.
    DiskWrites {
        /// The epoch.
        epoch: u64,
        /// The disk.
        disk: u32,
        /// `(byte offset, data)`, whole sectors.
        writes: Vec<(u64, Bytes)>,
    },
    /// Network frames the guest sent during `epoch`, in the order it sent them; the
    /// primary lets them out once the backup acknowledges `epoch`.
    Output {
        /// The epoch.
        epoch: u64,
        /// The last epoch whose output the primary had let out when it sent this (0:
        /// none): the backup need not keep output of epochs up to it.
        released: u64,
        /// The frames, each a whole Ethernet frame.
        frames: Vec<Bytes>,
    },
}

/// Bytes of a `DiskWrites` payload before the entries, and of each entry before the data.
pub const DISK_WRITES_HEADER_LEN: usize = 8;
/// See [`DISK_WRITES_HEADER_LEN`].
pub const DISK_WRITE_ENTRY_LEN: usize = 12;

impl Message {
    /// The kind of the message.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::HelloOk => MessageKind::HelloOk,
            Message::Refuse { .. } => MessageKind::Refuse,
            Message::SyncPages { .. } => MessageKind::SyncPages,
            Message::EpochBegin { .. } => MessageKind::EpochBegin,
            Message::Pages { .. } => MessageKind::Pages,
            Message::State { .. } => MessageKind::State,
            Message::EpochCommit { .. } => MessageKind::EpochCommit,
            Message::Ack { .. } => MessageKind::Ack,
            Message::Nack { .. } => MessageKind::Nack,
            Message::Heartbeat { .. } => MessageKind::Heartbeat,
            Message::End { .. } => MessageKind::End,
            Message::Handover { .. } => MessageKind::Handover,
            Message::Leave { .. } => MessageKind::Leave,
            Message::DiskSums { .. } => MessageKind::DiskSums,
            Message::DiskSync { .. } => MessageKind::DiskSync,
            Message::DiskWrites { .. } => MessageKind::DiskWrites,
            Message::Output { .. } => MessageKind::Output,
        }
    }

    /// The epoch carried in the header.
    pub fn epoch(&self) -> u64 {
        match self {
            Message::Hello(_)
            | Message::HelloOk
            | Message::Refuse { .. }
            | Message::SyncPages { .. }
            | Message::DiskSums { .. }
            | Message::DiskSync { .. } => 0,
            Message::EpochBegin { epoch, .. }
            | Message::Pages { epoch, .. }
            | Message::State { epoch, .. }
            | Message::EpochCommit { epoch, .. }
            | Message::Ack { epoch }
            | Message::Nack { epoch, .. }
            | Message::Heartbeat { epoch }
            | Message::End { epoch, .. }
            | Message::Handover { epoch, .. }
            | Message::Leave { epoch, .. }
            | Message::DiskWrites { epoch, .. }
            | Message::Output { epoch, .. } => *epoch,
        }
    }

    /// Appends the complete frame to `out` (a reusable buffer).
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), ProtocolError> {
        let kind = self.kind();
        let too_large = |reason: String| ProtocolError::Encode { kind, reason };
        let start = out.len();
        let header = FrameHeader {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            kind: kind as u8,
            flags: 0,
            epoch: self.epoch(),
            payload_len: 0,
            crc: 0,
        };
        out.extend_from_slice(&header.to_bytes());
        match self {
            Message::Hello(h) => {
                if h.regions.len() > MAX_REGIONS {
                    out.truncate(start);
                    return Err(too_large(format!(
                        "{} memory regions, at most {MAX_REGIONS}",
                        h.regions.len()
                    )));
                }
                if h.disks.len() > MAX_DISKS {
                    out.truncate(start);
                    return Err(too_large(format!(
                        "{} disks, at most {MAX_DISKS}",
                        h.disks.len()
                    )));
                }
                out.put_u16_le(h.version);
                out.put_u16_le(h.disks.len() as u16);
                out.put_u32_le(h.page_size);
                out.put_u32_le(h.vcpu_count);
                out.put_u32_le(h.regions.len() as u32);
                out.put_u64_le(h.guest_id);
                out.put_u64_le(h.flags);
                for r in &h.regions {
                    out.put_u64_le(r.gpa);
                    out.put_u64_le(r.len);
                }
                for d in &h.disks {
                    out.put_u64_le(d.size);
                    out.put_u64_le(u64::from(d.readonly));
                }
            }
            Message::HelloOk | Message::Ack { .. } | Message::Heartbeat { .. } => {}
            Message::Refuse { reason }
            | Message::Nack { reason, .. }
            | Message::Leave { reason, .. }
            | Message::Handover {
                new_backup: reason, ..
            } => {
                // Over-long reasons are cut at a character boundary, not refused.
                let mut end = reason.len().min(MAX_REASON_LEN);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
            Message::SyncPages {
                bytes_done,
                bytes_total,
                pages,
            } => {
                out.put_u64_le(*bytes_done);
                out.put_u64_le(*bytes_total);
                pages.write_to(out);
            }
            Message::EpochBegin {
                page_count,
                state_len,
                ..
            } => {
                out.put_u64_le(*page_count);
                out.put_u64_le(*state_len);
            }
            Message::Pages { pages, .. } => {
                pages.write_to(out);
            }
            Message::State { bytes, .. } => out.extend_from_slice(bytes),
            Message::EpochCommit {
                page_count,
                frame_count,
                disk_frames,
                state_len,
                digest,
                ..
            } => {
                out.put_u64_le(*page_count);
                out.put_u32_le(*frame_count);
                out.put_u32_le(*disk_frames);
                out.put_u64_le(*state_len);
                out.put_u64_le(*digest);
            }
            Message::End { digest, .. } => out.put_u64_le(*digest),
            Message::DiskSums { disk, first, sums } => {
                out.put_u32_le(*disk);
                out.put_u32_le(sums.len() as u32);
                out.put_u64_le(*first);
                for sum in sums {
                    out.extend_from_slice(sum);
                }
            }
            Message::DiskSync {
                disk,
                offset,
                bytes_done,
                bytes_total,
                data,
            } => {
                out.put_u32_le(*disk);
                out.put_u32_le(0);
                out.put_u64_le(*offset);
                out.put_u64_le(*bytes_done);
                out.put_u64_le(*bytes_total);
                out.extend_from_slice(data);
            }
            Message::DiskWrites { disk, writes, .. } => {
                out.put_u32_le(*disk);
                out.put_u32_le(writes.len() as u32);
                for (offset, data) in writes {
                    out.put_u64_le(*offset);
                    out.put_u32_le(data.len() as u32);
                }
                for (_, data) in writes {
                    out.extend_from_slice(data);
                }
            }
            Message::Output {
                released, frames, ..
            } => {
                let len = OUTPUT_FIXED_LEN + frames.iter().map(|f| 4 + f.len()).sum::<usize>();
                if len > MAX_PAYLOAD_LEN {
                    out.truncate(start);
                    return Err(too_large(format!(
                        "{} frames in a {len}-byte payload, at most {MAX_PAYLOAD_LEN}",
                        frames.len()
                    )));
                }
                // What the decoder would refuse is not sent: one message, one encoding.
                if frames.iter().any(Bytes::is_empty) || *released >= self.epoch() {
                    out.truncate(start);
                    return Err(too_large(format!(
                        "an empty frame, or released epoch {released} not before epoch {}",
                        self.epoch()
                    )));
                }
                out.put_u64_le(*released);
                out.put_u32_le(frames.len() as u32);
                out.put_u32_le(0);
                for f in frames {
                    out.put_u32_le(f.len() as u32);
                    out.extend_from_slice(f);
                }
            }
        }
        if out.len() - start - HEADER_LEN > MAX_PAYLOAD_LEN {
            let len = out.len() - start - HEADER_LEN;
            out.truncate(start);
            return Err(too_large(format!(
                "{len}-byte payload, at most {MAX_PAYLOAD_LEN}"
            )));
        }
        seal_frame(&mut out[start..]);
        Ok(())
    }

    /// Encodes into a fresh buffer.
    pub fn to_frame(&self) -> Result<Bytes, ProtocolError> {
        let mut b = BytesMut::new();
        self.encode(&mut b)?;
        Ok(b.freeze())
    }

    /// Decodes one complete frame from the start of `buf`; returns the message and the
    /// number of bytes used.
    pub fn decode(buf: &Bytes) -> Result<(Message, usize), ProtocolError> {
        let Some(hb) = buf.get(..HEADER_LEN) else {
            return Err(ProtocolError::Incomplete {
                need: HEADER_LEN,
                have: buf.len(),
            });
        };
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(hb);
        let header = FrameHeader::parse(&hdr)?;
        let need = header.frame_len();
        if buf.len() < need {
            return Err(ProtocolError::Incomplete {
                need,
                have: buf.len(),
            });
        }
        let msg = decode_frame(&header, buf.slice(HEADER_LEN..need))?;
        Ok((msg, need))
    }
}

/// Decodes the payload of a frame whose header passed [`FrameHeader::parse`]: checks the
/// CRC, then the payload's structure.
pub fn decode_frame(header: &FrameHeader, payload: Bytes) -> Result<Message, ProtocolError> {
    let kind = header.message_kind()?;
    let epoch = header.epoch;
    if payload.len() != header.payload_len as usize {
        return Err(ProtocolError::Incomplete {
            need: header.frame_len(),
            have: HEADER_LEN + payload.len(),
        });
    }
    let got = frame_crc(&header.to_bytes(), &payload);
    if got != header.crc {
        return Err(ProtocolError::Checksum {
            kind,
            epoch,
            len: payload.len(),
            expected: header.crc,
            got,
        });
    }
    let malformed = |reason: String| ProtocolError::Malformed {
        kind,
        epoch,
        reason,
    };
    // Fixed-size payloads must have exactly their size.
    let fixed = |n: usize| {
        if payload.len() == n {
            Ok(())
        } else {
            Err(malformed(format!(
                "payload is {} bytes, expected {n}",
                payload.len()
            )))
        }
    };
    // Frames are canonical (one message, one encoding): the kinds that carry no epoch
    // must say 0 there, and reserved fields must be 0.
    if epoch != 0
        && matches!(
            kind,
            MessageKind::Hello
                | MessageKind::HelloOk
                | MessageKind::Refuse
                | MessageKind::SyncPages
                | MessageKind::DiskSums
                | MessageKind::DiskSync
        )
    {
        return Err(malformed(format!(
            "header epoch is {epoch}, this kind carries none (expected 0)"
        )));
    }
    let reserved = |v: u64| {
        if v == 0 {
            Ok(())
        } else {
            Err(malformed(format!("reserved field is {v:#x}, expected 0")))
        }
    };
    let mut r = Reader::new(&payload);
    let text = |p: &[u8]| -> Result<String, ProtocolError> {
        if p.len() > MAX_REASON_LEN {
            return Err(malformed(format!(
                "reason is {} bytes, at most {MAX_REASON_LEN}",
                p.len()
            )));
        }
        String::from_utf8(p.to_vec()).map_err(|_| malformed("reason is not UTF-8".into()))
    };
    let msg = match kind {
        MessageKind::Hello => {
            const FIXED: usize = 32;
            if payload.len() < FIXED {
                return Err(malformed(format!(
                    "payload is {} bytes, at least {FIXED} expected",
                    payload.len()
                )));
            }
            let version = r.u16_or_zero();
            let d = r.u16_or_zero() as usize;
            let page_size = r.u32_or_zero();
            let vcpu_count = r.u32_or_zero();
            let n = r.u32_or_zero() as usize;
            let guest_id = r.u64_or_zero();
            let flags = r.u64_or_zero();
            if n > MAX_REGIONS {
                return Err(malformed(format!(
                    "{n} memory regions, at most {MAX_REGIONS}"
                )));
            }
            if d > MAX_DISKS {
                return Err(malformed(format!("{d} disks, at most {MAX_DISKS}")));
            }
            fixed(FIXED + 16 * n + 16 * d)?;
            let regions = (0..n)
                .map(|_| MemoryRegion {
                    gpa: r.u64_or_zero(),
                    len: r.u64_or_zero(),
                })
                .collect();
            let mut disks = Vec::with_capacity(d);
            for i in 0..d {
                let size = r.u64_or_zero();
                let readonly = match r.u64_or_zero() {
                    0 => false,
                    1 => true,
                    f => return Err(malformed(format!("disk {i} has unknown flags {f:#x}"))),
                };
                disks.push(DiskInfo { size, readonly });
            }
            Message::Hello(Hello {
                version,
                page_size,
                vcpu_count,
                guest_id,
                flags,
                regions,
                disks,
            })
        }
        MessageKind::HelloOk => {
            fixed(0)?;
            Message::HelloOk
        }
        MessageKind::Refuse => Message::Refuse {
            reason: text(&payload)?,
        },
        MessageKind::SyncPages => {
            if payload.len() < 16 {
                return Err(malformed("payload shorter than its progress fields".into()));
            }
            let bytes_done = r.u64_or_zero();
            let bytes_total = r.u64_or_zero();
            Message::SyncPages {
                bytes_done,
                bytes_total,
                pages: PageBatch::parse(kind, epoch, payload.slice(16..))?,
            }
        }
        MessageKind::EpochBegin => {
            fixed(16)?;
            Message::EpochBegin {
                epoch,
                page_count: r.u64_or_zero(),
                state_len: r.u64_or_zero(),
            }
        }
        MessageKind::Pages => Message::Pages {
            epoch,
            pages: PageBatch::parse(kind, epoch, payload)?,
        },
        MessageKind::State => Message::State {
            epoch,
            bytes: payload,
        },
        MessageKind::EpochCommit => {
            fixed(32)?;
            let page_count = r.u64_or_zero();
            let frame_count = r.u32_or_zero();
            let disk_frames = r.u32_or_zero();
            Message::EpochCommit {
                epoch,
                page_count,
                frame_count,
                disk_frames,
                state_len: r.u64_or_zero(),
                digest: r.u64_or_zero(),
            }
        }
        MessageKind::Ack => {
            fixed(0)?;
            Message::Ack { epoch }
        }
        MessageKind::Nack => Message::Nack {
            epoch,
            reason: text(&payload)?,
        },
        MessageKind::Heartbeat => {
            fixed(0)?;
            Message::Heartbeat { epoch }
        }
        MessageKind::End => {
            fixed(8)?;
            Message::End {
                epoch,
                digest: r.u64_or_zero(),
            }
        }
        MessageKind::Handover => Message::Handover {
            epoch,
            new_backup: text(&payload)?,
        },
        MessageKind::Leave => Message::Leave {
            epoch,
            reason: text(&payload)?,
        },
        MessageKind::DiskSums => {
            if payload.len() < 16 {
                return Err(malformed("payload shorter than its fixed fields".into()));
            }
            let disk = r.u32_or_zero();
            let count = r.u32_or_zero() as usize;
            let first = r.u64_or_zero();
            if count == 0 {
                return Err(malformed("no sums".into()));
            }
            fixed(16 + count.saturating_mul(DISK_SUM_LEN))?;
            if first.checked_add(count as u64).is_none() {
                return Err(malformed(format!("chunks {first}+{count} overflow")));
            }
            let sums = payload[16..]
                .chunks_exact(DISK_SUM_LEN)
                .map(|c| c.try_into().unwrap_or([0; DISK_SUM_LEN]))
                .collect();
            Message::DiskSums { disk, first, sums }
        }
        MessageKind::DiskSync => {
            const FIXED: usize = 32;
            if payload.len() < FIXED {
                return Err(malformed("payload shorter than its fixed fields".into()));
            }
            let disk = r.u32_or_zero();
            reserved(r.u32_or_zero().into())?;
            let offset = r.u64_or_zero();
            let bytes_done = r.u64_or_zero();
            let bytes_total = r.u64_or_zero();
            let data = payload.slice(FIXED..);
            if data.is_empty() || data.len() as u64 > DISK_CHUNK {
                return Err(malformed(format!(
                    "{} bytes of data, 1 to {DISK_CHUNK} expected",
                    data.len()
                )));
            }
            if offset % DISK_CHUNK != 0 || offset.checked_add(data.len() as u64).is_none() {
                return Err(malformed(format!(
                    "offset {offset} is not at a chunk boundary"
                )));
            }
            if bytes_done > bytes_total {
                return Err(malformed(format!(
                    "{bytes_done} bytes done of {bytes_total}"
                )));
            }
            Message::DiskSync {
                disk,
                offset,
                bytes_done,
                bytes_total,
                data,
            }
        }
        MessageKind::DiskWrites => {
            if payload.len() < DISK_WRITES_HEADER_LEN {
                return Err(malformed("payload shorter than its fixed fields".into()));
            }
            let disk = r.u32_or_zero();
            let count = r.u32_or_zero() as usize;
            if count == 0 {
                return Err(malformed("no writes".into()));
            }
            let table = count.saturating_mul(DISK_WRITE_ENTRY_LEN);
            if payload.len() - DISK_WRITES_HEADER_LEN < table {
                return Err(malformed(format!("{count} writes do not fit the payload")));
            }
            let mut at = DISK_WRITES_HEADER_LEN + table;
            let mut writes = Vec::with_capacity(count);
            for i in 0..count {
                let offset = r.u64_or_zero();
                let len = r.u32_or_zero() as usize;
                if len == 0
                    || offset % DISK_SECTOR != 0
                    || len as u64 % DISK_SECTOR != 0
                    || offset.checked_add(len as u64).is_none()
                {
                    return Err(malformed(format!(
                        "write {i}: {len} bytes at offset {offset}: not whole {DISK_SECTOR}-byte sectors"
                    )));
                }
                let end = at
                    .checked_add(len)
                    .filter(|&e| e <= payload.len())
                    .ok_or_else(|| malformed(format!("write {i}: data past the payload")))?;
                writes.push((offset, payload.slice(at..end)));
                at = end;
            }
            if at != payload.len() {
                return Err(malformed(format!(
                    "{} bytes after the last write",
                    payload.len() - at
                )));
            }
            Message::DiskWrites {
                epoch,
                disk,
                writes,
            }
        }
        MessageKind::Output => {
            if payload.len() < OUTPUT_FIXED_LEN {
                return Err(malformed(format!(
                    "payload is {} bytes, at least {OUTPUT_FIXED_LEN} expected",
                    payload.len()
                )));
            }
            let released = r.u64_or_zero();
            let n = r.u32_or_zero() as usize;
            reserved(r.u32_or_zero().into())?;
            if released >= epoch {
                return Err(malformed(format!(
                    "output of epoch {epoch} sent after epoch {released}'s output was let out"
                )));
            }
            // Each frame takes at least its 4-byte length: a count that cannot fit is
            // refused before anything is allocated for it.
            if n > (payload.len() - OUTPUT_FIXED_LEN) / 4 {
                return Err(malformed(format!(
                    "{n} frames announced in a {}-byte payload",
                    payload.len()
                )));
            }
            let mut frames = Vec::with_capacity(n);
            let mut at = OUTPUT_FIXED_LEN;
            for i in 0..n {
                let len = payload
                    .get(at..at + 4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or_else(|| malformed(format!("frame {i}: its length is cut off")))?;
                at += 4;
                if len == 0 || len > payload.len() - at {
                    return Err(malformed(format!(
                        "frame {i}: {len} bytes announced, {} left in the payload",
                        payload.len() - at
                    )));
                }
                frames.push(payload.slice(at..at + len));
                at += len;
            }
            if at != payload.len() {
                return Err(malformed(format!(
                    "{} bytes after the last of {n} frames",
                    payload.len() - at
                )));
            }
            Message::Output {
                epoch,
                released,
                frames,
            }
        }
    };
    Ok(msg)
}
