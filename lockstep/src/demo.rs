//! `lockstep demo`: failover end to end on this host, with nothing else than root and
//! `/dev/kvm`.
//!
//! The demo creates a network namespace of its own with a tap (10.0.0.1/24 on the host
//! side), starts a backup and a primary running the kv guest (10.0.0.2) as child processes
//! of this executable inside it, and drives the guest from a client that keeps ONE TCP
//! connection open and records every acknowledged write (`SET k<i> <i>`, `INCR counter`).
//! Mid-run it SIGKILLs the primary. The backup notices, fences the dead primary with
//! `scripts/fence-pidfile` (embedded in the harness and written to the demo's temporary
//! directory), and promotes: it resumes the guest from the last committed epoch on the same
//! tap. The client carries on over the same connection, then reads back every acknowledged
//! key. Once the promoted guest runs, a new backup is started (it stands for the old
//! primary's host come back) and `lockstep ctl protect` makes the pair protected again
//! while the client keeps writing. The guest has a disk (the kv guest logs every write on
//! it before replying, `aof=on`) that the backup keeps a copy of; at the end a new guest
//! boots from the promoted disk alone and must find every acknowledged write. The demo
//! exits 0 only if nothing acknowledged was lost, the connection survived, the pair was
//! protected again, and the promoted disk holds every acknowledged write.
//!
//! The scenario itself is [`harness::trial`](fn@harness::trial), which the failover benchmark runs too.

use std::process::ExitCode;
use std::time::Duration;

use harness::trial::GUEST_ADDR;
use harness::{interrupted, trial, Netns, TrialConfig, TrialOutcome};

use super::cli::{usage, CliError, DemoArgs};

/// The demo guest's disk (64 MiB), in the demo's temporary directory.
const DEMO_DISK: u64 = 64 << 20;

/// `lockstep demo [--seconds S]`.
pub fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    engine::log::init("demo");
    let seconds = args.seconds.unwrap_or(3.0);
    if !(0.5..=3600.0).contains(&seconds) {
        return Err(usage(format!(
            "--seconds {seconds}: must be between 0.5 and 3600"
        )));
    }
    // Ctrl-C and SIGTERM set the flag every wait of the harness polls, so it cleans up.
    engine::replication::install_stop_handler();
    match demo(seconds) {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::from(1)),
        Err(e) => {
            eprintln!("lockstep: error: demo: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn demo(seconds: f64) -> Result<bool, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("needs root (it creates a network namespace and a tap)".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let bin = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let dir = std::env::temp_dir().join(format!("lockstep-demo-{}", std::process::id()));
    let ns = Netns::create("lsdemo")?;
    println!(
        "== lockstep failover demo: namespace {}, tap0 10.0.0.1/24, kv guest at {GUEST_ADDR}",
        ns.name
    );
    println!(
        "== the client writes SET k<i> <i> and INCR counter over ONE TCP connection; \
         the primary is SIGKILLed after {seconds} s; then a new backup protects the promoted guest"
    );
    let cfg = TrialConfig {
        bin,
        dir: dir.clone(),
        kill_after: Duration::from_secs_f64(seconds),
        run_after_failover: Duration::from_secs_f64(seconds.min(3.0)),
        mem: None,
        port: 7600,
        verbose: true,
        reprotect: true,
        // The kv guest logs every write on its disk (aof=on); the backup keeps a copy.
        disk: Some(DEMO_DISK),
        loss: Default::default(),
        extra: Vec::new(),
    };
    let result = trial(&ns, &cfg);
    drop(ns);
    let o = match result {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    if interrupted() {
        println!("== interrupted: children killed, namespace and temporary files removed");
        return Ok(false);
    }
    Ok(summary(&o))
}

/// Prints the outcome; true when nothing acknowledged was lost and the connection survived.
fn summary(o: &TrialOutcome) -> bool {
    println!("\n== summary");
    let plog = &o.primary_log;
    let field = |line: &str, name: &str| -> Option<String> {
        line.split_whitespace()
            .skip_while(|w| *w != name && !w.starts_with(&format!("{name}=")))
            .find_map(|w| w.split_once('=').map(|(_, v)| v.to_string()))
    };
    // The primary logs its figures every 2 s and was SIGKILLed in between: its last line
    // is older than the kill, and counts fewer epochs than the backup committed.
    match plog.lines().rev().find(|l| l.contains("pause_us")) {
        Some(l) => {
            let at = harness::trial::log_time(l)
                .map_or(String::new(), |t| format!(" (at {:.1} s)", t.as_secs_f64()));
            println!(
                "epochs the primary had reported by its last stats line before the kill{at}: {}",
                field(l, "epochs").unwrap_or_default()
            );
            let pause = l.split("pause_us").nth(1).unwrap_or_default();
            println!(
                "pause (us), from that line:{}",
                pause.split("commit_us").next().unwrap_or("")
            );
            let eps: f64 = field(l, "epochs")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let bytes: f64 = field(l, "wire_bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if eps > 0.0 {
                println!("bytes per epoch, from that line: {:.0}", bytes / eps);
            }
            println!(
                "compression, from that line: {}",
                field(l, "compression").unwrap_or("n/a".into())
            );
        }
        None => println!(
            "pause p50/p99, bytes per epoch, compression: not available — the primary was \
             SIGKILLed before it logged its figures (every 2 s, and at the end)"
        ),
    }
    match o.promotion {
        Some(p) => {
            println!(
                "last epoch the backup committed before the kill: {} (the promoted guest \
                 resumed from it)",
                p.epoch
            );
            println!(
                "promotion (backup: declared lost -> guest running): {:.1} ms",
                p.after_lost_ms
            );
        }
        None => println!("the backup did not promote"),
    }
    if let Some(d) = o.detection {
        println!(
            "detection (kill -> backup's ROLE CHANGE, approximate): {:.0} ms",
            d.as_secs_f64() * 1000.0
        );
    }
    match o.failover {
        Some(d) => println!(
            "time to failover (kill -> first reply from the promoted guest): {:.1} ms",
            d.as_secs_f64() * 1000.0
        ),
        None => println!("time to failover: no reply from a promoted guest"),
    }
    if let Some(s) = o.stall {
        println!(
            "client stall (longest gap between replies): {:.1} ms",
            s.as_secs_f64() * 1000.0
        );
    }
    let survived = o.connected && o.client_error.is_none() && o.read_back;
    println!(
        "acknowledged writes: {} ({} before the kill, {} after); INCR counter at {}",
        o.acked.len(),
        o.acked_before_kill,
        o.acked.len() - o.acked_before_kill.min(o.acked.len()),
        o.counters.last().copied().unwrap_or(0)
    );
    match &o.client_error {
        Some(e) => println!("connection: LOST ({e})"),
        None if o.connected => println!("connection: survived the failover"),
        None => println!("connection: never established"),
    }
    let lost = if o.read_back {
        o.lost.len()
    } else {
        o.acked.len()
    };
    println!(
        "acknowledged writes lost: {lost}{}",
        if o.read_back {
            ""
        } else {
            " (the read-back did not complete)"
        }
    );
    let reprotected = match &o.reprotect {
        Some(r) => match &r.took {
            Ok(d) => {
                println!(
                    "re-protect (ctl protect on the promoted guest -> new backup committed its \
                     first epoch): {:.0} ms; the new backup had committed {} epochs at the end",
                    d.as_secs_f64() * 1000.0,
                    r.committed.map_or("?".to_string(), |e| e.to_string())
                );
                r.committed.is_some_and(|e| e >= 1)
            }
            Err(e) => {
                println!("re-protect: FAILED: {e}");
                println!("== new backup log\n{}", r.log);
                false
            }
        },
        None => {
            println!("re-protect: did not run");
            false
        }
    };
    let disk_ok = match &o.cold {
        Some(Ok(c)) => {
            println!(
                "promoted disk, booted cold in a new guest: {} of {} acknowledged writes \
                 found, counter {} (last told {})",
                c.keys - c.lost.len(),
                c.keys,
                c.counter.map_or("missing".into(), |n| n.to_string()),
                c.last_told.map_or("-".into(), |n| n.to_string())
            );
            c.lost.is_empty() && c.counter == c.last_told
        }
        Some(Err(e)) => {
            println!("promoted disk: the cold boot FAILED: {e}");
            false
        }
        None => {
            println!("promoted disk: not checked (no promotion)");
            false
        }
    };
    let ok = survived && o.lost.is_empty() && o.failover.is_some() && reprotected && disk_ok;
    if !ok {
        println!("\n== backup log\n{}", o.backup_log);
        println!("== primary log (last lines)");
        let lines: Vec<&str> = o.primary_log.lines().collect();
        for l in &lines[lines.len().saturating_sub(15)..] {
            println!("{l}");
        }
    }
    println!("== {}", if ok { "OK" } else { "FAILED" });
    ok
}
