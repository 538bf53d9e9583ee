//! Port I/O (allowed at CPL3: the VMM sets RFLAGS.IOPL = 3) and the VMM's control ports.

use core::arch::asm;

use crate::abi::{EXIT_PORT, IDLE_PORT};

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input touches no memory; IOPL = 3 makes it legal at CPL3.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output touches no guest memory; IOPL = 3 makes it legal at CPL3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes one 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Asks the VMM to stop the whole VM with `status`. Does not return.
pub fn exit(status: u32) -> ! {
    loop {
        outl(EXIT_PORT, status);
        // The VMM stops every vCPU once it has seen the write; should this vCPU run
        // again anyway, it repeats the request.
        idle(100_000);
    }
}

/// Parks this vCPU in the VMM for at most `us` microseconds, or until a device has
/// something for the guest (the guest's `hlt`).
pub fn idle(us: u32) {
    outl(IDLE_PORT, us);
}

/// Parks this vCPU for good: the VM ends when another vCPU writes the exit port.
pub fn idle_forever() -> ! {
    loop {
        idle(100_000);
    }
}
