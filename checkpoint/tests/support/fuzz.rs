//! What the fuzz targets of `checkpoint` and `engine` share: a counting allocator that
//! measures the largest single allocation a decoder makes, the case count
//! (`LOCKSTEP_FUZZ_CASES`), and byte-string mutations. Each test file includes it by path
//! and keeps its own strategy for choosing mutations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::test_runner::Config;

// ---------------------------------------------------------------------------------------
// Allocation accounting: the largest single allocation made by this thread since `reset`.

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| {
        if size > m.get() {
            m.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping
// touches only a const-initialised thread-local cell and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the largest single allocation it made.
pub fn measured<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    let r = f();
    (r, LARGEST.with(|m| m.get()))
}

/// Cases per target: `LOCKSTEP_FUZZ_CASES` if set, else `default` (sized so a whole file
/// runs in a few seconds in release mode).
pub fn config(default: u32) -> Config {
    let cases = std::env::var("LOCKSTEP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    }
}

/// One change to a byte string; positions are taken modulo its length.
#[derive(Debug, Clone)]
pub enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        keep: usize,
    },
    Extend(Vec<u8>),
    Splice {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        n: usize,
    },
    /// Overwrites a little-endian `u32` (a length or count field, often) with `v`.
    Word {
        at: usize,
        v: u32,
    },
    /// Overwrites a little-endian `u64`.
    Quad {
        at: usize,
        v: u64,
    },
}

/// Applies `m` to `b` (a mutation that does not fit the length leaves `b` as it is).
pub fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let len = b.len();
    match m {
        Mutation::Flip { at, bit } if len > 0 => b[at % len] ^= 1 << bit,
        Mutation::Truncate { keep } => b.truncate(keep % (len + 1)),
        Mutation::Extend(x) => b.extend_from_slice(x),
        Mutation::Splice { at, bytes } => {
            let at = at % (len + 1);
            b.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove { at, n } if len > 0 => {
            let at = at % len;
            b.drain(at..(at + n).min(len));
        }
        Mutation::Word { at, v } if len >= 4 => {
            let at = at % (len - 3);
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::Quad { at, v } if len >= 8 => {
            let at = at % (len - 7);
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        _ => {}
    }
}
