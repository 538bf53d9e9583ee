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
//! - `linux`, with `--kernel PATH` (a vmlinux): 1 vCPU booting that kernel, sampled from
//!   `--linux-warmup-ms` after its start (its early boot, the part a KVM that emulates
//!   guest CPL0 code runs); each sample also sizes the sealed state blob.

use std::time::{Duration, Instant};

use engine::boot::linux::LinuxBoot;
use engine::devices::serial::Console;
use engine::machine::{Machine, MachineConfig};

use crate::args::Args;
use crate::stats::{micros, Summary};
use crate::BenchError;

pub const OPTIONS: &[&str] = &["samples", "gap-ms", "kernel", "linux-warmup-ms"];

/// The Linux guest's RAM and command line.
const LINUX_MEM: u64 = 512 << 20;
const LINUX_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 pci=off";

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
    /// Bytes of the sealed state blob (vCPUs, irqchip, PIT, clock, devices).
    state_bytes: usize,
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
            let guest_args = format!("{} seconds={seconds}", load.guest_args);
            let cfg = MachineConfig {
                mem_size: MEM_SIZE,
                vcpus,
                console: Console::Null,
                net: None,
                disks: Vec::new(),
                dirty_ring: None,
            };
            let m = Machine::boot(&cfg, engine::BUILTIN_GUEST, &guest_args)?;
            let what = format!("{vcpus} vCPU(s), {}", load.name);
            rows.push(measure(m, &what, load.name, WARMUP, samples, gap)?);
        }
    }
    if let Some(kernel) = args.get("kernel") {
        let warmup = Duration::from_millis(args.number("linux-warmup-ms", 20_000, 0)?);
        eprintln!(
            "bench pause: 1 vCPU, Linux {kernel} from {} ms into its boot, {samples} samples...",
            warmup.as_millis()
        );
        let boot = LinuxBoot {
            kernel: std::fs::read(kernel)
                .map_err(|e| BenchError::Usage(format!("--kernel {kernel}: {e}")))?,
            initramfs: None,
            cmdline: LINUX_CMDLINE.to_string(),
        };
        let cfg = MachineConfig {
            mem_size: LINUX_MEM,
            vcpus: 1,
            console: Console::Null,
            net: None,
            disks: Vec::new(),
            dirty_ring: None,
        };
        let m = Machine::boot_linux(&cfg, &boot)?;
        rows.push(measure(m, "1 vCPU, linux", "linux", warmup, samples, gap)?);
    }

    println!(
        "Pause and resume latency, µs ({samples} samples per row, {} ms of guest run between \
         pauses, {} MiB guest, the Linux guest {} MiB)\n",
        gap.as_millis(),
        MEM_SIZE >> 20,
        LINUX_MEM >> 20
    );
    println!(
        "| vCPUs | load | parked p50 | parked p99 | parked max | captured p50 | captured p99 \
         | captured max | resume p50 | resume p99 | resume max | state bytes |"
    );
    println!(
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
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
            r.state_bytes,
        );
    }
    println!(
        "\nparked: from the pause request until every vCPU is parked; captured: until the \
         vCPU, VM and serial state is captured too; resume: until every vCPU acknowledged."
    );
    Ok(())
}

/// Runs `m` for `warmup`, then takes `samples` pauses with captures, `gap` apart.
fn measure(
    mut m: Machine,
    what: &str,
    load: &'static str,
    warmup: Duration,
    samples: usize,
    gap: Duration,
) -> Result<Row, BenchError> {
    let what = what.to_string();
    let vcpus = m.vcpu_count() as u32;
    // The guest runs between samples; an event (exit, crash) ends the benchmark.
    let run_for = |m: &Machine, d: Duration| match m.wait_event(d) {
        None => Ok(()),
        Some(event) => Err(BenchError::GuestStopped {
            what: what.clone(),
            event: format!("{event:?}"),
        }),
    };

    m.resume()?;
    run_for(&m, warmup)?;
    let mut state_bytes = 0;
    let mut parked = Vec::with_capacity(samples);
    let mut captured = Vec::with_capacity(samples);
    let mut resumed = Vec::with_capacity(samples);
    for _ in 0..samples {
        run_for(&m, gap)?;
        let (state, timing) = m.pause_and_capture()?;
        let start = Instant::now();
        m.resume()?;
        resumed.push(start.elapsed());
        if state_bytes == 0 {
            state_bytes = state.to_blob().len();
        }
        parked.push(timing.parked);
        captured.push(timing.captured);
    }
    m.pause()?;

    let summary = |v: &[Duration]| Summary::of(v).expect("at least one sample");
    Ok(Row {
        vcpus,
        load,
        state_bytes,
        parked: summary(&parked),
        captured: summary(&captured),
        resumed: summary(&resumed),
    })
}
