//! The guest's global allocator, for the workloads that need `alloc` (`kv`): size classes
//! of powers of two, each with a free list, carved from a bump region of free RAM.
//!
//! A freed block goes back to its class's free list and is reused for the next
//! allocation of that class; memory never goes back to the bump region. When a class has
//! no free block and the bump region is used up, a free block of a larger class is split
//! in halves (buddy style, never merged again), so memory freed in one size serves
//! allocations of smaller sizes. The bytes skipped to align a block go to the free
//! lists too, and free blocks below a page serve small allocations before fresh memory
//! does, so small blocks between page-sized ones waste nothing. Blocks of a class of up to a page are aligned to their
//! size, larger ones to a page, so any alignment up to 4096 is served from the lists; a
//! larger alignment always takes fresh memory (nothing here asks for one).
//!
//! The heap counts the bytes of the blocks it has handed out. Allocations made inside
//! [`for_data`] fail once that count would pass the *data limit* ([`set_data_limit`]),
//! so that what clients store cannot take the last of the memory: the rest stays for
//! the allocations that serve requests (buffers, replies), which can then still say that
//! memory is full instead of failing themselves.
//!
//! Until [`init`] hands it a region, every allocation fails (and `alloc` panics with
//! `memory allocation of N bytes failed`).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{self, null_mut};
use core::sync::atomic::{AtomicBool, Ordering};

/// The smallest block: room for the free-list link, and a useful minimum.
const MIN_SHIFT: u32 = 4;
/// Classes from 16 bytes to 2^47 bytes.
const CLASSES: usize = 44;
const PAGE: usize = 4096;
/// The class of a page.
const PAGE_CLASS: usize = (PAGE.trailing_zeros() - MIN_SHIFT) as usize;

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
    /// Next free byte of the bump region, and its end.
    next: usize,
    end: usize,
    /// Head of each class's free list; a free block holds the address of the next one.
    free: [*mut u8; CLASSES],
    /// Bytes given to the heap by `init`.
    size: usize,
    /// Bytes of the blocks handed out and not given back.
    used: usize,
    /// While `data` is set, an allocation fails rather than take `used` past `limit`.
    limit: usize,
    data: bool,
}

/// What the heap holds, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Given to the heap by `init`.
    pub size: usize,
    /// In blocks handed out (a block is the request rounded up to a power of two).
    pub used: usize,
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

/// The class index and block size for `layout`.
fn class(layout: Layout) -> (usize, usize) {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    match size.checked_next_power_of_two() {
        Some(block) => ((block.trailing_zeros() - MIN_SHIFT) as usize, block),
        // Larger than any class: `alloc` refuses it.
        None => (CLASSES, 0),
    }
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
                next: 0,
                end: 0,
                free: [null_mut(); CLASSES],
                size: 0,
                used: 0,
                limit: 0,
                data: false,
            }),
        }
    }

    /// Hands this heap `[start, end)`; see [`init`].
    ///
    /// # Safety
    ///
    /// `[start, end)` is mapped, writable memory that nothing else uses for as long as
    /// the heap hands out blocks from it.
    pub unsafe fn init(&self, start: usize, end: usize) {
        self.with(|state| {
            state.next = start;
            state.end = end;
            state.size = end.saturating_sub(start);
            state.limit = state.size;
        });
    }

    /// Allocations inside [`Heap::for_data`] fail once the blocks in use would take
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
    fn bump(&mut self, block: usize, align: usize) -> *mut u8 {
        let align = align.max(block.min(PAGE));
        let Some(start) = self.next.checked_add(align - 1).map(|n| n & !(align - 1)) else {
            return null_mut();
        };
        match start.checked_add(block) {
            Some(end) if end <= self.end => {
                self.free_gap(start);
                self.next = end;
                start as *mut u8
            }
            _ => null_mut(),
        }
    }

    /// Puts the bytes from `next` to `start`, skipped to align a block, on the free
    /// lists, as the largest aligned blocks that fit (else small blocks between large
    /// ones would waste up to a page each).
    fn free_gap(&mut self, start: usize) {
        let mut at = self.next;
        while at < start {
            let mut size = 1usize << MIN_SHIFT;
            while size * 2 <= start - at && at % (size * 2).min(PAGE) == 0 {
                size *= 2;
            }
            let index = (size.trailing_zeros() - MIN_SHIFT) as usize;
            // SAFETY: `[at, at + size)` lies in the unused bump region before `start`;
            // `at` is aligned to min(size, PAGE) (the loop above) and at least to 16,
            // since every block is a multiple of 16 bytes from a page-aligned start.
            unsafe { self.push(index, at as *mut u8) };
            at += size;
        }
    }

    /// Pops the head of class `index`'s free list (null when empty).
    fn pop(&mut self, index: usize) -> *mut u8 {
        let head = self.free[index];
        if !head.is_null() {
            // SAFETY: a free block holds the next free block's address in its first word
            // (written by `push`), and is aligned for it.
            self.free[index] = unsafe { head.cast::<*mut u8>().read() };
        }
        head
    }

    /// Puts the unused block `block` of class `index` on its free list.
    ///
    /// # Safety
    ///
    /// `block` is a block of class `index` (at least 16 bytes, aligned to 16) from this
    /// heap's region that nobody uses.
    unsafe fn push(&mut self, index: usize, block: *mut u8) {
        // SAFETY: the caller's promise: an unused block, big and aligned enough.
        unsafe { block.cast::<*mut u8>().write(self.free[index]) };
        self.free[index] = block;
    }

    /// A block of class `index` split off the smallest larger free block among
    /// `classes`: the first half
    /// of each split is split again until it has the size asked for, the second halves
    /// go to the free lists of their classes.
    fn split(&mut self, index: usize, classes: core::ops::Range<usize>) -> *mut u8 {
        let from = classes.start.max(index + 1);
        let Some(larger) = (from..classes.end).find(|&j| !self.free[j].is_null()) else {
            return null_mut();
        };
        let block = self.pop(larger);
        for k in (index..larger).rev() {
            let half = 1usize << (k as u32 + MIN_SHIFT);
            // SAFETY: `block` spans 2^(larger + MIN_SHIFT) bytes, so `block + half` for
            // k < larger is inside it and starts an unused block of class k, aligned to
            // min(half, PAGE) because `block` is aligned to min(its size, PAGE).
            unsafe { self.push(k, block.add(half)) };
        }
        block
    }

    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let (index, block) = class(layout);
        if index >= CLASSES {
            return null_mut();
        }
        if self.data && self.used.saturating_add(block) > self.limit {
            return null_mut();
        }
        let mut found = null_mut();
        let listed = layout.align() <= PAGE;
        if listed {
            found = self.pop(index);
        }
        // Free blocks below a page (the pieces of alignment gaps, freed small blocks)
        // serve small requests before fresh memory does: else each small block taken
        // from the bump region before a page-aligned one would leave a new gap.
        if found.is_null() && listed && index < PAGE_CLASS {
            found = self.split(index, 0..PAGE_CLASS);
        }
        if found.is_null() {
            found = self.bump(block, layout.align());
        }
        if found.is_null() && listed {
            found = self.split(index, 0..CLASSES);
        }
        if !found.is_null() {
            self.used += block;
        }
        found
    }
}

// SAFETY: blocks come from the region given to `init` (which nothing else uses), each
// handed out once until it is freed; a block of class `c` is at least `layout.size()`
// bytes and aligned to `layout.align()` (see `class`, `bump` and `split`).
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|state| state.alloc(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (index, block) = class(layout);
        self.with(|state| {
            // SAFETY: `ptr` is a block of this class that the caller gives back (the
            // `GlobalAlloc` contract): at least 16 bytes, 16-byte aligned and unused now.
            unsafe { state.push(index, ptr) };
            state.used -= block;
        });
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller promises `new_size` with this alignment is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if class(new_layout).1 == class(layout).1 {
            return ptr;
        }
        // SAFETY: a valid non-zero-size layout (the caller's contract).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes and are
            // distinct blocks; the old one is given back after the copy.
            unsafe {
                ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}
