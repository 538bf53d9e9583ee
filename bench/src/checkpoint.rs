//! `bench checkpoint`: what continuous checkpointing costs, measured on real primary and
//! backup processes (`lockstep primary` / `lockstep backup`) over loopback.
//!
//! 1. Epoch figures: for each interval (`--intervals`, 5 and 25 ms) and each target dirty
//!    set per epoch (`--pages`, 100, 1,000 and 10,000 pages), a pair runs the built-in
//!    guest's `workload=dirty pages_per_ms=<pages / interval>` for `--seconds` (3) of
//!    epochs. The primary's summary line gives the achieved pages per epoch, pause and
//!    commit latency (p50/p99), and bytes on the wire; the table adds the dirty data
//!    captured and the bytes sent per second of the run. The guest's write rate tops out
//!    near 300k pages/s here (a first write to a write-protected page costs ~3.3 µs under
//!    the nested KVM), so the largest targets are not reached: read the achieved column.
//! 2. Guest progress: for each interval, `workload=dirty pages_per_ms=0` (write as fast as
//!    possible) once unprotected (`lockstep run`, `--seconds` of guest time) and once
//!    protected (a pair, `--seconds` of epochs). The guest reports `dirty: ms=<guest ms>
//!    pages=<total>` every guest second; progress is pages per guest second between its
//!    reports: unprotected from the first to the last, protected from the first report
//!    after the primary's initial sync ended to the last (pre-copy rounds are not what
//!    protection costs in the steady state). The ratio is protected ÷ unprotected. The
//!    guest's clock (TSC) keeps running while it is paused, so pauses count against it.
//!
//! The `lockstep` binary is `LOCKSTEP_BIN`, or built (`cargo build -p engine --bin
//! lockstep`, a no-op when up to date) into the target directory and profile of this
//! benchmark. A failed run is a row saying why; the benchmark then exits non-zero.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::args::Args;
use crate::BenchError;

pub const OPTIONS: &[&str] = &["seconds", "intervals", "pages", "mem", "wss"];

const PAGE_SIZE: u64 = 4096;
/// How long a run may exceed its planned length before it counts as hung.
const GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("cannot build lockstep: {0}")]
    Build(String),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{failed} of {total} runs failed (see the tables)")]
    RunsFailed { failed: usize, total: usize },
}

struct Config {
    seconds: f64,
    intervals: Vec<u64>,
    pages: Vec<u64>,
    mem: String,
    wss: String,
}

impl Config {
    fn from(args: &Args) -> Result<Config, BenchError> {
        Ok(Config {
            seconds: args.number("seconds", 3.0, 0.5)?,
            intervals: list(args, "intervals", &[5, 25])?,
            pages: list(args, "pages", &[100, 1_000, 10_000])?,
            mem: args.get("mem").unwrap_or("256M").to_string(),
            wss: args.get("wss").unwrap_or("128M").to_string(),
        })
    }
}

/// A comma-separated list of positive numbers.
fn list(args: &Args, name: &str, default: &[u64]) -> Result<Vec<u64>, BenchError> {
    let Some(v) = args.get(name) else {
        return Ok(default.to_vec());
    };
    v.split(',')
        .map(|x| match x.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(BenchError::Usage(format!(
                "--{name} {v}: expected positive numbers separated by commas"
            ))),
        })
        .collect()
}

pub fn run(args: &Args) -> Result<(), BenchError> {
    let cfg = Config::from(args)?;
    let bin = lockstep_bin()?;
    let mut failed = 0;
    let mut total = 0;

    let mut epochs = Vec::new();
    for &interval in &cfg.intervals {
        for &pages in &cfg.pages {
            let rate = (pages + interval / 2) / interval;
            let rate = rate.max(1);
            eprintln!(
                "bench checkpoint: {interval} ms epochs, {pages} pages/epoch target \
                 (pages_per_ms={rate}), {} s...",
                cfg.seconds
            );
            let guest = format!(
                "workload=dirty pages_per_ms={rate} wss={} seconds={}",
                cfg.wss,
                cfg.seconds.ceil() as u64 + GRACE.as_secs()
            );
            let result = protected(&bin, &cfg, interval, &guest, cfg.seconds).and_then(|p| {
                Summary::parse(&p.stderr)
                    .ok_or_else(|| format!("no summary line from the primary:\n{}", p.stderr))
            });
            total += 1;
            failed += usize::from(result.is_err());
            epochs.push(EpochRow {
                interval,
                target: pages,
                result,
            });
        }
    }

    let mut progress = Vec::new();
    for &interval in &cfg.intervals {
        let guest = |seconds: u64| {
            format!(
                "workload=dirty pages_per_ms=0 wss={} seconds={seconds}",
                cfg.wss
            )
        };
        let short = guest(cfg.seconds.ceil() as u64);
        eprintln!("bench checkpoint: guest progress, unprotected ({short})...");
        let unprotected = unprotected(&bin, &cfg, &short).and_then(|out| rate_of(&out, 0));
        eprintln!("bench checkpoint: guest progress, protected at {interval} ms...");
        let long = guest(cfg.seconds.ceil() as u64 + GRACE.as_secs());
        let protected = protected(&bin, &cfg, interval, &long, cfg.seconds).and_then(|p| {
            let synced = sync_end_ms(&p.stderr).ok_or_else(|| {
                format!(
                    "no 'initial sync done' line from the primary:\n{}",
                    p.stderr
                )
            })?;
            let rate = rate_of(&p.stdout, synced)?;
            Ok((rate, Summary::parse(&p.stderr)))
        });
        total += 2;
        failed += usize::from(unprotected.is_err()) + usize::from(protected.is_err());
        progress.push(ProgressRow {
            interval,
            unprotected,
            protected,
        });
    }

    print_epochs(&cfg, &epochs);
    print_progress(&cfg, &progress);
    if failed > 0 {
        return Err(CheckpointError::RunsFailed { failed, total }.into());
    }
    Ok(())
}

/// The primary's end-of-run summary (see `engine::replication::stats`).
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    epochs: u64,
    pause_p50: u64,
    pause_p99: u64,
    pause_max: u64,
    commit_p50: u64,
    commit_p99: u64,
    dirty_pages: u64,
    wire_bytes: u64,
    throttled: u64,
    /// p50 of the pause's cumulative steps (µs): parked, captured, harvested, copied.
    steps: Option<[u64; 4]>,
}

impl Summary {
    /// Finds and parses the line `... epochs=N pause_us p50=.. p99=.. max=.. commit_us
    /// p50=.. p99=.. dirty_pages=.. wire_bytes=.. ... throttled=..` in `log`.
    fn parse(log: &str) -> Option<Summary> {
        let line = log
            .lines()
            .find(|l| l.contains(" epochs=") && l.contains("pause_us"))?;
        let fields = &line[line.find("epochs=")?..];
        let mut section = "";
        let mut values: Vec<(String, u64)> = Vec::new();
        for token in fields.split_whitespace() {
            let Some((key, value)) = token.split_once('=') else {
                section = token;
                continue;
            };
            let name = match key {
                "p50" | "p99" | "max" => format!("{section}.{key}"),
                _ => key.to_string(),
            };
            let digits: String = value
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            if let Ok(v) = digits.parse::<f64>() {
                values.push((name, v.round() as u64));
            }
        }
        let get = |name: &str| values.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        Some(Summary {
            epochs: get("epochs")?,
            pause_p50: get("pause_us.p50")?,
            pause_p99: get("pause_us.p99")?,
            pause_max: get("pause_us.max")?,
            commit_p50: get("commit_us.p50")?,
            commit_p99: get("commit_us.p99")?,
            dirty_pages: get("dirty_pages")?,
            wire_bytes: get("wire_bytes")?,
            throttled: get("throttled")?,
            steps: steps(log),
        })
    }

    fn steps_cell(&self) -> String {
        self.steps.map_or("-".into(), |s| {
            format!("{} / {} / {} / {}", s[0], s[1], s[2], s[3])
        })
    }

    fn pages_per_epoch(&self) -> f64 {
        self.dirty_pages as f64 / self.epochs.max(1) as f64
    }

    fn bytes_per_page(&self) -> f64 {
        self.wire_bytes as f64 / self.dirty_pages.max(1) as f64
    }
}

/// The line `pause p50 (cumulative, us): parked=.. captured=.. harvested=.. copied=..`.
fn steps(log: &str) -> Option<[u64; 4]> {
    let line = log.lines().find(|l| l.contains("pause p50 (cumulative"))?;
    let value = |key: &str| -> Option<u64> {
        let at = line.find(&format!(" {key}="))? + key.len() + 2;
        line[at..].split_whitespace().next()?.parse().ok()
    };
    Some([
        value("parked")?,
        value("captured")?,
        value("harvested")?,
        value("copied")?,
    ])
}

struct EpochRow {
    interval: u64,
    target: u64,
    result: Result<Summary, String>,
}

/// Pages per guest second.
type Rate = f64;

struct ProgressRow {
    interval: u64,
    unprotected: Result<Rate, String>,
    protected: Result<(Rate, Option<Summary>), String>,
}

fn mib(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}

fn print_epochs(cfg: &Config, rows: &[EpochRow]) {
    println!(
        "\nContinuous checkpointing: `workload=dirty` at a target dirty set per epoch, {} s \
         of epochs per row, {} guest, working set {}, primary and backup over loopback\n",
        cfg.seconds, cfg.mem, cfg.wss
    );
    let header = [
        "interval",
        "target pages/epoch",
        "achieved pages/epoch",
        "epochs",
        "ms/epoch",
        "pause p50 µs",
        "pause p99 µs",
        "pause max µs",
        "pause p50 steps µs",
        "commit p50 µs",
        "commit p99 µs",
        "wire bytes/dirty page",
        "dirty MiB/s",
        "wire MiB/s",
        "throttled",
    ];
    println!("| {} |", header.join(" | "));
    println!("|{}", " ---: |".repeat(header.len()));
    for r in rows {
        let cells = match &r.result {
            Ok(s) => vec![
                format!("{:.0}", s.pages_per_epoch()),
                s.epochs.to_string(),
                format!("{:.1}", cfg.seconds * 1000.0 / s.epochs.max(1) as f64),
                s.pause_p50.to_string(),
                s.pause_p99.to_string(),
                s.pause_max.to_string(),
                s.steps_cell(),
                s.commit_p50.to_string(),
                s.commit_p99.to_string(),
                format!("{:.0}", s.bytes_per_page()),
                format!(
                    "{:.1}",
                    mib((s.dirty_pages * PAGE_SIZE) as f64) / cfg.seconds
                ),
                format!("{:.2}", mib(s.wire_bytes as f64) / cfg.seconds),
                s.throttled.to_string(),
            ],
            Err(e) => vec![format!("failed: {}", first_line(e))],
        };
        println!(
            "| {} ms | {} | {} |",
            r.interval,
            r.target,
            cells.join(" | ")
        );
    }
    println!(
        "\nms/epoch: the mean epoch period (longer than the interval when the pause or the \
         backup cannot keep up). pause: from the pause request until the guest runs again. steps: p50 of the time \
         until every vCPU parked / state captured / dirty set harvested / pages copied \
         (cumulative). commit: from the pause until the backup's ack. dirty MiB/s: dirty \
         pages captured (4 KiB each) per second of epochs, what the encoder consumed; wire \
         MiB/s: bytes sent per second. Neither is the encoder's capacity, only what this \
         load asked of it. throttled: epochs that waited for the backup (window full)."
    );
}

fn print_progress(cfg: &Config, rows: &[ProgressRow]) {
    println!(
        "\nGuest progress under protection: `workload=dirty pages_per_ms=0` (as fast as it \
         can), {} s, {} guest, working set {}\n",
        cfg.seconds, cfg.mem, cfg.wss
    );
    println!(
        "| interval | unprotected pages/s | protected pages/s | protected ÷ unprotected | \
         pages/epoch | pause p50 µs | pause p99 µs |"
    );
    println!("|{}", " ---: |".repeat(7));
    for r in rows {
        let cell = |v: &Result<Rate, String>| match v {
            Ok(rate) => format!("{rate:.0}"),
            Err(e) => format!("failed: {}", first_line(e)),
        };
        let protected = r
            .protected
            .as_ref()
            .map(|(rate, _)| *rate)
            .map_err(String::clone);
        let ratio = match (&r.unprotected, &protected) {
            (Ok(u), Ok(p)) if *u > 0.0 => format!("{:.4}", p / u),
            _ => "-".to_string(),
        };
        let summary = r.protected.as_ref().ok().and_then(|(_, s)| s.as_ref());
        let (per_epoch, p50, p99) = match summary {
            Some(s) => (
                format!("{:.0}", s.pages_per_epoch()),
                s.pause_p50.to_string(),
                s.pause_p99.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} ms | {} | {} | {ratio} | {per_epoch} | {p50} | {p99} |",
            r.interval,
            cell(&r.unprotected),
            cell(&protected),
        );
    }
    println!(
        "\npages/s: pages written per guest second between the guest's per-second reports \
         (protected: only the reports after the initial sync). Unprotected, no page is \
         write-protected and a write costs a store; protected, the first write to a page in \
         each epoch faults to the hypervisor (~3.3 µs here, a ceiling near 300k pages/s), \
         and the pauses stop the guest. The target, a ratio of at least 0.9 at 25 ms, is \
         for realistic loads; this one does nothing but write."
    );
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// Pages per guest second from the guest's `dirty: ms=<t> pages=<n>` reports: from the
/// first at or after guest millisecond `from_ms` to the last.
fn rate_of(console: &str, from_ms: u64) -> Result<Rate, String> {
    let points: Vec<(u64, u64)> = console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("dirty: ms=")? + "dirty: ms=".len()..];
            let (ms, pages) = rest.split_once(" pages=")?;
            let pages: String = pages.chars().take_while(char::is_ascii_digit).collect();
            Some((ms.parse().ok()?, pages.parse().ok()?))
        })
        .filter(|&(ms, _)| ms >= from_ms)
        .collect();
    match (points.first(), points.last()) {
        (Some(&(t0, n0)), Some(&(t1, n1))) if t1 > t0 => {
            Ok(n1.saturating_sub(n0) as f64 * 1000.0 / (t1 - t0) as f64)
        }
        _ => Err(format!(
            "fewer than two 'dirty: ms=' reports from the guest after its ms={from_ms} \
             (try a larger --seconds):\n{console}"
        )),
    }
}

/// When the primary's initial sync ended, in ms of its log clock (which starts before
/// the guest's, so the guest's reports after it are all from continuous epochs).
fn sync_end_ms(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("initial sync done"))?;
    let stamp = line.strip_prefix('[')?.split_whitespace().nth(1)?;
    let secs: f64 = stamp.strip_suffix('s')?.parse().ok()?;
    Some((secs * 1000.0).ceil() as u64)
}

/// A finished process.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    /// The `lockstep: error:` line, or the exit status.
    fn why(&self) -> String {
        self.stderr
            .lines()
            .find(|l| l.starts_with("lockstep: error:"))
            .map_or_else(|| format!("exited with {}", self.status), str::to_string)
    }
}

/// A child process, killed if dropped before it was waited for.
struct Proc {
    what: String,
    child: Option<Child>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Proc {
    fn start(bin: &Path, args: &[&str]) -> Result<Proc, String> {
        let what = format!("lockstep {}", args.join(" "));
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Ok(Proc {
            what,
            child: Some(child),
            stdout,
            stderr,
        })
    }

    /// Waits until `deadline`, then kills it.
    fn wait(mut self, deadline: Instant) -> Result<Output, String> {
        let mut child = self.child.take().expect("waited for once");
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{} hung; killed it", self.what));
                }
                Err(e) => return Err(format!("waiting for {}: {e}", self.what)),
            }
        };
        let join =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        Ok(Output {
            status,
            stdout: join(self.stdout.take()),
            stderr: join(self.stderr.take()),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// `lockstep run` of `guest`; returns its console (stdout).
fn unprotected(bin: &Path, cfg: &Config, guest: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.seconds) + GRACE;
    let out = Proc::start(
        bin,
        &[
            "run",
            "--mem",
            &cfg.mem,
            "--guest",
            "builtin",
            "--guest-args",
            guest,
        ],
    )?
    .wait(deadline)?;
    if !out.status.success() {
        return Err(format!("lockstep run: {}", out.why()));
    }
    Ok(out.stdout)
}

/// A primary (console on its stdout) and a backup over loopback; returns the primary's
/// output once both ended cleanly with the same final digest.
fn protected(
    bin: &Path,
    cfg: &Config,
    interval_ms: u64,
    guest: &str,
    seconds: f64,
) -> Result<Output, String> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs_f64(seconds) + GRACE;
    let backup = Proc::start(bin, &["backup", "--listen", &addr, "--console", "none"])?;
    let interval = interval_ms.to_string();
    let seconds = seconds.to_string();
    let args = [
        "primary",
        "--peer",
        &addr,
        "--interval-ms",
        &interval,
        "--mem",
        &cfg.mem,
        "--guest",
        "builtin",
        "--guest-args",
        guest,
        "--seconds",
        &seconds,
    ];
    let primary = Proc::start(bin, &args)?.wait(deadline)?;
    let backup = backup.wait(deadline)?;
    if !primary.status.success() || !backup.status.success() {
        return Err(format!(
            "primary: {}; backup: {}",
            primary.why(),
            backup.why()
        ));
    }
    let final_line = |o: &Output| {
        o.stdout
            .lines()
            .find_map(|l| l.find("final epoch=").map(|i| l[i..].to_string()))
    };
    match (final_line(&primary), final_line(&backup)) {
        (Some(p), Some(b)) if p == b => Ok(primary),
        (p, b) => Err(format!(
            "primary and backup disagree: primary {p:?}, backup {b:?}"
        )),
    }
}

/// The `lockstep` binary: `LOCKSTEP_BIN`, or built into this benchmark's target directory
/// and profile (`<target>/<profile>/bench` is the running executable).
pub(crate) fn lockstep_bin() -> Result<PathBuf, CheckpointError> {
    if let Some(path) = std::env::var_os("LOCKSTEP_BIN") {
        return Ok(PathBuf::from(path));
    }
    let build = |m: String| CheckpointError::Build(m);
    let exe = std::env::current_exe().map_err(|e| build(format!("own path: {e}")))?;
    let profile_dir = exe
        .parent()
        .ok_or_else(|| build(format!("unexpected executable path {}", exe.display())))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| build(format!("unexpected executable path {}", exe.display())))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| build("no workspace directory".into()))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "engine", "--bin", "lockstep"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .output()
        .map_err(|e| build(format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        return Err(build(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let bin = profile_dir.join("lockstep");
    if !bin.is_file() {
        return Err(build(format!("{} does not exist", bin.display())));
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[primary    0.492s info] initial sync round 0: 256 of 256 MiB (100%), 529 MiB/s
[primary    3.084s info] epochs=103 pause_us p50=2211 p99=6194 max=6439 commit_us p50=9855 \
p99=61121 dirty_pages=118759 wire_bytes=3815294 bytes_per_dirty_page=32 compression=127.50x \
throttled=2
";

    #[test]
    fn parses_the_primary_summary() {
        let s = Summary::parse(LOG).unwrap();
        assert_eq!(
            s,
            Summary {
                epochs: 103,
                pause_p50: 2211,
                pause_p99: 6194,
                pause_max: 6439,
                commit_p50: 9855,
                commit_p99: 61121,
                dirty_pages: 118759,
                wire_bytes: 3815294,
                throttled: 2,
                steps: None,
            }
        );
        let full = format!(
            "{LOG}[primary 3.084s info] pause p50 (cumulative, us): parked=92 captured=172 \
             harvested=209 copied=938 resumed=950\n"
        );
        assert_eq!(
            Summary::parse(&full).unwrap().steps,
            Some([92, 172, 209, 938])
        );
        assert_eq!(s.pages_per_epoch().round(), 1153.0);
        assert_eq!(Summary::parse("[primary 1s info] nothing here"), None);
        // A field missing: no summary rather than a made-up zero.
        assert_eq!(Summary::parse(&LOG.replace("wire_bytes", "wire")), None);
    }

    #[test]
    fn rate_from_first_to_last_report() {
        let console = "dirty: ms=1000 pages=9810\ndirty: ms=2000 pages=19780\n\
                       dirty: ms=2500 pages=24800\ndirty: done";
        let r = rate_of(console, 0).unwrap();
        assert!((r - 9993.3).abs() < 0.1, "{r}");
        assert_eq!(rate_of(console, 1500).unwrap(), 10040.0);
        assert!(rate_of(console, 2001).is_err());
        // The guest's last report may share a line with what the VMM prints next.
        assert!(rate_of("dirty: ms=1000 pages=5\ndirty: ms=2000 pages=15final", 0).is_ok());
        assert!(rate_of("dirty: ms=1000 pages=5\n", 0).is_err());
    }

    #[test]
    fn sync_end_from_the_log_clock() {
        let log = "[primary    1.199s info] initial sync round 0: 256 of 256 MiB\n\
                   [primary    1.450s info] initial sync done in 1.44 s; continuous epochs\n";
        assert_eq!(sync_end_ms(log), Some(1450));
        assert_eq!(
            sync_end_ms("[primary 1.2s info] initial sync round 0"),
            None
        );
    }
}
