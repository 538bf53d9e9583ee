//! Fencing: making sure a peer can no longer run the guest before this side acts alone
//! (invariant 3: at most one guest of a pair runs, and the backup only ever promotes from
//! a state that includes every output the primary released).
//!
//! Both roles fence through the same agents. The backup fences the primary before it
//! promotes; the primary fences the backup before it releases output the backup has not
//! acknowledged (DRBD's `fence-peer`, resource-level fencing, is the same idea).
//!
//! Agents are called the way Pacemaker's fencer calls the ClusterLabs fence-agents
//! (`fencing.py`, `_parse_input_stdin`): `sh -c CMD` reads `key=value` lines on stdin, and
//! only exit status 0 within the timeout means the victim is off. Anything else — a non-zero
//! exit, a timeout, an agent that cannot be started — means it may still be running: this
//! side does not act, and retries with backoff, loudly, for as long as it takes.
//!
//! What lockstep asks and of whom is not the operator's to change: the keys in
//! [`RESERVED_KEYS`] are refused in `--fence-arg`, and lockstep's own lines come after the
//! operator's, so an agent that keeps the last value of a key (as fence-agents do) still
//! reads lockstep's.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{events, metrics, stop_requested};
use crate::{info, warn};

/// Keys of the agent's stdin that only lockstep sets, compared after trimming, lowering
/// the case and turning `-` into `_` (fence-agents accept both spellings):
/// - `action` (and its old name `option`): what to do; always `off` when lockstep fences;
/// - `nodename`, `port`, `plug`: whom; `--peer-node` sets them;
/// - `missing_as_off`, `port_as_ip`, `plug_separator`, `separator`: would let an agent
///   report success for a victim it cannot find, address another machine than the one
///   named, or split the name into others;
/// - `help`, `version`: fencing.py prints and exits 0 before any action, which would read
///   as "fenced".
pub const RESERVED_KEYS: &[&str] = &[
    "action",
    "option",
    "nodename",
    "port",
    "plug",
    "missing_as_off",
    "port_as_ip",
    "plug_separator",
    "separator",
    "help",
    "version",
];

/// Bytes of an agent's stdout and stderr kept for the log (each); the rest is counted and
/// dropped, never left unread (an agent blocked on a full pipe would look hung).
pub const OUTPUT_KEPT: usize = 4096;

/// How one side fences its peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceConfig {
    /// `--fence none`: act without fencing (unsafe: two running guests are possible).
    None,
    /// `--fence-cmd CMD --peer-node NAME [--fence-arg k=v]... [--fence-timeout-s S]`.
    Agent(FenceAgent),
    /// `--fence cluster` (backup only): a cluster manager (Pacemaker) fences and decides
    /// promotion. A lost primary is not promoted over; the backup waits with its
    /// committed epoch until `POST /failover` (the resource agent's promote, which the
    /// cluster runs only after fencing the old primary's node), then promotes at once.
    Cluster,
}

/// A fence agent and whom it fences.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceAgent {
    /// Run as `sh -c CMD`.
    pub cmd: String,
    /// The operator's options, in order; none has a key of [`RESERVED_KEYS`].
    pub args: Vec<(String, String)>,
    /// The victim: the peer's node as the fence device knows it, sent as `nodename=`,
    /// `port=` and `plug=` (Pacemaker passes `nodename` plus `port` or `plug`).
    pub victim: String,
    /// One attempt longer than this counts as failed; the agent's process group is killed.
    pub timeout: Duration,
}

/// Why a `--fence-arg` was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FenceArgError {
    /// Not `key=value`.
    #[error("--fence-arg {0:?}: expected key=value")]
    Shape(String),
    /// The key is not letters, digits, '-' and '_'.
    #[error("--fence-arg {0:?}: a key is letters, digits, '-' and '_'")]
    Key(String),
    /// The value holds a line break.
    #[error("--fence-arg {0:?}: a value cannot hold a line break")]
    Value(String),
    #[error(
        "--fence-arg {arg:?}: '{key}' is lockstep's to set (it always asks for action=off of \
         --peer-node); reserved: {}",
        RESERVED_KEYS.join(", ")
    )]
    /// The key is one lockstep sets itself.
    Reserved {
        /// The argument given.
        arg: String,
        /// The reserved key.
        key: String,
    },
}

/// Parses one `--fence-arg key=value`, refusing reserved keys and anything that would
/// read as more than one line on the agent's stdin.
pub fn parse_fence_arg(arg: &str) -> Result<(String, String), FenceArgError> {
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| FenceArgError::Shape(arg.to_string()))?;
    let key = k.trim();
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(FenceArgError::Key(arg.to_string()));
    }
    if v.contains(['\n', '\r']) {
        return Err(FenceArgError::Value(arg.to_string()));
    }
    let norm = key.to_ascii_lowercase().replace('-', "_");
    if RESERVED_KEYS.contains(&norm.as_str()) {
        return Err(FenceArgError::Reserved {
            arg: arg.to_string(),
            key: key.to_string(),
        });
    }
    Ok((key.to_string(), v.to_string()))
}

/// Why one fencing attempt did not confirm the victim is off.
#[derive(Debug, Error)]
pub enum FenceError {
    /// The agent could not be started.
    #[error("cannot start fence command '{cmd}': {source}")]
    Spawn {
        /// The command.
        cmd: String,
        /// The error from spawning it.
        source: std::io::Error,
    },
    /// The agent exited with a failure.
    #[error("fence command '{cmd}' failed with {status}{detail}")]
    Failed {
        /// The command.
        cmd: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it wrote, for the log.
        detail: String,
    },
    /// The agent did not finish in time and was killed.
    #[error("fence command '{cmd}' did not finish within {timeout:?}; killed it{detail}")]
    Timeout {
        /// The command.
        cmd: String,
        /// How long it had.
        timeout: Duration,
        /// What it wrote, for the log.
        detail: String,
    },
    /// SIGTERM or SIGINT arrived while fencing.
    #[error("stopped while fencing; not acting alone")]
    Stopped,
}

/// What the agent reads on stdin: the operator's options, then lockstep's own.
pub fn agent_input(victim: &str, action: &str, args: &[(String, String)]) -> String {
    let mut s = String::new();
    for (k, v) in args {
        s.push_str(&format!("{k}={v}\n"));
    }
    s.push_str(&format!(
        "action={action}\nnodename={victim}\nport={victim}\nplug={victim}\n"
    ));
    s
}

/// What an agent wrote on one stream: the first [`OUTPUT_KEPT`] bytes and the total.
#[derive(Debug, Default)]
pub struct Output {
    /// The first bytes written.
    pub kept: Vec<u8>,
    /// How many bytes were written in all.
    pub total: u64,
}

impl Output {
    /// The kept text as one log line (`a | b | c`), with how much was dropped.
    pub fn summary(&self) -> String {
        let text = String::from_utf8_lossy(&self.kept);
        let mut s: String = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" | ");
        if self.total > self.kept.len() as u64 {
            s.push_str(&format!(
                " [... {} more bytes]",
                self.total - self.kept.len() as u64
            ));
        }
        s
    }
}

/// Reads a pipe to its end on a thread, keeping the first [`OUTPUT_KEPT`] bytes.
fn drain(mut from: impl Read + Send + 'static, done: mpsc::Sender<(usize, Output)>, which: usize) {
    std::thread::spawn(move || {
        let mut out = Output::default();
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = OUTPUT_KEPT.saturating_sub(out.kept.len());
                    out.kept.extend_from_slice(&buf[..n.min(room)]);
                    out.total += n as u64;
                }
            }
        }
        let _ = done.send((which, out));
    });
}

/// The result of running an agent once.
#[derive(Debug)]
pub struct AgentRun {
    /// `None` when it did not finish within the timeout (its process group was killed).
    pub status: Option<ExitStatus>,
    /// What the agent wrote on stdout.
    pub stdout: Output,
    /// What the agent wrote on stderr.
    pub stderr: Output,
}

impl AgentRun {
    /// The agent's output for a log line: `stderr: ...; stdout: ...`, empty if silent.
    pub fn detail(&self) -> String {
        let mut parts = Vec::new();
        for (name, o) in [("stderr", &self.stderr), ("stdout", &self.stdout)] {
            let s = o.summary();
            if !s.is_empty() {
                parts.push(format!("{name}: {s}"));
            }
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join("; "))
        }
    }
}

/// Runs `sh -c CMD` once with `input` on stdin, in a process group of its own, draining
/// stdout and stderr as it goes; on timeout, SIGKILLs the whole group.
pub fn run_agent(cmd: &str, input: &str, timeout: Duration) -> std::io::Result<AgentRun> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2)
    // (rustix issues the system call directly), which is async-signal-safe, allocates
    // nothing and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            // A side that is itself fenced (killed) while its agent runs must not go on
            // fencing the other: the agent dies with it, so that a race in which both
            // sides fence leaves, where it can, one of them.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        })
    };
    let mut child = command.spawn()?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        drain(out, tx.clone(), 0);
    }
    if let Some(err) = child.stderr.take() {
        drain(err, tx, 1);
    }
    if let Some(mut stdin) = child.stdin.take() {
        let input = input.to_string();
        // An agent that never reads its stdin must not block us: write from a thread, and
        // close the pipe when done (the agent reads to EOF).
        std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
    }
    // The child leads its own process group (process_group(0) above).
    let pgid = rustix::process::Pid::from_raw(child.id() as i32);
    let deadline = Instant::now().checked_add(timeout);
    let kill_group = || {
        // An empty group is ESRCH: nothing left to kill.
        if let Some(pgid) = pgid {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if deadline.is_none_or(|d| Instant::now() < d) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            _ => {
                kill_group();
                let _ = child.wait();
                break None;
            }
        }
    };
    // What the agent left running in its group has no say any more: end it, so that
    // retries do not pile up helpers.
    kill_group();
    // Children the agent left behind may still hold its pipes: take what arrived soon
    // after it ended, never wait for them.
    let mut outs = [Output::default(), Output::default()];
    let until = Instant::now() + Duration::from_millis(200);
    for _ in 0..2 {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok((i, o)) => outs[i] = o,
            Err(_) => break,
        }
    }
    let [stdout, stderr] = outs;
    Ok(AgentRun {
        status,
        stdout,
        stderr,
    })
}

/// One attempt to switch `agent.victim` off.
pub fn fence_once(agent: &FenceAgent) -> Result<AgentRun, FenceError> {
    let input = agent_input(&agent.victim, "off", &agent.args);
    let run = run_agent(&agent.cmd, &input, agent.timeout).map_err(|source| FenceError::Spawn {
        cmd: agent.cmd.clone(),
        source,
    })?;
    match run.status {
        Some(s) if s.success() => Ok(run),
        Some(status) => Err(FenceError::Failed {
            cmd: agent.cmd.clone(),
            status,
            detail: run.detail(),
        }),
        None => Err(FenceError::Timeout {
            cmd: agent.cmd.clone(),
            timeout: agent.timeout,
            detail: run.detail(),
        }),
    }
}

/// Fences until it succeeds (backoff 0.5 s doubling to 8 s), or until SIGTERM/SIGINT.
/// `peer` names the victim's role in the log ("the old primary", "the backup").
/// Returns the number of attempts it took (0 for `--fence none`). Each attempt writes
/// `fence` events: `started`, then `fenced` or `failed`.
pub fn fence_until_done(cfg: &FenceConfig, peer: &str) -> Result<u32, FenceError> {
    fence_attempts(cfg, peer, u32::MAX)
}

/// [`fence_until_done`], giving up after `tries` failed attempts (the last failure is
/// the error): an operator's failover tries a few times, then reports.
pub fn fence_attempts(cfg: &FenceConfig, peer: &str, tries: u32) -> Result<u32, FenceError> {
    let agent = match cfg {
        FenceConfig::Agent(agent) => agent,
        FenceConfig::None => {
            warn!("UNSAFE: acting WITHOUT fencing {peer} (--fence none): it may still be running");
            events::fence(peer, "", 0, "skipped", "--fence none");
            return Ok(0);
        }
        FenceConfig::Cluster => {
            info!("{peer} was fenced by the cluster (--fence cluster): promoting on its word");
            events::fence(
                peer,
                "",
                0,
                "skipped",
                "--fence cluster: fenced by the cluster",
            );
            return Ok(0);
        }
    };
    let mut backoff = Duration::from_millis(500);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        events::fence(peer, &agent.victim, attempt, "started", &agent.cmd);
        match fence_once(agent) {
            Ok(run) => {
                let detail = run.detail();
                info!(
                    "fenced {peer} '{}' (attempt {attempt}){detail}",
                    agent.victim
                );
                events::fence(peer, &agent.victim, attempt, "fenced", detail.trim());
                metrics::fence_attempt(true);
                return Ok(attempt);
            }
            Err(e) => {
                events::fence(peer, &agent.victim, attempt, "failed", &e.to_string());
                metrics::fence_attempt(false);
                if attempt >= tries {
                    warn!(
                        "FENCING FAILED (attempt {attempt} of {tries}) for {peer} '{}': {e}; \
                         NOT acting alone",
                        agent.victim
                    );
                    return Err(e);
                }
                warn!("FENCING FAILED (attempt {attempt}) for {peer} '{}': {e}; NOT acting alone, retrying in {backoff:?}", agent.victim);
            }
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if stop_requested() {
                return Err(FenceError::Stopped);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        backoff = (backoff * 2).min(Duration::from_secs(8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(cmd: &str, timeout: Duration) -> FenceAgent {
        FenceAgent {
            cmd: cmd.to_string(),
            args: vec![("pidfile".to_string(), "/run/p".to_string())],
            victim: "node-a".to_string(),
            timeout,
        }
    }

    #[test]
    fn the_agent_reads_the_operators_options_then_lockstep_s() {
        let a = agent("", Duration::ZERO);
        let want = "pidfile=/run/p\naction=off\nnodename=node-a\nport=node-a\nplug=node-a\n";
        assert_eq!(agent_input(&a.victim, "off", &a.args), want);
        // The agent sees exactly that on stdin.
        let check = format!(
            "[ \"$(cat)\" = \"$(printf '{}')\" ]",
            want.replace('\n', "\\n")
        );
        fence_once(&agent(&check, Duration::from_secs(5))).unwrap();
        let mut other = agent(&check, Duration::from_secs(5));
        other.victim = "node-b".into();
        assert!(fence_once(&other).is_err());
    }

    #[test]
    fn reserved_keys_are_refused_in_every_spelling() {
        for arg in [
            "action=monitor",
            "ACTION=reboot",
            " action =status",
            "option=status",
            "nodename=other",
            "port=other",
            "plug=other",
            "Plug=other",
            "missing_as_off=1",
            "missing-as-off=1",
            "port-as-ip=1",
        ] {
            assert!(
                matches!(parse_fence_arg(arg), Err(FenceArgError::Reserved { .. })),
                "{arg} was accepted"
            );
        }
        assert!(matches!(
            parse_fence_arg("ip=1.2.3.4\naction=on"),
            Err(FenceArgError::Value(_))
        ));
        assert!(matches!(
            parse_fence_arg("ip=1\r"),
            Err(FenceArgError::Value(_))
        ));
        assert!(matches!(parse_fence_arg("=x"), Err(FenceArgError::Key(_))));
        assert!(matches!(
            parse_fence_arg("a b=x"),
            Err(FenceArgError::Key(_))
        ));
        assert!(matches!(
            parse_fence_arg("novalue"),
            Err(FenceArgError::Shape(_))
        ));
        assert_eq!(
            parse_fence_arg("password_script=cat /etc/p=q").unwrap(),
            ("password_script".into(), "cat /etc/p=q".into())
        );
        let e = parse_fence_arg("action=monitor").unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("lockstep's to set"), "{e}");
    }

    #[test]
    fn failure_and_timeout_are_failures_and_say_what_the_agent_wrote() {
        let e = fence_once(&agent(
            "echo no power switch >&2; exit 3",
            Duration::from_secs(5),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("no power switch"), "{e}");
        let t = Instant::now();
        let e = fence_once(&agent("echo trying; sleep 5", Duration::from_millis(300))).unwrap_err();
        assert!(matches!(e, FenceError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("trying"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the timeout did not kill the agent"
        );
    }

    #[test]
    fn a_timeout_kills_what_the_agent_started_too() {
        let t = Instant::now();
        // The agent's child holds the pipes open; killing only `sh` would leave it.
        let e = fence_once(&agent("sleep 30 & sleep 30", Duration::from_millis(200))).unwrap_err();
        assert!(matches!(e, FenceError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[test]
    fn a_talkative_agent_is_not_a_hung_one() {
        for cmd in [
            "head -c 1000000 /dev/zero | tr '\\0' e >&2; exit 0",
            "head -c 1000000 /dev/zero | tr '\\0' o; exit 0",
        ] {
            let t = Instant::now();
            let run = fence_once(&agent(cmd, Duration::from_secs(3))).unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{cmd}: {:?}",
                t.elapsed()
            );
            let total = run.stdout.total + run.stderr.total;
            assert_eq!(total, 1_000_000, "{cmd}");
            let d = run.detail();
            assert!(d.len() < 2 * OUTPUT_KEPT + 200, "{} bytes logged", d.len());
            assert!(d.contains("more bytes"), "{d}");
        }
    }

    #[test]
    fn an_agent_that_ignores_its_stdin_is_judged_by_its_status() {
        fence_once(&agent("exit 0", Duration::from_secs(5))).unwrap();
        assert!(fence_once(&agent("exec 0<&-; exit 1", Duration::from_secs(5))).is_err());
    }
}
