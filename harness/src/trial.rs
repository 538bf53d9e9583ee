//! The failover trial `lockstep demo` and the failover benchmark run: a protected kv guest
//! in a network namespace, a client on one TCP connection, the primary SIGKILLed, the
//! backup's promotion, and the read-back of every acknowledged write.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::interrupted;
use crate::kv::{Kv, Reply};
use crate::link::PairTls;
use crate::netns::Netns;
use crate::process::{wait_for_line, Proc};

/// The fence agent, embedded so the demo works from any directory.
pub const FENCE_AGENT: &str = include_str!("../../scripts/fence-pidfile");

/// The kv guest on the namespace's tap.
pub const KV_ARGS: &str = "workload=kv ip=10.0.0.2/24 port=6379";
pub const GUEST_ADDR: &str = "10.0.0.2:6379";

/// Replies that arrive this soon after the kill may have been released by the old primary
/// before it died; the first later reply comes from the promoted guest.
const OLD_PRIMARY_GRACE: Duration = Duration::from_millis(5);

/// How the primary is lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Loss {
    /// SIGKILL: the process dies, its kernel closes its connections (the backup sees the
    /// replication link close at once).
    #[default]
    Kill,
    /// The host is lost: the namespace's loopback (the replication link) goes down and the
    /// primary is frozen (SIGSTOP), so nothing from it reaches anybody, not even a FIN or
    /// a RST when the fence agent kills it. The backup notices only the silence
    /// (`--heartbeat-timeout-ms`). Loopback comes back up when the trial ends.
    Host,
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
    /// After the failover, start a new backup (standing for the old primary's host come
    /// back: it takes the old primary's pid file) and protect the promoted guest with it
    /// (`lockstep ctl protect`), while the client keeps writing.
    pub reprotect: bool,
    /// Give the guest a disk of this many bytes (`primary.img`, the backup's copy in
    /// `backup.img`) and run the kv guest with `aof=on`; after the failover, boot a new
    /// guest from the promoted disk alone and read every acknowledged write back.
    pub disk: Option<u64>,
    /// How the primary is lost.
    pub loss: Loss,
    /// Options given to both the primary and the backup (`--heartbeat-timeout-ms`, ...).
    pub extra: Vec<String>,
}

/// What a guest booted from the promoted disk alone found (see [`TrialConfig::disk`]).
#[derive(Debug)]
pub struct ColdCheck {
    /// Acknowledged keys it read back wrong or missing.
    pub lost: Vec<u64>,
    /// Its `counter`, and the last value the client was told.
    pub counter: Option<i64>,
    pub last_told: Option<i64>,
    /// Keys checked.
    pub keys: usize,
}

/// What the re-protect after the failover observed.
#[derive(Debug)]
pub struct Reprotect {
    /// `ctl protect` until it reported the pair protected (the new backup committed an
    /// epoch), or why it failed.
    pub took: Result<Duration, String>,
    /// What `ctl protect` printed.
    pub ctl: String,
    /// Epochs the new backup had committed when the client stopped.
    pub committed: Option<u64>,
    /// The new backup's log.
    pub log: String,
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
    /// When the SIGKILL was sent (or the host's loss began: the link cut), by the wall
    /// clock, to compare with the times (`ts`) of the processes' `--events` lines.
    pub kill_sent_at: Option<SystemTime>,
    /// From then until the primary was gone (SIGKILLed and reaped, or its host lost),
    /// where `failover` counts from.
    pub kill_took: Option<Duration>,
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
    /// The re-protect, when asked for.
    pub reprotect: Option<Reprotect>,
    /// The cold boot from the promoted disk, when the guest had one and was promoted.
    pub cold: Option<Result<ColdCheck, String>>,
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
    let listen = format!("127.0.0.1:{}", cfg.port);
    let say = |s: String| {
        if cfg.verbose {
            println!("{s}");
        }
    };

    // The link is TLS, as a user runs it: the pair's certificates from `lockstep certs`.
    let tls = PairTls::make(&cfg.bin, &cfg.dir.join("tls"), "demo")?;
    if let Some(size) = cfg.disk {
        for name in ["primary.img", "backup.img", "backup2.img"] {
            let path = cfg.dir.join(name);
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(size))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let kv_args = kv_args(cfg);
    let backup_spawned = Instant::now();
    let mut backup = spawn_backup(ns, cfg, "backup", &listen, "demo-primary", "primary.pid")?;
    let started = Instant::now();
    let mut primary = spawn_primary(ns, cfg, &tls, &listen)?;
    say(format!(
        "primary pid {} and backup pid {} started, their link mutual TLS (certificates from \
         `lockstep certs` in {}); the client connects to {GUEST_ADDR}",
        primary.pid(),
        backup.pid(),
        cfg.dir.join("tls").display()
    ));

    let progress = Arc::new(Mutex::new(Progress::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut new_backup: Option<Proc> = None;
    let outcome = std::thread::scope(|s| {
        let client = s.spawn(|| client(ns, &progress, &stop, true));
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
        let kill_sent = Instant::now();
        o.kill_sent_at = Some(SystemTime::now());
        match cfg.loss {
            Loss::Kill => {
                primary.kill9();
            }
            Loss::Host => {
                if let Err(e) = cut_loopback(ns, true) {
                    say(format!("cannot take loopback down: {e}"));
                }
                primary.signal(libc::SIGSTOP);
            }
        }
        let killed = Instant::now();
        o.kill_took = Some(killed.duration_since(kill_sent));
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
            if done && cfg.reprotect && o.reprotect.is_none() && !interrupted() {
                let r = reprotect(ns, cfg, &say, &mut new_backup);
                let stop_at = Instant::now() + cfg.run_after_failover;
                while Instant::now() < stop_at && !interrupted() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                o.reprotect = Some(r);
                break;
            }
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
    if let Some(r) = &mut o.reprotect {
        r.committed = status_field(&cfg.bin, &cfg.dir.join("backup2.sock"), "committed_epoch")
            .and_then(|v| v.parse().ok());
    }
    if let Some(mut p) = new_backup.take() {
        p.terminate(Duration::from_secs(1));
        if let Some(r) = &mut o.reprotect {
            r.log = p.log();
        }
    }
    // The promoted backup should end on SIGTERM; do not wait long if it does not.
    o.backup_status = backup.terminate(Duration::from_secs(1));
    if cfg.loss == Loss::Host {
        // A primary the backup did not fence (it did not promote) is frozen still.
        primary.kill9();
        cut_loopback(ns, false)?;
    }
    o.backup_log = backup.log();
    o.primary_log = primary.log();
    if o.promotion.is_none() {
        o.promotion = parse_promotion(&o.backup_log);
    }
    if cfg.disk.is_some() && o.promotion.is_some() {
        o.cold = Some(cold_check(ns, cfg, &kv_args, &o));
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

/// Takes the namespace's loopback down (`cut`) or brings it back up. Down, the
/// connections on it stay open but nothing crosses them, in either direction.
pub fn cut_loopback(ns: &Netns, cut: bool) -> Result<(), String> {
    crate::netns::sh(&[
        "ip",
        "-n",
        &ns.name,
        "link",
        "set",
        "lo",
        if cut { "down" } else { "up" },
    ])
}

/// What a soak run saw: a protected pair under client load left alone, on a machine kept
/// busy, for a while. Any loss declared by either side is a false one.
#[derive(Debug, Default)]
pub struct SoakOutcome {
    /// How long pairs ran.
    pub ran: Duration,
    /// Pairs started (a false loss ends a pair; the next one starts).
    pub pairs: usize,
    /// The backup declared its (alive) primary lost: a false failover.
    pub false_failovers: usize,
    /// The primary declared its (alive) backup lost.
    pub false_backup_losses: usize,
    /// Near-miss warnings (a silence of half the heartbeat timeout or more), both sides.
    pub near_misses: usize,
    /// The longest silence of the primary the backup saw, over the pairs that ended
    /// cleanly (from the backup's last line).
    pub longest_silence: Option<Duration>,
    /// Replies the client got.
    pub replies: usize,
    /// The last pair's logs, when something went wrong.
    pub logs: String,
}

/// Runs pairs as [`trial`] does (with `cfg.extra`), none of them killed, for `total`,
/// while `busy` threads of this process spin; a pair that declares its peer lost is
/// counted and replaced. `cfg.kill_after` is not used.
pub fn soak(
    ns: &Netns,
    cfg: &TrialConfig,
    total: Duration,
    busy: usize,
) -> Result<SoakOutcome, String> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    write_agent(&cfg.dir.join("fence-pidfile"))?;
    let tls = PairTls::make(&cfg.bin, &cfg.dir.join("tls"), "demo")?;
    let listen = format!("127.0.0.1:{}", cfg.port);
    let spin = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..busy)
        .map(|_| {
            let spin = spin.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !spin.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let mut o = SoakOutcome::default();
    let began = Instant::now();
    let result = (|| -> Result<(), String> {
        while began.elapsed() < total && !interrupted() {
            for f in ["primary.pid", "backup.pid"] {
                let _ = std::fs::remove_file(cfg.dir.join(f));
            }
            o.pairs += 1;
            let mut backup =
                spawn_backup(ns, cfg, "backup", &listen, "demo-primary", "primary.pid")?;
            let mut primary = spawn_primary(ns, cfg, &tls, &listen)?;
            let progress = Arc::new(Mutex::new(Progress::default()));
            let stop = Arc::new(AtomicBool::new(false));
            let started = Instant::now();
            let lost = std::thread::scope(|s| {
                let client = s.spawn(|| client(ns, &progress, &stop, false));
                let mut lost = false;
                while began.elapsed() < total && !interrupted() {
                    std::thread::sleep(Duration::from_millis(200));
                    let logs = format!("{}{}", primary.log(), backup.log());
                    if logs.contains("ROLE CHANGE")
                        || primary.try_wait().is_some()
                        || backup.try_wait().is_some()
                    {
                        lost = true;
                        break;
                    }
                }
                stop.store(true, Ordering::SeqCst);
                let _ = client.join();
                // The end in order: the primary's last epoch and End, then the backup.
                primary.terminate(Duration::from_secs(10));
                lost
            });
            backup.terminate(Duration::from_secs(5));
            o.ran += started.elapsed();
            o.replies += progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replies
                .len();
            let (plog, blog) = (primary.log(), backup.log());
            let count = |log: &str, what: &str| log.lines().filter(|l| l.contains(what)).count();
            o.false_failovers += count(&blog, "ROLE CHANGE");
            o.false_backup_losses += count(&plog, "ROLE CHANGE");
            o.near_misses += count(&plog, "was silent for") + count(&blog, "was silent for");
            let silence = blog
                .lines()
                .filter_map(|l| l.split("the primary's longest silence ").nth(1))
                .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
                .max()
                .map(Duration::from_millis);
            o.longest_silence = o.longest_silence.max(silence);
            if lost {
                o.logs = format!("{plog}\n{blog}");
            }
        }
        Ok(())
    })();
    spin.store(true, Ordering::Relaxed);
    for t in spinners {
        let _ = t.join();
    }
    result.map(|()| o)
}

/// The kv guest's arguments: with a disk, every write is logged on it (`aof=on`).
fn kv_args(cfg: &TrialConfig) -> String {
    match cfg.disk {
        Some(_) => format!("{KV_ARGS} aof=on"),
        None => KV_ARGS.to_string(),
    }
}

/// `lockstep primary` of the kv guest on tap0, replicating to `listen`, fencing the
/// backup by its pid file.
fn spawn_primary(
    ns: &Netns,
    cfg: &TrialConfig,
    tls: &PairTls,
    listen: &str,
) -> Result<Proc, String> {
    let arg = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let pid_file = cfg.dir.join("primary.pid");
    let backup_pid_file = cfg.dir.join("backup.pid");
    let agent = cfg.dir.join("fence-pidfile");
    let mut primary_args = vec![
        "primary".to_string(),
        "--peer".into(),
        listen.to_string(),
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
        kv_args(cfg),
        "--net".into(),
        "tap=tap0".into(),
        "--console".into(),
        arg(&cfg.dir.join("primary.console")),
    ];
    primary_args.extend(tls.args("node1"));
    primary_args.extend(cfg.extra.iter().cloned());
    if cfg.disk.is_some() {
        primary_args.extend([
            "--disk".into(),
            format!("path={}", arg(&cfg.dir.join("primary.img"))),
        ]);
    }
    if let Some(m) = &cfg.mem {
        primary_args.extend(["--mem".to_string(), m.clone()]);
    }
    let primary_args: Vec<&str> = primary_args.iter().map(String::as_str).collect();
    Proc::spawn(
        ns.command(&cfg.bin, &primary_args),
        cfg.dir.join("primary.out"),
        cfg.dir.join("primary.err"),
    )
}

/// The new backup for the promoted guest: it listens on `port + 2`, takes the old
/// primary's pid file (it stands for that host come back, so the promoted side's fence
/// agent reaches it) and fences the promoted side by its pid file. Then `lockstep ctl
/// protect` on the promoted backup's control socket, timed. The new backup's process goes
/// to `keep`.
fn reprotect(
    ns: &Netns,
    cfg: &TrialConfig,
    say: &dyn Fn(String),
    keep: &mut Option<Proc>,
) -> Reprotect {
    let arg = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let listen = format!("127.0.0.1:{}", cfg.port + 2);
    // It stands for the old primary's host come back: it takes the old primary's pid file.
    let new_backup = match spawn_backup(ns, cfg, "backup2", &listen, "demo-promoted", "backup.pid")
    {
        Ok(p) => p,
        Err(e) => {
            return Reprotect {
                took: Err(e),
                ctl: String::new(),
                committed: None,
                log: String::new(),
            }
        }
    };
    say(format!(
        "\n>>> re-protect: new backup (pid {}) on {listen}; lockstep ctl protect on the promoted guest",
        new_backup.pid()
    ));
    let asked = Instant::now();
    let out = std::process::Command::new(&cfg.bin)
        .args(["ctl", "--api-sock", &arg(&cfg.dir.join("backup.sock"))])
        .args(["protect", "--peer", &listen])
        .output();
    let took = asked.elapsed();
    let (ok, ctl) = match out {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run lockstep ctl: {e}")),
    };
    for l in ctl.lines() {
        say(format!("    ctl    | {l}"));
    }
    *keep = Some(new_backup);
    Reprotect {
        took: if ok {
            Ok(took)
        } else {
            Err(ctl.trim().to_string())
        },
        ctl,
        committed: None,
        log: std::fs::read_to_string(cfg.dir.join("backup2.err")).unwrap_or_default(),
    }
}

/// One field of `lockstep ctl status --json` on `sock`, as text.
fn status_field(bin: &Path, sock: &Path, key: &str) -> Option<String> {
    let out = std::process::Command::new(bin)
        .args(["ctl", "--api-sock", sock.to_str()?, "status", "--json"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    Some(match &v[key] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// `lockstep backup` as `name` (its console, logs and control socket `<name>.sock` in the
/// trial's directory) listening on `listen`, fencing `peer_node` through the pid file
/// `victim_pid`; its own pid file is the other of primary.pid and backup.pid (a node is
/// its pid file). Returns once it listens.
fn spawn_backup(
    ns: &Netns,
    cfg: &TrialConfig,
    name: &str,
    listen: &str,
    peer_node: &str,
    victim_pid: &str,
) -> Result<Proc, String> {
    let arg = |p: &Path| p.to_str().unwrap_or_default().to_string();
    // A node is its pid file, and its certificate.
    let (own_pid, node) = if victim_pid == "primary.pid" {
        ("backup.pid", "node2")
    } else {
        ("primary.pid", "node1")
    };
    let tls = PairTls::existing(&cfg.dir.join("tls"))
        .ok_or("the pair's certificates are missing")?
        .args(node);
    let mut args: Vec<String> = [
        "backup",
        "--listen",
        listen,
        "--net",
        "tap=tap0",
        "--name",
        "demo",
        "--pid-file",
        &arg(&cfg.dir.join(own_pid)),
        "--fence-cmd",
        &arg(&cfg.dir.join("fence-pidfile")),
        "--peer-node",
        peer_node,
        "--fence-arg",
        &format!("pidfile={}", arg(&cfg.dir.join(victim_pid))),
        "--console",
        &arg(&cfg.dir.join(format!("{name}.console"))),
        "--api-sock",
        &arg(&cfg.dir.join(format!("{name}.sock"))),
    ]
    .map(String::from)
    .to_vec();
    args.extend(tls);
    if cfg.disk.is_some() {
        args.extend([
            "--disk".into(),
            format!("path={}", arg(&cfg.dir.join(format!("{name}.img")))),
        ]);
    }
    args.extend(cfg.extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut backup = Proc::spawn(
        ns.command(&cfg.bin, &args),
        cfg.dir.join(format!("{name}.out")),
        cfg.dir.join(format!("{name}.err")),
    )?;
    let err = backup.stderr.clone();
    if !wait_for_line(&err, "listening on", Duration::from_secs(10), || {
        backup.try_wait().is_none()
    }) {
        return Err(format!("{name} did not start:\n{}", backup.log()));
    }
    Ok(backup)
}

/// Boots a new kv guest (`aof=on`) from the promoted disk `backup.img` alone, once the
/// promoted guest has stopped, and reads back every key the client was told was written
/// and the counter.
fn cold_check(
    ns: &Netns,
    cfg: &TrialConfig,
    kv_args: &str,
    o: &TrialOutcome,
) -> Result<ColdCheck, String> {
    let arg = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let args = [
        "run".to_string(),
        "--guest".into(),
        "builtin".into(),
        "--guest-args".into(),
        kv_args.into(),
        "--net".into(),
        "tap=tap0".into(),
        "--disk".into(),
        format!("path={}", arg(&cfg.dir.join("backup.img"))),
        "--console".into(),
        arg(&cfg.dir.join("cold.console")),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut guest = Proc::spawn(
        ns.command(&cfg.bin, &args),
        cfg.dir.join("cold.out"),
        cfg.dir.join("cold.err"),
    )?;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match ns.connect(GUEST_ADDR, Duration::from_millis(500)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline && guest.try_wait().is_none() => continue,
                Err(e) => return Err(format!("cannot reach the cold-booted guest: {e}")),
            }
        };
        let mut kv = Kv::new(stream, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let counter = match kv.call(&["GET", "counter"]).map_err(|e| e.to_string())? {
            Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).parse().ok(),
            _ => None,
        };
        let mut lost = Vec::new();
        for chunk in o.acked.chunks(100) {
            let mut out = Vec::new();
            for i in chunk {
                Kv::encode(&mut out, &["GET", &format!("k{i}")]);
            }
            kv.send_raw(&out).map_err(|e| e.to_string())?;
            for i in chunk {
                match kv.reply().map_err(|e| format!("k{i}: {e}"))? {
                    Reply::Bulk(Some(v)) if v == i.to_string().as_bytes() => {}
                    _ => lost.push(*i),
                }
            }
        }
        Ok(ColdCheck {
            lost,
            counter,
            last_told: o.counters.last().copied(),
            keys: o.acked.len(),
        })
    })();
    guest.terminate(Duration::from_secs(2));
    result.map_err(|e| {
        format!(
            "{e}
{}",
            guest.log()
        )
    })
}

fn write_agent(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, FENCE_AGENT)
        .and_then(|_| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("cannot write the fence agent {}: {e}", path.display()))
}

/// The client: connects (retrying until `stop`), writes until `stop`, then (with
/// `read_back`) reads every acknowledged key back over the same connection. Returns (read
/// back, lost keys).
fn client(
    ns: &Netns,
    progress: &Mutex<Progress>,
    stop: &AtomicBool,
    read_back: bool,
) -> (bool, Vec<u64>) {
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
    if !read_back
        || progress
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

#[cfg(test)]
mod tests {
    use super::*;

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
