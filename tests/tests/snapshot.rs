//! A snapshot taken mid-run and restored in a new process computes the same thing as an
//! uninterrupted run.

use tests::{kvm_required, lockstep, read_console, TempDir};

/// The `hash=<16 hex>` lines of a console file.
fn hash_lines(console: &str) -> Vec<&str> {
    console.lines().filter(|l| l.starts_with("hash=")).collect()
}

fn the_hash<'a>(console: &'a str, what: &str) -> &'a str {
    let lines = hash_lines(console);
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected exactly one hash line, console:\n{console}"
    );
    let hash = lines[0];
    assert!(
        hash.len() == "hash=".len() + 16
            && hash["hash=".len()..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{what}: malformed hash line '{hash}'"
    );
    hash
}

/// `rounds` must keep the hash computing well past `SNAPSHOT_AFTER_MS`: the restored run
/// printing the hash proves the snapshot was taken before the guest printed it.
fn snapshot_then_restore_gives_the_same_hash(vcpus: u32, rounds: u32) {
    const SNAPSHOT_AFTER_MS: &str = "200";
    let dir = TempDir::new(&format!("snapshot-{vcpus}"));
    let vcpus = vcpus.to_string();
    let guest_args = format!("workload=hash rounds={rounds} wss=32M");
    let base = [
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        &guest_args,
        "--vcpus",
        &vcpus,
    ];

    let plain = dir.arg("plain.txt");
    let mut args = base.to_vec();
    args.extend(["--console", &plain]);
    lockstep(&args).assert_success();
    let plain = read_console(plain.as_ref());
    let expected = the_hash(&plain, "uninterrupted run");

    let snap = dir.arg("snap");
    let first = dir.arg("first.txt");
    let mut args = base.to_vec();
    args.extend([
        "--console",
        &first,
        "--snapshot-after-ms",
        SNAPSHOT_AFTER_MS,
        "--snapshot-to",
        &snap,
    ]);
    let run = lockstep(&args);
    run.assert_success();
    assert!(
        run.stderr.contains("snapshot written"),
        "the run did not report its snapshot: {run:?}"
    );
    let first = read_console(first.as_ref());
    assert_eq!(
        the_hash(&first, "run that took the snapshot"),
        expected,
        "taking a snapshot changed the result"
    );

    let second = dir.arg("restored.txt");
    let run = lockstep(&["restore", &snap, "--console", &second]);
    run.assert_success();
    let second = read_console(second.as_ref());
    assert_eq!(
        the_hash(&second, "restored run"),
        expected,
        "the restored run computed another hash"
    );
    assert!(
        !second.contains("count=") && !second.contains("error"),
        "unexpected output from the restored run:\n{second}"
    );
}

#[test]
fn snapshot_restore_one_vcpu() {
    if !kvm_required() {
        return;
    }
    // ~2 s of hashing alone at one vCPU here.
    snapshot_then_restore_gives_the_same_hash(1, 12);
}

#[test]
fn snapshot_restore_two_vcpus() {
    if !kvm_required() {
        return;
    }
    // ~1.3 s of hashing alone at two vCPUs here.
    snapshot_then_restore_gives_the_same_hash(2, 16);
}

/// The `dirty: ms=<t>` values of a console, in order.
fn guest_ms(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| {
            l.strip_prefix("dirty: ms=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The guest's clock goes on from where the snapshot caught it, however long the snapshot
/// waited on disk: the restored guest's first report is its next whole second after the
/// capture, not the capture plus the wait.
#[test]
fn restored_guest_time_continues_from_the_snapshot() {
    if !kvm_required() {
        return;
    }
    const WAIT: std::time::Duration = std::time::Duration::from_secs(3);
    let dir = TempDir::new("snapshot-clock");
    let snap = dir.arg("snap");
    let first = dir.arg("first.txt");
    let run = lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--vcpus",
        "2",
        "--guest-args",
        "workload=dirty pages_per_ms=20 wss=8M seconds=3",
        "--console",
        &first,
        "--snapshot-after-ms",
        "1500",
        "--snapshot-to",
        &snap,
    ]);
    run.assert_success();
    let first = read_console(first.as_ref());
    assert_eq!(
        guest_ms(&first).len(),
        3,
        "the uninterrupted run reports each of its 3 seconds:\n{first}"
    );
    std::thread::sleep(WAIT);
    let second = dir.arg("restored.txt");
    let started = std::time::Instant::now();
    lockstep(&["restore", &snap, "--console", &second]).assert_success();
    let took = started.elapsed();
    let second = read_console(second.as_ref());
    let ms = guest_ms(&second);
    // Captured at ~1.4 s of guest time: the next report is at 2 s. A clock that kept
    // running on disk would start at ~4.4 s, past the end of the workload.
    assert!(
        ms.first().is_some_and(|&t| (1000..2600).contains(&t)),
        "the restored guest's first report should be its second 2 (captured at ~1.4 s, \
         restored {WAIT:?} later):\n{second}"
    );
    assert!(
        ms.len() >= 2 && second.trim_end().ends_with("dirty: done"),
        "the restored guest should run its remaining seconds to the end:\n{second}"
    );
    assert!(
        took >= std::time::Duration::from_millis(1200),
        "the restored guest ran its remaining ~1.6 s of time in {took:?}:\n{second}"
    );
}
