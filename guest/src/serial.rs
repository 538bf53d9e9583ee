//! Polled output to the 16550 UART at `SERIAL_PORT`, and the `print!`/`println!` macros.
//!
//! Only vCPU 0 prints in normal operation; a spin lock keeps lines whole should a panic
//! on another vCPU print at the same time.

use core::fmt;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::abi::SERIAL_PORT;
use crate::ports::{inb, outb};

/// Line status register.
const LSR: u16 = SERIAL_PORT + 5;
/// LSR bit: the transmit holding register is empty.
const LSR_THRE: u8 = 1 << 5;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Writes one byte, waiting until the transmitter can take it.
pub fn write_byte(byte: u8) {
    while inb(LSR) & LSR_THRE == 0 {
        spin_loop();
    }
    outb(SERIAL_PORT, byte);
}

/// The serial port as a `fmt::Write` sink. Takes no lock: see [`print_locked`].
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(write_byte);
        Ok(())
    }
}

/// Holds the serial lock while alive.
pub struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

/// Takes the serial lock. With `max_spins`, gives up after that many attempts and
/// returns `None` (the panic path must not wait forever for a vCPU that will never
/// release it).
pub fn lock(max_spins: Option<u64>) -> Option<Guard> {
    let mut spins = 0u64;
    loop {
        if LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Some(Guard);
        }
        spins += 1;
        if max_spins.is_some_and(|max| spins >= max) {
            return None;
        }
        spin_loop();
    }
}

/// Prints formatted text under the serial lock (the back end of `print!`).
pub fn print_locked(args: fmt::Arguments<'_>) {
    let _guard = lock(None);
    // Serial::write_str never fails.
    let _ = fmt::write(&mut Serial, args);
}

/// Prints to the serial port.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::print_locked(format_args!($($arg)*))
    };
}

/// Prints to the serial port, ending the line with `\n`.
#[macro_export]
macro_rules! println {
    () => {
        $crate::print!("\n")
    };
    ($($arg:tt)*) => {
        $crate::serial::print_locked(format_args!("{}\n", format_args!($($arg)*)))
    };
}
