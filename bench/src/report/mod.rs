//! `bench report`: runs a suite of measurements and writes one self-contained HTML page
//! of plots and tables, `DIR/index.html`:
//!
//! 0. Targets: the project's performance targets, one row each, judged on this run's
//!    figures (met, missed, or not run and why), with the baseline measured beside them
//!    (`targets.rs`). Besides the runs below, it takes a pair at 5 ms epochs, the kv
//!    guest under `redis-benchmark -c 20` (in the latency runs' guests), failovers after
//!    a lost host and a soak nobody kills (`bench failover --mode host`, `--soak`), the
//!    initial sync against QEMU's migration (`bench sync`), the dirty harvest of 1, 4 and
//!    16 GiB guests (`bench harvest`) and the mixed progress row of `bench checkpoint`.
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
//! The full suite: six dirty rates (100 to 10,000 pages an epoch), 20 s of epochs each,
//! 20,000 requests per mode, 20 SIGKILL and 10 host-loss trials, a 60 s soak, a 2 GiB
//! sync. `--quick` runs a subset: five rates, 8 s each, 5,000 requests per mode, 6 and 3
//! trials, a 10 s soak, a 512 MiB sync. See [`Plan`]. A part that fails leaves its error
//! in the page; the bench then exits non-zero.

mod html;
mod plot;
mod stats_json;
mod targets;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use harness::{Kv, Loss, Netns, Reply, SoakOutcome};

use crate::args::Args;
use crate::checkpoint::{pages_per_ms, EpochRun, ProgressRow, Summary as EpochSummary};
use crate::failover::{self, Timeline};
use crate::net::{Figures, KvGuest, Mode};
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
/// The dirty rates the pause targets are set at (pages per epoch): ~2,000, and a guest
/// asking for 10,000 (more than an epoch may carry).
const TARGET_RATE: u64 = 2_000;
const CAPPED_RATE: u64 = 10_000;
/// The target at short epochs: 1,000 pages per epoch of 5 ms.
const FAST_INTERVAL_MS: u64 = 5;
const FAST_RATE: u64 = 1_000;
/// redis-benchmark's clients in the throughput target.
const KV_CLIENTS: u64 = 20;
/// Guest sizes of the harvest target, and its dirty pages.
const HARVEST_MEMS: [u64; 3] = [1 << 30, 4 << 30, 16 << 30];
const HARVEST_PAGES: u64 = 2_000;
/// `compute=` of the mixed progress target.
const PROGRESS_COMPUTE: u64 = 10_000;

/// What the suite runs.
struct Plan {
    quick: bool,
    /// Target dirty pages per epoch.
    rates: Vec<u64>,
    /// Seconds of epochs per rate (and of the 5 ms run).
    seconds: f64,
    /// Timed requests per latency mode, and redis-benchmark's requests.
    requests: usize,
    /// SIGKILL trials.
    trials: usize,
    /// Host-loss trials, and the soak's seconds.
    host_trials: usize,
    soak: u64,
    /// The guest RAM of the initial-sync comparison, and its trials.
    sync_mem: &'static str,
    sync_trials: usize,
    /// Harvests per guest size.
    harvest_samples: usize,
    /// Guest seconds of the progress runs.
    progress_seconds: f64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rates: vec![100, 1_000, TARGET_RATE, 4_000, CAPPED_RATE],
                seconds: 8.0,
                requests: 5_000,
                trials: 6,
                host_trials: 3,
                soak: 10,
                sync_mem: "512M",
                sync_trials: 1,
                harvest_samples: 20,
                progress_seconds: 3.0,
            }
        } else {
            Plan {
                quick,
                rates: vec![100, 300, 1_000, TARGET_RATE, 4_000, CAPPED_RATE],
                seconds: 20.0,
                requests: 20_000,
                trials: 20,
                host_trials: 10,
                soak: 60,
                sync_mem: "2G",
                sync_trials: 3,
                harvest_samples: 40,
                progress_seconds: 10.0,
            }
        }
    }

    fn scope(&self) -> String {
        format!(
            "Dirty rates of {} pages per {INTERVAL_MS} ms epoch and {FAST_RATE} per \
             {FAST_INTERVAL_MS} ms epoch, {} s of epochs each; {} timed requests per latency \
             mode and {} for redis-benchmark; {} SIGKILL and {} host-loss failover trials, a \
             soak of {} s; the initial sync of a {} guest, {} trial(s); {} harvests per guest \
             size; {} s of guest progress per mode.",
            self.rates
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.seconds,
            self.requests,
            self.requests,
            self.trials,
            self.host_trials,
            self.soak,
            self.sync_mem,
            self.sync_trials,
            self.harvest_samples,
            self.progress_seconds
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
    let fast = pause_run(
        bin,
        &work,
        FAST_INTERVAL_MS,
        FAST_RATE,
        plan.seconds,
        "bench report: [5 ms epochs]",
    );
    crate::checkpoint::remove_work_dir();
    let (latency, throughput) = latency_runs(bin, &work, &plan);
    let failover = failover_runs(bin, &work, &plan);
    let sync = sync_run(bin, &plan);
    let harvest = harvest_runs(&plan);
    let progress = progress_run(bin, &plan);
    crate::checkpoint::remove_work_dir();
    let _ = std::fs::remove_dir_all(&work);

    let failed = pauses.iter().filter(|p| p.summary.is_err()).count()
        + usize::from(fast.summary.is_err())
        + usize::from(latency.iter().any(|(_, r)| r.is_err()) || latency.is_empty())
        + usize::from(throughput.iter().any(|(_, r)| r.is_err()))
        + usize::from(failover.sigkill.is_err())
        + usize::from(failover.host.is_err())
        + usize::from(failover.soak.is_err())
        + usize::from(matches!(&sync, SyncRun::Ran { row, .. } if row.failed() > 0))
        + harvest.iter().filter(|(_, r)| r.is_err()).count()
        + usize::from(progress.unprotected.is_err() || progress.protected.is_err());
    let inputs = target_inputs(
        &pauses,
        &fast,
        &latency,
        &throughput,
        &failover,
        &sync,
        &harvest,
        &progress,
    );
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
            targets::section(&targets::rows(&inputs)),
            pause_cdf_section(&plan, &pauses),
            pause_pages_section(&pauses),
            latency_section(&plan, &latency),
            failover_section(&plan, &failover.sigkill),
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
            let label = format!("bench report: [pauses {}/{n}]", i + 1);
            pause_run(bin, work, INTERVAL_MS, target, plan.seconds, &label)
        })
        .collect()
}

/// A pair at `interval` ms epochs whose guest dirties `target` pages an epoch, for
/// `seconds` of epochs, the primary writing its histograms; progress on stderr after
/// `label`.
fn pause_run(
    bin: &Path,
    work: &Path,
    interval: u64,
    target: u64,
    seconds: f64,
    label: &str,
) -> PauseRun {
    eprintln!(
        "{label} {target} pages per {interval} ms epoch (pages_per_ms={}), {seconds} s of \
         epochs...",
        pages_per_ms(target, interval),
    );
    let file = work.join(format!("stats-{interval}-{target}.json"));
    let _ = std::fs::remove_file(&file);
    let file_arg = file.display().to_string();
    let run = EpochRun {
        mem: MEM,
        wss: WSS,
        interval,
        pages: target,
        seconds,
    };
    let summary = run.measure(bin, &["--stats-json", &file_arg]);
    let stats = std::fs::read_to_string(&file)
        .map_err(|e| format!("{}: {e}", file.display()))
        .and_then(|t| Stats::parse(&t).map_err(|e| format!("{}: {e}", file.display())));
    match (&summary, &stats) {
        (Err(e), _) => eprintln!("{label} failed: {}", first_line(e)),
        (Ok(_), Err(e)) => eprintln!("{label} no histograms: {e}"),
        (Ok(s), Ok(st)) => eprintln!(
            "{label} {} epochs, {:.0} pages an epoch, pause p50 {} µs, p99 {} µs",
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
/// redis-benchmark's SET and GET figures with [`KV_CLIENTS`] clients, per mode.
type Throughput = Vec<(Mode, Result<[Figures; 2], String>)>;

/// Per mode, one guest: one client's requests timed here, then redis-benchmark with
/// [`KV_CLIENTS`] clients.
fn latency_runs(bin: &Path, work: &Path, plan: &Plan) -> (Latency, Throughput) {
    let ns = match Netns::create("lsbrep") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("bench report: [latency] no network namespace: {e}");
            return (
                vec![(Mode::Unprotected, Err(e.clone()))],
                vec![(Mode::Unprotected, Err(e))],
            );
        }
    };
    let modes = [Mode::Unprotected, Mode::Early];
    let mut out = Vec::new();
    let mut throughput = Vec::new();
    for (i, mode) in modes.into_iter().enumerate() {
        eprintln!(
            "bench report: [latency {}/{}] {}: {} requests on one connection...",
            i + 1,
            modes.len(),
            mode.name(),
            plan.requests
        );
        let mut bench = Err("the guest did not start".to_string());
        let result = KvGuest::start(&ns, bin, work, mode, INTERVAL_MS, None).and_then(|kv| {
            let r = one_client(&ns, plan.requests);
            bench = match &r {
                Ok(_) => {
                    eprintln!(
                        "bench report: [latency {}/{}] {}: redis-benchmark -n {} -c \
                         {KV_CLIENTS}...",
                        i + 1,
                        modes.len(),
                        mode.name(),
                        plan.requests
                    );
                    crate::net::redis_benchmark(&ns, plan.requests as u64, KV_CLIENTS)
                }
                Err(_) => Err("the one-client run before it failed".into()),
            };
            kv.stop();
            r
        });
        if let Err(e) = &bench {
            eprintln!(
                "bench report: [latency {}/{}] redis-benchmark: {}",
                i + 1,
                modes.len(),
                first_line(e)
            );
        }
        throughput.push((mode, bench));
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
    (out, throughput)
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

/// A way of losing the primary's trials: their timelines, the trials whose client failed
/// or saw no promoted reply, the acknowledged writes lost.
type TrialsResult = Result<(Vec<Timeline>, usize, usize), String>;

struct FailoverRuns {
    sigkill: TrialsResult,
    host: TrialsResult,
    soak: Result<SoakOutcome, String>,
}

/// SIGKILL trials, host-loss trials, then a soak, in one namespace, at the binary's
/// default heartbeat timeout.
fn failover_runs(bin: &Path, work: &Path, plan: &Plan) -> FailoverRuns {
    let ns = match Netns::create("lsbrfo") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("bench report: [failover] no network namespace: {e}");
            return FailoverRuns {
                sigkill: Err(e.clone()),
                host: Err(e.clone()),
                soak: Err(e),
            };
        }
    };
    let dir = work.join("failover");
    let trials = |loss: Loss, n: usize, m: usize| -> TrialsResult {
        let what = match loss {
            Loss::Kill => "SIGKILL of the primary",
            Loss::Host => "the primary's host lost (link cut, process frozen)",
        };
        eprintln!("bench report: [failover] {n} trials: {what}, under client load...");
        let t = failover::run_trials(
            bin,
            &dir,
            &failover::Plan::new(n, 0),
            &ns,
            loss,
            m,
            "bench report: failover",
        )
        .inspect_err(|e| eprintln!("bench report: [failover] failed: {}", first_line(e)))?;
        let (broken, lost) = t.broken_and_lost();
        Ok((t.timelines(), broken, lost))
    };
    let sigkill = trials(Loss::Kill, plan.trials, 0);
    // Ports and directories go by `m * trials + t`: past the SIGKILL trials' own.
    let host = trials(
        Loss::Host,
        plan.host_trials,
        plan.trials.div_ceil(plan.host_trials.max(1)),
    );
    let soak = failover::run_soak(
        bin,
        &dir,
        &failover::Plan::new(0, plan.soak),
        &ns,
        "bench report: failover",
    )
    .inspect(|o| {
        eprintln!(
            "bench report: [failover] soak: {} s, {} false failovers, {} false backup losses",
            o.ran.as_secs(),
            o.false_failovers,
            o.false_backup_losses
        )
    })
    .inspect_err(|e| eprintln!("bench report: [failover] soak failed: {}", first_line(e)));
    FailoverRuns {
        sigkill,
        host,
        soak,
    }
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
            // A moment before the one drawn last (a reply sent before the promoted guest
            // ran) still shows: a 1 ms mark.
            let to = if to > from { to } else { from + 1.0 };
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

fn failover_section(plan: &Plan, r: &TrialsResult) -> Section {
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
               process dies, a few ms after the signal, often before the bench reaps it \
               (primary reaped: when the bench saw it gone, which is where bench failover's \
               kill → first reply counts from), not from a heartbeat timeout. The client's \
               wait beyond the promotion is mostly its own TCP retransmission of the request \
               the dead primary took but the backup never committed (200 ms at least on \
               Linux). A reply that came before the promotion (committed output the dead \
               primary still held, which the backup sends before its guest runs) is drawn \
               as a 1 ms mark at the promotion."
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
// The targets' other runs

/// The initial sync against QEMU's migration, or why it did not run.
enum SyncRun {
    NotRun(String),
    Ran { row: crate::sync::Row, qemu: String },
}

fn sync_run(bin: &Path, plan: &Plan) -> SyncRun {
    // The report installs nothing: without QEMU the comparison is not run.
    let qemu = match crate::sync::find_qemu(false) {
        Ok(q) => q,
        Err(why) => {
            eprintln!("bench report: [sync] not run: {why}");
            return SyncRun::NotRun(why);
        }
    };
    let bytes = engine::size::parse_size(plan.sync_mem).unwrap_or(0);
    let dir = match crate::runs::work_dir() {
        Ok(d) => d,
        Err(e) => return SyncRun::NotRun(e),
    };
    let mut accel = crate::sync::Accel::first();
    let row = crate::sync::measure(
        bin,
        Some(&qemu),
        &dir,
        plan.sync_mem,
        bytes,
        plan.sync_trials,
        &mut accel,
        "bench report: sync",
    );
    let qemu = format!("{} (-accel {})", short_version(&qemu.version), accel.name());
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    eprintln!(
        "bench report: [sync] end to end, medians: lockstep {} ms, QEMU {} ms",
        f(row.lockstep_ms()),
        f(row.qemu_ms())
    );
    SyncRun::Ran { row, qemu }
}

/// `QEMU 7.2.22` from `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)`.
fn short_version(line: &str) -> String {
    match line.split_once(" emulator version ") {
        Some((name, rest)) => format!("{name} {}", rest.split_whitespace().next().unwrap_or("")),
        None => line.to_string(),
    }
}

/// Harvest and pause p50 at [`HARVEST_PAGES`] dirty pages, bitmap, per guest size.
type HarvestRuns = Vec<(u64, Result<targets::Harvest, String>)>;

fn harvest_runs(plan: &Plan) -> HarvestRuns {
    HARVEST_MEMS
        .iter()
        .map(|&mem| {
            eprintln!(
                "bench report: [harvest] {} GiB guest, {HARVEST_PAGES} dirty pages, {} \
                 samples...",
                mem >> 30,
                plan.harvest_samples
            );
            let r = crate::harvest::measure(mem, HARVEST_PAGES, None, plan.harvest_samples)
                .map_err(|e| e.to_string())
                .and_then(
                    |(_, times, pauses)| match (Summary::of(&times), Summary::of(&pauses)) {
                        (Some(h), Some(p)) => Ok(targets::Harvest {
                            harvest: h.p50,
                            pause: p.p50,
                        }),
                        _ => Err("no samples".to_string()),
                    },
                );
            match &r {
                Ok(h) => eprintln!(
                    "bench report: [harvest] harvest p50 {:.0} µs, pause p50 {:.0} µs",
                    h.harvest.as_secs_f64() * 1e6,
                    h.pause.as_secs_f64() * 1e6
                ),
                Err(e) => eprintln!("bench report: [harvest] failed: {}", first_line(e)),
            }
            (mem, r)
        })
        .collect()
}

fn progress_run(bin: &Path, plan: &Plan) -> ProgressRow {
    eprintln!(
        "bench report: [progress] mixed workload (compute={PROGRESS_COMPUTE}), {} s \
         unprotected, then protected at {INTERVAL_MS} ms...",
        plan.progress_seconds
    );
    let row = crate::checkpoint::progress_row(
        bin,
        MEM,
        plan.progress_seconds,
        "mixed",
        &crate::checkpoint::mixed_args(PROGRESS_COMPUTE),
        INTERVAL_MS,
    );
    match (&row.unprotected, &row.protected) {
        (Ok(u), Ok((p, _))) => eprintln!(
            "bench report: [progress] {u:.0} pages/s unprotected, {p:.0} protected ({:.3})",
            p / u
        ),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("bench report: [progress] failed: {}", first_line(e))
        }
    }
    row
}

/// A pause run's figures for the targets: from the histograms, else from the log; the
/// period from the log.
fn pause_input(run: Option<&PauseRun>, what: &str) -> Result<targets::Pause, String> {
    let run = run.ok_or_else(|| format!("no run {what} in this plan"))?;
    let period = |s: &EpochSummary| {
        s.epoch_secs
            .filter(|_| s.epochs > 0)
            .map(|t| t * 1000.0 / s.epochs as f64)
    };
    match (&run.stats, &run.summary) {
        (Ok(st), summary) => Ok(targets::Pause {
            pages: st.pages.mean(),
            epochs: st.epochs,
            p50_ms: st.pause_us.p50 as f64 / 1000.0,
            p99_ms: st.pause_us.p99 as f64 / 1000.0,
            period_ms: summary.as_ref().ok().and_then(period),
            capped: Some(st.capped),
        }),
        (Err(_), Ok(s)) => Ok(targets::Pause {
            pages: s.pages_per_epoch(),
            epochs: s.epochs,
            p50_ms: s.pause_p50 as f64 / 1000.0,
            p99_ms: s.pause_p99 as f64 / 1000.0,
            period_ms: period(s),
            capped: s.capped,
        }),
        (Err(_), Err(e)) => Err(format!("failed: {}", first_line(e))),
    }
}

/// `f` of the unprotected and of the protected (early checkpoint) run of `runs`, or why
/// there is none.
fn both<T, U>(
    runs: &[(Mode, Result<T, String>)],
    f: impl Fn(&T) -> Result<U, String>,
) -> Result<(U, U), String> {
    let get = |m: Mode| -> Result<U, String> {
        let (_, r) = runs
            .iter()
            .find(|(x, _)| x.name() == m.name())
            .ok_or_else(|| format!("no {} run", m.name()))?;
        f(r.as_ref()
            .map_err(|e| format!("{} failed: {}", m.name(), first_line(e)))?)
    };
    Ok((get(Mode::Unprotected)?, get(Mode::Early)?))
}

/// The runs' figures, as the targets take them.
#[allow(clippy::too_many_arguments)]
fn target_inputs(
    pauses: &[PauseRun],
    fast: &PauseRun,
    latency: &Latency,
    throughput: &Throughput,
    failover: &FailoverRuns,
    sync: &SyncRun,
    harvest: &HarvestRuns,
    progress: &ProgressRow,
) -> targets::Inputs {
    let at = |rate: u64| pauses.iter().find(|p| p.target == rate);
    let failed = |e: &String| format!("failed: {}", first_line(e));
    let sync = match sync {
        SyncRun::NotRun(why) => Err(why.clone()),
        SyncRun::Ran { row, qemu } => match (row.lockstep_ms(), row.qemu_ms()) {
            (Some(l), Some(q)) => Ok(targets::Sync {
                mem: row.mem.clone(),
                trials: row
                    .lockstep
                    .iter()
                    .flatten()
                    .count()
                    .min(row.qemu.iter().flatten().count()),
                lockstep_ms: l,
                qemu_ms: q,
                qemu: qemu.clone(),
            }),
            _ => Err(format!(
                "failed: {}",
                row.first_error().unwrap_or_else(|| "no trial".into())
            )),
        },
    };
    let trials = |r: &TrialsResult, f: &dyn Fn(&Timeline) -> Option<f64>| {
        r.as_ref().map_err(failed).map(|(t, _, _)| targets::Trials {
            trials: t.len(),
            ms: t.iter().filter_map(f).collect(),
            loss_ms: t.iter().filter_map(|t| t.reaped).collect(),
        })
    };
    let soak = failover
        .soak
        .as_ref()
        .map_err(failed)
        .map(|o| targets::Soak {
            seconds: o.ran.as_secs(),
            false_failovers: o.false_failovers,
            false_backup_losses: o.false_backup_losses,
        });
    let progress = match (&progress.unprotected, &progress.protected) {
        (Ok(u), Ok((p, _))) => Ok((*u, *p)),
        (Err(e), _) | (_, Err(e)) => Err(failed(e)),
    };
    targets::Inputs {
        pause_2k: pause_input(at(TARGET_RATE), "at 2,000 pages an epoch"),
        pause_10k: pause_input(at(CAPPED_RATE), "at 10,000 pages an epoch"),
        fast: pause_input(Some(fast), "at 5 ms epochs"),
        kv_set: both(throughput, |f: &[Figures; 2]| Ok(f[0])),
        one_client: both(latency, |s: &Vec<Duration>| {
            Summary::of(s).ok_or_else(|| "no samples".to_string())
        }),
        sync,
        sigkill: trials(&failover.sigkill, &|t| t.first_reply),
        host: trials(&failover.host, &|t| t.detected),
        soak,
        harvest: harvest
            .iter()
            .map(|(mem, r)| (format!("{} GiB", mem >> 30), r.clone()))
            .collect(),
        progress,
    }
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
                targets::section(&targets::rows(&targets::tests::all_met())),
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
            // The targets.
            "<table class=\"targets\">",
            "10 met, 0 missed, 0 not run.",
        ] {
            assert!(h.contains(text), "no {text:?} in the page");
        }
        // The targets come first, in the page and in its navigation.
        let at = |s: &str| h.find(s).unwrap_or_else(|| panic!("no {s:?}"));
        assert!(at("<section id=\"targets\">") < at("<section id=\"pause-cdf\">"));
        assert!(h.contains("<nav><a href=\"#targets\">Targets</a>"));
        assert_eq!(h.matches("<tr class=\"met\">").count(), 10);
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

    fn pause_run(target: u64, p99_us: u64, pages: u64) -> PauseRun {
        PauseRun {
            target,
            summary: Ok(EpochSummary {
                epochs: 100,
                pause_p50: 300,
                pause_p99: 9_999,
                pause_max: 20_000,
                commit_p50: 1,
                commit_p99: 2,
                dirty_pages: pages * 100,
                wire_bytes: 1,
                throttled: 0,
                held_max: None,
                capped: Some(7),
                epoch_secs: Some(2.5),
                steps: None,
            }),
            stats: Stats::parse(&stats_json(
                &[(250, 260, 90), (p99_us, p99_us + 1, 10)],
                pages,
            )),
        }
    }

    #[test]
    fn target_inputs_from_synthetic_runs() {
        let pauses = vec![
            pause_run(100, 400, 98),
            pause_run(TARGET_RATE, 800, 1990),
            pause_run(CAPPED_RATE, 1900, 4050),
        ];
        let fast = PauseRun {
            target: FAST_RATE,
            summary: pause_run(0, 0, 1000).summary,
            stats: Err("no file".into()),
        };
        let fig = |rps: f64| Figures {
            rps,
            p50_ms: 1.0,
            p99_ms: 2.0,
        };
        let throughput: Throughput = vec![
            (Mode::Unprotected, Ok([fig(10_000.0), fig(11_000.0)])),
            (Mode::Early, Ok([fig(4_000.0), fig(5_000.0)])),
        ];
        let failover = FailoverRuns {
            sigkill: Ok((timelines(), 0, 0)),
            host: Err("no namespace".into()),
            soak: Ok(SoakOutcome {
                ran: Duration::from_secs(10),
                ..SoakOutcome::default()
            }),
        };
        let harvest: HarvestRuns = HARVEST_MEMS
            .iter()
            .map(|&m| {
                let us = Duration::from_micros(70 + (m >> 30));
                (
                    m,
                    Ok(targets::Harvest {
                        harvest: us,
                        pause: us,
                    }),
                )
            })
            .collect();
        let progress = ProgressRow {
            kind: "mixed",
            guest: crate::checkpoint::mixed_args(PROGRESS_COMPUTE),
            interval: INTERVAL_MS,
            unprotected: Ok(40_000.0),
            protected: Ok((38_000.0, None)),
        };
        let i = target_inputs(
            &pauses,
            &fast,
            &latency(),
            &throughput,
            &failover,
            &SyncRun::NotRun("qemu-system-x86_64 missing".into()),
            &harvest,
            &progress,
        );
        let p = i.pause_2k.as_ref().unwrap();
        // From the histogram (its p99, its counter of capped epochs), not the log; the
        // period from the log (2.5 s of 100 epochs).
        assert_eq!((p.p99_ms, p.pages, p.capped), (0.8, 1990.0, Some(3)));
        assert_eq!(p.period_ms, Some(25.0));
        assert_eq!(i.pause_10k.as_ref().unwrap().p99_ms, 1.9);
        // Without histograms: the log's figures.
        let f = i.fast.as_ref().unwrap();
        assert_eq!((f.p99_ms, f.capped), (9.999, Some(7)));
        assert_eq!(i.kv_set.as_ref().unwrap().1.rps, 4_000.0);
        let (u, e) = i.one_client.as_ref().unwrap();
        assert!(u.p50 < e.p50);
        assert_eq!(i.sync, Err("qemu-system-x86_64 missing".into()));
        assert_eq!(i.sigkill.as_ref().unwrap().ms.len(), 10);
        assert_eq!(i.host, Err("failed: no namespace".into()));
        assert_eq!(i.soak.as_ref().unwrap().seconds, 10);
        assert_eq!(i.harvest[2].0, "16 GiB");
        assert_eq!(i.progress, Ok((40_000.0, 38_000.0)));
        let rows = targets::rows(&i);
        assert_eq!(rows[0].verdict, targets::Verdict::Met);
        assert_eq!(rows[2].verdict, targets::Verdict::Missed);
        assert_eq!(rows[3].verdict, targets::Verdict::Missed);
        assert!(matches!(rows[5].verdict, targets::Verdict::NotRun(_)));
        // A run missing from the plan, a failed mode: said, not guessed.
        let i = target_inputs(
            &pauses[..1],
            &fast,
            &vec![(Mode::Unprotected, Err("no guest\nmore".into()))],
            &Vec::new(),
            &failover,
            &SyncRun::NotRun("x".into()),
            &harvest,
            &progress,
        );
        assert_eq!(
            i.pause_2k,
            Err("no run at 2,000 pages an epoch in this plan".into())
        );
        assert_eq!(i.one_client, Err("unprotected failed: no guest".into()));
        assert_eq!(i.kv_set, Err("no unprotected run".into()));
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
    fn a_reply_before_the_promotion_is_a_mark_not_nothing() {
        let t = Timeline {
            reaped: Some(8.0),
            detected: Some(3.0),
            fenced: Some(20.0),
            promoted: Some(39.7),
            first_reply: Some(37.1),
        };
        let s = stretches(&t);
        assert_eq!(s.len(), 4);
        assert_eq!((s[3].from, s[3].to, s[3].kind), (39.7, 40.7, 3));
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
    fn qemu_versions_shortened() {
        assert_eq!(
            short_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            "QEMU 7.2.22"
        );
        assert_eq!(short_version("something else"), "something else");
    }

    #[test]
    fn command_lines_quote_what_needs_it() {
        assert_eq!(
            command_line(&["report".into(), "--out".into(), "it's here".into()]),
            "cargo run --release -p bench -- report --out 'it'\\''s here'"
        );
    }
}
