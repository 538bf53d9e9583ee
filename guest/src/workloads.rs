//! The workloads, chosen by `workload=` on the command line. Each one parses and checks
//! its own keys (any error is reported before anything runs), then runs on every vCPU.

mod counter;
mod crash;
mod dirty;
mod disk;
mod hash;
mod kv;

use crate::args::{self, ArgError, Size};
use crate::boot::Boot;

/// The workload names, for error messages.
pub const NAMES: &str = "counter, dirty, hash, kv, disk, crash";

/// A workload with its checked parameters.
pub enum Workload {
    Counter(counter::Config),
    Crash(crash::Config),
    Dirty(dirty::Config),
    Disk(disk::Config),
    Hash(hash::Config),
    Kv(kv::Config),
}

/// Reads the command line of `boot`.
pub fn parse(boot: &Boot) -> Result<Workload, ArgError<'static>> {
    let cmdline = boot.cmdline;
    match args::workload(cmdline)? {
        counter::NAME => counter::Config::parse(cmdline).map(Workload::Counter),
        crash::NAME => crash::Config::parse(cmdline).map(Workload::Crash),
        dirty::NAME => dirty::Config::parse(cmdline, boot).map(Workload::Dirty),
        disk::NAME => disk::Config::parse(cmdline, boot).map(Workload::Disk),
        hash::NAME => hash::Config::parse(cmdline, boot).map(Workload::Hash),
        kv::NAME => kv::Config::parse(cmdline, boot).map(Workload::Kv),
        other => Err(ArgError::UnknownWorkload(other)),
    }
}

/// Runs `workload` on this vCPU. vCPU 0 ends the VM when the workload is done.
pub fn run(boot: &Boot, workload: Workload) -> ! {
    match workload {
        Workload::Counter(config) => counter::run(boot, &config),
        Workload::Crash(config) => crash::run(boot, &config),
        Workload::Dirty(config) => dirty::run(boot, &config),
        Workload::Disk(config) => disk::run(boot, &config),
        Workload::Hash(config) => hash::run(boot, &config),
        Workload::Kv(config) => kv::run(boot, &config),
    }
}

/// Checks that a working set of `wss` bytes fits in free RAM.
fn check_fits<'a>(wss: Size<'a>, boot: &Boot) -> Result<(), ArgError<'a>> {
    if wss.bytes > boot.free_bytes() {
        return Err(ArgError::DoesNotFit {
            wss: wss.text,
            free: boot.free_bytes(),
        });
    }
    Ok(())
}
