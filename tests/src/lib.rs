//! Helpers for the end-to-end tests in `tests/tests/`: the KVM precondition, the `lockstep`
//! binary (built on first use, in the same target directory and profile as the tests),
//! commands with a deadline, temporary directories, a watchdog, and the checks every
//! error case shares.
//!
//! `cargo test --release --workspace` from a fresh clone works: the first test that needs
//! the binary runs `cargo build -p engine --bin lockstep` once per test executable (a
//! no-op when it is up to date). `LOCKSTEP_BIN=/path/to/lockstep` skips the build and
//! tests that binary instead.

pub mod pair;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Serializes the heavy tests of one test executable (a pair of VMs each): the machines
/// have two cores. Hold the guard for the whole test.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long one `lockstep` command may take before the test calls it hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Returns true when KVM is usable. Without it the test fails with a clear message, unless
/// `LOCKSTEP_SKIP_KVM_TESTS=1` is set: then it prints a note and returns false, and the
/// test returns early. CI never sets it.
///
/// ```no_run
/// if !tests::kvm_required() {
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

/// The `lockstep` binary under test, built on first use.
pub fn lockstep_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("LOCKSTEP_BIN") {
        Some(path) => PathBuf::from(path),
        None => build_lockstep(),
    })
}

/// Builds `lockstep` into the target directory and profile this test executable was built
/// in: the executable is `<target>/<profile>/deps/<name>-<hash>`.
fn build_lockstep() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "engine", "--bin", "lockstep"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build lockstep: {e}"));
    assert!(
        out.status.success(),
        "building lockstep failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join("lockstep");
    assert!(
        bin.is_file(),
        "cargo built lockstep, but {} does not exist",
        bin.display()
    );
    bin
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Run {
    /// The command line, for failure messages.
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, showing everything, unless the command exited 0.
    pub fn assert_success(&self) -> &Run {
        assert!(
            self.status.success(),
            "{} failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The one-line error check every bad input must pass: a non-zero exit, stderr exactly
    /// one line `lockstep: error: ...` that contains each of `needles`, and no sign of a
    /// panic. Returns the line.
    pub fn assert_one_line_error(&self, needles: &[&str]) -> &str {
        let ctx = || {
            format!(
                "{} ({})\nstdout:\n{}\nstderr:\n{}",
                self.what, self.status, self.stdout, self.stderr
            )
        };
        assert!(!self.status.success(), "expected a failure: {}", ctx());
        for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
            assert!(
                !self.stderr.contains(bad),
                "stderr shows a panic ({bad}): {}",
                ctx()
            );
        }
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected exactly one line on stderr: {}",
            ctx()
        );
        let line = lines[0];
        assert!(
            line.starts_with("lockstep: error: "),
            "the error line must start with 'lockstep: error: ': {}",
            ctx()
        );
        for needle in needles {
            assert!(
                line.contains(needle),
                "the error line does not mention '{needle}': {}",
                ctx()
            );
        }
        line
    }
}

/// Runs `lockstep ARGS...` to completion (at most [`COMMAND_TIMEOUT`]).
pub fn lockstep(args: &[&str]) -> Run {
    let mut cmd = Command::new(lockstep_bin());
    cmd.args(args);
    run(cmd)
}

/// Runs a command to completion, capturing its output; kills it and fails the test if it
/// takes longer than [`COMMAND_TIMEOUT`].
pub fn run(mut cmd: Command) -> Run {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_BACKTRACE")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pid = child.id();
    let stdout = reader(child.stdout.take().expect("piped stdout"));
    let stderr = reader(child.stderr.take().expect("piped stderr"));
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(status) => status.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
        Err(_) => {
            let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
            // SAFETY: kill(2) takes no pointers. `pid` is our own child, which the waiter
            // thread has not reaped (it would have answered), so the pid is not reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = waiter.join();
            panic!("{what} did not finish within {COMMAND_TIMEOUT:?}; killed it");
        }
    };
    let _ = waiter.join();
    Run {
        what,
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn reader(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// A directory under the system temp dir with a unique name, removed on drop unless the
/// test failed (then it is kept, and its path printed, for a look at the files).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "lockstep-test-{name}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `join` as a `&str`, for command lines.
    pub fn arg(&self, name: &str) -> String {
        self.join(name)
            .to_str()
            .expect("UTF-8 temp path")
            .to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: keeping {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
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

/// Aborts the whole test process with a message if it is not dropped within `limit`: a
/// deadlock must fail the test, not hang CI.
pub struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(what: &str, limit: Duration) -> Watchdog {
        let (done, rx) = mpsc::channel::<()>();
        let what = what.to_string();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: {what} did not finish within {:?}: deadlock? aborting the test \
                     process",
                    started.elapsed()
                );
                std::process::abort();
            }
        });
        Watchdog {
            done: Some(done),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
