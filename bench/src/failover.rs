//! `bench failover`: how long the clients of a protected kv guest wait when the primary
//! dies, and whether a pair left alone on a busy machine ever fails over by mistake.
//!
//! Each trial is the `lockstep demo` scenario ([`harness::trial`](fn@harness::trial)): a
//! backup and a primary in a network namespace of their own, one client writing over one
//! TCP connection, the primary lost during continuous epochs, the backup fencing it with
//! `scripts/fence-pidfile` and promoting on the same tap. `--mode` picks how the primary
//! is lost:
//!
//! - `sigkill`: the process is SIGKILLed; its kernel closes the replication link, which
//!   the backup notices at once.
//! - `host`: the host is lost: the replication link (the namespace's loopback) goes down
//!   and the primary is frozen, so no FIN or RST reaches anybody; the backup notices the
//!   silence after `--heartbeat-timeout-ms`, then gives a primary that may be alive its
//!   head start (`--fence-delay-ms`, default 1000) before it fences.
//!
//! Figures per trial: loss until the first reply from the promoted guest (what the client
//! sees), loss until the backup's `ROLE CHANGE` (detection; approximate, from the backup's
//! log clock), and the backup's own "declared lost until the guest runs" (fencing plus
//! promotion). Every trial also reads back all acknowledged writes; a loss is reported.
//!
//! `--soak SECONDS` then runs pairs under client load that nobody kills, with `--busy N`
//! threads (default 2, one a core here) spinning next to them, and counts the losses
//! either side declares anyway: false failovers. It also reports the near-miss warnings
//! (a silence of half the heartbeat timeout) and the longest silence of the primary the
//! backup saw.

use std::path::Path;
use std::time::{Duration, SystemTime};

use harness::{Loss, Netns, SoakOutcome, TrialConfig};

use crate::args::Args;
use crate::stats::Summary;
use crate::BenchError;

pub const OPTIONS: &[&str] = &[
    "trials",
    "mem",
    "mode",
    "soak",
    "busy",
    "heartbeat-timeout-ms",
];

/// Threads spinning beside the soak's pairs unless `--busy` says otherwise (one a core
/// here).
const DEFAULT_BUSY: usize = 2;

pub(crate) struct Plan {
    trials: usize,
    mem: Option<String>,
    modes: Vec<Loss>,
    soak: u64,
    busy: usize,
    extra: Vec<String>,
}

impl Plan {
    /// `trials` trials of each way of losing the primary that [`run_trials`] is given, and
    /// a soak of `soak` seconds beside the default busy threads ([`run_soak`]); the
    /// binary's defaults otherwise (its heartbeat timeout among them).
    pub(crate) fn new(trials: usize, soak: u64) -> Plan {
        Plan {
            trials,
            mem: None,
            modes: Vec::new(),
            soak,
            busy: DEFAULT_BUSY,
            extra: Vec::new(),
        }
    }
}

/// One trial's moments, in ms after the SIGKILL was sent: the primary reaped, the
/// backup's `role_change` to unprotected (detected), its fence agent done (fenced), its
/// `role_change` to promoted, these three from the pair's `--events` lines (whole ms), and
/// the client's first reply from the promoted guest.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Timeline {
    pub(crate) reaped: Option<f64>,
    pub(crate) detected: Option<f64>,
    pub(crate) fenced: Option<f64>,
    pub(crate) promoted: Option<f64>,
    pub(crate) first_reply: Option<f64>,
}

impl Timeline {
    /// From a trial's outcome and the `--events` lines both sides appended to `events`.
    fn of(o: &harness::TrialOutcome, events: &str) -> Timeline {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let sent_ms = o
            .kill_sent_at
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(ms);
        let lines: Vec<serde_json::Value> = events
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let at = |want: &dyn Fn(&serde_json::Value) -> bool| -> Option<f64> {
            let ts = lines.iter().find(|v| want(v))?.get("ts")?.as_f64()?;
            Some(ts - sent_ms?)
        };
        let is = |v: &serde_json::Value, key: &str, value: &str| {
            v.get(key).and_then(|x| x.as_str()) == Some(value)
        };
        Timeline {
            reaped: o.kill_took.map(ms),
            detected: at(&|v| is(v, "event", "role_change") && is(v, "role", "backup")),
            fenced: at(&|v| {
                is(v, "event", "fence")
                    && is(v, "target", "the old primary")
                    && is(v, "result", "fenced")
            }),
            promoted: at(&|v| is(v, "event", "role_change") && is(v, "role", "promoted")),
            // The client's wait counts from the reap.
            first_reply: match (o.failover, o.kill_took) {
                (Some(f), Some(k)) => Some(ms(f + k)),
                _ => None,
            },
        }
    }
}

/// One trial's figures.
struct Trial {
    failover: Option<Duration>,
    detection: Option<Duration>,
    /// Declared lost until the guest ran (the backup's own figure).
    promotion: Option<Duration>,
    stall: Option<Duration>,
    lost: usize,
    /// The client's connection failed or no promoted reply came.
    broken: bool,
    /// The promoted backup sent committed output the old primary may still have held.
    resent: bool,
    timeline: Timeline,
}

/// The trials of one way of losing the primary.
pub(crate) struct Trials {
    trials: Vec<Trial>,
}

impl Trials {
    pub(crate) fn timelines(&self) -> Vec<Timeline> {
        self.trials.iter().map(|t| t.timeline).collect()
    }

    /// Trials whose client lost its connection or saw no reply from the promoted guest,
    /// and acknowledged writes lost over all trials.
    pub(crate) fn broken_and_lost(&self) -> (usize, usize) {
        (
            self.trials.iter().filter(|t| t.broken).count(),
            self.trials.iter().map(|t| t.lost).sum(),
        )
    }
}

pub fn run(args: &Args) -> Result<(), BenchError> {
    let modes = match args.get("mode").unwrap_or("both") {
        "sigkill" => vec![Loss::Kill],
        "host" => vec![Loss::Host],
        "both" => vec![Loss::Kill, Loss::Host],
        "none" => Vec::new(),
        other => {
            return Err(BenchError::Usage(format!(
                "--mode {other}: expected sigkill, host, both or none"
            )))
        }
    };
    let extra = match args.get("heartbeat-timeout-ms") {
        Some(_) => vec![
            "--heartbeat-timeout-ms".to_string(),
            args.number::<u64>("heartbeat-timeout-ms", 1000, 1)?
                .to_string(),
        ],
        None => Vec::new(),
    };
    let plan = Plan {
        trials: args.number("trials", 10, 1)?,
        mem: args.get("mem").map(str::to_string),
        modes,
        soak: args.number("soak", 0, 0)?,
        busy: args.number("busy", DEFAULT_BUSY, 0)?,
        extra,
    };
    let bin = harness::try_lockstep_bin().map_err(BenchError::Usage)?;
    let work = std::env::temp_dir().join(format!("lockstep-bench-failover-{}", std::process::id()));
    let result = measure(bin, &work, &plan);
    let _ = std::fs::remove_dir_all(&work);
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            // Not a usage error: say so with the usual prefix and exit 1.
            eprintln!("bench: error: failover: {e}");
            std::process::exit(1);
        }
    }
}

fn mode_name(loss: Loss) -> &'static str {
    match loss {
        Loss::Kill => "primary SIGKILLed",
        Loss::Host => "primary's host lost (link down, process frozen)",
    }
}

fn measure(bin: &Path, work: &Path, plan: &Plan) -> Result<(), String> {
    let ns = Netns::create("lsbfo")?;
    let timeout = plan
        .extra
        .get(1)
        .map_or("(the binary's default)".to_string(), |ms| ms.clone());
    println!("\n## failover: kv guest, --heartbeat-timeout-ms {timeout}\n");
    for (m, &loss) in plan.modes.iter().enumerate() {
        trials(bin, work, plan, &ns, loss, m)?;
    }
    if plan.soak > 0 {
        soak(bin, work, plan, &ns)?;
    }
    Ok(())
}

fn trials(
    bin: &Path,
    work: &Path,
    plan: &Plan,
    ns: &Netns,
    loss: Loss,
    m: usize,
) -> Result<(), String> {
    let t = run_trials(bin, work, plan, ns, loss, m, "bench failover")?;
    print_trials(plan, loss, &t);
    Ok(())
}

/// Runs `plan.trials` trials losing the primary as `loss` (`m`: which of the plan's
/// modes, for distinct ports and directories), one progress line each on stderr after
/// `label`.
pub(crate) fn run_trials(
    bin: &Path,
    work: &Path,
    plan: &Plan,
    ns: &Netns,
    loss: Loss,
    m: usize,
    label: &str,
) -> Result<Trials, String> {
    let trials = plan.trials;
    let mut out = Vec::new();
    for t in 0..trials {
        // Lose the primary during continuous epochs, at a moment that varies from trial
        // to trial.
        let kill_after = Duration::from_millis(1500 + (t as u64 * 137) % 1000);
        let dir = work.join(format!("trial{m}-{t}"));
        // Both sides append their events to one file, for the trial's timeline.
        let events = dir.join("events.jsonl");
        let mut extra = plan.extra.clone();
        extra.extend(["--events".to_string(), events.display().to_string()]);
        let cfg = TrialConfig {
            bin: bin.to_path_buf(),
            dir,
            kill_after,
            run_after_failover: Duration::from_millis(200),
            mem: plan.mem.clone(),
            port: 7600 + (m * trials + t) as u16 * 3,
            verbose: false,
            reprotect: false,
            disk: None,
            loss,
            extra,
        };
        let o = harness::trial(ns, &cfg)?;
        let f = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or("-".into())
        };
        let sent_again = o.backup_log.contains("of committed output the old primary");
        eprintln!(
            "{label}: {} trial {}/{trials}: failover {}, detection {}, promotion {}, \
             {} acknowledged writes, {} lost{}{}",
            match loss {
                Loss::Kill => "sigkill",
                Loss::Host => "host",
            },
            t + 1,
            f(o.failover),
            f(o.detection),
            o.promotion
                .map(|p| format!("{:.0} ms", p.after_lost_ms))
                .unwrap_or("-".into()),
            o.acked.len(),
            o.lost.len(),
            if sent_again {
                ", committed output sent again"
            } else {
                ""
            },
            o.client_error
                .as_ref()
                .map(|e| format!(", client error: {e}"))
                .unwrap_or_default()
        );
        out.push(Trial {
            failover: o.failover,
            detection: o.detection,
            promotion: o
                .promotion
                .filter(|p| p.after_lost_ms.is_finite())
                .map(|p| Duration::from_secs_f64(p.after_lost_ms / 1000.0)),
            stall: o.stall,
            lost: o.lost.len(),
            broken: o.client_error.is_some() || o.failover.is_none(),
            resent: sent_again,
            timeline: Timeline::of(&o, &std::fs::read_to_string(&events).unwrap_or_default()),
        });
        let _ = std::fs::remove_dir_all(&cfg.dir);
    }
    Ok(Trials { trials: out })
}

fn print_trials(plan: &Plan, loss: Loss, t: &Trials) {
    let trials = plan.trials;
    let samples = |f: fn(&Trial) -> Option<Duration>| -> Vec<Duration> {
        t.trials.iter().filter_map(f).collect()
    };
    let failover = samples(|t| t.failover);
    let detection = samples(|t| t.detection);
    let promotion = samples(|t| t.promotion);
    let stall = samples(|t| t.stall);
    let (broken, lost_total) = t.broken_and_lost();
    let resent = t.trials.iter().filter(|t| t.resent).count();
    println!(
        "### {}, during continuous epochs, {trials} trials\n",
        mode_name(loss)
    );
    println!("| figure | n | p50 (ms) | p99 (ms) | max (ms) |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, samples) in [
        ("loss -> first reply from the promoted guest", &failover),
        ("client stall (longest gap between replies)", &stall),
        ("loss -> backup's ROLE CHANGE (detection)", &detection),
        (
            "declared lost -> guest running (fence delay + fence + promote)",
            &promotion,
        ),
    ] {
        match Summary::of(samples) {
            Some(s) => println!(
                "| {name} | {} | {:.1} | {:.1} | {:.1} |",
                s.count,
                s.p50.as_secs_f64() * 1000.0,
                s.p99.as_secs_f64() * 1000.0,
                s.max.as_secs_f64() * 1000.0
            ),
            None => println!("| {name} | 0 | - | - | - |"),
        }
    }
    println!(
        "\nacknowledged writes lost: {lost_total}; trials where the client's connection failed \
         or no promoted reply came: {broken}; trials where the promoted backup sent committed \
         output the old primary may still have held: {resent}\n"
    );
    match loss {
        Loss::Kill => println!(
            "A SIGKILLed process's connection is closed by its kernel: detection is immediate. \
             The client's wait beyond promotion is its own TCP retransmission of a request the \
             dead primary took but the backup never committed (200 ms at least on Linux).\n"
        ),
        Loss::Host => println!(
            "A lost host is detected by the heartbeat timeout; the backup then waits \
             --fence-delay-ms (1000 by default), the head start of a primary that may be alive \
             behind a cut link, before it fences and promotes.\n"
        ),
    }
}

fn soak(bin: &Path, work: &Path, plan: &Plan, ns: &Netns) -> Result<(), String> {
    let o = run_soak(bin, work, plan, ns, "bench failover")?;
    println!(
        "### soak: {} s of a protected pair under client load, nobody killed, {} threads \
         spinning beside it\n",
        o.ran.as_secs(),
        plan.busy
    );
    println!("| figure | value |");
    println!("| --- | --- |");
    println!("| pairs started | {} |", o.pairs);
    println!("| client replies | {} |", o.replies);
    println!(
        "| false failovers (the backup declared the primary lost) | {} |",
        o.false_failovers
    );
    println!(
        "| false backup losses (the primary declared the backup lost) | {} |",
        o.false_backup_losses
    );
    println!(
        "| near misses (a silence of half the heartbeat timeout or more) | {} |",
        o.near_misses
    );
    println!(
        "| longest silence of the primary the backup saw (ms) | {} |",
        o.longest_silence
            .map_or("-".to_string(), |d| d.as_millis().to_string())
    );
    if o.false_failovers + o.false_backup_losses > 0 {
        eprintln!(
            "bench failover: soak: the last pair that declared a loss:\n{}",
            o.logs
        );
    }
    Ok(())
}

/// Runs pairs nobody kills for `plan.soak` seconds beside `plan.busy` spinning threads
/// (`harness::soak`), saying so on stderr after `label`.
pub(crate) fn run_soak(
    bin: &Path,
    work: &Path,
    plan: &Plan,
    ns: &Netns,
    label: &str,
) -> Result<SoakOutcome, String> {
    let cfg = TrialConfig {
        bin: bin.to_path_buf(),
        dir: work.join("soak"),
        kill_after: Duration::ZERO,
        run_after_failover: Duration::ZERO,
        mem: plan.mem.clone(),
        port: 7590,
        verbose: false,
        reprotect: false,
        disk: None,
        loss: Loss::Kill,
        extra: plan.extra.clone(),
    };
    eprintln!(
        "{label}: soak: pairs under client load for {} s, {} busy threads",
        plan.soak, plan.busy
    );
    let o = harness::soak(ns, &cfg, Duration::from_secs(plan.soak), plan.busy);
    let _ = std::fs::remove_dir_all(&cfg.dir);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_from_the_events() {
        // Both sides' lines in one file: the primary's (pid 10) first, as in a trial.
        let events = r#"{"ts":1000,"pid":10,"event":"protection","state":"syncing","why":"initial sync started"}
{"ts":1100,"pid":11,"event":"protection","state":"protected","why":"the first epoch committed"}
{"ts":5001,"pid":11,"event":"role_change","role":"backup","protection":"unprotected","guest":"paused","why":"primary lost"}
{"ts":5002,"pid":11,"event":"fence","target":"the old primary","node":"demo-primary","attempt":1,"result":"started","detail":"x"}
{"ts":5033,"pid":11,"event":"fence","target":"the old primary","node":"demo-primary","attempt":1,"result":"fenced","detail":""}
{"ts":5047,"pid":11,"event":"role_change","role":"promoted","protection":"unprotected","guest":"running","why":"promoted"}
a line cut short by a SIGKILL {"ts
"#;
        let mut o = harness::TrialOutcome {
            kill_sent_at: Some(SystemTime::UNIX_EPOCH + Duration::from_micros(5_000_500)),
            kill_took: Some(Duration::from_millis(8)),
            failover: Some(Duration::from_millis(192)),
            ..Default::default()
        };
        let t = Timeline::of(&o, events);
        let near = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < 1e-6;
        assert!(near(t.reaped, 8.0));
        assert!(near(t.detected, 0.5));
        assert!(near(t.fenced, 32.5));
        assert!(near(t.promoted, 46.5));
        assert!(near(t.first_reply, 200.0));
        // No promotion, no events, no kill time: those moments are unknown.
        let cut = &events[..events.find(r#"{"ts":5047"#).unwrap()];
        o.failover = None;
        let t = Timeline::of(&o, cut);
        assert_eq!((t.promoted, t.first_reply), (None, None));
        assert!(t.fenced.is_some());
        let none = Timeline {
            reaped: Some(8.0),
            ..Timeline::default()
        };
        assert_eq!(Timeline::of(&o, ""), none);
        o.kill_sent_at = None;
        assert_eq!(Timeline::of(&o, events), none);
    }
}
