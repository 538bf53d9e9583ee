//! Which pages of guest RAM hold nothing but zeros, found without reading them: the
//! kernel's page map of this process (`/proc/self/pagemap`, one 64-bit entry per page).
//!
//! Guest RAM is private anonymous memory ([`memory::create`](super::memory::create)). A
//! page of it that is neither present nor swapped out was never written, or was discarded:
//! it reads as zeros. A present page that maps the kernel's shared zero page was only ever
//! read: zeros too. Every other page may hold data and must be read. Pre-copy sends the
//! zero pages as zero pages without copying them; reading them would cost a page fault
//! each (the kernel maps its zero page) and a copy, which is what made the initial sync of
//! a mostly untouched guest slow.
//!
//! The zero page's frame number is shown only to a process with `CAP_SYS_ADMIN` (to
//! others every frame number reads 0): without it, a page that was read but never written
//! counts as one that may hold data (it is read and found zero, as before). Without a
//! readable page map at all (no `/proc`), every page counts as one that may hold data.
//!
//! A page found zero here may be written by the guest right after: the dirty log has it
//! then, and the next pre-copy round (or epoch 1) sends it, as for a page copied before
//! the guest wrote it again.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::memory::{regions, GuestMemory};
use crate::boot::abi::PAGE_SIZE;

/// Bit 63 of an entry: the page is present in RAM.
const PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out.
const SWAPPED: u64 = 1 << 62;
/// Bits 0-54: the page frame number, when present (0 without `CAP_SYS_ADMIN`).
const PFN_MASK: u64 = (1 << 55) - 1;
/// Runs of consecutive pages shorter than this are not looked up: for a page or two the
/// system call costs about what copying them does.
const MIN_RUN: usize = 8;
/// Most entries read with one system call (64 MiB of RAM, 128 KiB of entries).
const MAX_READ: usize = 16 << 10;

/// What the page map says of one page of private anonymous memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Neither present nor swapped: never written (or discarded); reads as zeros.
    Untouched,
    /// Present and mapping the kernel's zero page: read, never written; zeros.
    ZeroPage,
    /// Present or swapped out: may hold anything.
    Data,
}

/// A reader of this process's page map; see the module documentation.
#[derive(Debug)]
pub struct PageMap {
    /// `None`: no page map, every page may hold data.
    file: Option<File>,
    /// The frame number of the kernel's zero page, when this process may see it.
    zero_pfn: Option<u64>,
    entries: Vec<u8>,
}

impl PageMap {
    /// Opens this process's page map. This never fails: without a readable page map every
    /// page counts as one that may hold data (see [`PageMap::available`]).
    pub fn open() -> PageMap {
        let file = File::open("/proc/self/pagemap").ok();
        let mut map = PageMap {
            file,
            zero_pfn: None,
            entries: Vec::new(),
        };
        map.zero_pfn = map.find_zero_pfn();
        map
    }

    /// Whether the page map can be read (otherwise every page counts as data).
    pub fn available(&self) -> bool {
        self.file.is_some()
    }

    /// Whether pages that map the kernel's zero page are recognised (this process sees
    /// frame numbers).
    pub fn sees_zero_page(&self) -> bool {
        self.zero_pfn.is_some()
    }

    /// The state of `count` pages of this process's memory from host address `addr`
    /// (page-aligned), appended to `out`; `None` (nothing appended) when the page map
    /// cannot be read for them.
    pub fn states(&mut self, addr: usize, count: usize, out: &mut Vec<PageState>) -> Option<()> {
        let file = self.file.as_ref()?;
        if addr % PAGE_SIZE as usize != 0 {
            return None;
        }
        let first = out.len();
        let mut page = addr / PAGE_SIZE as usize;
        let mut left = count;
        while left > 0 {
            let n = left.min(MAX_READ);
            self.entries.resize(n * 8, 0);
            if file
                .read_exact_at(&mut self.entries, (page * 8) as u64)
                .is_err()
            {
                out.truncate(first);
                return None;
            }
            out.extend(self.entries.chunks_exact(8).map(|e| {
                let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
                classify(e, self.zero_pfn)
            }));
            page += n;
            left -= n;
        }
        Some(())
    }

    /// Splits the guest pages `pfns` (sorted, as a dirty set is) into the pages that may
    /// hold data, appended to `data`, and the pages known to hold only zeros, appended to
    /// `zero`. Pages outside guest memory go to `data` (copying them reports the error);
    /// short runs of consecutive pages are not looked up and go to `data` too.
    pub fn split(
        &mut self,
        mem: &GuestMemory,
        pfns: &[u64],
        data: &mut Vec<u64>,
        zero: &mut Vec<u64>,
    ) {
        if self.file.is_none() {
            data.extend_from_slice(pfns);
            return;
        }
        let regions = regions(mem);
        let mut states = Vec::new();
        let mut i = 0;
        while i < pfns.len() {
            // The run of consecutive pages from `i` that lies in one region.
            let gpa = pfns[i].saturating_mul(PAGE_SIZE);
            let region = regions
                .iter()
                .find(|&&(start, _, len)| gpa >= start && gpa - start < len as u64);
            let Some(&(start, host, len)) = region else {
                data.push(pfns[i]);
                i += 1;
                continue;
            };
            let region_end = (start + len as u64) / PAGE_SIZE;
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 && pfns[j] < region_end {
                j += 1;
            }
            let run = &pfns[i..j];
            i = j;
            if run.len() < MIN_RUN {
                data.extend_from_slice(run);
                continue;
            }
            let addr = host as usize + (gpa - start) as usize;
            states.clear();
            if self.states(addr, run.len(), &mut states).is_none() {
                data.extend_from_slice(run);
                continue;
            }
            for (&pfn, state) in run.iter().zip(&states) {
                match state {
                    PageState::Data => data.push(pfn),
                    PageState::Untouched | PageState::ZeroPage => zero.push(pfn),
                }
            }
        }
    }

    /// Maps a fresh anonymous page, reads it (the kernel maps its zero page there) and
    /// looks up the frame number; `None` when frame numbers are hidden from this process.
    fn find_zero_pfn(&mut self) -> Option<u64> {
        let file = self.file.as_ref()?;
        let len = PAGE_SIZE as usize;
        // SAFETY: a new private anonymous mapping of one page at an address the kernel
        // chooses; it aliases nothing and is unmapped below.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .ok()?;
        // SAFETY: `ptr` is the start of the readable page mapped above.
        let _ = unsafe { std::ptr::read_volatile(ptr.cast::<u8>()) };
        let mut entry = [0u8; 8];
        let read = file.read_exact_at(&mut entry, (ptr as usize / len * 8) as u64);
        // SAFETY: `ptr` and `len` are the mapping made above, not used after this.
        let _ = unsafe { rustix::mm::munmap(ptr, len) };
        read.ok()?;
        let entry = u64::from_le_bytes(entry);
        let pfn = entry & PFN_MASK;
        (entry & PRESENT != 0 && pfn != 0).then_some(pfn)
    }
}

/// What one page-map entry says, given the zero page's frame number if known.
fn classify(entry: u64, zero_pfn: Option<u64>) -> PageState {
    if entry & (PRESENT | SWAPPED) == 0 {
        PageState::Untouched
    } else if entry & PRESENT != 0 && zero_pfn == Some(entry & PFN_MASK) {
        PageState::ZeroPage
    } else {
        PageState::Data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create;
    use vm_memory::{Bytes, GuestAddress};

    const P: usize = PAGE_SIZE as usize;

    #[test]
    fn entries_are_classified_by_their_bits() {
        assert_eq!(classify(0, None), PageState::Untouched);
        assert_eq!(classify(0, Some(7)), PageState::Untouched);
        assert_eq!(classify(PRESENT | 7, Some(7)), PageState::ZeroPage);
        assert_eq!(classify(PRESENT | 8, Some(7)), PageState::Data);
        // Frame numbers hidden: a present page may hold anything.
        assert_eq!(classify(PRESENT, None), PageState::Data);
        assert_eq!(classify(SWAPPED | 7, Some(7)), PageState::Data);
        // Soft-dirty or exclusive bits alone do not make a page present.
        assert_eq!(classify(1 << 55 | 1 << 56, None), PageState::Untouched);
    }

    #[test]
    fn untouched_written_zeroed_read_and_discarded_pages() {
        let mut map = PageMap::open();
        assert!(map.available(), "/proc/self/pagemap must be readable here");
        let mem = create(64 << 20).unwrap();
        let (_, host, _) = regions(&mem)[0];
        let page = |i: usize| host as usize + i * P;
        // SAFETY: advice on the guest mapping, which stays mapped; it changes no content.
        // Without transparent huge pages a first write populates one page, not 2 MiB.
        unsafe { rustix::mm::madvise(host.cast(), 64 << 20, rustix::mm::Advice::LinuxNoHugepage) }
            .unwrap();
        // Page 1: written; page 2: written, then zeroed again; page 3: read only; page 4:
        // written, then discarded (MADV_DONTNEED: it reads as zeros again).
        mem.write_slice(&[7u8; P], GuestAddress(P as u64)).unwrap();
        mem.write_slice(&[9u8; P], GuestAddress(2 * P as u64))
            .unwrap();
        mem.write_slice(&[0u8; P], GuestAddress(2 * P as u64))
            .unwrap();
        // SAFETY: page 3 lies inside the guest mapping, which outlives this read.
        let _ = unsafe { std::ptr::read_volatile(page(3) as *const u8) };
        mem.write_slice(&[5u8; P], GuestAddress(4 * P as u64))
            .unwrap();
        // SAFETY: page 4 lies inside the guest mapping; discarding it only makes it read
        // as zeros, nothing holds a reference into it.
        unsafe {
            rustix::mm::madvise(
                page(4) as *mut std::ffi::c_void,
                P,
                rustix::mm::Advice::LinuxDontNeed,
            )
        }
        .unwrap();

        let mut states = Vec::new();
        map.states(page(0), 6, &mut states).unwrap();
        let read_only = if map.sees_zero_page() {
            PageState::ZeroPage
        } else {
            PageState::Data
        };
        assert_eq!(
            states,
            [
                PageState::Untouched,
                PageState::Data,
                // Written then zeroed: present, so it is read (and found zero).
                PageState::Data,
                read_only,
                PageState::Untouched,
                PageState::Untouched,
            ]
        );

        // Split a dense run and a short one: pages 0..16 and 100, 102.
        let mut pfns: Vec<u64> = (0..16).collect();
        pfns.extend([100, 102]);
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        map.split(&mem, &pfns, &mut data, &mut zero);
        let mut want_data = vec![1, 2];
        if !map.sees_zero_page() {
            want_data.push(3);
        }
        want_data.extend([100, 102]);
        assert_eq!(data, want_data);
        assert_eq!(zero.len() + data.len(), pfns.len());
        assert!(zero.iter().all(|p| !want_data.contains(p)));

        // Pages outside guest memory are left for the copy to report.
        let last = (64 << 20) / P as u64;
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        let far: Vec<u64> = (last..last + 16).collect();
        map.split(&mem, &far, &mut data, &mut zero);
        assert_eq!((data, zero.len()), (far, 0));
    }

    #[test]
    fn without_a_page_map_every_page_may_hold_data() {
        let mut map = PageMap {
            file: None,
            zero_pfn: None,
            entries: Vec::new(),
        };
        let mem = create(64 << 20).unwrap();
        let pfns: Vec<u64> = (0..32).collect();
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        map.split(&mem, &pfns, &mut data, &mut zero);
        assert_eq!((data, zero.len()), (pfns, 0));
        assert!(map.states(0, 1, &mut Vec::new()).is_none());
    }
}
