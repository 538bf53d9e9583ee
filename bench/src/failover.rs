//! `bench failover`: how long the clients of a protected kv guest wait when the primary
//! dies. Each trial is the `lockstep demo` scenario ([`harness::trial`](fn@harness::trial)): a backup and
//! a primary in a network namespace of their own, one client writing over one TCP
//! connection, the primary SIGKILLed during continuous epochs, the backup fencing it with
//! `scripts/fence-pidfile` and promoting on the same tap.
//!
//! Figures per trial: kill until the first reply from the promoted guest (what the client
//! sees), kill until the backup's `ROLE CHANGE` (detection; approximate, from the backup's
//! log clock), and the backup's own "declared lost until the guest runs" (fencing plus
//! promotion). Every trial also reads back all acknowledged writes; a loss is reported.

use std::path::Path;
use std::time::Duration;

use harness::{Netns, TrialConfig};

use crate::args::Args;
use crate::stats::Summary;
use crate::BenchError;

pub const OPTIONS: &[&str] = &["trials", "mem"];

pub fn run(args: &Args) -> Result<(), BenchError> {
    let trials: usize = args.number("trials", 10, 1)?;
    let mem = args.get("mem").map(str::to_string);
    let bin = harness::try_lockstep_bin().map_err(BenchError::Usage)?;
    let work = std::env::temp_dir().join(format!("lockstep-bench-failover-{}", std::process::id()));
    let result = measure(bin, &work, trials, mem);
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

fn measure(bin: &Path, work: &Path, trials: usize, mem: Option<String>) -> Result<(), String> {
    let ns = Netns::create("lsbfo")?;
    let mut failover = Vec::new();
    let mut detection = Vec::new();
    let mut promotion = Vec::new();
    let mut stall = Vec::new();
    let mut lost_total = 0usize;
    let mut broken = 0usize;
    for t in 0..trials {
        // Kill during continuous epochs, at a moment that varies from trial to trial.
        let kill_after = Duration::from_millis(1500 + (t as u64 * 137) % 1000);
        let cfg = TrialConfig {
            bin: bin.to_path_buf(),
            dir: work.join(format!("trial{t}")),
            kill_after,
            run_after_failover: Duration::from_millis(200),
            mem: mem.clone(),
            port: 7600 + t as u16,
            verbose: false,
            reprotect: false,
            disk: None,
        };
        let o = harness::trial(&ns, &cfg)?;
        let f = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or("-".into())
        };
        eprintln!(
            "bench failover: trial {}/{trials}: failover {}, detection {}, promotion {}, \
             {} acknowledged writes, {} lost{}",
            t + 1,
            f(o.failover),
            f(o.detection),
            o.promotion
                .map(|p| format!("{:.0} ms", p.after_lost_ms))
                .unwrap_or("-".into()),
            o.acked.len(),
            o.lost.len(),
            o.client_error
                .as_ref()
                .map(|e| format!(", client error: {e}"))
                .unwrap_or_default()
        );
        lost_total += o.lost.len();
        if o.client_error.is_some() || o.failover.is_none() {
            broken += 1;
        }
        failover.extend(o.failover);
        detection.extend(o.detection);
        stall.extend(o.stall);
        if let Some(p) = o.promotion {
            if p.after_lost_ms.is_finite() {
                promotion.push(Duration::from_secs_f64(p.after_lost_ms / 1000.0));
            }
        }
        let _ = std::fs::remove_dir_all(&cfg.dir);
    }
    drop(ns);
    println!(
        "\n## failover: kv guest, primary SIGKILLed during continuous epochs, {trials} trials\n"
    );
    println!("| figure | n | p50 (ms) | p99 (ms) | max (ms) |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, samples) in [
        ("kill -> first reply from the promoted guest", &failover),
        ("client stall (longest gap between replies)", &stall),
        ("kill -> backup's ROLE CHANGE (detection)", &detection),
        (
            "declared lost -> guest running (fence + promote)",
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
         or no promoted reply came: {broken}"
    );
    println!(
        "\nDetection is immediate here: a SIGKILLed process's TCP connection is closed by its \
         kernel. A dead host is detected by the heartbeat timeout instead (--heartbeat-timeout-ms, \
         1000 by default). The client's wait beyond promotion is TCP retransmission (at least \
         200 ms on Linux)."
    );
    Ok(())
}
