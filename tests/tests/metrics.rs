//! The metrics endpoint (`--metrics ADDR:PORT`) on real processes: a protected pair is
//! scraped twice on both sides; the figures are live (epochs advance, checkpoint pauses
//! counted, the right role and protection), every scrape passes `promtool check metrics`
//! (the Prometheus project's own parser and linter, from Debian's `prometheus`), every
//! metric is documented in docs/metrics.md, anything but `GET /metrics` is 404 or 405, and
//! a bad address or a port in use is a one-line error.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::ctl::{free_port, spawn};
use tests::pair::{fence_args, Pair};
use tests::{kvm_required, lockstep, one_at_a_time, Netns, Proc, TempDir};

/// The address a process serves its metrics on (`--metrics 127.0.0.1:0`: the system's
/// choice, which the process logs).
fn metrics_addr(proc: &Proc, log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(|l| {
            l.split_once("metrics at http://")?
                .1
                .strip_suffix("/metrics")
                .map(str::to_string)
        }) {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address logged:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One raw HTTP request: the status code, the head and the body.
fn raw(addr: &str, request: &str) -> (u16, String, String) {
    let s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    raw_on(s, request)
}

/// One raw HTTP request on a connection.
fn raw_on(mut s: TcpStream, request: &str) -> (u16, String, String) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer}"));
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    (code, head.to_string(), body.to_string())
}

/// A scrape: every sample by its name with labels, as written (`lockstep_role{role="primary"}`).
struct Scrape {
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    fn get(&self, name: &str) -> f64 {
        *self
            .samples
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in the scrape:\n{}", self.text))
    }
}

/// `GET /metrics`, checked with promtool and parsed.
fn scrape(addr: &str) -> Scrape {
    scrape_on(TcpStream::connect(addr).expect("connect to the metrics endpoint"))
}

/// `GET /metrics` on a connection, checked with promtool and parsed.
fn scrape_on(s: TcpStream) -> Scrape {
    let (code, head, text) = raw_on(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200, "{head}\n{text}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    promtool_check(&text);
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
            let v = value.parse().unwrap_or_else(|e| panic!("{e}: {l}"));
            (name.to_string(), v)
        })
        .collect();
    Scrape { text, samples }
}

/// `promtool check metrics`: the exposition parses, and the names follow the conventions
/// (a lint problem is exit status 3, a parse error 1).
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}: install Debian's prometheus (scripts/test does)")
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric family of a scrape (its `# TYPE` lines) is described in docs/metrics.md.
fn documented(s: &Scrape) {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/metrics.md");
    for line in s.text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            assert!(
                doc.contains(&format!("`{name}`")) && doc.contains(kind),
                "{name} ({kind}) is not in docs/metrics.md"
            );
        }
    }
}

/// Scrapes until `ready` holds for a scrape (then returns it), at most `limit`.
fn scrape_until(addr: &str, limit: Duration, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + limit;
    loop {
        let s = scrape(addr);
        if ready(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "not ready within {limit:?}:\n{}",
            s.text
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The label value of the one sample of `family` that is 1.
fn current(s: &Scrape, family: &str) -> String {
    let on: Vec<&String> = s
        .samples
        .iter()
        .filter(|(name, &v)| name.starts_with(&format!("{family}{{")) && v == 1.0)
        .map(|(name, _)| name)
        .collect();
    assert_eq!(on.len(), 1, "{family}: not exactly one at 1:\n{}", s.text);
    on[0].split('"').nth(1).expect("a label value").to_string()
}

#[test]
fn a_protected_pair_serves_live_metrics_on_both_sides() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let dir = TempDir::new("metrics-pair");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut backup = spawn(
        &dir,
        "backup",
        &[
            "backup",
            "--insecure",
            "--listen",
            &listen,
            "--metrics",
            "127.0.0.1:0",
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
            "--metrics",
            "127.0.0.1:0",
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
    let paddr = metrics_addr(&primary, &dir.join("primary.err"));
    let baddr = metrics_addr(&backup, &dir.join("backup.err"));
    let limit = Duration::from_secs(30);

    // Protected, with a few epochs acknowledged.
    let p1 = scrape_until(&paddr, limit, |s| {
        s.get("lockstep_protection{state=\"protected\"}") == 1.0
            && s.get("lockstep_last_acked_epoch") >= 3.0
    });
    let b1 = scrape_until(&baddr, limit, |s| {
        s.get("lockstep_last_committed_epoch") >= 3.0
    });
    std::thread::sleep(Duration::from_secs(1));
    let p2 = scrape(&paddr);
    let b2 = scrape(&baddr);

    for (p, b) in [(&p1, &b1), (&p2, &b2)] {
        assert_eq!(current(p, "lockstep_role"), "primary");
        assert_eq!(current(b, "lockstep_role"), "backup");
        assert_eq!(current(p, "lockstep_protection"), "protected");
        assert_eq!(current(b, "lockstep_protection"), "protected");
        assert_eq!(p.get("lockstep_guest_running"), 1.0);
        assert_eq!(b.get("lockstep_guest_running"), 0.0);
        let pauses = p.get("lockstep_checkpoint_pause_seconds_count");
        assert!(pauses > 0.0, "{}", p.text);
        assert_eq!(
            p.get("lockstep_checkpoint_pause_seconds_bucket{le=\"+Inf\"}"),
            pauses
        );
        assert!(p.get("lockstep_checkpoint_pause_seconds_sum") > 0.0);
        assert!(p.get("lockstep_commit_latency_seconds_count") > 0.0);
        assert!(p.get("lockstep_epoch_dirty_pages_sum") > 0.0, "{}", p.text);
        assert!(p.get("lockstep_wire_bytes_total") > 0.0);
        assert!(p.get("lockstep_compression_ratio") > 0.0);
        assert!(p.get("lockstep_replication_lag_epochs") >= 0.0);
        assert!(p.get("lockstep_replication_lag_seconds") >= 0.0);
        assert!(b.get("lockstep_epochs_committed_total") >= 3.0);
        // Nothing fenced, no role change: a pair that started as a pair.
        assert_eq!(
            p.get("lockstep_fence_attempts_total{result=\"fenced\"}"),
            0.0
        );
        assert_eq!(
            b.get("lockstep_fence_attempts_total{result=\"failed\"}"),
            0.0
        );
        assert_eq!(b.get("lockstep_role_changes_total"), 0.0);
    }
    // Live: the second scrape is further on.
    for name in [
        "lockstep_last_acked_epoch",
        "lockstep_epochs_committed_total",
        "lockstep_checkpoint_pause_seconds_count",
        "lockstep_wire_bytes_total",
    ] {
        assert!(
            p2.get(name) > p1.get(name),
            "{name}: {} then {}",
            p1.get(name),
            p2.get(name)
        );
    }
    assert!(p2.get("lockstep_epochs_committed_total") >= p2.get("lockstep_last_acked_epoch"));
    for name in [
        "lockstep_last_committed_epoch",
        "lockstep_epochs_committed_total",
    ] {
        assert!(
            b2.get(name) > b1.get(name),
            "{name}: {} then {}",
            b1.get(name),
            b2.get(name)
        );
    }
    documented(&p2);
    documented(&b2);

    // Only GET /metrics.
    for (request, code) in [
        (
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            405,
        ),
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("GET /status HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("NOT HTTP AT ALL\r\n\r\n", 400),
    ] {
        let (got, head, body) = raw(&paddr, request);
        assert_eq!(got, code, "{request:?}: {head}\n{body}");
    }
    // The port is taken: a second process says so in one line, and the pair goes on.
    lockstep(&[
        "backup",
        "--insecure",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--metrics",
        &paddr,
    ])
    .assert_one_line_error(&["--metrics", &paddr, "in use"]);

    // The end.
    primary.signal(libc::SIGTERM);
    let p_end = primary.wait_for(limit).expect("the primary ends");
    let b_end = backup.wait_for(limit).expect("the backup ends");
    assert!(p_end.success(), "{}", primary.log());
    assert!(b_end.success(), "{}", backup.log());
}

/// `GET /metrics` inside a network namespace.
fn scrape_in(ns: &Netns, addr: &str) -> Scrape {
    scrape_on(
        ns.connect(addr, Duration::from_secs(5))
            .expect("connect to the metrics endpoint"),
    )
}

#[test]
fn held_output_fencing_and_a_promotion_show_in_the_metrics() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    // A kv guest on a tap in a namespace of its own, a client writing to it.
    let mut p = Pair::start("lsmet", false, |dir| {
        let mut backup = fence_args(dir, "primary");
        backup.extend(["--metrics".into(), "127.0.0.1:0".into()]);
        (backup, vec!["--metrics".into(), "127.0.0.1:0".into()])
    });
    let paddr = metrics_addr(&p.primary, &p.dir.join("primary.err"));
    let baddr = metrics_addr(&p.backup, &p.dir.join("backup.err"));
    let limit = Duration::from_secs(20);

    // The client's requests and their replies: output held per epoch, then released.
    let deadline = Instant::now() + limit;
    let s = loop {
        let s = scrape_in(&p.ns, &paddr);
        if s.get("lockstep_output_hold_seconds_count") > 0.0 {
            break s;
        }
        assert!(Instant::now() < deadline, "no output released:\n{}", s.text);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(current(&s, "lockstep_role"), "primary");
    assert!(s.get("lockstep_output_packets_total") > 0.0, "{}", s.text);
    assert!(
        s.get("lockstep_output_hold_seconds_sum") > 0.0,
        "{}",
        s.text
    );
    assert!(s.get("lockstep_output_held_packets") >= 0.0);
    assert!(s.get("lockstep_output_held_bytes") >= 0.0);
    assert_eq!(s.get("lockstep_role_changes_total"), 0.0);
    documented(&s);

    // The primary dies: the backup fences it and promotes.
    p.primary.kill9();
    let deadline = Instant::now() + limit;
    let b = loop {
        let b = scrape_in(&p.ns, &baddr);
        if b.get("lockstep_role{role=\"promoted\"}") == 1.0 {
            break b;
        }
        assert!(Instant::now() < deadline, "no promotion:\n{}", b.text);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(current(&b, "lockstep_role"), "promoted");
    assert_eq!(current(&b, "lockstep_protection"), "unprotected");
    assert_eq!(b.get("lockstep_guest_running"), 1.0);
    assert_eq!(
        b.get("lockstep_fence_attempts_total{result=\"fenced\"}"),
        1.0
    );
    assert_eq!(
        b.get("lockstep_fence_attempts_total{result=\"failed\"}"),
        0.0
    );
    // The primary lost, then the promotion.
    assert!(b.get("lockstep_role_changes_total") >= 2.0, "{}", b.text);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let changed = b.get("lockstep_last_role_change_timestamp_seconds");
    assert!(
        now - 60.0 < changed && changed <= now + 1.0,
        "{changed} vs {now}"
    );
    assert!(b.get("lockstep_epochs_committed_total") > 0.0);

    let end = p.backup.terminate(limit);
    assert!(end.is_some_and(|s| s.success()), "{}", p.backup.log());
}

#[test]
fn a_bad_metrics_address_is_a_one_line_error() {
    let listen = format!("127.0.0.1:{}", free_port());
    for bad in ["nonsense", "127.0.0.1", "127.0.0.1:99999"] {
        lockstep(&[
            "backup",
            "--insecure",
            "--listen",
            &listen,
            "--metrics",
            bad,
        ])
        .assert_one_line_error(&["--metrics", bad, "ADDR:PORT"]);
    }
    // Before anything boots: `run` and `primary` say the same.
    lockstep(&["run", "--guest", "builtin", "--metrics", "nonsense"])
        .assert_one_line_error(&["--metrics nonsense"]);
    lockstep(&[
        "primary",
        "--insecure",
        "--peer",
        &listen,
        "--guest",
        "builtin",
        "--metrics",
        "nonsense",
    ])
    .assert_one_line_error(&["--metrics nonsense"]);
}
