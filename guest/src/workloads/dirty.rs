//! `workload=dirty pages_per_ms=R wss=SIZE seconds=S compute=N`: dirties memory at a set
//! rate, the load that checkpointing must keep up with. With `compute=N` each page write
//! follows N rounds of an integer hash in registers (about 1 ns a round here): work that
//! touches no memory, so that `pages_per_ms=0 compute=N` mixes computation with writes the
//! way a service does, and its progress counts both.
//!
//! The working set (SIZE bytes from `heap_start`) is split into one shard of pages per
//! vCPU, and R pages per millisecond across the vCPUs. Each guest millisecond (kvmclock,
//! or the TSC without it; see `time.rs`), a
//! vCPU writes one word into each of its next pages, cycling through its shard; a vCPU
//! that falls behind (a checkpoint pause, a descheduled vCPU) catches up by at most one
//! millisecond. `pages_per_ms=0` writes as fast as it can, to measure guest progress.
//! vCPU 0 prints `dirty: ms=<guest ms> pages=<pages written by all vCPUs>` every guest
//! second, and after S seconds a final such line and `dirty: done`.

use core::ptr::write_volatile;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::PAGE_SIZE;
use crate::args::{self, ArgError, Size};
use crate::boot::Boot;
use crate::ports::{exit, idle, idle_forever};
use crate::println;
use crate::sync::Barrier;
use crate::time::{Clock, TimeSource};

pub const NAME: &str = "dirty";

const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;
/// Pages written between two looks at the clock when unthrottled.
const UNTHROTTLED_BATCH: u64 = 64;
/// The longest a waiting vCPU parks in the VMM before it looks at the clock again.
const MAX_IDLE_US: u64 = 1000;

static BARRIER: Barrier = Barrier::new();
/// Guest time (ns) at guest millisecond 0, set by vCPU 0 before the start barrier.
static START_NS: AtomicU64 = AtomicU64::new(0);
/// Pages written so far by all vCPUs (each adds its own count in batches).
static PAGES_WRITTEN: AtomicU64 = AtomicU64::new(0);

pub struct Config {
    /// Pages per millisecond over all vCPUs; 0 for as fast as possible.
    pages_per_ms: u64,
    /// Pages in the working set.
    pages: u64,
    duration_ms: u64,
    /// Rounds of computation before each page write.
    compute: u64,
}

impl Config {
    pub fn parse<'a>(cmdline: &'a str, boot: &Boot) -> Result<Self, ArgError<'a>> {
        let mut pages_per_ms = 100;
        let mut wss = Size {
            bytes: 64 << 20,
            text: "64M",
        };
        let mut seconds = 5;
        let mut compute = 0;
        args::parse_keys(
            cmdline,
            NAME,
            &["pages_per_ms", "wss", "seconds", "compute"],
            |key, value| {
                match key {
                    "pages_per_ms" => pages_per_ms = args::parse_u64(key, value)?,
                    "wss" => wss = args::parse_size(key, value)?,
                    "compute" => compute = args::parse_u64(key, value)?,
                    _ => seconds = args::parse_u64(key, value)?,
                }
                Ok(())
            },
        )?;
        let pages = wss.bytes / PAGE_SIZE;
        if pages < u64::from(boot.vcpu_count) {
            return Err(ArgError::PagePerVcpu {
                wss: wss.text,
                vcpus: boot.vcpu_count,
            });
        }
        super::check_fits(wss, boot)?;
        Ok(Config {
            pages_per_ms,
            pages,
            duration_ms: seconds.saturating_mul(1000),
            compute,
        })
    }
}

/// Writes the pages of one shard in turn.
struct PageWriter {
    base: u64,
    pages: u64,
    next: u64,
    lap: u64,
    value: u64,
    /// Rounds of computation before each write (`compute=`).
    compute: u64,
}

impl PageWriter {
    fn write_next(&mut self) {
        // The computation feeds the value written, so it cannot be left out.
        for _ in 0..self.compute {
            self.value ^= self.value >> 12;
            self.value ^= self.value << 25;
            self.value ^= self.value >> 27;
            self.value = self.value.wrapping_mul(0x2545_f491_4f6c_dd1d);
        }
        // Each lap writes the next word of the page, so a page's contents keep changing
        // even where the value written would repeat.
        let word = self.base + self.next * PAGE_SIZE + (self.lap % WORDS_PER_PAGE) * 8;
        // SAFETY: `word` is an aligned u64 inside this vCPU's shard of the working set,
        // which `Config::parse` checked lies in free RAM and which no other vCPU and no
        // Rust reference touches.
        unsafe { write_volatile(word as *mut u64, self.value) };
        self.value = self.value.wrapping_add(1);
        self.next += 1;
        if self.next == self.pages {
            self.next = 0;
            self.lap += 1;
        }
    }

    fn write(&mut self, count: u64) {
        for _ in 0..count {
            self.write_next();
        }
        PAGES_WRITTEN.fetch_add(count, Ordering::Relaxed);
    }
}

/// vCPU 0's once-a-second progress line.
struct Reporter {
    next_ms: u64,
}

impl Reporter {
    fn tick(&mut self, now_ms: u64) {
        if now_ms >= self.next_ms {
            print_progress(now_ms);
            self.next_ms = (now_ms / 1000 + 1) * 1000;
        }
    }
}

fn print_progress(now_ms: u64) {
    let pages = PAGES_WRITTEN.load(Ordering::Relaxed);
    println!("dirty: ms={now_ms} pages={pages}");
}

pub fn run(boot: &Boot, config: &Config) -> ! {
    let (first, end) = boot.shard(config.pages);
    let mut writer = PageWriter {
        base: boot.heap_start + first * PAGE_SIZE,
        pages: end - first,
        next: 0,
        lap: 0,
        value: 1,
        compute: config.compute,
    };
    // This vCPU's share of the rate, never more than the distinct pages it has.
    let (rate_first, rate_end) = boot.shard(config.pages_per_ms);
    let quota = (rate_end - rate_first).min(writer.pages);

    let time = TimeSource::new(boot);
    if boot.is_leader() {
        START_NS.store(time.now_ns(), Ordering::Relaxed);
    }
    BARRIER.wait(boot.vcpu_count);
    let clock = Clock::new(time, START_NS.load(Ordering::Relaxed));
    let mut reporter = boot.is_leader().then_some(Reporter { next_ms: 1000 });

    if config.pages_per_ms == 0 {
        loop {
            let now_ms = clock.now_ms();
            if now_ms >= config.duration_ms {
                break;
            }
            if let Some(reporter) = &mut reporter {
                reporter.tick(now_ms);
            }
            writer.write(UNTHROTTLED_BATCH);
        }
    } else {
        // The next guest millisecond whose pages this vCPU has not written yet.
        let mut slot = 0u64;
        loop {
            let now_ms = clock.now_ms();
            if now_ms >= config.duration_ms {
                break;
            }
            if let Some(reporter) = &mut reporter {
                reporter.tick(now_ms);
            }
            if now_ms < slot {
                let us = clock.us_until_ms(slot).clamp(1, MAX_IDLE_US);
                idle(us as u32);
                continue;
            }
            // Catch up by at most one millisecond.
            slot = slot.max(now_ms.saturating_sub(1));
            writer.write(quota);
            slot += 1;
        }
    }

    BARRIER.wait(boot.vcpu_count);
    if !boot.is_leader() {
        idle_forever();
    }
    print_progress(clock.now_ms());
    println!("dirty: done");
    exit(0)
}
