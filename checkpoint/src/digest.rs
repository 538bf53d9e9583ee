//! A fast 64-bit digest over guest RAM plus a state blob.
//!
//! Both sides of a protected pair print `final epoch=<E> digest=<hex>` at the end of a run;
//! equal memory and state give equal digests, so a test can prove the backup holds exactly
//! the primary's last committed epoch. The same construction checks each epoch on the wire
//! (`EpochCommit` carries the digest of the epoch's decoded pages and state).
//!
//! Construction: every page is hashed with XXH64 seeded by its guest-physical address, the
//! page hashes are added (wrapping), and the sum, the page count and the hash of the state
//! blob are hashed once more. Addition makes the digest independent of the order in which
//! pages are fed in, so encoder workers can digest their share of an epoch in parallel and
//! [`Digest::merge`] the parts. The seed makes a page moved to another address count as a
//! change. This is an error-detecting checksum, not a cryptographic one.

use std::fmt;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::PAGE_SIZE;

/// Errors from digesting guest memory.
#[derive(Debug, Error)]
pub enum DigestError {
    /// Guest memory could not be read.
    #[error("cannot read guest memory at gpa {gpa:#x} ({len} bytes) for the digest: {source}")]
    Read {
        /// Guest-physical address of the failed read.
        gpa: u64,
        /// Length of the failed read.
        len: usize,
        /// The error from vm-memory.
        source: vm_memory::GuestMemoryError,
    },
}

/// A finished 64-bit digest; `Display` prints 16 lower-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DigestValue(pub u64);

impl fmt::Display for DigestValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::LowerHex for DigestValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Seed of the state blob's hash (distinct from any page address seed in practice).
const STATE_SEED: u64 = 0x5354_4154_455f_4c4b;
/// Seed of a disk write's key hash.
const DISK_SEED: u64 = 0x4449_534b_5752_4954;
/// Seed of the hashes of the epoch's output frames.
const OUTPUT_SEED: u64 = 0x4f55_5450_5554_5f4c;
/// Seed of the final mixing hash.
const FINAL_SEED: u64 = 0x4c4f_434b_5354_4550;

/// An order-independent accumulator of pages; finish it with the state blob.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    sum: u64,
    pages: u64,
}

impl Digest {
    /// An empty digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one page (or any chunk) found at guest-physical address `gpa`.
    pub fn add_page(&mut self, gpa: u64, bytes: &[u8]) {
        self.sum = self.sum.wrapping_add(xxh64(bytes, gpa));
        self.pages += 1;
    }

    /// Adds a memory region starting at `gpa`, page by page (the last chunk may be short).
    pub fn add_region(&mut self, gpa: u64, bytes: &[u8]) {
        for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            self.add_page(gpa + (i * PAGE_SIZE) as u64, page);
        }
    }

    /// Adds the `seq`-th disk write of an epoch (counted over all its disks, in the order
    /// sent): `data` written at byte `offset` of disk `disk`. The seed covers all three, so
    /// writes reordered, moved or given to another disk change the digest.
    pub fn add_disk_write(&mut self, disk: u32, seq: u64, offset: u64, data: &[u8]) {
        let mut key = [0u8; 20];
        key[..4].copy_from_slice(&disk.to_le_bytes());
        key[4..12].copy_from_slice(&seq.to_le_bytes());
        key[12..].copy_from_slice(&offset.to_le_bytes());
        self.sum = self.sum.wrapping_add(xxh64(data, xxh64(&key, DISK_SEED)));
        self.pages += 1;
    }

    /// Adds the `index`-th network frame the guest sent during the epoch (an epoch's
    /// output is part of what its digest covers; the index makes the order count).
    pub fn add_output(&mut self, index: u64, frame: &[u8]) {
        let seed = OUTPUT_SEED ^ index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.sum = self.sum.wrapping_add(xxh64(frame, seed));
    }

    /// Folds another accumulator (e.g. another worker's share) into this one.
    pub fn merge(&mut self, other: &Digest) {
        self.sum = self.sum.wrapping_add(other.sum);
        self.pages += other.pages;
    }

    /// Number of pages added so far.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// The final digest of the pages added so far plus `state`.
    pub fn finish(&self, state: &[u8]) -> DigestValue {
        let mut buf = [0u8; 24];
        buf[..8].copy_from_slice(&self.sum.to_le_bytes());
        buf[8..16].copy_from_slice(&self.pages.to_le_bytes());
        buf[16..].copy_from_slice(&xxh64(state, STATE_SEED).to_le_bytes());
        DigestValue(xxh64(&buf, FINAL_SEED))
    }
}

/// Digest of memory regions given as `(gpa, bytes)` plus a state blob.
pub fn digest_regions<'a>(
    regions: impl IntoIterator<Item = (u64, &'a [u8])>,
    state: &[u8],
) -> DigestValue {
    let mut d = Digest::new();
    for (gpa, bytes) in regions {
        d.add_region(gpa, bytes);
    }
    d.finish(state)
}

/// Digest of all of `mem` plus `state`; equal to [`digest_regions`] over the same bytes.
pub fn digest_guest_memory<M: GuestMemoryBackend>(
    mem: &M,
    state: &[u8],
) -> Result<DigestValue, DigestError> {
    const CHUNK: usize = 64 * PAGE_SIZE;
    let mut buf = vec![0u8; CHUNK];
    let mut d = Digest::new();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            let gpa = start + off;
            mem.read_slice(&mut buf[..n], GuestAddress(gpa))
                .map_err(|source| DigestError::Read {
                    gpa,
                    len: n,
                    source,
                })?;
            d.add_region(gpa, &buf[..n]);
            off += n as u64;
        }
    }
    Ok(d.finish(state))
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline(always)]
fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[inline(always)]
fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline(always)]
fn merge_round(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 of `data` with `seed` (the reference algorithm, one shot).
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let len = data.len() as u64;
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v1 = seed.wrapping_add(P1).wrapping_add(P2);
        let mut v2 = seed.wrapping_add(P2);
        let mut v3 = seed;
        let mut v4 = seed.wrapping_sub(P1);
        let mut stripes = data.chunks_exact(32);
        for s in &mut stripes {
            v1 = round(v1, read_u64(&s[0..]));
            v2 = round(v2, read_u64(&s[8..]));
            v3 = round(v3, read_u64(&s[16..]));
            v4 = round(v4, read_u64(&s[24..]));
        }
        rest = stripes.remainder();
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        h = merge_round(h, v1);
        h = merge_round(h, v2);
        h = merge_round(h, v3);
        merge_round(h, v4)
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len);
    let mut words = rest.chunks_exact(8);
    for w in &mut words {
        h ^= round(0, read_u64(w));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
    }
    let mut rest = words.remainder();
    if rest.len() >= 4 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&rest[..4]);
        h ^= u64::from(u32::from_le_bytes(a)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn xxh64_matches_reference_vectors() {
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
    }

    #[test]
    fn xxh64_covers_every_tail_length() {
        // Every length from 0 to 70 exercises the stripe loop and all tail paths; a
        // one-bit flip anywhere must change the hash.
        let data: Vec<u8> = (0..70u8).map(|i| i.wrapping_mul(37)).collect();
        for len in 0..data.len() {
            let h = xxh64(&data[..len], 7);
            for i in 0..len {
                let mut d = data[..len].to_vec();
                d[i] ^= 1;
                assert_ne!(xxh64(&d, 7), h, "len {len} flip at {i}");
            }
        }
    }

    #[test]
    fn equal_inputs_give_equal_digests_and_order_does_not_matter() {
        let a = vec![1u8; PAGE_SIZE];
        let b = vec![2u8; PAGE_SIZE];
        let mut d1 = Digest::new();
        d1.add_page(0, &a);
        d1.add_page(4096, &b);
        let mut d2 = Digest::new();
        d2.add_page(4096, &b);
        d2.add_page(0, &a);
        assert_eq!(d1.finish(b"s"), d2.finish(b"s"));
        assert_ne!(d1.finish(b"s"), d1.finish(b"t"), "state must count");

        let mut parts = Digest::new();
        let mut other = Digest::new();
        parts.add_page(0, &a);
        other.add_page(4096, &b);
        parts.merge(&other);
        assert_eq!(parts, d1);
    }

    #[test]
    fn moved_or_changed_pages_change_the_digest() {
        let mut ram = vec![0u8; 4 * PAGE_SIZE];
        ram[PAGE_SIZE] = 9;
        let base = digest_regions([(0, &ram[..])], b"");
        let moved = {
            let mut r = vec![0u8; 4 * PAGE_SIZE];
            r[2 * PAGE_SIZE] = 9;
            digest_regions([(0, &r[..])], b"")
        };
        assert_ne!(base, moved);
        ram[3 * PAGE_SIZE + 100] = 1;
        assert_ne!(base, digest_regions([(0, &ram[..])], b""));
    }

    #[test]
    fn guest_memory_digest_matches_slice_digest() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 96 * PAGE_SIZE)]).unwrap();
        let mut ram = vec![0u8; 96 * PAGE_SIZE];
        for (i, b) in ram.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        mem.write_slice(&ram, GuestAddress(0)).unwrap();
        let want = digest_regions([(0, &ram[..])], b"state");
        assert_eq!(digest_guest_memory(&mem, b"state").unwrap(), want);
        assert_eq!(format!("{want}").len(), 16);
    }
}
