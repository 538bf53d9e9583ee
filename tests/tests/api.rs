//! The control socket (`--api-sock`) and `lockstep ctl`, on real processes: a protected
//! pair answers `status` on both sides with epochs that advance, `POST /stop` on the
//! primary ends the pair cleanly (equal final digests), and bad input gets an HTTP status
//! with a JSON error.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::ctl::{free_port, idle_backup, path, raw, spawn, status};
use tests::{kvm_required, lockstep, lockstep_bin, one_at_a_time, TempDir};

/// Waits until the socket answers a status whose `key` is a number; returns it.
fn wait_number(sock: &Path, key: &str, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        if sock.exists() {
            if let Some(n) = status(sock)[key].as_u64() {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {key} on {sock:?} in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn final_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("final epoch="))
        .unwrap_or_else(|| panic!("no final epoch line in:\n{out}"))
}

#[test]
fn a_pair_reports_its_status_and_stops_on_request() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let dir = TempDir::new("api-pair");
    let (psock, bsock) = (dir.join("primary.sock"), dir.join("backup.sock"));
    let listen = format!("127.0.0.1:{}", free_port());
    let mut backup = spawn(
        &dir,
        "backup",
        &[
            "backup",
            "--insecure",
            "--listen",
            &listen,
            "--api-sock",
            path(&bsock),
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
            "--api-sock",
            path(&psock),
            "--guest",
            "builtin",
            "--guest-args",
            "workload=dirty pages_per_ms=20 wss=8M seconds=600",
            "--mem",
            "64M",
            "--console",
            "none",
        ],
    );
    let limit = Duration::from_secs(30);
    let acked = wait_number(&psock, "acked_epoch", limit);
    let committed = wait_number(&bsock, "committed_epoch", limit);
    std::thread::sleep(Duration::from_millis(500));
    let (p, b) = (status(&psock), status(&bsock));
    assert_eq!(p["role"], "primary", "{p}");
    assert_eq!(p["guest"], "running", "{p}");
    assert_eq!(p["protection"], "protected", "{p}");
    assert_eq!(p["name"], "lockstep", "{p}");
    assert!(p["acked_epoch"].as_u64().unwrap() > acked, "{p}");
    assert!(p["pause_p99_us"].as_u64().is_some(), "{p}");
    assert_eq!(b["role"], "backup", "{b}");
    assert_eq!(b["protection"], "protected", "{b}");
    assert!(b["committed_epoch"].as_u64().unwrap() > committed, "{b}");

    // The human summary names the role.
    let human = lockstep(&["ctl", "--api-sock", path(&psock), "status"]);
    human.assert_success();
    assert!(human.stdout.contains("role:        primary"), "{human:?}");
    assert!(human.stdout.contains("pause:"), "{human:?}");
    // A backup takes no epoch pauses: no pause or commit figures to show.
    let human = lockstep(&["ctl", "--api-sock", path(&bsock), "status"]);
    human.assert_success();
    assert!(human.stdout.contains("role:        backup"), "{human:?}");
    assert!(
        !human.stdout.contains("pause:") && !human.stdout.contains("commit:"),
        "{human:?}"
    );

    // Bad input: an HTTP status and a JSON error; nothing changes.
    for (request, code) in [
        ("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ("GET /stop HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (
            "POST /stop HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{bad!",
            400,
        ),
        ("NOT HTTP AT ALL\r\n\r\n", 400),
    ] {
        let (got, body) = raw(&psock, request);
        assert_eq!(got, code, "{request:?}: {body}");
        assert!(body["error"].is_string(), "{request:?}: {body}");
    }
    assert_eq!(status(&psock)["guest"], "running");

    // A second server on the same socket is refused with one line.
    lockstep(&["run", "--guest", "builtin", "--api-sock", path(&psock)])
        .assert_one_line_error(&["--api-sock", "in use"]);

    // POST /stop: the same clean end as SIGTERM.
    let (code, body) = raw(&psock, "POST /stop HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200, "{body}");
    let p_end = primary.wait_for(limit).expect("the primary ends");
    let b_end = backup.wait_for(limit).expect("the backup ends");
    assert!(p_end.success(), "{}", primary.log());
    assert!(b_end.success(), "{}", backup.log());
    assert_eq!(final_line(&primary.out()), final_line(&backup.out()));
    assert!(
        !psock.exists() && !bsock.exists(),
        "sockets removed at the end"
    );
}

#[test]
fn ctl_without_a_server_is_a_one_line_error() {
    let dir = TempDir::new("api-none");
    let sock = dir.join("nothing.sock");
    lockstep(&["ctl", "--api-sock", path(&sock), "status"])
        .assert_one_line_error(&["cannot connect", "nothing.sock"]);
    lockstep(&["ctl", "--api-sock", path(&sock), "reboot"]).assert_one_line_error(&["reboot"]);
    // Something else at the path: said as it is, not as a refused connection.
    let file = dir.join("file.sock");
    std::fs::write(&file, b"").expect("write a file");
    for (p, what) in [(&file, "a regular file"), (&dir.join(""), "a directory")] {
        lockstep(&["ctl", "--api-sock", path(p), "status"])
            .assert_one_line_error(&["not a socket", what]);
    }
    // Addresses are checked before the socket is tried: the mistake is named, not the
    // missing socket.
    for (action, option, addr, needle) in [
        ("protect", "--peer", "foo", "not host:port"),
        (
            "protect",
            "--peer",
            "0.0.0.0:7600",
            "0.0.0.0 is where it listens",
        ),
        ("protect", "--peer", "[::]:7600", "[::] is where it listens"),
        ("switchover", "--listen", "7600", "not host:port"),
    ] {
        let run = lockstep(&["ctl", "--api-sock", path(&sock), action, option, addr]);
        run.assert_one_line_error(&[option, needle]);
        assert_eq!(run.code(), Some(2), "{run:?}");
    }
}

#[test]
fn a_stale_socket_is_replaced_and_stop_ends_a_run() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let dir = TempDir::new("api-run");
    let sock = dir.join("run.sock");
    // A socket file nobody listens on, as a killed process leaves it.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists());
    let mut run = spawn(
        &dir,
        "run",
        &[
            "run",
            "--guest",
            "builtin",
            "--guest-args",
            "workload=dirty pages_per_ms=1 wss=1M seconds=600",
            "--mem",
            "16M",
            "--console",
            "none",
            "--api-sock",
            path(&sock),
        ],
    );
    // The stale file is there before the run replaces it: ask until the run answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let run = lockstep(&["ctl", "--api-sock", path(&sock), "status", "--json"]);
        if let Ok(s) = serde_json::from_str::<Value>(run.stdout.trim()) {
            if s["guest"] == "running" {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "no running guest: {run:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s["role"], "standalone", "{s}");
    assert_eq!(s["guest"], "running", "{s}");
    assert_eq!(s["protection"], "unprotected", "{s}");
    let stop = lockstep(&["ctl", "--api-sock", path(&sock), "stop"]);
    stop.assert_success();
    let end = run.wait_for(Duration::from_secs(20)).expect("the run ends");
    assert!(end.success(), "{}", run.log());
    assert!(!sock.exists(), "socket removed at the end");
}

#[test]
fn a_promoted_backup_and_a_primary_holding_output_say_so() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    use tests::pair::{fence_args, wait_log, Pair};
    // The primary without a fence agent: when its backup is lost, its output stays held.
    let mut p = Pair::start("lsapi", false, |dir| {
        let mut backup = fence_args(dir, "primary");
        backup.extend(["--api-sock".into(), dir.arg("backup.sock")]);
        (backup, vec!["--api-sock".into(), dir.arg("primary.sock")])
    });
    let (psock, bsock) = (p.dir.join("primary.sock"), p.dir.join("backup.sock"));
    assert_eq!(status(&psock)["protection"], "protected");

    // The backup stalls: the primary holds its output and says why.
    p.backup.signal(libc::SIGSTOP);
    wait_log(
        &p.dir.join("primary.err"),
        "output stays HELD",
        Duration::from_secs(15),
    );
    let s = status(&psock);
    assert_eq!(s["protection"], "unprotected-held", "{s}");
    assert!(
        s["last_role_change"]
            .as_str()
            .unwrap()
            .contains("backup lost"),
        "{s}"
    );
    p.backup.signal(libc::SIGCONT);

    // The primary dies: the backup fences it (its pid file is gone) and promotes.
    p.primary.kill9();
    wait_log(
        &p.dir.join("backup.err"),
        "PROMOTED",
        Duration::from_secs(20),
    );
    let s = status(&bsock);
    assert_eq!(s["role"], "promoted", "{s}");
    assert_eq!(s["guest"], "running", "{s}");
    assert_eq!(s["protection"], "unprotected", "{s}");
    assert!(
        s["last_role_change"].as_str().unwrap().contains("promoted"),
        "{s}"
    );
    lockstep(&["ctl", "--api-sock", path(&bsock), "stop"]).assert_success();
    let end = p
        .backup
        .wait_for(Duration::from_secs(20))
        .expect("the promoted backup ends");
    assert!(end.success(), "{}", p.backup.log());
    assert!(!bsock.exists(), "socket removed at the end");
}

#[test]
fn an_operators_stop_of_a_backup_is_no_error() {
    // A backup that waits for its primary, stopped by `ctl stop` or SIGTERM: exit 0, and
    // the log says what it holds.
    let dir = TempDir::new("api-backup-stop");
    for (i, how) in ["ctl stop", "SIGTERM"].into_iter().enumerate() {
        let (mut backup, sock) = idle_backup(&dir, &format!("backup{i}"));
        if how == "SIGTERM" {
            backup.signal(libc::SIGTERM);
        } else {
            lockstep(&["ctl", "--api-sock", path(&sock), "stop"]).assert_success();
        }
        let end = backup
            .wait_for(Duration::from_secs(20))
            .expect("the backup ends");
        let log = backup.log();
        assert!(end.success(), "{how}: {end}\n{log}");
        assert!(!log.contains("lockstep: error"), "{how}: {log}");
        assert!(log.contains("stopped by request"), "{how}: {log}");
        assert!(!sock.exists(), "socket removed at the end");
    }
}

#[test]
fn a_slow_client_does_not_hold_the_socket() {
    // A backup waiting for its primary serves the socket without KVM.
    let dir = TempDir::new("api-slow");
    let (mut backup, sock) = idle_backup(&dir, "backup");
    // One client sent half a request and waits; another sends a byte every 2 s.
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let mut half = UnixStream::connect(&sock).expect("connect");
    half.write_all(b"GET /status HTTP/1.1\r\nHo").expect("send");
    let mut trickle = UnixStream::connect(&sock).expect("connect");
    let accepted = Instant::now();
    let mut trickle_w = trickle.try_clone().expect("clone");
    let trickler = std::thread::spawn(move || {
        for b in b"GET /status HTTP/1.1\r\n" {
            if trickle_w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    for _ in 0..3 {
        let t = Instant::now();
        let run = lockstep(&["ctl", "--api-sock", path(&sock), "status", "--json"]);
        run.assert_success();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "ctl status waited {:?} behind slow clients",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The trickler is cut off 5 s after it connected, however often it sent a byte.
    let mut answer = String::new();
    trickle
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    trickle.read_to_string(&mut answer).expect("an answer");
    let waited = accepted.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("timed out"), "{answer}");
    assert!(
        waited < Duration::from_secs(8),
        "the trickling client was held {waited:?}"
    );
    drop((half, trickle));
    trickler.join().expect("the trickler");
    lockstep(&["ctl", "--api-sock", path(&sock), "stop"]).assert_success();
    assert!(backup.wait_for(Duration::from_secs(20)).is_some());
}

#[test]
fn ctl_into_a_closed_pipe_is_no_panic() {
    // `lockstep ctl status | head -1` once head has gone: the output is dropped, quietly.
    let dir = TempDir::new("api-pipe");
    let (mut backup, sock) = idle_backup(&dir, "backup");
    for json in [false, true] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors of the array it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
        // SAFETY: both descriptors were just created and are owned here alone.
        let (read, write) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        drop(read);
        let mut cmd = Command::new(lockstep_bin());
        cmd.args(["ctl", "--api-sock", path(&sock), "status"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .stdout(std::process::Stdio::from(write))
            .stderr(std::process::Stdio::piped())
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run ctl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "json {json}: {:?}: {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "json {json}: {stderr}");
    }
    lockstep(&["ctl", "--api-sock", path(&sock), "stop"]).assert_success();
    assert!(backup.wait_for(Duration::from_secs(20)).is_some());
}

#[test]
fn a_busy_backup_refuses_a_second_primary_at_once() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let dir = TempDir::new("api-busy");
    let listen = format!("127.0.0.1:{}", free_port());
    let guest = [
        "--guest",
        "builtin",
        "--guest-args",
        "workload=dirty pages_per_ms=5 wss=8M seconds=600",
        "--mem",
        "64M",
        "--console",
        "none",
    ];
    let _backup = spawn(
        &dir,
        "backup",
        &["backup", "--insecure", "--listen", &listen],
    );
    let mut first = vec!["primary", "--insecure", "--peer", &listen];
    first.extend_from_slice(&guest);
    let _primary = spawn(&dir, "primary", &first);
    tests::pair::wait_log(
        &dir.join("backup.err"),
        "epoch 1 committed",
        Duration::from_secs(30),
    );
    // A second primary (or a protect aimed at this backup) is refused at once, by name.
    let t = Instant::now();
    let mut second = vec!["primary", "--insecure", "--peer", &listen];
    second.extend_from_slice(&guest);
    lockstep(&second).assert_one_line_error(&["refused", "already replicates the primary"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}
