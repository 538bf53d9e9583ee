//! `bench pause`: how long a checkpoint stops the guest before any memory work.
//!
//! For 1 and 2 vCPUs, under two loads of the built-in guest, it repeats: let the guest run
//! for `--gap-ms`, `pause_and_capture` (timed until every vCPU is parked, and until the
//! vCPU and device state is captured), `resume` (timed until every vCPU acknowledged).
//!
//! - `idle`: `workload=dirty pages_per_ms=1`: the vCPUs wait on the idle port nearly all
//!   the time, so a pause mostly finds them in the VMM.
//! - `dirty`: `workload=dirty pages_per_ms=0 wss=64M`: the vCPUs write memory as fast as
//!   they can, so every pause has to kick them out of `KVM_RUN`. (No dirty logging is on
//!   here; harvesting is `bench checkpoint`'s business.)

use std::time::{Duration, Instant};

use engine::devices::serial::Console;
use engine::machine::{Machine, MachineConfig};

use crate::args::Args;
use crate::stats::{micros, Summary};
use crate::BenchError;

pub const OPTIONS: &[&str] = &["samples", "gap-ms"];

const VCPUS: [u32; 2] = [1, 2];
const MEM_SIZE: u64 = 256 << 20;
/// Guest run time before the first sample.
const WARMUP: Duration = Duration::from_millis(300);

/// A guest load; `seconds` is added so that the guest outlives any run of the benchmark.
struct Load {
    name: &'static str,
    guest_args: &'static str,
}

const LOADS: [Load; 2] = [
    Load {
        name: "idle",
        guest_args: "workload=dirty pages_per_ms=1 wss=1M",
    },
    Load {
        name: "dirty",
        guest_args: "workload=dirty pages_per_ms=0 wss=64M",
    },
];

struct Row {
    vcpus: u32,
    load: &'static str,
    parked: Summary,
    captured: Summary,
    resumed: Summary,
}

pub fn run(args: &Args) -> Result<(), BenchError> {
    let samples: usize = args.number("samples", 500, 1)?;
    let gap = Duration::from_millis(args.number("gap-ms", 3, 0)?);
    // Long enough for every sample with room to spare; the machine is dropped at the end.
    let seconds = 60 + (samples as u64 * (gap.as_millis() as u64 + 5)) / 1000;

    let mut rows = Vec::new();
    for vcpus in VCPUS {
        for load in &LOADS {
            eprintln!(
                "bench pause: {vcpus} vCPU(s), {} ({}), {samples} samples...",
                load.name, load.guest_args
            );
            rows.push(measure(vcpus, load, samples, gap, seconds)?);
        }
    }

    println!(
        "Pause and resume latency, µs ({samples} samples per row, {} ms of guest run between \
         pauses, {} MiB guest)\n",
        gap.as_millis(),
        MEM_SIZE >> 20
    );
    println!(
        "| vCPUs | load | parked p50 | parked p99 | parked max | captured p50 | captured p99 \
         | captured max | resume p50 | resume p99 | resume max |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.vcpus,
            r.load,
            micros(r.parked.p50),
            micros(r.parked.p99),
            micros(r.parked.max),
            micros(r.captured.p50),
            micros(r.captured.p99),
            micros(r.captured.max),
            micros(r.resumed.p50),
            micros(r.resumed.p99),
            micros(r.resumed.max),
        );
    }
    println!(
        "\nparked: from the pause request until every vCPU is parked; captured: until the \
         vCPU, VM and serial state is captured too; resume: until every vCPU acknowledged."
    );
    Ok(())
}

fn measure(
    vcpus: u32,
    load: &Load,
    samples: usize,
    gap: Duration,
    seconds: u64,
) -> Result<Row, BenchError> {
    let what = format!("{vcpus} vCPU(s), {}", load.name);
    let cfg = MachineConfig {
        mem_size: MEM_SIZE,
        vcpus,
        console: Console::Null,
        net: None,
        disks: Vec::new(),
        dirty_ring: None,
    };
    let guest_args = format!("{} seconds={seconds}", load.guest_args);
    let mut m = Machine::boot(&cfg, engine::BUILTIN_GUEST, &guest_args)?;
    // The guest runs between samples; an event (exit, crash) ends the benchmark.
    let run_for = |m: &Machine, d: Duration| match m.wait_event(d) {
        None => Ok(()),
        Some(event) => Err(BenchError::GuestStopped {
            what: what.clone(),
            event: format!("{event:?}"),
        }),
    };

    m.resume()?;
    run_for(&m, WARMUP)?;
    let mut parked = Vec::with_capacity(samples);
    let mut captured = Vec::with_capacity(samples);
    let mut resumed = Vec::with_capacity(samples);
    for _ in 0..samples {
        run_for(&m, gap)?;
        let (state, timing) = m.pause_and_capture()?;
        let start = Instant::now();
        m.resume()?;
        resumed.push(start.elapsed());
        drop(state);
        parked.push(timing.parked);
        captured.push(timing.captured);
    }
    m.pause()?;

    let summary = |v: &[Duration]| Summary::of(v).expect("at least one sample");
    Ok(Row {
        vcpus,
        load: load.name,
        parked: summary(&parked),
        captured: summary(&captured),
        resumed: summary(&resumed),
    })
}
