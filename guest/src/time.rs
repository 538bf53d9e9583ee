//! Guest time from the TSC, scaled by the TSC frequency that the VMM puts in boot info.

use core::arch::x86_64::_rdtsc;

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc reads a counter and touches no memory; CR4.TSD is clear, so it is
    // allowed at CPL3.
    unsafe { _rdtsc() }
}

/// Guest time measured from a starting TSC value.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: u64,
    tsc_khz: u64,
}

impl Clock {
    /// A clock whose zero is the TSC value `start`. `tsc_khz` must not be zero.
    pub fn new(start: u64, tsc_khz: u64) -> Self {
        debug_assert!(tsc_khz != 0);
        Clock { start, tsc_khz }
    }

    /// TSC ticks since the start (zero before it).
    pub fn ticks(&self) -> u64 {
        rdtsc().saturating_sub(self.start)
    }

    /// Whole milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        self.ticks() / self.tsc_khz
    }

    /// Microseconds from now until guest millisecond `ms` begins (zero if it has).
    pub fn us_until_ms(&self, ms: u64) -> u64 {
        let target = ms.saturating_mul(self.tsc_khz);
        let left = target.saturating_sub(self.ticks());
        ((u128::from(left) * 1000) / u128::from(self.tsc_khz)) as u64
    }
}
