//! The `lockstep` command line: clap parses it, [`main`] turns every mistake into one line
//! `lockstep: error: ...` (exit status 2), and each subcommand builds the engine's options
//! types (`BootConfig`, `PrimaryOptions`, `BackupOptions`, `FenceConfig`) and runs the role.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use thiserror::Error;

use checkpoint::tls::{LinkSecurity, TlsIdentity};
use engine::boot::linux::{self, LinuxBoot, DEFAULT_CMDLINE};
use engine::devices::disk::DiskConfig;
use engine::devices::serial::Console;
use engine::devices::NetConfig;
use engine::machine::{BootConfig, Guest, Machine, MachineConfig, MachineError};
use engine::pidfile::{PidFile, PidFileError};
use engine::replication::backup::{BackupError, BackupOptions};
use engine::replication::control;
use engine::replication::events::{self, EventsError};
use engine::replication::failover::DEFAULT_FENCE_DELAY;
use engine::replication::fence::{parse_fence_arg, FenceAgent, FenceConfig};
use engine::replication::node::{Node, NodeError, Start};
use engine::replication::primary::{self, OnBackupLoss, PrimaryError, PrimaryOptions};
use engine::replication::stats;
use engine::replication::status::{self, GuestState, Protection, Role};
use engine::replication::{DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_NAME};
use engine::size::{parse_size, SizeError};
use engine::snapshot::{self, SnapshotError};
use engine::{info, log};

use crate::api::{self, ApiError, ApiServer};

mod certs;
mod config;

/// Fencing, as every role's help ends.
const FENCING_NOTES: &str = "\
Fencing (docs/fencing.md): CMD runs as `sh -c CMD` with key=value lines on stdin, the
fence-agents convention: each --fence-arg, then action=off, nodename=NODE, port=NODE and
plug=NODE. Those keys (and option, missing_as_off, port_as_ip, plug_separator,
separator, help, version) are lockstep's: a --fence-arg cannot set them. Only exit 0 within
--fence-timeout-s (10) counts as fenced. The backup fences the primary before it promotes,
after --fence-delay-ms (1000) when the primary went silent (the primary's head start); the
primary fences the backup before it releases output the backup has not acknowledged
(--on-backup-loss fence, the default).";

/// A command's help: it starts `lockstep COMMAND: what it does`.
macro_rules! command_help {
    ($command:literal) => {
        concat!(
            "lockstep ",
            $command,
            ": {about}

{usage-heading} {usage}

{all-args}{after-help}"
        )
    };
}

const AFTER_HELP: &str = "\
The built-in guest runs workload=counter|dirty|hash|kv (see README.md).
`lockstep COMMAND --help` lists a command's options; run, restore, primary and backup
also read them from --config FILE (TOML, README.md \"Configuration file\").";

#[derive(Debug, Parser)]
#[command(
    name = "lockstep",
    version,
    about = "lockstep: a VM kept running on a hot backup, epoch by epoch (Remus-style)",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(
        help_template = command_help!("run"),
        about = "boot a guest and run it until it exits (exit status: the guest's)"
    )]
    Run(Box<RunArgs>),
    #[command(help_template = command_help!("restore"),
        about = "continue a snapshot in a new process")]
    Restore(RestoreArgs),
    #[command(
        help_template = command_help!("primary"),
        about = "run a guest protected by a backup (epochs, output commit)",
        after_help = FENCING_NOTES
    )]
    Primary(Box<PrimaryArgs>),
    #[command(
        help_template = command_help!("backup"),
        about = "keep a runnable copy of a primary's guest; fence and promote when it is lost",
        after_help = FENCING_NOTES
    )]
    Backup(Box<BackupArgs>),
    #[command(
        help_template = command_help!("demo"),
        about = "a protected kv guest in a namespace of its own, a client, the primary SIGKILLed, failover"
    )]
    Demo(DemoArgs),
    #[command(
        help_template = command_help!("ctl"),
        about = "ask a running lockstep on its control socket: status, stop, protect, switchover, failover",
        after_help = CTL_NOTES
    )]
    Ctl(CtlArgs),
    #[command(
        help_template = command_help!("certs"),
        about = "make a pair's CA and node certificates for the replication link's TLS"
    )]
    Certs(certs::CertsArgs),
}

const CTL_NOTES: &str = "\
status      GET /status: role, guest, protection, epochs, replication lag, pause and commit
            p50/p99 (us, last minute), held output, the last role change and the last request
stop        POST /stop: the same clean end as SIGTERM
protect     POST /protect {\"peer\": ADDR:PORT}: a running, unprotected guest (a promoted
            backup, a `run`) is synced to the backup at ADDR:PORT while it runs;
            --peer-node and --fence-arg aim the fence agent at that backup's node
switchover  POST /switchover [{\"listen\": ADDR:PORT}]: final epoch, the backup promotes; this
            process then stops, or with --listen becomes the new backup there
failover    POST /failover: a backup fences its primary and promotes
protect, switchover and failover wait until the request is done (--no-wait: return once
accepted). The endpoints and JSON fields: README.md, \"Control socket\".";

#[derive(Debug, Args)]
struct CtlArgs {
    /// the control socket of the process (its --api-sock; required)
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// print the answer's JSON as it came
    #[arg(long)]
    json: bool,
    /// protect: the new backup's address
    #[arg(long, value_name = "ADDR:PORT")]
    peer: Option<String>,
    /// protect: the new backup's node as the fence device knows it (default: the
    /// process's --peer-node)
    #[arg(long, value_name = "NODE", allow_hyphen_values = true)]
    peer_node: Option<String>,
    /// protect: an option of the fence agent for the new backup's node (repeatable;
    /// replaces the process's --fence-arg list)
    #[arg(long, value_name = "KEY=VALUE", allow_hyphen_values = true)]
    fence_arg: Vec<String>,
    /// switchover: become the new backup, listening here (default: stop)
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// return once the request is accepted, without waiting for it to be done
    #[arg(long)]
    no_wait: bool,
    /// how long to wait for a request to be done (default 600)
    #[arg(long, value_name = "S")]
    timeout_s: Option<u64>,
    /// status, stop, protect, switchover or failover
    #[arg(value_name = "ACTION")]
    action: Option<String>,
}

/// Where the guest's serial output goes, and its network device: every command that runs
/// a guest has them.
#[derive(Debug, Args)]
struct DeviceArgs {
    /// where the guest's serial output goes (default stdout)
    #[arg(long, value_name = "stdout|none|PATH", allow_hyphen_values = true)]
    console: Option<String>,
    /// a virtio-net device on the tap NAME (created if missing, as root)
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", allow_hyphen_values = true)]
    net: Option<String>,
    /// a virtio-blk device on the raw image FILE (repeatable); on a backup, the image it
    /// keeps its copy of the primary's disk in (same size, same order)
    #[arg(long, value_name = "path=FILE[,readonly]", allow_hyphen_values = true)]
    disk: Vec<String>,
}

/// The guest and machine options shared by `run` and `primary`.
#[derive(Debug, Args)]
struct GuestArgs {
    /// the guest: the built-in reference guest or an ELF file (required)
    #[arg(long, value_name = "builtin|PATH", allow_hyphen_values = true)]
    guest: Option<String>,
    /// the guest's command line (built-in: workload=counter|dirty|hash|kv ...)
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    guest_args: Option<String>,
    /// boot this Linux kernel instead: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage
    #[arg(long, value_name = "PATH", conflicts_with_all = ["guest", "guest_args"])]
    kernel: Option<PathBuf>,
    /// the Linux kernel's initramfs
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// the Linux kernel's command line (default: console=ttyS0 earlyprintk=ttyS0 reboot=k
    /// panic=1 pci=off)
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// guest RAM, e.g. 256M, 2G (default 256M)
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// vCPUs, 1 to 16 (default 1)
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    #[command(flatten)]
    devices: DeviceArgs,
}

/// What every process that runs a role serves and writes beside the guest.
#[derive(Debug, Args)]
struct ProcessArgs {
    /// write this process's pid (for a fence agent that finds the process by it)
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// serve the control socket here: HTTP/1.1 + JSON (README, "Control socket")
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// append JSON-lines events here (docs/events.md)
    #[arg(long, value_name = "PATH")]
    events: Option<PathBuf>,
    /// serve Prometheus metrics on GET /metrics here (docs/metrics.md)
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
}

/// The pid file, control socket and metrics endpoint of a process, held until it ends
/// (the pid file and socket file are removed then).
struct Services {
    _pid_file: Option<PidFile>,
    _api: Option<ApiServer>,
    _metrics: Option<crate::metrics::MetricsServer>,
}

impl ProcessArgs {
    /// `--events PATH`: opened first, so that a bad path is an error before anything runs.
    fn open_events(&self) -> Result<(), CliError> {
        self.events.as_deref().map(events::open).transpose()?;
        Ok(())
    }

    /// `--pid-file`, `--api-sock` and `--metrics`, once the options are known good.
    fn start(&self) -> Result<Services, CliError> {
        Ok(Services {
            _pid_file: pid_file_option(self.pid_file.clone())?,
            _api: api_option(self.api_sock.as_deref())?,
            _metrics: crate::metrics::serve(self.metrics.as_deref())?,
        })
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// take a snapshot after MS ...
    #[arg(long, value_name = "MS")]
    snapshot_after_ms: Option<u64>,
    /// ... into DIR (restore it with `lockstep restore DIR`)
    #[arg(long, value_name = "DIR")]
    snapshot_to: Option<PathBuf>,
    /// the pair's name, should the guest be protected later (POST /protect; default
    /// lockstep)
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    name: Option<String>,
    #[command(flatten)]
    fence: FenceArgs,
    #[command(flatten)]
    replication: ReplicationArgs,
    #[command(flatten)]
    process: ProcessArgs,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// the snapshot directory (`lockstep run --snapshot-to DIR` wrote it)
    #[arg(value_name = "DIR")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    devices: DeviceArgs,
}

/// The fence agent's options, for both roles.
#[derive(Debug, Args)]
struct FenceArgs {
    /// `none` (backup only): promote without fencing (unsafe); `cluster`: a cluster
    /// manager fences: the backup role waits for POST /failover, the primary role asks
    /// the cluster's fencer (stonith_admin) to fence --peer-node
    #[arg(long, value_name = "none|cluster")]
    fence: Option<String>,
    /// fence agent, run as `sh -c CMD` with key=value lines on stdin (fence-agents
    /// convention); only exit 0 counts as fenced
    #[arg(long, value_name = "CMD", allow_hyphen_values = true)]
    fence_cmd: Option<String>,
    /// the peer's node as the fence device knows it, sent as nodename=, port= and plug=
    /// (default: the pair's --name)
    #[arg(long, value_name = "NODE", allow_hyphen_values = true)]
    peer_node: Option<String>,
    /// an option for the agent (repeatable); action, option, nodename, port, plug,
    /// missing_as_off, port_as_ip, (plug_)separator, help and version are lockstep's
    #[arg(long, value_name = "KEY=VALUE", allow_hyphen_values = true)]
    fence_arg: Vec<String>,
    /// one attempt longer than this fails (default 10; 60 with --fence cluster)
    #[arg(long, value_name = "S")]
    fence_timeout_s: Option<u64>,
}

/// How the guest is replicated, in every role that may come to run it protected: `primary`
/// from the start, `run` after `ctl protect`, `backup` once it has promoted and protects
/// again (a re-protect, or the other side of a switchover).
#[derive(Debug, Args)]
#[command(
    next_help_heading = "Replication (when this process runs the guest protected; \
a backup: after it promotes and protects again)"
)]
struct ReplicationArgs {
    /// epoch interval (default 25)
    #[arg(long, value_name = "MS")]
    interval_ms: Option<u64>,
    /// shortest epoch when output waits, fractions allowed (default 0.5)
    #[arg(long, value_name = "MS")]
    min_interval_ms: Option<f64>,
    /// never end an epoch early for waiting output
    #[arg(long)]
    no_early_checkpoint: bool,
    /// unacknowledged epochs in flight (default 4)
    #[arg(long, value_name = "N")]
    window: Option<usize>,
    /// end an epoch once the guest dirtied N pages (default 4096): bounds each pause
    #[arg(long, value_name = "N")]
    max_epoch_pages: Option<usize>,
    /// at PCT% of each epoch, copy the pages dirtied so far while the guest runs, so the
    /// pause copies only those written since (default 75; 0: everything in the pause)
    #[arg(long, value_name = "PCT")]
    epoch_precopy_pct: Option<u32>,
    /// how long to retry connecting to the backup (default 10)
    #[arg(long, value_name = "S")]
    connect_timeout_s: Option<u64>,
    /// silence after which the peer counts as lost: the backup, in the primary role; the
    /// primary, in the backup role (default 300)
    #[arg(long, value_name = "MS")]
    heartbeat_timeout_ms: Option<u64>,
    /// fence (default): hold output, fence the backup, then go on unprotected; pause:
    /// stop the guest; continue: release at once without fencing (unsafe)
    #[arg(long, value_name = "fence|pause|continue")]
    on_backup_loss: Option<String>,
    /// when the primary role ends, write its figures to FILE as JSON: pause, commit,
    /// pages, bytes and the pause's parts as histograms, and counters (README, "Metrics");
    /// FILE's directory must exist and be writable
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// this node's certificate (PEM), issued by the pair's CA for the pair's --name
    /// (`lockstep certs` makes them)
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// this node's private key (PEM)
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// the pair's CA certificate (PEM): the peer must present a certificate it issued for
    /// the pair's --name
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// run the replication link in clear and unauthenticated (unsafe: anyone who reaches
    /// the backup's port can feed it a guest, and the guest's memory is readable on the way)
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Args)]
struct PrimaryArgs {
    /// the backup (required; retried until --connect-timeout-s)
    #[arg(long, value_name = "ADDR:PORT")]
    peer: Option<String>,
    /// end cleanly (final epoch, digests) after S seconds
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    seconds: Option<f64>,
    /// the pair's name; the backup must have the same (default lockstep)
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    name: Option<String>,
    /// harvest dirty pages from a KVM dirty ring, not the bitmap
    #[arg(long, value_name = "ENTRIES")]
    dirty_ring: Option<u32>,
    #[command(flatten)]
    fence: FenceArgs,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    replication: ReplicationArgs,
    #[command(flatten)]
    process: ProcessArgs,
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// where the primary connects (required)
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// expected guest RAM (default: the primary's)
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// expected vCPUs (default: the primary's)
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// the pair's name; the primary must have the same (default lockstep)
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    name: Option<String>,
    /// resume the guest when the primary ends replication cleanly
    #[arg(long)]
    run_after_end: bool,
    /// wait this long before fencing a primary that went silent: its head start to fence
    /// this backup (default 1000)
    #[arg(long, value_name = "MS")]
    fence_delay_ms: Option<u64>,
    /// Tests only: after epoch 1 commits, send no ack for this long.
    #[arg(long, value_name = "MS", hide = true)]
    test_withhold_acks_ms: Option<u64>,
    #[command(flatten)]
    fence: FenceArgs,
    /// The console of the resumed guest, and the tap it takes over on promotion
    /// (required to fence).
    #[command(flatten)]
    devices: DeviceArgs,
    #[command(flatten)]
    replication: ReplicationArgs,
    #[command(flatten)]
    process: ProcessArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// how long the client writes before the kill (default 3)
    #[arg(long, value_name = "S")]
    pub seconds: Option<f64>,
}

/// Workloads of the built-in guest, checked before boot so a typo is a clear error.
pub const BUILTIN_WORKLOADS: &[&str] = &["counter", "dirty", "hash", "kv", "disk", "crash"];

/// Guest RAM when `--mem` is not given.
pub const DEFAULT_MEM: u64 = 256 << 20;

/// The longest run `--seconds` asks for (a year).
const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// The longest timeout or delay in milliseconds an option takes (an hour).
const MAX_MS: u64 = 3_600_000;

#[derive(Debug, Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("{option} {path}: {source}")]
    File {
        option: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read guest image {path}: {source}")]
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Primary(#[from] PrimaryError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    PidFile(#[from] PidFileError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error("{0}")]
    Ctl(String),
    /// A command that failed for a reason of its own, said in one line.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Size(_) => 2,
            _ => 1,
        }
    }
}

pub fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let cli = match parse(&args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Run(a) => cmd_run(*a),
        Command::Restore(a) => cmd_restore(a),
        Command::Primary(a) => cmd_primary(*a),
        Command::Backup(a) => cmd_backup(*a),
        Command::Demo(a) => super::demo::run(a),
        Command::Ctl(a) => cmd_ctl(a),
        Command::Certs(a) => certs::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // As stdout's, a closed stderr is no reason for a panic.
            let _ = writeln!(
                std::io::stderr(),
                "lockstep: error: {e}{}",
                config::attribute(&e.to_string())
            );
            ExitCode::from(e.exit_code())
        }
    }
}

/// Parses the command line; help and version are printed here (exit 0), every mistake as
/// one line (exit 2).
fn parse(args: &[String]) -> Result<Cli, ExitCode> {
    match try_parse(args) {
        Ok(cli) => Ok(cli),
        Err(ParseError::Clap(e))
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) =>
        {
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = write!(std::io::stdout(), "{e}");
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "lockstep: error: {}", e.one_line());
            Err(ExitCode::from(2))
        }
    }
}

/// Why the command line did not parse: clap's error (help and version among them), or
/// the one line of a `--config FILE` that cannot be used.
#[derive(Debug)]
enum ParseError {
    Clap(clap::Error),
    Config(String),
}

impl ParseError {
    fn one_line(&self) -> String {
        match self {
            ParseError::Clap(e) => one_line(e),
            ParseError::Config(line) => line.clone(),
        }
    }
}

/// The command line, with the options of its `--config FILE` (see [`config`]) before the
/// ones typed.
fn try_parse(args: &[String]) -> Result<Cli, ParseError> {
    let cmd = config::with_config(Cli::command());
    // `--help` or `-h` anywhere after a command asks for that command's help, even among
    // options it does not know.
    let help = args.len() > 2 && args[2..].iter().any(|a| a == "--help" || a == "-h");
    let matches = if help {
        cmd.try_get_matches_from([&args[0], &args[1], "--help"])
    } else {
        let args = config::expand(&cmd, args).map_err(ParseError::Config)?;
        cmd.try_get_matches_from(args)
    };
    matches
        .and_then(|m| Cli::from_arg_matches(&m))
        .map_err(ParseError::Clap)
}

/// clap's message in one line: its first line without the `error: ` prefix (and, when
/// that line ends in a colon, the lines it introduces), no usage block.
fn one_line(e: &clap::Error) -> String {
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return "no command given (try: lockstep --help)".to_string();
    }
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("bad command line");
    let mut line = first.strip_prefix("error: ").unwrap_or(first).to_string();
    let rest: Vec<&str> = lines
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
        .collect();
    if line.ends_with(':') {
        let listed: Vec<&str> = rest
            .iter()
            .copied()
            .filter(|l| !l.starts_with("tip:"))
            .collect();
        line = format!("{line} {}", listed.join(", "));
    }
    // "a similar argument exists: '--interval-ms'" helps; clap's other tips do not apply.
    if let Some(similar) = rest.iter().find_map(|l| l.strip_prefix("tip: a similar")) {
        line = format!("{line} (a similar{similar})");
    }
    line
}

/// `value` if it lies in `range`, else the error naming the option.
fn in_range<T>(name: &str, value: T, range: std::ops::RangeInclusive<T>) -> Result<T, CliError>
where
    T: PartialOrd + std::fmt::Display,
{
    if !range.contains(&value) {
        return Err(usage(format!(
            "--{name} {value}: must be between {} and {}",
            range.start(),
            range.end()
        )));
    }
    Ok(value)
}

fn console_option(d: &DeviceArgs) -> Console {
    Console::parse(d.console.as_deref().unwrap_or("stdout"))
}

fn net_option(d: &DeviceArgs) -> Result<Option<NetConfig>, CliError> {
    d.net
        .as_deref()
        .map(|n| n.parse::<NetConfig>().map_err(|e| usage(e.to_string())))
        .transpose()
}

/// `--disk path=FILE[,readonly]`, each; at most as many as the boot info has room for
/// beside the net device.
fn disk_options(d: &DeviceArgs) -> Result<Vec<DiskConfig>, CliError> {
    let max = engine::boot::abi::MAX_VIRTIO - 1;
    if d.disk.len() > max {
        return Err(usage(format!(
            "--disk given {} times: at most {max} disks",
            d.disk.len()
        )));
    }
    let disks = d
        .disk
        .iter()
        .map(|s| s.parse::<DiskConfig>().map_err(|e| usage(e.to_string())))
        .collect::<Result<Vec<DiskConfig>, CliError>>()?;
    // One image twice (by two names, say) would lock itself out with a confusing reason.
    for (i, a) in disks.iter().enumerate() {
        let same = |b: &DiskConfig| match (a.path.canonicalize(), b.path.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => a.path == b.path,
        };
        if let Some(b) = disks[..i].iter().find(|b| same(b)) {
            return Err(usage(format!(
                "--disk {} and --disk {} name the same image: give each disk its own",
                b.path.display(),
                a.path.display()
            )));
        }
    }
    Ok(disks)
}

fn dirty_ring_option(ring: Option<u32>) -> Result<Option<u32>, CliError> {
    match ring {
        Some(n) if !n.is_power_of_two() || !(64..=(1 << 20)).contains(&n) => Err(usage(format!(
            "--dirty-ring {n}: entries must be a power of two from 64 to 1048576"
        ))),
        r => Ok(r),
    }
}

/// The largest `--kernel` or `--initramfs` file read (the largest guest RAM for a kernel).
const MAX_BOOT_FILE: u64 = 3 << 30;

/// The guest and machine of `run` and `primary`.
fn boot_config(g: &GuestArgs, dirty_ring: Option<u32>) -> Result<BootConfig, CliError> {
    let read = |option: &'static str, path: &std::path::Path| {
        // A regular file, and not more than the largest guest RAM: `/dev/zero` would be
        // read until the host's memory ran out.
        let meta = std::fs::metadata(path).map_err(|source| CliError::File {
            option,
            path: path.into(),
            source,
        })?;
        if !meta.is_file() || meta.len() > MAX_BOOT_FILE {
            return Err(usage(format!(
                "{option} {}: not a regular file of at most 3 GiB",
                path.display()
            )));
        }
        std::fs::read(path).map_err(|source| CliError::File {
            option,
            path: path.into(),
            source,
        })
    };
    let guest = if let Some(kernel) = &g.kernel {
        let boot = LinuxBoot {
            kernel: read("--kernel", kernel)?,
            initramfs: g
                .initramfs
                .as_deref()
                .map(|p| read("--initramfs", p))
                .transpose()?,
            cmdline: g
                .cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        };
        // A file that is no kernel is refused before anything is created.
        linux::detect(&boot.kernel).map_err(|e| CliError::Kernel {
            path: kernel.clone(),
            reason: e.to_string(),
        })?;
        Guest::Linux(boot)
    } else if g.initramfs.is_some() || g.cmdline.is_some() {
        return Err(usage("--initramfs and --cmdline go with --kernel PATH"));
    } else {
        let guest = g
            .guest
            .as_deref()
            .ok_or_else(|| usage("--guest builtin|PATH or --kernel PATH is required"))?;
        let args = g
            .guest_args
            .clone()
            .unwrap_or_else(|| "workload=counter limit=10".to_string());
        let image = if guest == "builtin" {
            check_builtin_args(&args)?;
            engine::BUILTIN_GUEST.to_vec()
        } else {
            std::fs::read(guest).map_err(|source| CliError::Image {
                path: guest.into(),
                source,
            })?
        };
        Guest::Reference { image, args }
    };
    let mem = match &g.mem {
        Some(m) => parse_size(m)?,
        None => DEFAULT_MEM,
    };
    engine::vstate::memory::validate_size(mem).map_err(|e| usage(e.to_string()))?;
    let vcpus = vcpus_option(g.vcpus)?.unwrap_or(1);
    Ok(BootConfig {
        guest,
        machine: MachineConfig {
            mem_size: mem,
            vcpus,
            console: console_option(&g.devices),
            net: net_option(&g.devices)?,
            disks: disk_options(&g.devices)?,
            dirty_ring: dirty_ring_option(dirty_ring)?,
        },
    })
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

fn cmd_run(a: RunArgs) -> Result<ExitCode, CliError> {
    log::init("run");
    a.process.open_events()?;
    let g = boot_config(&a.guest, None)?;
    let snapshot = match (a.snapshot_after_ms, a.snapshot_to) {
        (Some(ms), Some(dir)) => Some((Duration::from_millis(ms), dir)),
        (None, None) => None,
        _ => return Err(usage("--snapshot-after-ms and --snapshot-to go together")),
    };
    let name = a.name.unwrap_or_else(|| DEFAULT_NAME.to_string());
    let (fence, mut template) = replication(&a.replication, &a.fence, &name, false, false)?;
    template.link = link_option(&a.replication, &name, false)?;
    let _services = a.process.start()?;
    let machine = Machine::start(&g)?;
    status::update(|s| {
        s.role = Role::Standalone;
        s.guest = GuestState::Running;
        s.protection = Protection::Unprotected;
        s.name = name.clone();
    });
    let node = Node {
        console: g.machine.console.clone(),
        net: g.machine.net.clone(),
        disks: g.machine.disks.clone(),
        fence,
        fence_delay: DEFAULT_FENCE_DELAY,
        primary: template,
        snapshot,
    };
    finish(node.run(Start::Run(machine)))
}

/// The guest's exit status as the process's.
fn exit(status: u8) -> Result<ExitCode, CliError> {
    Ok(ExitCode::from(status))
}

/// `--api-sock PATH`: served from now on, the socket file removed at an orderly end.
fn api_option(path: Option<&std::path::Path>) -> Result<Option<ApiServer>, CliError> {
    Ok(path.map(ApiServer::start).transpose()?)
}

/// `lockstep ctl --api-sock PATH ACTION [--json]`.
fn cmd_ctl(a: CtlArgs) -> Result<ExitCode, CliError> {
    let sock = a
        .api_sock
        .clone()
        .ok_or_else(|| usage("--api-sock PATH is required"))?;
    let action = a.action.as_deref().ok_or_else(|| {
        usage("usage: lockstep ctl --api-sock PATH status|stop|protect|switchover|failover")
    })?;
    let only = |option: &str, given: bool, actions: &str| -> Result<(), CliError> {
        if given {
            return Err(usage(format!("--{option} is for ctl {actions}")));
        }
        Ok(())
    };
    only("peer", a.peer.is_some() && action != "protect", "protect")?;
    only(
        "peer-node",
        a.peer_node.is_some() && action != "protect",
        "protect",
    )?;
    only(
        "fence-arg",
        !a.fence_arg.is_empty() && action != "protect",
        "protect",
    )?;
    only(
        "listen",
        a.listen.is_some() && action != "switchover",
        "switchover",
    )?;
    let body = match action {
        "status" | "stop" | "failover" => serde_json::Value::Null,
        "protect" => {
            let peer = a
                .peer
                .as_deref()
                .ok_or_else(|| usage("ctl protect needs --peer ADDR:PORT (the new backup)"))?;
            // Checked as the process checks it, before anything is sent.
            control::check_address("peer", peer).map_err(|r| {
                usage(format!(
                    "ctl protect --peer: {}",
                    r.message.trim_start_matches("\"peer\": ")
                ))
            })?;
            let mut body = serde_json::json!({ "peer": peer });
            if let Some(node) = &a.peer_node {
                body["peer_node"] = node.as_str().into();
            }
            if !a.fence_arg.is_empty() {
                body["fence_args"] = a.fence_arg.clone().into();
            }
            body
        }
        "switchover" => match &a.listen {
            Some(listen) => {
                control::check_address("listen", listen).map_err(|r| {
                    usage(format!(
                        "ctl switchover --listen: {}",
                        r.message.trim_start_matches("\"listen\": ")
                    ))
                })?;
                serde_json::json!({ "listen": listen })
            }
            None => serde_json::Value::Null,
        },
        other => {
            return Err(usage(format!(
                "ctl {other}: expected status, stop, protect, switchover or failover"
            )))
        }
    };
    let (method, path) = match action {
        "status" => ("GET", "/status".to_string()),
        other => ("POST", format!("/{other}")),
    };
    let (code, answer) = api::request(&sock, method, &path, &body).map_err(CliError::Ctl)?;
    if !(200..300).contains(&code) {
        let msg = answer["error"].as_str().unwrap_or("no error message");
        if a.json {
            // The answer as it came (`{"error": ...}`), for a program reading stdout.
            api::say(&answer);
        }
        return Err(CliError::Ctl(format!("{action}: HTTP {code}: {msg}")));
    }
    match action {
        "status" if a.json => api::say(&answer),
        "status" => api::say(api::human_status(&answer)),
        "stop" if a.json => api::say(&answer),
        "stop" => api::say("stopping: the process ends as on SIGTERM"),
        _ if a.no_wait => {
            if a.json {
                api::say(&answer);
            } else {
                api::say(format!("{action}: accepted (request {})", answer["id"]));
            }
        }
        _ => {
            let id = answer["id"].as_u64().unwrap_or(0);
            let limit = Duration::from_secs(a.timeout_s.unwrap_or(600));
            return api::wait_request(&sock, action, id, limit, a.json).map_err(CliError::Ctl);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_restore(a: RestoreArgs) -> Result<ExitCode, CliError> {
    log::init("restore");
    let Some(dir) = a.dir else {
        return Err(usage(
            "usage: lockstep restore DIR [--console stdout|none|PATH] [--net ...] [--disk path=FILE]...",
        ));
    };
    let console = console_option(&a.devices);
    let snap = snapshot::read(&dir)?;
    let memory = engine::vstate::memory::create(snap.state.mem_size).map_err(MachineError::from)?;
    snap.load_memory(&memory)?;
    let net = net_option(&a.devices)?;
    let mut disks = disk_options(&a.devices)?;
    if disks.is_empty() {
        disks = snapshot_disks(&dir, &snap.state)?;
    }
    let machine = Machine::restore(&snap.state, &console, net.as_ref(), &disks, memory)?;
    info!(
        "restored {} vCPUs and {} MiB from {}",
        snap.state.vcpus.len(),
        snap.state.mem_size >> 20,
        dir.display()
    );
    let node = Node {
        console,
        net,
        disks,
        fence: None,
        fence_delay: DEFAULT_FENCE_DELAY,
        primary: PrimaryOptions::new(String::new(), DEFAULT_NAME.to_string()),
        snapshot: None,
    };
    finish(node.run(Start::Run(machine)))
}

/// The snapshot's own copies of the guest's disks (`DIR/disk<i>.img`), for a restore
/// without `--disk`: the guest then writes to them.
fn snapshot_disks(
    dir: &std::path::Path,
    state: &engine::persist::state::MachineState,
) -> Result<Vec<DiskConfig>, CliError> {
    use engine::devices::virtio::block::BlockState;
    let mut disks = Vec::new();
    for s in state
        .virtio
        .iter()
        .filter(|s| s.device_id == engine::boot::abi::VIRTIO_ID_BLOCK)
    {
        let path = snapshot::disk_file(dir, disks.len());
        if !path.exists() {
            // An older snapshot without copies: the restore names the image it needs.
            return Ok(Vec::new());
        }
        let readonly = BlockState::from_bytes(&s.device).is_ok_and(|b| b.readonly);
        info!(
            "disk {}: the snapshot's copy {} (the guest writes to it: copy the snapshot \
             first to restore it again as it was)",
            disks.len(),
            path.display()
        );
        disks.push(DiskConfig { path, readonly });
    }
    Ok(disks)
}

fn cmd_primary(a: PrimaryArgs) -> Result<ExitCode, CliError> {
    log::init("primary");
    a.process.open_events()?;
    let g = boot_config(&a.guest, a.dirty_ring)?;
    let peer = a
        .peer
        .ok_or_else(|| usage("--peer ADDR:PORT is required"))?;
    let seconds = a
        .seconds
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| d.as_secs() <= MAX_SECONDS)
                .ok_or_else(|| {
                    usage(format!(
                        "--seconds {s}: must be a number of seconds from 0 to {MAX_SECONDS}"
                    ))
                })
        })
        .transpose()?;
    let name = a.name.unwrap_or_else(|| DEFAULT_NAME.to_string());
    let (fence, mut template) = replication(&a.replication, &a.fence, &name, false, false)?;
    template.link = link_option(&a.replication, &name, true)?;
    let _services = a.process.start()?;
    let machine = Machine::start(&g)?;
    let node = Node {
        console: g.machine.console.clone(),
        net: g.machine.net.clone(),
        disks: g.machine.disks.clone(),
        fence,
        fence_delay: DEFAULT_FENCE_DELAY,
        primary: PrimaryOptions {
            peer,
            seconds,
            ..template
        },
        snapshot: None,
    };
    finish(node.run(Start::Protect(machine)))
}

/// The settings of the primary role, from `--interval-ms` and the other replication
/// options, with how the process fences its peer (see [`fencing`]). `primary`, `run` and
/// `backup` build them here alike: whichever process comes to run the guest protected
/// (from the start, after `ctl protect`, after a failover or a switchover) replicates as
/// its command line says. `peer` is left empty (a protect names it) and `seconds` unset.
fn replication(
    r: &ReplicationArgs,
    f: &FenceArgs,
    name: &str,
    delay_given: bool,
    backup: bool,
) -> Result<(Option<FenceConfig>, PrimaryOptions), CliError> {
    let interval = match r.interval_ms {
        None => primary::DEFAULT_INTERVAL,
        Some(0) => return Err(usage("--interval-ms must be at least 1")),
        Some(ms) => Duration::from_millis(in_range("interval-ms", ms, 1..=MAX_MS)?),
    };
    let window = match r.window {
        None => primary::DEFAULT_WINDOW,
        Some(0) => return Err(usage("--window must be at least 1")),
        Some(n) => n,
    };
    let max_epoch_pages = match r.max_epoch_pages {
        None => primary::DEFAULT_MAX_EPOCH_PAGES,
        Some(0) => return Err(usage("--max-epoch-pages must be at least 1")),
        Some(n) => n,
    };
    let on_backup_loss = match r.on_backup_loss.as_deref().unwrap_or("fence") {
        "fence" => OnBackupLoss::Fence,
        "pause" => OnBackupLoss::Pause,
        "continue" => OnBackupLoss::Continue,
        other => {
            return Err(usage(format!(
                "--on-backup-loss {other}: expected fence, pause or continue"
            )))
        }
    };
    // The backup's --fence-cmd fences the primary before it promotes, whatever its
    // primary role does when it loses a backup; elsewhere the agent is for the backup.
    if !backup && on_backup_loss != OnBackupLoss::Fence && f.fence_cmd.is_some() {
        return Err(usage(
            "--fence-cmd is used only with --on-backup-loss fence (the default)",
        ));
    }
    let defaults = PrimaryOptions::new(String::new(), name.to_string());
    let min_interval = match r.min_interval_ms {
        None => defaults.min_interval,
        Some(ms) if ms.is_finite() => {
            Duration::from_secs_f64(in_range("min-interval-ms", ms, 0.0..=MAX_MS as f64)? / 1000.0)
        }
        Some(ms) => return Err(usage(format!("--min-interval-ms {ms}: not a number of ms"))),
    };
    if min_interval > interval {
        return Err(usage(format!(
            "--min-interval-ms {} is longer than the epoch interval ({} ms): an early \
             checkpoint could never come early",
            min_interval.as_secs_f64() * 1000.0,
            interval.as_millis()
        )));
    }
    let connect_timeout = match r.connect_timeout_s {
        None => defaults.connect_timeout,
        Some(s) => Duration::from_secs(in_range("connect-timeout-s", s, 0..=MAX_SECONDS)?),
    };
    let backup_timeout = heartbeat_timeout(r.heartbeat_timeout_ms)?;
    let epoch_precopy_pct = match r.epoch_precopy_pct {
        None => defaults.epoch_precopy_pct,
        Some(p) => in_range("epoch-precopy-pct", p, 0..=95)?,
    };
    if let Some(path) = &r.stats_json {
        stats::check_json_path(path)
            .map_err(|e| usage(format!("--stats-json {}: {e}", path.display())))?;
    }
    let (fence, agent) = fencing(f, name, delay_given, backup)?;
    Ok((
        fence,
        PrimaryOptions {
            interval,
            connect_timeout,
            window,
            backup_timeout,
            on_backup_loss,
            fence: agent,
            early_checkpoint: !r.no_early_checkpoint,
            min_interval,
            max_epoch_pages,
            epoch_precopy_pct,
            stats_json: r.stats_json.clone(),
            ..defaults
        },
    ))
}

/// The process's exit status once its roles are over: the guest's, or 0 when an operator
/// stopped a backup (SIGTERM, `ctl stop`) before the primary ended replication -- a
/// stop asked for is no error. The backup's committed epoch is said on stderr.
fn finish(ended: Result<u8, NodeError>) -> Result<ExitCode, CliError> {
    match ended {
        Ok(status) => exit(status),
        Err(NodeError::Backup(BackupError::Stopped(epoch))) => {
            if epoch == 0 {
                info!("stopped by request; no epoch committed yet");
            } else {
                info!("stopped by request; holding committed epoch {epoch}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

/// How a process fences its peer in each role it may take: the backup role's
/// [`FenceConfig`] (before it promotes) and the primary role's agent (before it releases
/// output a lost backup did not acknowledge). `backup`: the command is `lockstep backup`
/// (`--fence none` is its alone).
fn fencing(
    f: &FenceArgs,
    name: &str,
    delay_given: bool,
    backup: bool,
) -> Result<(Option<FenceConfig>, Option<FenceAgent>), CliError> {
    match fence_option(f, name, delay_given)? {
        None => Ok((None, None)),
        Some(FenceConfig::None) if backup => Ok((Some(FenceConfig::None), None)),
        Some(FenceConfig::None) => Err(usage(
            "--fence none is for the backup; a primary that may go on without \
             fencing its backup says --on-backup-loss continue",
        )),
        Some(FenceConfig::Agent(agent)) => {
            Ok((Some(FenceConfig::Agent(agent.clone())), Some(agent)))
        }
        Some(FenceConfig::Cluster) => {
            let victim = f.peer_node.as_deref().map(str::trim).unwrap_or_default();
            if victim.is_empty() || victim.contains(['\n', '\r']) {
                return Err(usage(
                    "--fence cluster needs --peer-node NODE: the peer's node as the cluster \
                     knows it (the primary asks the cluster's fencer to fence it)",
                ));
            }
            let timeout = Duration::from_secs(f.fence_timeout_s.unwrap_or(60));
            // The primary role asks the cluster's fencer (pacemaker-fenced) to fence the
            // backup's node with the cluster's own devices; exit 0 only once it is fenced.
            // The node comes from `nodename=` on stdin, so a protect can aim it elsewhere.
            let agent = FenceAgent {
                cmd: format!(
                    "exec stonith_admin --fence \"$(sed -n 's/^nodename=//p' | tail -n 1)\" \
                     --timeout {}",
                    timeout.as_secs()
                ),
                args: Vec::new(),
                victim: victim.to_string(),
                timeout: timeout + Duration::from_secs(10),
            };
            Ok((Some(FenceConfig::Cluster), Some(agent)))
        }
    }
}

/// `--vcpus N`, checked against what the boot contract supports.
fn vcpus_option(vcpus: Option<u32>) -> Result<Option<u32>, CliError> {
    let max = engine::boot::abi::MAX_VCPUS;
    match vcpus {
        Some(n) if n == 0 || n > max => {
            Err(usage(format!("--vcpus {n}: must be between 1 and {max}")))
        }
        v => Ok(v),
    }
}

fn cmd_backup(a: BackupArgs) -> Result<ExitCode, CliError> {
    log::init("backup");
    a.process.open_events()?;
    let listen = a
        .listen
        .ok_or_else(|| usage("--listen ADDR:PORT is required"))?;
    let mem = a.mem.as_deref().map(parse_size).transpose()?;
    if let Some(m) = mem {
        engine::vstate::memory::validate_size(m).map_err(|e| usage(e.to_string()))?;
    }
    let name = a.name.unwrap_or_else(|| DEFAULT_NAME.to_string());
    let fence_delay = match a.fence_delay_ms {
        None => DEFAULT_FENCE_DELAY,
        Some(ms) => Duration::from_millis(in_range("fence-delay-ms", ms, 0..=MAX_MS)?),
    };
    let (fence, mut template) = replication(
        &a.replication,
        &a.fence,
        &name,
        a.fence_delay_ms.is_some(),
        true,
    )?;
    let opts = BackupOptions {
        listen,
        link: None,
        mem,
        vcpus: vcpus_option(a.vcpus)?,
        name: name.clone(),
        run_after_end: a.run_after_end,
        net: net_option(&a.devices)?,
        disks: disk_options(&a.devices)?,
        console: console_option(&a.devices),
        heartbeat_timeout: template.backup_timeout,
        withhold_acks: a.test_withhold_acks_ms.map(Duration::from_millis),
        fence: None,
    };
    if fence.is_some() && opts.net.is_none() {
        // Promotion without the network would cut every client off: refuse up front.
        return Err(usage(
            "--fence/--fence-cmd need --net tap=NAME (the tap the promoted guest takes over)",
        ));
    }
    template.link = link_option(&a.replication, &name, true)?;
    let opts = BackupOptions {
        link: template.link.clone(),
        ..opts
    };
    // Held until the process ends: a promoted backup runs the guest, is fenced by its
    // pid file and serves the same socket and metrics.
    let _services = a.process.start()?;
    let node = Node {
        console: opts.console.clone(),
        net: opts.net.clone(),
        disks: opts.disks.clone(),
        primary: template,
        fence,
        fence_delay,
        snapshot: None,
    };
    finish(node.run(Start::Backup(opts)))
}

/// `--tls-cert`, `--tls-key`, `--tls-ca` or `--insecure`: how the replication link is
/// secured. `required`: the command replicates at once (`primary`, `backup`); `run` may go
/// without, and then cannot be protected.
fn link_option(
    r: &ReplicationArgs,
    name: &str,
    required: bool,
) -> Result<Option<LinkSecurity>, CliError> {
    let files = [
        ("--tls-cert", &r.tls_cert),
        ("--tls-key", &r.tls_key),
        ("--tls-ca", &r.tls_ca),
    ];
    let given: Vec<&str> = files
        .iter()
        .filter(|(_, f)| f.is_some())
        .map(|(o, _)| *o)
        .collect();
    if r.insecure && !given.is_empty() {
        return Err(usage(format!(
            "--insecure and {} exclude each other: secure the link or say it is not",
            given.join(", ")
        )));
    }
    if r.insecure {
        // Each role says it is unsafe once it uses the link (the backup when it listens,
        // the primary once the backup accepted it).
        return Ok(Some(LinkSecurity::Insecure));
    }
    match (&r.tls_cert, &r.tls_key, &r.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let id = TlsIdentity::load(cert, key, ca, name).map_err(|e| usage(e.to_string()))?;
            id.check_own().map_err(|e| usage(e.to_string()))?;
            Ok(Some(LinkSecurity::Tls(std::sync::Arc::new(id))))
        }
        _ if !given.is_empty() => {
            let missing: Vec<&str> = files
                .iter()
                .filter(|(_, f)| f.is_none())
                .map(|(o, _)| *o)
                .collect();
            Err(usage(format!(
                "--tls-cert, --tls-key and --tls-ca go together (missing {})",
                missing.join(", ")
            )))
        }
        _ if required => Err(usage(
            "the replication link needs --tls-cert, --tls-key and --tls-ca (see `lockstep \
             certs`), or --insecure to run it in clear (unsafe)",
        )),
        _ => Ok(None),
    }
}

/// `--heartbeat-timeout-ms MS`: the silence after which either role counts its peer lost.
fn heartbeat_timeout(ms: Option<u64>) -> Result<Duration, CliError> {
    match ms {
        None => Ok(DEFAULT_HEARTBEAT_TIMEOUT),
        Some(ms) => Ok(Duration::from_millis(in_range(
            "heartbeat-timeout-ms",
            ms,
            1..=MAX_MS,
        )?)),
    }
}

/// `--pid-file PATH`: written now, removed when the process ends in order.
fn pid_file_option(path: Option<PathBuf>) -> Result<Option<PidFile>, CliError> {
    path.map(|p| PidFile::create(&p))
        .transpose()
        .map_err(CliError::from)
}

/// The fencing options of both roles; `name` is the pair's, `delay_given` whether the
/// backup's `--fence-delay-ms` was.
fn fence_option(
    f: &FenceArgs,
    name: &str,
    delay_given: bool,
) -> Result<Option<FenceConfig>, CliError> {
    let args = f
        .fence_arg
        .iter()
        .map(|kv| parse_fence_arg(kv).map_err(|e| usage(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_secs(in_range(
        "fence-timeout-s",
        f.fence_timeout_s.unwrap_or(10),
        1..=3600,
    )?);
    // Options of an agent, given without one: a mistake, never silently ignored.
    let agent_only = || -> Result<(), CliError> {
        for (option, given) in [
            ("peer-node", f.peer_node.is_some()),
            ("fence-arg", !f.fence_arg.is_empty()),
            ("fence-timeout-s", f.fence_timeout_s.is_some()),
            ("fence-delay-ms", delay_given),
        ] {
            if given {
                return Err(usage(format!(
                    "--{option} needs --fence-cmd (it configures the fence agent)"
                )));
            }
        }
        Ok(())
    };
    match (f.fence.as_deref(), f.fence_cmd.as_deref()) {
        (Some("none"), None) => {
            agent_only()?;
            Ok(Some(FenceConfig::None))
        }
        (Some("cluster"), None) => {
            for (option, given) in [
                ("fence-arg", !f.fence_arg.is_empty()),
                ("fence-delay-ms", delay_given),
            ] {
                if given {
                    return Err(usage(format!(
                        "--{option} is for --fence-cmd; with --fence cluster the cluster's \
                         fencer and its delays apply"
                    )));
                }
            }
            Ok(Some(FenceConfig::Cluster))
        }
        (Some(other), None) => Err(usage(format!(
            "--fence {other}: expected none or cluster (or use --fence-cmd)"
        ))),
        (Some(f), Some(_)) => Err(usage(format!(
            "--fence {f} and --fence-cmd exclude each other"
        ))),
        (None, Some(cmd)) if cmd.trim().is_empty() => Err(usage(
            "--fence-cmd is empty: `sh -c ''` exits 0 and would count as fenced",
        )),
        (None, Some(cmd)) => {
            // Without --peer-node the victim is the pair's --name, as nodename= was before;
            // an agent that does not know that name fails, and nothing is promoted.
            let victim = f.peer_node.as_deref().unwrap_or(name).trim();
            if victim.is_empty() || victim.contains(['\n', '\r']) {
                return Err(usage(
                    "--peer-node: the peer's node as the fence device knows it (sent as \
                     nodename=, port= and plug=) cannot be empty or hold a line break",
                ));
            }
            info!(
                "fencing the peer with '{cmd}' as node '{victim}'{}",
                if f.peer_node.is_none() {
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

#[cfg(test)]
mod tests;
