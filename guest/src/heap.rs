//! The guest's global allocator, for the workloads that need `alloc` (`kv`): size classes
//! of powers of two, each with a free list, carved from a bump region of free RAM.
//!
//! A freed block goes back to its class's free list and is reused for the next
//! allocation of that class; memory never goes back to the bump region. Simple, O(1),
//! and enough for a guest whose allocations come in a few repeating sizes. Blocks of a
//! class of up to a page are aligned to their size, larger ones to a page, so any
//! alignment up to 4096 is served from the lists; a larger alignment always takes fresh
//! memory (nothing here asks for one).
//!
//! Until [`init`] hands it a region, every allocation fails (and `alloc` panics with
//! `memory allocation of N bytes failed`).

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, null_mut};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::abi::PAGE_SIZE;

/// The smallest block: room for the free-list link, and a useful minimum.
const MIN_SHIFT: u32 = 4;
/// Classes from 16 bytes to 2^47 bytes.
const CLASSES: usize = 44;
const PAGE: usize = PAGE_SIZE as usize;

#[global_allocator]
static HEAP: Heap = Heap {
    lock: AtomicBool::new(false),
    state: core::cell::UnsafeCell::new(State {
        next: 0,
        end: 0,
        free: [null_mut(); CLASSES],
    }),
};

struct Heap {
    lock: AtomicBool,
    state: core::cell::UnsafeCell<State>,
}

// SAFETY: `state` is only reached through `Heap::with`, which holds `lock`.
unsafe impl Sync for Heap {}

struct State {
    /// Next free byte of the bump region, and its end.
    next: usize,
    end: usize,
    /// Head of each class's free list; a free block holds the address of the next one.
    free: [*mut u8; CLASSES],
}

/// Hands the allocator the free RAM `[start, end)`. Called once, before anything
/// allocates.
///
/// # Safety
///
/// `[start, end)` is mapped RAM that nothing else uses for as long as the guest runs.
pub unsafe fn init(start: u64, end: u64) {
    HEAP.with(|state| {
        state.next = start as usize;
        state.end = end as usize;
    });
}

/// The class index and block size for `layout`.
fn class(layout: Layout) -> (usize, usize) {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    let block = size.next_power_of_two();
    ((block.trailing_zeros() - MIN_SHIFT) as usize, block)
}

impl Heap {
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
                self.next = end;
                start as *mut u8
            }
            _ => null_mut(),
        }
    }
}

// SAFETY: blocks come from the region given to `init` (which nothing else uses), each
// handed out once until it is freed; a block of class `c` is at least `layout.size()`
// bytes and aligned to `layout.align()` (see `class` and `bump`).
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (index, block) = class(layout);
        if index >= CLASSES {
            return null_mut();
        }
        self.with(|state| {
            let head = state.free[index];
            if !head.is_null() && layout.align() <= PAGE {
                // SAFETY: a free block of this class holds the next free block's address
                // in its first word (written by `dealloc`), and is aligned for it.
                state.free[index] = unsafe { head.cast::<*mut u8>().read() };
                return head;
            }
            state.bump(block, layout.align())
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (index, _) = class(layout);
        self.with(|state| {
            // SAFETY: `ptr` is a block of this class that the caller gives back (the
            // `GlobalAlloc` contract): at least 16 bytes, 16-byte aligned and unused now.
            unsafe { ptr.cast::<*mut u8>().write(state.free[index]) };
            state.free[index] = ptr;
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
