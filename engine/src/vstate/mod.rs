//! KVM state: guest memory, the VM, and the vCPU threads with their run-state machine.

pub mod bitmap;
pub mod dirty;
pub mod dirty_ring;
pub mod memory;
pub mod pagemap;
pub mod vcpu;
pub mod vm;
