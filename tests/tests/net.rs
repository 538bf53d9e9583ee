//! Network end to end: the kv guest behind virtio-net and a tap, unprotected and
//! protected, driven by redis-benchmark and redis-cli; and output commit (no reply leaves
//! the primary before the backup acknowledged the epoch that produced it).
//!
//! Every test creates its own network namespace with a tap (10.0.0.1/24 on the host side,
//! the guest at 10.0.0.2), runs lockstep and the clients inside it, and deletes it
//! afterwards: no address or packet exists outside the namespace.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use engine::demo::{wait_for_line, Netns, Proc};

use tests::{kvm_required, lockstep_bin, read_console, TempDir};

const GUEST_IP: &str = "10.0.0.2";

/// One network test at a time: each runs a guest, lockstep's threads and a load generator,
/// which is all two cores can take without turning the test into a scheduling lottery.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}
const KV_ARGS: &str = "workload=kv ip=10.0.0.2/24 port=6379";

/// Runs a client to completion inside the namespace (bounded by `timeout`).
fn client(ns: &Netns, args: &[&str], timeout: Duration) -> (bool, String) {
    let out = Command::new("timeout")
        .arg(timeout.as_secs().to_string())
        .args(["ip", "netns", "exec", &ns.name])
        .args(args)
        .output()
        .expect("run a client in the namespace");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn spawn(cmd: Command, stdout: PathBuf, stderr: PathBuf) -> Proc {
    Proc::spawn(cmd, stdout, stderr).expect("start lockstep")
}

/// Waits until `file` contains `needle` (bounded), or fails the test showing the file.
fn wait_for(file: impl AsRef<Path>, needle: &str, limit: Duration) {
    let file = file.as_ref();
    assert!(
        wait_for_line(file, needle, limit, || true),
        "{} did not show '{needle}' within {limit:?}; it has:\n{}",
        file.display(),
        std::fs::read_to_string(file).unwrap_or_default()
    );
}

fn redis_cli(ns: &Netns, args: &[&str]) -> String {
    let mut full = vec!["redis-cli", "-h", GUEST_IP];
    full.extend_from_slice(args);
    let (ok, out) = client(ns, &full, Duration::from_secs(20));
    assert!(ok, "redis-cli {args:?} failed: {out}");
    out.trim().to_string()
}

/// redis-benchmark's SET and GET tests finish with no error, then redis-cli checks the
/// replies are right (the guest really stores what it was told).
fn benchmark_and_check(ns: &Netns) {
    let (ok, out) = client(
        ns,
        &[
            "redis-benchmark",
            "-h",
            GUEST_IP,
            "-q",
            "-n",
            "2000",
            "-c",
            "50",
            "-t",
            "set,get",
        ],
        Duration::from_secs(90),
    );
    let summary: Vec<&str> = out
        .split(['\r', '\n'])
        .filter(|l| l.contains("requests per second"))
        .collect();
    assert!(ok, "redis-benchmark failed or hung: {out}");
    assert!(
        summary.iter().any(|l| l.starts_with("SET:"))
            && summary.iter().any(|l| l.starts_with("GET:")),
        "redis-benchmark did not finish both SET and GET: {out}"
    );
    assert!(
        !out.to_lowercase().contains("error"),
        "redis-benchmark reported errors: {out}"
    );

    assert_eq!(redis_cli(ns, &["PING"]), "PONG");
    assert_eq!(redis_cli(ns, &["SET", "lockstep", "replicated"]), "OK");
    assert_eq!(redis_cli(ns, &["GET", "lockstep"]), "replicated");
    assert_eq!(redis_cli(ns, &["SET", "n", "41"]), "OK");
    assert_eq!(redis_cli(ns, &["INCR", "n"]), "42");
    assert_eq!(redis_cli(ns, &["EXISTS", "n", "nothere"]), "1");
    assert_eq!(redis_cli(ns, &["DEL", "n"]), "1");
    assert_eq!(redis_cli(ns, &["GET", "n"]), "");
}

fn need_redis_tools() {
    for tool in ["redis-cli", "redis-benchmark"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: install redis-tools (scripts/test does)"
        );
    }
}

#[test]
fn redis_benchmark_against_an_unprotected_kv_guest() {
    if !kvm_required() {
        return;
    }
    need_redis_tools();
    let _one = serialize();
    let dir = TempDir::new("net-unprotected");
    let ns = Netns::create("lsnet").expect("network namespace");
    let console = dir.join("console");
    let vm = spawn(
        ns.command(
            lockstep_bin(),
            &[
                "run",
                "--guest",
                "builtin",
                "--net",
                "tap=tap0",
                "--guest-args",
                KV_ARGS,
                "--console",
                &dir.arg("console"),
            ],
        ),
        dir.join("out"),
        dir.join("err"),
    );
    wait_for(
        &console,
        "kv: listening on 10.0.0.2:6379",
        Duration::from_secs(20),
    );
    benchmark_and_check(&ns);
    drop(vm);
    assert!(read_console(&console).contains("mac=52:54:00:12:34:56"));
}

#[test]
fn redis_benchmark_against_a_protected_kv_guest() {
    if !kvm_required() {
        return;
    }
    need_redis_tools();
    let _one = serialize();
    let dir = TempDir::new("net-protected");
    let ns = Netns::create("lsnet").expect("network namespace");
    let mut backup = spawn(
        ns.command(lockstep_bin(), &["backup", "--listen", "127.0.0.1:7600"]),
        dir.join("backup.out"),
        dir.join("backup.err"),
    );
    let mut primary = spawn(
        ns.command(
            lockstep_bin(),
            &[
                "primary",
                "--peer",
                "127.0.0.1:7600",
                "--guest",
                "builtin",
                "--net",
                "tap=tap0",
                "--guest-args",
                KV_ARGS,
                "--console",
                &dir.arg("console"),
            ],
        ),
        dir.join("primary.out"),
        dir.join("primary.err"),
    );
    wait_for(
        dir.join("console"),
        "kv: listening",
        Duration::from_secs(20),
    );
    wait_for(
        dir.join("backup.err"),
        "epoch 1 committed",
        Duration::from_secs(20),
    );
    benchmark_and_check(&ns);

    // A clean end: both sides agree on the final state, output was held and released.
    assert!(
        primary
            .terminate(Duration::from_secs(30))
            .is_some_and(|st| st.success()),
        "primary failed: {}",
        std::fs::read_to_string(dir.join("primary.err")).unwrap_or_default()
    );
    assert!(
        backup
            .wait_for(Duration::from_secs(30))
            .is_some_and(|st| st.success()),
        "backup failed"
    );
    let p = std::fs::read_to_string(dir.join("primary.out")).unwrap();
    let b = std::fs::read_to_string(dir.join("backup.out")).unwrap();
    let final_line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("final epoch="))
            .map(str::to_string)
    };
    assert!(
        final_line(&p).is_some(),
        "primary printed no final line: {p}"
    );
    assert_eq!(
        final_line(&p),
        final_line(&b),
        "primary and backup ended on different states"
    );
    let log = std::fs::read_to_string(dir.join("primary.err")).unwrap();
    let held = log
        .lines()
        .find_map(|l| l.split("output commit: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no output-commit summary in the primary's log:\n{log}"));
    assert!(
        held > 1000,
        "expected the benchmark's replies to go through the egress buffer, {held} frames held"
    );
}

#[test]
fn no_reply_leaves_before_the_backup_acknowledges() {
    if !kvm_required() {
        return;
    }
    let _one = serialize();
    let dir = TempDir::new("net-output-commit");
    let ns = Netns::create("lsnet").expect("network namespace");
    // After epoch 1, the backup keeps every ack for 2 s, then acknowledges all at once.
    let backup = spawn(
        ns.command(
            lockstep_bin(),
            &[
                "backup",
                "--listen",
                "127.0.0.1:7601",
                "--test-withhold-acks-ms",
                "2000",
                "--heartbeat-timeout-ms",
                "8000",
            ],
        ),
        dir.join("backup.out"),
        dir.join("backup.err"),
    );
    let primary = spawn(
        ns.command(
            lockstep_bin(),
            &[
                "primary",
                "--peer",
                "127.0.0.1:7601",
                // Acks are held back on purpose: the backup is slow, not lost.
                "--heartbeat-timeout-ms",
                "8000",
                "--guest",
                "builtin",
                "--net",
                "tap=tap0",
                "--guest-args",
                KV_ARGS,
                "--console",
                &dir.arg("console"),
            ],
        ),
        dir.join("primary.out"),
        dir.join("primary.err"),
    );
    wait_for(
        dir.join("console"),
        "kv: listening",
        Duration::from_secs(20),
    );
    wait_for(
        dir.join("backup.err"),
        "epoch 1 committed",
        Duration::from_secs(20),
    );

    // A client in the namespace: connect, SET, read the reply. Even the SYN-ACK is
    // output, so the connection itself completes only after the ack.
    let log_path = dir.join("backup.err");
    let started = Instant::now();
    let (reply, waited, log_at_reply) = ns
        .within(|| {
            let mut c = std::net::TcpStream::connect_timeout(
                &"10.0.0.2:6379".parse().expect("address"),
                Duration::from_secs(20),
            )
            .expect("connect to the kv guest");
            c.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            c.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nheld!\r\n")
                .expect("send");
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).expect("read the reply");
            let waited = started.elapsed();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), waited, log))
        })
        .expect("enter the namespace");
    assert_eq!(reply, "+OK\r\n", "wrong reply");
    // Acks were withheld for 2 s from epoch 1's commit, which came before the client
    // started: the reply cannot have arrived much sooner than that, and when it did, the
    // backup had already acknowledged.
    assert!(
        waited >= Duration::from_millis(1000),
        "the reply came after {waited:?}, while the backup was still withholding acks"
    );
    assert!(
        log_at_reply.contains("acks withheld"),
        "the client got its reply after {waited:?}, before the backup acknowledged anything:\n{log_at_reply}"
    );
    // Once acks flow, replies come at the pace of one epoch, not of the withholding.
    let t = Instant::now();
    assert_eq!(redis_cli(&ns, &["GET", "k"]), "held!");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a reply took {:?} with acks flowing",
        t.elapsed()
    );
    drop(primary);
    drop(backup);
}
