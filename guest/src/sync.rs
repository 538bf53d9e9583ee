//! Synchronisation across vCPUs: they share memory but take no interrupts, so waiting is
//! spinning, falling back to the idle port when the wait gets long.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::ports::idle;

/// Spins before the waiter starts parking in the VMM between checks.
const SPINS_BEFORE_IDLE: u32 = 1 << 14;
/// How long a waiter parks in the VMM between checks once spinning has not paid off.
const IDLE_US: u32 = 20;

/// A reusable barrier for a fixed number of vCPUs (generation counting).
pub struct Barrier {
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl Barrier {
    pub const fn new() -> Self {
        Barrier {
            arrived: AtomicU32::new(0),
            generation: AtomicU32::new(0),
        }
    }

    /// Waits until `count` vCPUs (every vCPU of the VM) have called `wait`. Everything a
    /// vCPU wrote before `wait` is visible to every vCPU after it.
    pub fn wait(&self, count: u32) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == count {
            // The others wait for the generation to move, so none can arrive again
            // before the count is reset.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if spins < SPINS_BEFORE_IDLE {
                spins += 1;
                spin_loop();
            } else {
                idle(IDLE_US);
            }
        }
    }
}
