//! lockstep's benchmark harness: `cargo run --release -p bench -- <subcommand> [options]`.
//!
//! Each subcommand measures one thing on the real engine and prints a markdown table of
//! p50 / p99 / max. These are benchmarks, never tests: nothing here asserts a time.
//!
//! Subcommands live in their own module (`pause.rs`, `checkpoint.rs`, `sync.rs`, ...) with
//! a `run(&Args)` entry point, listed in [`SUBCOMMANDS`] and dispatched in [`dispatch`]. `stats.rs` holds the percentile helpers they share; `report/` runs a suite of them
//! and draws it as one HTML page.

mod args;
mod checkpoint;
mod disk;
mod failover;
mod harvest;
mod link;
mod net;
mod pause;
mod report;
mod runs;
mod stats;
mod sync;

use std::process::ExitCode;

use thiserror::Error;

use crate::args::Args;

/// Subcommands and what they measure, for the usage text.
const SUBCOMMANDS: &[(&str, &str)] = &[
    (
        "pause",
        "pause latency (until every vCPU is parked, until the state is captured) and resume \
         latency, 1 and 2 vCPUs, idle and dirtying guest, and a booting Linux kernel with \
         --kernel VMLINUX [--samples N (500)] [--gap-ms MS (3)] [--linux-warmup-ms MS (20000)]",
    ),
    (
        "checkpoint",
        "primary + backup over loopback: pause, commit latency and wire bytes per dirty rate \
         and interval, guest progress protected / unprotected, pre-copy and dirty storms \
         [--seconds S (3)] [--intervals 5,25] [--pages 100,1000,10000] [--mem 256M] \
         [--wss 128M] [--sync on|off (on)] [--compute N (10000): the mixed progress rows, 0: none]",
    ),
    (
        "disk",
        "disk replication, protected / unprotected in one run: kv aof=on under \
         redis-benchmark (SET/s, p50/p99), the disk workload's writes/s, the initial disk \
         sync rate [--requests N (5000)] [--clients LIST (20,1)] [--interval-ms MS (25)] \
         [--seconds S (5)] [--image MiB (256)]",
    ),
    (
        "failover",
        "SIGKILL the primary of a protected kv guest under client load: kill -> first reply \
         from the promoted guest, detection, fence + promotion [--trials N (10)] [--mem SIZE]",
    ),
    (
        "sync",
        "initial sync of a mostly untouched guest end to end, lockstep against QEMU's live \
         migration of the same RAM size over loopback (installs qemu-system-x86 when \
         missing, or says the comparison was skipped) [--mem 512M,2G,8G (2G)] \
         [--trials N (3)]",
    ),
    (
        "harvest",
        "dirty harvest and pause per epoch, bitmap (manual protect) vs dirty ring, same \
         workload, per guest size [--samples N (40)] [--pages 1000,10000,50000] \
         [--mem 1G,4G,16G (512M)]",
    ),
    (
        "link",
        "mutual TLS on the replication link, TLS / --insecure in one run: initial sync of a \
         running guest's random pages, epoch stream rate, commit latency [--trials N (3)] \
         [--seconds S (5)] [--wss 512M] [--fill S (8)]",
    ),
    (
        "net",
        "redis-benchmark GET/SET against the kv guest in a network namespace: unprotected, \
         protected with and without early checkpoints, per client count (one client: request -> \
         reply latency added) [--requests N (5000)] [--clients LIST (20,1)] \
         [--interval-ms MS (25)]",
    ),
    (
        "report",
        "runs a suite and writes DIR/index.html, one self-contained page of SVG plots and \
         tables: epoch pause CDFs by dirty rate (from the primary's --stats-json), pause \
         against dirty pages, one client's request latency protected / unprotected, a \
         failover timeline per SIGKILL trial; the machine and the command \
         --out DIR [--quick: a subset, a few minutes]",
    ),
];

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Machine(#[from] engine::machine::MachineError),
    #[error("{what}: the guest stopped during the benchmark: {event}")]
    GuestStopped { what: String, event: String },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("{0}")]
    Failed(String),
}

impl BenchError {
    fn exit_code(&self) -> u8 {
        match self {
            BenchError::Usage(_) => 2,
            _ => 1,
        }
    }
}

fn usage() -> String {
    let mut s = String::from("usage: bench <subcommand> [options]\n\nsubcommands:\n");
    for (name, what) in SUBCOMMANDS {
        s.push_str(&format!("  {name:<10} {what}\n"));
    }
    s
}

fn names() -> String {
    SUBCOMMANDS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn dispatch(args: &[String]) -> Result<(), BenchError> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(BenchError::Usage(format!(
            "no subcommand given (try: {}, --help)",
            names()
        )));
    };
    if rest.iter().any(|a| a == "--help" || a == "-h") {
        if let Some((name, what)) = SUBCOMMANDS.iter().find(|(n, _)| n == cmd) {
            println!("usage: bench {name} [options]\n\n{what}");
            return Ok(());
        }
    }
    match cmd.as_str() {
        "pause" => pause::run(&Args::parse("pause", rest, pause::OPTIONS)?),
        "checkpoint" => checkpoint::run(&Args::parse("checkpoint", rest, checkpoint::OPTIONS)?),
        "disk" => disk::run(&Args::parse("disk", rest, disk::OPTIONS)?),
        "failover" => failover::run(&Args::parse("failover", rest, failover::OPTIONS)?),
        "harvest" => harvest::run(&Args::parse("harvest", rest, harvest::OPTIONS)?),
        "sync" => sync::run(&Args::parse("sync", rest, sync::OPTIONS)?),
        "link" => link::run(&Args::parse("link", rest, link::OPTIONS)?),
        "net" => net::run_bench(&Args::parse("net", rest, net::OPTIONS)?),
        "report" => report::run(&Args::parse_with_flags(
            "report",
            rest,
            report::OPTIONS,
            report::FLAGS,
        )?),
        "-h" | "--help" | "help" => {
            print!("{}", usage());
            Ok(())
        }
        other => Err(BenchError::Usage(format!(
            "unknown subcommand '{other}' (try: {}, --help)",
            names()
        ))),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_subcommand_answers_help_without_running() {
        for (name, _) in SUBCOMMANDS {
            for flag in ["--help", "-h"] {
                assert!(dispatch(&strings(&[name, flag])).is_ok(), "{name} {flag}");
            }
        }
        assert!(matches!(
            dispatch(&strings(&["nosuch", "--help"])),
            Err(BenchError::Usage(_))
        ));
    }
}
