//! `workload=hash rounds=N wss=SIZE`: a deterministic, memory-hard computation over the
//! working set in which every vCPU takes part; vCPU 0 prints `hash=<16 hex digits>`.
//!
//! The working set holds two buffers (double buffering, see `compute`). Each vCPU writes
//! only its own shard of blocks of the new buffer and reads anywhere in the previous
//! one; a barrier ends each round. The result depends only on `(rounds, wss)`, never on
//! the vCPU count or on timing, so the same command line must print the same hash with
//! or without checkpoints and failovers in between.

mod compute;

use core::slice;

use compute::{compute_block, fold, init_block, Block};

use crate::args::{self, ArgError, Size};
use crate::boot::Boot;
use crate::ports::{exit, idle_forever};
use crate::println;
use crate::sync::Barrier;

pub const NAME: &str = "hash";

static BARRIER: Barrier = Barrier::new();

pub struct Config {
    rounds: u64,
    /// Blocks per buffer.
    blocks: usize,
}

impl Config {
    pub fn parse<'a>(cmdline: &'a str, boot: &Boot) -> Result<Self, ArgError<'a>> {
        let mut rounds = 8;
        let mut wss = Size {
            bytes: 32 << 20,
            text: "32M",
        };
        args::parse_keys(cmdline, NAME, &["rounds", "wss"], |key, value| {
            match key {
                "rounds" => rounds = args::parse_u64(key, value)?,
                _ => wss = args::parse_size(key, value)?,
            }
            Ok(())
        })?;
        let blocks = wss.bytes / 2 / size_of::<Block>() as u64;
        if blocks == 0 {
            return Err(ArgError::Invalid {
                key: "wss",
                value: wss.text,
                reason: "is too small (the hash needs at least 128 bytes)",
            });
        }
        super::check_fits(wss, boot)?;
        Ok(Config {
            rounds,
            blocks: blocks as usize,
        })
    }
}

pub fn run(boot: &Boot, config: &Config) -> ! {
    let blocks = config.blocks;
    let first = boot.heap_start as *mut Block;
    // SAFETY: both buffers lie in free RAM (`Config::parse` checked `2 * blocks` blocks
    // fit after the page-aligned `heap_start`).
    let second = unsafe { first.add(blocks) };
    let (start, end) = boot.shard(blocks as u64);
    let (start, end) = (start as usize, end as usize);

    // SAFETY: this vCPU's shard of the first buffer, in free RAM, aligned (heap_start is
    // page aligned); no other vCPU touches it before the barrier below, and every bit
    // pattern is a valid `Block`.
    let shard = unsafe { slice::from_raw_parts_mut(first.add(start), end - start) };
    for (i, block) in (start..).zip(shard.iter_mut()) {
        *block = init_block(i as u64);
    }
    BARRIER.wait(boot.vcpu_count);

    for round in 1..=config.rounds {
        let (src, dst) = if round % 2 == 1 {
            (first, second)
        } else {
            (second, first)
        };
        // SAFETY: during this round no vCPU writes `src` (all write `dst`, and the
        // barriers order this round against the ones before and after), so a shared
        // slice over it is sound; it lies in free RAM as checked above.
        let src = unsafe { slice::from_raw_parts(src.cast_const(), blocks) };
        // SAFETY: this vCPU's shard of `dst`, which no other vCPU reads or writes
        // during the round; in free RAM as checked above.
        let shard = unsafe { slice::from_raw_parts_mut(dst.add(start), end - start) };
        for (i, block) in (start..).zip(shard.iter_mut()) {
            *block = compute_block(i, round, src);
        }
        BARRIER.wait(boot.vcpu_count);
    }

    if !boot.is_leader() {
        idle_forever();
    }
    let last = if config.rounds % 2 == 1 {
        second
    } else {
        first
    };
    // SAFETY: every vCPU has finished writing (the last barrier) and none writes again.
    let last = unsafe { slice::from_raw_parts(last.cast_const(), blocks) };
    println!("hash={:016x}", fold(last));
    exit(0)
}
