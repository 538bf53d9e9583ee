//! Page batches: the payload of `Pages` and `SyncPages`, parsed and built in place.

use bytes::{Bytes, BytesMut};

use super::{
    seal_frame, FrameHeader, MessageKind, ProtocolError, Reader, ENTRY_HEADER_LEN, HEADER_LEN,
    MAGIC, PROTOCOL_VERSION,
};
use crate::codec::Encoding;
use crate::PAGE_SIZE;

/// A validated batch of encoded pages, borrowed from the received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    count: u32,
    /// The entries, without the leading count.
    entries: Bytes,
}

/// One page of a [`PageBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry<'a> {
    /// Guest page frame number (gpa / 4096).
    pub pfn: u64,
    /// How the payload is encoded.
    pub encoding: Encoding,
    /// The encoded page.
    pub payload: &'a [u8],
}

impl PageBatch {
    /// Number of pages in the batch.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries, in frame order.
    pub fn iter(&self) -> PageIter<'_> {
        PageIter {
            rest: &self.entries,
        }
    }

    /// Appends the batch payload (count and entries) to a frame being encoded.
    pub(super) fn write_to(&self, out: &mut BytesMut) {
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.entries);
    }

    /// Validates the batch part of a payload (`count u32` then entries).
    pub(super) fn parse(
        kind: MessageKind,
        epoch: u64,
        payload: Bytes,
    ) -> Result<Self, ProtocolError> {
        let malformed = |reason: String| ProtocolError::Malformed {
            kind,
            epoch,
            reason,
        };
        let mut r = Reader::new(&payload);
        let count = r
            .u32()
            .ok_or_else(|| malformed("page batch has no entry count".into()))?;
        let mut pos = 4usize;
        for entry in 0..count {
            let mut r = Reader::new(&payload[pos..]);
            let (Some(pfn), Some(enc), Some(len)) = (r.u64(), r.u8(), r.u16()) else {
                return Err(malformed(format!(
                    "entry {entry} of {count} is cut short at byte {pos}"
                )));
            };
            Encoding::from_u8(enc).map_err(|source| ProtocolError::Encoding {
                kind,
                epoch,
                entry,
                source,
            })?;
            if usize::from(len) > PAGE_SIZE {
                return Err(malformed(format!(
                    "entry {entry} (pfn {pfn:#x}) has a {len}-byte payload, more than a page"
                )));
            }
            let end = pos + ENTRY_HEADER_LEN + usize::from(len);
            if end > payload.len() {
                return Err(malformed(format!(
                    "entry {entry} (pfn {pfn:#x}) payload runs past the frame end"
                )));
            }
            pos = end;
        }
        if pos != payload.len() {
            return Err(malformed(format!(
                "{} trailing bytes after {count} entries",
                payload.len() - pos
            )));
        }
        Ok(PageBatch {
            count,
            entries: payload.slice(4..),
        })
    }
}

/// Iterator over the entries of a [`PageBatch`].
#[derive(Debug)]
pub struct PageIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PageIter<'a> {
    type Item = PageEntry<'a>;

    fn next(&mut self) -> Option<PageEntry<'a>> {
        let mut r = Reader::new(self.rest);
        let pfn = r.u64()?;
        let encoding = Encoding::from_u8(r.u8()?).ok()?;
        let len = usize::from(r.u16()?);
        let payload = self.rest.get(ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + len)?;
        self.rest = &self.rest[ENTRY_HEADER_LEN + len..];
        Some(PageEntry {
            pfn,
            encoding,
            payload,
        })
    }
}

/// Builds a `Pages` or `SyncPages` frame in place, page by page: the encoder writes each
/// page's payload straight into the frame.
#[derive(Debug)]
pub struct PagesFrameBuilder {
    buf: Vec<u8>,
    kind: MessageKind,
    count: u32,
    /// Offset of the entry count.
    count_at: usize,
}

impl PagesFrameBuilder {
    /// A `Pages` frame of `epoch`, with room for about `capacity` bytes.
    pub fn pages(epoch: u64, capacity: usize) -> Self {
        Self::new(MessageKind::Pages, epoch, capacity, 0)
    }

    /// A `SyncPages` frame; progress is filled in by [`PagesFrameBuilder::finish_sync`].
    pub fn sync(capacity: usize) -> Self {
        Self::new(MessageKind::SyncPages, 0, capacity, 16)
    }

    fn new(kind: MessageKind, epoch: u64, capacity: usize, prefix: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_LEN + 64));
        let header = FrameHeader {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            kind: kind as u8,
            flags: 0,
            epoch,
            payload_len: 0,
            crc: 0,
        };
        buf.extend_from_slice(&header.to_bytes());
        buf.resize(HEADER_LEN + prefix + 4, 0);
        Self {
            buf,
            kind,
            count: 0,
            count_at: HEADER_LEN + prefix,
        }
    }

    /// Appends page `pfn`; `encode` appends the payload to the vector it is given and
    /// returns the encoding (e.g. `|out| codec::encode_page(page, base, out)`), which
    /// `push` returns too.
    pub fn push(&mut self, pfn: u64, encode: impl FnOnce(&mut Vec<u8>) -> Encoding) -> Encoding {
        let at = self.buf.len();
        self.buf.extend_from_slice(&pfn.to_le_bytes());
        self.buf.extend_from_slice(&[0u8; 3]);
        let enc = encode(&mut self.buf);
        let len = self.buf.len() - at - ENTRY_HEADER_LEN;
        debug_assert!(len <= PAGE_SIZE);
        self.buf[at + 8] = enc as u8;
        self.buf[at + 9..at + 11].copy_from_slice(&(len as u16).to_le_bytes());
        self.count += 1;
        enc
    }

    /// Pages pushed so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Frame bytes so far (header included).
    pub fn frame_len(&self) -> usize {
        self.buf.len()
    }

    /// Finishes a `Pages` frame.
    pub fn finish(self) -> Bytes {
        self.seal()
    }

    /// Finishes a `SyncPages` frame with its progress figures.
    pub fn finish_sync(mut self, bytes_done: u64, bytes_total: u64) -> Bytes {
        if self.kind == MessageKind::SyncPages {
            self.buf[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&bytes_done.to_le_bytes());
            self.buf[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&bytes_total.to_le_bytes());
        }
        self.seal()
    }

    fn seal(mut self) -> Bytes {
        let count_at = self.count_at;
        self.buf[count_at..count_at + 4].copy_from_slice(&self.count.to_le_bytes());
        seal_frame(&mut self.buf[..]);
        Bytes::from(self.buf)
    }
}
