//! The lockstep reference guest: a `no_std` program that the VMM enters directly at CPL3
//! in 64-bit mode (see `abi.rs` for the boot contract). It has no CPL0 code, takes no
//! interrupts and executes no privileged instruction; it talks to the VMM through port
//! I/O only (serial, exit port, idle port).
//!
//! Every vCPU enters [`_start`] with its own boot-info page. The command line picks a
//! workload (`workload=counter|dirty|hash|kv|disk|crash ...`); vCPU 0 prints and ends the
//! VM through the exit port, the other vCPUs never print (except when they panic).
//!
//! Exit statuses: 0 done, 2 bad command line, 3 bad boot info, 4 a device that cannot
//! be brought up, 5 a disk block that fails verification or a disk request that fails,
//! 101 panic.

#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

#[path = "../../engine/src/boot/abi.rs"]
#[allow(dead_code)]
mod abi;
mod args;
mod boot;
mod heap;
mod mem;
mod panic;
mod ports;
mod serial;
mod sync;
mod time;
mod virtio;
mod workloads;

use abi::BootInfo;
use boot::{Boot, BootError};

/// Status for a command line that names no valid workload or has a bad value.
const EXIT_BAD_ARGS: u32 = 2;
/// Status for a boot-info page this guest cannot use.
const EXIT_BAD_BOOT: u32 = 3;
/// How long a vCPU other than 0 with bad boot info waits before it stops the VM, so
/// that vCPU 0 can say what is wrong first.
const BOOT_ERROR_GRACE_US: u32 = 100_000;

/// The entry point: the VMM starts every vCPU here with RDI = its boot-info page and
/// RSI = its index, on its own stack.
///
/// # Safety
///
/// Called only by the VMM, as the boot contract in `abi.rs` says.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _start(boot_info: *const BootInfo, vcpu_index: u64) -> ! {
    // SAFETY: the VMM passes in RDI this vCPU's boot-info page (or null), written before
    // the vCPU started and never changed after.
    let boot = match unsafe { Boot::from_raw(boot_info, vcpu_index) } {
        Ok(boot) => boot,
        Err(err) => boot_failed(err, vcpu_index),
    };
    match workloads::parse(&boot) {
        Ok(workload) => workloads::run(&boot, workload),
        Err(err) if boot.is_leader() => {
            println!("error: {err}");
            ports::exit(EXIT_BAD_ARGS)
        }
        // vCPU 0 parses the same command line, reports and stops the VM.
        Err(_) => ports::idle_forever(),
    }
}

fn boot_failed(err: BootError, vcpu_index: u64) -> ! {
    if vcpu_index == 0 {
        println!("error: {err}");
    } else {
        ports::idle(BOOT_ERROR_GRACE_US);
    }
    ports::exit(EXIT_BAD_BOOT)
}
