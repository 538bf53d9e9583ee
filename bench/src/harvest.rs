//! `bench harvest`: the cost of collecting an epoch's dirty set with the bitmap (manual
//! protect: GET + CLEAR of the dirty pages) and with the dirty ring (read the entries,
//! KVM_RESET_DIRTY_RINGS), measured on the same workload in one run.
//!
//! The guest dirties `pages` distinct pages per epoch (`workload=dirty` over a working set
//! of exactly that many pages, as fast as it can); each sample pauses the VM (timed: until
//! every vCPU is parked), times the harvest alone, and resumes it. `--mem` repeats it for
//! guests of several sizes (default 512M; `--mem 1G,4G,16G` shows how the cost grows with
//! the guest at the same dirty count).

use std::time::{Duration, Instant};

use engine::devices::serial::Console;
use engine::machine::{Machine, MachineConfig};

use crate::args::Args;
use crate::stats::{micros, Summary};
use crate::BenchError;

pub const OPTIONS: &[&str] = &["samples", "pages", "mem"];

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
    let mems: Vec<u64> = match args.get("mem") {
        Some(list) => list
            .split(',')
            .map(|m| {
                engine::size::parse_size(m.trim())
                    .map_err(|e| BenchError::Usage(format!("--mem {list}: {e}")))
            })
            .collect::<Result<_, _>>()?,
        None => vec![512 << 20],
    };
    println!("Dirty harvest per epoch, 2 vCPUs, {samples} samples (µs); the pause is until every vCPU is parked\n");
    println!("| guest | dirty pages/epoch | method | pages found p50 | harvest p50 | harvest p99 | pause p50 | pause p99 | harvest p50 ÷ smallest guest's |");
    println!("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut first: std::collections::HashMap<(u64, &str), Duration> = Default::default();
    for &mem in &mems {
        for &n in &pages {
            for (name, ring) in [("bitmap", None), ("dirty ring", Some(RING_ENTRIES))] {
                let (found, times, pauses) = measure(mem, n, ring, samples)?;
                let s = Summary::of(&times).unwrap_or_default();
                let p = Summary::of(&pauses).unwrap_or_default();
                let base = *first.entry((n, name)).or_insert(s.p50);
                println!(
                    "| {} MiB | {n} | {name} | {found} | {} | {} | {} | {} | {:.2} |",
                    mem >> 20,
                    micros(s.p50),
                    micros(s.p99),
                    micros(p.p50),
                    micros(p.p99),
                    s.p50.as_secs_f64() / base.as_secs_f64().max(1e-9)
                );
            }
        }
    }
    Ok(())
}

/// (pages found p50, harvest times, pause times).
pub(crate) type Measured = (u64, Vec<Duration>, Vec<Duration>);

/// `samples` harvests of the dirty set of a `mem`-byte guest (2 vCPUs) that dirties
/// `pages` distinct pages between them, with the bitmap (`ring` `None`, lockstep's
/// default) or a dirty ring of `ring` entries.
pub(crate) fn measure(
    mem: u64,
    pages: u64,
    ring: Option<u32>,
    samples: usize,
) -> Result<Measured, BenchError> {
    let cfg = MachineConfig {
        mem_size: mem,
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
    let mut pauses = Vec::with_capacity(samples);
    let mut found = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::thread::sleep(gap);
        let p = Instant::now();
        m.pause()?;
        pauses.push(p.elapsed());
        let t = Instant::now();
        m.harvest(&mut pfns)?;
        times.push(t.elapsed());
        found.push(pfns.len() as u64);
        m.resume()?;
    }
    found.sort_unstable();
    Ok((found[found.len() / 2], times, pauses))
}
