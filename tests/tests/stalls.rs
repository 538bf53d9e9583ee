//! Invariant 3 under stalls and partitions: the backup only ever promotes from a state that
//! includes every output the primary released, and exactly one guest of the pair runs.
//!
//! Both sides fence the other with `scripts/fence-pidfile` (the backup fences the primary
//! before promoting, after its head-start delay when the primary went silent; the primary
//! fences the backup before releasing output the backup has not acknowledged). A client
//! keeps ONE TCP connection and checks every reply: `INCR` must answer the previous value
//! plus one, so a rollback shows at once, and every acknowledged `SET` is read back at the
//! end.

use std::time::{Duration, Instant};

use harness::{wait_for_line, Proc};
use tests::pair::{fence_agent, fence_args, ms, tail, wait_log, Pair};
use tests::{kvm_required, one_at_a_time, Watchdog};

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGSTOP the backup for this long, then SIGCONT (if it still exists).
    StopBackup(Duration),
    /// SIGSTOP the primary for this long, then SIGCONT.
    StopPrimary(Duration),
    /// The replication link drops everything both ways; no FIN, no RST.
    CutLink,
}

/// Which side ends up running the guest.
#[derive(Debug, PartialEq, Eq)]
enum Survivor {
    Primary,
    Backup,
}

fn alive(p: &mut Proc) -> bool {
    p.try_wait().is_none()
}

/// Runs a protected pair under load, applies `fault`, and checks the outcome: exactly one
/// side left, that side serving the same connection, no acknowledged write lost, the
/// counter never going backwards. Returns who survived.
fn stall(prefix: &str, fault: Fault, primary_extra: &[&str]) -> Survivor {
    let _one = one_at_a_time();
    let _dog = Watchdog::start(prefix, Duration::from_secs(150));
    let Pair {
        dir,
        ns: _ns,
        mut backup,
        mut primary,
        proxy,
        load,
        tamper: _,
    } = Pair::start(prefix, true, |dir| {
        let mut primary = fence_args(dir, "backup");
        primary.extend(primary_extra.iter().map(|s| s.to_string()));
        (fence_args(dir, "primary"), primary)
    });
    let proxy = proxy.expect("proxy");

    let t0 = Instant::now();
    match fault {
        Fault::StopBackup(d) => {
            backup.signal(libc::SIGSTOP);
            std::thread::sleep(d);
            backup.signal(libc::SIGCONT);
        }
        Fault::StopPrimary(d) => {
            primary.signal(libc::SIGSTOP);
            std::thread::sleep(d);
            primary.signal(libc::SIGCONT);
        }
        Fault::CutLink => proxy.cut(),
    }
    // Settled: one side is gone (fenced), the other acts alone.
    let deadline = t0 + Duration::from_secs(20);
    while alive(&mut backup) && alive(&mut primary) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (p, b) = (alive(&mut primary), alive(&mut backup));
    let (plog, blog) = (primary.log(), backup.log());
    let logs = format!(
        "primary:\n{}\nbackup:\n{}",
        tail(&plog, 15),
        tail(&blog, 15)
    );
    assert!(
        p != b,
        "{fault:?}: primary alive {p}, backup alive {b}: exactly one side must be left\n{logs}"
    );
    let survivor = if p {
        Survivor::Primary
    } else {
        Survivor::Backup
    };
    let settled = Instant::now();
    match survivor {
        Survivor::Primary => {
            wait_log(
                &dir.join("primary.err"),
                "output released",
                Duration::from_secs(10),
            );
            let plog = primary.log();
            assert!(
                plog.find("fenced the backup") < plog.find("output released"),
                "{logs}"
            );
            assert!(!blog.contains("PROMOTED"), "{logs}");
        }
        Survivor::Backup => {
            assert!(
                wait_for_line(
                    &dir.join("backup.err"),
                    "PROMOTED",
                    Duration::from_secs(10),
                    || true
                ),
                "{logs}"
            );
            let blog = backup.log();
            assert!(
                blog.find("fenced the old primary") < blog.find("PROMOTED"),
                "{logs}"
            );
            assert!(
                !plog.contains("output released"),
                "the primary released output and was then fenced:\n{logs}"
            );
        }
    }
    // The survivor serves the same connection.
    let t = Instant::now();
    while load.replies_since(settled) < 20 && t.elapsed() < Duration::from_secs(15) {
        if load.error().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(load.error(), None, "{fault:?}: the client failed\n{logs}");
    let after = load.replies_since(settled);
    let (acked, lost, gap) = load.finish();
    eprintln!(
        "{fault:?}: {survivor:?} alone when checked {:.0} ms after the fault, {acked} writes acknowledged \
         ({after} after), longest gap {:.0} ms",
        ms(settled - t0),
        ms(gap)
    );
    assert!(
        after >= 20,
        "{fault:?}: only {after} replies afterwards\n{logs}"
    );
    assert!(
        lost.is_empty(),
        "{fault:?}: {} acknowledged writes lost (first k{})\n{logs}",
        lost.len(),
        lost[0]
    );
    survivor
}

#[test]
fn invariant3_a_backup_stopped_for_3s_is_fenced_before_output_leaves() {
    if !kvm_required() {
        return;
    }
    let s = stall("lss3", Fault::StopBackup(Duration::from_secs(3)), &[]);
    assert_eq!(s, Survivor::Primary);
}

#[test]
fn invariant3_a_backup_stopped_for_10s_is_fenced_before_output_leaves() {
    if !kvm_required() {
        return;
    }
    let s = stall("lss10", Fault::StopBackup(Duration::from_secs(10)), &[]);
    assert_eq!(s, Survivor::Primary);
}

#[test]
fn invariant3_a_cut_link_leaves_exactly_one_side_the_primary_first() {
    if !kvm_required() {
        return;
    }
    // The primary fences at once, the backup only after its head-start delay (1 s).
    let s = stall("lscut", Fault::CutLink, &[]);
    assert_eq!(s, Survivor::Primary);
}

#[test]
fn invariant3_a_primary_stopped_for_3s_is_fenced_and_the_backup_promotes() {
    if !kvm_required() {
        return;
    }
    let s = stall("lsps3", Fault::StopPrimary(Duration::from_secs(3)), &[]);
    assert_eq!(s, Survivor::Backup);
}

/// Issue input: the backup's fence agent cannot find its victim (a typo in the pid file)
/// and the primary stalls. The backup never promotes; the primary, back, fences the backup
/// and serves on alone.
#[test]
fn invariant3_a_backup_whose_agent_cannot_find_the_primary_never_promotes() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let _dog = Watchdog::start("typo", Duration::from_secs(120));
    let mut p = Pair::start("lstypo", false, |dir| {
        let typo = [
            "--fence-cmd".to_string(),
            fence_agent().to_str().unwrap().to_string(),
            "--peer-node".into(),
            "primary-node".into(),
            "--fence-arg".into(),
            format!("pidfile={}", dir.arg("primary.pi")),
        ];
        (typo.to_vec(), fence_args(dir, "backup"))
    });
    p.primary.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    p.primary.signal(libc::SIGCONT);
    wait_log(
        &p.dir.join("primary.err"),
        "output released",
        Duration::from_secs(15),
    );
    let settled = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(alive(&mut p.primary), "{}", p.primary.log());
    assert!(
        p.backup.wait_for(Duration::from_secs(5)).is_some(),
        "the backup was not fenced"
    );
    let blog = p.backup.log();
    assert!(!blog.contains("PROMOTED"), "{blog}");
    assert!(!blog.contains("fenced the old primary"), "{blog}");
    assert_eq!(p.load.error(), None);
    assert!(p.load.replies_since(settled) > 20);
    let (_, lost, _) = p.load.finish();
    assert!(lost.is_empty());
}

/// Without a fence command the primary cannot make the backup unable to promote: its
/// output stays held (the guest runs on); nothing unacknowledged reaches a client.
#[test]
fn invariant3_without_a_way_to_fence_the_backup_output_stays_held() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let _dog = Watchdog::start("held", Duration::from_secs(120));
    let mut p = Pair::start("lshold", false, |_| (vec![], vec![]));
    p.backup.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    wait_log(
        &p.dir.join("primary.err"),
        "output stays HELD",
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(1500));
    // Replies only for epochs the backup acknowledged before it stopped.
    let after = p.load.replies_since(stopped + Duration::from_millis(100));
    assert_eq!(after, 0, "{after} replies left without the backup's ack");
    assert!(alive(&mut p.primary), "{}", p.primary.log());
    p.backup.kill9();
}
