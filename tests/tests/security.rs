//! The replication link's security (docs/security.md): only a primary holding the pair's
//! certificate can feed a backup, and a link tampered with on the way is refused.
//!
//! - At the transport: records altered, replayed, reordered or dropped by a man in the
//!   middle are refused; nothing after the tampering is delivered.
//! - On real processes: intruders (another CA's certificate, no TLS, an expired
//!   certificate, bytes that are no protocol at all) are refused before any guest state
//!   moves, with a one-line error on the intruder's side and a warning naming the cause on
//!   the backup's, which goes on serving its own primary to a clean end with the same
//!   digest; a pair whose link is tampered with loses nothing a client was told.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use checkpoint::codec::encode_page;
use checkpoint::protocol::{Hello, MemoryRegion, Message, PagesFrameBuilder};
use checkpoint::tls::{generate, LinkSecurity, TlsIdentity};
use checkpoint::transport::TransportError;
use checkpoint::PAGE_SIZE;
use tests::ctl::{free_port, path, spawn, wait_answer};
use tests::link::{tls_args, PairTls, Tamper, TamperProxy};
use tests::pair::{fence_args, tail, Link, Pair};
use tests::{
    kvm_required, lockstep, lockstep_bin, one_at_a_time, wait_for_line, TempDir, Watchdog,
};

const ALL: [Tamper; 4] = [Tamper::Flip, Tamper::Replay, Tamper::Reorder, Tamper::Drop];

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A pair's identities (node1's, node2's) made in memory, valid from `from` to `until`.
fn identities(from: i64, until: i64) -> (LinkSecurity, LinkSecurity) {
    let set = generate("lockstep", &["node1", "node2"], from, until).unwrap();
    let id = |i: usize| {
        let (_, cert, key) = &set.nodes[i];
        let src = ("--tls-cert", Path::new("memory"));
        LinkSecurity::Tls(std::sync::Arc::new(
            TlsIdentity::from_pem(
                [
                    (cert.as_bytes(), src),
                    (key.as_bytes(), src),
                    (set.ca.as_bytes(), src),
                ],
                "lockstep",
            )
            .unwrap(),
        ))
    };
    (id(0), id(1))
}

/// An epoch-sized frame of pages that compress poorly.
fn pages_frame(epoch: u64, pages: u64) -> Bytes {
    let mut b = PagesFrameBuilder::pages(epoch, 1 << 24);
    for i in 0..pages {
        let mut p = [0u8; PAGE_SIZE];
        let mut x = (epoch << 32 | i) | 1;
        for w in p.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        b.push(i, |out| encode_page(&p, None, out));
    }
    b.finish()
}

#[test]
fn tampered_records_are_refused_and_nothing_after_them_is_delivered() {
    for tamper in ALL {
        let (client, server) = identities(now() - 3600, now() + 3600);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = listener.local_addr().unwrap();
        let accepted = std::thread::spawn(move || server.accept(&listener));
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let via = front.local_addr().unwrap();
        // About 60 records of 16 KiB per frame: the tampering hits the second frame.
        let proxy =
            TamperProxy::start(front, move || TcpStream::connect(server_addr), tamper, 90).unwrap();
        let mut c = client.connect(via, Duration::from_secs(5)).unwrap();
        let mut s = accepted.join().unwrap().unwrap();
        let frames: Vec<Bytes> = (0..4).map(|e| pages_frame(e, 250)).collect();
        let sent = frames.clone();
        let tx = std::thread::spawn(move || {
            let _ = c.send_frames(&sent);
            c
        });
        let mut good = 0;
        let err = loop {
            match s.recv(Some(Duration::from_secs(10))) {
                Ok(m) => {
                    let mut again = BytesMut::new();
                    m.encode(&mut again).unwrap();
                    assert_eq!(&again[..], &frames[good][..], "{tamper:?}: a frame changed");
                    good += 1;
                    assert!(good < frames.len(), "{tamper:?}: every frame went through");
                }
                Err(e) => break e,
            }
        };
        assert!(proxy.tampered(), "{tamper:?}: the proxy never tampered");
        assert!(
            matches!(&err, TransportError::Tls { cause, .. } if cause.contains("failed its check")),
            "{tamper:?}: {err}"
        );
        assert_eq!(
            good, 1,
            "{tamper:?}: the frame before the tampering must arrive"
        );
        assert!(
            s.recv(Some(Duration::from_millis(200))).is_err(),
            "{tamper:?}: the connection delivered more after the tampering"
        );
        drop(s);
        drop(tx.join().unwrap());
    }
}

/// The guest of the tests that replicate: small, and busy enough to fill epochs.
const GUEST: &[&str] = &[
    "--guest",
    "builtin",
    "--guest-args",
    "workload=dirty pages_per_ms=20 wss=8M seconds=600",
    "--mem",
    "64M",
    "--console",
    "none",
];

/// A `lockstep primary` aimed at `peer` with `link` options, run to its end: (exit code,
/// stderr).
fn intruder(peer: &str, link: &[String]) -> (Option<i32>, String) {
    let mut args: Vec<String> = ["primary", "--peer", peer, "--connect-timeout-s", "3"]
        .map(String::from)
        .to_vec();
    args.extend(GUEST.iter().map(|s| s.to_string()));
    args.extend(link.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = lockstep(&args);
    (run.code(), run.stderr.clone())
}

fn assert_refused(what: &str, (code, stderr): &(Option<i32>, String), needle: &str) {
    assert_eq!(*code, Some(1), "{what}: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("lockstep: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{what}: one error line: {stderr}");
    assert!(errors[0].contains(needle), "{what}: '{needle}' in {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "{what}: a panic for a refusal: {stderr}"
    );
}

/// Writes a pair of certificates that expired yesterday into `dir` (as `lockstep certs`
/// lays them out).
fn stale_certs(dir: &Path) -> PairTls {
    std::fs::create_dir_all(dir).unwrap();
    let set = generate(
        "lockstep",
        &["node1", "node2"],
        now() - 86400 * 30,
        now() - 86400,
    )
    .unwrap();
    std::fs::write(dir.join("ca.pem"), &set.ca).unwrap();
    for (node, cert, key) in &set.nodes {
        std::fs::write(dir.join(format!("{node}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{node}.key")), key).unwrap();
    }
    PairTls::existing(dir).unwrap()
}

/// The backup's log once it shows at least `n` refused connections and `needle`, or after
/// 10 s (the assertions that follow say what is missing).
fn logged_refusals(backup: &tests::Proc, n: usize, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = backup.log();
        if (refusals(&log).len() >= n && log.contains(needle)) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The warnings the backup logged for refused connections.
fn refusals(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("refused a connection from"))
        .collect()
}

#[test]
fn intruders_are_refused_and_the_backup_serves_its_own_primary_to_a_clean_end() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let _dog = Watchdog::start("intruders", Duration::from_secs(180));
    let dir = TempDir::new("lssec");
    let listen = format!("127.0.0.1:{}", free_port());
    let bsock = dir.join("backup.sock");
    let other_ca = PairTls::make(lockstep_bin(), &dir.join("other"), "lockstep").unwrap();
    let stale = stale_certs(&dir.join("stale"));
    // The backup trusts the pair's CA and, as during a CA rotation, the one that issued
    // the now expired certificates: an expired certificate is refused for its date alone.
    let mut backup_tls = tls_args(dir.path(), "node2");
    let bundle = dir.join("bundle.pem");
    let pem = |p: &str| std::fs::read_to_string(p).unwrap();
    std::fs::write(&bundle, pem(&backup_tls[1]) + &pem(&stale.args("node1")[1])).unwrap();
    backup_tls[1] = path(&bundle).to_string();
    let mut args: Vec<String> = ["backup", "--listen", &listen, "--console", "none"]
        .map(String::from)
        .to_vec();
    args.extend(["--api-sock".into(), path(&bsock).to_string()]);
    args.extend(backup_tls.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut backup = spawn(&dir, "backup", &args);
    wait_answer(&bsock, Duration::from_secs(20));

    // 1. Against the waiting backup.
    let intruders = |when: &str| {
        assert_refused(
            &format!("{when}: another CA"),
            &intruder(&listen, &other_ca.args("node1")),
            "not issued by this pair's CA",
        );
        assert_refused(
            &format!("{when}: in clear"),
            &intruder(&listen, &["--insecure".into()]),
            "requires TLS",
        );
        // The backup's certificate is good; the intruder's expired one (lockstep itself
        // would not start with it: a client of the library's) is refused by the backup,
        // whose alert the intruder reads with the answer to its hello.
        let stale_files = stale.args("node1");
        let expired = TlsIdentity::load(
            Path::new(&stale_files[3]),
            Path::new(&stale_files[5]),
            &bundle,
            "lockstep",
        )
        .unwrap();
        let mut c = LinkSecurity::Tls(std::sync::Arc::new(expired))
            .connect(&listen, Duration::from_secs(5))
            .expect("the client's half of the handshake");
        let hello = Hello::new(
            1,
            vec![MemoryRegion {
                gpa: 0,
                len: 64 << 20,
            }],
            0,
        );
        let e = checkpoint::handshake::primary_handshake(&mut c, &hello, Duration::from_secs(10))
            .expect_err("an expired certificate was accepted")
            .to_string();
        assert!(e.contains("refused this side's certificate"), "{when}: {e}");
        // Bytes that are no protocol at all, and a plaintext Hello: nothing comes back
        // but a refusal, never guest state.
        let mut raw = TcpStream::connect(&listen).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        raw.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = raw.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{when}: an answer to HTTP: {answer:?}");
        let mut plain =
            checkpoint::transport::Connection::connect(&listen, Duration::from_secs(5)).unwrap();
        let hello = Hello::new(
            1,
            vec![MemoryRegion {
                gpa: 0,
                len: 64 << 20,
            }],
            0,
        );
        plain.send(&Message::Hello(hello)).unwrap();
        match plain.recv(Some(Duration::from_secs(10))) {
            Ok(Message::Refuse { reason }) => assert!(reason.contains("requires TLS"), "{reason}"),
            Ok(other) => panic!("{when}: a plaintext Hello got {:?}", other.kind()),
            Err(_) => {}
        }
    };
    intruders("idle backup");
    // Each handshake runs on a thread of the backup's: its warning may follow the
    // intruder's own end by a moment.
    let log = logged_refusals(&backup, 5, "expired");
    let seen = refusals(&log).len();
    assert!(seen >= 5, "the backup warned of each intruder:\n{log}");
    assert!(
        refusals(&log).iter().any(|l| l.contains("expired")),
        "the backup names the expired certificate:\n{log}"
    );
    let status = tests::ctl::status(&bsock);
    assert!(
        status["committed_epoch"].is_null(),
        "an intruder got in: {status}"
    );

    // A connection reset at once does not end the backup; connections that say nothing
    // do not keep the pair's primary out (each handshake runs on its own).
    let reset = TcpStream::connect(&listen).unwrap();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size given; SO_LINGER 0 makes close
    // send a reset.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&reset),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(reset);
    let _idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&listen).unwrap())
        .collect();

    // 2. The pair's own primary replicates (--connect-timeout-s 3, less than one idle
    //    peer's handshake timeout); intruders meanwhile are refused too, and a second
    //    primary with the pair's own certificate is told whom the backup serves.
    let mut args: Vec<String> = [
        "primary",
        "--peer",
        &listen,
        "--seconds",
        "12",
        "--connect-timeout-s",
        "3",
    ]
    .map(String::from)
    .to_vec();
    args.extend(GUEST.iter().map(|s| s.to_string()));
    args.extend(tls_args(dir.path(), "node1"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut primary = spawn(&dir, "primary", &args);
    assert!(
        wait_for_line(
            &backup.stderr,
            "epoch 1 committed",
            Duration::from_secs(30),
            || true
        ),
        "{}",
        backup.log()
    );
    intruders("busy backup");
    assert_refused(
        "a second primary of the pair",
        &intruder(&listen, &tls_args(dir.path(), "node1")),
        "already replicates",
    );
    let p = primary
        .wait_for(Duration::from_secs(60))
        .expect("the primary ends");
    let b = backup
        .wait_for(Duration::from_secs(30))
        .expect("the backup ends");
    assert!(
        p.success() && b.success(),
        "{}\n{}",
        primary.log(),
        backup.log()
    );
    let final_line = |out: String| {
        out.lines()
            .find(|l| l.starts_with("final epoch="))
            .map(str::to_string)
    };
    let (pf, bf) = (final_line(primary.out()), final_line(backup.out()));
    assert!(pf.is_some() && pf == bf, "digests differ: {pf:?} {bf:?}");
    assert!(
        primary.log().contains("mutual TLS 1.3"),
        "the primary says how its link is secured:\n{}",
        primary.log()
    );
    let log = logged_refusals(&backup, seen + 5, "refused a second primary from");
    let busy = refusals(&log).len() - seen;
    assert!(
        busy >= 5,
        "the busy backup warned of each intruder ({busy}):\n{log}"
    );
    assert!(
        log.contains("refused a second primary from"),
        "the backup logs the second primary it refused:\n{log}"
    );
    assert!(
        log.contains("reset"),
        "the reset connection is a warning:\n{log}"
    );
}

#[test]
fn a_node_whose_certificate_its_peer_would_refuse_does_not_start() {
    let dir = TempDir::new("lsstale");
    let stale = stale_certs(&dir.join("stale"));
    let other = PairTls::make(lockstep_bin(), &dir.join("other"), "pair-b").unwrap();
    let own = PairTls::make(lockstep_bin(), &dir.join("own"), "lockstep").unwrap();
    let mut other_ca = own.args("node1");
    other_ca[1] = other.args("node1")[1].clone();
    for (what, link, needle) in [
        ("expired", stale.args("node2"), "expired"),
        (
            "another pair's name",
            other.args("node2"),
            "not issued for this pair's name",
        ),
        ("another CA", other_ca, "not issued by this pair's CA"),
    ] {
        for command in [
            &["backup", "--listen", "127.0.0.1:0"][..],
            &["primary", "--peer", "127.0.0.1:1", "--guest", "builtin"],
        ] {
            let all: Vec<&str> = command
                .iter()
                .copied()
                .chain(link.iter().map(String::as_str))
                .collect();
            let run = lockstep(&all);
            assert_eq!(run.code(), Some(2), "{what}: {run:?}");
            run.assert_one_line_error(&["--tls-cert", "the peer would refuse", needle]);
        }
    }
}

#[test]
fn link_options_that_do_not_go_together_are_one_line_errors() {
    let dir = TempDir::new("lstlsopts");
    let pair = PairTls::make(lockstep_bin(), &dir.join("tls"), "lockstep").unwrap();
    let args = pair.args("node1");
    let base = ["backup", "--listen", "127.0.0.1:0"];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "needs --tls-cert, --tls-key and --tls-ca"),
        (args[..4].to_vec(), "missing --tls-key"),
        (
            [args.clone(), vec!["--insecure".into()]].concat(),
            "--insecure and --tls-cert, --tls-key, --tls-ca exclude each other",
        ),
        (
            [args.clone(), vec!["--name".into(), "other pair".into()]].concat(),
            "cannot name a TLS certificate",
        ),
        (
            vec![
                "--tls-ca".into(),
                args[1].clone(),
                "--tls-cert".into(),
                args[1].clone(),
                "--tls-key".into(),
                args[1].clone(),
            ],
            "--tls-key",
        ),
        (
            vec![
                "--tls-ca".into(),
                "/nonexistent/ca.pem".into(),
                "--tls-cert".into(),
                args[3].clone(),
                "--tls-key".into(),
                args[5].clone(),
            ],
            "--tls-ca /nonexistent/ca.pem",
        ),
    ];
    for (extra, needle) in cases {
        for command in [
            &base[..],
            &["primary", "--peer", "127.0.0.1:1", "--guest", "builtin"],
        ] {
            let all: Vec<&str> = command
                .iter()
                .copied()
                .chain(extra.iter().map(String::as_str))
                .collect();
            let run = lockstep(&all);
            assert_eq!(run.code(), Some(2), "{all:?}: {run:?}");
            run.assert_one_line_error(&[needle]);
        }
    }
    // `lockstep certs` never replaces a file, and its mistakes are one line too.
    let again = lockstep(&["certs", "--out", path(&dir.join("tls"))]);
    assert_eq!(again.code(), Some(1), "{again:?}");
    again.assert_one_line_error(&["exists", "never replaces"]);
    for (args, needle) in [
        (&["certs"][..], "--out DIR is required"),
        (&["certs", "--out", "/tmp/x", "--days", "0"][..], "--days 0"),
        (
            &["certs", "--out", "/tmp/x", "--nodes", "a,a"][..],
            "named twice",
        ),
        (
            &["certs", "--out", "/tmp/x", "--nodes", "../x"][..],
            "no node name",
        ),
    ] {
        let run = lockstep(args);
        assert_eq!(run.code(), Some(2), "{args:?}: {run:?}");
        run.assert_one_line_error(&[needle]);
    }
}

/// A man in the middle tampers with the replication link of a pair serving a client: the
/// backup refuses the record and the stream, the pair settles as for a lost link (the
/// primary fences the backup and serves on), and no acknowledged write is lost.
#[test]
fn a_tampered_link_is_refused_and_no_acknowledged_write_is_lost() {
    if !kvm_required() {
        return;
    }
    for (i, tamper) in [Tamper::Flip, Tamper::Replay].into_iter().enumerate() {
        let _one = one_at_a_time();
        let _dog = Watchdog::start("tampered link", Duration::from_secs(120));
        let mut p =
            Pair::start_through(&format!("lstamp{i}"), Link::Tampered(tamper, 1500), |dir| {
                (fence_args(dir, "primary"), fence_args(dir, "backup"))
            });
        let proxy = p.tamper.take().expect("the tamper proxy");
        let deadline = Instant::now() + Duration::from_secs(40);
        while !proxy.tampered() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            proxy.tampered(),
            "{tamper:?}: the link carried too few records"
        );
        assert!(
            wait_for_line(
                &p.dir.join("backup.err"),
                "failed its check",
                Duration::from_secs(10),
                || true
            ),
            "{tamper:?}: the backup did not refuse the tampered record:\n{}",
            tail(&p.backup.log(), 15)
        );
        // Settled: exactly one side serves on, the client's connection with it.
        let settled = Instant::now() + Duration::from_secs(20);
        while p.backup.try_wait().is_none() && p.primary.try_wait().is_none() {
            assert!(Instant::now() < settled, "{tamper:?}: both sides still run");
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = Instant::now();
        p.load
            .wait_for_replies_since(after, 20, Duration::from_secs(20));
        assert_eq!(p.load.error(), None, "{tamper:?}");
        let Pair { load, .. } = p;
        let (_, lost, _) = load.finish();
        assert!(
            lost.is_empty(),
            "{tamper:?}: {} acknowledged writes lost",
            lost.len()
        );
    }
}
