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

/// `sync_progress`: the initial sync on `side` ("primary", "backup"), with the figures
/// of [`SyncFigures`].
pub fn sync_progress(side: &str, f: &SyncFigures) {
    emit(
        "sync_progress",
        &[
            ("side", side.into()),
            ("round", f.round.into()),
            ("bytes_done", f.bytes_done.into()),
            ("bytes_total", f.bytes_total.into()),
            ("mib_per_s", ((f.mib_per_s * 10.0).round() / 10.0).into()),
            (
                "seconds_left",
                f.seconds_left
                    .map_or(Value::Null, |s| ((s * 10.0).round() / 10.0).into()),
            ),
        ],
    );
}

/// Where the initial sync stands on one side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncFigures {
    /// The pre-copy round: 0 is the whole memory, then what the guest dirtied meanwhile.
    pub round: u64,
    /// Bytes of guest memory of this round sent (or received) so far.
    pub bytes_done: u64,
    /// Bytes of guest memory of this round.
    pub bytes_total: u64,
    /// Guest memory moved per second since the sync began, over all rounds (MiB/s).
    pub mib_per_s: f64,
    /// Seconds until this round is done at the pace so far (`None`: no pace yet).
    pub seconds_left: Option<f64>,
}

impl SyncFigures {
    /// `" (N MiB/s, S s left)"`, for a log line.
    pub fn pace(&self) -> String {
        match self.seconds_left {
            Some(s) => format!(" ({:.0} MiB/s, {s:.1} s left)", self.mib_per_s),
            None => String::new(),
        }
    }
}

/// Seconds to move `left` bytes at `bytes_per_s`; `None` without a pace.
pub fn seconds_left(left: u64, bytes_per_s: f64) -> Option<f64> {
    (bytes_per_s > 0.0).then(|| left as f64 / bytes_per_s)
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

/// The receiving side's view of the initial sync. Each `SyncPages` frame says how many
/// bytes of its round the primary had sent with it (`bytes_done`, that frame included;
/// frames of the encoder's workers may arrive slightly out of that order) and the round's
/// `bytes_total`. From them it infers the round and the bytes received, and says when a
/// progress line is due: on the first step, then at most every [`SYNC_EVERY`], and at the
/// end of each round; each such step also writes a `sync_progress` event.
#[derive(Debug)]
pub struct SyncProgress {
    side: &'static str,
    /// When the first step arrived, and the bytes it brought (the pace counts what came
    /// after it).
    start: Option<(Instant, u64)>,
    last_line: Option<Instant>,
    round: u64,
    steps: u64,
    /// The largest `bytes_done` of this round so far, and its total.
    max_done: u64,
    last_total: u64,
    moved: u64,
}

impl SyncProgress {
    /// Progress of the sync on `side`; its clock starts at the first step.
    pub fn new(side: &'static str) -> SyncProgress {
        SyncProgress {
            side,
            start: None,
            last_line: None,
            round: 0,
            steps: 0,
            max_done: 0,
            last_total: 0,
            moved: 0,
        }
    }

    /// A step of the sync arrived, `bytes_done` of the round's `bytes_total` with it: the
    /// figures when a progress line is due (see [`SyncProgress`]), else `None`.
    pub fn step(&mut self, bytes_done: u64, bytes_total: u64) -> Option<SyncFigures> {
        self.step_at(Instant::now(), bytes_done, bytes_total)
    }

    fn step_at(&mut self, now: Instant, bytes_done: u64, bytes_total: u64) -> Option<SyncFigures> {
        // A new round: another total, or a step far back (reordering moves a frame back
        // by a few frames at most). The previous round's missing steps arrived meanwhile.
        if self.steps > 0 && (bytes_total != self.last_total || bytes_done < self.max_done / 2) {
            self.round += 1;
            self.moved += self.last_total.saturating_sub(self.max_done);
            self.max_done = 0;
        }
        self.moved += bytes_done.saturating_sub(self.max_done);
        self.max_done = self.max_done.max(bytes_done);
        self.last_total = bytes_total;
        self.steps += 1;
        let (start, first) = *self.start.get_or_insert((now, self.moved));
        let round_end = bytes_done >= bytes_total;
        if !round_end
            && self
                .last_line
                .is_some_and(|t| now.saturating_duration_since(t) < SYNC_EVERY)
        {
            return None;
        }
        self.last_line = Some(now);
        let secs = now.saturating_duration_since(start).as_secs_f64();
        let pace = if secs > 0.0 {
            (self.moved - first) as f64 / secs
        } else {
            0.0
        };
        let f = SyncFigures {
            round: self.round,
            bytes_done: self.max_done.min(bytes_total),
            bytes_total,
            mib_per_s: pace / (1 << 20) as f64,
            seconds_left: seconds_left(bytes_total.saturating_sub(self.max_done), pace),
        };
        sync_progress(self.side, &f);
        Some(f)
    }

    /// When the first step arrived.
    pub fn began(&self) -> Option<Instant> {
        self.start.map(|(t, _)| t)
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
        let figures = SyncFigures {
            round: 0,
            bytes_done: 1 << 20,
            bytes_total: 4 << 20,
            mib_per_s: 123.456,
            seconds_left: Some(2.345),
        };
        sync_progress("primary", &figures);
        sync_progress(
            "primary",
            &SyncFigures {
                round: 1,
                seconds_left: None,
                ..figures
            },
        );
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
        let sync: Vec<&Value> = lines
            .iter()
            .filter(|v| v["event"] == "sync_progress" && v["side"] == "primary")
            .collect();
        assert_eq!(sync.len(), 2, "{text}");
        assert_eq!(sync[0]["bytes_done"], 1 << 20);
        assert_eq!(sync[0]["mib_per_s"], 123.5);
        assert_eq!(sync[0]["seconds_left"], 2.3);
        assert_eq!(sync[1]["round"], 1);
        assert!(sync[1]["seconds_left"].is_null(), "{}", sync[1]);
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
    fn sync_progress_infers_rounds_bytes_pace_and_time_left() {
        let mut p = SyncProgress::new("test");
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // Round 0: 64 bytes in steps of 8 (each step counts itself), one out of order.
        let first = p.step_at(ms(0), 8, 64).unwrap();
        assert_eq!((first.bytes_done, first.seconds_left), (8, None));
        assert_eq!(p.step_at(ms(100), 16, 64), None, "not due yet");
        assert_eq!(p.step_at(ms(200), 32, 64), None);
        assert_eq!(p.step_at(ms(250), 24, 64), None, "a step behind another");
        assert_eq!(p.seen(), (0, 32));
        let f = p.step_at(ms(600), 40, 64).unwrap();
        // 32 bytes after the first step in 0.6 s; 24 left.
        assert_eq!((f.round, f.bytes_done, f.bytes_total), (0, 40, 64));
        assert!((f.seconds_left.unwrap() - 0.45).abs() < 1e-9, "{f:?}");
        assert!(f.mib_per_s > 0.0);
        // The round's end is always a line.
        assert!(p.step_at(ms(700), 64, 64).is_some());
        assert_eq!(p.seen(), (0, 64));
        // Round 1: another total; round 2 has the same total but starts again.
        assert!(p.step_at(ms(710), 12, 12).is_some());
        assert_eq!(p.seen(), (1, 76));
        p.step_at(ms(720), 4, 12);
        assert_eq!(p.seen(), (2, 80));
        // Round 3: the rest of round 2 came without a step of its own.
        p.step_at(ms(730), 2, 2);
        assert_eq!(p.seen(), (3, 90));
    }
}
