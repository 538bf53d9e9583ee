//! Bad input of every kind: a non-zero exit, exactly one stderr line `lockstep: error: ...`
//! naming the problem, never a panic, and committed state (a snapshot) left untouched.

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::{kvm_required, lockstep, lockstep_bin, run as run_command, TempDir};

/// Takes a small real snapshot (16 MiB guest) and returns its directory.
fn small_snapshot(dir: &TempDir) -> PathBuf {
    let snap = dir.join("snap");
    let run = lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        "workload=dirty pages_per_ms=10 wss=1M seconds=1",
        "--mem",
        "16M",
        "--console",
        "none",
        "--snapshot-after-ms",
        "50",
        "--snapshot-to",
        snap.to_str().expect("UTF-8 path"),
    ]);
    run.assert_success();
    assert!(run.stderr.contains("snapshot written"), "{run:?}");
    for f in ["state.bin", "memory.bin"] {
        assert!(snap.join(f).is_file(), "the snapshot lacks {f}");
    }
    snap
}

fn restore(snap: &Path) -> tests::Run {
    lockstep(&[
        "restore",
        snap.to_str().expect("UTF-8 path"),
        "--console",
        "none",
    ])
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()))
}

#[test]
fn missing_dev_kvm() {
    // A private mount namespace with an empty /dev: lockstep cannot see /dev/kvm there, while
    // the rest of the machine keeps it. Needs root (CI and these machines run as root).
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
    ])
    .arg(lockstep_bin())
    .args([
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        "workload=counter limit=3",
    ]);
    let run = run_command(cmd);
    assert_eq!(run.code(), Some(1), "{run:?}");
    run.assert_one_line_error(&["/dev/kvm", "No such file"]);
    assert_eq!(run.stdout, "", "nothing may run without KVM");
}

#[test]
fn nonexistent_guest_image() {
    let dir = TempDir::new("no-image");
    let path = dir.arg("does-not-exist");
    let run = lockstep(&["run", "--guest", &path]);
    run.assert_one_line_error(&["cannot read guest image", &path, "No such file"]);
}

#[test]
fn guest_image_is_a_directory() {
    let dir = TempDir::new("dir-image");
    let path = dir.path().to_str().expect("UTF-8 path");
    let run = lockstep(&["run", "--guest", path]);
    run.assert_one_line_error(&["cannot read guest image", path, "Is a directory"]);
}

#[test]
fn guest_image_is_not_an_elf() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("not-elf");
    let path = dir.join("guest.txt");
    write(&path, b"this is not an ELF file\n");
    let run = lockstep(&["run", "--guest", path.to_str().expect("UTF-8 path")]);
    run.assert_one_line_error(&["not a loadable x86-64 ELF"]);
}

#[test]
fn zero_memory() {
    let run = lockstep(&["run", "--guest", "builtin", "--mem", "0"]);
    run.assert_one_line_error(&["--mem 0", "at least"]);
}

#[test]
fn more_memory_than_the_layout_or_host() {
    // 100G is above both the guest layout's maximum (16G) and this machine's RAM; the
    // layout check comes first.
    let run = lockstep(&["run", "--guest", "builtin", "--mem", "100G"]);
    run.assert_one_line_error(&["--mem 100G", "larger than"]);
}

#[test]
fn unparsable_memory_size() {
    let run = lockstep(&["run", "--guest", "builtin", "--mem", "lots"]);
    assert_eq!(run.code(), Some(2), "a usage error exits 2: {run:?}");
    run.assert_one_line_error(&["invalid size 'lots'"]);
}

#[test]
fn vcpu_counts_out_of_range_on_every_role() {
    for n in ["0", "17"] {
        for args in [
            &["run", "--guest", "builtin", "--vcpus", n][..],
            &[
                "primary",
                "--peer",
                "127.0.0.1:1",
                "--guest",
                "builtin",
                "--vcpus",
                n,
            ][..],
            &["backup", "--listen", "127.0.0.1:0", "--vcpus", n][..],
        ] {
            let run = lockstep(args);
            assert_eq!(run.code(), Some(2), "a usage error exits 2: {run:?}");
            run.assert_one_line_error(&[&format!("--vcpus {n}")]);
        }
    }
}

#[test]
fn bad_replication_options_on_every_role() {
    // A backup replicates once it has promoted and protects again, a run once protected:
    // both take the primary's replication options, checked before anything starts.
    for command in [
        &["primary", "--peer", "127.0.0.1:1", "--guest", "builtin"][..],
        &["backup", "--listen", "127.0.0.1:0"][..],
        &["run", "--guest", "builtin"][..],
    ] {
        for (bad, needle) in [
            (
                &["--interval-ms", "0"][..],
                "--interval-ms must be at least 1",
            ),
            (&["--window", "0"][..], "--window must be at least 1"),
            (&["--max-epoch-pages", "0"][..], "--max-epoch-pages"),
            (
                &["--on-backup-loss", "later"][..],
                "--on-backup-loss later: expected fence, pause or continue",
            ),
            (
                &["--heartbeat-timeout-ms", "0"][..],
                "--heartbeat-timeout-ms 0",
            ),
            (&["--min-interval-ms", "x"][..], "--min-interval-ms"),
            (
                &["--min-interval-ms", "30", "--interval-ms", "25"][..],
                "--min-interval-ms 30 is longer than the epoch interval (25 ms)",
            ),
            (
                &["--min-interval-ms", "NaN"][..],
                "--min-interval-ms NaN: not a number of ms",
            ),
            (
                &["--min-interval-ms=-0.5"][..],
                "--min-interval-ms -0.5: must be between 0 and 3600000",
            ),
            (
                &["--stats-json", "/nonexistent-dir/x.json"][..],
                "--stats-json /nonexistent-dir/x.json: cannot write in directory \
                 /nonexistent-dir: No such file",
            ),
            (
                &["--stats-json", "/"][..],
                "--stats-json /: not a file name",
            ),
        ] {
            let args: Vec<&str> = command.iter().chain(bad).copied().collect();
            let run = lockstep(&args);
            assert_eq!(run.code(), Some(2), "{args:?}: {run:?}");
            run.assert_one_line_error(&[needle]);
            assert_eq!(run.stdout, "", "{args:?}: nothing may run");
        }
    }
}

#[test]
fn seconds_that_are_not_a_duration() {
    for s in ["-1", "nan", "inf", "1e20"] {
        let run = lockstep(&[
            "primary",
            "--peer",
            "127.0.0.1:1",
            "--guest",
            "builtin",
            "--seconds",
            s,
        ]);
        assert_eq!(run.code(), Some(2), "{run:?}");
        run.assert_one_line_error(&["--seconds"]);
    }
}

#[test]
fn unknown_workload() {
    let run = lockstep(&["run", "--guest", "builtin", "--guest-args", "workload=nope"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    run.assert_one_line_error(&["unknown workload 'nope'"]);
    assert_eq!(run.stdout, "", "an unknown workload is refused before boot");
}

#[test]
fn unknown_option() {
    let run = lockstep(&["run", "--guest", "builtin", "--frobnicate"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    run.assert_one_line_error(&["unexpected argument '--frobnicate'"]);
}

#[test]
fn unknown_command() {
    let run = lockstep(&["frobnicate"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    run.assert_one_line_error(&["unrecognized subcommand 'frobnicate'"]);
}

#[test]
fn snapshot_options_go_together() {
    let run = lockstep(&["run", "--guest", "builtin", "--snapshot-after-ms", "5"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    run.assert_one_line_error(&["--snapshot-after-ms and --snapshot-to"]);
}

#[test]
fn restore_nonexistent_dir() {
    let dir = TempDir::new("no-snapshot");
    let missing = dir.join("nothing-here");
    let run = restore(&missing);
    run.assert_one_line_error(&[missing.to_str().expect("UTF-8 path"), "No such file"]);
}

#[test]
fn restore_from_another_version() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("other-version");
    let snap = small_snapshot(&dir);
    let state = snap.join("state.bin");
    let mut blob = read(&state);
    assert_eq!(&blob[..8], b"LKSTATE\0", "state.bin starts with the magic");
    let version = u32::from_le_bytes(blob[8..12].try_into().expect("4 bytes"));
    assert_eq!(version, engine::persist::FORMAT_VERSION);
    let other = version + 1;
    blob[8..12].copy_from_slice(&other.to_le_bytes());
    write(&state, &blob);

    let run = restore(&snap);
    run.assert_one_line_error(&[
        "state.bin",
        &format!("version {other}"),
        &format!("reads version {version}"),
    ]);
    assert_eq!(
        read(&state),
        blob,
        "a refused restore must not touch state.bin"
    );
}

#[test]
fn restore_with_corrupt_memory() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("corrupt-memory");
    let snap = small_snapshot(&dir);
    let memory = snap.join("memory.bin");
    let mut mem = read(&memory);
    let at = mem.len() / 2 + 123;
    mem[at] ^= 0x40;
    write(&memory, &mem);

    let run = restore(&snap);
    run.assert_one_line_error(&["memory.bin", "memory checksum mismatch"]);
    assert_eq!(run.stdout, "", "a corrupt snapshot must not run");
}

#[test]
fn restore_with_corrupt_state() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("corrupt-state");
    let snap = small_snapshot(&dir);
    let state = snap.join("state.bin");
    let mut blob = read(&state);
    let at = blob.len() - 100;
    blob[at] ^= 0x01;
    write(&state, &blob);

    let run = restore(&snap);
    run.assert_one_line_error(&["state.bin", "checksum mismatch"]);
}

#[test]
fn restore_with_truncated_memory() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("short-memory");
    let snap = small_snapshot(&dir);
    let memory = snap.join("memory.bin");
    let mem = read(&memory);
    write(&memory, &mem[..mem.len() / 2]);

    let run = restore(&snap);
    run.assert_one_line_error(&["memory.bin", "memory file is"]);
}

#[test]
fn restore_without_a_dir() {
    let run = lockstep(&["restore"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    run.assert_one_line_error(&["lockstep restore DIR"]);
}

#[test]
fn every_subcommand_answers_help_with_its_options() {
    for (cmd, options) in [
        (
            "run",
            &[
                "--guest",
                "--mem",
                "--snapshot-to",
                "--api-sock",
                "--name",
                "--pid-file",
                "--fence-cmd",
                "--interval-ms",
                "--on-backup-loss",
                "--heartbeat-timeout-ms",
            ][..],
        ),
        ("restore", &["--console", "--net"][..]),
        (
            "primary",
            &[
                "--peer",
                "--interval-ms",
                "--on-backup-loss",
                "--fence-cmd",
                "--peer-node",
                "--guest",
                "--api-sock",
                "--stats-json",
            ][..],
        ),
        (
            "backup",
            &[
                "--listen",
                "--fence-delay-ms",
                "--fence-arg",
                "--pid-file",
                "--api-sock",
                "--interval-ms",
                "--on-backup-loss",
                "--heartbeat-timeout-ms",
            ][..],
        ),
        ("demo", &["--seconds"][..]),
        (
            "ctl",
            &[
                "--api-sock",
                "--json",
                "--peer",
                "--listen",
                "--no-wait",
                "protect",
                "switchover",
                "failover",
            ][..],
        ),
    ] {
        for args in [vec![cmd, "--help"], vec![cmd, "--peer", "x", "-h"]] {
            let run = tests::lockstep(&args);
            let run = run.assert_success();
            assert!(
                run.stdout.starts_with(&format!("lockstep {cmd}")),
                "{args:?}: {}",
                run.stdout
            );
            assert!(run.stderr.is_empty(), "{args:?}: {}", run.stderr);
            for o in options {
                assert!(run.stdout.contains(o), "{args:?} does not mention {o}");
            }
        }
    }
    // A mistake next to no --help is still one line.
    tests::lockstep(&["primary", "--bogus"]).assert_one_line_error(&["--bogus"]);
}
