//! The `lockstep` command line.
//!
//! Hand-written rather than clap: the grammar is small, and every mistake must come out as
//! one line naming the problem (clap prints usage blocks).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use thiserror::Error;

use engine::devices::serial::Console;
use engine::devices::NetConfig;
use engine::machine::{BootConfig, Machine, MachineConfig, MachineError};
use engine::pidfile::{PidFile, PidFileError};
use engine::replication::backup::{self, BackupError, BackupOptions};
use engine::replication::failover;
use engine::replication::fence::{parse_fence_arg, FenceAgent, FenceConfig};
use engine::replication::primary::{self, OnBackupLoss, PrimaryError, PrimaryOptions};
use engine::size::{parse_size, SizeError};
use engine::snapshot::{self, SnapshotError};
use engine::vstate::vcpu::VcpuEvent;
use engine::{info, log};

pub const USAGE: &str = "\
usage:
  lockstep run --guest builtin|PATH [--guest-args STR] [--mem SIZE] [--vcpus N]
               [--console stdout|none|PATH] [--net tap=NAME[,mac=MAC]]
               [--snapshot-after-ms MS --snapshot-to DIR]
  lockstep restore DIR [--console stdout|none|PATH] [--net tap=NAME[,mac=MAC]]
  lockstep primary --peer ADDR:PORT [--interval-ms MS] [--seconds S] [--window N]
               [--min-interval-ms MS] [--no-early-checkpoint] [--name NAME]
               [--heartbeat-timeout-ms MS] [--on-backup-loss fence|pause|continue]
               [--fence-cmd CMD [--peer-node NODE] [--fence-arg K=V]... [--fence-timeout-s S]]
               [--pid-file PATH] [--dirty-ring ENTRIES] [--max-epoch-pages N]
               <the run options>
  lockstep backup --listen ADDR:PORT [--mem SIZE] [--vcpus N] [--name NAME]
               [--run-after-end] [--console stdout|none|PATH] [--net tap=NAME[,mac=MAC]]
               [--heartbeat-timeout-ms MS] [--pid-file PATH]
               [--fence-cmd CMD [--peer-node NODE] [--fence-arg K=V]... [--fence-timeout-s S]
               [--fence-delay-ms MS] | --fence none]
  lockstep demo [--seconds S]

Fencing (docs/fencing.md): CMD runs as `sh -c CMD` with key=value lines on stdin, the
fence-agents convention: each --fence-arg, then action=off, nodename=NODE, port=NODE and
plug=NODE. Those keys (and option, missing_as_off, port_as_ip, plug_separator,
separator, help, version) are lockstep's: a --fence-arg cannot set them. Only exit 0 within --fence-timeout-s (10) counts as fenced.
The backup fences the primary before it promotes, after --fence-delay-ms (1000) when the
primary went silent (the primary's head start); the primary fences the backup before it
releases output the backup has not acknowledged (--on-backup-loss fence, the default).

The built-in guest runs workload=counter|dirty|hash|kv (see README.md).";

const RUN_OPTIONS_HELP: &str = "\
\x20 --guest builtin|PATH       the guest: the built-in reference guest or an ELF file (required)
  --guest-args STR           the guest's command line (built-in: workload=counter|dirty|hash|kv ...)
  --mem SIZE                 guest RAM, e.g. 256M, 2G (default 256M)
  --vcpus N                  vCPUs, 1 to 16 (default 1)
  --console stdout|none|PATH where the guest's serial output goes (default stdout)
  --net tap=NAME[,mac=MAC]   a virtio-net device on the tap NAME (created if missing, as root)";

const FENCE_OPTIONS_HELP: &str = "\
\x20 --fence-cmd CMD            fence agent, run as `sh -c CMD` with key=value lines on stdin
                             (fence-agents convention); only exit 0 counts as fenced
  --peer-node NODE           the peer's node as the fence device knows it, sent as
                             nodename=, port= and plug= (default: the pair's --name)
  --fence-arg KEY=VALUE      an option for the agent (repeatable); action, option, nodename,
                             port, plug, missing_as_off, port_as_ip, (plug_)separator,
                             help and version are lockstep's
  --fence-timeout-s S        one attempt longer than this fails (default 10)";

/// `lockstep COMMAND --help`.
fn command_help(cmd: &str) -> Option<String> {
    Some(match cmd {
        "run" => format!(
            "lockstep run: boot a guest and run it until it exits (exit status: the guest's)\n\n\
             options:\n{RUN_OPTIONS_HELP}\n\
             \x20 --snapshot-after-ms MS     take a snapshot after MS ...\n\
             \x20 --snapshot-to DIR          ... into DIR (restore it with `lockstep restore DIR`)"
        ),
        "restore" => "lockstep restore DIR: continue a snapshot in a new process\n\n\
             options:\n\
             \x20 --console stdout|none|PATH where the guest's serial output goes (default stdout)\n\
             \x20 --net tap=NAME[,mac=MAC]   the tap the restored virtio-net device uses"
            .to_string(),
        "primary" => format!(
            "lockstep primary: run a guest protected by a backup (epochs, output commit)\n\n\
             options:\n\
             \x20 --peer ADDR:PORT           the backup (required; retried until --connect-timeout-s)\n\
             \x20 --interval-ms MS           epoch interval (default 25)\n\
             \x20 --min-interval-ms MS       shortest epoch when output waits (default 2)\n\
             \x20 --no-early-checkpoint      never end an epoch early for waiting output\n\
             \x20 --window N                 unacknowledged epochs in flight (default 4)\n\
             \x20 --seconds S                end cleanly (final epoch, digests) after S seconds\n\
             \x20 --name NAME                the pair's name; the backup must have the same (default lockstep)\n\
             \x20 --connect-timeout-s S      how long to retry connecting to the backup (default 10)\n\
             \x20 --heartbeat-timeout-ms MS  silence after which the backup counts as lost (default 1000)\n\
             \x20 --on-backup-loss fence|pause|continue\n\
             \x20                            fence (default): hold output, fence the backup, then go on\n\
             \x20                            unprotected; pause: stop the guest; continue: release at\n\
             \x20                            once without fencing (unsafe)\n\
             \x20 --pid-file PATH            write this process's pid (for a single-host fence agent)\n\
             \x20 --dirty-ring ENTRIES       harvest dirty pages from a KVM dirty ring, not the bitmap\n\
             \x20 --max-epoch-pages N        end an epoch once the guest dirtied N pages (default 4096):\n\
             \x20                            bounds each pause\n\
             {FENCE_OPTIONS_HELP}\n{RUN_OPTIONS_HELP}"
        ),
        "backup" => format!(
            "lockstep backup: keep a runnable copy of a primary's guest; fence and promote when it is lost\n\n\
             options:\n\
             \x20 --listen ADDR:PORT         where the primary connects (required)\n\
             \x20 --mem SIZE, --vcpus N      expected guest shape (default: the primary's)\n\
             \x20 --name NAME                the pair's name; the primary must have the same (default lockstep)\n\
             \x20 --net tap=NAME[,mac=MAC]   the tap the guest takes over on promotion (required to fence)\n\
             \x20 --console stdout|none|PATH the resumed guest's serial output (default stdout)\n\
             \x20 --run-after-end            resume the guest when the primary ends replication cleanly\n\
             \x20 --heartbeat-timeout-ms MS  silence after which the primary counts as lost (default 1000)\n\
             \x20 --pid-file PATH            write this process's pid (for the primary's fence agent)\n\
             \x20 --fence none               promote without fencing (unsafe)\n\
             {FENCE_OPTIONS_HELP}\n\
             \x20 --fence-delay-ms MS        wait this long before fencing a primary that went silent:\n\
             \x20                            its head start to fence this backup (default 1000)"
        ),
        "demo" => "lockstep demo: a protected kv guest in a namespace of its own, a client, the \
             primary SIGKILLed, failover\n\n\
             options:\n\
             \x20 --seconds S                how long the client writes before the kill (default 3)"
            .to_string(),
        _ => return None,
    })
}

/// Workloads of the built-in guest, checked before boot so a typo is a clear error.
pub const BUILTIN_WORKLOADS: &[&str] = &["counter", "dirty", "hash", "kv", "crash"];

#[derive(Debug, Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("cannot read guest image {path}: {source}")]
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("vCPU {vcpu}: {message}")]
    Crashed { vcpu: u32, message: String },
    #[error(transparent)]
    Primary(#[from] PrimaryError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    PidFile(#[from] PidFileError),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Size(_) => 2,
            _ => 1,
        }
    }
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lockstep: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn dispatch(args: &[String]) -> Result<ExitCode, CliError> {
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    if rest.iter().any(|a| a == "--help" || a == "-h") {
        if let Some(help) = command_help(cmd) {
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout(), "{help}");
            return Ok(ExitCode::SUCCESS);
        }
    }
    match cmd.as_str() {
        "run" => cmd_run(rest),
        "restore" => cmd_restore(rest),
        "primary" => cmd_primary(rest),
        "backup" => cmd_backup(rest),
        "demo" => crate::demo::run(rest),
        "-h" | "--help" | "help" => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "-V" | "--version" => {
            println!("lockstep {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        other => Err(usage(format!(
            "unknown command '{other}' (try: run, restore, --help)"
        ))),
    }
}

/// Silence (no epoch, heartbeat or ack) after which a peer counts as lost. Forty 25 ms
/// epochs: on shared two-core machines single pauses of 100+ ms happen, and a false
/// failover is far worse than a slower one. A primary that dies closes its connection,
/// which the backup notices at once, whatever this is.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 1000;

/// Options that may be given more than once.
const REPEATABLE: &[&str] = &["fence-arg"];

/// `--name value` / `--name=value` options and positional arguments.
pub struct Options {
    command: &'static str,
    pairs: Vec<(String, String)>,
    switches: Vec<String>,
    pub positional: Vec<String>,
}

impl Options {
    /// Parses `args`; `valued` and `switches` list the accepted option names.
    pub fn parse(
        command: &'static str,
        args: &[String],
        valued: &[&str],
        switches: &[&str],
    ) -> Result<Options, CliError> {
        let mut o = Options {
            command,
            pairs: Vec::new(),
            switches: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                o.positional.push(a.clone());
                continue;
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            if switches.contains(&name) {
                if inline.is_some() {
                    return Err(usage(format!(
                        "option --{name} of 'lockstep {command}' takes no value"
                    )));
                }
                o.switches.push(name.to_string());
            } else if valued.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| usage(format!("option --{name} needs a value")))?,
                };
                if !REPEATABLE.contains(&name) && o.pairs.iter().any(|(n, _)| n == name) {
                    return Err(usage(format!("option --{name} given twice")));
                }
                o.pairs.push((name.to_string(), value));
            } else {
                return Err(usage(format!(
                    "unknown option --{name} for 'lockstep {command}'"
                )));
            }
        }
        Ok(o)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a repeatable option, in order.
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|n| n == name)
    }

    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, CliError> {
        self.get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| usage(format!("--{name} {v}: not a valid number")))
            })
            .transpose()
    }

    /// A number option within `range`, or `default` when it is not given.
    pub fn number_in<T>(
        &self,
        name: &str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, CliError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display,
    {
        let v = self.number(name)?.unwrap_or(default);
        if !range.contains(&v) {
            return Err(usage(format!(
                "--{name} {v}: must be between {} and {}",
                range.start(),
                range.end()
            )));
        }
        Ok(v)
    }

    pub fn no_positional(&self) -> Result<(), CliError> {
        match self.positional.first() {
            Some(p) => Err(usage(format!(
                "unexpected argument '{p}' for 'lockstep {}'",
                self.command
            ))),
            None => Ok(()),
        }
    }
}

pub const GUEST_OPTIONS: &[&str] = &["guest", "guest-args", "mem", "vcpus", "console", "net"];
pub const DEFAULT_MEM: u64 = 256 << 20;

/// The guest and machine options shared by `run` and the replication roles.
fn guest_options(o: &Options) -> Result<BootConfig, CliError> {
    let guest = o
        .get("guest")
        .ok_or_else(|| usage("--guest builtin|PATH is required"))?;
    let guest_args = o
        .get("guest-args")
        .unwrap_or("workload=counter limit=10")
        .to_string();
    let image = if guest == "builtin" {
        check_builtin_args(&guest_args)?;
        engine::BUILTIN_GUEST.to_vec()
    } else {
        std::fs::read(guest).map_err(|source| CliError::Image {
            path: guest.into(),
            source,
        })?
    };
    let mem = match o.get("mem") {
        Some(m) => parse_size(m)?,
        None => DEFAULT_MEM,
    };
    engine::vstate::memory::validate_size(mem).map_err(|e| usage(e.to_string()))?;
    let vcpus: u32 = o.number("vcpus")?.unwrap_or(1);
    let max = engine::boot::abi::MAX_VCPUS;
    if vcpus == 0 || vcpus > max {
        return Err(usage(format!(
            "--vcpus {vcpus}: must be between 1 and {max}"
        )));
    }
    let console = Console::parse(o.get("console").unwrap_or("stdout"));
    Ok(BootConfig {
        image,
        guest_args,
        machine: MachineConfig {
            mem_size: mem,
            vcpus,
            console,
            net: net_option(o)?,
            dirty_ring: dirty_ring_option(o)?,
        },
    })
}

fn dirty_ring_option(o: &Options) -> Result<Option<u32>, CliError> {
    match o.number::<u32>("dirty-ring")? {
        Some(n) if !n.is_power_of_two() || !(64..=(1 << 20)).contains(&n) => Err(usage(format!(
            "--dirty-ring {n}: entries must be a power of two from 64 to 1048576"
        ))),
        r => Ok(r),
    }
}

fn net_option(o: &Options) -> Result<Option<NetConfig>, CliError> {
    o.get("net")
        .map(|n| NetConfig::parse(n).map_err(CliError::Usage))
        .transpose()
}

fn check_builtin_args(args: &str) -> Result<(), CliError> {
    let workload = args
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("workload="));
    match workload {
        None => Err(usage(format!(
            "--guest-args '{args}': no workload= given (the built-in guest runs {})",
            BUILTIN_WORKLOADS.join(", ")
        ))),
        Some(w) if !BUILTIN_WORKLOADS.contains(&w) => Err(usage(format!(
            "unknown workload '{w}' (the built-in guest runs {})",
            BUILTIN_WORKLOADS.join(", ")
        ))),
        Some(_) => Ok(()),
    }
}

fn cmd_run(args: &[String]) -> Result<ExitCode, CliError> {
    log::init("run");
    let mut valued = GUEST_OPTIONS.to_vec();
    valued.extend(["snapshot-after-ms", "snapshot-to"]);
    let o = Options::parse("run", args, &valued, &[])?;
    o.no_positional()?;
    let g = guest_options(&o)?;
    let snapshot = match (o.number::<u64>("snapshot-after-ms")?, o.get("snapshot-to")) {
        (Some(ms), Some(dir)) => Some((Duration::from_millis(ms), PathBuf::from(dir))),
        (None, None) => None,
        _ => return Err(usage("--snapshot-after-ms and --snapshot-to go together")),
    };
    let mut machine = Machine::boot(&g.machine, &g.image, &g.guest_args)?;
    drive(&mut machine, snapshot)
}

fn cmd_restore(args: &[String]) -> Result<ExitCode, CliError> {
    log::init("restore");
    let o = Options::parse("restore", args, &["console", "net"], &[])?;
    let [dir] = o.positional.as_slice() else {
        return Err(usage(
            "usage: lockstep restore DIR [--console stdout|none|PATH]",
        ));
    };
    let console = Console::parse(o.get("console").unwrap_or("stdout"));
    let snap = snapshot::read(dir.as_ref())?;
    let memory = engine::vstate::memory::create(snap.state.mem_size).map_err(MachineError::from)?;
    snap.load_memory(&memory)?;
    let net = net_option(&o)?;
    let mut machine = Machine::restore(&snap.state, &console, net.as_ref(), memory)?;
    info!(
        "restored {} vCPUs and {} MiB from {dir}",
        snap.state.vcpus.len(),
        snap.state.mem_size >> 20
    );
    drive(&mut machine, None)
}

fn cmd_primary(args: &[String]) -> Result<ExitCode, CliError> {
    log::init("primary");
    let mut valued = GUEST_OPTIONS.to_vec();
    valued.extend([
        "min-interval-ms",
        "peer",
        "interval-ms",
        "seconds",
        "window",
        "name",
        "connect-timeout-s",
        "heartbeat-timeout-ms",
        "on-backup-loss",
        "pid-file",
        "dirty-ring",
        "max-epoch-pages",
    ]);
    valued.extend(FENCE_OPTIONS);
    let o = Options::parse("primary", args, &valued, &["no-early-checkpoint"])?;
    o.no_positional()?;
    let g = guest_options(&o)?;
    let peer = o
        .get("peer")
        .ok_or_else(|| usage("--peer ADDR:PORT is required"))?;
    let interval_ms: u64 = o
        .number("interval-ms")?
        .unwrap_or(primary::DEFAULT_INTERVAL.as_millis() as u64);
    if interval_ms == 0 {
        return Err(usage("--interval-ms must be at least 1"));
    }
    let window: usize = o.number("window")?.unwrap_or(primary::DEFAULT_WINDOW);
    if window == 0 {
        return Err(usage("--window must be at least 1"));
    }
    let on_backup_loss = match o.get("on-backup-loss").unwrap_or("fence") {
        "fence" => OnBackupLoss::Fence,
        "pause" => OnBackupLoss::Pause,
        "continue" => OnBackupLoss::Continue,
        other => {
            return Err(usage(format!(
                "--on-backup-loss {other}: expected fence, pause or continue"
            )))
        }
    };
    if on_backup_loss != OnBackupLoss::Fence && o.get("fence-cmd").is_some() {
        return Err(usage(
            "--fence-cmd is used only with --on-backup-loss fence (the default)",
        ));
    }
    let opts = PrimaryOptions {
        peer: peer.to_string(),
        interval: Duration::from_millis(interval_ms),
        seconds: o.number::<f64>("seconds")?.map(Duration::from_secs_f64),
        connect_timeout: Duration::from_secs(o.number("connect-timeout-s")?.unwrap_or(10)),
        name: o.get("name").unwrap_or(DEFAULT_NAME).to_string(),
        window,
        backup_timeout: Duration::from_millis(o.number_in(
            "heartbeat-timeout-ms",
            DEFAULT_HEARTBEAT_TIMEOUT_MS,
            1..=MAX_MS,
        )?),
        on_backup_loss,
        fence: match fence_option(&o)? {
            None => None,
            Some(FenceConfig::Agent(a)) => Some(a),
            Some(FenceConfig::None) => {
                return Err(usage(
                    "--fence none is for the backup; a primary that may go on without \
                     fencing its backup says --on-backup-loss continue",
                ))
            }
        },
        early_checkpoint: !o.switch("no-early-checkpoint"),
        min_interval: Duration::from_millis(o.number("min-interval-ms")?.unwrap_or(2)),
        max_epoch_pages: match o.number("max-epoch-pages")? {
            None => primary::DEFAULT_MAX_EPOCH_PAGES,
            Some(0) => return Err(usage("--max-epoch-pages must be at least 1")),
            Some(n) => n,
        },
    };
    let _pid_file = pid_file_option(&o)?;
    let status = primary::run(g, opts)?;
    Ok(ExitCode::from(status))
}

fn cmd_backup(args: &[String]) -> Result<ExitCode, CliError> {
    log::init("backup");
    let o = Options::parse(
        "backup",
        args,
        &[
            "listen",
            "mem",
            "vcpus",
            "name",
            "console",
            "net",
            "test-withhold-acks-ms",
            "heartbeat-timeout-ms",
            "fence",
            "fence-cmd",
            "fence-arg",
            "fence-timeout-s",
            "peer-node",
            "fence-delay-ms",
            "pid-file",
        ],
        &["run-after-end"],
    )?;
    o.no_positional()?;
    let listen = o
        .get("listen")
        .ok_or_else(|| usage("--listen ADDR:PORT is required"))?;
    let mem = o.get("mem").map(parse_size).transpose()?;
    if let Some(m) = mem {
        engine::vstate::memory::validate_size(m).map_err(|e| usage(e.to_string()))?;
    }
    let console = Console::parse(o.get("console").unwrap_or("stdout"));
    let opts = BackupOptions {
        listen: listen.to_string(),
        mem,
        vcpus: o.number("vcpus")?,
        name: o.get("name").unwrap_or(DEFAULT_NAME).to_string(),
        run_after_end: o.switch("run-after-end"),
        net: net_option(&o)?,
        console: console.clone(),
        heartbeat_timeout: Duration::from_millis(o.number_in(
            "heartbeat-timeout-ms",
            DEFAULT_HEARTBEAT_TIMEOUT_MS,
            1..=MAX_MS,
        )?),
        withhold_acks: o
            .number("test-withhold-acks-ms")?
            .map(Duration::from_millis),
    };
    let fence_delay =
        Duration::from_millis(o.number_in("fence-delay-ms", DEFAULT_FENCE_DELAY_MS, 0..=MAX_MS)?);
    let fence = fence_option(&o)?;
    if fence.is_some() && opts.net.is_none() {
        // Promotion without the network would cut every client off: refuse up front.
        return Err(usage(
            "--fence/--fence-cmd need --net tap=NAME (the tap the promoted guest takes over)",
        ));
    }
    // Held until the process ends: a promoted backup runs the guest and is fenced by it.
    let _pid_file = pid_file_option(&o)?;
    let outcome = backup::run(opts.clone())?;
    match failover::take_over(outcome, &opts, fence.as_ref(), fence_delay)? {
        Some(mut machine) => drive(&mut machine, None),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `--pid-file PATH`: written now, removed when the process ends in order.
fn pid_file_option(o: &Options) -> Result<Option<PidFile>, CliError> {
    o.get("pid-file")
        .map(|p| PidFile::create(p.as_ref()))
        .transpose()
        .map_err(CliError::from)
}

/// The fencing options of both roles.
const FENCE_OPTIONS: [&str; 5] = [
    "fence",
    "fence-cmd",
    "fence-arg",
    "fence-timeout-s",
    "peer-node",
];

/// The pair's name when `--name` is not given.
pub const DEFAULT_NAME: &str = "lockstep";

/// The longest timeout or delay in milliseconds an option takes (an hour).
const MAX_MS: u64 = 3_600_000;

/// The backup's head start for a primary that may be alive behind a cut link.
pub const DEFAULT_FENCE_DELAY_MS: u64 = 1000;

fn fence_option(o: &Options) -> Result<Option<FenceConfig>, CliError> {
    let args = o
        .get_all("fence-arg")
        .into_iter()
        .map(|kv| parse_fence_arg(kv).map_err(|e| usage(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_secs(o.number_in("fence-timeout-s", 10, 1..=3600)?);
    // Options of an agent, given without one: a mistake, never silently ignored.
    let agent_only = || -> Result<(), CliError> {
        for name in [
            "peer-node",
            "fence-arg",
            "fence-timeout-s",
            "fence-delay-ms",
        ] {
            if o.get(name).is_some() {
                return Err(usage(format!(
                    "--{name} needs --fence-cmd (it configures the fence agent)"
                )));
            }
        }
        Ok(())
    };
    match (o.get("fence"), o.get("fence-cmd")) {
        (Some("none"), None) => {
            agent_only()?;
            Ok(Some(FenceConfig::None))
        }
        (Some(other), None) => Err(usage(format!(
            "--fence {other}: the only value is 'none' (or use --fence-cmd)"
        ))),
        (Some(_), Some(_)) => Err(usage("--fence none and --fence-cmd exclude each other")),
        (None, Some(cmd)) if cmd.trim().is_empty() => Err(usage(
            "--fence-cmd is empty: `sh -c ''` exits 0 and would count as fenced",
        )),
        (None, Some(cmd)) => {
            // Without --peer-node the victim is the pair's --name, as nodename= was before;
            // an agent that does not know that name fails, and nothing is promoted.
            let victim = o
                .get("peer-node")
                .or(o.get("name"))
                .unwrap_or(DEFAULT_NAME)
                .trim();
            if victim.is_empty() || victim.contains(['\n', '\r']) {
                return Err(usage(
                    "--peer-node: the peer's node as the fence device knows it (sent as \
                     nodename=, port= and plug=) cannot be empty or hold a line break",
                ));
            }
            info!(
                "fencing the peer with '{cmd}' as node '{victim}'{}",
                if o.get("peer-node").is_none() {
                    " (the pair's --name: set --peer-node to the name the fence device knows)"
                } else {
                    ""
                }
            );
            Ok(Some(FenceConfig::Agent(FenceAgent {
                cmd: cmd.to_string(),
                args,
                victim: victim.to_string(),
                timeout,
            })))
        }
        (None, None) => {
            agent_only()?;
            Ok(None)
        }
    }
}

/// Runs the machine until the guest exits, taking the snapshot on the way if asked.
fn drive(
    machine: &mut Machine,
    mut snapshot: Option<(Duration, PathBuf)>,
) -> Result<ExitCode, CliError> {
    let start = Instant::now();
    machine.resume()?;
    loop {
        let timeout = match &snapshot {
            Some((at, _)) => at.saturating_sub(start.elapsed()),
            None => Duration::from_secs(3600),
        };
        // Roles that install the stop handler (a resumed or promoted backup) end on
        // SIGTERM/SIGINT with the guest stopped; `run` and `restore` keep the default.
        if engine::replication::stop_requested() {
            machine.pause()?;
            machine.flush_console();
            info!("stopped by signal");
            return Ok(ExitCode::SUCCESS);
        }
        match machine.wait_event(timeout.min(Duration::from_millis(100))) {
            Some(VcpuEvent::GuestExit { status, .. }) => {
                machine.pause()?;
                machine.flush_console();
                return Ok(ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX)));
            }
            Some(VcpuEvent::Crashed { vcpu, message }) => {
                let _ = machine.pause();
                machine.flush_console();
                return Err(CliError::Crashed { vcpu, message });
            }
            None => {
                let due = snapshot
                    .as_ref()
                    .is_some_and(|(at, _)| start.elapsed() >= *at);
                if let Some((_, dir)) = snapshot.take_if(|_| due) {
                    let (state, timing) = machine.pause_and_capture()?;
                    let written = snapshot::write(&dir, &state, machine.memory())?;
                    machine.resume()?;
                    info!(
                        "snapshot written to {} ({} KiB of non-zero memory; pause {} us)",
                        dir.display(),
                        written >> 10,
                        timing.captured.as_micros()
                    );
                }
            }
        }
    }
}
