//! The kv service when memory runs out, on the guest's own allocator (`src/heap.rs`)
//! over a 64 MiB arena: this test program's global allocator is that heap, so the
//! session, the table and the test itself all allocate from it, as in the guest.
//!
//! It runs without the libtest harness (`harness = false`): the data limit is a flag of
//! the one heap, and the checks that exhaust the heap must not share it with threads
//! of other tests.

extern crate alloc;

#[path = "../src/workloads/kv/commands.rs"]
mod commands;
#[path = "../src/heap.rs"]
#[allow(dead_code)]
mod heap;
#[path = "../src/workloads/kv/resp.rs"]
mod resp;
#[path = "../src/workloads/kv/session.rs"]
#[allow(dead_code)]
mod session;
#[path = "../src/workloads/kv/table.rs"]
mod table;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU8, Ordering};

use session::Session;
use table::Table;

const ARENA_BYTES: usize = 64 << 20;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_BYTES]>);

// SAFETY: the arena is only reached through the heap, which hands out each block once.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_BYTES]));

/// `heap::HEAP` over `ARENA`, set up on the first allocation.
struct TestHeap;

static READY: AtomicU8 = AtomicU8::new(0);

fn ready() {
    if READY.load(Ordering::Acquire) == 2 {
        return;
    }
    if READY
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        let start = ARENA.0.get() as usize;
        // SAFETY: the arena is static memory that only this heap uses.
        unsafe { heap::HEAP.init(start, start + ARENA_BYTES) };
        READY.store(2, Ordering::Release);
    }
    while READY.load(Ordering::Acquire) != 2 {
        std::hint::spin_loop();
    }
}

// SAFETY: every call goes to `heap::HEAP`, a `GlobalAlloc`, once it owns the arena.
unsafe impl GlobalAlloc for TestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ready();
        // SAFETY: the caller's layout contract, passed on.
        unsafe { heap::HEAP.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { heap::HEAP.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `alloc` above with this layout; the caller's contract.
        unsafe { heap::HEAP.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: TestHeap = TestHeap;

const OOM: &[u8] = resp::OOM;

fn command(args: &[&[u8]]) -> Vec<u8> {
    // One block of the size needed: a test's own growing buffers would leave holes
    // between the values it stores.
    let bytes = 16 + args.iter().map(|a| a.len() + 32).sum::<usize>();
    let mut out = Vec::with_capacity(bytes);
    out.extend(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Feeds `input` in chunks of `chunk` bytes as the kv driver does; the replies.
fn drive(session: &mut Session, store: &mut Table, input: &[u8], chunk: usize) -> Vec<u8> {
    let mut replies = Vec::new();
    drive_into(session, store, input, chunk, &mut replies, true);
    replies
}

/// [`drive`], appending the replies to `replies`; when `grow` is false, `replies` must
/// have the room for them (nothing here allocates then).
fn drive_into(
    session: &mut Session,
    store: &mut Table,
    input: &[u8],
    chunk: usize,
    replies: &mut Vec<u8>,
    grow: bool,
) {
    let mut at = 0;
    loop {
        let n = session.output().len();
        assert!(
            grow || replies.len() + n <= replies.capacity(),
            "no room for the replies"
        );
        replies.extend_from_slice(session.output());
        session.sent(n);
        assert!(!session.closing(), "the session closed the connection");
        if session.resume(store) {
            continue;
        }
        if at >= input.len() {
            return;
        }
        let end = (at + chunk).min(input.len());
        let n = session.receive(&input[at..end], store);
        assert!(
            n > 0 || !session.output().is_empty(),
            "the session is stuck"
        );
        at += n;
    }
}

/// Splits RESP replies into whole replies (the kinds the kv service sends).
fn split_replies(mut out: &[u8]) -> Vec<Vec<u8>> {
    let mut replies = Vec::new();
    while !out.is_empty() {
        let line = out.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        let len = match out[0] {
            b'$' if &out[..line] != b"$-1\r\n" => {
                let n: usize = std::str::from_utf8(&out[1..line - 2])
                    .unwrap()
                    .parse()
                    .unwrap();
                line + n + 2
            }
            b'*' => panic!("no arrays expected here"),
            _ => line,
        };
        replies.push(out[..len].to_vec());
        out = &out[len..];
    }
    replies
}

fn value(i: usize) -> Vec<u8> {
    let mut v = format!("value-{i}-").into_bytes();
    v.resize(3000, b'a' + (i % 26) as u8);
    v
}

fn key(i: usize) -> Vec<u8> {
    format!("key:{i:012}").into_bytes()
}

/// The heap on its own arena: freed blocks merge, the byte counts, the data limit.
fn heap_merges_counts_and_limits() {
    static SMALL: Arena = Arena(UnsafeCell::new([0; ARENA_BYTES]));
    let h = heap::Heap::new();
    let start = SMALL.0.get() as usize;
    // SAFETY: the second arena is only used by `h`, in this function.
    unsafe { h.init(start, start + (1 << 20)) };
    let size = h.usage().size;
    assert!(size > (1 << 20) - (32 << 10), "{:?}", h.usage());
    let layout = |size| Layout::from_size_align(size, 8).unwrap();
    // SAFETY: layouts of non-zero size; every block is given back with its layout.
    unsafe {
        // Small blocks fill the region; once freed, they serve one large block.
        let mut small = Vec::with_capacity(32 << 10);
        loop {
            let p = h.alloc(layout(24));
            if p.is_null() {
                break;
            }
            small.push(p);
        }
        assert!(small.len() * 32 > size * 9 / 10, "{} blocks", small.len());
        assert_eq!(h.usage().used, small.len() * 32);
        // Freed in a scattered order: every other one first.
        for p in small.iter().step_by(2) {
            h.dealloc(*p, layout(24));
        }
        assert!(h.alloc(layout(64)).is_null(), "no two free neighbours yet");
        for p in small.iter().skip(1).step_by(2) {
            h.dealloc(*p, layout(24));
        }
        drop(small);
        assert_eq!(h.usage().used, 0);
        let big = h.alloc(layout(size * 9 / 10));
        assert!(!big.is_null(), "the freed small blocks merge into one");
        h.dealloc(big, layout(size * 9 / 10));

        // Alignments up to a page are served.
        let page = h.alloc(Layout::from_size_align(4096, 4096).unwrap());
        assert_eq!(page as usize % 4096, 0);
        h.dealloc(page, Layout::from_size_align(4096, 4096).unwrap());

        // Only blocks allocated inside for_data count against the data limit.
        h.set_data_limit(4032 + 32);
        let d = h.for_data(|| h.alloc(layout(4000)));
        assert!(!d.is_null());
        assert_eq!(h.usage().data, 4032);
        let e = h.alloc(layout(64 << 10));
        assert!(!e.is_null(), "outside for_data the limit does not apply");
        assert_eq!(h.usage().data, 4032, "nor does the block count as data");
        let f = h.for_data(|| h.alloc(layout(16)));
        assert!(
            !f.is_null(),
            "the buffer outside for_data leaves the data room"
        );
        assert!(h.for_data(|| h.alloc(layout(16))).is_null(), "the limit");
        // A data block freed outside for_data gives its bytes back to the data count.
        h.dealloc(f, layout(16));
        assert_eq!(h.usage().data, 4032);
        // A data block stays data when it is resized outside for_data...
        let d = h.realloc(d, layout(4000), 100);
        assert!(!d.is_null());
        assert_eq!(h.usage().data, 128);
        // ... and a block grown inside for_data becomes data, held to the limit.
        assert!(h
            .for_data(|| h.realloc(e, layout(64 << 10), 128 << 10))
            .is_null());
        let e2 = h.for_data(|| h.realloc(e, layout(64 << 10), 100));
        assert!(!e2.is_null());
        assert_eq!(h.usage().data, 256);
        h.dealloc(d, layout(100));
        h.dealloc(e2, layout(100));
        assert_eq!(h.usage().used, 0);
        assert_eq!(h.usage().data, 0);
    }
    println!("ok: heap merges, counts and limits");
}

/// Fills the store through a session until writes get the OOM error; what was stored
/// stays, reads go on, and freeing memory makes writes work again. The test's own
/// buffers come from the same heap, as a connection's buffers do in the guest, but only
/// the store's data counts against the limit.
fn filling_memory_gives_oom_errors_and_loses_nothing() {
    let mut store = Table::new();
    let mut session = Session::new(1 << 20);
    let base = heap::usage().used;
    heap::set_data_limit(heap::usage().data + (4 << 20));

    // 100 SETs of 3000 bytes at a time, pipelined.
    let attempts = 2000;
    let mut replies = Vec::new();
    for batch in (0..attempts).step_by(100) {
        let mut input = Vec::new();
        for i in batch..batch + 100 {
            input.extend(command(&[b"SET", &key(i), &value(i)]));
        }
        let out = drive(&mut session, &mut store, &input, 16 << 10);
        replies.extend(split_replies(&out));
    }
    assert_eq!(replies.len(), attempts);
    let stored = replies
        .iter()
        .take_while(|r| r.as_slice() == b"+OK\r\n")
        .count();
    assert!(
        (500..attempts).contains(&stored),
        "{stored} values of 3000 bytes stored in 4 MiB ({:?})",
        heap::usage()
    );
    // Once full, the store stays full: every later write was refused, none half-done.
    for reply in &replies[stored..] {
        assert_eq!(reply.as_slice(), OOM, "after {stored} values");
    }
    drop(replies);
    let usage = heap::usage();
    assert!(usage.data <= usage.limit, "{usage:?}");
    println!("ok: {stored} values stored, then the OOM error");

    // Everything stored reads back, and reads, pings and small replies go on.
    for batch in (0..stored).step_by(100) {
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for i in batch..(batch + 100).min(stored) {
            input.extend(command(&[b"GET", &key(i)]));
            expected.extend(b"$3000\r\n");
            expected.extend(value(i));
            expected.extend(b"\r\n");
        }
        let out = drive(&mut session, &mut store, &input, 16 << 10);
        assert!(out == expected, "the values from {batch} did not read back");
    }
    let mut input = b"PING\r\nDBSIZE\r\n".to_vec();
    input.extend(command(&[b"GET", &key(stored)]));
    let out = drive(&mut session, &mut store, &input, 16 << 10);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("+PONG\r\n:{stored}\r\n$-1\r\n")
    );

    // Writes that need memory are refused whole and change nothing.
    {
        let big = vec![b'm'; 64 << 10];
        let mut input = command(&[b"MSET", b"k0", b"x", b"k1", &big, b"k2", &big]);
        input.extend(command(&[b"APPEND", &key(0), &big]));
        input.extend(command(&[b"SET", &key(1), &big]));
        input.extend(command(&[b"SETNX", b"fresh", &big]));
        input.extend(command(&[b"GET", b"k0"]));
        input.extend(command(&[b"STRLEN", &key(0)]));
        input.extend(command(&[b"GET", &key(1)]));
        input.extend(command(&[b"EXISTS", b"k1", b"k2", b"fresh"]));
        let out = drive(&mut session, &mut store, &input, 4096);
        let mut expected = OOM.repeat(4);
        expected.extend(b"$-1\r\n:3000\r\n$3000\r\n");
        expected.extend(value(1));
        expected.extend(b"\r\n:0\r\n");
        assert!(
            out == expected,
            "{}",
            String::from_utf8_lossy(&out[..out.len().min(600)])
        );
    }
    println!("ok: refused writes change nothing");

    // Deleting makes room again.
    let mut input = Vec::new();
    for i in 0..50 {
        input.extend(command(&[b"DEL", &key(i)]));
    }
    input.extend(command(&[b"SET", b"after", &value(7)]));
    input.extend(command(&[b"GET", b"after"]));
    let out = drive(&mut session, &mut store, &input, 4096);
    let mut expected = b":1\r\n".repeat(50);
    expected.extend(b"+OK\r\n$3000\r\n");
    expected.extend(value(7));
    expected.extend(b"\r\n");
    assert!(out == expected, "{}", String::from_utf8_lossy(&out));
    drop((input, out, expected));

    let out = drive(&mut session, &mut store, b"FLUSHALL\r\nDBSIZE\r\n", 4096);
    assert_eq!(out, b"+OK\r\n:0\r\n");
    // What is left is the session's buffers (kept while below 128 KiB each).
    assert!(
        heap::usage().used < base + (256 << 10),
        "{:?}",
        heap::usage()
    );
    heap::set_data_limit(heap::usage().size);
    println!("ok: deleting and flushing give the memory back");
}

/// SETs keys from `first` with values of `size` bytes, up to 200 to a pipeline (fewer
/// for large values), until one is refused; how many were stored.
fn fill(session: &mut Session, store: &mut Table, first: usize, size: usize) -> usize {
    let value = vec![b'f'; size];
    let batch = ((1 << 20) / (size + 64)).clamp(1, 200);
    let mut stored = 0;
    loop {
        let mut input = Vec::with_capacity(batch * (size + 64));
        for i in 0..batch {
            input.extend(command(&[b"SET", &key(first + stored + i), &value]));
        }
        let out = drive(session, store, &input, 16 << 10);
        let ok = out.windows(5).filter(|w| w == b"+OK\r\n").count();
        stored += ok;
        if ok < batch {
            assert!(out.ends_with(OOM));
            return stored;
        }
    }
}

/// Memory freed in page-sized blocks (values of 3000 bytes) serves a table of many
/// small values afterwards: the table grows in page-sized segments, not in one block
/// that a heap without merging could no longer provide.
fn memory_freed_in_pages_serves_many_small_values() {
    let mut store = Table::new();
    let mut session = Session::new(1 << 20);
    let usage = heap::usage();
    heap::set_data_limit(usage.size - (8 << 20));
    let big = fill(&mut session, &mut store, 0, 3000);
    assert!(big > 10_000, "{big} values of 3000 bytes in 64 MiB");
    assert_eq!(
        drive(&mut session, &mut store, b"FLUSHALL\r\n", 64),
        b"+OK\r\n"
    );
    let small = fill(&mut session, &mut store, 0, 100);
    // About 300 bytes a key (a 128-byte value block, a 16-byte key, slots).
    assert!(
        small > 120_000,
        "only {small} values of 100 bytes after FLUSHALL"
    );
    assert_eq!(
        drive(&mut session, &mut store, b"FLUSHALL\r\n", 64),
        b"+OK\r\n"
    );
    heap::set_data_limit(heap::usage().size);
    println!("ok: {big} values of 3000 bytes, flushed, then {small} of 100 bytes");
}

fn flush(session: &mut Session, store: &mut Table) {
    assert_eq!(drive(session, store, b"FLUSHALL\r\n", 64), b"+OK\r\n");
}

/// Memory freed by FLUSHALL serves values of any size again: the store is filled to the
/// OOM error with values of 512 KiB, 3000 bytes and 1 byte, flushed after each, in
/// both orders, and each size fits about as often as the first time. Once full, freeing
/// one value is enough for a small SET, whatever the connection's buffers hold.
fn capacity_comes_back_after_flushing() {
    let mut store = Table::new();
    let mut session = Session::new(4 << 20);
    heap::set_data_limit(heap::usage().size - (8 << 20));
    let mut phases = Vec::new();
    for size in [256 << 10, 3000, 1, 3000, 256 << 10, 1] {
        let stored = fill(&mut session, &mut store, 0, size);
        if size == 3000 {
            // Full, also for 1-byte values: one value deleted makes room for a tiny
            // one (the connection's buffers do not count).
            fill(&mut session, &mut store, 1 << 30, 1);
            let mut input = command(&[b"SET", b"tiny", b"x"]);
            input.extend(command(&[b"DEL", &key(0)]));
            input.extend(command(&[b"SET", b"tiny", b"x"]));
            let out = drive(&mut session, &mut store, &input, 4096);
            assert_eq!(out, [OOM, b":1\r\n+OK\r\n"].concat());
        }
        flush(&mut session, &mut store);
        assert_eq!(heap::usage().data, 0, "{:?}", heap::usage());
        phases.push((size, stored));
    }
    println!("ok: values stored in turn (size, count): {phases:?}");
    for (i, &(size, stored)) in phases.iter().enumerate() {
        let first = phases.iter().find(|p| p.0 == size).unwrap().1;
        assert!(
            stored * 10 >= first * 9,
            "phase {i}: {stored} values of {size} bytes, {first} the first time ({phases:?})"
        );
    }
    let (huge, large, small) = (phases[0].1, phases[1].1, phases[2].1);
    assert!(huge >= 80, "{huge} values of 512 KiB in 56 MiB");
    assert!(large >= 15_000, "{large} values of 3000 bytes in 56 MiB");
    assert!(small >= 300_000, "{small} values of 1 byte in 56 MiB");
    heap::set_data_limit(heap::usage().size);
    println!("ok: capacity comes back after flushing");
}

/// Takes every block the heap can still give, largest first.
fn exhaust() -> Vec<Vec<u8>> {
    let mut ballast: Vec<Vec<u8>> = Vec::with_capacity(4096);
    let mut size = 16 << 20;
    while size >= 16 {
        loop {
            let mut block = Vec::new();
            if block.try_reserve_exact(size).is_err() || ballast.len() == ballast.capacity() {
                break;
            }
            ballast.push(block);
        }
        size /= 2;
    }
    ballast
}

/// With the whole heap taken (the reserve too), requests that need memory get the OOM
/// error, the connection stays in step, and everything works once memory is back.
fn an_exhausted_heap_refuses_requests_but_keeps_serving() {
    let mut store = Table::new();
    let big_value = vec![b'b'; 256 << 10];
    store.set(b"big", &big_value).unwrap();
    store.set(b"small", b"s").unwrap();
    let mut session = Session::new(4 << 20);
    // The session's buffers are warm: the output has its room for errors.
    assert_eq!(
        drive(&mut session, &mut store, b"PING\r\n", 64),
        b"+PONG\r\n"
    );

    let mut request = command(&[b"SET", b"k", &vec![b'v'; 512 << 10]]);
    request.extend(b"PING\r\n");
    request.extend(command(&[b"GET", b"small"]));
    request.extend(command(&[b"GET", b"big"]));
    let expected = [OOM, b"+PONG\r\n$1\r\ns\r\n", OOM].concat();
    let mut out = Vec::with_capacity(4096);
    let ballast = exhaust();
    // The input cannot grow: the SET is dropped as it arrives and refused; the GET of
    // the big value has no room for its reply and is refused too.
    drive_into(&mut session, &mut store, &request, 1024, &mut out, false);
    drop(ballast);
    assert!(out == expected, "{:?}", String::from_utf8_lossy(&out));
    assert!(!store.contains(b"k"));
    let out = drive(&mut session, &mut store, &command(&[b"GET", b"big"]), 1024);
    assert_eq!(out.len(), big_value.len() + 11);
    let out = drive(&mut session, &mut store, &request, 1024);
    assert!(out.starts_with(b"+OK\r\n+PONG\r\n$1\r\ns\r\n$262144\r\n"));
    println!("ok: an exhausted heap refuses requests and keeps serving");
}

fn main() {
    // Whatever libtest passes (--nocapture, filters) is ignored: one sequence of checks.
    // A failure prints its message only: a backtrace would need more memory than the
    // arena may have left.
    std::panic::set_hook(Box::new(|info| eprintln!("test failed: {info}")));
    heap_merges_counts_and_limits();
    filling_memory_gives_oom_errors_and_loses_nothing();
    an_exhausted_heap_refuses_requests_but_keeps_serving();
    capacity_comes_back_after_flushing();
    // Last: it leaves the heap in small blocks.
    memory_freed_in_pages_serves_many_small_values();
    println!("test result: ok. 5 checks passed");
}
