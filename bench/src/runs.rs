//! The `lockstep` processes of `bench checkpoint`: an unprotected run, and a protected pair
//! over loopback, each a harness [`Proc`] with its output in files and a deadline.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use harness::Proc;

/// How long a run may exceed its planned length before it counts as hung.
pub(crate) const GRACE: Duration = Duration::from_secs(60);

/// A finished process.
pub(crate) struct Output {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Output {
    /// The `lockstep: error:` line, or the exit status.
    pub(crate) fn why(&self) -> String {
        self.stderr
            .lines()
            .find(|l| l.starts_with("lockstep: error:"))
            .map_or_else(|| format!("exited with {}", self.status), str::to_string)
    }
}

/// A `lockstep` process of this benchmark: a harness [`Proc`] with its output in files of
/// the work directory.
struct Running {
    what: String,
    proc: Proc,
}

/// The benchmark's work directory for process output, created on first use.
pub(crate) fn work_dir() -> Result<PathBuf, String> {
    let dir =
        std::env::temp_dir().join(format!("lockstep-bench-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Starts `lockstep ARGS...`.
fn start(bin: &Path, args: &[&str]) -> Result<Running, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let what = format!("lockstep {}", args.join(" "));
    let dir = work_dir()?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut cmd = Command::new(bin);
    cmd.args(args);
    let proc = Proc::spawn(
        cmd,
        dir.join(format!("{n}.out")),
        dir.join(format!("{n}.err")),
    )?;
    Ok(Running { what, proc })
}

impl Running {
    /// Waits until `deadline`, then kills it.
    fn wait(mut self, deadline: Instant) -> Result<Output, String> {
        let Some(status) = self
            .proc
            .wait_for(deadline.saturating_duration_since(Instant::now()))
        else {
            self.proc.kill9();
            return Err(format!("{} hung; killed it", self.what));
        };
        let out = Output {
            status,
            stdout: self.proc.out(),
            stderr: self.proc.log(),
        };
        let _ = std::fs::remove_file(&self.proc.stdout);
        let _ = std::fs::remove_file(&self.proc.stderr);
        Ok(out)
    }
}

pub(crate) fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// `lockstep run` of `guest`; returns its console (stdout).
pub(crate) fn unprotected(
    bin: &Path,
    mem: &str,
    seconds: f64,
    guest: &str,
) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds) + GRACE;
    let out = start(
        bin,
        &[
            "run",
            "--mem",
            mem,
            "--guest",
            "builtin",
            "--guest-args",
            guest,
        ],
    )?
    .wait(deadline)?;
    if !out.status.success() {
        return Err(format!("lockstep run: {}", out.why()));
    }
    Ok(out.stdout)
}

/// A primary (console on its stdout) and a backup over loopback; returns both outputs
/// once both ended cleanly with the same final digest.
pub(crate) fn protected(
    bin: &Path,
    mem: &str,
    vcpus: &str,
    interval_ms: u64,
    guest: &str,
    seconds: f64,
) -> Result<(Output, Output), String> {
    protected_with(bin, mem, vcpus, interval_ms, guest, seconds, &[])
}

/// [`protected`], the primary given `extra` options besides.
pub(crate) fn protected_with(
    bin: &Path,
    mem: &str,
    vcpus: &str,
    interval_ms: u64,
    guest: &str,
    seconds: f64,
    extra: &[&str],
) -> Result<(Output, Output), String> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs_f64(seconds) + GRACE;
    let backup = start(
        bin,
        &[
            "backup",
            "--insecure",
            "--listen",
            &addr,
            "--console",
            "none",
        ],
    )?;
    let interval = interval_ms.to_string();
    let seconds = seconds.to_string();
    let mut args = vec![
        "primary",
        "--insecure",
        "--peer",
        &addr,
        "--interval-ms",
        &interval,
        "--mem",
        mem,
        "--vcpus",
        vcpus,
        "--guest",
        "builtin",
        "--guest-args",
        guest,
        "--seconds",
        &seconds,
    ];
    args.extend_from_slice(extra);
    let primary = start(bin, &args)?.wait(deadline)?;
    // A primary that failed leaves a backup that may wait for it for ever.
    let backup_deadline = if primary.status.success() {
        deadline
    } else {
        Instant::now() + Duration::from_secs(5)
    };
    let backup = backup
        .wait(backup_deadline)
        .map_err(|e| format!("primary: {}; {e}", primary.why()))?;
    if !primary.status.success() || !backup.status.success() {
        return Err(format!(
            "primary: {}; backup: {}",
            primary.why(),
            backup.why()
        ));
    }
    let final_line = |o: &Output| {
        o.stdout
            .lines()
            .find_map(|l| l.find("final epoch=").map(|i| l[i..].to_string()))
    };
    match (final_line(&primary), final_line(&backup)) {
        (Some(p), Some(b)) if p == b => Ok((primary, backup)),
        (p, b) => Err(format!(
            "primary and backup disagree: primary {p:?}, backup {b:?}"
        )),
    }
}
