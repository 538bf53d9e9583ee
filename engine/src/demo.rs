//! `lockstep demo`: failover end to end on this host, with nothing else than root and
//! `/dev/kvm`.
//!
//! The demo creates a network namespace of its own with a tap (10.0.0.1/24 on the host
//! side), starts a backup and a primary running the kv guest (10.0.0.2) as child processes
//! of this executable inside it, and drives the guest from a client that keeps ONE TCP
//! connection open and records every acknowledged write (`SET k<i> <i>`, `INCR counter`).
//! Mid-run it SIGKILLs the primary. The backup notices, fences the dead primary with
//! `scripts/fence-pidfile` (embedded here and written to the demo's temporary directory),
//! and promotes: it resumes the guest from the last committed epoch on the same tap. The
//! client carries on over the same connection, then reads back every acknowledged key.
//! The demo exits 0 only if nothing acknowledged was lost and the connection survived.
//!
//! The pieces (the namespace, child processes, the RESP client, [`trial`]) are public so
//! that the failover benchmark drives exactly the same scenario.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The fence agent, embedded so the demo works from any directory.
pub const FENCE_AGENT: &str = include_str!("../../scripts/fence-pidfile");

/// The kv guest on the namespace's tap.
pub const KV_ARGS: &str = "workload=kv ip=10.0.0.2/24 port=6379";
pub const GUEST_ADDR: &str = "10.0.0.2:6379";

/// Replies that arrive this soon after the kill may have been released by the old primary
/// before it died; the first later reply comes from the promoted guest.
const OLD_PRIMARY_GRACE: Duration = Duration::from_millis(5);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag that every wait of the demo polls, so it cleans up.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe); `signal` with a
        // valid signal number and handler has no other preconditions.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Runs a command to completion; an error names it.
fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "'{}' failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A network namespace with `tap0` at 10.0.0.1/24 and loopback up, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(prefix: &str) -> Result<Netns, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        for cmd in [
            &["ip", "link", "set", "lo", "up"][..],
            &["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"],
            &["ip", "addr", "add", "10.0.0.1/24", "dev", "tap0"],
            &["ip", "link", "set", "tap0", "up"],
        ] {
            let mut full = vec!["ip", "netns", "exec", &ns.name];
            full.extend_from_slice(cmd);
            sh(&full)?;
        }
        Ok(ns)
    }

    /// `program args...` inside the namespace (`ip netns exec` execs it: same pid).
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        c
    }

    /// Runs `f` on a thread that entered the namespace; sockets it creates live there,
    /// whichever thread uses them afterwards.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                let ns = std::fs::File::open(&path)?;
                // SAFETY: setns(2) on a namespace fd we hold open; it changes only this
                // thread's network namespace, and the thread ends with the scope.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
        })
    }

    /// A TCP connection from inside the namespace.
    pub fn connect(&self, addr: &str, timeout: Duration) -> io::Result<TcpStream> {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| io::Error::other(format!("bad address {addr}")))?;
        self.within(|| TcpStream::connect_timeout(&addr, timeout))
    }

    /// A listener inside the namespace.
    pub fn listen(&self, addr: &str) -> io::Result<TcpListener> {
        self.within(|| TcpListener::bind(addr))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process with its output in files, killed (SIGKILL) and reaped on drop. It runs
/// in a process group of its own, so a Ctrl-C at the terminal reaches only the demo.
pub struct Proc {
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(mut cmd: Command, stdout: PathBuf, stderr: PathBuf) -> Result<Proc, String> {
        let out = std::fs::File::create(&stdout)
            .map_err(|e| format!("cannot create {}: {e}", stdout.display()))?;
        let err = std::fs::File::create(&stderr)
            .map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        Ok(Proc {
            child,
            stdout,
            stderr,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, ...) unless the process was reaped already.
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) takes no pointers; the child is not reaped yet (no status),
            // so the pid is still ours.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// SIGKILL and reap; returns when the process is gone.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGKILL);
        self.wait_for(Duration::from_secs(10))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_for(grace).or_else(|| self.kill9())
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn out(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `file` contains `needle`; false on timeout, interruption, or when `alive`
/// says the writer is gone.
pub fn wait_for_line(
    file: &Path,
    needle: &str,
    limit: Duration,
    mut alive: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && !interrupted() {
        if std::fs::read_to_string(file).is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        if !alive() {
            return std::fs::read_to_string(file).is_ok_and(|s| s.contains(needle));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// One RESP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
}

/// A Redis-protocol client over one TCP connection.
pub struct Kv {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Kv {
    pub fn new(stream: TcpStream, timeout: Duration) -> io::Result<Kv> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Kv {
            stream,
            buf: Vec::new(),
        })
    }

    /// Queues one command (sent by [`Kv::flush`]).
    pub fn encode(out: &mut Vec<u8>, args: &[&str]) {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&str]) -> io::Result<Reply> {
        let mut out = Vec::new();
        Kv::encode(&mut out, args);
        self.send_raw(&out)?;
        self.reply()
    }

    /// Reads the next reply.
    pub fn reply(&mut self) -> io::Result<Reply> {
        loop {
            if let Some((reply, used)) = parse_reply(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Parses one reply from the front of `buf`: `None` until it is complete.
fn parse_reply(buf: &[u8]) -> io::Result<Option<(Reply, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&buf[1..end]).into_owned();
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply line {line:?}"),
        )
    };
    let reply = match buf.first() {
        Some(b'+') => Reply::Simple(line),
        Some(b'-') => Reply::Error(line),
        Some(b':') => Reply::Int(line.parse().map_err(|_| bad())?),
        Some(b'$') => {
            let len: i64 = line.parse().map_err(|_| bad())?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), end + 2)));
            }
            let start = end + 2;
            let stop = start + len as usize;
            if buf.len() < stop + 2 {
                return Ok(None);
            }
            return Ok(Some((
                Reply::Bulk(Some(buf[start..stop].to_vec())),
                stop + 2,
            )));
        }
        _ => return Err(bad()),
    };
    Ok(Some((reply, end + 2)))
}

/// How one failover run goes.
#[derive(Clone, Debug)]
pub struct TrialConfig {
    /// The `lockstep` binary.
    pub bin: PathBuf,
    /// Where logs, consoles, the pid file and the fence agent go.
    pub dir: PathBuf,
    /// From the primary's start (the client starts connecting at once) to the SIGKILL.
    pub kill_after: Duration,
    /// How long the client keeps writing after its first reply from the promoted guest.
    pub run_after_failover: Duration,
    /// Guest RAM (`--mem`), default when `None`.
    pub mem: Option<String>,
    /// Port the backup listens on (namespace loopback).
    pub port: u16,
    /// Print the failover as it happens.
    pub verbose: bool,
}

/// What the backup's `PROMOTED` line says.
#[derive(Clone, Copy, Debug)]
pub struct Promotion {
    pub epoch: u64,
    /// Declared lost until the guest ran (the backup's own figure).
    pub after_lost_ms: f64,
}

/// Everything a failover run observed; the checks are the caller's.
#[derive(Debug, Default)]
pub struct TrialOutcome {
    pub connected: bool,
    /// `i` of every acknowledged `SET k<i> <i>`, in order.
    pub acked: Vec<u64>,
    /// Every `INCR counter` reply, in order.
    pub counters: Vec<i64>,
    /// Acknowledged writes before the kill.
    pub acked_before_kill: usize,
    /// Why the client stopped early, if it did (a reset, a wrong reply, a timeout).
    pub client_error: Option<String>,
    /// Acknowledged keys that read back missing or wrong.
    pub lost: Vec<u64>,
    /// Whether the read-back ran to the end.
    pub read_back: bool,
    /// Kill until the first reply from the promoted guest.
    pub failover: Option<Duration>,
    /// The longest gap between two replies across the kill.
    pub stall: Option<Duration>,
    pub promotion: Option<Promotion>,
    /// Kill until the backup logged `ROLE CHANGE` (approximate: its log clock starts at
    /// its spawn).
    pub detection: Option<Duration>,
    pub primary_log: String,
    pub backup_log: String,
    pub backup_status: Option<ExitStatus>,
}

#[derive(Default)]
struct Progress {
    connected: bool,
    replies: Vec<Instant>,
    acked: Vec<u64>,
    counters: Vec<i64>,
    kill: Option<Instant>,
    error: Option<String>,
}

/// Finds `PROMOTED: guest running from committed epoch E, <ms> ms after ...`.
pub fn parse_promotion(log: &str) -> Option<Promotion> {
    let line = log.lines().find(|l| l.contains("PROMOTED"))?;
    let rest = line.split("committed epoch ").nth(1)?;
    let epoch = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let ms = rest
        .split(", ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN);
    Some(Promotion {
        epoch,
        after_lost_ms: ms,
    })
}

/// The elapsed time at the start of a log line `[role   1.234s level] ...`.
pub fn log_time(line: &str) -> Option<Duration> {
    let inner = line.strip_prefix('[')?;
    let t = inner.split_whitespace().nth(1)?.strip_suffix('s')?;
    t.parse::<f64>().ok().map(Duration::from_secs_f64)
}

fn interesting(line: &str) -> bool {
    ["ROLE CHANGE", "PROMOTED", "fenc", "FENC", "error", "WARN"]
        .iter()
        .any(|n| line.contains(n))
}

/// One run: backup and primary in `ns`, the client, the SIGKILL, the promotion, the
/// read-back. Errors are setup failures (a process that would not start); what the run
/// observed is in the outcome.
pub fn trial(ns: &Netns, cfg: &TrialConfig) -> Result<TrialOutcome, String> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let agent = cfg.dir.join("fence-pidfile");
    write_agent(&agent)?;
    let pid_file = cfg.dir.join("primary.pid");
    let _ = std::fs::remove_file(&pid_file);
    let backup_pid_file = cfg.dir.join("backup.pid");
    let _ = std::fs::remove_file(&backup_pid_file);
    let arg = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let listen = format!("127.0.0.1:{}", cfg.port);
    let say = |s: String| {
        if cfg.verbose {
            println!("{s}");
        }
    };

    let backup_spawned = Instant::now();
    let mut backup = Proc::spawn(
        ns.command(
            &cfg.bin,
            &[
                "backup",
                "--listen",
                &listen,
                "--net",
                "tap=tap0",
                "--name",
                "demo",
                "--pid-file",
                &arg(&backup_pid_file),
                "--fence-cmd",
                &arg(&agent),
                "--peer-node",
                "demo-primary",
                "--fence-arg",
                &format!("pidfile={}", arg(&pid_file)),
                "--console",
                &arg(&cfg.dir.join("backup.console")),
            ],
        ),
        cfg.dir.join("backup.out"),
        cfg.dir.join("backup.err"),
    )?;
    let backup_err = backup.stderr.clone();
    if !wait_for_line(&backup_err, "listening on", Duration::from_secs(10), || {
        backup.try_wait().is_none()
    }) {
        return Err(format!("the backup did not start:\n{}", backup.log()));
    }
    let mut primary_args = vec![
        "primary".to_string(),
        "--peer".into(),
        listen.clone(),
        "--pid-file".into(),
        arg(&pid_file),
        "--name".into(),
        "demo".into(),
        // The backup, should it be the one lost, is fenced before any output it has not
        // acknowledged leaves.
        "--fence-cmd".into(),
        arg(&agent),
        "--peer-node".into(),
        "demo-backup".into(),
        "--fence-arg".into(),
        format!("pidfile={}", arg(&backup_pid_file)),
        "--guest".into(),
        "builtin".into(),
        "--guest-args".into(),
        KV_ARGS.into(),
        "--net".into(),
        "tap=tap0".into(),
        "--console".into(),
        arg(&cfg.dir.join("primary.console")),
    ];
    if let Some(m) = &cfg.mem {
        primary_args.extend(["--mem".to_string(), m.clone()]);
    }
    let primary_args: Vec<&str> = primary_args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut primary = Proc::spawn(
        ns.command(&cfg.bin, &primary_args),
        cfg.dir.join("primary.out"),
        cfg.dir.join("primary.err"),
    )?;
    say(format!(
        "primary pid {} and backup pid {} started; the client connects to {GUEST_ADDR}",
        primary.pid(),
        backup.pid()
    ));

    let progress = Arc::new(Mutex::new(Progress::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let outcome = std::thread::scope(|s| {
        let client = s.spawn(|| client(ns, &progress, &stop));
        let mut o = TrialOutcome::default();

        // Until the kill: the primary runs protected, the client writes.
        let kill_at = started + cfg.kill_after;
        let mut announced = false;
        while Instant::now() < kill_at && !interrupted() {
            if primary.try_wait().is_some() {
                break;
            }
            let p = progress.lock().unwrap_or_else(|e| e.into_inner());
            if p.connected && !announced && cfg.verbose {
                announced = true;
                println!(
                    "client connected after {} ms (the SYN-ACK waited for epoch 1)",
                    started.elapsed().as_millis()
                );
            }
            drop(p);
            std::thread::sleep(Duration::from_millis(2));
        }
        let early_exit = primary.try_wait();
        primary.kill9();
        let killed = Instant::now();
        let acked_before = {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.kill = Some(killed);
            p.acked.len()
        };
        o.acked_before_kill = acked_before;
        match early_exit {
            Some(st) => say(format!(
                "the primary had already ended ({st}) before the kill:\n{}",
                primary.log()
            )),
            None => say(format!(
                "\n>>> SIGKILL primary (pid {}) at {:.2} s, after {acked_before} acknowledged writes",
                primary.pid(),
                killed.duration_since(started).as_secs_f64()
            )),
        }

        // The failover, as the backup's log and the client see it.
        let mut shown = 0usize;
        let mut first_reply: Option<Instant> = None;
        let deadline = killed + Duration::from_secs(20);
        loop {
            let log = backup.log();
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[shown.min(lines.len())..] {
                if interesting(l) {
                    say(format!("    backup | {l}"));
                }
            }
            shown = lines.len();
            if o.promotion.is_none() {
                o.promotion = parse_promotion(&log);
            }
            let (client_done, reply_after) = {
                let p = progress.lock().unwrap_or_else(|e| e.into_inner());
                let after = p
                    .replies
                    .iter()
                    .find(|t| **t > killed + OLD_PRIMARY_GRACE)
                    .copied();
                (p.error.is_some(), after)
            };
            if first_reply.is_none() {
                if let Some(t) = reply_after {
                    first_reply = Some(t);
                    say(format!(
                        "    client | first reply from the promoted guest {:.1} ms after the kill, same connection",
                        t.duration_since(killed).as_secs_f64() * 1000.0
                    ));
                }
            }
            let backup_gone = backup.try_wait().is_some();
            let done = match first_reply {
                Some(t) => Instant::now() >= t + cfg.run_after_failover,
                None => false,
            };
            if done || client_done || backup_gone || interrupted() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::SeqCst);
        let (read_back, lost) = client.join().unwrap_or((false, Vec::new()));
        o.read_back = read_back;
        o.lost = lost;
        let p = progress.lock().unwrap_or_else(|e| e.into_inner());
        o.connected = p.connected;
        o.acked = p.acked.clone();
        o.counters = p.counters.clone();
        o.client_error = p.error.clone();
        o.failover = first_reply.map(|t| t.duration_since(killed));
        let window: Vec<Instant> = p
            .replies
            .iter()
            .copied()
            .filter(|t| *t >= killed - Duration::from_secs(1))
            .collect();
        let before = p.replies.iter().rev().find(|t| **t <= killed).copied();
        o.stall = match (before, first_reply) {
            (Some(_), Some(_)) => window
                .windows(2)
                .map(|w| w[1].duration_since(w[0]))
                .chain(std::iter::once(Duration::ZERO))
                .max(),
            _ => None,
        };
        o
    });
    let mut o = outcome;
    // The promoted backup should end on SIGTERM; do not wait long if it does not.
    o.backup_status = backup.terminate(Duration::from_secs(1));
    o.backup_log = backup.log();
    o.primary_log = primary.log();
    if o.promotion.is_none() {
        o.promotion = parse_promotion(&o.backup_log);
    }
    o.detection = o
        .backup_log
        .lines()
        .find(|l| l.contains("ROLE CHANGE"))
        .and_then(log_time)
        .and_then(|t| (backup_spawned + t).checked_duration_since(started + cfg.kill_after));
    let _ = std::fs::remove_file(&pid_file);
    Ok(o)
}

fn write_agent(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, FENCE_AGENT)
        .and_then(|_| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("cannot write the fence agent {}: {e}", path.display()))
}

/// The client: connects (retrying until `stop`), writes until `stop`, then reads every
/// acknowledged key back over the same connection. Returns (read back, lost keys).
fn client(ns: &Netns, progress: &Mutex<Progress>, stop: &AtomicBool) -> (bool, Vec<u64>) {
    let record_err = |e: String| {
        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
        p.error.get_or_insert(e);
    };
    let stream = loop {
        if stop.load(Ordering::SeqCst) {
            return (false, Vec::new());
        }
        match ns.connect(GUEST_ADDR, Duration::from_millis(1000)) {
            Ok(s) => break s,
            Err(_) => continue,
        }
    };
    let mut kv = match Kv::new(stream, Duration::from_secs(15)) {
        Ok(k) => k,
        Err(e) => {
            record_err(format!("socket options: {e}"));
            return (false, Vec::new());
        }
    };
    progress.lock().unwrap_or_else(|e| e.into_inner()).connected = true;
    let mut acked = Vec::new();
    let mut i = 0u64;
    let mut last: Option<i64> = None;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let key = format!("k{i}");
        let val = i.to_string();
        match kv.call(&["SET", &key, &val]) {
            Ok(Reply::Simple(s)) if s == "OK" => {}
            Ok(r) => {
                record_err(format!("SET {key}: unexpected reply {r:?}"));
                break;
            }
            Err(e) => {
                record_err(format!("SET {key}: {e} ({:?})", e.kind()));
                break;
            }
        }
        let now = Instant::now();
        acked.push(i);
        {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.replies.push(now);
            p.acked.push(i);
        }
        match kv.call(&["INCR", "counter"]) {
            Ok(Reply::Int(n)) => {
                let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                p.replies.push(Instant::now());
                p.counters.push(n);
                if let Some(prev) = last {
                    if n != prev + 1 {
                        p.error.get_or_insert(format!(
                            "INCR counter went from {prev} to {n} (expected {})",
                            prev + 1
                        ));
                    }
                }
                last = Some(n);
            }
            Ok(r) => {
                record_err(format!("INCR: unexpected reply {r:?}"));
                break;
            }
            Err(e) => {
                record_err(format!("INCR: {e} ({:?})", e.kind()));
                break;
            }
        }
    }
    if progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .error
        .is_some()
    {
        return (false, Vec::new());
    }
    // Read back, 100 GETs pipelined at a time.
    let mut lost = Vec::new();
    for chunk in acked.chunks(100) {
        let mut out = Vec::new();
        for i in chunk {
            Kv::encode(&mut out, &["GET", &format!("k{i}")]);
        }
        if let Err(e) = kv.send_raw(&out) {
            record_err(format!("read-back: {e}"));
            return (false, lost);
        }
        for i in chunk {
            match kv.reply() {
                Ok(Reply::Bulk(Some(v))) if v == i.to_string().as_bytes() => {}
                Ok(_) => lost.push(*i),
                Err(e) => {
                    record_err(format!("read-back of k{i}: {e}"));
                    return (false, lost);
                }
            }
        }
    }
    (true, lost)
}

/// `lockstep demo [--seconds S]`.
pub fn run(args: &[String]) -> Result<ExitCode, crate::cli::CliError> {
    crate::log::init("demo");
    let o = crate::cli::Options::parse("demo", args, &["seconds"], &[])?;
    o.no_positional()?;
    let seconds: f64 = o.number("seconds")?.unwrap_or(3.0);
    if !(0.5..=3600.0).contains(&seconds) {
        return Err(crate::cli::CliError::Usage(format!(
            "--seconds {seconds}: must be between 0.5 and 3600"
        )));
    }
    install_interrupt_handler();
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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
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
         the primary is SIGKILLed after {seconds} s"
    );
    let cfg = TrialConfig {
        bin,
        dir: dir.clone(),
        kill_after: Duration::from_secs_f64(seconds),
        run_after_failover: Duration::from_secs_f64(seconds.min(3.0)),
        mem: None,
        port: 7600,
        verbose: true,
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
    match plog.lines().rev().find(|l| l.contains("pause_us")) {
        Some(l) => {
            println!(
                "epochs (primary): {}",
                field(l, "epochs").unwrap_or_default()
            );
            let pause = l.split("pause_us").nth(1).unwrap_or_default();
            println!(
                "pause (us):{}",
                pause.split("commit_us").next().unwrap_or("")
            );
            let eps: f64 = field(l, "epochs")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let bytes: f64 = field(l, "wire_bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if eps > 0.0 {
                println!("bytes per epoch: {:.0}", bytes / eps);
            }
            println!(
                "compression: {}",
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
                "epochs committed on the backup: {} (the promoted guest resumed from it)",
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
    let ok = survived && o.lost.is_empty() && o.failover.is_some();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse_reply(b"+OK\r\n").unwrap(),
            Some((Reply::Simple("OK".into()), 5))
        );
        assert_eq!(
            parse_reply(b":42\r\n:1").unwrap(),
            Some((Reply::Int(42), 5))
        );
        assert_eq!(parse_reply(b"$3\r\nab").unwrap(), None);
        assert_eq!(
            parse_reply(b"$3\r\nabc\r\n").unwrap(),
            Some((Reply::Bulk(Some(b"abc".to_vec())), 9))
        );
        assert_eq!(
            parse_reply(b"$-1\r\n").unwrap(),
            Some((Reply::Bulk(None), 5))
        );
        assert_eq!(parse_reply(b"+O").unwrap(), None);
        assert!(parse_reply(b"?x\r\n").is_err());
    }

    #[test]
    fn parses_the_promotion_and_log_times() {
        let log = "[backup     2.345s info] ROLE CHANGE: primary lost\n\
                   [backup     2.401s info] PROMOTED: guest running from committed epoch 87, 56.2 ms after the primary was declared lost\n";
        let p = parse_promotion(log).unwrap();
        assert_eq!(p.epoch, 87);
        assert!((p.after_lost_ms - 56.2).abs() < 1e-9);
        assert_eq!(
            log_time(log.lines().next().unwrap()),
            Some(Duration::from_secs_f64(2.345))
        );
        assert!(parse_promotion("nothing").is_none());
    }
}
