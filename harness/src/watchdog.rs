//! A watchdog that turns a deadlock into a failure instead of a hang.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Aborts the whole test process with a message if it is not dropped within `limit`: a
/// deadlock must fail the test, not hang CI.
pub struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(what: &str, limit: Duration) -> Watchdog {
        let (done, rx) = mpsc::channel::<()>();
        let what = what.to_string();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: {what} did not finish within {:?}: deadlock? aborting the test \
                     process",
                    started.elapsed()
                );
                std::process::abort();
            }
        });
        Watchdog {
            done: Some(done),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
