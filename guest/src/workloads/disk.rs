//! `workload=disk blocks=N rate=R seconds=S flush_every=K mode=write|check`: writes
//! checksummed 4 KiB blocks to the first virtio-blk device, reads them back and verifies
//! them; the load for the disk tests and benchmarks.
//!
//! Block `i` lives at byte `i * 4096`. Its 512 little-endian words are: a magic, `i`,
//! its generation (how many times it was written), 508 words derived from `(i, gen)`,
//! and an FNV-1a checksum of the words before it. The guest keeps each block's
//! generation in memory, so a block that comes back older or newer than the last write
//! acknowledged to the guest (a write lost, or one applied that the guest's memory does
//! not know of) is caught, not only a damaged one.
//!
//! `mode=write` (default), on vCPU 0: for S guest seconds, R writes a second (0: as fast
//! as it can) to blocks 0, 1, ..., N-1 in turn, a flush after every K writes, and after
//! each write a read of another written block, verified. Then a flush and a read of
//! every written block, verified. Prints `disk: capacity=<bytes> id=<id> blocks=<N>`,
//! `disk: ms=<t> writes=<w> reads=<r> flushes=<f>` every guest second, and at the end
//! `disk: verified <n> blocks (writes=<w> reads=<r> flushes=<f>)` and `disk: done`.
//! `mode=check`: reads the N blocks once and prints `disk: check blocks=<N>
//! written=<w> damaged=<d>` (written: whole blocks of this format; damaged: a block with
//! the magic but a bad checksum or index), for a guest booted on a disk another wrote.
//!
//! Exit statuses: 0 done, 2 bad arguments (or a disk too small for N blocks), 4 the
//! device cannot be brought up, 5 a block failed verification or a request failed.

use alloc::vec;

use crate::abi::VIRTIO_ID_BLOCK;
use crate::args::{self, ArgError};
use crate::boot::Boot;
use crate::heap;
use crate::ports::{exit, idle, idle_forever};
use crate::println;
use crate::time::{Clock, TimeSource};
use crate::virtio::blk::{IoError, VirtioBlk};
use crate::virtio::queue::pages;

pub const NAME: &str = "disk";

const BLOCK: usize = 4096;
const WORDS: usize = BLOCK / 8;
const MAGIC: u64 = u64::from_le_bytes(*b"LKBLK001");
const EXIT_BAD_ARGS: u32 = 2;
const EXIT_DEVICE: u32 = 4;
const EXIT_VERIFY: u32 = 5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Write,
    Check,
}

pub struct Config {
    blocks: u64,
    /// Writes per guest second; 0 for as fast as possible.
    rate: u64,
    duration_ms: u64,
    flush_every: u64,
    mode: Mode,
    base: u64,
}

impl Config {
    pub fn parse<'a>(cmdline: &'a str, boot: &Boot) -> Result<Self, ArgError<'a>> {
        let mut blocks = 256;
        let mut rate = 200;
        let mut seconds = 2;
        let mut flush_every = 16;
        let mut mode = Mode::Write;
        args::parse_keys(
            cmdline,
            NAME,
            &["blocks", "rate", "seconds", "flush_every", "mode"],
            |key, value| {
                match key {
                    "blocks" => blocks = args::parse_u64(key, value)?,
                    "rate" => rate = args::parse_u64(key, value)?,
                    "seconds" => seconds = args::parse_u64(key, value)?,
                    "flush_every" => flush_every = args::parse_u64(key, value)?,
                    _ => {
                        mode = match value {
                            "write" => Mode::Write,
                            "check" => Mode::Check,
                            _ => {
                                return Err(ArgError::Malformed {
                                    key,
                                    value,
                                    expected: "write or check",
                                })
                            }
                        }
                    }
                }
                Ok(())
            },
        )?;
        if blocks == 0 || blocks > 1 << 24 {
            return Err(ArgError::Invalid {
                key: "blocks",
                value: "",
                reason: "must be between 1 and 16777216",
            });
        }
        if flush_every == 0 {
            return Err(ArgError::Invalid {
                key: "flush_every",
                value: "0",
                reason: "must be at least 1",
            });
        }
        let base = boot
            .virtio
            .iter()
            .find(|device| device.device_id == VIRTIO_ID_BLOCK)
            .ok_or(ArgError::NoDevice {
                workload: NAME,
                device: "virtio-blk",
                flag: "--disk",
            })?
            .base;
        // The generations (4 bytes a block), the queue and two buffers.
        if boot.free_bytes() < blocks * 4 + (1 << 20) {
            return Err(ArgError::TooLittleRam {
                workload: NAME,
                need: "1M plus 4 bytes a block",
                free: boot.free_bytes(),
            });
        }
        Ok(Config {
            blocks,
            rate,
            duration_ms: seconds.saturating_mul(1000),
            flush_every,
            mode,
            base,
        })
    }
}

/// FNV-1a over words.
fn checksum(words: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        h ^= w;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Block `index` at generation `gen`.
fn fill(words: &mut [u64], index: u64, gen: u64) {
    words[0] = MAGIC;
    words[1] = index;
    words[2] = gen;
    for (k, w) in words.iter_mut().enumerate().take(WORDS - 1).skip(3) {
        *w = splitmix((index << 32) ^ (gen << 8) ^ k as u64);
    }
    words[WORDS - 1] = checksum(&words[..WORDS - 1]);
}

/// What a block read back holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Found {
    /// A whole block of this format: its index and generation.
    Block { index: u64, gen: u64 },
    /// The magic, but a bad checksum.
    Damaged,
    /// Anything else (never written).
    Other,
}

fn inspect(words: &[u64]) -> Found {
    if words[0] != MAGIC {
        return Found::Other;
    }
    if checksum(&words[..WORDS - 1]) != words[WORDS - 1] {
        return Found::Damaged;
    }
    let (index, gen) = (words[1], words[2]);
    let mut expected = [0u64; WORDS];
    fill(&mut expected, index, gen);
    if expected[..] != words[..] {
        return Found::Damaged;
    }
    Found::Block { index, gen }
}

/// Page-aligned 4 KiB buffers that live for the rest of the guest.
fn buffer() -> &'static mut [u64] {
    // SAFETY: `pages` returns a fresh, zeroed, page-aligned allocation of 4096 bytes
    // that is never freed and has no other user.
    unsafe { core::slice::from_raw_parts_mut(pages(BLOCK).cast::<u64>(), WORDS) }
}

fn bytes(words: &[u64]) -> &[u8] {
    // SAFETY: the same memory seen as bytes; u8 has no alignment or validity needs.
    unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

fn bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: as in `bytes`; any byte pattern is a valid u64.
    unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

fn io_failed(what: &str, index: u64, err: IoError) -> ! {
    println!("disk: FAILED {what} of block {index}: {err}");
    exit(EXIT_VERIFY)
}

struct Counts {
    writes: u64,
    reads: u64,
    flushes: u64,
}

pub fn run(boot: &Boot, config: &Config) -> ! {
    if !boot.is_leader() {
        idle_forever();
    }
    // SAFETY: free RAM from `heap_start` to the end of RAM belongs to the workload, and
    // in this one only vCPU 0 uses it, through the allocator.
    unsafe { heap::init(boot.heap_start, boot.ram_size) };
    // SAFETY: the boot info lists this device; nothing else in the guest drives it.
    let mut disk = match unsafe { VirtioBlk::new(config.base) } {
        Ok(disk) => disk,
        Err(err) => {
            println!("error: {err}");
            exit(EXIT_DEVICE)
        }
    };
    let need = config.blocks * BLOCK as u64;
    if need > disk.capacity() {
        println!(
            "error: workload=disk blocks={} needs {need} bytes, the disk has {}",
            config.blocks,
            disk.capacity()
        );
        exit(EXIT_BAD_ARGS);
    }
    if config.mode == Mode::Write && disk.readonly() {
        println!("error: workload=disk mode=write needs a writable disk (this one is read-only: mode=check reads it)");
        exit(EXIT_BAD_ARGS);
    }
    let id = disk.id().unwrap_or_else(|e| io_failed("GET_ID", 0, e));
    let id_len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    println!(
        "disk: capacity={} id={} blocks={}",
        disk.capacity(),
        core::str::from_utf8(&id[..id_len]).unwrap_or("?"),
        config.blocks
    );
    let read = buffer();
    if config.mode == Mode::Check {
        let (mut written, mut damaged) = (0u64, 0u64);
        for i in 0..config.blocks {
            disk.read(i * BLOCK as u64, bytes_mut(read))
                .unwrap_or_else(|e| io_failed("read", i, e));
            match inspect(read) {
                Found::Block { index, .. } if index == i => written += 1,
                Found::Block { .. } | Found::Damaged => damaged += 1,
                Found::Other => {}
            }
        }
        println!(
            "disk: check blocks={} written={written} damaged={damaged}",
            config.blocks
        );
        exit(if damaged == 0 { 0 } else { EXIT_VERIFY })
    }

    let write = buffer();
    let mut gens = vec![0u32; config.blocks as usize];
    let clock = Clock::starting_now(TimeSource::new(boot));
    let mut counts = Counts {
        writes: 0,
        reads: 0,
        flushes: 0,
    };
    let mut next_report = 1000;
    let mut next = 0u64;
    loop {
        let now = clock.now_ms();
        if now >= config.duration_ms {
            break;
        }
        if now >= next_report {
            report(now, &counts);
            next_report = (now / 1000 + 1) * 1000;
        }
        if config.rate > 0 && counts.writes * 1000 >= config.rate * now {
            idle(500);
            continue;
        }
        let i = next;
        next = (next + 1) % config.blocks;
        let gen = u64::from(gens[i as usize]) + 1;
        fill(write, i, gen);
        disk.write(i * BLOCK as u64, bytes(write))
            .unwrap_or_else(|e| io_failed("write", i, e));
        gens[i as usize] = gen as u32;
        counts.writes += 1;
        if counts.writes % config.flush_every == 0 {
            disk.flush().unwrap_or_else(|e| io_failed("flush", i, e));
            counts.flushes += 1;
        }
        // Read back another block written before (spread over the disk).
        let j = splitmix(counts.writes) % config.blocks;
        if gens[j as usize] > 0 {
            verify(&mut disk, read, j, gens[j as usize]);
            counts.reads += 1;
        }
    }
    disk.flush().unwrap_or_else(|e| io_failed("flush", 0, e));
    counts.flushes += 1;
    report(clock.now_ms(), &counts);
    let mut verified = 0u64;
    for (i, &gen) in gens.iter().enumerate() {
        if gen > 0 {
            verify(&mut disk, read, i as u64, gen);
            counts.reads += 1;
            verified += 1;
        }
    }
    println!(
        "disk: verified {verified} blocks (writes={} reads={} flushes={})",
        counts.writes, counts.reads, counts.flushes
    );
    println!("disk: done");
    exit(0)
}

fn report(now: u64, c: &Counts) {
    println!(
        "disk: ms={now} writes={} reads={} flushes={}",
        c.writes, c.reads, c.flushes
    );
}

/// Reads block `i` and checks that it is generation `gen` of itself.
fn verify(disk: &mut VirtioBlk, buf: &mut [u64], i: u64, gen: u32) {
    buf.fill(0);
    disk.read(i * BLOCK as u64, bytes_mut(buf))
        .unwrap_or_else(|e| io_failed("read", i, e));
    let found = inspect(buf);
    if found
        != (Found::Block {
            index: i,
            gen: u64::from(gen),
        })
    {
        println!("disk: MISMATCH block {i}: expected generation {gen}, found {found:?}");
        exit(EXIT_VERIFY);
    }
}
