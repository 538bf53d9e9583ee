//! Minimal logging to stderr: `lockstep[<role>] <elapsed> <message>`.
//!
//! A VMM's log is read by people during incidents; one line per event, with the time since
//! the process started, is enough, and costs no dependency.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();
static ROLE: OnceLock<&'static str> = OnceLock::new();
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the role shown in every line (`run`, `primary`, `backup`, ...).
pub fn init(role: &'static str) {
    let _ = START.set(Instant::now());
    let _ = ROLE.set(role);
}

/// Silences informational lines (errors still print).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

#[doc(hidden)]
pub fn write(level: &str, args: std::fmt::Arguments<'_>) {
    if level == "info" && QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let t = START.get_or_init(Instant::now).elapsed();
    let role = ROLE.get().copied().unwrap_or("lockstep");
    eprintln!("[{role} {:>8.3}s {level}] {args}", t.as_secs_f64());
}

/// Logs a line at level `info` to stderr (`format!` arguments).
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write("info", format_args!($($arg)*)) };
}

/// Logs a line at level `WARN` to stderr (`format!` arguments).
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write("WARN", format_args!($($arg)*)) };
}
