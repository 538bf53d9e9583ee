//! What a lockstep process is doing, for its control socket (`GET /status`): the roles
//! update one small shared [`StatusReport`] at their role changes, at each ack or commit,
//! and (the primary) about once a second with its pause and commit figures. Nothing is
//! updated inside an epoch's pause. Role and protection changes also go out as events
//! ([`super::events`]).

use std::sync::{Arc, Mutex};

use checkpoint::inflight::{InFlight, SharedInFlight};
use netbuffer::HoldHistogram;

use super::{events, metrics};
use crate::devices::OutputCommit;

/// What the process is in the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `lockstep run` or `restore`: a guest without a pair.
    Standalone,
    /// Runs the guest and replicates it.
    Primary,
    /// Keeps the last committed epoch of the primary's guest.
    Backup,
    /// A backup that took over: it runs the guest.
    Promoted,
}

/// Whether this process's guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestState {
    /// vCPUs running.
    Running,
    /// Not running: a backup's copy, a primary that paused its guest, or the end.
    Paused,
    /// The guest exited.
    Exited,
}

/// Whether the guest is protected by a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Epochs are replicated and acknowledged.
    Protected,
    /// The initial copy is under way (no committed epoch yet).
    Syncing,
    /// The backup is lost and the guest's output held until it is fenced.
    UnprotectedHeld,
    /// No backup.
    Unprotected,
}

impl Role {
    /// The name in the JSON status.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Promoted => "promoted",
        }
    }
}

impl GuestState {
    /// The name in the JSON status.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestState::Running => "running",
            GuestState::Paused => "paused",
            GuestState::Exited => "exited",
        }
    }
}

impl Protection {
    /// The name in the JSON status.
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Protected => "protected",
            Protection::Syncing => "syncing",
            Protection::UnprotectedHeld => "unprotected-held",
            Protection::Unprotected => "unprotected",
        }
    }
}

/// The process's status, as `GET /status` reports it.
#[derive(Clone, Debug)]
pub struct StatusReport {
    /// The role.
    pub role: Role,
    /// The guest's state.
    pub guest: GuestState,
    /// The pair's name (empty for a standalone guest).
    pub name: String,
    /// The backup's last committed epoch.
    pub committed_epoch: Option<u64>,
    /// The last epoch the backup acknowledged to the primary.
    pub acked_epoch: Option<u64>,
    /// Whether the guest is protected.
    pub protection: Protection,
    /// Why the role or protection last changed (the ROLE CHANGE line), if it did.
    pub last_role_change: Option<String>,
    /// Pause per epoch p50 and p99 in µs (primary; over the last minute).
    pub pause_us: (u64, u64),
    /// Pause start to the backup's ack, p50 and p99 in µs (primary; over the last minute).
    pub commit_us: (u64, u64),
    /// Output frames held now, waiting for an ack or for fencing.
    pub held_frames: u64,
    /// Epochs the primary sent and the backup has not acknowledged yet (primary only).
    pub lag_epochs: Option<u64>,
    /// How long the oldest of those has waited, in ms; 0 when none (primary only).
    pub lag_ms: Option<u64>,
}

/// What the guest's output did, for the metrics: held now, and totals over every network
/// device this process's roles have watched (see [`watch_output`]).
#[derive(Clone, Debug, Default)]
pub struct OutputFigures {
    /// Frames held now.
    pub held_packets: u64,
    /// Bytes of the frames held now.
    pub held_bytes: u64,
    /// Frames sent to the tap.
    pub sent: u64,
    /// How long the released frames were held.
    pub hold: HoldHistogram,
}

struct Shared {
    report: StatusReport,
    output: Option<OutputCommit>,
    /// Frames sent and hold times of the devices watched before `output`.
    retired: Option<(u64, HoldHistogram)>,
    inflight: Option<Arc<SharedInFlight>>,
}

static STATUS: Mutex<Shared> = Mutex::new(Shared {
    report: StatusReport {
        role: Role::Standalone,
        guest: GuestState::Paused,
        name: String::new(),
        committed_epoch: None,
        acked_epoch: None,
        protection: Protection::Unprotected,
        last_role_change: None,
        pause_us: (0, 0),
        commit_us: (0, 0),
        held_frames: 0,
        lag_epochs: None,
        lag_ms: None,
    },
    output: None,
    retired: None,
    inflight: None,
});

fn shared() -> std::sync::MutexGuard<'static, Shared> {
    STATUS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Changes the shared status.
pub fn update(f: impl FnOnce(&mut StatusReport)) {
    f(&mut shared().report);
}

/// A new role starts: its epochs and figures start afresh (the pair name stays).
pub fn start_role(role: Role) {
    update(|s| {
        s.role = role;
        s.committed_epoch = None;
        s.acked_epoch = None;
        s.pause_us = (0, 0);
        s.commit_us = (0, 0);
    });
    watch_inflight(None);
}

/// The output whose held frames the status counts (the primary's network device). The
/// totals of a device no longer watched are kept, so that the metrics' counters never go
/// back (see [`output_figures`]).
pub fn watch_output(output: Option<OutputCommit>) {
    let mut g = shared();
    if let Some(old) = g.output.take() {
        if !output.as_ref().is_some_and(|o| o.same_device(&old)) {
            let (stats, counters) = old.stats();
            let retired = g.retired.get_or_insert_with(Default::default);
            retired.0 += counters.sent;
            retired.1.merge(&stats.hold_time);
        }
    }
    g.output = output;
}

/// The output's figures now: held frames of the watched device, totals of every device
/// watched so far.
pub fn output_figures() -> OutputFigures {
    let g = shared();
    let mut f = OutputFigures::default();
    if let Some((sent, hold)) = &g.retired {
        f.sent = *sent;
        f.hold = *hold;
    }
    if let Some(o) = &g.output {
        let (stats, counters) = o.stats();
        f.held_packets = stats.held_packets;
        f.held_bytes = stats.held_bytes;
        f.sent += counters.sent;
        f.hold.merge(&stats.hold_time);
    }
    f
}

/// The primary's window of unacknowledged epochs, which the replication lag is read from.
pub fn watch_inflight(inflight: Option<Arc<SharedInFlight>>) {
    shared().inflight = inflight;
}

/// A role change: the new role, protection and guest state, and why. Writes a
/// `role_change` event, and a `protection` event when the protection changed.
pub fn role_change(role: Role, protection: Protection, guest: GuestState, why: String) {
    let mut was = protection;
    update(|s| {
        s.role = role;
        was = std::mem::replace(&mut s.protection, protection);
        s.guest = guest;
        s.last_role_change = Some(why.clone());
    });
    metrics::role_changed();
    events::role_change(role.as_str(), protection.as_str(), guest.as_str(), &why);
    if was != protection {
        events::protection(protection.as_str(), &why);
    }
}

/// Sets the protection state; a change writes a `protection` event saying `why`.
pub fn set_protection(protection: Protection, why: &str) {
    let was = std::mem::replace(&mut shared().report.protection, protection);
    if was != protection {
        events::protection(protection.as_str(), why);
    }
}

/// The replication lag of a window: epochs unacknowledged, and the oldest one's wait in ms.
pub fn lag(window: &InFlight) -> (u64, u64) {
    let waited = window.oldest_wait().unwrap_or_default();
    (window.len() as u64, waited.as_millis() as u64)
}

/// The status now.
pub fn report() -> StatusReport {
    let (mut r, inflight) = {
        let g = shared();
        let mut r = g.report.clone();
        if let Some(o) = &g.output {
            r.held_frames = o.held_frames();
        }
        (r, g.inflight.clone())
    };
    // Not under the status lock: the primary's threads take the window's lock often.
    if let Some(w) = inflight {
        let (epochs, ms) = lag(&w.lock());
        r.lag_epochs = Some(epochs);
        r.lag_ms = Some(ms);
    }
    r
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn updates_are_seen_by_report() {
        update(|s| {
            s.role = Role::Primary;
            s.acked_epoch = Some(7);
        });
        role_change(
            Role::Primary,
            Protection::UnprotectedHeld,
            GuestState::Running,
            "backup lost".into(),
        );
        let r = report();
        assert_eq!(r.role.as_str(), "primary");
        assert_eq!(r.acked_epoch, Some(7));
        assert_eq!(r.protection.as_str(), "unprotected-held");
        assert_eq!(r.last_role_change.as_deref(), Some("backup lost"));
    }

    #[test]
    fn lag_counts_unacknowledged_epochs_and_the_oldest_wait() {
        let mut w = InFlight::new(4, 1 << 20, 0);
        assert_eq!(lag(&w), (0, 0));
        w.sent(1, 10).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let second = Instant::now();
        w.sent(2, 10).unwrap();
        let (epochs, ms) = lag(&w);
        assert_eq!(epochs, 2);
        assert!(ms >= 20, "{ms}");
        // The oldest left is epoch 2.
        w.acked(1).unwrap();
        let (epochs, ms) = lag(&w);
        assert_eq!(epochs, 1);
        assert!(u128::from(ms) <= second.elapsed().as_millis(), "{ms}");
        w.acked(2).unwrap();
        assert_eq!(lag(&w), (0, 0));

        // The status reads it from the registered window, and only then.
        assert_eq!(report().lag_epochs, None);
        let shared = Arc::new(SharedInFlight::new(w));
        shared.lock().sent(3, 10).unwrap();
        watch_inflight(Some(Arc::clone(&shared)));
        let r = report();
        assert_eq!((r.lag_epochs, r.lag_ms.is_some()), (Some(1), true));
        watch_inflight(None);
        assert_eq!(report().lag_ms, None);
    }
}
