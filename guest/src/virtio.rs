//! virtio devices over the modern MMIO transport, driven by polling.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
