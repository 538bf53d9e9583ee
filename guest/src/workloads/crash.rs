//! `workload=crash mode=panic|fault`: vCPU 0 fails on purpose, so that tests can check
//! how the VMM reports a failing guest. `panic` goes through the panic handler (status
//! 101); `fault` reads an address the boot page tables do not map, a page fault that the
//! guest (no IDT) cannot handle: the VMM sees a triple fault.

use crate::args::{self, ArgError};
use crate::boot::Boot;
use crate::ports::idle_forever;

pub const NAME: &str = "crash";

/// Canonical, but in a PML4 slot the boot page tables leave empty.
const UNMAPPED: u64 = 0x7f00_0000_0000;

pub enum Config {
    Panic,
    Fault,
}

impl Config {
    pub fn parse(cmdline: &str) -> Result<Self, ArgError<'_>> {
        let mut mode = None;
        args::parse_keys(cmdline, NAME, &["mode"], |key, value| {
            mode = Some(match value {
                "panic" => Config::Panic,
                "fault" => Config::Fault,
                _ => {
                    return Err(ArgError::Malformed {
                        key,
                        value,
                        expected: "panic or fault",
                    })
                }
            });
            Ok(())
        })?;
        mode.ok_or(ArgError::Missing {
            workload: NAME,
            key: "mode",
            placeholder: "panic|fault",
        })
    }
}

pub fn run(boot: &Boot, config: &Config) -> ! {
    if !boot.is_leader() {
        idle_forever();
    }
    match config {
        Config::Panic => panic!("workload=crash mode=panic"),
        Config::Fault => {
            // SAFETY: not sound on purpose: the read faults and the guest dies, which is
            // what this workload is for. Volatile, so the read is really issued.
            let value = unsafe { (UNMAPPED as *const u64).read_volatile() };
            panic!("read {value:#x} from unmapped {UNMAPPED:#x} without a fault")
        }
    }
}
