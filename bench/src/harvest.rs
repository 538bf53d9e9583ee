//! `bench harvest`: the cost of collecting an epoch's dirty set with the bitmap (manual
//! protect: GET + CLEAR of the dirty pages) and with the dirty ring (read the entries,
//! KVM_RESET_DIRTY_RINGS), measured on the same workload in one run.
//!
//! The guest dirties `pages` distinct pages per epoch (`workload=dirty` over a working set
//! of exactly that many pages, as fast as it can); each sample pauses the VM, times the
//! harvest alone, and resumes it.

use std::time::{Duration, Instant};

use engine::devices::serial::Console;
use engine::machine::{Machine, MachineConfig};

use crate::args::Args;
use crate::stats::{micros, Summary};
use crate::BenchError;

pub const OPTIONS: &[&str] = &["samples", "pages"];

const RING_ENTRIES: u32 = 1 << 16;

pub fn run(args: &Args) -> Result<(), BenchError> {
    let samples: usize = args.number("samples", 40, 5)?;
    let pages: Vec<u64> = match args.get("pages") {
        Some(list) => list
            .split(',')
            .map(|p| {
                p.parse().map_err(|_| {
                    BenchError::Usage(format!("--pages {list}: not a list of numbers"))
                })
            })
            .collect::<Result<_, _>>()?,
        None => vec![1000, 10000, 50000],
    };
    println!("Dirty harvest per epoch, 2 vCPUs, 512M guest, {samples} samples (µs)\n");
    println!("| dirty pages/epoch | method | pages found p50 | harvest p50 | harvest p99 | harvest max |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for &n in &pages {
        for (name, ring) in [("bitmap", None), ("dirty ring", Some(RING_ENTRIES))] {
            let (found, times) = measure(n, ring, samples)?;
            let s = Summary::of(&times).unwrap_or_default();
            println!(
                "| {n} | {name} | {found} | {} | {} | {} |",
                micros(s.p50),
                micros(s.p99),
                micros(s.max)
            );
        }
    }
    Ok(())
}

fn measure(
    pages: u64,
    ring: Option<u32>,
    samples: usize,
) -> Result<(u64, Vec<Duration>), BenchError> {
    let cfg = MachineConfig {
        mem_size: 512 << 20,
        vcpus: 2,
        console: Console::Null,
        net: None,
        disks: Vec::new(),
        dirty_ring: ring,
    };
    let args = format!(
        "workload=dirty pages_per_ms=0 wss={} seconds=3600",
        pages * 4096
    );
    let mut m = Machine::boot(&cfg, engine::BUILTIN_GUEST, &args)?;
    m.resume()?;
    // Let the guest dirty its whole working set between samples (it tops out near 300k
    // first writes per second under write protection).
    let gap = Duration::from_millis((pages / 100).max(20));
    let mut pfns = engine::vstate::dirty::DirtySet::default();
    std::thread::sleep(gap);
    m.pause()?;
    m.harvest(&mut pfns)?;
    m.resume()?;
    let mut times = Vec::with_capacity(samples);
    let mut found = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::thread::sleep(gap);
        m.pause()?;
        let t = Instant::now();
        m.harvest(&mut pfns)?;
        times.push(t.elapsed());
        found.push(pfns.len() as u64);
        m.resume()?;
    }
    found.sort_unstable();
    Ok((found[found.len() / 2], times))
}
