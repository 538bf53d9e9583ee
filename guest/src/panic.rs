//! The panic handler: `panic: <message>` on the serial port, then exit status 101.

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::ports::{exit, idle};
use crate::serial::{self, Serial};

const EXIT_PANIC: u32 = 101;
/// How long a panicking vCPU waits for the serial lock before printing anyway.
const LOCK_SPINS: u64 = 1 << 24;
/// How long a later panic waits before stopping the VM, so the first can finish its line.
const LATER_PANIC_GRACE_US: u32 = 100_000;

/// Set by the first panic. A later one (on another vCPU, or while printing the first)
/// prints nothing.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::AcqRel) {
        idle(LATER_PANIC_GRACE_US);
        exit(EXIT_PANIC);
    }
    let guard = serial::lock(Some(LOCK_SPINS));
    let _ = core::fmt::write(&mut Serial, format_args!("panic: {}\n", info.message()));
    drop(guard);
    exit(EXIT_PANIC)
}

/// The precompiled `core` refers to the unwinder's personality routine even with
/// `panic = abort`; link-time optimisation drops the reference in release builds, but
/// unoptimised builds need the symbol. Nothing calls it: nothing unwinds.
#[cfg(debug_assertions)]
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
