//! lockstep's VMM.
//!
//! `vstate` owns KVM (the VM, guest memory, the vCPU threads and their run-state machine),
//! `boot` enters the reference guest per the contract in [`boot::abi`], `devices` holds the
//! emulated devices, `persist` the versioned state format, and [`machine`] ties them
//! together into a VM that can be started, paused, captured and restored.

#![warn(missing_docs)]

pub mod boot;
pub mod devices;
pub mod log;
pub mod machine;
pub mod persist;
pub mod pidfile;
pub mod replication;
pub mod size;
pub mod snapshot;
pub mod vstate;

/// The reference guest, built by `build.rs` and embedded in the binary.
pub static BUILTIN_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lockstep-guest"));
