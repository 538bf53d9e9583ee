//! Linux guests end to end, with Debian's cloud kernel (`scripts/fetch-linux-kernel`
//! downloads and unpacks it once; `LOCKSTEP_LINUX_KERNEL_DIR` names a directory that holds
//! it already, as `scripts/test` does).
//!
//! The KVM on our machines emulates guest CPL0 code, so a Linux kernel runs here for about
//! its first minute: it prints its banner, its command line, the e820 map, kvm-clock and
//! `Memory: ...` (after ~35 s), then KVM's instruction emulator stops at `lock cmpxchg16b`.
//! Within that window:
//!
//! - (a) `lockstep run --kernel vmlinux` prints the banner, the command line and `Memory:`,
//!   and the emulator's stop is one line naming the instruction's RIP;
//! - (b) a snapshot taken between the banner and `Memory:`, restored in a new process,
//!   prints the rest of the same lines, in order, none missing;
//! - (c) a primary replicating the booting kernel is SIGKILLed at the same point and the
//!   promoted backup prints the lines that follow, in order, none missing;
//!
//! and the other entries: a vmlinux without its PVH note (the 64-bit boot protocol with
//! `boot_params`), the bzImage (its decompressor, then the kernel), a hand-made ELF whose
//! one instruction KVM cannot emulate (the one-line error, and its RIP exactly), and bad
//! kernels. The mid-boot points of (b) and (c) are the middle of the reference run's
//! banner-to-`Memory:` stretch, so a slower machine moves them along.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tests::link::tls_args;
use tests::pair::fence_args;
use tests::{
    kvm_required, lockstep, lockstep_bin, one_at_a_time, wait_for_line, Netns, Proc, TempDir,
};

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 pci=off";
const MEM: &str = "512M";
/// Every boot of (a), (b) and (c) is the same machine: two vCPUs (the second waits for the
/// kernel's INIT/SIPI, which comes after where the emulator stops it here) and a virtio-net
/// device on `tap0` in a network namespace of the test's own.
const VCPUS: &str = "2";
const NET: &str = "tap=tap0";
/// What lockstep appends to the command line for that device.
const NET_CMDLINE: &str = "virtio_mmio.device=4K@0x1000000000:5";
const BANNER: &str = "Linux version ";
const MEMORY: &str = "Memory: ";
/// How long one boot may take here until the emulator stops it (it takes ~40 s).
const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// The directory with `vmlinux` and `bzImage` (see `scripts/fetch-linux-kernel`).
fn kernel_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("LOCKSTEP_LINUX_KERNEL_DIR") {
            return PathBuf::from(d);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-linux-kernel");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed (it needs apt-get, dpkg-deb, python3 and lz4):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn vmlinux() -> String {
    kernel_dir().join("vmlinux").to_string_lossy().into_owned()
}

/// Bytes of the initramfs every boot of (a), (b) and (c) is given. The kernel reserves it
/// early (`RAMDISK: [mem ...]`) and unpacks it only long after where the emulator stops
/// it here, so its content is a byte pattern.
const INITRAMFS_SIZE: usize = 1 << 20;

/// Writes the initramfs into `dir`; returns its path.
fn initramfs(dir: &TempDir) -> String {
    let bytes: Vec<u8> = (0..INITRAMFS_SIZE).map(|i| (i % 251) as u8).collect();
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, bytes).expect("write the initramfs");
    path.to_string_lossy().into_owned()
}

/// A console line as the comparisons see it: without the printk timestamp, and with the one
/// figure that depends on when the clock was set up (kvm-clock's sched offset) blanked.
fn text(line: &str) -> String {
    let line = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
        Some((stamp, rest)) if stamp.trim().parse::<f64>().is_ok() => rest,
        _ => line,
    };
    match line.strip_prefix("kvm-clock: using sched offset of ") {
        Some(_) => "kvm-clock: using sched offset of N cycles".to_string(),
        None => line.to_string(),
    }
}

/// The printk timestamp of a console line, in seconds of the guest's clock.
fn stamp(line: &str) -> Option<f64> {
    let (stamp, _) = line.strip_prefix('[')?.split_once("] ")?;
    stamp.trim().parse().ok()
}

/// Whether `tail`, the first line a copy printed, is the end of a console line whose text
/// (as [`text`] gives it) is `full`: the copy may start anywhere in the line, in the text or
/// in the printk timestamp before it (`" 5.990106] Booting..."`, `"] Booting..."`).
fn is_line_end(full: &str, tail: &str) -> bool {
    if full.ends_with(text(tail).as_str()) || full.ends_with(tail) {
        return true;
    }
    let Some(stamp_tail) = tail.strip_suffix(full) else {
        return false;
    };
    stamp_tail.ends_with(' ')
        && stamp_tail.matches(']').count() <= 1
        && stamp_tail
            .chars()
            .all(|c| c.is_ascii_digit() || "[ .]".contains(c))
}

fn console_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn position(lines: &[String], needle: &str) -> Option<usize> {
    lines.iter().position(|l| l.contains(needle))
}

/// An uninterrupted boot: its console, when the banner and `Memory:` appeared, and how it
/// ended.
struct Reference {
    lines: Vec<String>,
    /// When each line appeared, from the start of the process.
    stamps_at: Vec<Duration>,
    banner_at: Duration,
    memory_at: Duration,
    code: Option<i32>,
    stderr: String,
}

impl Reference {
    /// Between the banner and `Memory:`, measured from the process's start.
    fn mid_boot(&self) -> Duration {
        (self.banner_at + self.memory_at) / 2
    }

    /// The text of the last line the reference printed before [`Reference::mid_boot`].
    fn mid_boot_line(&self) -> String {
        let at = self
            .stamps_at
            .iter()
            .rposition(|&t| t <= self.mid_boot())
            .unwrap_or(0);
        text(&self.lines[at])
    }

    fn texts(&self) -> Vec<String> {
        self.lines.iter().map(|l| text(l)).collect()
    }
}

/// Runs `lockstep ARGS --console FILE` in `ns` until it exits; returns when each console
/// line appeared, measured from the start (the lines' text is in FILE).
fn watch(ns: &Netns, dir: &TempDir, name: &str, args: &[&str]) -> (Proc, Vec<Duration>) {
    let console = dir.arg(&format!("{name}.console"));
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--console", &console]);
    let cmd = ns.command(lockstep_bin(), &full);
    let start = Instant::now();
    let mut p = Proc::spawn(
        cmd,
        dir.join(&format!("{name}.out")),
        dir.join(&format!("{name}.err")),
    )
    .expect("start lockstep");
    let mut times = Vec::new();
    loop {
        // Read before checking for the end: what the process printed last is seen too.
        let exited = p.try_wait().is_some();
        let now = std::fs::read_to_string(&console).unwrap_or_default();
        let lines = now.lines().count();
        times.resize(lines.max(times.len()), start.elapsed());
        if exited || start.elapsed() >= BOOT_LIMIT {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        p.try_wait().is_some(),
        "{name} still runs after {BOOT_LIMIT:?}:\n{}",
        p.log()
    );
    (p, times)
}

/// The uninterrupted boot every comparison is made against (run once per test binary).
fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = TempDir::new("linux-reference");
        let ns = Netns::create("lkref").expect("network namespace");
        let kernel = vmlinux();
        let initramfs = initramfs(&dir);
        let (mut p, stamps_at) = watch(
            &ns,
            &dir,
            "reference",
            &[
                "run",
                "--kernel",
                &kernel,
                "--initramfs",
                &initramfs,
                "--mem",
                MEM,
                "--cmdline",
                CMDLINE,
                "--vcpus",
                VCPUS,
                "--net",
                NET,
            ],
        );
        let status = p.wait_for(Duration::from_secs(1));
        let lines = console_lines(&dir.join("reference.console"));
        let at = |mark: &str| {
            let i = position(&lines, mark).unwrap_or_else(|| {
                panic!(
                    "the reference boot never printed '{mark}':\n{}\nstderr:\n{}",
                    lines.join("\n"),
                    p.log()
                )
            });
            stamps_at[i]
        };
        let r = Reference {
            banner_at: at(BANNER),
            memory_at: at(MEMORY),
            stamps_at,
            lines,
            code: status.and_then(|s| s.code()),
            stderr: p.log(),
        };
        eprintln!(
            "reference boot: banner after {:.1} s, Memory: after {:.1} s, {} lines, ended with {:?}",
            r.banner_at.as_secs_f64(),
            r.memory_at.as_secs_f64(),
            r.lines.len(),
            r.code
        );
        r
    })
}

/// The emulator's stop as `lockstep` reports it: the last line of stderr.
fn emulation_stop(stderr: &str) -> &str {
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "lockstep: error: vCPU 0: guest stopped: KVM could not emulate the \
             instruction at RIP=0x"
        ),
        "expected the emulation failure as the last line:\n{stderr}"
    );
    last
}

/// Checks that `after` (what a restored or promoted copy printed) continues `before` (what
/// the original printed until it stopped) as the reference boot does: `after` is the
/// reference's tail, its first line possibly the end of a line the original had begun, it
/// starts no later than where `before` ends (nothing skipped) and after the banner (the
/// copy was taken mid-boot). Returns the reference line `after` starts in.
fn assert_continues(reference: &Reference, before: &[String], after: &[String]) -> usize {
    let stamps: Vec<f64> = after.iter().filter_map(|l| stamp(l)).collect();
    let last_before = before.iter().rev().find_map(|l| stamp(l));
    let raw = (before.to_vec(), after.to_vec());
    let want = reference.texts();
    let before: Vec<String> = before.iter().map(|l| text(l)).collect();
    let first = after.first().cloned().unwrap_or_default();
    let after: Vec<String> = after.iter().map(|l| text(l)).collect();
    let show = || {
        format!(
            "reference:\n{}\n--- before:\n{}\n--- after:\n{}",
            want.join("\n"),
            before.join("\n"),
            after.join("\n")
        )
    };
    assert!(!after.is_empty(), "the copy printed nothing\n{}", show());
    assert!(
        after.len() <= want.len(),
        "the copy printed more lines than a whole boot\n{}",
        show()
    );
    assert_eq!(
        before[..],
        want[..before.len().min(want.len())],
        "the original's lines are not the reference's first lines\n{}",
        show()
    );
    let k = want.len() - after.len();
    assert!(
        is_line_end(&want[k], &first),
        "the copy's first line is not (the end of) reference line {k}\n{}",
        show()
    );
    assert_eq!(
        after[1..],
        want[k + 1..],
        "the copy's lines are not the rest of the boot, in order\n{}",
        show()
    );
    let banner = position(&want, BANNER).expect("the reference has the banner");
    assert!(
        k > banner,
        "the copy starts at reference line {k}, not after the banner (line {banner})\n{}",
        show()
    );
    assert!(
        k <= before.len(),
        "lines {}..{k} of the boot were printed by neither process\n{}",
        before.len(),
        show()
    );
    assert!(
        position(&after, MEMORY).is_some(),
        "the copy did not reach Memory:\n{}",
        show()
    );
    // The guest's clock went on from where it was captured (kvm-clock: its MSRs with the
    // vCPU, the clock with the VM): the copy's printk times never go back, and start after
    // the last line the original printed before the copy was taken.
    let printed_before_copy = raw.0[..k.min(raw.0.len())]
        .iter()
        .rev()
        .find_map(|l| stamp(l));
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "the copy's clock went back: {:?}",
        raw.1
    );
    if let (Some(&first), Some(t)) = (stamps.first(), printed_before_copy) {
        assert!(
            first >= t,
            "the copy's clock starts at {first} s, before the original's {t} s (last before: {last_before:?})"
        );
    }
    k
}

/// A copy's first line may begin anywhere in a line the original had begun, its timestamp
/// included (CI saw `" 5.990106] Booting paravirtualized kernel on KVM"`).
#[test]
fn a_copy_may_start_anywhere_in_a_line_its_timestamp_included() {
    let full = "[    5.990106] Booting paravirtualized kernel on KVM";
    let want = text(full);
    for cut in 0..full.len() {
        let tail = &full[cut..];
        assert!(is_line_end(&want, tail), "cut at {cut}: {tail:?}");
    }
    for other in [
        "Booting paravirtualized kernel on KVM!",
        "x] Booting paravirtualized kernel on KVM",
        "] ] Booting paravirtualized kernel on KVM",
        "5.9]Booting paravirtualized kernel on KVM",
        "Booting paravirtualized kernel on kvm",
        "on KVM ",
    ] {
        assert!(
            !is_line_end(&want, other),
            "{other:?} taken for the line's end"
        );
    }
}

#[test]
fn a_the_kernel_prints_its_banner_command_line_and_memory() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let r = reference();
    let lines = &r.lines;
    let banner = position(lines, BANNER).expect("banner");
    assert_eq!(banner, 0, "the banner is the first line: {lines:#?}");
    assert!(lines[0].contains("6.1.0-") && lines[0].contains("cloud-amd64"));
    // The command line, with the network device lockstep added.
    let full = format!("{CMDLINE} {NET_CMDLINE}");
    let cmdline = position(lines, "Command line: ").expect("command line");
    assert_eq!(text(&lines[cmdline]), format!("Command line: {full}"));
    assert!(position(lines, &format!("Kernel command line: {full}")).is_some());
    // The e820 map lockstep wrote: RAM below the EBDA, the EBDA to 1 MiB reserved, RAM from
    // 1 MiB to the end of --mem.
    for e820 in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
    ] {
        assert!(position(lines, e820).is_some(), "no '{e820}': {lines:#?}");
    }
    // The ACPI tables, and what the kernel takes from the MADT: the IOAPIC, two CPUs.
    for acpi in [
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 LKSTEP)",
        "ACPI: XSDT 0x00000000000E0040",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        "nr_cpu_ids:2",
    ] {
        assert!(position(lines, acpi).is_some(), "no '{acpi}': {lines:#?}");
    }
    // CPUID: KVM's signature and kvm-clock.
    assert!(position(lines, "Hypervisor detected: KVM").is_some());
    assert!(position(lines, "kvm-clock: Using msrs 4b564d01 and 4b564d00").is_some());
    // The MTRRs lockstep enables at reset (write-back default): PAT is set up.
    assert!(position(lines, "x86/PAT: Configuration").is_some());
    assert!(position(lines, "MTRRs disabled").is_none());
    // The initramfs, at the top of RAM (512 MiB - 1 MiB), as the kernel reserves it.
    assert!(
        position(lines, "RAMDISK: [mem 0x1ff00000-0x1fffffff]").is_some(),
        "{lines:#?}"
    );
    // Entered through the PVH note (Debian's 6.1 kernel has its entry at 0x1000850).
    assert!(
        r.stderr.contains("Linux kernel (vmlinux, PVH entry at 0x"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("initramfs 1048576 bytes at 0x1ff00000"),
        "{}",
        r.stderr
    );
    let memory = position(lines, MEMORY).expect("Memory:");
    assert!(
        lines[memory].contains("K/523896K available"),
        "{}",
        lines[memory]
    );
    // Here the emulator stops the kernel: one line, the RIP, exit status 1, no hang.
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let stop = emulation_stop(&r.stderr);
    assert!(stop.contains("RIP=0xffffffff8"), "{stop}");
    // The code there: lock cmpxchg16b (f0, REX.W, 0f c7 /1), as the design notes say.
    assert!(stop.contains("(code f0 48 0f c7 "), "{stop}");
    assert_eq!(
        r.stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "{}",
        r.stderr
    );
}

#[test]
fn b_a_snapshot_taken_mid_boot_restores_in_a_new_process_and_prints_the_rest() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let r = reference();
    let ns = Netns::create("lksnap").expect("network namespace");
    let dir = TempDir::new("linux-snapshot");
    let kernel = vmlinux();
    let snap = dir.arg("snap");
    let initramfs = initramfs(&dir);
    let at = r.mid_boot().as_millis().to_string();
    let console = dir.join("original.console");
    let cmd = ns.command(
        lockstep_bin(),
        &[
            "run",
            "--kernel",
            &kernel,
            "--initramfs",
            &initramfs,
            "--mem",
            MEM,
            "--cmdline",
            CMDLINE,
            "--vcpus",
            VCPUS,
            "--net",
            NET,
            "--console",
            console.to_str().expect("UTF-8"),
            "--snapshot-after-ms",
            &at,
            "--snapshot-to",
            &snap,
        ],
    );
    let mut original = Proc::spawn(cmd, dir.join("original.out"), dir.join("original.err"))
        .expect("start the original");
    assert!(
        wait_for_line(
            &original.stderr.clone(),
            "snapshot written",
            BOOT_LIMIT,
            || original.try_wait().is_none()
        ),
        "no snapshot:\n{}",
        original.log()
    );
    original.kill9();
    let before = console_lines(&console);
    let restored_console = dir.join("restored.console");
    let restored = tests::run(ns.command(
        lockstep_bin(),
        &[
            "restore",
            &snap,
            "--net",
            NET,
            "--console",
            restored_console.to_str().expect("UTF-8"),
        ],
    ));
    assert_eq!(restored.code(), Some(1), "{restored:?}");
    assert_eq!(emulation_stop(&restored.stderr), emulation_stop(&r.stderr));
    let after = console_lines(&restored_console);
    let k = assert_continues(r, &before, &after);
    eprintln!(
        "snapshot after {at} ms: the original printed {} lines, the restored copy {} (from line {k})",
        before.len(),
        after.len()
    );
}

#[test]
fn c_the_promoted_backup_continues_the_boot_of_a_killed_primary() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let r = reference();
    let ns = Netns::create("lklnx").expect("network namespace");
    let dir = TempDir::new("linux-failover");
    let kernel = vmlinux();
    let listen = "127.0.0.1:7790";
    let backup_console = dir.arg("backup.console");
    let backup_pid = dir.arg("backup.pid");
    let fence = fence_args(&dir, "primary");
    let mut args = vec![
        "backup",
        "--listen",
        listen,
        "--net",
        "tap=tap0",
        "--console",
        &backup_console,
        "--pid-file",
        &backup_pid,
    ];
    args.extend(fence.iter().map(String::as_str));
    let backup_tls = tls_args(dir.path(), "node2");
    args.extend(backup_tls.iter().map(String::as_str));
    let mut backup = Proc::spawn(
        ns.command(lockstep_bin(), &args),
        dir.join("backup.out"),
        dir.join("backup.err"),
    )
    .expect("start the backup");
    assert!(
        wait_for_line(
            &backup.stderr.clone(),
            "listening on",
            Duration::from_secs(10),
            || { backup.try_wait().is_none() }
        ),
        "{}",
        backup.log()
    );
    let primary_console = dir.arg("primary.console");
    let initramfs = initramfs(&dir);
    let primary_pid = dir.arg("primary.pid");
    let started = Instant::now();
    let primary_tls = tls_args(dir.path(), "node1");
    let mut primary = Proc::spawn(
        ns.command(
            lockstep_bin(),
            &[
                "primary",
                &primary_tls[0],
                &primary_tls[1],
                &primary_tls[2],
                &primary_tls[3],
                &primary_tls[4],
                &primary_tls[5],
                "--peer",
                listen,
                "--kernel",
                &kernel,
                "--initramfs",
                &initramfs,
                "--mem",
                MEM,
                "--cmdline",
                CMDLINE,
                "--vcpus",
                VCPUS,
                "--net",
                NET,
                "--console",
                &primary_console,
                "--pid-file",
                &primary_pid,
            ],
        ),
        dir.join("primary.out"),
        dir.join("primary.err"),
    )
    .expect("start the primary");
    assert!(
        wait_for_line(
            &primary.stderr.clone(),
            "PROTECTED",
            Duration::from_secs(30),
            || { primary.try_wait().is_none() }
        ),
        "{}",
        primary.log()
    );
    // Replicated, the guest runs slower than the reference did (every epoch pauses it, and
    // the primary and the backup share the machine's two cores with it): the kill waits for
    // the line the reference printed at its mid-boot point, not for the same time.
    let mid = r.mid_boot_line();
    let primary_console_path = PathBuf::from(&primary_console);
    assert!(
        wait_for_line(&primary_console_path, &mid, BOOT_LIMIT, || primary
            .try_wait()
            .is_none()),
        "the primary never printed '{mid}':\n{}",
        primary.log()
    );
    primary.kill9();
    let killed_after = started.elapsed();
    let before = console_lines(Path::new(&primary_console));
    assert!(
        backup.wait_for(BOOT_LIMIT).is_some(),
        "the promoted backup still runs:\n{}",
        backup.log()
    );
    let log = backup.log();
    assert!(log.contains("PROMOTED"), "{log}");
    assert!(log.contains("fenced the old primary"), "{log}");
    emulation_stop(&log);
    let after = console_lines(Path::new(&backup_console));
    let k = assert_continues(r, &before, &after);
    eprintln!(
        "primary killed after {:.1} s with {} lines printed; the promoted backup printed {} (from line {k})",
        killed_after.as_secs_f64(),
        before.len(),
        after.len()
    );
}

/// A vmlinux without its PVH note is entered at its 64-bit entry with `boot_params`: the
/// banner, the command line and the e820 map come from the zero page.
#[test]
fn a_vmlinux_without_pvh_note_boots_through_the_64_bit_entry() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let dir = TempDir::new("linux-64bit");
    let mut image = std::fs::read(vmlinux()).expect("vmlinux");
    // The note XEN_ELFNOTE_PHYS32_ENTRY (type 18, name "Xen", 8 bytes of address).
    let note = b"\x04\x00\x00\x00\x08\x00\x00\x00\x12\x00\x00\x00Xen\x00";
    let at = image
        .windows(note.len())
        .position(|w| w == note)
        .expect("the PVH note");
    image[at + 8] = 0x7f;
    let kernel = dir.join("vmlinux-without-pvh");
    std::fs::write(&kernel, &image).expect("write");
    let console = dir.join("console");
    let mut cmd = Command::new(lockstep_bin());
    cmd.args(["run", "--kernel", kernel.to_str().expect("UTF-8")])
        .args(["--mem", MEM, "--cmdline", CMDLINE, "--console"])
        .arg(&console);
    let p = Proc::spawn(cmd, dir.join("out"), dir.join("err")).expect("start");
    let map = "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable";
    assert!(
        wait_for_line(&console, map, BOOT_LIMIT, || true),
        "{}\n{}",
        std::fs::read_to_string(&console).unwrap_or_default(),
        p.log()
    );
    assert!(
        p.log()
            .contains("Linux kernel (vmlinux, 64-bit entry at 0x1000000)"),
        "{}",
        p.log()
    );
    let lines = console_lines(&console);
    assert!(lines[0].contains(BANNER), "{lines:#?}");
    assert_eq!(text(&lines[1]), format!("Command line: {CMDLINE}"));
}

/// A bzImage: its decompressor runs (silently: Debian builds without
/// CONFIG_X86_VERBOSE_BOOTUP; ~2 minutes here) and enters the kernel, which prints its
/// banner and finds KVM.
#[test]
fn the_bzimage_decompresses_itself_and_boots() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let dir = TempDir::new("linux-bzimage");
    // Too little RAM for where it decompresses itself (16 MiB + init_size): one line.
    let bz = kernel_dir().join("bzImage");
    lockstep(&[
        "run",
        "--kernel",
        bz.to_str().expect("UTF-8"),
        "--mem",
        "64M",
    ])
    .assert_one_line_error(&[
        "kernel ends at 0x",
        "beyond the 0x4000000 bytes of guest RAM",
    ]);
    let console = dir.join("console");
    let mut cmd = Command::new(lockstep_bin());
    cmd.args(["run", "--kernel"])
        .arg(kernel_dir().join("bzImage"))
        .args(["--mem", MEM, "--cmdline", CMDLINE, "--console"])
        .arg(&console);
    let p = Proc::spawn(cmd, dir.join("out"), dir.join("err")).expect("start");
    assert!(
        wait_for_line(&console, "Hypervisor detected: KVM", 2 * BOOT_LIMIT, || {
            true
        }),
        "{}\n{}",
        std::fs::read_to_string(&console).unwrap_or_default(),
        p.log()
    );
    assert!(
        p.log()
            .contains("Linux kernel (bzImage, 64-bit entry at 0x100200)"),
        "{}",
        p.log()
    );
    let lines = console_lines(&console);
    assert!(lines[0].contains(BANNER), "{lines:#?}");
    assert_eq!(text(&lines[1]), format!("Command line: {CMDLINE}"));
}

/// A 64-bit ELF (no PVH note) whose first instruction after one `mov` is `lock cmpxchg16b`,
/// which this KVM's emulator cannot run: the run ends with one line naming the
/// instruction's exact RIP. (Under hardware virtualization the instruction runs and the
/// guest asks the i8042 for a reset: exit status 0.)
#[test]
fn an_instruction_kvm_cannot_emulate_is_one_line_with_its_rip() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("linux-emulation");
    let code: &[u8] = &[
        0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, // mov rdi, 0x200000
        0xf0, 0x48, 0x0f, 0xc7, 0x0f, // lock cmpxchg16b [rdi]   (at 0x100007)
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al: i8042 pulse reset
        0xf4, // hlt
    ];
    let path = dir.join("cmpxchg16b.elf");
    std::fs::write(&path, tiny_elf(0x10_0000, code)).expect("write");
    let run = lockstep(&[
        "run",
        "--kernel",
        path.to_str().expect("UTF-8"),
        "--mem",
        "64M",
    ]);
    if run.code() == Some(0) {
        // Hardware virtualization ran it.
        assert!(run.stderr.contains("i8042 pulse reset"), "{run:?}");
        return;
    }
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert_eq!(
        run.stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "{run:?}"
    );
    assert_eq!(
        emulation_stop(&run.stderr),
        "lockstep: error: vCPU 0: guest stopped: KVM could not emulate the instruction at \
         RIP=0x100007 (code f0 48 0f c7 0f b0 fe e6 64 f4 00 00 00 00 00; \
         KVM_EXIT_INTERNAL_ERROR, suberror 1: emulation failure)"
    );
}

/// A minimal ELF64 executable: one PT_LOAD segment of `code` at `addr`, entered there.
fn tiny_elf(addr: u64, code: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&addr.to_le_bytes()); // e_entry
    e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        e.extend_from_slice(&v.to_le_bytes());
    }
    let offset = 0x1000u64;
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        offset,
        addr,
        addr,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.resize(offset as usize, 0);
    e.extend_from_slice(code);
    e
}

#[test]
fn bad_kernels_and_options_are_one_line_errors() {
    let dir = TempDir::new("linux-bad");
    let missing = dir.arg("no-such-kernel");
    lockstep(&["run", "--kernel", &missing]).assert_one_line_error(&[
        "--kernel",
        "no-such-kernel",
        "No such file",
    ]);
    // A device that would be read forever, and a missing initramfs: named by option.
    lockstep(&["run", "--kernel", "/dev/zero"])
        .assert_one_line_error(&["--kernel /dev/zero", "not a regular file"]);
    let kernel = dir.join("junk-kernel");
    std::fs::write(&kernel, b"x").expect("write");
    lockstep(&[
        "run",
        "--kernel",
        kernel.to_str().expect("UTF-8"),
        "--initramfs",
        &missing,
    ])
    .assert_one_line_error(&["--initramfs", "no-such-kernel", "No such file"]);
    let junk = dir.join("junk");
    std::fs::write(&junk, b"this is no kernel").expect("write");
    lockstep(&["run", "--kernel", junk.to_str().expect("UTF-8")]).assert_one_line_error(&[
        "--kernel",
        "junk",
        "neither an ELF vmlinux nor a bzImage",
    ]);
    let mut elf32 = tiny_elf(0x10_0000, &[0xf4]);
    elf32[4] = 1;
    let path = dir.join("elf32");
    std::fs::write(&path, elf32).expect("write");
    if kvm_required() {
        lockstep(&["run", "--kernel", path.to_str().expect("UTF-8")])
            .assert_one_line_error(&["not a 64-bit ELF"]);
        let ok = dir.join("ok.elf");
        std::fs::write(&ok, tiny_elf(0x10_0000, &[0xf4])).expect("write");
        lockstep(&[
            "run",
            "--kernel",
            ok.to_str().expect("UTF-8"),
            "--mem",
            "4G",
        ])
        .assert_one_line_error(&["--mem 4G", "a Linux guest takes 64M to 3G"]);
        let huge = dir.join("huge.cpio");
        std::fs::write(&huge, vec![0u8; 70 << 20]).expect("write");
        lockstep(&[
            "run",
            "--kernel",
            ok.to_str().expect("UTF-8"),
            "--mem",
            "64M",
            "--initramfs",
            huge.to_str().expect("UTF-8"),
        ])
        .assert_one_line_error(&["initramfs of 73400320 bytes does not fit"]);
    }
    lockstep(&["run", "--guest", "builtin", "--kernel", &missing])
        .assert_one_line_error(&["--kernel", "--guest"]);
    lockstep(&["run", "--guest", "builtin", "--initramfs", &missing])
        .assert_one_line_error(&["--initramfs and --cmdline go with --kernel"]);
    lockstep(&["run", "--guest", "builtin", "--cmdline", "quiet"])
        .assert_one_line_error(&["--initramfs and --cmdline go with --kernel"]);
    lockstep(&["run"]).assert_one_line_error(&["--guest builtin|PATH or --kernel PATH"]);
    // The options work from a config file too.
    let config = dir.join("linux.toml");
    std::fs::write(
        &config,
        format!("kernel = \"{missing}\"\ncmdline = \"quiet\"\ninitramfs = \"{missing}\"\n"),
    )
    .expect("write");
    lockstep(&["run", "--config", config.to_str().expect("UTF-8")])
        .assert_one_line_error(&["--kernel", "no-such-kernel"]);
}
