//! What the end-to-end tests, the benchmarks and `lockstep demo` share to drive real
//! `lockstep` processes: the KVM precondition, the binary ([`bin`]), commands with a
//! deadline ([`run`](mod@run)), child processes with logs ([`process`]), network namespaces
//! ([`netns`]), a Redis-protocol client ([`kv`]), the failover trial ([`trial`](mod@trial)), a
//! protected pair with a cuttable link ([`pair`]), temporary directories ([`tempdir`]) and
//! a watchdog ([`watchdog`]), and a 2-node Pacemaker cluster in namespaces ([`cluster`]).
//!
//! The engine library knows nothing of this crate.

pub mod bin;
pub mod cluster;
pub mod kv;
pub mod link;
pub mod netns;
pub mod pair;
pub mod process;
pub mod run;
pub mod tempdir;
pub mod trial;
pub mod watchdog;

use std::path::Path;

pub use bin::{lockstep_bin, try_lockstep_bin};
pub use kv::{Kv, Reply};
pub use netns::Netns;
pub use process::{wait_for_line, Proc};
pub use run::{lockstep, run, Run, COMMAND_TIMEOUT};
pub use tempdir::TempDir;
pub use trial::{soak, trial, Loss, SoakOutcome, TrialConfig, TrialOutcome};
pub use watchdog::Watchdog;

/// Whether SIGINT or SIGTERM asked this process to stop: every wait of the harness polls
/// it, so `lockstep demo` cleans up on Ctrl-C. The handler is the replication roles' own
/// ([`engine::replication::install_stop_handler`]); tests never install it.
pub fn interrupted() -> bool {
    engine::replication::stop_requested()
}

/// Serializes the heavy tests of one test executable (a pair of VMs each): the machines
/// have two cores. Hold the guard for the whole test.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Returns true when KVM is usable. Without it the test fails with a clear message, unless
/// `LOCKSTEP_SKIP_KVM_TESTS=1` is set: then it prints a note and returns false, and the
/// test returns early. CI never sets it.
///
/// ```no_run
/// if !harness::kvm_required() {
///     return;
/// }
/// ```
pub fn kvm_required() -> bool {
    let problem = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => return true,
        Err(e) => format!("cannot open /dev/kvm: {e}"),
    };
    if std::env::var("LOCKSTEP_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        eprintln!("note: {problem}; LOCKSTEP_SKIP_KVM_TESTS=1, so this test is skipped");
        return false;
    }
    panic!(
        "{problem}: lockstep's end-to-end tests need KVM (on a machine without it, set \
         LOCKSTEP_SKIP_KVM_TESTS=1 to skip them)"
    );
}

/// Reads a console file the guest wrote.
pub fn read_console(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read console file {}: {e}", path.display()))
}

/// Writes the built-in guest to `dir/lockstep-guest` and returns its path, for tests that
/// pass the guest as a file.
pub fn guest_image(dir: &TempDir) -> String {
    let path = dir.join("lockstep-guest");
    std::fs::write(&path, engine::BUILTIN_GUEST)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path.to_str().expect("UTF-8 temp path").to_string()
}
