//! Child processes with their output in files, and waiting for a line in a log.

use rustix::process::{kill_process, Pid, Signal};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::interrupted;

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

    /// Sends `sig` (`libc::SIGSTOP`, `SIGCONT`, ...) unless the process was reaped already
    /// (not reaped, its pid is still ours).
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            let pid = Pid::from_raw(self.child.id() as i32);
            if let (Some(pid), Some(sig)) = (pid, Signal::from_named_raw(sig)) {
                let _ = kill_process(pid, sig);
            }
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
