//! Guest time. With kvmclock (the VMM turned it on and put the address of this vCPU's
//! record in the boot info), nanoseconds from KVM's paravirtual clock, which goes on from
//! where it was captured after a snapshot is restored or a backup promoted. Without it,
//! the raw TSC at the frequency the boot info gives, which on some hypervisors (ours:
//! PVM) keeps running while a snapshot sits on disk.

use core::arch::x86_64::_rdtsc;
use core::ptr::{addr_of, read_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::abi::PvClockTimeInfo;
use crate::boot::Boot;

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc reads a counter and touches no memory; CR4.TSD is clear, so it is
    // allowed at CPL3.
    unsafe { _rdtsc() }
}

/// Where this vCPU reads the time from.
#[derive(Clone, Copy, Debug)]
pub struct TimeSource {
    /// This vCPU's kvmclock record (0: none).
    pvclock: u64,
    tsc_khz: u64,
}

impl TimeSource {
    /// This vCPU's clock, as the boot info describes it.
    pub fn new(boot: &Boot) -> Self {
        TimeSource {
            pvclock: boot.kvmclock,
            tsc_khz: boot.tsc_khz,
        }
    }

    /// Nanoseconds since the clock's origin (VM creation for kvmclock).
    pub fn now_ns(&self) -> u64 {
        if self.pvclock == 0 {
            return (u128::from(rdtsc()) * 1_000_000 / u128::from(self.tsc_khz)) as u64;
        }
        let p = self.pvclock as *const PvClockTimeInfo;
        loop {
            // SAFETY: `Boot::from_raw` checked that the record lies aligned inside RAM (in
            // this vCPU's boot-info page); KVM writes it, so it is read volatile, under
            // the version protocol of `pvclock_vcpu_time_info` (odd: being updated).
            let version = unsafe { read_volatile(addr_of!((*p).version)) };
            if version & 1 != 0 {
                continue;
            }
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let info = unsafe { read_volatile(p) };
            let tsc = rdtsc();
            fence(Ordering::Acquire);
            // SAFETY: as above.
            if unsafe { read_volatile(addr_of!((*p).version)) } == version {
                return pvclock_ns(&info, tsc);
            }
        }
    }
}

/// `system_time` plus the TSC ticks since `tsc_timestamp` in nanoseconds, as KVM defines
/// the record.
pub fn pvclock_ns(info: &PvClockTimeInfo, tsc: u64) -> u64 {
    let mut delta = tsc.wrapping_sub(info.tsc_timestamp);
    if info.tsc_shift < 0 {
        delta >>= -i32::from(info.tsc_shift);
    } else {
        delta <<= info.tsc_shift;
    }
    let scaled = (u128::from(delta) * u128::from(info.tsc_to_system_mul)) >> 32;
    info.system_time.wrapping_add(scaled as u64)
}

/// Guest time measured from a starting point.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    source: TimeSource,
    start_ns: u64,
}

impl Clock {
    /// A clock whose zero is `start_ns` of `source`'s time.
    pub fn new(source: TimeSource, start_ns: u64) -> Self {
        Clock { source, start_ns }
    }

    /// A clock whose zero is now.
    pub fn starting_now(source: TimeSource) -> Self {
        Clock::new(source, source.now_ns())
    }

    /// Nanoseconds since the start (zero before it).
    pub fn ns(&self) -> u64 {
        self.source.now_ns().saturating_sub(self.start_ns)
    }

    /// Whole microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.ns() / 1000
    }

    /// Whole milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        self.ns() / 1_000_000
    }

    /// Microseconds from now until guest millisecond `ms` begins (zero if it has).
    pub fn us_until_ms(&self, ms: u64) -> u64 {
        ms.saturating_mul(1_000_000).saturating_sub(self.ns()) / 1000
    }
}
