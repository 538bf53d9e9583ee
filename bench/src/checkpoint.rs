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
//!    protected (a pair, `--seconds` plus 2 s for the pre-copy). The guest reports
//!    `dirty: ms=<guest ms> pages=<total>` every guest second; progress is pages per guest
//!    second between its reports: unprotected from the first to the last, protected from
//!    the first report after the primary's initial sync ended to the last (pre-copy rounds
//!    are not what protection costs in the steady state). The ratio is protected ÷
//!    unprotected. The guest's clock (kvmclock) keeps running while it is paused, so
//!    pauses count against it. The same again for a mixed load: `compute=N` rounds of
//!    computation before each write (`--compute`, 10,000: ~1,000 pages an epoch of 25 ms
//!    over a 16 MiB working set), the kind of load the progress target is for.
//! 3. Pre-copy and dirty storms (`--sync on`, the default): a 2 GiB guest that is almost
//!    all zeros (how fast each side takes the memory in), and a 1 GiB guest whose two
//!    vCPUs rewrite 512 MiB as fast as they can (pre-copy cannot converge without
//!    throttling the guest; then every epoch is capped and the guest held while the backup
//!    catches up): time to protection, the throttle, pauses and holds, and whether the run
//!    ended when `--seconds` said.
//!
//! The `lockstep` binary is `LOCKSTEP_BIN`, or built (`cargo build -p lockstep --bin
//! lockstep`, a no-op when up to date) into the target directory and profile of this
//! benchmark. A failed run is a row saying why; the benchmark then exits non-zero.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::args::Args;
use crate::runs::{protected, protected_with, unprotected, work_dir, Output, GRACE};
use crate::BenchError;

pub const OPTIONS: &[&str] = &[
    "seconds",
    "intervals",
    "pages",
    "mem",
    "wss",
    "sync",
    "compute",
];

/// The working set of the mixed workload (`compute=`): 4,096 pages.
pub(crate) const MIXED_WSS: &str = "16M";

const PAGE_SIZE: u64 = 4096;
/// The protected progress runs get this much longer than `--seconds`: `--seconds` counts
/// from the guest's start, pre-copy included.
const PRECOPY_ALLOWANCE: f64 = 2.0;

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
    sync: bool,
    /// `compute=` of the mixed progress runs (0: none).
    compute: u64,
}

impl Config {
    fn from(args: &Args) -> Result<Config, BenchError> {
        let mem = args.get("mem").unwrap_or("256M").to_string();
        let wss = args.get("wss").unwrap_or("128M").to_string();
        let compute = args.number("compute", 10_000, 0)?;
        check_sizes(&mem, &wss, compute)?;
        Ok(Config {
            seconds: args.number("seconds", 3.0, 0.5)?,
            intervals: list(args, "intervals", &[5, 25])?,
            pages: list(args, "pages", &[100, 1_000, 10_000])?,
            mem,
            wss,
            compute,
            sync: match args.get("sync").unwrap_or("on") {
                "on" => true,
                "off" => false,
                other => {
                    return Err(BenchError::Usage(format!(
                        "--sync {other}: expected on or off"
                    )))
                }
            },
        })
    }
}

/// Checks `--mem` and `--wss` before anything runs, as `lockstep` reads `--mem` (a size
/// with an optional K, M or G suffix that the guest layout and this host can hold): the
/// working set must be at least a page and fit in the guest, and so must the mixed
/// progress rows' (unless `--compute 0`).
fn check_sizes(mem: &str, wss: &str, compute: u64) -> Result<(), BenchError> {
    let usage = |m: String| BenchError::Usage(m);
    let mem_bytes = engine::size::parse_size(mem).map_err(|e| usage(format!("--mem: {e}")))?;
    engine::vstate::memory::validate_size(mem_bytes).map_err(|e| usage(e.to_string()))?;
    let wss_bytes = engine::size::parse_size(wss).map_err(|e| usage(format!("--wss: {e}")))?;
    if wss_bytes < PAGE_SIZE {
        return Err(usage(format!("--wss {wss}: less than one 4K page")));
    }
    if wss_bytes > mem_bytes {
        return Err(usage(format!(
            "--wss {wss}: larger than the guest's memory (--mem {mem})"
        )));
    }
    let mixed = engine::size::parse_size(MIXED_WSS).unwrap_or(0);
    if compute > 0 && mixed > mem_bytes {
        return Err(usage(format!(
            "--mem {mem}: smaller than the {MIXED_WSS} working set of the mixed progress rows \
             (give a larger --mem, or --compute 0)"
        )));
    }
    Ok(())
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
    let result = run_all(args);
    remove_work_dir();
    result
}

/// Removes the work directory of the runs' process output.
pub(crate) fn remove_work_dir() {
    if let Ok(dir) = work_dir() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn run_all(args: &Args) -> Result<(), BenchError> {
    let cfg = Config::from(args)?;
    let bin = harness::try_lockstep_bin().map_err(CheckpointError::Build)?;
    let mut failed = 0;
    let mut total = 0;

    let mut epochs = Vec::new();
    for &interval in &cfg.intervals {
        for &pages in &cfg.pages {
            eprintln!(
                "bench checkpoint: {interval} ms epochs, {pages} pages/epoch target \
                 (pages_per_ms={}), {} s...",
                pages_per_ms(pages, interval),
                cfg.seconds
            );
            let run = EpochRun {
                mem: &cfg.mem,
                wss: &cfg.wss,
                interval,
                pages,
                seconds: cfg.seconds,
            };
            let result = run.measure(bin, &[]);
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
    let mut workloads = vec![("writes only", format!("wss={}", cfg.wss))];
    if cfg.compute > 0 {
        workloads.push(("mixed", mixed_args(cfg.compute)));
    }
    for (kind, args) in &workloads {
        for &interval in &cfg.intervals {
            let row = progress_row(bin, &cfg.mem, cfg.seconds, kind, args, interval);
            total += 2;
            failed += usize::from(row.unprotected.is_err()) + usize::from(row.protected.is_err());
            progress.push(row);
        }
    }

    let mut storms = Vec::new();
    if cfg.sync {
        for storm in STORMS {
            eprintln!(
                "bench checkpoint: pre-copy, {} guest, {} vCPUs, {} for {} s...",
                storm.mem, storm.vcpus, storm.guest, storm.seconds
            );
            let started = Instant::now();
            let result = protected(bin, storm.mem, storm.vcpus, 25, storm.guest, storm.seconds)
                .map(|(p, b)| StormRun::parse(storm, &p, &b, started.elapsed()));
            total += 1;
            failed += usize::from(result.is_err());
            storms.push((storm, result));
        }
    }

    print_epochs(&cfg, &epochs);
    print_progress(&cfg, &progress);
    if cfg.sync {
        print_storms(&storms);
    }
    if failed > 0 {
        return Err(CheckpointError::RunsFailed { failed, total }.into());
    }
    Ok(())
}

/// `pages_per_ms=` of the built-in guest's `dirty` workload for a target of `pages` dirty
/// pages per epoch of `interval` ms (at least 1).
pub(crate) fn pages_per_ms(pages: u64, interval: u64) -> u64 {
    ((pages + interval / 2) / interval).max(1)
}

/// One run of epoch figures: a pair over loopback, 1 vCPU, the built-in guest dirtying
/// `pages` pages per epoch of `interval` ms in `wss`, for `seconds` of epochs.
pub(crate) struct EpochRun<'a> {
    pub(crate) mem: &'a str,
    pub(crate) wss: &'a str,
    pub(crate) interval: u64,
    pub(crate) pages: u64,
    pub(crate) seconds: f64,
}

impl EpochRun<'_> {
    /// Runs the pair (the primary given `extra` options besides) and returns the
    /// primary's summary.
    pub(crate) fn measure(&self, bin: &std::path::Path, extra: &[&str]) -> Result<Summary, String> {
        let guest = format!(
            "workload=dirty pages_per_ms={} wss={} seconds={}",
            pages_per_ms(self.pages, self.interval),
            self.wss,
            self.seconds.ceil() as u64 + GRACE.as_secs()
        );
        let (p, _) = protected_with(
            bin,
            self.mem,
            "1",
            self.interval,
            &guest,
            self.seconds,
            extra,
        )?;
        Summary::parse(&p.stderr)
            .ok_or_else(|| format!("no summary line from the primary:\n{}", p.stderr))
    }
}

/// The primary's end-of-run summary (see `engine::replication::stats`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Summary {
    pub(crate) epochs: u64,
    pub(crate) pause_p50: u64,
    pub(crate) pause_p99: u64,
    pub(crate) pause_max: u64,
    pub(crate) commit_p50: u64,
    pub(crate) commit_p99: u64,
    pub(crate) dirty_pages: u64,
    pub(crate) wire_bytes: u64,
    pub(crate) throttled: u64,
    /// The longest the guest was held at once for the backup (µs), and how many epochs
    /// ended early at the page cap (absent from older primaries).
    pub(crate) held_max: Option<u64>,
    pub(crate) capped: Option<u64>,
    /// Seconds of continuous epochs (after the pre-copy).
    pub(crate) epoch_secs: Option<f64>,
    /// p50 of the pause's cumulative steps (µs): parked, captured, harvested, copied.
    pub(crate) steps: Option<[u64; 4]>,
}

impl Summary {
    /// Finds and parses the last line `... epochs=N pause_us p50=.. p99=.. max=..
    /// commit_us p50=.. p99=.. dirty_pages=.. wire_bytes=.. ... throttled=.. [held_us
    /// max=.. capped=..]` in `log` (the primary also logs the figures so far every 2 s).
    pub(crate) fn parse(log: &str) -> Option<Summary> {
        let line = log
            .lines()
            .rev()
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
            held_max: get("held_us.max"),
            capped: get("capped"),
            epoch_secs: match (
                log_secs(log, "initial sync done"),
                log_secs(line, "epochs="),
            ) {
                (Some(a), Some(b)) if b > a => Some(b - a),
                _ => None,
            },
            steps: steps(log),
        })
    }

    /// Seconds of epochs: measured from the log, else what the run was asked for.
    fn secs(&self, asked: f64) -> f64 {
        self.epoch_secs.unwrap_or(asked)
    }

    fn steps_cell(&self) -> String {
        self.steps.map_or("-".into(), |s| {
            format!("{} / {} / {} / {}", s[0], s[1], s[2], s[3])
        })
    }

    pub(crate) fn pages_per_epoch(&self) -> f64 {
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
pub(crate) type Rate = f64;

/// Guest progress unprotected and protected, one workload and interval.
pub(crate) struct ProgressRow {
    /// "writes only" or "mixed".
    pub(crate) kind: &'static str,
    /// The workload's arguments besides `pages_per_ms=0` and `seconds=`.
    pub(crate) guest: String,
    pub(crate) interval: u64,
    pub(crate) unprotected: Result<Rate, String>,
    /// With the primary's summary when it logged one.
    pub(crate) protected: Result<(Rate, Option<Summary>), String>,
}

/// The arguments of the mixed progress workload (besides `pages_per_ms=0` and
/// `seconds=`): `compute` rounds of computation before each write over [`MIXED_WSS`].
pub(crate) fn mixed_args(compute: u64) -> String {
    format!("wss={MIXED_WSS} compute={compute}")
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
        "held max µs",
        "capped",
    ];
    println!("| {} |", header.join(" | "));
    println!("|{}", " ---: |".repeat(header.len()));
    for r in rows {
        let cells = match &r.result {
            Ok(s) => vec![
                format!("{:.0}", s.pages_per_epoch()),
                s.epochs.to_string(),
                format!(
                    "{:.1}",
                    s.secs(cfg.seconds) * 1000.0 / s.epochs.max(1) as f64
                ),
                s.pause_p50.to_string(),
                s.pause_p99.to_string(),
                s.pause_max.to_string(),
                s.steps_cell(),
                s.commit_p50.to_string(),
                s.commit_p99.to_string(),
                format!("{:.0}", s.bytes_per_page()),
                format!(
                    "{:.1}",
                    mib((s.dirty_pages * PAGE_SIZE) as f64) / s.secs(cfg.seconds)
                ),
                format!("{:.2}", mib(s.wire_bytes as f64) / s.secs(cfg.seconds)),
                s.throttled.to_string(),
                opt(s.held_max),
                opt(s.capped),
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
         load asked of it. throttled: epochs that waited for the backup (window full or the \
         last epoch still being sent) once the guest had dirtied --max-epoch-pages (4096); \
         held max: the longest the guest was held for it at once. capped: epochs ended \
         early because the dirty set reached the cap, which bounds the pause."
    );
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// One progress row: `workload=dirty pages_per_ms=0 <args>` in a `mem` guest, unprotected
/// for `seconds`, then protected at `interval` ms.
pub(crate) fn progress_row(
    bin: &std::path::Path,
    mem: &str,
    seconds: f64,
    kind: &'static str,
    args: &str,
    interval: u64,
) -> ProgressRow {
    let guest = |seconds: u64| format!("workload=dirty pages_per_ms=0 {args} seconds={seconds}");
    let short = guest(seconds.ceil() as u64);
    eprintln!("bench checkpoint: guest progress, unprotected ({short})...");
    let unprotected = unprotected(bin, mem, seconds, &short).and_then(|out| rate_of(&out, 0));
    eprintln!("bench checkpoint: guest progress, {kind}, protected at {interval} ms...");
    let long = guest(seconds.ceil() as u64 + GRACE.as_secs());
    let seconds = seconds + PRECOPY_ALLOWANCE;
    let protected = protected(bin, mem, "1", interval, &long, seconds).and_then(|(p, _)| {
        let synced = sync_end_ms(&p.stderr).ok_or_else(|| {
            format!(
                "no 'initial sync done' line from the primary:\n{}",
                p.stderr
            )
        })?;
        let rate = rate_of(&p.stdout, synced)?;
        Ok((rate, Summary::parse(&p.stderr)))
    });
    ProgressRow {
        kind,
        guest: args.to_string(),
        interval,
        unprotected,
        protected,
    }
}

fn print_progress(cfg: &Config, rows: &[ProgressRow]) {
    println!(
        "\nGuest progress under protection: `workload=dirty pages_per_ms=0` (as fast as it \
         can), {} s, {} guest, 1 vCPU\n",
        cfg.seconds, cfg.mem
    );
    println!(
        "| workload | guest | interval | unprotected pages/s | protected pages/s | \
         protected ÷ unprotected | pages/epoch | pause p50 µs | pause p99 µs |"
    );
    println!("| --- | --- |{}", " ---: |".repeat(7));
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
            "| {} | `{}` | {} ms | {} | {} | {ratio} | {per_epoch} | {p50} | {p99} |",
            r.kind,
            r.guest,
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
         and the pauses stop the guest. \"writes only\" does nothing but write; \"mixed\" \
         computes before each write (`compute=`, about 1 ns a round), as a service does \
         between the writes of its requests: the target, a ratio of at least 0.9 at 25 ms, \
         is for such loads."
    );
}

/// A pre-copy / dirty-storm row: a guest and how long to protect it.
struct Storm {
    what: &'static str,
    mem: &'static str,
    vcpus: &'static str,
    guest: &'static str,
    seconds: f64,
}

const STORMS: &[Storm] = &[
    Storm {
        what: "2 GiB, almost all zero",
        mem: "2G",
        vcpus: "1",
        guest: "workload=dirty pages_per_ms=1 wss=16M seconds=60",
        seconds: 3.0,
    },
    Storm {
        what: "1 GiB, 2 vCPUs rewriting 512 MiB flat out",
        mem: "1G",
        vcpus: "2",
        guest: "workload=dirty pages_per_ms=0 wss=512M seconds=60",
        seconds: 6.0,
    },
];

/// What a storm run showed.
struct StormRun {
    /// Seconds until the primary's pre-copy ended, and its rounds.
    precopy: Option<f64>,
    rounds: usize,
    held_pct: Option<u64>,
    /// Guest memory MiB/s of round 0 on the primary (sent) and on the backup (taken in).
    primary_mibs: Option<f64>,
    backup_mibs: Option<f64>,
    /// Seconds from the backup's start of replication to epoch 1 committed.
    protected_at: Option<f64>,
    summary: Option<Summary>,
    wall: Duration,
}

impl StormRun {
    fn parse(storm: &Storm, primary: &Output, backup: &Output, wall: Duration) -> StormRun {
        let (p, b) = (&primary.stderr, &backup.stderr);
        let mem_mib = engine::size::parse_size(storm.mem).unwrap_or(0) >> 20;
        let round0 = format!("round 0: {mem_mib} of {mem_mib} MiB");
        let received = format!("initial sync: {mem_mib} of {mem_mib} MiB received");
        let rate = |start: Option<f64>, end: Option<f64>| match (start, end) {
            (Some(a), Some(e)) if e > a => Some(mem_mib as f64 / (e - a)),
            _ => None,
        };
        let b_start = log_secs(b, "replicating from");
        StormRun {
            precopy: after_number(p, "initial sync done in "),
            rounds: p
                .lines()
                .filter(|l| l.contains("initial sync round"))
                .filter(|l| l.contains(" done"))
                .count()
                + 1,
            held_pct: after_number(p, "guest held up to ").map(|v| v as u64),
            primary_mibs: rate(log_secs(p, "accepted the guest"), log_secs(p, &round0)),
            backup_mibs: rate(b_start, log_secs(b, &received)),
            protected_at: match (b_start, log_secs(b, "epoch 1 committed")) {
                (Some(a), Some(e)) => Some(e - a),
                _ => None,
            },
            summary: Summary::parse(p),
            wall,
        }
    }
}

fn print_storms(rows: &[(&Storm, Result<StormRun, String>)]) {
    println!(
        "\nPre-copy and dirty storms: primary and backup over loopback, 25 ms epochs, \
         default heartbeat timeout (1 s) and epoch cap (4096 pages)\n"
    );
    let header = [
        "guest",
        "--seconds",
        "run s",
        "pre-copy s",
        "rounds",
        "held up to %",
        "primary MiB/s",
        "backup MiB/s",
        "epoch 1 at s",
        "epochs",
        "pages/epoch",
        "pause p99 µs",
        "pause max µs",
        "held max µs",
    ];
    println!("| {} |", header.join(" | "));
    println!("|{}", " ---: |".repeat(header.len()));
    let f = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    for (storm, r) in rows {
        let cells = match r {
            Ok(r) => {
                let s = r.summary.as_ref();
                vec![
                    format!("{:.1}", r.wall.as_secs_f64()),
                    f(r.precopy, 2),
                    r.rounds.to_string(),
                    opt(r.held_pct),
                    f(r.primary_mibs, 0),
                    f(r.backup_mibs, 0),
                    f(r.protected_at, 2),
                    opt(s.map(|s| s.epochs)),
                    f(s.map(|s| s.pages_per_epoch()), 0),
                    opt(s.map(|s| s.pause_p99)),
                    opt(s.map(|s| s.pause_max)),
                    opt(s.and_then(|s| s.held_max)),
                ]
            }
            Err(e) => vec![format!("failed: {}", first_line(e))],
        };
        println!(
            "| {} | {} | {} |",
            storm.what,
            storm.seconds,
            cells.join(" | ")
        );
    }
    println!(
        "\nrun s: the primary's wall time (it ends --seconds after the guest started, then \
         waits for the backup's last ack). pre-copy: until the primary's initial sync ended, \
         in rounds; held up to: the largest share of time the pre-copy held the vCPUs \
         (auto-converge; 100 = the last round went with the guest paused). primary / \
         backup MiB/s: guest memory per second in round 0 (the whole RAM), sent and taken \
         in. epoch 1 at: when the backup first held a runnable copy. pause: checkpoint \
         pauses of the continuous epochs; held: the longest the guest was held at once \
         while the backup caught up."
    );
}

/// The number right after `needle` in the first line that has it.
pub(crate) fn after_number(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let rest = &line[line.find(needle)? + needle.len()..];
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

/// The log-clock time (`[role  12.345s ...]`) of the first line containing `needle`.
pub(crate) fn log_secs(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let stamp = line.strip_prefix('[')?.split_whitespace().nth(1)?;
    stamp.strip_suffix('s')?.parse().ok()
}

pub(crate) fn first_line(s: &str) -> &str {
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
    // Reports after the workload's end (`seconds=`) repeat its last count: they are not
    // seconds the guest made no progress in.
    let mut points = points;
    while points.len() > 2 && points[points.len() - 1].1 == points[points.len() - 2].1 {
        points.pop();
    }
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
    log_secs(log, "initial sync done").map(|secs| (secs * 1000.0).ceil() as u64)
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
                held_max: None,
                capped: None,
                epoch_secs: None,
                steps: None,
            }
        );
        // Today's primary: figures every 2 s, the last line counts; held and capped.
        let today = "\
[primary    0.500s info] initial sync done in 0.49 s (1200 MiB/s of guest memory)
[primary    2.500s info] epochs=60 pause_us p50=1 p99=2 max=3 commit_us p50=4 p99=5 \
dirty_pages=6 wire_bytes=7 bytes_per_dirty_page=1 compression=1.00x throttled=8 \
held_us max=9 capped=10
[primary    4.500s info] epochs=103 pause_us p50=2211 p99=6194 max=6439 commit_us p50=9855 \
p99=61121 dirty_pages=118759 wire_bytes=3815294 bytes_per_dirty_page=32 compression=127.50x \
throttled=2 held_us max=45642 capped=5
";
        let t = Summary::parse(today).unwrap();
        assert_eq!((t.epochs, t.pause_max, t.throttled), (103, 6439, 2));
        assert_eq!((t.held_max, t.capped), (Some(45642), Some(5)));
        assert_eq!(t.epoch_secs, Some(4.0));
        assert_eq!(t.secs(3.0), 4.0);
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
    fn sizes_are_checked_up_front() {
        let config = |v: &[&str]| {
            let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            Config::from(&Args::parse("checkpoint", &v, OPTIONS, &[]).unwrap())
        };
        let usage = |v: &[&str]| match config(v) {
            Err(BenchError::Usage(m)) => {
                assert!(!m.contains('\n'), "{m}");
                m
            }
            Err(e) => panic!("not a usage error: {e}"),
            Ok(_) => panic!("accepted {v:?}"),
        };
        let c = config(&[]).unwrap();
        assert_eq!((c.mem.as_str(), c.wss.as_str()), ("256M", "128M"));
        assert!(config(&["--mem", "1G", "--wss", "1G"]).is_ok());
        assert!(config(&["--mem", "512m", "--wss", "64M"]).is_ok());
        assert!(usage(&["--mem", "12X"]).contains("invalid size '12X'"));
        assert!(usage(&["--mem", "lots"]).starts_with("--mem"));
        assert!(usage(&["--wss", "big"]).contains("--wss: invalid size 'big'"));
        assert!(usage(&["--wss", "0"]).contains("less than one 4K page"));
        let m = usage(&["--mem", "256M", "--wss", "512M"]);
        assert!(m.contains("--wss 512M") && m.contains("--mem 256M"), "{m}");
        assert!(usage(&["--mem", "1K"]).contains("at least"));
        assert!(usage(&["--mem", "64G"]).starts_with("--mem 64G"));
        let m = usage(&["--mem", "12M", "--wss", "8M"]);
        assert!(m.contains("mixed progress rows"), "{m}");
        assert!(config(&["--mem", "12M", "--wss", "8M", "--compute", "0"]).is_ok());
        // Through the subcommand: a usage error (exit status 2) before anything runs.
        let args: Vec<String> = ["--wss", "1G"].iter().map(|s| s.to_string()).collect();
        let e = run(&Args::parse("checkpoint", &args, OPTIONS, &[]).unwrap()).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
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
        // The workload ended before the last reports: they do not count as stalls.
        let ended = "dirty: ms=1000 pages=100\ndirty: ms=2000 pages=300\n\
                     dirty: ms=3000 pages=300\ndirty: ms=4000 pages=300";
        assert_eq!(rate_of(ended, 0).unwrap(), 200.0);
        // A guest that made no progress at all still says so.
        assert_eq!(
            rate_of("dirty: ms=1000 pages=7\ndirty: ms=2000 pages=7", 0).unwrap(),
            0.0
        );
    }

    #[test]
    fn storm_figures_from_both_logs() {
        let primary = Output {
            status: std::process::ExitStatus::default(),
            stdout: String::new(),
            stderr: "\
[primary    0.010s info] backup at 127.0.0.1:1 accepted the guest (1024 MiB, 2 vCPUs)
[primary    0.510s info] initial sync round 0: 1024 of 1024 MiB (100%), 2000 MiB/s
[primary    0.520s info] initial sync round 0 done: the guest dirtied 9999 pages meanwhile
[primary    0.600s info] initial sync done in 0.59 s (1700 MiB/s of guest memory, guest held up to 97% of the time); 12 pages
"
            .into(),
        };
        let backup = Output {
            status: std::process::ExitStatus::default(),
            stdout: String::new(),
            stderr: "\
[backup    1.000s info] replicating from 127.0.0.1:2: 1024 MiB, 2 vCPUs
[backup    1.512s info] initial sync: 1024 of 1024 MiB received
[backup    1.700s info] epoch 1 committed: the backup holds a runnable copy
"
            .into(),
        };
        let r = StormRun::parse(&STORMS[1], &primary, &backup, Duration::from_secs(6));
        assert_eq!(r.precopy, Some(0.59));
        assert_eq!(r.rounds, 2);
        assert_eq!(r.held_pct, Some(97));
        assert_eq!(r.primary_mibs.map(f64::round), Some(2048.0));
        assert_eq!(r.backup_mibs.map(f64::round), Some(2000.0));
        assert_eq!(r.protected_at.map(|s| (s * 10.0).round()), Some(7.0));
        assert!(r.summary.is_none());
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
