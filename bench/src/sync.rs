//! `bench sync`: the initial sync of a mostly untouched guest, end to end, lockstep against
//! QEMU's live migration of a guest with the same RAM, in one run.
//!
//! For each `--mem` size (default 2G), `--trials` times (default 3), alternating:
//!
//! - **lockstep**: a backup and a primary over loopback (`--insecure`, as QEMU's migration
//!   runs in clear), the built-in guest's `workload=dirty pages_per_ms=1 wss=16M` (it
//!   writes one page a millisecond: the rest of its RAM stays untouched), `--seconds 1`.
//!   From the logs: end to end, from the primary's start of the initial sync to the ack of
//!   epoch 1 (the backup has applied the synced memory and committed it; the primary's
//!   `PROTECTED ... ms after the initial sync of memory began`); the primary's side (its
//!   pre-copy rounds, `initial sync done in`); the backup's side (first pre-copy pages
//!   until epoch 1 committed); the bytes the sync put on the wire. Both sides must end
//!   with the same final digest.
//! - **QEMU**: Debian's `qemu-system-x86_64 -M microvm -m SIZE -nodefaults -nographic
//!   -display none` (`-accel kvm` when `/dev/kvm` works, else `tcg`; no kernel: the guest
//!   sits in its firmware, its RAM untouched), a destination with `-incoming
//!   tcp:127.0.0.1:PORT`, both driven over QMP (a Unix socket). The source's
//!   `max-bandwidth` is lifted (QEMU's default caps a migration at 128 MiB/s of data),
//!   then `migrate`; end to end is from the `migrate` command until the destination runs
//!   (its `query-status`, polled every millisecond), besides the source's own
//!   `total-time` (`query-migrate`) and the bytes it transferred.
//!
//! The table gives each side's median over its trials (min–max in brackets), MiB/s of
//! guest memory end to end, and lockstep ÷ QEMU of the end-to-end times (below 1:
//! lockstep is faster). When `qemu-system-x86_64` is missing the benchmark installs
//! Debian's `qemu-system-x86` (`apt-get install`, noninteractive, as root); if that fails
//! the comparison is skipped, with the reason, and lockstep's figures are still printed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::Proc;
use serde_json::{json, Value};

use crate::args::Args;
use crate::checkpoint::{after_number, first_line, log_secs};
use crate::runs::{free_port, protected, work_dir, Output};
use crate::BenchError;

pub const OPTIONS: &[&str] = &["mem", "trials"];

/// The lockstep guest: one page written a millisecond in a 16 MiB working set.
const GUEST: &str = "workload=dirty pages_per_ms=1 wss=16M seconds=60";
/// How long the lockstep primary runs (from its guest's start, the sync included).
const LOCKSTEP_SECONDS: f64 = 1.0;
/// The QEMU binary and the Debian package that has it.
const QEMU: &str = "qemu-system-x86_64";
const QEMU_PACKAGE: &str = "qemu-system-x86";
/// How long QEMU may take to start and answer on its QMP socket.
const QEMU_START: Duration = Duration::from_secs(20);
/// How often the destination's state is polled during a migration.
const POLL: Duration = Duration::from_millis(1);

pub fn run(args: &Args) -> Result<(), BenchError> {
    let trials = args.number("trials", 3usize, 1)?;
    let sizes = sizes(args.get("mem").unwrap_or("2G"))?;
    let bin = harness::try_lockstep_bin().map_err(BenchError::Failed)?;
    let dir = work_dir().map_err(BenchError::Failed)?;
    let qemu = find_qemu(true);
    if let Err(why) = &qemu {
        eprintln!("bench sync: the QEMU comparison is skipped: {why}");
    }
    let mut accel = Accel::first();
    let rows: Vec<Row> = sizes
        .iter()
        .map(|(text, bytes)| {
            measure(
                bin,
                qemu.as_ref().ok(),
                &dir,
                text,
                *bytes,
                trials,
                &mut accel,
                "bench sync",
            )
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    print(&rows, trials, &qemu, accel);
    let failed: usize = rows.iter().map(Row::failed).sum();
    if failed > 0 {
        return Err(BenchError::Failed(format!(
            "{failed} runs failed (see the table)"
        )));
    }
    Ok(())
}

/// `trials` initial syncs of a `text` (`bytes`) guest by lockstep and, with `qemu`, as
/// many QEMU migrations, alternating; progress on stderr after `label`. Once QEMU failed
/// under KVM, `accel` turns to TCG for every later run.
#[allow(clippy::too_many_arguments)]
pub(crate) fn measure(
    bin: &Path,
    qemu: Option<&Qemu>,
    dir: &Path,
    text: &str,
    bytes: u64,
    trials: usize,
    accel: &mut Accel,
    label: &str,
) -> Row {
    let mut row = Row {
        mem: text.to_string(),
        mib: (bytes >> 20) as f64,
        lockstep: Vec::new(),
        qemu: Vec::new(),
    };
    for t in 0..trials {
        eprintln!("{label}: {text}, trial {} of {trials}: lockstep...", t + 1);
        let r = protected(bin, text, "1", 25, GUEST, LOCKSTEP_SECONDS)
            .and_then(|(p, b)| LockstepRun::parse(&p, &b));
        if let Err(e) = &r {
            eprintln!("{label}: lockstep: {}", first_line(e));
        }
        row.lockstep.push(r);
        if let Some(q) = qemu {
            eprintln!("{label}: {text}, trial {} of {trials}: QEMU...", t + 1);
            let mut r = qemu_trial(q, dir, text, bytes, *accel);
            if r.is_err() && *accel == Accel::Kvm {
                // QEMU may not run with this KVM: the comparison then runs under TCG.
                eprintln!(
                    "{label}: QEMU with KVM: {}; trying TCG",
                    first_line(r.as_ref().err().map_or("", String::as_str))
                );
                *accel = Accel::Tcg;
                r = qemu_trial(q, dir, text, bytes, *accel);
            }
            if let Err(e) = &r {
                eprintln!("{label}: QEMU: {}", first_line(e));
            }
            row.qemu.push(r);
        }
    }
    row
}

/// `--mem LIST`: sizes as `lockstep --mem` takes them, with their bytes.
fn sizes(list: &str) -> Result<Vec<(String, u64)>, BenchError> {
    list.split(',')
        .map(|s| {
            let s = s.trim();
            match engine::size::parse_size(s) {
                Ok(b) if b >= 64 << 20 => Ok((s.to_string(), b)),
                _ => Err(BenchError::Usage(format!(
                    "--mem {list}: expected sizes of at least 64M separated by commas \
                     (e.g. 512M,2G)"
                ))),
            }
        })
        .collect()
}

/// How QEMU runs its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` can be opened, else TCG.
    pub(crate) fn first() -> Accel {
        if kvm_usable() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// One size's trials.
pub(crate) struct Row {
    pub(crate) mem: String,
    mib: f64,
    pub(crate) lockstep: Vec<Result<LockstepRun, String>>,
    pub(crate) qemu: Vec<Result<QemuRun, String>>,
}

impl Row {
    /// The median end to end (ms) of lockstep's trials that gave figures.
    pub(crate) fn lockstep_ms(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .lockstep
            .iter()
            .flatten()
            .map(|l| l.end_to_end_ms)
            .collect();
        spread(&v).map(|(m, _, _)| m)
    }

    /// The median end to end (ms) of QEMU's trials that gave figures.
    pub(crate) fn qemu_ms(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .qemu
            .iter()
            .flatten()
            .map(|q| q.end_to_end_ms)
            .collect();
        spread(&v).map(|(m, _, _)| m)
    }

    /// Trials that failed, either side.
    pub(crate) fn failed(&self) -> usize {
        self.lockstep.iter().filter(|x| x.is_err()).count()
            + self.qemu.iter().filter(|x| x.is_err()).count()
    }

    /// The first failure's first line, either side.
    pub(crate) fn first_error(&self) -> Option<String> {
        let lockstep = self.lockstep.iter().filter_map(|x| x.as_ref().err());
        let qemu = self.qemu.iter().filter_map(|x| x.as_ref().err());
        lockstep
            .map(|e| format!("lockstep: {}", first_line(e)))
            .chain(qemu.map(|e| format!("QEMU: {}", first_line(e))))
            .next()
    }
}

/// What a lockstep pair's logs say of its initial sync (milliseconds, MiB).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LockstepRun {
    /// The primary's start of the sync until the ack of epoch 1.
    end_to_end_ms: f64,
    /// The primary's pre-copy rounds.
    primary_ms: f64,
    /// The backup: first pre-copy pages until epoch 1 committed.
    backup_ms: f64,
    /// Bytes the sync put on the wire.
    wire_mib: f64,
}

impl LockstepRun {
    /// The figures from the primary's and the backup's logs. Builds from before these
    /// lines said how long the sync took (`LOCKSTEP_BIN`) are timed by their log clocks:
    /// the primary from the backup's acceptance to `PROTECTED` (which it logged when its
    /// epoch loop saw the ack), the backup from `replicating from` to epoch 1.
    fn parse(primary: &Output, backup: &Output) -> Result<LockstepRun, String> {
        let (p, b) = (&primary.stderr, &backup.stderr);
        let missing = |what: &str, log: &str| format!("no {what} in the log:\n{log}");
        let between =
            |log: &str, from: &str, to: &str| match (log_secs(log, from), log_secs(log, to)) {
                (Some(a), Some(b)) => Some((b - a) * 1000.0),
                _ => None,
            };
        Ok(LockstepRun {
            end_to_end_ms: number_before(p, " ms after the initial sync of memory began")
                .or_else(|| between(p, "accepted the guest", "PROTECTED"))
                .ok_or_else(|| missing("'PROTECTED ... after the initial sync' line", p))?,
            primary_ms: after_number(p, "initial sync done in ")
                .map(|s| s * 1000.0)
                .ok_or_else(|| missing("'initial sync done' line", p))?,
            backup_ms: number_before(b, " ms after the first pre-copy pages arrived")
                .or_else(|| between(b, "replicating from", "epoch 1 committed"))
                .ok_or_else(|| missing("'epoch 1 committed ... after' line", b))?,
            wire_mib: last_number_before(p, " MiB on the wire").unwrap_or(0.0),
        })
    }
}

/// The number just before `needle` on the first line that has it.
fn number_before(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    number_ending_at(line, line.find(needle)?)
}

/// The number just before `needle` on the last line that has it.
fn last_number_before(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(needle))?;
    number_ending_at(line, line.find(needle)?)
}

fn number_ending_at(line: &str, end: usize) -> Option<f64> {
    let head = &line[..end];
    let start = head
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    head[start..].parse().ok()
}

/// What one QEMU migration took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct QemuRun {
    /// From the `migrate` command until the destination runs (ms).
    end_to_end_ms: f64,
    /// The source's `total-time` (ms), as QEMU reports it.
    total_ms: f64,
    /// Bytes the source transferred (MiB).
    wire_mib: f64,
}

/// The QEMU binary, installed if missing and `install` says so; why not, otherwise.
pub(crate) fn find_qemu(install: bool) -> Result<Qemu, String> {
    if let Some(path) = on_path(QEMU) {
        return Qemu::at(path);
    }
    if !install {
        return Err(format!(
            "{QEMU} missing (bench sync installs Debian's {QEMU_PACKAGE})"
        ));
    }
    eprintln!(
        "bench sync: {QEMU} not found; installing Debian's {QEMU_PACKAGE} for the comparison..."
    );
    self::install(QEMU_PACKAGE)?;
    match on_path(QEMU) {
        Some(path) => Qemu::at(path),
        None => Err(format!(
            "{QEMU_PACKAGE} was installed but {QEMU} is not on PATH"
        )),
    }
}

/// `apt-get install -y PACKAGE` (noninteractive, without recommended packages), once more
/// after `apt-get update` if that fails (an old package index).
fn install(package: &str) -> Result<(), String> {
    let apt = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "apt-get {} failed ({}): {}",
            args.join(" "),
            out.status,
            err.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
        ))
    };
    let install = ["install", "-y", "-q", "--no-install-recommends", package];
    apt(&install).or_else(|_| {
        apt(&["update", "-q"])?;
        apt(&install)
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A QEMU binary and its version line.
pub(crate) struct Qemu {
    path: PathBuf,
    pub(crate) version: String,
}

impl Qemu {
    fn at(path: PathBuf) -> Result<Qemu, String> {
        let out = Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        Ok(Qemu { path, version })
    }

    /// Starts a microvm of `mem` with its QMP socket at `qmp`, waiting for `incoming`
    /// migrations on that address if given.
    fn start(
        &self,
        dir: &Path,
        name: &str,
        mem: &str,
        accel: Accel,
        qmp: &Path,
        incoming: Option<&str>,
    ) -> Result<Proc, String> {
        let mut cmd = Command::new(&self.path);
        cmd.args(["-M", "microvm", "-accel", accel.name(), "-m", mem])
            .args(["-nodefaults", "-nographic", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(addr) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:{addr}"));
        }
        Proc::spawn(
            cmd,
            dir.join(format!("{name}.out")),
            dir.join(format!("{name}.err")),
        )
    }
}

/// One migration of an untouched `mem` guest over loopback.
fn qemu_trial(
    qemu: &Qemu,
    dir: &Path,
    mem: &str,
    bytes: u64,
    accel: Accel,
) -> Result<QemuRun, String> {
    let _ = std::fs::create_dir_all(dir);
    let addr = format!("127.0.0.1:{}", free_port()?);
    let (src_sock, dst_sock) = (dir.join("qemu-src.qmp"), dir.join("qemu-dst.qmp"));
    for s in [&src_sock, &dst_sock] {
        let _ = std::fs::remove_file(s);
    }
    let mut dst = qemu.start(dir, "qemu-dst", mem, accel, &dst_sock, Some(&addr))?;
    let mut src = qemu.start(dir, "qemu-src", mem, accel, &src_sock, None)?;
    let mut dst_qmp = Qmp::connect(&dst_sock, &mut dst, "destination")?;
    let mut src_qmp = Qmp::connect(&src_sock, &mut src, "source")?;
    src_qmp.call(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 1u64 << 40 }),
    )?;
    // A deadline that grows with the guest: QEMU under TCG is slower.
    let deadline = Instant::now() + Duration::from_secs(60 + 10 * (bytes >> 30));
    let start = Instant::now();
    src_qmp.call("migrate", json!({ "uri": format!("tcp:{addr}") }))?;
    let mut arrived = None;
    let mut source = None;
    while arrived.is_none() || source.is_none() {
        if Instant::now() > deadline {
            return Err(format!(
                "the migration of {mem} did not end within {:?}",
                deadline - start
            ));
        }
        if arrived.is_none() {
            let s = dst_qmp.call("query-status", json!({}))?;
            if s["status"] == "running" {
                arrived = Some(start.elapsed());
            }
        }
        if source.is_none() {
            let m = src_qmp.call("query-migrate", json!({}))?;
            source = migration_done(&m)?;
        }
        if arrived.is_none() || source.is_none() {
            std::thread::sleep(POLL);
        }
    }
    let (total_ms, wire) = source.unwrap_or_default();
    let arrived = arrived.unwrap_or_default();
    drop((src_qmp, dst_qmp));
    src.kill9();
    dst.kill9();
    Ok(QemuRun {
        end_to_end_ms: arrived.as_secs_f64() * 1000.0,
        total_ms,
        wire_mib: wire as f64 / (1 << 20) as f64,
    })
}

/// From a `query-migrate` answer: `Some((total-time ms, bytes transferred))` once the
/// migration completed, `None` while it runs, an error when it failed.
fn migration_done(m: &Value) -> Result<Option<(f64, u64)>, String> {
    match m["status"].as_str() {
        Some("completed") => Ok(Some((
            m["total-time"].as_f64().unwrap_or(0.0),
            m["ram"]["transferred"].as_u64().unwrap_or(0),
        ))),
        Some("failed") | Some("cancelled") => Err(format!(
            "the migration {}: {}",
            m["status"].as_str().unwrap_or(""),
            m["error-desc"].as_str().unwrap_or("no reason given")
        )),
        _ => Ok(None),
    }
}

/// A QMP client: one JSON object a line each way; events are skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    what: &'static str,
}

impl Qmp {
    /// Connects to QEMU's socket at `path` (retrying while QEMU starts), reads the
    /// greeting and leaves capabilities negotiation.
    fn connect(path: &Path, proc: &mut Proc, what: &'static str) -> Result<Qmp, String> {
        let deadline = Instant::now() + QEMU_START;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(status) = proc.try_wait() {
                        return Err(format!(
                            "QEMU ({what}) exited with {status}: {}",
                            proc.log().lines().last().unwrap_or("")
                        ));
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "QEMU ({what}) did not open its QMP socket {} within {QEMU_START:?}: {e}",
                            path.display()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| format!("QMP ({what}): {e}"))?;
        let writer = stream
            .try_clone()
            .map_err(|e| format!("QMP ({what}): {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            what,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP ({what}): not a QMP greeting: {greeting}"));
        }
        qmp.call("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(format!("QMP ({}): QEMU closed the socket", self.what)),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| format!("QMP ({}): {e}: {}", self.what, line.trim())),
            Err(e) => Err(format!("QMP ({}): {e}", self.what)),
        }
    }

    /// Runs `command` with `arguments`; its `return` value, or its error as a message.
    fn call(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": command, "arguments": arguments }).to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("QMP ({}): sending {command}: {e}", self.what))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!(
                    "QMP ({}): {command}: {}",
                    self.what,
                    e["desc"].as_str().unwrap_or("error")
                ));
            }
            // An event ({"event": ...}): not the answer.
        }
    }
}

/// The median and the range of `values`; `None` without values.
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = *v.get((v.len().checked_sub(1)?) / 2)?;
    Some((mid, v[0], v[v.len() - 1]))
}

/// `median (min–max)` with `digits` decimals, `-` without values.
fn cell(values: &[f64], digits: usize) -> String {
    match spread(values) {
        Some((m, lo, hi)) if values.len() > 1 => {
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        }
        Some((m, _, _)) => format!("{m:.digits$}"),
        None => "-".into(),
    }
}

fn print(rows: &[Row], trials: usize, qemu: &Result<Qemu, String>, accel: Accel) {
    println!(
        "\nInitial sync of a mostly untouched guest over loopback, end to end: lockstep \
         (primary and backup, --insecure) against QEMU's live migration (microvm, {}), \
         median (min–max) of {trials} trial{} each\n",
        match qemu {
            Ok(q) => format!("{}, -accel {}", q.version, accel.name()),
            Err(_) => "skipped".into(),
        },
        if trials == 1 { "" } else { "s" }
    );
    let header = [
        "guest RAM",
        "lockstep end to end ms",
        "lockstep MiB/s",
        "primary ms",
        "backup ms",
        "lockstep wire MiB",
        "QEMU end to end ms",
        "QEMU MiB/s",
        "QEMU total-time ms",
        "QEMU wire MiB",
        "lockstep ÷ QEMU",
    ];
    println!("| {} |", header.join(" | "));
    println!("|{}", " ---: |".repeat(header.len()));
    for r in rows {
        let ls: Vec<LockstepRun> = r.lockstep.iter().filter_map(|x| x.clone().ok()).collect();
        let qs: Vec<QemuRun> = r.qemu.iter().filter_map(|x| x.clone().ok()).collect();
        let lf = |f: fn(&LockstepRun) -> f64| ls.iter().map(f).collect::<Vec<f64>>();
        let qf = |f: fn(&QemuRun) -> f64| qs.iter().map(f).collect::<Vec<f64>>();
        let mibs = |ms: Vec<f64>| ms.iter().map(|t| r.mib / (t / 1000.0)).collect::<Vec<_>>();
        let ratio = match (
            spread(&lf(|l| l.end_to_end_ms)),
            spread(&qf(|q| q.end_to_end_ms)),
        ) {
            (Some((l, _, _)), Some((q, _, _))) if q > 0.0 => format!("{:.2}", l / q),
            _ => "-".into(),
        };
        let qemu_cells = if qemu.is_ok() {
            [
                cell(&qf(|q| q.end_to_end_ms), 1),
                cell(&mibs(qf(|q| q.end_to_end_ms)), 0),
                cell(&qf(|q| q.total_ms), 0),
                cell(&qf(|q| q.wire_mib), 1),
            ]
        } else {
            ["skipped".into(), "-".into(), "-".into(), "-".into()]
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {ratio} |",
            r.mem,
            cell(&lf(|l| l.end_to_end_ms), 1),
            cell(&mibs(lf(|l| l.end_to_end_ms)), 0),
            cell(&lf(|l| l.primary_ms), 1),
            cell(&lf(|l| l.backup_ms), 1),
            cell(&lf(|l| l.wire_mib), 0),
            qemu_cells.join(" | "),
        );
    }
    println!(
        "\nlockstep end to end: from the primary's start of the initial sync until the ack of \
         epoch 1 (the backup applied and committed the synced memory); primary: its pre-copy \
         rounds; backup: first pre-copy pages until epoch 1 committed; the guest writes one \
         page a millisecond in 16 MiB. QEMU end to end: from the `migrate` command until \
         the destination runs (polled every {} ms); total-time: the source's own figure; \
         max-bandwidth lifted. MiB/s: guest RAM per second end to end. lockstep ÷ QEMU: \
         of the end-to-end medians (below 1: lockstep is faster).",
        POLL.as_millis()
    );
    if let Err(why) = qemu {
        println!("\nThe QEMU comparison was skipped: {why}");
    }
    for r in rows {
        for e in r.lockstep.iter().filter_map(|x| x.as_ref().err()) {
            println!("\n{} lockstep run failed: {}", r.mem, first_line(e));
        }
        for e in r.qemu.iter().filter_map(|x| x.as_ref().err()) {
            println!("\n{} QEMU run failed: {}", r.mem, first_line(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(stderr: &str) -> Output {
        Output {
            status: std::process::ExitStatus::default(),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn lockstep_figures_from_both_logs() {
        let p = output(
            "\
[primary    0.042s info] initial sync round 0: 2048 of 2048 MiB (100%), 166286 MiB/s of guest memory, 0.0 s left, 5 MiB on the wire, guest held 0%
[primary    0.043s info] initial sync done in 0.013 s (159592 MiB/s of guest memory, 2047 MiB of it zero pages)
[primary    0.049s info] PROTECTED: the backup at 127.0.0.1:47610 committed epoch 1, 38 ms after protection began (17.0 ms after the initial sync of memory began)
",
        );
        let b = output(
            "[backup    0.343s info] epoch 1 committed: the backup holds a runnable copy, \
             11.4 ms after the first pre-copy pages arrived (524232 zero pages needed no write)\n",
        );
        assert_eq!(
            LockstepRun::parse(&p, &b).unwrap(),
            LockstepRun {
                end_to_end_ms: 17.0,
                primary_ms: 13.0,
                backup_ms: 11.4,
                wire_mib: 5.0,
            }
        );
        // An older build's logs, timed by their clocks.
        let old_p = output(
            "\
[primary    0.032s info] backup at 127.0.0.1:47600 accepted the guest (2048 MiB, 1 vCPUs)
[primary    0.513s info] initial sync round 0: 2048 of 2048 MiB (100%), 4278 MiB/s of guest memory, 5 MiB on the wire, guest held 0%
[primary    0.514s info] initial sync done in 0.48 s (4273 MiB/s of guest memory, guest held up to 0% of the time)
[primary    0.518s info] PROTECTED: the backup at 127.0.0.1:47600 committed epoch 1, 506 ms after protection began
",
        );
        let old_b = output(
            "\
[backup    0.335s info] replicating from 127.0.0.1:53556: 2048 MiB, 1 vCPUs
[backup    0.821s info] epoch 1 committed: the backup holds a runnable copy (524228 zero pages needed no write)
",
        );
        let r = LockstepRun::parse(&old_p, &old_b).unwrap();
        assert_eq!(r.primary_ms, 480.0);
        assert!((r.end_to_end_ms - 486.0).abs() < 1e-6, "{r:?}");
        assert!((r.backup_ms - 486.0).abs() < 1e-6, "{r:?}");
        let err = LockstepRun::parse(&output("[primary 1s info] nothing"), &b).unwrap_err();
        assert!(err.contains("PROTECTED"), "{err}");
    }

    #[test]
    fn numbers_before_a_needle() {
        assert_eq!(
            number_before("a (12.5 ms after x", " ms after x"),
            Some(12.5)
        );
        assert_eq!(number_before("7 MiB", " MiB"), Some(7.0));
        assert_eq!(number_before("no number ms after x", " ms after x"), None);
        assert_eq!(
            last_number_before("1 MiB on the wire\n3 MiB on the wire\n", " MiB on the wire"),
            Some(3.0)
        );
    }

    #[test]
    fn migration_states() {
        let done: Value = serde_json::from_str(
            r#"{"status": "completed", "total-time": 82, "ram": {"transferred": 4768001}}"#,
        )
        .unwrap();
        assert_eq!(migration_done(&done).unwrap(), Some((82.0, 4768001)));
        let active: Value = serde_json::from_str(r#"{"status": "active"}"#).unwrap();
        assert_eq!(migration_done(&active).unwrap(), None);
        let failed: Value =
            serde_json::from_str(r#"{"status": "failed", "error-desc": "Connection refused"}"#)
                .unwrap();
        assert!(migration_done(&failed)
            .unwrap_err()
            .contains("Connection refused"));
    }

    #[test]
    fn sizes_and_cells() {
        assert_eq!(
            sizes("512M, 2G").unwrap(),
            [("512M".to_string(), 512 << 20), ("2G".to_string(), 2 << 30)]
        );
        assert!(matches!(sizes("2X"), Err(BenchError::Usage(_))));
        assert!(matches!(sizes("1M"), Err(BenchError::Usage(_))));
        assert_eq!(cell(&[3.0, 1.0, 2.0], 1), "2.0 (1.0–3.0)");
        assert_eq!(cell(&[4.0, 1.0], 0), "1 (1–4)");
        assert_eq!(cell(&[5.0], 0), "5");
        assert_eq!(cell(&[], 0), "-");
    }
}
