//! The guest's global allocator, for the workloads that need `alloc` (`kv`): the `talc`
//! crate's allocator over the free RAM, wrapped with the guest's accounting.
//!
//! `talc` keeps free memory as gaps binned by size and merges a freed block with the
//! free gaps beside it, so memory freed in any sizes serves allocations of any size
//! again (up to what is free in one piece). The earlier allocator of this file (size
//! classes of powers of two carved from a bump region, never merged) could not: after
//! many small values were stored and flushed, the memory they had taken only served
//! small blocks, and large values or the table's segment array no longer fit.
//!
//! The heap counts the bytes of the blocks it has handed out (each rounded up as `talc`
//! takes it: the size plus a word, in units of 32 bytes), and apart from them the bytes
//! of the blocks allocated inside [`for_data`]. Those fail once the data bytes would
//! pass the *data limit* ([`set_data_limit`]), so that what clients store cannot take
//! the last of the memory: the rest stays for the allocations that serve requests
//! (buffers, replies), which can then still say that memory is full instead of failing
//! themselves. Only data counts against the limit: a connection's buffers never keep a
//! store that has some room from taking a small value.
//!
//! A block is known as data when it is freed (also outside `for_data`, by DEL or
//! FLUSHALL) by a bitmap of one bit per 8 bytes of the region, set at the block's
//! address: 1/64 of the region, taken from its start by [`init`].
//!
//! Until [`init`] hands it a region, every allocation fails (and `alloc` panics with
//! `memory allocation of N bytes failed`).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{self, null_mut};
use core::sync::atomic::{AtomicBool, Ordering};

use talc::base::{Talc, CHUNK_UNIT};
use talc::source::Manual;
use talc::DefaultBinning;

/// Bytes of the region for each bit of the data bitmap. Distinct blocks start at least
/// this far apart (each takes its size plus a word).
const GRANULE: usize = 8;
const WORD: usize = core::mem::size_of::<usize>();

/// The allocator of the guest binary. Host tests that include this file by path are
/// compiled with `cfg(test)` and keep their own global allocator (they may wrap this one).
#[cfg_attr(not(test), global_allocator)]
pub static HEAP: Heap = Heap::new();

pub struct Heap {
    lock: AtomicBool,
    state: UnsafeCell<State>,
}

// SAFETY: `state` is only reached through `Heap::with`, which holds `lock`.
unsafe impl Sync for Heap {}

struct State {
    talc: Talc<Manual, DefaultBinning>,
    /// Whether `talc` has a region (a region too small for it leaves the heap empty).
    ready: bool,
    /// The bitmap of data blocks (one bit per `GRANULE` bytes from `base`), and its words.
    marks: *mut u64,
    words: usize,
    /// The start of the region given to `init`.
    base: usize,
    /// Bytes given to the heap by `init`, less the bitmap.
    size: usize,
    /// Bytes of the blocks handed out and not given back.
    used: usize,
    /// Of those, the bytes of the blocks allocated inside `for_data`.
    data_used: usize,
    /// While `data` is set, an allocation fails rather than take `data_used` past `limit`.
    limit: usize,
    data: bool,
}

/// What the heap holds, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Given to the heap by `init` (less its bitmap of data blocks).
    pub size: usize,
    /// In blocks handed out (a block is the request plus a word, rounded up to 32).
    pub used: usize,
    /// Of `used`, in blocks allocated inside `for_data` and not given back.
    pub data: usize,
    /// The data limit (`size` unless set lower).
    pub limit: usize,
}

/// Hands the allocator the free RAM `[start, end)`. Called once, before anything
/// allocates. The data limit starts at the whole region.
///
/// # Safety
///
/// `[start, end)` is mapped RAM that nothing else uses for as long as the guest runs.
pub unsafe fn init(start: u64, end: u64) {
    // SAFETY: the caller's promise, passed on.
    unsafe { HEAP.init(start as usize, end as usize) }
}

/// Sets the data limit of the guest's heap; see [`Heap::set_data_limit`].
pub fn set_data_limit(bytes: usize) {
    HEAP.set_data_limit(bytes);
}

/// Runs `f` with the guest heap's allocations held to the data limit; see
/// [`Heap::for_data`].
pub fn for_data<R>(f: impl FnOnce() -> R) -> R {
    HEAP.for_data(f)
}

pub fn usage() -> Usage {
    HEAP.usage()
}

/// The bytes a block of `size` takes in `talc` (its chunk: the size and a tail word,
/// in whole units).
fn charge(size: usize) -> usize {
    size.max(1).saturating_add(WORD + CHUNK_UNIT - 1) & !(CHUNK_UNIT - 1)
}

impl Default for Heap {
    fn default() -> Self {
        Self::new()
    }
}

impl Heap {
    pub const fn new() -> Heap {
        Heap {
            lock: AtomicBool::new(false),
            state: UnsafeCell::new(State {
                talc: Talc::new(Manual),
                ready: false,
                marks: null_mut(),
                words: 0,
                base: 0,
                size: 0,
                used: 0,
                data_used: 0,
                limit: 0,
                data: false,
            }),
        }
    }

    /// Hands this heap `[start, end)`; see [`init`]. The first 1/64 of it becomes the
    /// bitmap of data blocks, the rest the allocator's.
    ///
    /// # Safety
    ///
    /// `[start, end)` is mapped, writable memory that nothing else uses for as long as
    /// the heap hands out blocks from it.
    pub unsafe fn init(&self, start: usize, end: usize) {
        self.with(|state| {
            let base = start.next_multiple_of(GRANULE);
            let len = end.saturating_sub(base);
            let words = len.div_ceil(GRANULE * 64);
            let bitmap = words * 8;
            if bitmap >= len {
                return;
            }
            let marks = base as *mut u64;
            // SAFETY: `[base, base + bitmap)` lies in the region the caller gives us,
            // aligned to 8 bytes.
            unsafe { ptr::write_bytes(marks, 0, words) };
            let heap = base + bitmap;
            // SAFETY: the rest of the region, which nothing else uses (the caller's
            // promise); `Manual` lets us hand `talc` memory ourselves.
            let claimed = unsafe { state.talc.claim(heap as *mut u8, end - heap) };
            if claimed.is_none() {
                return;
            }
            state.ready = true;
            state.marks = marks;
            state.words = words;
            state.base = base;
            state.size = end - heap;
            state.limit = state.size;
        });
    }

    /// Allocations inside [`Heap::for_data`] fail once the data blocks in use would take
    /// more than `bytes`.
    pub fn set_data_limit(&self, bytes: usize) {
        self.with(|state| state.limit = bytes);
    }

    /// Runs `f` with its allocations held to the data limit: one that would pass it
    /// fails (returns null, so `try_reserve` reports an error) instead of taking the
    /// memory kept for serving requests. Meant for the code that stores client data; the
    /// kv service runs on one vCPU, so nothing else allocates meanwhile.
    pub fn for_data<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Puts the flag back as it was, also when `f` unwinds (host tests).
        struct Restore<'h>(&'h Heap, bool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                let outer = self.1;
                self.0.with(|state| state.data = outer);
            }
        }
        let outer = self.with(|state| core::mem::replace(&mut state.data, true));
        let _restore = Restore(self, outer);
        f()
    }

    pub fn usage(&self) -> Usage {
        self.with(|state| Usage {
            size: state.size,
            used: state.used,
            data: state.data_used,
            limit: state.limit,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference to the state.
        let result = f(unsafe { &mut *self.state.get() });
        self.lock.store(false, Ordering::Release);
        result
    }
}

impl State {
    /// The word and bit of the bitmap for the block at `ptr`.
    fn mark_at(&self, ptr: *mut u8) -> (usize, u64) {
        let granule = (ptr as usize - self.base) / GRANULE;
        debug_assert!(granule / 64 < self.words);
        (granule / 64, 1 << (granule % 64))
    }

    fn is_data(&self, ptr: *mut u8) -> bool {
        let (word, bit) = self.mark_at(ptr);
        // SAFETY: `ptr` is a block of this heap, so its word is inside the bitmap.
        unsafe { self.marks.add(word).read() & bit != 0 }
    }

    fn set_data(&mut self, ptr: *mut u8, data: bool) {
        let (word, bit) = self.mark_at(ptr);
        // SAFETY: as in `is_data`; the bitmap is ours alone.
        unsafe {
            let at = self.marks.add(word);
            at.write(if data {
                at.read() | bit
            } else {
                at.read() & !bit
            });
        }
    }

    /// Whether taking `bytes` more for data stays within the limit (always true
    /// outside `for_data`).
    fn allows(&self, bytes: usize) -> bool {
        !self.data || self.data_used.saturating_add(bytes) <= self.limit
    }

    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let charge = charge(layout.size());
        if !self.ready || !self.allows(charge) {
            return null_mut();
        }
        let layout = Layout::from_size_align(layout.size().max(1), layout.align());
        let Ok(layout) = layout else {
            return null_mut();
        };
        // SAFETY: a layout of non-zero size.
        let Some(found) = (unsafe { self.talc.allocate(layout) }) else {
            return null_mut();
        };
        let found = found.as_ptr();
        self.used += charge;
        if self.data {
            self.data_used += charge;
        }
        self.set_data(found, self.data);
        found
    }

    /// # Safety
    ///
    /// `ptr` is a block of this heap allocated with `layout`, given back once.
    unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        let charge = charge(layout.size());
        if self.is_data(ptr) {
            self.data_used -= charge;
            self.set_data(ptr, false);
        }
        self.used -= charge;
        // SAFETY: the caller's promise; the size as it was allocated (non-zero).
        unsafe {
            let layout = Layout::from_size_align_unchecked(layout.size().max(1), layout.align());
            self.talc.deallocate(ptr, layout);
        }
    }

    /// Resizes the block at `ptr` in place when it can, else moves it. A block stays
    /// data if it was; one grown inside `for_data` becomes data and is held to the limit.
    ///
    /// # Safety
    ///
    /// `ptr` is a block of this heap allocated with `layout`; `new_size` with
    /// `layout.align()` is a valid layout of non-zero size.
    unsafe fn realloc(&mut self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_size = layout.size().max(1);
        // SAFETY: the caller's promise.
        let old_layout = unsafe { Layout::from_size_align_unchecked(old_size, layout.align()) };
        let (old, new) = (charge(old_size), charge(new_size));
        let was_data = self.is_data(ptr);
        let data = was_data || self.data;
        let counted = if was_data { old } else { 0 };
        if new > counted && !self.allows(new - counted) {
            return null_mut();
        }
        let in_place = if new_size <= old_size {
            // SAFETY: a block of this layout, shrunk to a non-zero size.
            unsafe { self.talc.shrink(ptr, old_layout, new_size) };
            true
        } else {
            // SAFETY: a block of this layout, grown.
            unsafe { self.talc.try_grow_in_place(ptr, old_layout, new_size) }
        };
        if in_place {
            self.used = self.used - old + new;
            if data {
                self.data_used = self.data_used - counted + new;
            }
            self.set_data(ptr, data);
            return ptr;
        }
        // SAFETY: the caller's promise.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a layout of non-zero size.
        let Some(moved) = (unsafe { self.talc.allocate(new_layout) }) else {
            return null_mut();
        };
        let moved = moved.as_ptr();
        // SAFETY: both blocks are valid for the smaller size and distinct; the old one
        // is given back after the copy.
        unsafe {
            ptr::copy_nonoverlapping(ptr, moved, old_size.min(new_size));
            self.dealloc(ptr, layout);
        }
        self.used += new;
        if data {
            self.data_used += new;
        }
        self.set_data(moved, data);
        moved
    }
}

// SAFETY: blocks come from `talc` over the region given to `init` (which nothing else
// uses), each handed out once until it is freed, with the size and alignment asked for.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|state| state.alloc(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a block of this heap that the caller gives back with its
        // layout (the `GlobalAlloc` contract).
        self.with(|state| unsafe { state.dealloc(ptr, layout) });
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the `GlobalAlloc` contract, passed on.
        self.with(|state| unsafe { state.realloc(ptr, layout, new_size) })
    }
}
