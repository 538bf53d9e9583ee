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
use std::time::Duration;

use harness::{Loss, Netns, TrialConfig};

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

struct Plan {
    trials: usize,
    mem: Option<String>,
    modes: Vec<Loss>,
    soak: u64,
    busy: usize,
    extra: Vec<String>,
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
        busy: args.number("busy", 2, 0)?,
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
    let trials = plan.trials;
    let mut failover = Vec::new();
    let mut detection = Vec::new();
    let mut promotion = Vec::new();
    let mut stall = Vec::new();
    let mut lost_total = 0usize;
    let mut broken = 0usize;
    let mut resent = 0usize;
    for t in 0..trials {
        // Lose the primary during continuous epochs, at a moment that varies from trial
        // to trial.
        let kill_after = Duration::from_millis(1500 + (t as u64 * 137) % 1000);
        let cfg = TrialConfig {
            bin: bin.to_path_buf(),
            dir: work.join(format!("trial{m}-{t}")),
            kill_after,
            run_after_failover: Duration::from_millis(200),
            mem: plan.mem.clone(),
            port: 7600 + (m * trials + t) as u16 * 3,
            verbose: false,
            reprotect: false,
            disk: None,
            loss,
            extra: plan.extra.clone(),
        };
        let o = harness::trial(ns, &cfg)?;
        let f = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or("-".into())
        };
        let sent_again = o.backup_log.contains("of committed output the old primary");
        resent += usize::from(sent_again);
        eprintln!(
            "bench failover: {} trial {}/{trials}: failover {}, detection {}, promotion {}, \
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
    Ok(())
}

fn soak(bin: &Path, work: &Path, plan: &Plan, ns: &Netns) -> Result<(), String> {
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
        "bench failover: soak: pairs under client load for {} s, {} busy threads",
        plan.soak, plan.busy
    );
    let o = harness::soak(ns, &cfg, Duration::from_secs(plan.soak), plan.busy)?;
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
    let _ = std::fs::remove_dir_all(&cfg.dir);
    Ok(())
}
