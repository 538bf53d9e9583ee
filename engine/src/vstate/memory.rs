//! Guest RAM: one anonymous mapping at GPA 0, tracked by vm-memory's dirty bitmap for
//! writes made by the VMM and devices (KVM's dirty log tracks the guest's own writes).

use std::num::NonZeroUsize;

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::abi::{IMAGE_BASE, MAX_RAM, PAGE_SIZE};
use crate::size::format_size;

pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The smallest RAM that holds the fixed layout, the image and some heap.
pub const MIN_RAM: u64 = IMAGE_BASE + (2 << 20);

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("--mem {0}: guest memory must be at least {min}", min = format_size(MIN_RAM))]
    TooSmall(String),
    #[error("--mem {0}: guest memory must be a multiple of 4K")]
    Unaligned(String),
    #[error("--mem {0}: larger than the {max} the guest layout maps", max = format_size(MAX_RAM))]
    TooLarge(String),
    #[error("--mem {requested}: larger than this machine's {total} of RAM")]
    MoreThanHost { requested: String, total: String },
    #[error("cannot map {size} of guest memory: {source}")]
    Map {
        size: String,
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
    GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)]).map_err(|source| {
        MemoryError::Map {
            size: format_size(size),
            source,
        }
    })
}

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
}
