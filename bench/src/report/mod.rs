//! `bench report`: runs a suite of measurements and writes one self-contained HTML page
//! of plots and tables, `DIR/index.html`:
//!
//! 1. Epoch pauses by dirty rate: a pair over loopback per target dirty set (the built-in
//!    guest's `workload=dirty`, 25 ms epochs), the primary writing its figures with
//!    `--stats-json`; the CDF of the pause from its histogram, one line a rate.
//! 2. The pause against the dirty pages an epoch achieved: p50, p99 and the p50 of the
//!    pause's cumulative steps (parked, captured, harvested, copied), across those runs.
//! 3. Request latency of one client on one connection (`SET` and `GET` in turn) against
//!    the kv guest, unprotected and protected with early checkpoints, each request timed
//!    here; the CDFs, and what protection adds to p50 and p99.
//! 4. Failover: SIGKILLs of the primary under client load (`bench failover`'s trials);
//!    per trial, kill → detected → fenced → promoted → first reply on a ms axis.
//!
//! The full suite: six dirty rates (100 to 8,000 pages an epoch), 20 s of epochs each,
//! 20,000 requests per mode, 20 trials. `--quick` runs a subset: three rates, 8 s each,
//! 5,000 requests per mode, 6 trials. A part that fails
//! leaves its error in the page; the bench then exits non-zero.

mod html;
mod plot;
mod stats_json;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use harness::{Kv, Loss, Netns, Reply};

use crate::args::Args;
use crate::checkpoint::{pages_per_ms, EpochRun, Summary as EpochSummary};
use crate::failover::{self, Timeline};
use crate::net::{KvGuest, Mode};
use crate::stats::Summary;
use crate::BenchError;
use html::{Page, Section, Table};
use plot::Series;
use stats_json::Stats;

pub const OPTIONS: &[&str] = &["out"];
pub const FLAGS: &[&str] = &["quick"];

/// The epoch interval of the pause and latency runs (the default).
const INTERVAL_MS: u64 = 25;
const MEM: &str = "256M";
const WSS: &str = "128M";
/// Requests each client run makes before the timed ones (connection and caches warm).
const WARMUP: usize = 50;

/// What the suite runs.
struct Plan {
    quick: bool,
    /// Target dirty pages per epoch.
    rates: Vec<u64>,
    /// Seconds of epochs per rate.
    seconds: f64,
    /// Timed requests per latency mode.
    requests: usize,
    trials: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rates: vec![100, 1_000, 4_000],
                seconds: 8.0,
                requests: 5_000,
                trials: 6,
            }
        } else {
            Plan {
                quick,
                rates: vec![100, 300, 1_000, 2_000, 4_000, 8_000],
                seconds: 20.0,
                requests: 20_000,
                trials: 20,
            }
        }
    }

    fn scope(&self) -> String {
        format!(
            "Dirty rates of {} pages per {INTERVAL_MS} ms epoch, {} s of epochs each; {} timed \
             requests per latency mode; {} failover trials.",
            self.rates
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.seconds,
            self.requests,
            self.trials
        )
    }
}

pub fn run(args: &Args) -> Result<(), BenchError> {
    let out = args.get("out").ok_or_else(|| {
        BenchError::Usage("bench report needs --out DIR (where index.html goes)".into())
    })?;
    let plan = Plan::new(args.flag("quick"));
    let out = prepare_out(Path::new(out)).map_err(BenchError::Failed)?;
    let command = command_line(&std::env::args().skip(1).collect::<Vec<_>>());
    let machine = machine();
    let bin = harness::try_lockstep_bin().map_err(BenchError::Failed)?;
    let began = Instant::now();
    let work = std::env::temp_dir().join(format!("lockstep-bench-report-{}", std::process::id()));
    std::fs::create_dir_all(&work)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", work.display())))?;

    let pauses = pause_runs(bin, &work, &plan);
    crate::checkpoint::remove_work_dir();
    let latency = latency_runs(bin, &work, &plan);
    let failover = failover_runs(bin, &work, &plan);
    let _ = std::fs::remove_dir_all(&work);

    let failed = pauses.iter().filter(|p| p.summary.is_err()).count()
        + usize::from(latency.iter().any(|(_, r)| r.is_err()) || latency.is_empty())
        + usize::from(failover.is_err());
    let mut machine = machine;
    machine.push((
        "suite run time".into(),
        format!("{:.0} s", began.elapsed().as_secs_f64()),
    ));
    let page = Page {
        title: "lockstep bench report".into(),
        quick: plan.quick,
        scope: plan.scope(),
        command,
        machine,
        sections: vec![
            pause_cdf_section(&plan, &pauses),
            pause_pages_section(&pauses),
            latency_section(&plan, &latency),
            failover_section(&plan, &failover),
        ],
    };
    let html = html::render(&page);
    let path = out.join("index.html");
    write_atomically(&path, html.as_bytes()).map_err(BenchError::Failed)?;
    eprintln!(
        "bench report: wrote {} ({} KiB) after {:.0} s",
        path.display(),
        html.len().div_ceil(1024),
        began.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(BenchError::Failed(format!(
            "{failed} part(s) of the suite failed; {} says which",
            path.display()
        )));
    }
    Ok(())
}

/// Creates `dir` if need be (its parent must exist) and checks that a file can be written
/// in it, before the suite runs for minutes.
fn prepare_out(dir: &Path) -> Result<PathBuf, String> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(format!(
            "--out {}: {} is not a directory",
            dir.display(),
            parent.display()
        ));
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(format!("--out {}: {e}", dir.display())),
    }
    let probe = dir.join(format!(".bench-report-{}", std::process::id()));
    std::fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"probe"))
        .map_err(|e| format!("--out {}: cannot write there: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(dir.to_path_buf())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("html.tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// How to run this again: the arguments after the program, as `cargo run` takes them.
fn command_line(args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=./,:+@".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect();
    format!("cargo run --release -p bench -- {}", quoted.join(" "))
}

// ---------------------------------------------------------------------------------------
// 1 and 2: pauses by dirty rate

struct PauseRun {
    /// Target dirty pages per epoch.
    target: u64,
    /// The primary's log summary.
    summary: Result<EpochSummary, String>,
    /// Its `--stats-json` file.
    stats: Result<Stats, String>,
}

/// A run's pause figures: achieved pages per epoch, p50, p99 and max pause (µs), the
/// steps' p50s (µs).
struct PauseFigures {
    pages: f64,
    p50: u64,
    p99: u64,
    max: u64,
    steps: Option<[u64; 4]>,
}

impl PauseRun {
    /// The run's figures: from the histograms, else from the log's summary.
    fn figures(&self) -> Option<PauseFigures> {
        match (&self.stats, &self.summary) {
            (Ok(s), _) => Some(PauseFigures {
                pages: s.pages.mean(),
                p50: s.pause_us.p50,
                p99: s.pause_us.p99,
                max: s.pause_us.max,
                steps: Some(s.steps_p50()),
            }),
            (Err(_), Ok(s)) => Some(PauseFigures {
                pages: s.pages_per_epoch(),
                p50: s.pause_p50,
                p99: s.pause_p99,
                max: s.pause_max,
                steps: s.steps,
            }),
            (Err(_), Err(_)) => None,
        }
    }
}

fn pause_runs(bin: &Path, work: &Path, plan: &Plan) -> Vec<PauseRun> {
    let n = plan.rates.len();
    plan.rates
        .iter()
        .enumerate()
        .map(|(i, &target)| {
            eprintln!(
                "bench report: [pauses {}/{n}] {target} pages per {INTERVAL_MS} ms epoch \
                 (pages_per_ms={}), {} s of epochs...",
                i + 1,
                pages_per_ms(target, INTERVAL_MS),
                plan.seconds
            );
            let file = work.join(format!("stats-{target}.json"));
            let _ = std::fs::remove_file(&file);
            let file_arg = file.display().to_string();
            let run = EpochRun {
                mem: MEM,
                wss: WSS,
                interval: INTERVAL_MS,
                pages: target,
                seconds: plan.seconds,
            };
            let summary = run.measure(bin, &["--stats-json", &file_arg]);
            let stats = std::fs::read_to_string(&file)
                .map_err(|e| format!("{}: {e}", file.display()))
                .and_then(|t| Stats::parse(&t).map_err(|e| format!("{}: {e}", file.display())));
            match (&summary, &stats) {
                (Err(e), _) => eprintln!("bench report: [pauses {}/{n}] failed: {}", i + 1, first_line(e)),
                (Ok(_), Err(e)) => eprintln!("bench report: [pauses {}/{n}] no histograms: {e}", i + 1),
                (Ok(s), Ok(st)) => eprintln!(
                    "bench report: [pauses {}/{n}] {} epochs, {:.0} pages an epoch, pause p50 {} µs, p99 {} µs",
                    i + 1,
                    st.epochs,
                    s.pages_per_epoch(),
                    st.pause_us.p50,
                    st.pause_us.p99
                ),
            }
            PauseRun {
                target,
                summary,
                stats,
            }
        })
        .collect()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn pause_cdf_section(plan: &Plan, runs: &[PauseRun]) -> Section {
    let series: Vec<Series> = runs
        .iter()
        .filter_map(|r| {
            let s = r.stats.as_ref().ok()?;
            let steps: Vec<(f64, f64)> = s
                .pause_us
                .cdf_steps()
                .into_iter()
                .map(|(x, y)| (x / 1000.0, y))
                .collect();
            let start = s.pause_us.buckets.first()?.0 as f64 / 1000.0;
            Some(Series {
                name: format!("{} pages/epoch (achieved {:.0})", r.target, s.pages.mean()),
                points: plot::staircase(start, &steps),
            })
        })
        .collect();
    let plot = if series.is_empty() {
        Err(runs
            .iter()
            .find_map(|r| r.stats.as_ref().err().or(r.summary.as_ref().err()))
            .map_or("no run".to_string(), |e| first_line(e).to_string()))
    } else {
        plot::cdf(
            "Epoch pause by dirty rate",
            "pause per epoch (ms, log scale)",
            &series,
            true,
        )
    };
    let mut t = Table::new(
        "Pause per epoch (ms) by target dirty pages per epoch",
        &[
            "target pages/epoch",
            "achieved pages/epoch",
            "epochs",
            "p50",
            "p99",
            "max",
            "commit p50",
            "commit p99",
            "capped epochs",
        ],
    );
    for r in runs {
        let mut row = vec![r.target.to_string()];
        match (&r.stats, &r.summary) {
            (Ok(s), _) => row.extend([
                format!("{:.0}", s.pages.mean()),
                s.epochs.to_string(),
                ms(s.pause_us.p50),
                ms(s.pause_us.p99),
                ms(s.pause_us.max),
                ms(s.commit_us.p50),
                ms(s.commit_us.p99),
                s.capped.to_string(),
            ]),
            (Err(e), Ok(s)) => {
                row.extend([
                    format!("{:.0}", s.pages_per_epoch()),
                    s.epochs.to_string(),
                    ms(s.pause_p50),
                    ms(s.pause_p99),
                    ms(s.pause_max),
                    ms(s.commit_p50),
                    ms(s.commit_p99),
                    s.capped.map_or("-".into(), |c| c.to_string()),
                ]);
                row[0] = format!("{} (no histogram: {})", r.target, first_line(e));
            }
            (Err(_), Err(e)) => row.push(format!("failed: {}", first_line(e))),
        }
        t.row(row);
    }
    Section {
        id: "pause-cdf".into(),
        heading: "Epoch pause by dirty rate".into(),
        intro: format!(
            "A primary and a backup over loopback (clear link), 1 vCPU, {MEM} guest, \
             {INTERVAL_MS} ms epochs; the built-in guest writes pages of a {WSS} working set \
             at a rate that dirties the target number of pages per epoch. Each line is the \
             CDF of the pause per epoch (from the pause request until the guest runs again) \
             over {} s of epochs, from the primary's histogram (--stats-json).",
            plan.seconds
        ),
        plot: Some(plot),
        tables: vec![t],
        note: "The histogram's buckets hold a range of values each: the CDF steps up at the \
               upper end of each bucket, so it lies at most a bucket to the right of the exact \
               one. Achieved pages: the mean dirty pages per epoch; an epoch ends early when \
               the guest dirties --max-epoch-pages (4096) pages (capped). commit: from the \
               pause until the backup's ack."
            .into(),
    }
}

fn pause_pages_section(runs: &[PauseRun]) -> Section {
    let figures: Vec<(u64, PauseFigures)> = runs
        .iter()
        .filter_map(|r| Some((r.target, r.figures()?)))
        .collect();
    let line = |name: &str, f: &dyn Fn(&PauseFigures) -> Option<u64>| Series {
        name: name.to_string(),
        points: figures
            .iter()
            .filter_map(|(_, fig)| Some((fig.pages, f(fig)? as f64 / 1000.0)))
            .collect(),
    };
    let mut series = vec![
        line("pause p99", &|f| Some(f.p99)),
        line("pause p50", &|f| Some(f.p50)),
    ];
    for (i, step) in ["copied", "harvested", "captured", "parked"]
        .iter()
        .enumerate()
    {
        let s = line(&format!("{step} (p50, cumulative)"), &|f| {
            f.steps.map(|s| s[3 - i])
        });
        if !s.points.is_empty() {
            series.push(s);
        }
    }
    let plot = if figures.is_empty() {
        Err("no run gave figures".to_string())
    } else {
        plot::lines(
            "Pause against dirty pages per epoch",
            "dirty pages per epoch (achieved mean)",
            "ms (log scale)",
            &series,
            true,
        )
    };
    let mut t = Table::new(
        "Pause (ms) and its steps' p50 (cumulative from the pause request, ms)",
        &[
            "target pages/epoch",
            "achieved pages/epoch",
            "pause p50",
            "pause p99",
            "pause max",
            "parked",
            "captured",
            "harvested",
            "copied",
        ],
    );
    for (target, f) in &figures {
        let step = |i: usize| f.steps.map_or("-".into(), |s| ms(s[i]));
        t.row(vec![
            target.to_string(),
            format!("{:.0}", f.pages),
            ms(f.p50),
            ms(f.p99),
            ms(f.max),
            step(0),
            step(1),
            step(2),
            step(3),
        ]);
    }
    Section {
        id: "pause-pages".into(),
        heading: "Pause against dirty pages".into(),
        intro: "The same runs: the pause's p50 and p99 against the dirty pages an epoch \
                achieved, and where the typical pause goes: the p50 of the time from the pause \
                request until every vCPU parked, until the vCPU and device state was captured, \
                until the dirty set was harvested, until the dirty pages were copied."
            .into(),
        plot: Some(plot),
        tables: vec![t],
        note: "The steps are cumulative: each includes the ones before it, and the pause p50 \
               adds resuming the vCPUs. Pages copied during the pause are those the guest \
               wrote again after the epoch's early copy (pre-copy inside the epoch), which is \
               why the copy grows more slowly than the dirty set."
            .into(),
    }
}

// ---------------------------------------------------------------------------------------
// 3: request latency, one client

type Latency = Vec<(Mode, Result<Vec<Duration>, String>)>;

fn latency_runs(bin: &Path, work: &Path, plan: &Plan) -> Latency {
    let ns = match Netns::create("lsbrep") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("bench report: [latency] no network namespace: {e}");
            return vec![(Mode::Unprotected, Err(e))];
        }
    };
    let modes = [Mode::Unprotected, Mode::Early];
    let mut out = Vec::new();
    for (i, mode) in modes.into_iter().enumerate() {
        eprintln!(
            "bench report: [latency {}/{}] {}: {} requests on one connection...",
            i + 1,
            modes.len(),
            mode.name(),
            plan.requests
        );
        let result = KvGuest::start(&ns, bin, work, mode, INTERVAL_MS, None).and_then(|kv| {
            let r = one_client(&ns, plan.requests);
            kv.stop();
            r
        });
        match &result {
            Ok(s) => {
                if let Some(s) = Summary::of(s) {
                    eprintln!(
                        "bench report: [latency {}/{}] p50 {:.3} ms, p99 {:.3} ms",
                        i + 1,
                        modes.len(),
                        s.p50.as_secs_f64() * 1e3,
                        s.p99.as_secs_f64() * 1e3
                    );
                }
            }
            Err(e) => eprintln!(
                "bench report: [latency {}/{}] failed: {}",
                i + 1,
                modes.len(),
                first_line(e)
            ),
        }
        out.push((mode, result));
    }
    out
}

/// `requests` requests, `SET` and `GET` of one key in turn, each timed from before its
/// send until its whole reply arrived, on one connection to the kv guest (after
/// [`WARMUP`] untimed ones).
fn one_client(ns: &Netns, requests: usize) -> Result<Vec<Duration>, String> {
    let stream: TcpStream = ns
        .connect(harness::trial::GUEST_ADDR, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to the kv guest: {e}"))?;
    let mut kv = Kv::new(stream, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let mut samples = Vec::with_capacity(requests);
    for i in 0..WARMUP + requests {
        let key = format!("k{}", i / 2);
        let t = Instant::now();
        let (reply, ok) = if i % 2 == 0 {
            let r = kv.call(&["SET", &key, "0123456789abcdef"]);
            let ok = matches!(&r, Ok(Reply::Simple(s)) if s == "OK");
            (r, ok)
        } else {
            let r = kv.call(&["GET", &key]);
            let ok = matches!(&r, Ok(Reply::Bulk(Some(v))) if v == b"0123456789abcdef");
            (r, ok)
        };
        let took = t.elapsed();
        if !ok {
            return Err(format!("request {i} ({key}): unexpected reply {reply:?}"));
        }
        if i >= WARMUP {
            samples.push(took);
        }
    }
    Ok(samples)
}

fn latency_section(plan: &Plan, runs: &Latency) -> Section {
    let to_ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let series: Vec<Series> = runs
        .iter()
        .filter_map(|(mode, r)| {
            let samples: Vec<f64> = r.as_ref().ok()?.iter().map(to_ms).collect();
            let steps = plot::sample_steps(&samples);
            Some(Series {
                name: mode.name().to_string(),
                points: plot::staircase(steps.first()?.0, &steps),
            })
        })
        .collect();
    let plot = if series.is_empty() {
        Err(runs
            .iter()
            .find_map(|(_, r)| r.as_ref().err())
            .map_or("no run".into(), |e| first_line(e).to_string()))
    } else {
        plot::cdf(
            "Request latency, one client, one connection",
            "request → reply (ms, log scale)",
            &series,
            true,
        )
    };
    let mut t = Table::new(
        "Request → reply (ms)",
        &[
            "mode",
            "requests",
            "min",
            "p50",
            "p99",
            "max",
            "p50 added",
            "p99 added",
        ],
    );
    let base = runs
        .iter()
        .find(|(m, _)| matches!(m, Mode::Unprotected))
        .and_then(|(_, r)| Summary::of(r.as_ref().ok()?));
    let f = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
    let added =
        |a: Duration, b: Duration| format!("{:+.3}", (a.as_secs_f64() - b.as_secs_f64()) * 1000.0);
    for (mode, r) in runs {
        match r.as_ref().map(|s| Summary::of(s)) {
            Ok(Some(s)) => t.row(vec![
                mode.name().to_string(),
                s.count.to_string(),
                f(s.min),
                f(s.p50),
                f(s.p99),
                f(s.max),
                base.map_or("-".into(), |b| added(s.p50, b.p50)),
                base.map_or("-".into(), |b| added(s.p99, b.p99)),
            ]),
            Ok(None) => t.row(vec![mode.name().to_string(), "0".into()]),
            Err(e) => t.row(vec![
                mode.name().to_string(),
                format!("failed: {}", first_line(e)),
            ]),
        }
    }
    Section {
        id: "latency".into(),
        heading: "Request latency, protected and unprotected".into(),
        intro: format!(
            "The kv guest (Redis protocol) in a network namespace, on a tap; one client, one TCP \
             connection, each request waiting for its reply: SET and GET of a 16-byte value in \
             turn, {} timed requests per mode after {WARMUP} untimed ones, each timed by the \
             bench from before its send until its whole reply arrived. Unprotected: lockstep \
             run. Protected: a primary and a backup over the namespace's loopback, \
             {INTERVAL_MS} ms epochs, early checkpoints (the default): a reply leaves once the \
             backup acknowledged the epoch that produced it.",
            plan.requests
        ),
        plot: Some(plot),
        tables: vec![t],
        note: "added: protected minus unprotected, what output commit adds to a request: about \
               one checkpoint pause plus one round trip to the backup."
            .into(),
    }
}

// ---------------------------------------------------------------------------------------
// 4: failover

fn failover_runs(
    bin: &Path,
    work: &Path,
    plan: &Plan,
) -> Result<(Vec<Timeline>, usize, usize), String> {
    eprintln!(
        "bench report: [failover] {} trials: SIGKILL of the primary under client load...",
        plan.trials
    );
    let ns = Netns::create("lsbrfo")?;
    let t = failover::run_trials(
        bin,
        &work.join("failover"),
        &failover::Plan::sigkill(plan.trials),
        &ns,
        Loss::Kill,
        0,
        "bench report: failover",
    )
    .inspect_err(|e| eprintln!("bench report: [failover] failed: {}", first_line(e)))?;
    let (broken, lost) = t.broken_and_lost();
    Ok((t.timelines(), broken, lost))
}

/// The timeline's stretches of a trial: each ends at a moment that trial has, and starts
/// at the last moment before it that the trial has (a moment measured before it, within
/// the events' ms resolution, counts as that one).
fn stretches(t: &Timeline) -> Vec<plot::Stretch> {
    let moments = [t.detected, t.fenced, t.promoted, t.first_reply];
    let mut from = 0.0;
    let mut out = Vec::new();
    for (kind, m) in moments.iter().enumerate() {
        if let Some(to) = *m {
            let to = to.max(from);
            out.push(plot::Stretch { from, to, kind });
            from = to;
        }
    }
    out
}

const STRETCHES: [&str; 4] = [
    "kill → detected",
    "detected → fenced",
    "fenced → promoted",
    "promoted → first reply",
];

fn failover_section(plan: &Plan, r: &Result<(Vec<Timeline>, usize, usize), String>) -> Section {
    let mut section = Section {
        id: "failover".into(),
        heading: "Failover timeline".into(),
        intro: format!(
            "{} trials of bench failover's SIGKILL scenario: a protected kv guest (mutual TLS \
             link, 25 ms epochs) in a network namespace, one client writing over one TCP \
             connection, the primary SIGKILLed during continuous epochs; the backup fences it \
             (scripts/fence-pidfile) and promotes on the same tap. Per trial: the kill, the \
             backup's role change to unprotected (detected), its fence agent done (fenced), \
             its promotion (the guest runs), and the client's first reply from the promoted \
             guest.",
            plan.trials
        ),
        note: "Times count from the moment the bench sent the SIGKILL. The backup's moments \
               are the times of its --events lines (whole ms, so up to a ms early). The backup \
               learns of the death when the primary's kernel closes its connections as the \
               process dies, a few ms after the signal and before the bench can reap it \
               (primary reaped: when the bench saw it gone, which is where bench failover's \
               kill → first reply counts from), not from a heartbeat timeout. The client's \
               wait beyond the promotion is mostly its own TCP retransmission of the request \
               the dead primary took but the backup never committed (200 ms at least on \
               Linux)."
            .into(),
        ..Section::default()
    };
    let (timelines, broken, lost) = match r {
        Ok(v) => v,
        Err(e) => {
            section.plot = Some(Err(first_line(e).to_string()));
            return section;
        }
    };
    let rows: Vec<Vec<plot::Stretch>> = timelines.iter().map(stretches).collect();
    section.plot = Some(plot::timeline(
        "Failover after a SIGKILL of the primary",
        "ms after the kill",
        "trial",
        &rows,
        &STRETCHES,
    ));
    let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    let mut per = Table::new(
        "Per trial, ms after the kill",
        &[
            "trial",
            "primary reaped",
            "detected",
            "fenced",
            "promoted",
            "first reply",
        ],
    );
    for (i, t) in timelines.iter().enumerate() {
        per.row(vec![
            (i + 1).to_string(),
            cell(t.reaped),
            cell(t.detected),
            cell(t.fenced),
            cell(t.promoted),
            cell(t.first_reply),
        ]);
    }
    let mut sum = Table::new(
        "Over the trials (ms)",
        &["figure", "n", "p50", "p99", "max"],
    );
    let durations = |f: &dyn Fn(&Timeline) -> Option<f64>| -> Vec<Duration> {
        timelines
            .iter()
            .filter_map(f)
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|v| Duration::from_secs_f64(v / 1000.0))
            .collect()
    };
    for (name, samples) in [
        ("kill → first reply", durations(&|t| t.first_reply)),
        ("kill → detected", durations(&|t| t.detected)),
        (
            "kill → promoted (the guest runs)",
            durations(&|t| t.promoted),
        ),
        (
            "detected → promoted",
            durations(&|t| Some(t.promoted? - t.detected?)),
        ),
    ] {
        let f = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        match Summary::of(&samples) {
            Some(s) => sum.row(vec![
                name.into(),
                s.count.to_string(),
                f(s.p50),
                f(s.p99),
                f(s.max),
            ]),
            None => sum.row(vec![
                name.into(),
                "0".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]),
        }
    }
    sum.row(vec![
        "trials whose client failed or saw no promoted reply".into(),
        broken.to_string(),
    ]);
    sum.row(vec!["acknowledged writes lost".into(), lost.to_string()]);
    section.tables = vec![sum, per];
    section
}

// ---------------------------------------------------------------------------------------
// The machine

fn machine() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "-".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or("-".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / (1u64 << 20) as f64)
        });
    let nproc = std::thread::available_parallelism().map_or("-".into(), |n| n.to_string());
    vec![
        ("date (UTC)".into(), utc(SystemTime::now())),
        ("git commit".into(), git_commit()),
        ("nproc".into(), nproc),
        ("CPU".into(), cpu),
        ("memory".into(), mem),
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_string(),
        ),
        (
            "load average at the start (1, 5, 15 min)".into(),
            read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ]
}

/// `git rev-parse --short HEAD` of the source tree, with a word when the tree has
/// uncommitted changes; "unknown" without git.
fn git_commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(c) if !c.is_empty() => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{c} (with uncommitted changes)"),
            _ => c,
        },
        _ => "unknown".into(),
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use stats_json::tests::stats_json;

    fn pause_runs() -> Vec<PauseRun> {
        let mk = |target: u64, buckets: &[(u64, u64, u64)], pages: u64| PauseRun {
            target,
            summary: Err("not parsed here".into()),
            stats: Stats::parse(&stats_json(buckets, pages)),
        };
        let many: Vec<(u64, u64, u64)> = (0..2000)
            .map(|i| (100 + i * 10, 110 + i * 10, 1 + i % 3))
            .collect();
        vec![
            mk(100, &[(150, 160, 80), (200, 220, 19), (900, 1000, 1)], 98),
            mk(
                1_000,
                &[(250, 260, 70), (300, 320, 29), (2000, 2200, 1)],
                1010,
            ),
            mk(4_000, &many, 4050),
            PauseRun {
                target: 8_000,
                summary: Err("primary: exited with status 1\nmore".into()),
                stats: Err("no file".into()),
            },
        ]
    }

    fn latency() -> Latency {
        let us = |v: u64| Duration::from_micros(v);
        vec![
            (
                Mode::Unprotected,
                Ok((0..5000).map(|i| us(500 + i % 700)).collect()),
            ),
            (
                Mode::Early,
                Ok((0..5000).map(|i| us(1500 + (i * 7) % 4000)).collect()),
            ),
        ]
    }

    fn timelines() -> Vec<Timeline> {
        (0..10)
            .map(|i| Timeline {
                reaped: Some(8.0),
                detected: Some(0.5 + i as f64 * 0.1),
                fenced: Some(20.0 + i as f64),
                promoted: if i == 3 { None } else { Some(40.0 + i as f64) },
                first_reply: Some(190.0 + i as f64 * 3.0),
            })
            .collect()
    }

    fn page(quick: bool) -> String {
        let plan = Plan::new(quick);
        let failover = Ok((timelines(), 0, 0));
        html::render(&Page {
            title: "lockstep bench report".into(),
            quick,
            scope: plan.scope(),
            command: command_line(&[
                "report".into(),
                "--quick".into(),
                "--out".into(),
                "/tmp/a b".into(),
            ]),
            machine: machine(),
            sections: vec![
                pause_cdf_section(&plan, &pause_runs()),
                pause_pages_section(&pause_runs()),
                latency_section(&plan, &latency()),
                failover_section(&plan, &failover),
            ],
        })
    }

    #[test]
    fn the_whole_page_from_synthetic_runs() {
        let h = page(true);
        assert_eq!(h.matches("<svg").count(), 4, "one plot a section");
        assert_eq!(h.matches("</svg>").count(), 4);
        for text in [
            // Series names.
            "100 pages/epoch (achieved 98)",
            "1000 pages/epoch (achieved 1010)",
            "4000 pages/epoch (achieved 4050)",
            "pause p50",
            "pause p99",
            "parked (p50, cumulative)",
            "copied (p50, cumulative)",
            "unprotected",
            "protected, early checkpoint",
            "kill → detected",
            "detected → fenced",
            "fenced → promoted",
            "promoted → first reply",
            // Axis labels.
            "pause per epoch (ms, log scale)",
            "fraction of samples at or below",
            "dirty pages per epoch (achieved mean)",
            "request → reply (ms, log scale)",
            "ms after the kill",
            // The failed run, the machine, the command, the kind of run.
            "failed: primary: exited with status 1",
            "nproc",
            "kernel",
            "git commit",
            "cargo run --release -p bench -- report --quick --out &#39;/tmp/a b&#39;",
            "A quick run (<code>--quick</code>)",
        ] {
            assert!(h.contains(text), "no {text:?} in the page");
        }
        assert!(
            !h.contains("http://") && !h.contains("https://"),
            "an external URL"
        );
        assert!(!h.contains("<script") && !h.contains("src=") && !h.contains("<link"));
        assert!(h.len() < 1_000_000, "{} bytes", h.len());
        // Every polyline within the point budget.
        for p in h.split("<polyline").skip(1) {
            let at = p.find("points=\"").unwrap() + 8;
            let n = p[at..]
                .split('"')
                .next()
                .unwrap()
                .split_whitespace()
                .count();
            assert!(n <= plot::MAX_POINTS, "{n} points");
        }
        assert!(page(false).contains("A full run"));
    }

    #[test]
    fn latency_added_is_protected_minus_unprotected() {
        let s = latency_section(&Plan::new(true), &latency());
        let t = &s.tables[0];
        assert_eq!(t.rows[0][6], "+0.000");
        // Protected p50: 1500 + the median of (7i mod 4000) µs; unprotected 500 + 349.
        let p50 = |r: &Vec<String>| r[3].parse::<f64>().unwrap();
        let added: f64 = t.rows[1][6].parse().unwrap();
        assert!((added - (p50(&t.rows[1]) - p50(&t.rows[0]))).abs() < 0.0015);
    }

    #[test]
    fn a_failed_part_says_why() {
        let plan = Plan::new(true);
        let s = failover_section(&plan, &Err("cannot create the namespace\ndetails".into()));
        assert_eq!(s.plot, Some(Err("cannot create the namespace".into())));
        let s = latency_section(&plan, &vec![(Mode::Unprotected, Err("no guest".into()))]);
        assert_eq!(s.plot, Some(Err("no guest".into())));
        let none: Vec<PauseRun> = Vec::new();
        assert!(matches!(pause_pages_section(&none).plot, Some(Err(_))));
    }

    #[test]
    fn failover_stretches_skip_missing_moments() {
        let t = Timeline {
            reaped: Some(8.0),
            detected: Some(1.0),
            fenced: None,
            promoted: Some(40.0),
            first_reply: Some(200.0),
        };
        let s = stretches(&t);
        assert_eq!(
            s,
            vec![
                plot::Stretch {
                    from: 0.0,
                    to: 1.0,
                    kind: 0
                },
                plot::Stretch {
                    from: 1.0,
                    to: 40.0,
                    kind: 2
                },
                plot::Stretch {
                    from: 40.0,
                    to: 200.0,
                    kind: 3
                },
            ]
        );
        let s = failover_section(&Plan::new(true), &Ok((timelines(), 1, 0)));
        let sum = &s.tables[0];
        assert_eq!(sum.rows[0][0], "kill → first reply");
        assert_eq!(sum.rows[0][1], "10");
        // Trial 4 has no promotion: 9 samples of detected → promoted.
        assert_eq!(sum.rows[3][0], "detected → promoted");
        assert_eq!(sum.rows[3][1], "9");
        assert_eq!(s.tables[1].rows.len(), 10);
    }

    #[test]
    fn out_directory_checks() {
        let base = std::env::temp_dir().join(format!("bench-report-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("out");
        assert_eq!(prepare_out(&dir).unwrap(), dir);
        assert!(dir.is_dir());
        // Again: an existing directory is fine, and nothing is left in it.
        prepare_out(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let e = prepare_out(&base.join("no/such/out")).unwrap_err();
        assert!(e.contains("is not a directory") && !e.contains('\n'), "{e}");
        std::fs::write(base.join("file"), b"x").unwrap();
        let e = prepare_out(&base.join("file")).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn report_options() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let usage = |v: &[&str]| match Args::parse("report", &strings(v), OPTIONS, FLAGS)
            .and_then(|a| run(&a))
        {
            Err(BenchError::Usage(m)) => m,
            other => panic!("not a usage error: {:?}", other.err()),
        };
        assert!(usage(&[]).contains("--out DIR"));
        assert!(usage(&["--quick"]).contains("--out DIR"));
        assert!(usage(&["--quick=1", "--out", "x"]).contains("takes no value"));
        assert!(usage(&["--fast"]).contains("unknown option --fast"));
    }

    #[test]
    fn dates() {
        let at = |s: u64| utc(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(at(1_709_251_199), "2024-02-29 23:59:59");
        assert_eq!(at(4_102_444_800), "2100-01-01 00:00:00");
    }

    #[test]
    fn command_lines_quote_what_needs_it() {
        assert_eq!(
            command_line(&["report".into(), "--out".into(), "it's here".into()]),
            "cargo run --release -p bench -- report --out 'it'\\''s here'"
        );
    }
}
