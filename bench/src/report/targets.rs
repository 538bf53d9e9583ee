//! The report's first section: the project's performance targets, one row each, with
//! what this run measured, the baseline it measured beside it (where the target is a
//! ratio or an added cost), and whether the target was met.
//!
//! The rows are built from [`Inputs`], the figures the suite's runs gave (reduced to what
//! the targets need), so the verdicts can be checked without running anything.

use std::time::Duration;

use super::html::{Section, Table};
use crate::net::Figures;
use crate::stats::Summary;

/// How a target fared in this run.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Met,
    Missed,
    /// Not measured in this run, and why.
    NotRun(String),
}

impl Verdict {
    /// `value <= limit`.
    pub fn at_most(value: f64, limit: f64) -> Verdict {
        Verdict::check(value, value <= limit)
    }

    /// `value >= limit`.
    pub fn at_least(value: f64, limit: f64) -> Verdict {
        Verdict::check(value, value >= limit)
    }

    /// `value < limit`.
    pub fn below(value: f64, limit: f64) -> Verdict {
        Verdict::check(value, value < limit)
    }

    fn check(value: f64, ok: bool) -> Verdict {
        if !value.is_finite() {
            Verdict::NotRun("no figure".into())
        } else if ok {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }

    /// Several criteria of one target: missed when one is missed, else not run when one
    /// was not run (the first reason), else met.
    pub fn all(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
        let mut not_run = None;
        for v in verdicts {
            match v {
                Verdict::Missed => return Verdict::Missed,
                Verdict::NotRun(why) => {
                    not_run.get_or_insert(why);
                }
                Verdict::Met => {}
            }
        }
        not_run.map_or(Verdict::Met, Verdict::NotRun)
    }

    /// The CSS class of its row.
    pub fn class(&self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::NotRun(_) => "notrun",
        }
    }

    pub fn text(&self) -> String {
        match self {
            Verdict::Met => "met".into(),
            Verdict::Missed => "missed".into(),
            Verdict::NotRun(why) => format!("not run: {why}"),
        }
    }
}

/// One target and how this run did against it.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub baseline: String,
    pub verdict: Verdict,
}

impl Target {
    /// A target not judged yet: no figure, met until a check says otherwise.
    fn new(what: &str, target: &str, baseline: &str) -> Target {
        Target {
            what: what.into(),
            target: target.into(),
            measured: String::new(),
            baseline: baseline.into(),
            verdict: Verdict::Met,
        }
    }
}

/// A run of epochs: its figures (pause from the primary's histogram when it wrote one).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pause {
    /// Mean dirty pages an epoch achieved.
    pub pages: f64,
    pub epochs: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mean epoch period (ms): seconds of continuous epochs ÷ epochs, when the primary's
    /// log gave them.
    pub period_ms: Option<f64>,
    /// Epochs ended early at the page cap, when known.
    pub capped: Option<u64>,
}

/// The initial sync against QEMU's migration.
#[derive(Clone, Debug, PartialEq)]
pub struct Sync {
    /// The guest's RAM as given (`2G`).
    pub mem: String,
    /// Trials each side gave figures in.
    pub trials: usize,
    /// Medians, end to end (ms).
    pub lockstep_ms: f64,
    pub qemu_ms: f64,
    /// QEMU's version line.
    pub qemu: String,
}

/// Trials of one way of losing the primary: how many ran, the figure of each that had it
/// (ms), and how long the loss itself took in each (ms: the SIGKILL until the process was
/// reaped, or the link cut), which the figures count from the start of.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trials {
    pub trials: usize,
    pub ms: Vec<f64>,
    pub loss_ms: Vec<f64>,
}

/// A soak: how long, and the losses declared anyway.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Soak {
    pub seconds: u64,
    pub false_failovers: usize,
    pub false_backup_losses: usize,
}

/// Harvest and pause p50 of one guest size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Harvest {
    pub harvest: Duration,
    pub pause: Duration,
}

/// Everything the targets are judged on. An `Err` says why the figure is missing (a
/// failed run, or a part this run does not do).
#[derive(Clone, Debug)]
pub struct Inputs {
    /// 25 ms epochs at ~2,000 dirty pages.
    pub pause_2k: Result<Pause, String>,
    /// 25 ms epochs with the guest asking for 10,000 pages an epoch.
    pub pause_10k: Result<Pause, String>,
    /// 5 ms epochs at 1,000 pages.
    pub fast: Result<Pause, String>,
    /// redis-benchmark -c 20, SET: unprotected, protected with early checkpoints.
    pub kv_set: Result<(Figures, Figures), String>,
    /// One client, one connection: request → reply, unprotected and protected.
    pub one_client: Result<(Summary, Summary), String>,
    pub sync: Result<Sync, String>,
    /// SIGKILL → first reply from the promoted guest.
    pub sigkill: Result<Trials, String>,
    /// Host lost → the backup's detection.
    pub host: Result<Trials, String>,
    pub soak: Result<Soak, String>,
    /// By guest size, smallest first (label, figures).
    pub harvest: Vec<(String, Result<Harvest, String>)>,
    /// Mixed workload, 25 ms: unprotected and protected pages per second.
    pub progress: Result<(f64, f64), String>,
}

/// The targets, in the order the project states them.
pub fn rows(i: &Inputs) -> Vec<Target> {
    vec![
        pause_2k(&i.pause_2k),
        pause_10k(&i.pause_10k),
        fast(&i.fast),
        kv(&i.kv_set),
        one_client(&i.one_client),
        sync(&i.sync),
        sigkill(&i.sigkill),
        host(&i.host, &i.soak),
        harvest(&i.harvest),
        progress(&i.progress),
    ]
}

/// The section: the table, with a tally.
pub fn section(rows: &[Target]) -> Section {
    let mut t = Table::new(
        "",
        &[
            "what",
            "target",
            "measured in this run",
            "baseline, same run",
            "verdict",
        ],
    );
    t.class = "targets".into();
    for r in rows {
        t.row_with_class(
            vec![
                r.what.clone(),
                r.target.clone(),
                r.measured.clone(),
                r.baseline.clone(),
                r.verdict.text(),
            ],
            r.verdict.class(),
        );
    }
    let count = |class: &str| rows.iter().filter(|r| r.verdict.class() == class).count();
    Section {
        id: "targets".into(),
        heading: "Targets".into(),
        intro: format!(
            "The project's performance targets, each against a figure measured in this run; \
             where a target is a ratio or an added cost, its baseline was measured in this \
             same run. {} met, {} missed, {} not run.",
            count("met"),
            count("missed"),
            count("notrun")
        ),
        plot: None,
        tables: vec![t],
        note: "Pause percentiles come from the primary's histogram (--stats-json), at most \
               3.1% above the exact figure, never below. Each row's runs: the epoch rows are \
               pairs over loopback with the built-in guest's dirty workload (the pause \
               sections below); the kv rows run redis-benchmark and the latency client \
               against the kv guest (the latency section); the failover rows are bench \
               failover's trials and soak; the sync row is bench sync, the harvest row bench \
               harvest (bitmap, lockstep's default), the progress row bench checkpoint's \
               mixed progress row. On this shared two-core machine the tails move from run \
               to run: one run is one sample."
            .into(),
    }
}

fn pause_2k(r: &Result<Pause, String>) -> Target {
    let mut t = Target::new(
        "Epoch pause at ~2,000 dirty pages an epoch, 25 ms epochs",
        "p99 ≤ 1 ms",
        "none (a bound)",
    );
    match r {
        Ok(p) => {
            t.measured = format!(
                "p99 {} ms, p50 {} ms; {} pages an epoch, {} epochs",
                ms(p.p99_ms),
                ms(p.p50_ms),
                count(p.pages),
                count(p.epochs as f64)
            );
            t.verdict = Verdict::at_most(p.p99_ms, 1.0);
        }
        Err(e) => not_run(&mut t, e),
    }
    t
}

fn pause_10k(r: &Result<Pause, String>) -> Target {
    let mut t = Target::new(
        "Epoch pause when the guest asks for 10,000 pages an epoch, 25 ms epochs (an \
               epoch ends early once it holds the default --max-epoch-pages 4096; pages \
               written until the pause add to it)",
        "p99 ≤ 2 ms",
        "none (a bound)",
    );
    match r {
        Ok(p) => {
            t.measured = format!(
                "p99 {} ms, p50 {} ms; {} pages an epoch achieved{}",
                ms(p.p99_ms),
                ms(p.p50_ms),
                count(p.pages),
                p.capped.map_or(String::new(), |c| format!(
                    ", {} of {} epochs capped",
                    count(c as f64),
                    count(p.epochs as f64)
                ))
            );
            t.verdict = Verdict::at_most(p.p99_ms, 2.0);
        }
        Err(e) => not_run(&mut t, e),
    }
    t
}

fn fast(r: &Result<Pause, String>) -> Target {
    let mut t = Target::new(
        "5 ms epochs at a 1,000-page target (1 vCPU, workload=dirty pages_per_ms=200 \
               wss=128M): mean epoch period (seconds of epochs ÷ epochs) and pause",
        "period ≤ 6 ms and pause p99 ≤ 1 ms",
        "none (bounds)",
    );
    match r {
        Ok(p) => {
            let period = match p.period_ms {
                Some(v) => format!("{} ms a period", ms(v)),
                None => "no period (the primary's log gave no time of epochs)".into(),
            };
            t.measured = format!(
                "{period} over {} epochs; pause p99 {} ms, p50 {} ms; {} pages an epoch",
                count(p.epochs as f64),
                ms(p.p99_ms),
                ms(p.p50_ms),
                count(p.pages)
            );
            t.verdict = Verdict::all([
                p.period_ms.map_or_else(
                    || Verdict::NotRun("no time of epochs in the primary's log".into()),
                    |v| Verdict::at_most(v, 6.0),
                ),
                Verdict::at_most(p.p99_ms, 1.0),
            ]);
        }
        Err(e) => not_run(&mut t, e),
    }
    t
}

fn kv(r: &Result<(Figures, Figures), String>) -> Target {
    let mut t = Target::new(
        "kv guest under redis-benchmark -c 20 (SET), protected with early checkpoints \
               ÷ unprotected",
        "throughput ≥ 0.8×, p50 added ≤ +1 ms, p99 added ≤ +3 ms",
        "",
    );
    match r {
        Ok((base, p)) => {
            let ratio = p.rps / base.rps;
            let (p50, p99) = (p.p50_ms - base.p50_ms, p.p99_ms - base.p99_ms);
            t.measured = format!(
                "{} SET/s ({ratio:.2}×); p50 {} ms ({}); p99 {} ms ({})",
                count(p.rps),
                ms(p.p50_ms),
                added(p50),
                ms(p.p99_ms),
                added(p99)
            );
            t.baseline = format!(
                "unprotected: {} SET/s, p50 {} ms, p99 {} ms",
                count(base.rps),
                ms(base.p50_ms),
                ms(base.p99_ms)
            );
            t.verdict = Verdict::all([
                Verdict::at_least(ratio, 0.8),
                Verdict::at_most(p50, 1.0),
                Verdict::at_most(p99, 3.0),
            ]);
        }
        Err(e) => not_run(&mut t, e),
    }
    t
}

fn one_client(r: &Result<(Summary, Summary), String>) -> Target {
    let mut t = Target::new(
        "One client, one connection: request → reply added by output commit",
        "p50 added ≤ +1 ms",
        "",
    );
    match r {
        Ok((base, p)) => {
            let f = |d: Duration| d.as_secs_f64() * 1000.0;
            let p50 = f(p.p50) - f(base.p50);
            t.measured = format!(
                "p50 {} ms ({}), p99 {} ms ({}); {} requests",
                ms(f(p.p50)),
                added(p50),
                ms(f(p.p99)),
                added(f(p.p99) - f(base.p99)),
                count(p.count as f64)
            );
            t.baseline = format!(
                "unprotected: p50 {} ms, p99 {} ms",
                ms(f(base.p50)),
                ms(f(base.p99))
            );
            t.verdict = Verdict::at_most(p50, 1.0);
        }
        Err(e) => not_run(&mut t, e),
    }
    t
}

fn sync(r: &Result<Sync, String>) -> Target {
    let mut t = Target::new(
        "Initial sync of a 2 GiB mostly untouched guest, end to end ÷ QEMU's live \
               migration of a microvm with the same RAM over loopback",
        "≤ 1.0×",
        "",
    );
    match r {
        Ok(s) => {
            let ratio = s.lockstep_ms / s.qemu_ms;
            let size = if s.mem.eq_ignore_ascii_case("2G") {
                String::new()
            } else {
                format!(" (a {} guest in this run)", s.mem)
            };
            t.measured = format!(
                "{ratio:.2}×: lockstep {} ms end to end{size}, median of {}",
                ms(s.lockstep_ms),
                s.trials
            );
            t.baseline = format!("{}: {} ms", s.qemu, ms(s.qemu_ms));
            t.verdict = if size.is_empty() {
                Verdict::at_most(ratio, 1.0)
            } else {
                // A smaller guest's ratio says little of a 2 GiB one's.
                Verdict::NotRun(format!(
                    "the target is for 2 GiB, this run synced {}",
                    s.mem
                ))
            };
        }
        Err(e) => not_run(&mut t, e),
    }
    t
}

fn sigkill(r: &Result<Trials, String>) -> Target {
    let mut t = Target::new(
        "Failover, primary SIGKILLed: kill → first reply from the promoted guest, same \
               connection",
        "p99 ≤ 250 ms",
        "none (a bound)",
    );
    match r {
        Ok(tr) => match summary_ms(&tr.ms) {
            Some(s) => {
                t.measured = format!(
                    "p99 {} ms, p50 {} ms; {} of {} trials replied (counted from the SIGKILL)",
                    ms(secs_ms(s.p99)),
                    ms(secs_ms(s.p50)),
                    s.count,
                    tr.trials
                );
                // A trial without a reply from the promoted guest is a miss, not a gap.
                t.verdict = if s.count < tr.trials {
                    Verdict::Missed
                } else {
                    Verdict::at_most(secs_ms(s.p99), 250.0)
                };
            }
            None => {
                t.measured = format!("no reply in {} trials", tr.trials);
                t.verdict = Verdict::Missed;
            }
        },
        Err(e) => not_run(&mut t, e),
    }
    t
}

fn host(r: &Result<Trials, String>, soak: &Result<Soak, String>) -> Target {
    let mut t = Target::new(
        "Failover, primary's host lost (link cut, no FIN): detection at the default \
               --heartbeat-timeout-ms; false failovers of a soak (pairs nobody kills, two \
               threads spinning beside them)",
        "detection p99 ≤ 300 ms; 0 false failovers",
        "none (bounds)",
    );
    let (detection, v1) = match r {
        Ok(tr) => match summary_ms(&tr.ms) {
            Some(s) => (
                format!(
                    "detection p99 {} ms, p50 {} ms ({} of {} trials), counted from the start \
                     of the link cut{}",
                    ms(secs_ms(s.p99)),
                    ms(secs_ms(s.p50)),
                    s.count,
                    tr.trials,
                    range(&tr.loss_ms).map_or(String::new(), |(lo, hi)| format!(
                        " (the cut itself took {}–{} ms)",
                        ms(lo),
                        ms(hi)
                    ))
                ),
                if s.count < tr.trials {
                    Verdict::Missed
                } else {
                    Verdict::at_most(secs_ms(s.p99), 300.0)
                },
            ),
            None => (
                format!("no detection in {} trials", tr.trials),
                Verdict::Missed,
            ),
        },
        Err(e) => (
            format!("host-loss trials not run: {e}"),
            Verdict::NotRun(format!("host-loss trials: {e}")),
        ),
    };
    let (soaked, v2) = match soak {
        Ok(s) => (
            format!(
                "soak of {} s: {} false failovers ({} false backup losses)",
                s.seconds, s.false_failovers, s.false_backup_losses
            ),
            Verdict::at_most(s.false_failovers as f64, 0.0),
        ),
        Err(e) => (
            format!("soak not run: {e}"),
            Verdict::NotRun(format!("soak: {e}")),
        ),
    };
    t.measured = format!("{detection}; {soaked}");
    t.verdict = Verdict::all([v1, v2]);
    t
}

fn harvest(sizes: &[(String, Result<Harvest, String>)]) -> Target {
    let mut t = Target::new(
        "Dirty harvest and pause at the same dirty count (2,000 pages), 1 → 4 → 16 GiB \
               guests (bitmap, 2 vCPUs, p50)",
        "growth 1 → 16 GiB < 2× (harvest and pause)",
        "",
    );
    if let Some((label, Err(e))) = sizes.iter().find(|(_, r)| r.is_err()) {
        not_run(&mut t, &format!("{label}: {e}"));
        return t;
    }
    let figures: Vec<(&str, Harvest)> = sizes
        .iter()
        .filter_map(|(l, r)| Some((l.as_str(), *r.as_ref().ok()?)))
        .collect();
    let (Some((first, a)), Some((last, b))) = (figures.first(), figures.last()) else {
        not_run(&mut t, "no guest size");
        return t;
    };
    if figures.len() < 2 {
        not_run(&mut t, "one guest size only");
        return t;
    }
    let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6);
    let chain = |f: &dyn Fn(&Harvest) -> Duration| {
        figures
            .iter()
            .map(|(_, h)| us(f(h)))
            .collect::<Vec<_>>()
            .join(" → ")
    };
    let growth = |x: Duration, y: Duration| y.as_secs_f64() / x.as_secs_f64();
    let (gh, gp) = (growth(a.harvest, b.harvest), growth(a.pause, b.pause));
    t.measured = format!(
        "harvest {} µs ({gh:.2}×); pause {} µs ({gp:.2}×), {first} → {last}",
        chain(&|h| h.harvest),
        chain(&|h| h.pause)
    );
    t.baseline = format!(
        "the {first} guest: harvest {} µs, pause {} µs",
        us(a.harvest),
        us(a.pause)
    );
    t.verdict = Verdict::all([Verdict::below(gh, 2.0), Verdict::below(gp, 2.0)]);
    t
}

fn progress(r: &Result<(f64, f64), String>) -> Target {
    let mut t = Target::new(
        "Guest progress protected ÷ unprotected, 25 ms epochs, mixed computation and \
               writes (workload=dirty pages_per_ms=0 wss=16M compute=10000)",
        "≥ 0.9",
        "",
    );
    match r {
        Ok((base, p)) => {
            let ratio = p / base;
            t.measured = format!("{ratio:.3} ({} pages/s protected)", count(*p));
            t.baseline = format!("unprotected: {} pages/s", count(*base));
            t.verdict = Verdict::at_least(ratio, 0.9);
        }
        Err(e) => not_run(&mut t, e),
    }
    t
}

fn not_run(t: &mut Target, why: &str) {
    let why = why.lines().next().unwrap_or("");
    t.measured = "-".into();
    if t.baseline.is_empty() {
        t.baseline = "-".into();
    }
    t.verdict = Verdict::NotRun(why.to_string());
}

/// The smallest and the largest of `v`.
fn range(v: &[f64]) -> Option<(f64, f64)> {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo <= hi).then_some((lo, hi))
}

fn summary_ms(v: &[f64]) -> Option<Summary> {
    let d: Vec<Duration> = v
        .iter()
        .filter(|x| x.is_finite() && **x >= 0.0)
        .map(|x| Duration::from_secs_f64(x / 1000.0))
        .collect();
    Summary::of(&d)
}

fn secs_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Milliseconds with the digits that matter: 0.74, 12.3, 184.
fn ms(v: f64) -> String {
    if v.abs() < 10.0 {
        format!("{v:.2}")
    } else if v.abs() < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// An added time in ms, signed.
fn added(v: f64) -> String {
    let s = ms(v.abs());
    if v < 0.0 {
        format!("−{s} ms")
    } else {
        format!("+{s} ms")
    }
}

/// A count with thousands separators: 35,706.
fn count(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < -0.5 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::html;

    fn pause(p99_ms: f64, pages: f64) -> Pause {
        Pause {
            pages,
            epochs: 800,
            p50_ms: 0.3,
            p99_ms,
            period_ms: Some(25.4),
            capped: Some(0),
        }
    }

    fn summary(p50_us: u64, p99_us: u64) -> Summary {
        Summary {
            count: 5000,
            min: Duration::from_micros(p50_us / 2),
            p50: Duration::from_micros(p50_us),
            p99: Duration::from_micros(p99_us),
            max: Duration::from_micros(p99_us * 2),
            mean: Duration::from_micros(p50_us),
        }
    }

    fn figures(rps: f64, p50_ms: f64, p99_ms: f64) -> Figures {
        Figures {
            rps,
            p50_ms,
            p99_ms,
        }
    }

    fn harvest_at(h_us: u64, p_us: u64) -> Harvest {
        Harvest {
            harvest: Duration::from_micros(h_us),
            pause: Duration::from_micros(p_us),
        }
    }

    /// Inputs that meet every target.
    pub(crate) fn all_met() -> Inputs {
        Inputs {
            pause_2k: Ok(pause(0.74, 1987.0)),
            pause_10k: Ok(Pause {
                capped: Some(106),
                epochs: 120,
                ..pause(1.9, 4053.0)
            }),
            fast: Ok(Pause {
                period_ms: Some(5.3),
                ..pause(0.9, 1010.0)
            }),
            kv_set: Ok((figures(10_000.0, 1.0, 2.0), figures(8_500.0, 1.8, 4.5))),
            one_client: Ok((summary(1000, 2000), summary(1900, 4000))),
            sync: Ok(Sync {
                mem: "2G".into(),
                trials: 3,
                lockstep_ms: 6.5,
                qemu_ms: 84.2,
                qemu: "QEMU emulator version 7.2.22".into(),
            }),
            sigkill: Ok(Trials {
                trials: 3,
                ms: vec![184.0, 190.0, 200.0],
                loss_ms: vec![8.0; 3],
            }),
            host: Ok(Trials {
                trials: 3,
                ms: vec![280.0, 290.0, 299.0],
                loss_ms: vec![2.5, 4.0, 3.1],
            }),
            soak: Ok(Soak {
                seconds: 60,
                false_failovers: 0,
                false_backup_losses: 0,
            }),
            harvest: vec![
                ("1 GiB".into(), Ok(harvest_at(74, 66))),
                ("4 GiB".into(), Ok(harvest_at(85, 80))),
                ("16 GiB".into(), Ok(harvest_at(143, 91))),
            ],
            progress: Ok((37_683.0, 35_706.0)),
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(Verdict::at_most(1.0, 1.0), Verdict::Met);
        assert_eq!(Verdict::at_most(1.001, 1.0), Verdict::Missed);
        assert_eq!(Verdict::at_least(0.9, 0.9), Verdict::Met);
        assert_eq!(Verdict::at_least(0.89, 0.9), Verdict::Missed);
        assert_eq!(Verdict::below(1.99, 2.0), Verdict::Met);
        assert_eq!(Verdict::below(2.0, 2.0), Verdict::Missed);
        assert!(matches!(
            Verdict::at_most(f64::NAN, 1.0),
            Verdict::NotRun(_)
        ));
        assert!(matches!(
            Verdict::at_least(f64::INFINITY, 1.0),
            Verdict::NotRun(_)
        ));
        let nr = |s: &str| Verdict::NotRun(s.into());
        assert_eq!(Verdict::all([Verdict::Met, Verdict::Met]), Verdict::Met);
        assert_eq!(
            Verdict::all([Verdict::Met, Verdict::Missed]),
            Verdict::Missed
        );
        assert_eq!(Verdict::all([nr("a"), Verdict::Missed]), Verdict::Missed);
        assert_eq!(Verdict::all([Verdict::Met, nr("a"), nr("b")]), nr("a"));
        assert_eq!(Verdict::all([]), Verdict::Met);
        assert_eq!(
            (
                Verdict::Met.class(),
                Verdict::Missed.class(),
                nr("x").class()
            ),
            ("met", "missed", "notrun")
        );
        assert_eq!(nr("--quick").text(), "not run: --quick");
    }

    #[test]
    fn every_target_met() {
        let r = rows(&all_met());
        assert_eq!(r.len(), 10);
        for t in &r {
            assert_eq!(t.verdict, Verdict::Met, "{t:?}");
            assert!(!t.measured.is_empty() && !t.baseline.is_empty(), "{t:?}");
        }
        assert_eq!(
            r[0].measured,
            "p99 0.74 ms, p50 0.30 ms; 1,987 pages an epoch, 800 epochs"
        );
        assert!(r[1]
            .measured
            .contains("4,053 pages an epoch achieved, 106 of 120 epochs capped"));
        assert!(r[2]
            .measured
            .starts_with("5.30 ms a period over 800 epochs"));
        assert!(
            r[3].measured.contains("8,500 SET/s (0.85×)"),
            "{}",
            r[3].measured
        );
        assert!(r[3].measured.contains("(+0.80 ms)") && r[3].measured.contains("(+2.50 ms)"));
        assert_eq!(
            r[3].baseline,
            "unprotected: 10,000 SET/s, p50 1.00 ms, p99 2.00 ms"
        );
        assert!(r[4].measured.starts_with("p50 1.90 ms (+0.90 ms)"));
        assert_eq!(r[4].baseline, "unprotected: p50 1.00 ms, p99 2.00 ms");
        assert!(r[5]
            .measured
            .starts_with("0.08×: lockstep 6.50 ms end to end, median of 3"));
        assert_eq!(r[5].baseline, "QEMU emulator version 7.2.22: 84.2 ms");
        assert!(r[6]
            .measured
            .starts_with("p99 200 ms, p50 190 ms; 3 of 3 trials"));
        assert!(r[7]
            .measured
            .starts_with("detection p99 299 ms, p50 290 ms (3 of 3 trials), counted from the start of the link cut (the cut itself took 2.50–4.00 ms);"));
        assert!(r[7].measured.contains("soak of 60 s: 0 false failovers"));
        assert_eq!(
            r[8].measured,
            "harvest 74 → 85 → 143 µs (1.93×); pause 66 → 80 → 91 µs (1.38×), 1 GiB → 16 GiB"
        );
        assert_eq!(r[8].baseline, "the 1 GiB guest: harvest 74 µs, pause 66 µs");
        assert_eq!(r[9].measured, "0.948 (35,706 pages/s protected)");
        assert_eq!(r[9].baseline, "unprotected: 37,683 pages/s");
    }

    #[test]
    fn each_target_can_be_missed() {
        let mut i = all_met();
        i.pause_2k = Ok(pause(1.2, 2010.0));
        i.pause_10k = Ok(pause(2.5, 4000.0));
        i.fast = Ok(Pause {
            period_ms: Some(10.2),
            ..pause(0.5, 1000.0)
        });
        i.kv_set = Ok((figures(10_000.0, 1.0, 2.0), figures(4_400.0, 2.0, 4.1)));
        i.one_client = Ok((summary(1000, 2000), summary(2100, 3000)));
        i.sync = Ok(Sync {
            lockstep_ms: 100.0,
            ..all_met().sync.unwrap()
        });
        i.sigkill = Ok(Trials {
            trials: 3,
            ms: vec![184.0, 190.0, 1046.0],
            loss_ms: Vec::new(),
        });
        i.host = Ok(Trials {
            trials: 2,
            ms: vec![290.0, 310.0],
            loss_ms: Vec::new(),
        });
        i.harvest[2].1 = Ok(harvest_at(150, 91));
        i.progress = Ok((37_683.0, 30_000.0));
        for t in rows(&i) {
            assert_eq!(t.verdict, Verdict::Missed, "{t:?}");
        }
        // One criterion of several is enough to miss.
        let mut i = all_met();
        i.fast = Ok(Pause {
            period_ms: Some(5.0),
            ..pause(1.5, 1000.0)
        });
        i.kv_set = Ok((figures(10_000.0, 1.0, 2.0), figures(9_000.0, 1.5, 5.5)));
        i.soak = Ok(Soak {
            seconds: 60,
            false_failovers: 1,
            false_backup_losses: 0,
        });
        i.harvest[2].1 = Ok(harvest_at(100, 140));
        let r = rows(&i);
        for k in [2, 3, 7, 8] {
            assert_eq!(r[k].verdict, Verdict::Missed, "{:?}", r[k]);
        }
        // A trial without a first reply (or a detection) is a miss whatever the others did.
        let mut i = all_met();
        i.sigkill = Ok(Trials {
            trials: 4,
            ms: vec![184.0, 190.0, 200.0],
            loss_ms: Vec::new(),
        });
        i.host = Ok(Trials {
            trials: 2,
            ms: Vec::new(),
            loss_ms: Vec::new(),
        });
        let r = rows(&i);
        assert_eq!(r[6].verdict, Verdict::Missed);
        assert!(r[6].measured.contains("3 of 4 trials"), "{}", r[6].measured);
        assert_eq!(r[7].verdict, Verdict::Missed);
        assert!(r[7].measured.contains("no detection in 2 trials"));
    }

    #[test]
    fn targets_not_run_say_why() {
        let mut i = all_met();
        i.pause_2k = Err("primary: exited with status 1\nthe log".into());
        i.sync = Err("not run in --quick".into());
        i.host = Err("cannot create the namespace".into());
        i.harvest[1].1 = Err("cannot boot".into());
        i.fast = Ok(Pause {
            period_ms: None,
            ..pause(0.5, 1000.0)
        });
        let r = rows(&i);
        assert_eq!(
            r[0].verdict,
            Verdict::NotRun("primary: exited with status 1".into())
        );
        assert_eq!(r[0].measured, "-");
        assert_eq!(r[5].verdict, Verdict::NotRun("not run in --quick".into()));
        assert_eq!(r[5].baseline, "-");
        assert_eq!(
            r[7].verdict,
            Verdict::NotRun("host-loss trials: cannot create the namespace".into())
        );
        // The soak ran: its figure is still shown.
        assert!(r[7].measured.contains("soak of 60 s: 0 false failovers"));
        assert_eq!(r[8].verdict, Verdict::NotRun("4 GiB: cannot boot".into()));
        assert!(matches!(&r[2].verdict, Verdict::NotRun(w) if w.contains("time of epochs")));
        // A smaller guest than the target's is said.
        let mut i = all_met();
        i.sync = Ok(Sync {
            mem: "512M".into(),
            ..all_met().sync.unwrap()
        });
        assert!(rows(&i)[5].measured.contains("(a 512M guest in this run)"));
    }

    #[test]
    fn the_section_marks_each_row() {
        let mut i = all_met();
        i.progress = Ok((37_683.0, 30_000.0));
        i.sync = Err("qemu-system-x86_64 missing".into());
        let s = section(&rows(&i));
        assert_eq!(s.id, "targets");
        assert!(
            s.intro.ends_with("8 met, 1 missed, 1 not run."),
            "{}",
            s.intro
        );
        let t = &s.tables[0];
        assert_eq!(t.class, "targets");
        assert_eq!(t.header.len(), 5);
        assert_eq!(t.rows.len(), 10);
        assert!(t.rows.iter().all(|r| r.len() == 5));
        assert_eq!(t.row_classes[9], "missed");
        assert_eq!(t.row_classes[5], "notrun");
        assert_eq!(t.rows[5][4], "not run: qemu-system-x86_64 missing");
        assert_eq!(t.row_classes[0], "met");
        let h = html::render(&html::Page {
            sections: vec![s],
            ..html::Page::default()
        });
        assert_eq!(h.matches("<tr class=\"met\">").count(), 8);
        assert_eq!(h.matches("<tr class=\"missed\">").count(), 1);
        assert_eq!(h.matches("<tr class=\"notrun\">").count(), 1);
        assert!(h.contains("<table class=\"targets\">"));
        assert!(h.contains("tr.met td:last-child{"));
        assert!(h.contains("<td>missed</td></tr>"));
        assert!(h.contains("<td>not run: qemu-system-x86_64 missing</td></tr>"));
    }

    #[test]
    fn number_formats() {
        assert_eq!(count(35_706.2), "35,706");
        assert_eq!(count(999.0), "999");
        assert_eq!(count(1_000_000.0), "1,000,000");
        assert_eq!(count(0.0), "0");
        assert_eq!(ms(0.744), "0.74");
        assert_eq!(ms(12.34), "12.3");
        assert_eq!(ms(184.4), "184");
        assert_eq!(added(0.93), "+0.93 ms");
        assert_eq!(added(-0.2), "−0.20 ms");
    }

    #[test]
    fn a_sync_of_another_size_than_2_gib_is_not_judged() {
        let mut i = all_met();
        i.sync = Ok(Sync {
            mem: "512M".into(),
            ..all_met().sync.unwrap()
        });
        let t = sync(&i.sync);
        assert!(
            matches!(&t.verdict, Verdict::NotRun(why) if why.contains("512M")),
            "{t:?}"
        );
        assert!(t.measured.contains("a 512M guest"), "{}", t.measured);
        assert_eq!(sync(&all_met().sync).verdict, Verdict::Met);
    }
}
