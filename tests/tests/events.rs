//! Events as JSON lines (`--events PATH`, docs/events.md) on real processes: a protected
//! pair writes its initial sync and its protection on both sides; after the primary is
//! SIGKILLed, the backup's file tells the failover: the primary lost, the fence attempt
//! started and succeeded, the promotion. A backup that withholds its acks shows as
//! replication lag in the primary's status and as `throttle` events. A path that cannot
//! be opened is a one-line error.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::ctl::{free_port, spawn};
use tests::pair::{fence_args, Pair};
use tests::{kvm_required, lockstep, one_at_a_time, TempDir};

/// Every line of an events file, each of which must be one JSON object.
fn read_events(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display()))
        })
        .collect()
}

/// Waits until `path` has an event for which `found` holds; returns all its events.
fn wait_event(path: &Path, found: impl Fn(&Value) -> bool, limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let events = read_events(path);
        if events.iter().any(&found) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not get the event within {limit:?}:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The position of the first event named `event` whose `key` is `value`.
fn position(events: &[Value], event: &str, key: &str, value: &str) -> usize {
    events
        .iter()
        .position(|v| v["event"] == event && v[key] == value)
        .unwrap_or_else(|| panic!("no {event} with {key}={value} in {events:#?}"))
}

/// The fields every line has: ts (unix ms), this process's pid, the event's name.
fn check_common(events: &[Value], pid: u32) {
    let mut last = 0;
    for v in events {
        let ts = v["ts"].as_u64().unwrap_or_else(|| panic!("no ts: {v}"));
        assert!(ts > 1_600_000_000_000 && ts >= last, "{v}");
        last = ts;
        assert_eq!(v["pid"], pid, "{v}");
        assert!(v["event"].is_string(), "{v}");
    }
}

#[test]
fn a_pair_and_its_failover_write_their_events() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let mut p = Pair::start("lsev", false, |dir| {
        let mut backup = fence_args(dir, "primary");
        backup.extend(["--events".into(), dir.arg("backup.events")]);
        (backup, vec!["--events".into(), dir.arg("primary.events")])
    });
    let (pfile, bfile) = (p.dir.join("primary.events"), p.dir.join("backup.events"));
    let (ppid, bpid) = (p.primary.pid(), p.backup.pid());

    // The primary: its initial sync, then protected.
    let primary = read_events(&pfile);
    check_common(&primary, ppid);
    let sync = position(&primary, "sync_progress", "side", "primary");
    let s = &primary[sync];
    assert!(s["bytes_total"].as_u64().unwrap() > 0, "{s}");
    assert!(s["bytes_done"].as_u64().unwrap() <= s["bytes_total"].as_u64().unwrap());
    assert!(s["mib_per_s"].is_number() && s["round"].is_u64(), "{s}");
    let syncing = position(&primary, "protection", "state", "syncing");
    let protected = position(&primary, "protection", "state", "protected");
    assert!(syncing < sync && sync < protected, "{primary:#?}");

    // The backup: its side of the sync, then protected.
    let backup = read_events(&bfile);
    check_common(&backup, bpid);
    let bsync = position(&backup, "sync_progress", "side", "backup");
    assert!(backup[bsync]["bytes_total"].as_u64().unwrap() > 0);
    assert!(bsync < position(&backup, "protection", "state", "protected"));

    // The primary dies: the backup fences it, then promotes.
    p.primary.kill9();
    let backup = wait_event(
        &bfile,
        |v| v["event"] == "role_change" && v["role"] == "promoted",
        Duration::from_secs(20),
    );
    check_common(&backup, bpid);
    let lost = position(&backup, "role_change", "role", "backup");
    assert!(
        backup[lost]["why"]
            .as_str()
            .unwrap()
            .contains("primary lost"),
        "{}",
        backup[lost]
    );
    let started = position(&backup, "fence", "result", "started");
    let fenced = position(&backup, "fence", "result", "fenced");
    for i in [started, fenced] {
        let f = &backup[i];
        assert_eq!(f["target"], "the old primary", "{f}");
        assert_eq!(f["node"], "primary-node", "{f}");
        assert_eq!(f["attempt"], 1, "{f}");
    }
    let promoted = position(&backup, "role_change", "role", "promoted");
    assert!(
        lost < started && started < fenced && fenced < promoted,
        "{backup:#?}"
    );
    let r = &backup[promoted];
    assert_eq!(
        (&r["guest"], &r["protection"]),
        (&"running".into(), &"unprotected".into())
    );
    // The loss ended the protection, once.
    let unprotected: Vec<_> = backup
        .iter()
        .filter(|v| v["event"] == "protection" && v["state"] == "unprotected")
        .collect();
    assert_eq!(unprotected.len(), 1, "{backup:#?}");

    let end = p.backup.terminate(Duration::from_secs(20));
    assert!(end.is_some_and(|s| s.success()), "{}", p.backup.log());
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `lockstep ctl --api-sock SOCK status --json`, parsed; `Null` while nothing answers.
fn status(sock: &Path) -> Value {
    let run = lockstep(&["ctl", "--api-sock", path(sock), "status", "--json"]);
    serde_json::from_str(run.stdout.trim()).unwrap_or(Value::Null)
}

#[test]
fn a_backup_behind_shows_as_lag_and_throttle_events() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let dir = TempDir::new("events-lag");
    let (events, sock) = (dir.join("primary.events"), dir.join("primary.sock"));
    let listen = format!("127.0.0.1:{}", free_port());
    // After epoch 1 the backup acknowledges nothing for 3 s: the window fills, and once
    // the guest has dirtied an epoch's worth (512 pages) the primary holds it.
    let mut backup = spawn(
        &dir,
        "backup",
        &[
            "backup",
            "--insecure",
            "--listen",
            &listen,
            "--test-withhold-acks-ms",
            "3000",
        ],
    );
    let mut primary = spawn(
        &dir,
        "primary",
        &[
            "primary",
            "--insecure",
            "--peer",
            &listen,
            "--events",
            path(&events),
            "--api-sock",
            path(&sock),
            "--guest",
            "builtin",
            "--guest-args",
            "workload=dirty pages_per_ms=20 wss=8M seconds=600",
            "--mem",
            "64M",
            "--max-epoch-pages",
            "512",
            "--console",
            "none",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let lagging = loop {
        let s = status(&sock);
        if s["lag_epochs"].as_u64() >= Some(2) && s["lag_ms"].as_u64() >= Some(500) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no lag in {s}\n{}",
            primary.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(lagging["protection"], "protected", "{lagging}");

    let all = wait_event(
        &events,
        |v| v["event"] == "throttle",
        Duration::from_secs(15),
    );
    let t = &all[position(&all, "throttle", "event", "throttle")];
    assert!(t["episodes"].as_u64().unwrap() >= 1, "{t}");
    assert!(t["held_ms"].as_u64().unwrap() > 0, "{t}");
    assert!(
        t["episodes_total"].as_u64() >= t["episodes"].as_u64(),
        "{t}"
    );
    // The backup caught up: the lag is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&sock)["lag_ms"].as_u64() > Some(500) {
        assert!(Instant::now() < deadline, "{}", status(&sock));
        std::thread::sleep(Duration::from_millis(100));
    }
    check_common(&read_events(&events), primary.pid());

    lockstep(&["ctl", "--api-sock", path(&sock), "stop"]).assert_success();
    let limit = Duration::from_secs(20);
    assert!(
        primary.wait_for(limit).is_some_and(|s| s.success()),
        "{}",
        primary.log()
    );
    assert!(
        backup.wait_for(limit).is_some_and(|s| s.success()),
        "{}",
        backup.log()
    );
}

#[test]
fn an_events_path_that_cannot_be_opened_is_a_one_line_error() {
    let missing = "/nonexistent-lockstep-dir/events.jsonl";
    for args in [
        &["run", "--guest", "builtin", "--events", missing][..],
        &[
            "primary",
            "--insecure",
            "--peer",
            "127.0.0.1:1",
            "--events",
            missing,
        ],
        &[
            "backup",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--events",
            missing,
        ],
    ] {
        let run = lockstep(args);
        run.assert_one_line_error(&["--events", missing]);
        assert_eq!(run.code(), Some(1), "{run:?}");
    }
}
