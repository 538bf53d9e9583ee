//! 10,000 pause/resume cycles of a guest that dirties memory (the Machine API, as the
//! primary drives it every epoch): every pause returns, and the guest then finishes
//! normally, its progress intact.

use std::time::{Duration, Instant};

use engine::devices::serial::Console;
use engine::machine::{Machine, MachineConfig};
use engine::vstate::vcpu::VcpuEvent;
use tests::{kvm_required, read_console, TempDir, Watchdog};

const CYCLES: u32 = 10_000;
/// Guest seconds of dirtying. The cycles take 3-6 s here (two tests share two cores), so
/// the guest outlives them and they all pause a running guest. On a loaded machine they
/// take longer; at least `MIN_RUNNING_CYCLES` must find the guest running.
const GUEST_SECONDS: u64 = 10;
const MIN_RUNNING_CYCLES: u32 = 1_000;
/// 20k pages/ms over a 160 MiB working set keeps a vCPU busy about a quarter of each
/// millisecond and parked on the idle port the rest: pauses hit both paths (a kick out
/// of KVM_RUN, a wake from the idle wait).
const WORKLOAD: &str = "workload=dirty pages_per_ms=20000 wss=160M";

/// Pseudo-random waits: none for a quarter of the cycles, 0-127 µs for the rest (a fixed
/// xorshift sequence: runs are repeatable).
struct Gaps(u64);

impl Gaps {
    fn next(&mut self) -> Duration {
        let mut x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        if x & 3 == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(x >> 57)
        }
    }
}

/// `(ms, pages)` of each `dirty: ms=<t> pages=<total>` line.
fn progress_lines(console: &str) -> Vec<(u64, u64)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("dirty: ms="))
        .map(|rest| {
            let (ms, pages) = rest
                .split_once(" pages=")
                .unwrap_or_else(|| panic!("malformed progress line 'dirty: ms={rest}'"));
            let parse = |s: &str| {
                s.parse::<u64>()
                    .unwrap_or_else(|_| panic!("malformed number in 'dirty: ms={rest}'"))
            };
            (parse(ms), parse(pages))
        })
        .collect()
}

fn pause_resume_cycles(vcpus: u32) {
    let dir = TempDir::new(&format!("pause-{vcpus}"));
    let console = dir.join("console.txt");
    let cfg = MachineConfig {
        mem_size: 256 << 20,
        vcpus,
        console: Console::File(console.clone()),
        net: None,
        disks: Vec::new(),
        dirty_ring: None,
    };
    let args = format!("{WORKLOAD} seconds={GUEST_SECONDS}");
    let mut m = Machine::boot(&cfg, engine::BUILTIN_GUEST, &args).expect("boot");
    let watchdog = Watchdog::start(
        &format!("{CYCLES} pause/resume cycles with {vcpus} vCPUs"),
        Duration::from_secs(120),
    );

    m.resume().expect("first resume");
    let start = Instant::now();
    // The cycle at which the guest was seen to have stopped, and how.
    let mut stopped: Option<(u32, VcpuEvent)> = None;
    let mut gaps = Gaps(u64::from(vcpus));
    for i in 0..CYCLES {
        // Let the guest run for a moment or not at all, so that pauses land everywhere:
        // before a vCPU re-entered KVM_RUN, inside it, and in the idle wait. The wait also
        // notices the guest's exit.
        let gap = gaps.next();
        if stopped.is_none() {
            stopped = m.wait_event(gap).map(|e| (i, e));
        }
        m.pause()
            .unwrap_or_else(|e| panic!("pause {i} of {CYCLES} failed: {e}"));
        assert!(!m.is_running());
        m.resume()
            .unwrap_or_else(|e| panic!("resume {i} of {CYCLES} failed: {e}"));
    }
    let running_cycles = stopped.as_ref().map_or(CYCLES, |(i, _)| *i);
    eprintln!(
        "{CYCLES} pause/resume cycles with {vcpus} vCPUs took {:?}; {running_cycles} of them \
         before the guest finished",
        start.elapsed()
    );
    assert!(
        running_cycles >= MIN_RUNNING_CYCLES,
        "the guest finished after only {running_cycles} of the {CYCLES} cycles: fewer than \
         {MIN_RUNNING_CYCLES} paused a running guest (raise GUEST_SECONDS if this machine is \
         that slow)"
    );

    let limit = Duration::from_secs(GUEST_SECONDS + 30);
    let event = match stopped {
        Some((_, event)) => Some(event),
        None => m.wait_event(limit),
    };
    match event {
        Some(VcpuEvent::GuestExit { status: 0, .. }) => {}
        Some(other) => panic!("the guest did not finish normally: {other:?}"),
        None => panic!("the guest did not finish within {limit:?} after the cycles"),
    }
    m.pause().expect("pause after the guest exited");
    drop(watchdog);
    m.flush_console();
    drop(m);

    let out = read_console(&console);
    assert!(
        out.lines().any(|l| l == "dirty: done"),
        "no 'dirty: done':\n{out}"
    );
    let progress = progress_lines(&out);
    let (last_ms, last_pages) = *progress
        .last()
        .unwrap_or_else(|| panic!("no progress lines:\n{out}"));
    assert!(
        progress.len() >= 2 && last_ms >= GUEST_SECONDS * 1000,
        "expected progress lines up to guest second {GUEST_SECONDS}:\n{out}"
    );
    for w in progress.windows(2) {
        let ((ms0, pages0), (ms1, pages1)) = (w[0], w[1]);
        assert!(
            ms1 > ms0 && pages1 > pages0,
            "progress must strictly increase in both fields: (ms={ms0}, pages={pages0}) then \
             (ms={ms1}, pages={pages1}):\n{out}"
        );
    }
    assert!(last_pages > 0, "the guest dirtied no pages:\n{out}");
}

#[test]
fn pause_resume_cycles_one_vcpu() {
    if !kvm_required() {
        return;
    }
    pause_resume_cycles(1);
}

#[test]
fn pause_resume_cycles_two_vcpus() {
    if !kvm_required() {
        return;
    }
    pause_resume_cycles(2);
}
