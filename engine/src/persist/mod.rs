//! The versioned binary state format.
//!
//! A sealed blob is a 32-byte header followed by the payload:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "LKSTATE\0"
//!      8     4  format version (little endian), FORMAT_VERSION
//!     12     4  reserved, zero
//!     16     8  payload length
//!     24     4  CRC32 (IEEE) of the payload
//!     28     4  reserved, zero
//! ```
//!
//! The payload is a sequence of little-endian fields written by [`Writer`] and read back by
//! [`Reader`]; KVM structures are stored as their exact bytes (kvm-bindings' zerocopy
//! impls). There is no per-field versioning: any change to what is stored bumps
//! [`FORMAT_VERSION`], and a blob of another version is refused. Reserved words, padding
//! and unused flag bits must be zero: a blob with anything else there is malformed, so a
//! state has exactly one encoding.

pub mod state;

use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The blob's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"LKSTATE\0";
/// 2: virtio devices (transport, queues, device) joined the machine state.
/// 3: the platform (reference guest or Linux) and the vCPUs' CPUID; virtio-blk devices
/// (device ID 2) may follow the net device, their device bytes
/// `devices::virtio::block::BlockState` (capacity, read-only flag, image path).
pub const FORMAT_VERSION: u32 = 3;
/// Bytes of header before the payload.
pub const HEADER_LEN: usize = 32;

/// A state blob that cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PersistError {
    /// The blob does not start with [`MAGIC`].
    #[error("not a lockstep state blob (bad magic)")]
    BadMagic,
    /// The blob is of another format version.
    #[error("state format version {found}; this lockstep reads version {FORMAT_VERSION}")]
    Version {
        /// The blob's version.
        found: u32,
    },
    /// The blob is shorter than its header says.
    #[error("state blob truncated: header says {expected} payload bytes, {found} present")]
    Truncated {
        /// Payload bytes the header announces.
        expected: u64,
        /// Payload bytes present.
        found: u64,
    },
    /// The payload's CRC32 is not the header's.
    #[error("state checksum mismatch: header says {expected:#010x}, payload has {found:#010x}")]
    Checksum {
        /// The header's CRC32.
        expected: u32,
        /// The payload's CRC32.
        found: u32,
    },
    /// A field is out of range or the payload ends early (the text says which).
    #[error("state payload is malformed: {0}")]
    Malformed(String),
}

/// Wraps a payload in the header.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the header and returns the payload.
pub fn unseal(blob: &[u8]) -> Result<&[u8], PersistError> {
    if blob.len() < HEADER_LEN || blob[..8] != MAGIC {
        return Err(PersistError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(PersistError::Version { found: version });
    }
    for at in [12, 28] {
        let v = u32_at(at);
        if v != 0 {
            return Err(PersistError::Malformed(format!(
                "header reserved field at offset {at} is {v:#x}, expected 0"
            )));
        }
    }
    let len = u64::from_le_bytes(blob[16..24].try_into().expect("8 bytes"));
    let payload = &blob[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(PersistError::Truncated {
            expected: len,
            found: payload.len() as u64,
        });
    }
    let expected = u32_at(24);
    let found = crc32fast::hash(payload);
    if expected != found {
        return Err(PersistError::Checksum { expected, found });
    }
    Ok(payload)
}

/// Appends little-endian fields to a payload.
#[derive(Default)]
pub struct Writer {
    /// The payload written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// Appends one byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Appends a `u32`, little endian.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a `u64`, little endian.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
    /// A KVM structure, as its exact bytes.
    pub fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.buf.extend_from_slice(v.as_bytes());
    }
}

/// Reads what [`Writer`] wrote; every read is bounds-checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf` (a payload, without header).
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], PersistError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                PersistError::Malformed(format!("{what} runs past the end at offset {}", self.pos))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Reads one byte; `what` names the field in errors.
    pub fn u8(&mut self, what: &str) -> Result<u8, PersistError> {
        Ok(self.take(1, what)?[0])
    }
    /// Reads a little-endian `u32`.
    pub fn u32(&mut self, what: &str) -> Result<u32, PersistError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    /// Reads a little-endian `u64`.
    pub fn u64(&mut self, what: &str) -> Result<u64, PersistError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    /// Reads a length-prefixed (`u32`) byte string.
    pub fn bytes(&mut self, what: &str) -> Result<&'a [u8], PersistError> {
        let n = self.u64(what)?;
        let n = usize::try_from(n)
            .map_err(|_| PersistError::Malformed(format!("{what}: length {n}")))?;
        self.take(n, what)
    }
    /// Reads a KVM structure stored as its exact bytes.
    pub fn pod<T: FromBytes>(&mut self, what: &str) -> Result<T, PersistError> {
        let b = self.take(std::mem::size_of::<T>(), what)?;
        T::read_from_bytes(b).map_err(|_| PersistError::Malformed(format!("{what}: bad size")))
    }

    /// Fails unless everything was read.
    pub fn finish(self) -> Result<(), PersistError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(PersistError::Malformed(format!(
                "{} trailing bytes",
                self.buf.len() - self.pos
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_rejects_damage() {
        let blob = seal(b"hello state");
        assert_eq!(unseal(&blob).unwrap(), b"hello state");

        let mut bad = blob.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(unseal(&bad), Err(PersistError::Checksum { .. })));

        let mut v2 = blob.clone();
        v2[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(
            unseal(&v2),
            Err(PersistError::Version {
                found: FORMAT_VERSION + 1
            })
        );

        assert!(matches!(
            unseal(&blob[..blob.len() - 1]),
            Err(PersistError::Truncated { .. })
        ));
        assert_eq!(unseal(b"short"), Err(PersistError::BadMagic));
        let mut magic = blob.clone();
        magic[0] = b'X';
        assert_eq!(unseal(&magic), Err(PersistError::BadMagic));
    }

    #[test]
    fn reader_is_bounds_checked() {
        let mut w = Writer::default();
        w.u32(7);
        w.bytes(b"abc");
        w.pod(&kvm_bindings::kvm_regs {
            rip: 0x1234,
            ..Default::default()
        });
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.u32("a").unwrap(), 7);
        assert_eq!(r.bytes("b").unwrap(), b"abc");
        assert_eq!(r.pod::<kvm_bindings::kvm_regs>("regs").unwrap().rip, 0x1234);
        r.finish().unwrap();

        let mut r = Reader::new(&w.buf[..6]);
        r.u32("a").unwrap();
        assert!(r.bytes("b").is_err());
        let mut huge = Writer::default();
        huge.u64(u64::MAX);
        assert!(Reader::new(&huge.buf).bytes("x").is_err());
    }
}
