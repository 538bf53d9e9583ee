//! Network end to end: the kv guest behind virtio-net and a tap, unprotected and
//! protected, driven by redis-benchmark and redis-cli; output commit (no reply leaves
//! the primary before the backup acknowledged the epoch that produced it); the guest
//! against a real redis-server, byte for byte; and a guest whose memory fills up.
//!
//! Every test creates its own network namespace with a tap (10.0.0.1/24 on the host side,
//! the guest at 10.0.0.2), runs lockstep and the clients inside it, and deletes it
//! afterwards: no address or packet exists outside the namespace.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{wait_for_line, Kv, Netns, Proc, Reply};

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
        ns.command(
            lockstep_bin(),
            &["backup", "--insecure", "--listen", "127.0.0.1:7600"],
        ),
        dir.join("backup.out"),
        dir.join("backup.err"),
    );
    let mut primary = spawn(
        ns.command(
            lockstep_bin(),
            &[
                "primary",
                "--insecure",
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
                "--insecure",
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
                "--insecure",
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

/// Starts `lockstep run` with the kv guest on the namespace's tap (`extra` are more run
/// options, e.g. `--mem`) and waits until it listens.
fn start_kv_guest(ns: &Netns, dir: &TempDir, extra: &[&str]) -> Proc {
    let console = dir.arg("console");
    let mut args = vec![
        "run",
        "--guest",
        "builtin",
        "--net",
        "tap=tap0",
        "--guest-args",
        KV_ARGS,
        "--console",
        &console,
    ];
    args.extend_from_slice(extra);
    let vm = spawn(
        ns.command(lockstep_bin(), &args),
        dir.join("out"),
        dir.join("err"),
    );
    wait_for(
        dir.join("console"),
        "kv: listening on 10.0.0.2:6379",
        Duration::from_secs(20),
    );
    vm
}

fn kv_client(ns: &Netns, addr: &str) -> Kv {
    let stream = ns
        .connect(addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    Kv::new(stream, Duration::from_secs(20)).expect("client")
}

/// A request as redis-cli sends it: an array of bulk strings.
fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The value the OOM test stores under `keep:<i>`: 3000 bytes that differ per key.
fn kept_value(i: usize) -> String {
    let mut v = format!("kept-{i}-");
    while v.len() < 3000 {
        v.push(char::from(b'a' + ((v.len() * 7 + i) % 26) as u8));
    }
    v
}

const REDIS_OOM: &[u8] = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n";

/// A client fills the guest's memory (32 MiB here, as 256 MiB by default) the way the
/// report did, with redis-benchmark: writes get redis-server's OOM error, the guest goes
/// on answering, and nothing stored before is lost; deleting makes room again.
#[test]
fn a_full_kv_guest_refuses_writes_with_oom_and_keeps_serving() {
    if !kvm_required() {
        return;
    }
    need_redis_tools();
    let _one = serialize();
    let dir = TempDir::new("net-oom");
    let ns = Netns::create("lsnet").expect("network namespace");
    let mut vm = start_kv_guest(&ns, &dir, &["--mem", "32M"]);
    let addr = "10.0.0.2:6379";

    let mut kv = kv_client(&ns, addr);
    let kept = 200;
    for i in 0..kept {
        let reply = kv.call(&["SET", &format!("keep:{i}"), &kept_value(i)]);
        assert_eq!(reply.expect("SET"), Reply::Simple("OK".into()), "keep:{i}");
    }

    // The reported run, scaled to the memory: redis-benchmark stops at the first error,
    // as it does against redis-server.
    let (ok, out) = client(
        &ns,
        &[
            "redis-benchmark",
            "-h",
            GUEST_IP,
            "-t",
            "set",
            "-d",
            "3000",
            "-r",
            "100000",
            "-n",
            "40000",
            "-P",
            "16",
            "-q",
        ],
        Duration::from_secs(120),
    );
    assert!(
        !ok && out
            .contains("Error from server: OOM command not allowed when used memory > 'maxmemory'."),
        "redis-benchmark should have stopped at an OOM error:\n{out}"
    );
    assert!(vm.try_wait().is_none(), "the guest stopped");

    // Writes of new values: sooner or later each gets the OOM error, byte for byte, and
    // the connection stays in step.
    let mut raw = ns
        .connect(addr, Duration::from_secs(10))
        .expect("connect to the kv guest");
    raw.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut refused = 0;
    for i in 0..5000 {
        let value = kept_value(i);
        raw.write_all(&resp(&[
            b"SET",
            format!("fill:{i}").as_bytes(),
            value.as_bytes(),
        ]))
        .expect("send");
        let mut reply = [0u8; 5];
        raw.read_exact(&mut reply).expect("reply");
        if &reply == b"+OK\r\n" {
            continue;
        }
        let mut rest = vec![0u8; REDIS_OOM.len() - 5];
        raw.read_exact(&mut rest).expect("reply");
        assert_eq!([&reply[..], &rest].concat(), REDIS_OOM);
        refused += 1;
        if refused == 20 {
            break;
        }
    }
    assert_eq!(refused, 20, "5000 more values of 3000 bytes fit in 32 MiB?");
    raw.write_all(b"PING\r\nAPPEND keep:0 more\r\nSTRLEN keep:0\r\n")
        .expect("send");
    let mut reply = vec![0u8; 7 + REDIS_OOM.len() + 7];
    raw.read_exact(&mut reply).expect("replies");
    assert_eq!(
        reply,
        [&b"+PONG\r\n"[..], REDIS_OOM, b":3000\r\n"].concat(),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // Everything acknowledged before is intact; reads and deletes go on.
    for i in 0..kept {
        let reply = kv.call(&["GET", &format!("keep:{i}")]).expect("GET");
        assert_eq!(
            reply,
            Reply::Bulk(Some(kept_value(i).into_bytes())),
            "keep:{i} changed"
        );
    }
    assert_eq!(
        kv.call(&["PING"]).expect("PING"),
        Reply::Simple("PONG".into())
    );
    let Reply::Int(keys) = kv.call(&["DBSIZE"]).expect("DBSIZE") else {
        panic!("DBSIZE is not an integer");
    };
    assert!(keys > kept as i64, "{keys} keys");
    for i in 0..kept {
        kv.call(&["DEL", &format!("keep:{i}")]).expect("DEL");
    }
    assert_eq!(
        kv.call(&["SET", "after", &kept_value(1)]).expect("SET"),
        Reply::Simple("OK".into())
    );
    assert!(vm.try_wait().is_none(), "the guest stopped");
    let console = read_console(&dir.join("console"));
    assert!(!console.contains("panic"), "{console}");
    drop(vm);
}

fn need_redis_server() {
    let found = Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "redis-server is missing: this test compares the kv guest with a real one; install \
         Debian's redis-server (scripts/test does)"
    );
}

/// One exchange of the comparison: chunks of request bytes written with a pause between
/// them (so that they arrive as separate segments), and whether the server closes the
/// connection at the end (a protocol error, QUIT).
struct Case {
    name: &'static str,
    chunks: Vec<Vec<u8>>,
    closes: bool,
}

fn case(name: &'static str, bytes: impl Into<Vec<u8>>) -> Case {
    Case {
        name,
        chunks: vec![bytes.into()],
        closes: false,
    }
}

fn closing(name: &'static str, bytes: impl Into<Vec<u8>>) -> Case {
    Case {
        closes: true,
        ..case(name, bytes)
    }
}

/// `bytes` cut every `every` bytes.
fn pieces(name: &'static str, bytes: &[u8], every: usize) -> Case {
    Case {
        name,
        chunks: bytes.chunks(every).map(<[u8]>::to_vec).collect(),
        closes: false,
    }
}

/// Runs `case` on a fresh connection to `addr`: everything the server sent back (until
/// it closed the connection, or until the echo of an end marker sent after the case).
fn exchange(ns: &Netns, addr: &str, case: &Case, marker: &str) -> Vec<u8> {
    let mut stream: TcpStream = ns
        .connect(addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    for (i, chunk) in case.chunks.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        stream.write_all(chunk).expect("send");
    }
    let end = resp(&[b"ECHO", marker.as_bytes()]);
    let end_reply = format!("${}\r\n{marker}\r\n", marker.len()).into_bytes();
    if !case.closes {
        stream.write_all(&end).expect("send");
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if !case.closes && got.ends_with(&end_reply) {
            got.truncate(got.len() - end_reply.len());
            return got;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                assert!(
                    case.closes,
                    "{addr} closed the connection in case '{}'",
                    case.name
                );
                return got;
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "{addr}, case '{}': {e} after {} bytes: {}",
                case.name,
                got.len(),
                shown(&got)
            ),
        }
    }
}

/// Bytes for a failure message: escaped, long runs cut.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text: String = text.escape_debug().collect();
    if text.len() > 1500 {
        format!("{}...({} bytes)", &text[..1500], bytes.len())
    } else {
        text
    }
}

/// The exchanges of the comparison test, run in this order on both servers (so that the
/// stored data evolves the same on both).
fn comparison_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.push(case(
        "commands over RESP",
        [
            resp(&[b"FLUSHALL"]),
            resp(&[b"PING"]),
            resp(&[b"PING", b"hello"]),
            resp(&[b"ECHO", b""]),
            resp(&[b"SELECT", b"0"]),
            resp(&[b"SET", b"k", b"v"]),
            resp(&[b"GET", b"k"]),
            resp(&[b"get", b"missing"]),
            resp(&[b"SET", b"", b"empty key"]),
            resp(&[b"GET", b""]),
            resp(&[b"SET", b"empty value", b""]),
            resp(&[b"GET", b"empty value"]),
            resp(&[b"EXISTS", b"k", b"k", b"", b"missing"]),
            resp(&[b"TYPE", b"k"]),
            resp(&[b"TYPE", b"missing"]),
            resp(&[b"INCR", b"n"]),
            resp(&[b"INCRBY", b"n", b"41"]),
            resp(&[b"DECR", b"n"]),
            resp(&[b"DECRBY", b"n", b"-100"]),
            resp(&[b"GET", b"n"]),
            resp(&[b"APPEND", b"n", b"7"]),
            resp(&[b"INCR", b"n"]),
            resp(&[b"APPEND", b"s", b"ab"]),
            resp(&[b"APPEND", b"s", b"cd"]),
            resp(&[b"STRLEN", b"s"]),
            resp(&[b"STRLEN", b"missing"]),
            resp(&[b"MSET", b"a", b"1", b"b", b"2", b"a", b"3"]),
            resp(&[b"MGET", b"a", b"b", b"missing", b""]),
            resp(&[b"MSETNX", b"a", b"x", b"c", b"y"]),
            resp(&[b"MSETNX", b"c", b"x", b"d", b"y"]),
            resp(&[b"SETNX", b"c", b"z"]),
            resp(&[b"SETNX", b"e", b"z"]),
            resp(&[b"GETSET", b"e", b"w"]),
            resp(&[b"GETSET", b"f", b"w"]),
            resp(&[b"GETDEL", b"f"]),
            resp(&[b"GETDEL", b"f"]),
            resp(&[b"SET", b"k", b"v2", b"NX"]),
            resp(&[b"SET", b"k", b"v2", b"XX", b"GET"]),
            resp(&[b"SET", b"g", b"1", b"XX"]),
            resp(&[b"SET", b"g", b"1", b"nx", b"get"]),
            resp(&[b"SET", b"g", b"2", b"KEEPTTL"]),
            resp(&[b"KEYS", b"[g]"]),
            resp(&[b"KEYS", b"nothing*"]),
            resp(&[b"DEL", b"a", b"b", b"a", b"missing"]),
            resp(&[b"UNLINK", b"c", b"d"]),
            resp(&[b"CONFIG", b"GET", b"save"]),
            resp(&[b"CONFIG", b"GET", b"APPENDONLY"]),
            resp(&[b"CONFIG", b"GET", b"no-such-parameter"]),
            resp(&[b"DBSIZE"]),
        ]
        .concat(),
    ));
    cases.push(case(
        "inline commands",
        &b"PING\r\nPING hi\r\nSET a b\r\nGET a\r\n  set  x \t y\nGET x\r\n\
           SET q \"a b\\x41\\n\\t\\\\\" \r\nGET q\r\nSET 'it\\'s' ok\r\nGET \"it's\"\r\n\
           SET \"a\" b\"c\"\r\nGET a\r\nECHO \"\\xZZ\\q\"\r\n\r\n \r\nPING\rfoo\r\nDBSIZE\r\n"[..],
    ));
    cases.push(case(
        "errors",
        [
            resp(&[b"FOO"]),
            resp(&[b"foo", b"a", b"", b"b c"]),
            resp(&[b"a\r\nb", b"x\ny"]),
            resp(&[b"fo\0oo", b"x\0y"]),
            resp(&[b""]),
            resp(&[&[b'n'; 200][..], &[b'a'; 130], b"b"]),
            resp(&[b"BAR", &[b'a'; 120], &[b'b'; 10], b"c"]),
            resp(&[b"GET"]),
            resp(&[b"GET", b"a", b"b"]),
            resp(&[b"SET", b"a"]),
            resp(&[b"INCR"]),
            resp(&[b"INCRBY", b"a"]),
            resp(&[b"DEL"]),
            resp(&[b"EXISTS"]),
            resp(&[b"DBSIZE", b"x"]),
            resp(&[b"MSET", b"a"]),
            resp(&[b"MSET", b"a", b"1", b"b"]),
            resp(&[b"MSETNX", b"a"]),
            resp(&[b"MGET"]),
            resp(&[b"PING", b"a", b"b"]),
            resp(&[b"ECHO"]),
            resp(&[b"SELECT"]),
            resp(&[b"SELECT", b"1"]),
            resp(&[b"SELECT", b"-1"]),
            resp(&[b"SELECT", b"x"]),
            resp(&[b"SELECT", b"99999999999"]),
            resp(&[b"KEYS"]),
            resp(&[b"TYPE"]),
            resp(&[b"CONFIG"]),
            resp(&[b"CONFIG", b"GET"]),
            resp(&[b"CONFIG", b"FOO", b"bar"]),
            resp(&[b"FLUSHALL", b"x"]),
            resp(&[b"FLUSHDB", b"a", b"b"]),
            resp(&[b"SET", b"word", b"abc"]),
            resp(&[b"INCR", b"word"]),
            resp(&[b"INCRBY", b"n", b"1.5"]),
            resp(&[b"INCRBY", b"n", b" 1"]),
            resp(&[b"DECRBY", b"n", b"-9223372036854775808"]),
            resp(&[b"SET", b"max", b"9223372036854775807"]),
            resp(&[b"INCR", b"max"]),
            resp(&[b"DECR", b"max"]),
            resp(&[b"SET", b"zero", b"-0"]),
            resp(&[b"INCR", b"zero"]),
            resp(&[b"SET", b"k", b"v", b"NX", b"XX"]),
            resp(&[b"SET", b"k", b"v", b"EX"]),
            resp(&[b"SET", b"k", b"v", b"EX", b"x"]),
            resp(&[b"SET", b"k", b"v", b"EX", b"0"]),
            resp(&[b"SET", b"k", b"v", b"PX", b"-5"]),
            resp(&[b"SET", b"k", b"v", b"EX", b"1", b"PX", b"5"]),
            resp(&[b"SET", b"k", b"v", b"KEEPTTL", b"EX", b"1"]),
            resp(&[b"SET", b"k", b"v", b"BOGUS"]),
            b"GET a b\r\nINCR\r\n".to_vec(),
        ]
        .concat(),
    ));
    let binary: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i * 31 % 251) as u8).collect();
    let bigger: Vec<u8> = (0..(4 << 20)).map(|i| (i * 17 % 253) as u8).collect();
    cases.push(case(
        "binary and big values",
        [
            resp(&[b"SET", b"\0\xff\r\n", &binary]),
            resp(&[b"GET", b"\0\xff\r\n"]),
            resp(&[b"SET", b"big", &big]),
            resp(&[b"SET", b"bigger", &bigger]),
            resp(&[b"STRLEN", b"bigger"]),
            resp(&[b"APPEND", b"big", &binary]),
            resp(&[b"GET", b"big"]),
            resp(&[b"GET", b"bigger"]),
            resp(&[b"MGET", b"big", b"\0\xff\r\n", b"missing"]),
        ]
        .concat(),
    ));
    let mut pipeline = Vec::new();
    for i in 0..2000 {
        let key = format!("p:{i}");
        pipeline.extend(resp(&[b"SET", key.as_bytes(), format!("{i}").as_bytes()]));
        pipeline.extend(resp(&[b"INCR", key.as_bytes()]));
        pipeline.extend(resp(&[b"GET", key.as_bytes()]));
        pipeline.extend(format!("GET {key}\r\n").as_bytes());
    }
    pipeline.extend(resp(&[b"DBSIZE"]));
    cases.push(case("a long pipeline", pipeline));
    let partial = [
        resp(&[b"SET", b"split", b"across segments"]),
        resp(&[b"GET", b"split"]),
        b"ECHO \"in line\"\r\n".to_vec(),
        resp(&[b"MGET", b"split", b"k"]),
    ]
    .concat();
    cases.push(pieces("partial frames, 1 byte", &partial, 1));
    cases.push(pieces("partial frames, 7 bytes", &partial, 7));
    cases.push(case(
        "the two bytes after an argument are not checked",
        &b"*1\r\n$3\r\nPINGxx*1\r\n$4\r\nPING\r\n"[..],
    ));
    cases.push(case(
        "an empty array and a negative count",
        &b"*0\r\n*-1\r\nPING\r\n"[..],
    ));
    for (name, bytes) in [
        ("bad count", &b"PING\r\n*x\r\n"[..]),
        ("empty count", b"*\r\n"),
        ("count above INT_MAX", b"*2147483648\r\n"),
        ("no $", b"PING\r\n*2\r\n:1\r\n"),
        ("empty header", b"*1\r\n\r\n"),
        ("negative length", b"*1\r\n$-5\r\n"),
        ("bad length", b"*1\r\n$x\r\n"),
        ("length above 512 MiB", b"*1\r\n$536870913\r\n"),
        ("unbalanced double quotes", b"PING\r\nECHO \"abc\r\n"),
        ("text after a closing quote", b"ECHO \"abc\"def\r\n"),
        ("unbalanced single quotes", b"ECHO 'abc\r\n"),
        ("QUIT", b"SET q 1\r\nQUIT\r\nGET q\r\n"),
        (
            "QUIT over RESP",
            b"*2\r\n$4\r\nquit\r\n$3\r\nnow\r\n*1\r\n$4\r\nPING\r\n",
        ),
    ] {
        cases.push(closing(name, bytes));
    }
    cases.push(closing("inline request above 64 KiB", vec![b'a'; 70 << 10]));
    let mut long_header = b"*1\r\n$".to_vec();
    long_header.resize(70 << 10, b'1');
    cases.push(closing("bulk header above 64 KiB", long_header));
    cases.push(case("the end", resp(&[b"DBSIZE"])));
    cases
}

/// The same request bytes to the kv guest and to a real redis-server (Debian's, in the
/// test's namespace): the replies must be equal byte for byte, RESP and inline,
/// pipelined, errors, edge cases, partial frames, protocol errors that close.
#[test]
fn kv_replies_match_redis_server_byte_for_byte() {
    if !kvm_required() {
        return;
    }
    need_redis_server();
    let _one = serialize();
    let dir = TempDir::new("net-vs-redis");
    let ns = Netns::create("lsnet").expect("network namespace");
    // One database: SELECT 1 gets the error the kv guest gives.
    let redis = spawn(
        ns.command(
            Path::new("redis-server"),
            &[
                "--port",
                "6390",
                "--bind",
                "10.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--databases",
                "1",
                // The namespace is its only network: no other host can reach it.
                "--protected-mode",
                "no",
                "--dir",
                &dir.arg(""),
            ],
        ),
        dir.join("redis.out"),
        dir.join("redis.err"),
    );
    let redis_addr = "10.0.0.1:6390";
    let started = Instant::now();
    while ns.connect(redis_addr, Duration::from_secs(1)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "redis-server did not start: {}",
            std::fs::read_to_string(dir.join("redis.out")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let vm = start_kv_guest(&ns, &dir, &[]);
    let guest_addr = "10.0.0.2:6379";

    let cases = comparison_cases();
    for (i, case) in cases.iter().enumerate() {
        let marker = format!("lockstep-end-{i:07}");
        let expected = exchange(&ns, redis_addr, case, &marker);
        let got = exchange(&ns, guest_addr, case, &marker);
        if got != expected {
            let at = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(expected.len()));
            let from = at.saturating_sub(200);
            panic!(
                "case '{}': the kv guest's replies differ from redis-server's at byte {at} \
                 ({} vs {} bytes)\nredis-server: {}\nkv guest:     {}",
                case.name,
                got.len(),
                expected.len(),
                shown(&expected[from..]),
                shown(&got[from..])
            );
        }
        assert!(
            !expected.is_empty() || case.closes,
            "case '{}' got no reply",
            case.name
        );
    }
    eprintln!("{} cases, the same bytes from both servers", cases.len());
    drop(vm);
    drop(redis);
}

/// Mass insertion as the Redis documentation describes it: `redis-cli --pipe` sends the
/// commands, then an ECHO with a random marker, and waits for its reply.
/// SETs `<prefix>:<i>` to values of `size` bytes, pipelined in batches of up to 1 MiB,
/// until the guest answers with the OOM error; how many values it stored.
fn fill_to_oom(stream: &mut TcpStream, prefix: &str, size: usize) -> usize {
    let value = vec![b'v'; size];
    let batch = ((1 << 20) / (size + 64)).clamp(1, 256);
    let mut stored = 0;
    loop {
        let mut input = Vec::with_capacity(batch * (size + 64));
        for i in stored..stored + batch {
            input.extend(resp(&[b"SET", format!("{prefix}:{i}").as_bytes(), &value]));
        }
        stream.write_all(&input).expect("send");
        let mut refused = 0;
        for _ in 0..batch {
            let mut reply = [0u8; 5];
            stream.read_exact(&mut reply).expect("reply");
            if &reply == b"+OK\r\n" {
                stored += 1;
                continue;
            }
            let mut rest = vec![0u8; REDIS_OOM.len() - 5];
            stream.read_exact(&mut rest).expect("reply");
            assert_eq!([&reply[..], &rest].concat(), REDIS_OOM);
            refused += 1;
        }
        if refused > 0 {
            return stored;
        }
    }
}

/// Memory freed by FLUSHALL serves values of any size again: the guest's store is
/// filled to the OOM error with large, small and tiny values in turn, flushed after
/// each, and the large ones fit about as often after the small ones as before.
#[test]
fn a_flushed_kv_guest_gets_its_capacity_back() {
    if !kvm_required() {
        return;
    }
    need_redis_tools();
    let _one = serialize();
    let dir = TempDir::new("net-flush");
    let ns = Netns::create("lsnet").expect("network namespace");
    let mut vm = start_kv_guest(&ns, &dir, &["--mem", "32M"]);
    let addr = "10.0.0.2:6379";
    let mut stream = ns
        .connect(addr, Duration::from_secs(10))
        .expect("connect to the kv guest");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");

    let mut phases = Vec::new();
    for size in [256 << 10, 3000, 1, 3000, 256 << 10, 10, 3000] {
        let stored = fill_to_oom(&mut stream, &format!("fill{}", phases.len()), size);
        let mut kv = kv_client(&ns, addr);
        assert_eq!(
            kv.call(&["DBSIZE"]).expect("DBSIZE"),
            Reply::Int(stored as i64)
        );
        if size == 3000 {
            // Full, also for 1-byte values: deleting one value makes room for one
            // (whatever the connections' buffers hold).
            fill_to_oom(&mut stream, "tiny", 1);
            assert_eq!(
                kv.call(&["DEL", &format!("fill{}:0", phases.len())])
                    .expect("DEL"),
                Reply::Int(1)
            );
            assert_eq!(
                kv.call(&["SET", "tiny", "x"]).expect("SET"),
                Reply::Simple("OK".into())
            );
        }
        assert_eq!(
            kv.call(&["FLUSHALL"]).expect("FLUSHALL"),
            Reply::Simple("OK".into())
        );
        phases.push((size, stored));
    }
    eprintln!("values stored in turn (size, count): {phases:?}");
    for (i, &(size, stored)) in phases.iter().enumerate() {
        let first = phases.iter().find(|p| p.0 == size).unwrap().1;
        assert!(
            stored * 10 >= first * 9,
            "phase {i}: {stored} values of {size} bytes, {first} the first time ({phases:?})"
        );
    }
    assert!(phases[0].1 >= 40, "{phases:?}");
    assert!(phases[1].1 >= 3000, "{phases:?}");
    assert!(vm.try_wait().is_none(), "the guest stopped");
    let console = read_console(&dir.join("console"));
    assert!(!console.contains("panic"), "{console}");
    drop(vm);
}

#[test]
fn redis_cli_pipe_mass_insertion_into_the_kv_guest() {
    if !kvm_required() {
        return;
    }
    need_redis_tools();
    let _one = serialize();
    let dir = TempDir::new("net-pipe");
    let ns = Netns::create("lsnet").expect("network namespace");
    let vm = start_kv_guest(&ns, &dir, &[]);
    let count = 20_000;
    let mut commands = Vec::new();
    for i in 0..count {
        commands.extend(resp(&[
            b"SET",
            format!("mass:{i}").as_bytes(),
            format!("value {i}").as_bytes(),
        ]));
    }
    let input = dir.join("commands");
    std::fs::write(&input, &commands).expect("write the commands");
    let (ok, out) = client(
        &ns,
        &[
            "sh",
            "-c",
            &format!(
                "redis-cli -h {GUEST_IP} --pipe --pipe-timeout 30 < {}",
                input.display()
            ),
        ],
        Duration::from_secs(90),
    );
    assert!(ok, "redis-cli --pipe failed: {out}");
    assert!(
        out.contains(&format!("errors: 0, replies: {count}")),
        "redis-cli --pipe: {out}"
    );
    assert_eq!(redis_cli(&ns, &["DBSIZE"]), count.to_string());
    assert_eq!(redis_cli(&ns, &["GET", "mass:12345"]), "value 12345");
    // Inline commands through the same tool.
    let (ok, out) = client(
        &ns,
        &[
            "sh",
            "-c",
            &format!("printf 'PING\\r\\nSET inline yes\\r\\n' | redis-cli -h {GUEST_IP} --pipe"),
        ],
        Duration::from_secs(30),
    );
    assert!(ok && out.contains("errors: 0, replies: 2"), "{out}");
    assert_eq!(redis_cli(&ns, &["GET", "inline"]), "yes");
    drop(vm);
}

/// Terminal output without its escape sequences and carriage returns.
fn plain_terminal_text(raw: &[u8]) -> String {
    let mut text = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == 0x1b && raw.get(i + 1) == Some(&b'[') {
            i += 2;
            while i < raw.len() && !raw[i].is_ascii_alphabetic() {
                i += 1;
            }
        } else if raw[i] != b'\r' {
            text.push(raw[i]);
        }
        i += 1;
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// redis-cli in interactive mode, on a terminal of its own (a pty): it asks the server
/// `COMMAND DOCS` when it starts, falls back to its built-in help on the error, and then
/// works as a prompt. Each line is typed once the output so far shows what the previous
/// one should have printed.
#[test]
fn redis_cli_interactive_against_the_kv_guest() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};

    if !kvm_required() {
        return;
    }
    need_redis_tools();
    let _one = serialize();
    let dir = TempDir::new("net-interactive");
    let ns = Netns::create("lsnet").expect("network namespace");
    let vm = start_kv_guest(&ns, &dir, &[]);

    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes the two descriptors it opens; the other arguments may be
    // null (no name, default terminal settings and size).
    let opened = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened for us and nothing else owns them.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "redis-cli", "-h", GUEST_IP])
        .env("TERM", "xterm")
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe; the child makes the pty (its
    // stdin) its controlling terminal, as a shell would.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start redis-cli");
    drop(cmd);

    // The terminal: everything redis-cli prints, and the answer to its cursor position
    // queries (ESC [ 6 n), which a real terminal would give.
    let screen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut output = std::fs::File::from(master.try_clone().expect("dup"));
    let mut input = std::fs::File::from(master);
    let mut answers = input.try_clone().expect("dup");
    let reader = {
        let screen = Arc::clone(&screen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = output.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut screen = screen.lock().unwrap();
                screen.extend_from_slice(&buf[..n]);
                if buf[..n].windows(4).any(|w| w == b"\x1b[6n") {
                    let _ = answers.write_all(b"\x1b[1;1R");
                }
            }
        })
    };
    // Waits until what redis-cli printed from byte `from` on shows `needle`.
    let wait_for_text = |from: usize, needle: &str| {
        let started = Instant::now();
        loop {
            let text = plain_terminal_text(&screen.lock().unwrap()[from..]);
            if text.contains(needle) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "redis-cli did not show {needle:?}; the terminal has:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for_text(0, "10.0.0.2:6379> ");
    for (line, shows) in [
        ("SET greeting \"hello there\"", "OK"),
        ("GET greeting", "\"hello there\""),
        ("HELP GET", "summary: Get the value of a key"),
        (
            "INCR greeting",
            "(error) ERR value is not an integer or out of range",
        ),
        ("ECHO done", "\"done\""),
    ] {
        let from = screen.lock().unwrap().len();
        input
            .write_all(format!("{line}\r").as_bytes())
            .expect("type a line");
        wait_for_text(from, shows);
    }
    input.write_all(b"quit\r").expect("type quit");
    let status = (0..200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            child.try_wait().ok().flatten()
        })
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("redis-cli did not quit")
        });
    assert!(status.success(), "redis-cli ended with {status}");
    drop(input);
    let _ = reader.join();
    let _ = child.wait();
    let text = plain_terminal_text(&screen.lock().unwrap());
    assert!(!text.contains("Could not connect"), "{text}");
    drop(vm);
}
