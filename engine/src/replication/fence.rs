//! Fencing: making sure the old primary is dead before the backup promotes (invariant 3).
//!
//! The ClusterLabs fence-agents convention: the agent reads `key=value` lines on stdin
//! (`action=off`, `nodename=...`, plus the options the operator gave), and only exit status
//! 0 within the timeout means the node is off. Anything else — a non-zero exit, a timeout,
//! an agent that cannot be started — means it may still be running, and the backup must not
//! promote: it retries with backoff, loudly, for as long as it takes.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::stop_requested;
use crate::warn;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceConfig {
    /// `--fence none`: promote without fencing (unsafe: two primaries are possible).
    None,
    /// `--fence-cmd CMD [--fence-arg k=v]... [--fence-timeout-s S]`.
    Agent {
        cmd: String,
        args: Vec<(String, String)>,
        timeout: Duration,
    },
}

#[derive(Debug, Error)]
pub enum FenceError {
    #[error("cannot start fence command '{cmd}': {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("fence command '{cmd}' failed with {status}{detail}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        detail: String,
    },
    #[error("fence command '{cmd}' did not finish within {timeout:?}; killed it")]
    Timeout { cmd: String, timeout: Duration },
    #[error("stopped while fencing; no promotion")]
    Stopped,
}

/// What the agent reads on stdin.
pub fn agent_input(nodename: &str, args: &[(String, String)]) -> String {
    let mut s = format!("action=off\nnodename={nodename}\n");
    for (k, v) in args {
        s.push_str(&format!("{k}={v}\n"));
    }
    s
}

/// One attempt: runs `sh -c CMD` with the options on stdin.
pub fn fence_once(
    cmd: &str,
    args: &[(String, String)],
    nodename: &str,
    timeout: Duration,
) -> Result<(), FenceError> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| FenceError::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // An agent that exits without reading its stdin is judged by its status alone.
        let _ = stdin.write_all(agent_input(nodename, args).as_bytes());
    }
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let first = err.lines().next().unwrap_or("").trim();
                let detail = if first.is_empty() {
                    String::new()
                } else {
                    format!(": {first}")
                };
                return Err(FenceError::Failed {
                    cmd: cmd.to_string(),
                    status,
                    detail,
                });
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(FenceError::Timeout {
                    cmd: cmd.to_string(),
                    timeout,
                });
            }
        }
    }
}

/// Fences until it succeeds (backoff 0.5 s doubling to 8 s), or until SIGTERM/SIGINT.
/// Returns the number of attempts it took.
pub fn fence_until_done(cfg: &FenceConfig, nodename: &str) -> Result<u32, FenceError> {
    let FenceConfig::Agent { cmd, args, timeout } = cfg else {
        warn!("UNSAFE: promoting WITHOUT fencing (--fence none): the old primary may still be running");
        return Ok(0);
    };
    let mut backoff = Duration::from_millis(500);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match fence_once(cmd, args, nodename, *timeout) {
            Ok(()) => return Ok(attempt),
            Err(e) => {
                warn!("FENCING FAILED (attempt {attempt}): {e}; NOT promoting, retrying in {backoff:?}");
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

    #[test]
    fn agent_gets_the_convention_on_stdin() {
        let args = vec![("pidfile".to_string(), "/run/p".to_string())];
        assert_eq!(
            agent_input("node-a", &args),
            "action=off\nnodename=node-a\npidfile=/run/p\n"
        );
        // The agent sees exactly that: it checks its input and succeeds only if it matches.
        let cmd = "[ \"$(cat)\" = \"$(printf 'action=off\\nnodename=node-a\\npidfile=/run/p')\" ]";
        fence_once(cmd, &args, "node-a", Duration::from_secs(5)).unwrap();
        assert!(fence_once(cmd, &args, "node-b", Duration::from_secs(5)).is_err());
    }

    #[test]
    fn failure_and_timeout_are_failures() {
        let e = fence_once(
            "echo no power switch >&2; exit 3",
            &[],
            "n",
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no power switch"), "{e}");
        let t = Instant::now();
        let e = fence_once("sleep 5", &[], "n", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, FenceError::Timeout { .. }), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "the timeout did not kill the agent"
        );
    }
}
