//! Commands run to completion with a deadline, and the checks every error case shares.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::bin::lockstep_bin;

/// How long one `lockstep` command may take before the test calls it hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished command left behind.
#[derive(Debug)]
pub struct Run {
    /// The command line, for failure messages.
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, showing everything, unless the command exited 0.
    pub fn assert_success(&self) -> &Run {
        assert!(
            self.status.success(),
            "{} failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The one-line error check every bad input must pass: a non-zero exit, stderr exactly
    /// one line `lockstep: error: ...` that contains each of `needles`, and no sign of a
    /// panic. Returns the line.
    pub fn assert_one_line_error(&self, needles: &[&str]) -> &str {
        let ctx = || {
            format!(
                "{} ({})\nstdout:\n{}\nstderr:\n{}",
                self.what, self.status, self.stdout, self.stderr
            )
        };
        assert!(!self.status.success(), "expected a failure: {}", ctx());
        for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
            assert!(
                !self.stderr.contains(bad),
                "stderr shows a panic ({bad}): {}",
                ctx()
            );
        }
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected exactly one line on stderr: {}",
            ctx()
        );
        let line = lines[0];
        assert!(
            line.starts_with("lockstep: error: "),
            "the error line must start with 'lockstep: error: ': {}",
            ctx()
        );
        for needle in needles {
            assert!(
                line.contains(needle),
                "the error line does not mention '{needle}': {}",
                ctx()
            );
        }
        line
    }
}

/// Runs `lockstep ARGS...` to completion (at most [`COMMAND_TIMEOUT`]).
pub fn lockstep(args: &[&str]) -> Run {
    let mut cmd = Command::new(lockstep_bin());
    cmd.args(args);
    run(cmd)
}

/// Runs a command to completion, capturing its output; kills it and fails the test if it
/// takes longer than [`COMMAND_TIMEOUT`].
pub fn run(mut cmd: Command) -> Run {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_BACKTRACE")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pid = child.id();
    let stdout = reader(child.stdout.take().expect("piped stdout"));
    let stderr = reader(child.stderr.take().expect("piped stderr"));
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(status) => status.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
        Err(_) => {
            // `pid` is our own child, which the waiter thread has not reaped (it would have
            // answered), so the pid is not reused.
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            let _ = waiter.join();
            panic!("{what} did not finish within {COMMAND_TIMEOUT:?}; killed it");
        }
    };
    let _ = waiter.join();
    Run {
        what,
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn reader(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}
