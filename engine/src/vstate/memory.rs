//! Guest RAM: one anonymous mapping at GPA 0, with a dirty bitmap ([`DirtyBitmap`]) for
//! writes made by the VMM and devices (KVM's dirty log tracks the guest's own writes).

use std::num::NonZeroUsize;

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::abi::{IMAGE_BASE, MAX_RAM, PAGE_SIZE};
use crate::size::format_size;
use crate::vstate::bitmap::DirtyBitmap;

/// Guest RAM with a dirty bitmap for the VMM's own writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// The smallest RAM that holds the fixed layout, the image and some heap.
pub const MIN_RAM: u64 = IMAGE_BASE + (2 << 20);

/// Guest RAM of the size asked for cannot be had.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Below [`MIN_RAM`] (the size asked for).
    #[error("--mem {0}: guest memory must be at least {min}", min = format_size(MIN_RAM))]
    TooSmall(String),
    /// Not a multiple of 4 KiB.
    #[error("--mem {0}: guest memory must be a multiple of 4K")]
    Unaligned(String),
    /// Above [`MAX_RAM`].
    #[error("--mem {0}: larger than the {max} the guest layout maps", max = format_size(MAX_RAM))]
    TooLarge(String),
    /// More than the host has.
    #[error("--mem {requested}: larger than this machine's {total} of RAM")]
    MoreThanHost {
        /// The size asked for.
        requested: String,
        /// The host's RAM.
        total: String,
    },
    /// The mapping failed.
    #[error("cannot map {size} of guest memory: {source}")]
    Map {
        /// The size asked for.
        size: String,
        /// vm-memory's error.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Checks a requested RAM size against the layout and against this host's memory.
pub fn validate_size(size: u64) -> Result<(), MemoryError> {
    let s = format_size(size);
    if size < MIN_RAM {
        return Err(MemoryError::TooSmall(s));
    }
    if size % PAGE_SIZE != 0 {
        return Err(MemoryError::Unaligned(s));
    }
    if size > MAX_RAM {
        return Err(MemoryError::TooLarge(s));
    }
    if let Some(total) = host_memory() {
        if size > total {
            return Err(MemoryError::MoreThanHost {
                requested: s,
                total: format_size(total),
            });
        }
    }
    Ok(())
}

/// MemTotal from /proc/meminfo, in bytes.
fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Maps `size` bytes of guest RAM at GPA 0 with a dirty bitmap.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    validate_size(size)?;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)]).map_err(|source| {
        MemoryError::Map {
            size: format_size(size),
            source,
        }
    })?;
    Ok(mem)
}

/// Bytes of guest RAM.
pub fn ram_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Page size of vm-memory's bitmap, for callers that build their own bitmaps.
pub fn page_size() -> NonZeroUsize {
    NonZeroUsize::new(PAGE_SIZE as usize).expect("non-zero")
}

/// The host address and length of each region, in GPA order.
pub fn regions(mem: &GuestMemory) -> Vec<(u64, *mut u8, usize)> {
    mem.iter()
        .map(|r| (r.start_addr().0, r.as_ptr(), r.len() as usize))
        .collect()
}

/// Copies the pages `pfns` into `out` (resized to fit), in order, with plain `memcpy`:
/// the one page copy of both pre-copy and epochs.
///
/// vm-memory's `read_slice` copies with volatile word accesses, which measured ~3 µs per
/// page here; `memcpy` is several times faster. During an epoch's pause the vCPUs are
/// paused and the copy is exact. During pre-copy the guest runs and a page may change
/// while it is copied: the copy may then be torn, but the write also marks the page
/// dirty, so the next round (or epoch 1) sends it again.
pub fn copy_pages(
    mem: &GuestMemory,
    pfns: &[u64],
    out: &mut Vec<u8>,
) -> Result<(), PageOutOfRange> {
    let page = PAGE_SIZE as usize;
    out.resize(pfns.len() * page, 0);
    // Below this, a second thread costs more than it saves: the pause's residual copy
    // after the early one (a few hundred pages) is ~100 µs on one thread, and a thread
    // started for it may wait for a CPU the encoder holds (`bench checkpoint`, 25 ms x
    // 2,000 pages: pause p99 2.7-3.8 ms with a second thread from 256 pages, 0.37-2.8 ms
    // from 2,048). Pre-copy's chunks of 2,048 pages still use two.
    const PARALLEL_MIN_PAGES: usize = 2048;
    if pfns.len() >= PARALLEL_MIN_PAGES {
        let half = pfns.len() / 2;
        let (a, b) = out.split_at_mut(half * page);
        return std::thread::scope(|s| {
            let other = s.spawn(|| copy_into(mem, &pfns[half..], b));
            let mine = copy_into(mem, &pfns[..half], a);
            mine.and(other.join().expect("page copy thread panicked"))
        });
    }
    copy_into(mem, pfns, out)
}

fn copy_into(mem: &GuestMemory, pfns: &[u64], out: &mut [u8]) -> Result<(), PageOutOfRange> {
    let page = PAGE_SIZE as usize;
    let regions = regions(mem);
    for (&pfn, dst) in pfns.iter().zip(out.chunks_exact_mut(page)) {
        let gpa = pfn.checked_mul(PAGE_SIZE).ok_or(PageOutOfRange(pfn))?;
        let (start, host, len) = regions
            .iter()
            .copied()
            .find(|&(start, _, len)| gpa >= start && gpa + PAGE_SIZE <= start + len as u64)
            .ok_or(PageOutOfRange(pfn))?;
        let offset = (gpa - start) as usize;
        debug_assert!(offset + page <= len);
        // SAFETY: `host` maps `len` bytes of guest RAM owned by `mem`, and
        // `offset + page <= len` was checked above, so the source lies inside the mapping;
        // `dst` is a distinct page-sized slice of `out`. Guest RAM is never borrowed as a
        // Rust reference, only read through the raw mapping; a vCPU writing the page
        // meanwhile (pre-copy) can only make the copied bytes stale, which the dirty log
        // records.
        unsafe { std::ptr::copy_nonoverlapping(host.add(offset), dst.as_mut_ptr(), page) };
    }
    Ok(())
}

/// A page frame number outside guest memory.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("page {0:#x} is outside guest memory")]
pub struct PageOutOfRange(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_validated() {
        assert!(matches!(validate_size(0), Err(MemoryError::TooSmall(_))));
        assert!(matches!(
            validate_size(MIN_RAM + 1),
            Err(MemoryError::Unaligned(_))
        ));
        assert!(matches!(
            validate_size(MAX_RAM * 2),
            Err(MemoryError::TooLarge(_))
        ));
        assert!(validate_size(64 << 20).is_ok());
        let m = create(64 << 20).unwrap();
        assert_eq!(ram_size(&m), 64 << 20);
    }

    #[test]
    fn copy_pages_copies_in_order_and_checks_bounds() {
        use vm_memory::Bytes;
        let m = create(64 << 20).unwrap();
        m.write_slice(&[7u8; 4096], GuestAddress(5 * 4096)).unwrap();
        m.write_slice(&[9u8; 4096], GuestAddress(2 * 4096)).unwrap();
        let mut out = Vec::new();
        copy_pages(&m, &[5, 2, 3], &mut out).unwrap();
        assert_eq!(out.len(), 3 * 4096);
        assert!(out[..4096].iter().all(|&b| b == 7));
        assert!(out[4096..8192].iter().all(|&b| b == 9));
        assert!(out[8192..].iter().all(|&b| b == 0));
        let last = (64 << 20) / 4096;
        assert_eq!(copy_pages(&m, &[last], &mut out), Err(PageOutOfRange(last)));
    }
}
