//! Events as JSON lines (`--events PATH`): one object per line for what a supervisor or an
//! operator reacts to — role changes, protection changes, fencing attempts, the guest held
//! for a slow backup, the initial sync's progress. The schema is in `docs/events.md`.
//!
//! Every line has `ts` (unix milliseconds), `pid`, `event` (a snake_case name), then the
//! event's fields. There is one sink per process, behind a mutex. The file is opened for
//! appending (several processes may share one) and each line goes out with one `write`,
//! unbuffered: once [`emit`] returns the line is in the file, even if the process is
//! SIGKILLed next. No line is written inside a checkpoint pause (the `throttle` line is
//! written from the epoch loop while the guest runs, see [`throttle_totals`]). A write that
//! fails is logged once and turns the sink off: events never stop the guest.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use thiserror::Error;

use crate::warn;

/// The events file could not be opened.
#[derive(Debug, Error)]
pub enum EventsError {
    /// Creating or opening the file for appending failed.
    #[error("--events {}: cannot open for appending: {source}", path.display())]
    Open {
        /// The path given.
        path: PathBuf,
        /// The error from opening it.
        source: std::io::Error,
    },
}

struct Sink {
    file: File,
    path: PathBuf,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

fn sink() -> MutexGuard<'static, Option<Sink>> {
    SINK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes events to `path` from now on (created if missing, appended to); replaces the
/// sink of an earlier call.
pub fn open(path: &Path) -> Result<(), EventsError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| EventsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    *sink() = Some(Sink {
        file,
        path: path.to_path_buf(),
    });
    Ok(())
}

/// Whether events are being written.
pub fn enabled() -> bool {
    sink().is_some()
}

/// Writes one event line with `fields` after `ts`, `pid` and `event`; nothing when no
/// sink is open. A failed write is logged once and turns the sink off.
pub fn emit(event: &str, fields: &[(&str, Value)]) {
    let mut guard = sink();
    let Some(s) = guard.as_mut() else {
        return;
    };
    let text = line(unix_ms(), std::process::id(), event, fields);
    if let Err(e) = s.file.write_all(text.as_bytes()) {
        warn!(
            "--events {}: writing an event failed ({e}); no more events are written",
            s.path.display()
        );
        *guard = None;
    }
}

/// One event as a JSON object on one line (newline included), keys in the order given.
pub fn line(ts: u64, pid: u32, event: &str, fields: &[(&str, Value)]) -> String {
    let mut s = format!(
        "{{\"ts\":{ts},\"pid\":{pid},\"event\":{}",
        Value::from(event)
    );
    for (k, v) in fields {
        s.push(',');
        s.push_str(&Value::from(*k).to_string());
        s.push(':');
        s.push_str(&v.to_string());
    }
    s.push_str("}\n");
    s
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `role_change`: the process took a new role (see [`super::status::role_change`]).
pub fn role_change(role: &str, protection: &str, guest: &str, why: &str) {
    emit(
        "role_change",
        &[
            ("role", role.into()),
            ("protection", protection.into()),
            ("guest", guest.into()),
            ("why", why.into()),
        ],
    );
}

/// `protection`: the protection state changed to `state`.
pub fn protection(state: &str, why: &str) {
    emit(
        "protection",
        &[("state", state.into()), ("why", why.into())],
    );
}

/// `fence`: one fencing attempt of `target` ("the backup", "the old primary"), the node
/// the agent is asked to switch off, the attempt number (from 1), `result` ("started",
/// "fenced", "failed", or "skipped" for `--fence none`) and what went with it.
pub fn fence(target: &str, node: &str, attempt: u32, result: &str, detail: &str) {
    emit(
        "fence",
        &[
            ("target", target.into()),
            ("node", node.into()),
            ("attempt", attempt.into()),
            ("result", result.into()),
            ("detail", detail.into()),
        ],
    );
}

/// `sync_progress`: the initial sync on `side` ("primary", "backup"): round `round`
/// (0 is the whole memory), `bytes_done` of its `bytes_total`, and the pace so far over
/// all rounds in MiB/s.
pub fn sync_progress(side: &str, round: u64, bytes_done: u64, bytes_total: u64, mib_per_s: f64) {
    emit(
        "sync_progress",
        &[
            ("side", side.into()),
            ("round", round.into()),
            ("bytes_done", bytes_done.into()),
            ("bytes_total", bytes_total.into()),
            ("mib_per_s", ((mib_per_s * 10.0).round() / 10.0).into()),
        ],
    );
}

/// At most one `throttle` line this often.
const THROTTLE_EVERY: Duration = Duration::from_secs(1);

/// What the last `throttle` line reported: running totals and when.
#[derive(Debug, Default)]
struct ThrottleSeen {
    episodes: u64,
    held: Duration,
    at: Option<Instant>,
}

impl ThrottleSeen {
    /// With the running totals now: the episodes and held ms to report since the last
    /// line, when there are new ones and the last line is at least [`THROTTLE_EVERY`] old.
    /// Totals lower than the last ones come from a new primary role (the process
    /// protects its guest again): they count from zero.
    fn due(&mut self, now: Instant, episodes: u64, held: Duration) -> Option<(u64, u64)> {
        if episodes < self.episodes || held < self.held {
            (self.episodes, self.held) = (0, Duration::ZERO);
        }
        if episodes <= self.episodes
            || self
                .at
                .is_some_and(|at| now.saturating_duration_since(at) < THROTTLE_EVERY)
        {
            return None;
        }
        let new = (
            episodes - self.episodes,
            held.saturating_sub(self.held).as_millis() as u64,
        );
        *self = ThrottleSeen {
            episodes,
            held,
            at: Some(now),
        };
        Some(new)
    }
}

static THROTTLE: Mutex<ThrottleSeen> = Mutex::new(ThrottleSeen {
    episodes: 0,
    held: Duration::ZERO,
    at: None,
});

/// The primary's running totals of times it held the guest because the backup fell
/// behind, and of the time held (since its role began): writes a `throttle` line with what
/// is new since the last one, at most one a second. The epoch loop calls it with its status figures, while the
/// guest runs, so the write never lengthens a hold.
pub fn throttle_totals(episodes: u64, held: Duration) {
    let due =
        THROTTLE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due(Instant::now(), episodes, held);
    if let Some((n, ms)) = due {
        emit(
            "throttle",
            &[
                ("episodes", n.into()),
                ("held_ms", ms.into()),
                ("episodes_total", episodes.into()),
                ("held_ms_total", (held.as_millis() as u64).into()),
            ],
        );
    }
}

/// How often `sync_progress` lines go out during the initial sync.
pub const SYNC_EVERY: Duration = Duration::from_millis(500);

/// The receiving side's view of the initial sync, for `sync_progress` lines: it sees each
/// step's `bytes_done` (before the step) and `bytes_total` of the round, infers the round
/// and the bytes received, and writes a line on the first step and then every
/// [`SYNC_EVERY`].
#[derive(Debug)]
pub struct SyncProgress {
    side: &'static str,
    start: Instant,
    last_line: Option<Instant>,
    round: u64,
    steps: u64,
    last_done: u64,
    last_total: u64,
    moved: u64,
}

impl SyncProgress {
    /// Progress of the sync on `side`, timed from now.
    pub fn new(side: &'static str) -> SyncProgress {
        SyncProgress {
            side,
            start: Instant::now(),
            last_line: None,
            round: 0,
            steps: 0,
            last_done: 0,
            last_total: 0,
            moved: 0,
        }
    }

    /// One step of the sync arrived: `bytes_done` of the round's `bytes_total` before it.
    pub fn step(&mut self, bytes_done: u64, bytes_total: u64) {
        if self.steps > 0 && bytes_done == 0 {
            // A new round: the previous one's last step carried the rest of it.
            self.round += 1;
            self.moved += self.last_total.saturating_sub(self.last_done);
        } else {
            self.moved += bytes_done.saturating_sub(self.last_done);
        }
        self.steps += 1;
        self.last_done = bytes_done;
        self.last_total = bytes_total;
        if self.last_line.is_some_and(|t| t.elapsed() < SYNC_EVERY) {
            return;
        }
        self.last_line = Some(Instant::now());
        let secs = self.start.elapsed().as_secs_f64().max(1e-6);
        sync_progress(
            self.side,
            self.round,
            bytes_done,
            bytes_total,
            self.moved as f64 / secs / (1 << 20) as f64,
        );
    }

    /// The round and the bytes moved so far, as inferred.
    pub fn seen(&self) -> (u64, u64) {
        (self.round, self.moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_with_the_common_fields_first() {
        let l = line(
            1_700_000_000_123,
            42,
            "fence",
            &[
                ("target", "the backup".into()),
                ("attempt", 2u32.into()),
                ("detail", "a \"quoted\"\nline".into()),
                ("mib_per_s", 12.5.into()),
            ],
        );
        assert!(l.ends_with('\n') && l.matches('\n').count() == 1, "{l:?}");
        assert!(
            l.starts_with(r#"{"ts":1700000000123,"pid":42,"event":"fence","#),
            "{l}"
        );
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["ts"], 1_700_000_000_123u64);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["event"], "fence");
        assert_eq!(v["target"], "the backup");
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["detail"], "a \"quoted\"\nline");
        assert_eq!(v["mib_per_s"], 12.5);
    }

    #[test]
    fn events_go_to_the_file_one_per_line() {
        let dir = std::env::temp_dir().join(format!("lockstep-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let e = open(&dir.join("missing/events.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing/events.jsonl") && !e.contains('\n'),
            "{e}"
        );
        open(&path).unwrap();
        assert!(enabled());
        protection("syncing", "test");
        fence("the backup", "node-b", 1, "started", "");
        sync_progress("primary", 0, 1 << 20, 4 << 20, 123.456);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        // Other tests of this process may write to the same sink meanwhile.
        let find = |event: &str| {
            lines
                .iter()
                .find(|v| v["event"] == event)
                .unwrap_or_else(|| panic!("no {event} in {text}"))
                .clone()
        };
        for v in &lines {
            assert!(v["ts"].as_u64().unwrap() > 1_600_000_000_000, "{v}");
            assert_eq!(v["pid"], std::process::id());
        }
        let p = find("protection");
        assert_eq!(
            (&p["state"], &p["why"]),
            (&"syncing".into(), &"test".into())
        );
        let f = find("fence");
        assert_eq!(f["node"], "node-b");
        assert_eq!(f["result"], "started");
        let s = find("sync_progress");
        assert_eq!(s["bytes_done"], 1 << 20);
        assert_eq!(s["mib_per_s"], 123.5);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn throttle_lines_are_at_most_one_a_second_and_carry_what_is_new() {
        let mut seen = ThrottleSeen::default();
        let t0 = Instant::now();
        assert_eq!(seen.due(t0, 0, Duration::ZERO), None, "nothing held yet");
        assert_eq!(seen.due(t0, 2, Duration::from_millis(30)), Some((2, 30)));
        let soon = t0 + Duration::from_millis(400);
        assert_eq!(seen.due(soon, 5, Duration::from_millis(70)), None);
        let later = t0 + Duration::from_millis(1000);
        assert_eq!(seen.due(later, 5, Duration::from_millis(75)), Some((3, 45)));
        let much_later = t0 + Duration::from_secs(5);
        assert_eq!(seen.due(much_later, 5, Duration::from_millis(75)), None);
        // A new primary role counts from zero again.
        let again = t0 + Duration::from_secs(7);
        assert_eq!(seen.due(again, 1, Duration::from_millis(9)), Some((1, 9)));
    }

    #[test]
    fn sync_progress_infers_rounds_and_bytes_moved() {
        let mut p = SyncProgress::new("test");
        for done in [0, 8, 16, 24] {
            p.step(done, 32);
        }
        assert_eq!(p.seen(), (0, 24));
        // Round 1: the last step of round 0 carried 8 more.
        p.step(0, 12);
        assert_eq!(p.seen(), (1, 32));
        p.step(8, 12);
        assert_eq!(p.seen(), (1, 40));
        // A round of one step.
        p.step(0, 4);
        p.step(0, 2);
        assert_eq!(p.seen(), (3, 48));
    }
}
