//! The replication roles: the primary runs the guest and ships epochs, the backup keeps an
//! exact, runnable copy of the last committed epoch.
//!
//! The wire protocol, the page codec, staging and the transport are in the `checkpoint`
//! crate; this module drives them from a running [`Machine`](crate::machine::Machine).

pub mod backup;
pub mod control;
pub mod disks;
pub mod events;
pub mod failover;
pub mod fence;
pub mod metrics;
pub mod node;
pub mod primary;
pub mod stats;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The pair's name when none is given; both sides must have the same (see [`guest_id`]).
pub const DEFAULT_NAME: &str = "lockstep";

/// Silence (no epoch, heartbeat or ack) after which a peer counts as lost: what a lost
/// host (no FIN, no RST) costs in detection. A primary that dies closes its connection,
/// which the backup notices at once, whatever this is.
///
/// Both sides send heartbeats every quarter of it (75 ms) when they have nothing else to
/// send, the primary's from a thread at real-time priority. `bench failover --soak` on
/// this project's shared two-core machines (load average about 3: a pair under client
/// load, two threads spinning beside it, another build) ran 10 minutes without a false
/// loss on either side, the backup's longest wait for the primary's bytes 75 ms (its own
/// scheduling delays included). Overloaded further (load average 4 to 7: a whole test
/// suite running beside the same), a 60 s soak saw silences up to 179 ms and one false
/// loss on each side at a 200 ms timeout. A false failover is far worse than a slower
/// one, and this project's own test suite runs exactly that hot, so the default is 300 ms:
/// 1.7 times the longest silence seen overloaded. Hosts that stall longer need a larger
/// `--heartbeat-timeout-ms` (the near-miss warnings, "was silent for ...", say so before
/// a false failover); quiet ones may go lower.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(300);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGINT request a clean end (final epoch, digest) instead of killing
/// the process.
///
/// With libc's `signal` (BSD semantics: system calls interrupted by the signal restart),
/// as rustix has no stable wrapper for installing signal handlers.
pub fn install_stop_handler() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and
        // `signal` with a valid signal number and handler has no other preconditions.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
}

/// Asks for the same clean end as SIGTERM (the control socket's `POST /stop`).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether SIGTERM or SIGINT arrived, or [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Reports a near miss: when the longest silence of the peer seen so far (`silence`, from
/// the transport) is a new record of at least half the heartbeat `timeout`, a warning
/// says so, once per record. A busy host or link that comes close to a false failover
/// shows in the log before one happens.
pub(crate) fn near_miss(peer: &str, silence: Duration, timeout: Duration, record: &mut Duration) {
    if silence > *record && silence * 2 >= timeout {
        *record = silence;
        crate::warn!(
            "the {peer} was silent for {} ms, {:.0}% of the heartbeat timeout ({} ms): a \
             busy host or a slow link; a silence of the whole timeout counts as the {peer} lost",
            silence.as_millis(),
            silence.as_secs_f64() * 100.0 / timeout.as_secs_f64(),
            timeout.as_millis()
        );
    }
}

/// The guest id both sides put in the handshake: the memory layout and vCPU count already
/// have to match; this ties a pair to the same protected VM name.
pub fn guest_id(name: &str) -> u64 {
    checkpoint::digest::xxh64(name.as_bytes(), 0)
}
