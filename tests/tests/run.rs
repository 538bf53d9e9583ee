//! `lockstep run` of the built-in guest: output, exit status, and how a crashing guest is
//! reported.

use tests::{guest_image, kvm_required, lockstep, read_console, TempDir};

#[test]
fn counter_prints_three_lines_and_exits_zero() {
    if !kvm_required() {
        return;
    }
    let run = lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        "workload=counter limit=3",
    ]);
    run.assert_success();
    assert_eq!(run.stdout, "count=1\ncount=2\ncount=3\n", "{run:?}");
    assert!(
        !run.stderr.contains("error"),
        "a clean run printed an error: {run:?}"
    );
}

#[test]
fn counter_to_a_console_file() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("counter-file");
    let console = dir.arg("console.txt");
    let run = lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        "workload=counter limit=3",
        "--vcpus",
        "2",
        "--console",
        &console,
    ]);
    run.assert_success();
    assert_eq!(run.stdout, "", "the console went to a file, not stdout");
    assert_eq!(
        read_console(console.as_ref()),
        "count=1\ncount=2\ncount=3\n"
    );
}

// The guest is passed as a file: `lockstep run --guest builtin` does not accept
// `workload=crash` yet (cli::BUILTIN_WORKLOADS lacks it).
#[test]
fn guest_fault_is_reported_as_a_crash() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("crash-fault");
    let guest = guest_image(&dir);
    let run = lockstep(&[
        "run",
        "--guest",
        &guest,
        "--guest-args",
        "workload=crash mode=fault",
    ]);
    assert_eq!(run.code(), Some(1), "{run:?}");
    run.assert_one_line_error(&["guest crashed at RIP=0x", "triple fault"]);
}

#[test]
fn guest_panic_exits_101_with_its_message() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("crash-panic");
    let guest = guest_image(&dir);
    let run = lockstep(&[
        "run",
        "--guest",
        &guest,
        "--guest-args",
        "workload=crash mode=panic",
    ]);
    assert_eq!(run.code(), Some(101), "{run:?}");
    assert!(run.stdout.contains("panic"), "{run:?}");
    assert!(
        !run.stderr.contains("lockstep: error"),
        "a guest that exits through its panic handler is not a lockstep error: {run:?}"
    );
}

#[test]
fn bad_guest_arguments_exit_2_with_the_guests_message() {
    if !kvm_required() {
        return;
    }
    let run = lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        "workload=counter limit=lots",
    ]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stdout.starts_with("error: ") && run.stdout.contains("limit"),
        "the guest should name the bad key on its console: {run:?}"
    );
}
