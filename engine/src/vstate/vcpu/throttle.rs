//! The vCPU throttle of pre-copy's auto-converge.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::kick_signal;

/// Holds running vCPUs for a share of the time, as QEMU's CPU throttle (used by
/// pre-copy's auto-converge): a ticker thread kicks every vCPU out of `KVM_RUN` once per
/// period; a vCPU that sees a new tick sleeps `pct / (100 - pct)` of a run slice before it
/// enters the guest again (still answering commands at once). At 0 nothing happens.
#[derive(Default)]
pub struct Throttle {
    pct: AtomicU32,
    tick: AtomicU64,
}

/// The guest runs this long between two throttle sleeps. QEMU uses 10 ms; at 99% a
/// guest dirtying ~600k pages/s still dirtied ~6k pages in one such slice, more than an
/// epoch's cap, so pre-copy could not converge without pausing it: 2 ms slices let it.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(2);

impl Throttle {
    /// The share of time (0..=99 %) the vCPUs are held.
    pub fn percent(&self) -> u32 {
        self.pct.load(Ordering::Relaxed)
    }

    /// How long to sleep now, if a tick came since `seen`.
    pub(super) fn due(&self, seen: &mut u64) -> Option<Duration> {
        let tick = self.tick.load(Ordering::Relaxed);
        if tick == *seen {
            return None;
        }
        *seen = tick;
        match self.percent() {
            0 => None,
            p => Some(THROTTLE_SLICE * p / (100 - p)),
        }
    }
}

/// The thread that ticks a [`Throttle`] and kicks the vCPUs; stopped and joined on drop,
/// which must happen before the vCPU threads are joined (it signals them).
pub struct Throttler {
    throttle: Arc<Throttle>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttler {
    /// Starts ticking `throttle` for the vCPU threads `threads` (from
    /// [`super::VcpuHandle::pthread`]).
    pub fn start(throttle: Arc<Throttle>, threads: Vec<libc::pthread_t>) -> Throttler {
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (Arc::clone(&throttle), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let p = t.percent();
                    if p == 0 {
                        // `set` unparks us when the throttle is raised again.
                        std::thread::park_timeout(Duration::from_millis(100));
                        continue;
                    }
                    t.tick.fetch_add(1, Ordering::Relaxed);
                    // pthread_kill from libc: rustix does not wrap it.
                    for &th in &threads {
                        // SAFETY: `th` names a vCPU thread that has not been joined: the
                        // Machine drops (stops and joins) this throttler before its vCPU
                        // handles, and a vCPU thread that already returned only makes
                        // pthread_kill fail with ESRCH. The kick handler is installed.
                        unsafe { libc::pthread_kill(th, kick_signal()) };
                    }
                    // One run slice plus the sleep each vCPU takes.
                    std::thread::sleep(THROTTLE_SLICE * 100 / (100 - p));
                }
            })
            .expect("spawn the vCPU throttle thread");
        Throttler {
            throttle,
            stop,
            thread: Some(thread),
        }
    }

    /// Holds the vCPUs `pct`% of the time (clamped to 0..=99).
    pub fn set(&self, pct: u32) {
        self.throttle.pct.store(pct.min(99), Ordering::Relaxed);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.throttle.pct.store(0, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
