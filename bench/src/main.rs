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

/// A subcommand: its name, the options it takes (`--name value`) and its flags (`--name`),
/// and what it measures, for the usage text (every option listed, with its default).
struct Subcommand {
    name: &'static str,
    options: &'static [&'static str],
    flags: &'static [&'static str],
    help: &'static str,
}

const SUBCOMMANDS: &[Subcommand] = &[
    Subcommand {
        name: "pause",
        options: pause::OPTIONS,
        flags: &[],
        help: "pause latency (until every vCPU is parked, until the state is captured) and \
               resume latency, 1 and 2 vCPUs, idle and dirtying guest, and a booting Linux \
               kernel with --kernel VMLINUX [--samples N (500)] [--gap-ms MS (3)] \
               [--linux-warmup-ms MS (20000)]",
    },
    Subcommand {
        name: "checkpoint",
        options: checkpoint::OPTIONS,
        flags: &[],
        help: "primary + backup over loopback: pause, commit latency and wire bytes per dirty \
               rate and interval, guest progress protected / unprotected, pre-copy and dirty \
               storms [--seconds S (3)] [--intervals 5,25] [--pages 100,1000,10000] \
               [--mem SIZE (256M)] [--wss SIZE (128M), at most --mem] [--sync on|off (on)] \
               [--compute N (10000): the mixed progress rows, 0: none]",
    },
    Subcommand {
        name: "disk",
        options: disk::OPTIONS,
        flags: &[],
        help: "disk replication, protected / unprotected in one run: kv aof=on under \
               redis-benchmark (SET/s, p50/p99), the disk workload's writes/s, the initial disk \
               sync rate [--requests N (5000)] [--clients LIST (20,1)] [--interval-ms MS (25)] \
               [--seconds S (5)] [--image MiB (256)]",
    },
    Subcommand {
        name: "failover",
        options: failover::OPTIONS,
        flags: &[],
        help: "lose the primary of a protected kv guest under client load: kill -> first \
               reply from the promoted guest, detection, fence + promotion; then, with --soak, \
               pairs nobody kills on a busy machine, and the losses they declare anyway \
               (false failovers) [--trials N (10)] [--mem SIZE] \
               [--mode sigkill|host|both|none (both): SIGKILL the process, or lose its host \
               (link cut, process frozen: no FIN)] [--soak SECONDS (0: none)] \
               [--busy N (2): threads spinning during the soak] \
               [--heartbeat-timeout-ms MS (the binary's default), given to both sides]",
    },
    Subcommand {
        name: "sync",
        options: sync::OPTIONS,
        flags: &[],
        help: "initial sync of a mostly untouched guest end to end, lockstep against QEMU's \
               live migration of the same RAM size over loopback (installs qemu-system-x86 \
               when missing, or says the comparison was skipped) [--mem 512M,2G,8G (2G)] \
               [--trials N (3)]",
    },
    Subcommand {
        name: "harvest",
        options: harvest::OPTIONS,
        flags: &[],
        help: "dirty harvest and pause per epoch, bitmap (manual protect) vs dirty ring, same \
               workload, per guest size [--samples N (40)] [--pages 1000,10000,50000] \
               [--mem 1G,4G,16G (512M)]",
    },
    Subcommand {
        name: "link",
        options: link::OPTIONS,
        flags: &[],
        help: "mutual TLS on the replication link, TLS / --insecure in one run: initial sync of \
               a running guest's random pages, epoch stream rate, commit latency, and the \
               transport's capacity alone [--trials N (3)] [--seconds S (5)] [--wss 512M] \
               [--fill S (8)] [--capacity-mib MiB (512): sent through the bare transport]",
    },
    Subcommand {
        name: "net",
        options: net::OPTIONS,
        flags: &[],
        help: "redis-benchmark GET/SET against the kv guest in a network namespace: \
               unprotected, protected with and without early checkpoints, per client count \
               (one client: request -> reply latency added) [--requests N (5000)] \
               [--clients LIST (20,1)] [--interval-ms MS (25)]",
    },
    Subcommand {
        name: "report",
        options: report::OPTIONS,
        flags: report::FLAGS,
        help: "runs a suite and writes DIR/index.html, one self-contained page of SVG plots and \
               tables: the project's performance targets (met, missed or not run, each against \
               this run's figure and baseline), epoch pause CDFs by dirty rate (from the \
               primary's --stats-json), pause against dirty pages, one client's request \
               latency protected / unprotected, a failover timeline per SIGKILL trial; the \
               machine and the command --out DIR [--quick: a subset, a few minutes]",
    },
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
    for c in SUBCOMMANDS {
        s.push_str(&format!("  {:<10} {}\n", c.name, c.help));
    }
    s
}

fn names() -> String {
    SUBCOMMANDS
        .iter()
        .map(|c| c.name)
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
    if matches!(cmd.as_str(), "-h" | "--help" | "help") {
        print!("{}", usage());
        return Ok(());
    }
    let Some(sub) = SUBCOMMANDS.iter().find(|c| c.name == cmd) else {
        return Err(BenchError::Usage(format!(
            "unknown subcommand '{cmd}' (try: {}, --help)",
            names()
        )));
    };
    if rest.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: bench {} [options]\n\n{}", sub.name, sub.help);
        return Ok(());
    }
    let args = Args::parse(sub.name, rest, sub.options, sub.flags)?;
    match sub.name {
        "pause" => pause::run(&args),
        "checkpoint" => checkpoint::run(&args),
        "disk" => disk::run(&args),
        "failover" => failover::run(&args),
        "harvest" => harvest::run(&args),
        "sync" => sync::run(&args),
        "link" => link::run(&args),
        "net" => net::run_bench(&args),
        "report" => report::run(&args),
        other => unreachable!("subcommand {other} listed without an entry point"),
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
        for Subcommand { name, .. } in SUBCOMMANDS {
            for flag in ["--help", "-h"] {
                assert!(dispatch(&strings(&[name, flag])).is_ok(), "{name} {flag}");
            }
        }
        assert!(matches!(
            dispatch(&strings(&["nosuch", "--help"])),
            Err(BenchError::Usage(_))
        ));
    }

    /// `--name` appears in `help` as a whole option name (not the start of a longer one).
    fn mentions(help: &str, name: &str) -> bool {
        let needle = format!("--{name}");
        help.match_indices(&needle).any(|(at, _)| {
            !help[at + needle.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
        })
    }

    #[test]
    fn every_option_is_in_its_help() {
        for c in SUBCOMMANDS {
            assert!(
                !c.options.is_empty() || !c.flags.is_empty(),
                "{} takes no options",
                c.name
            );
            for o in c.options.iter().chain(c.flags) {
                assert!(
                    mentions(c.help, o),
                    "bench {} --help does not list --{o}",
                    c.name
                );
            }
        }
        assert!(mentions("[--mem SIZE]", "mem"));
        assert!(!mentions("[--memory SIZE]", "mem"));
        assert!(!mentions("[--mem-size SIZE]", "mem"));
    }

    #[test]
    fn usage_lists_every_subcommand() {
        let u = usage();
        for c in SUBCOMMANDS {
            assert!(u.contains(&format!("  {:<10} ", c.name)), "{}", c.name);
        }
        assert!(matches!(dispatch(&[]), Err(BenchError::Usage(_))));
        assert!(matches!(
            dispatch(&strings(&["pause", "--nope", "1"])),
            Err(BenchError::Usage(m)) if m.contains("unknown option --nope")
        ));
    }
}
