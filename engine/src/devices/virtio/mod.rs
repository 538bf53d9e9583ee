//! virtio 1.x devices over the MMIO transport (virtio 1.2, section 4.2).
//!
//! The guest polls used rings and never takes an interrupt, so there is no interrupt line:
//! a device that has something for the guest wakes vCPUs parked on the idle port instead.

pub mod block;
pub mod mmio;
pub mod net;

use thiserror::Error;
use virtio_queue::{Queue, QueueState};

use crate::vstate::memory::GuestMemory;

/// VIRTIO_F_VERSION_1: the modern interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A device behind an [`mmio::MmioTransport`].
pub trait VirtioDevice: Send {
    /// The virtio device ID (virtio 1.2 section 5).
    fn device_id(&self) -> u32;
    /// Feature bits offered (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads `data.len()` bytes of the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver wrote `queue`'s notify register (or the device wants to make progress).
    fn notify(&mut self, queue: usize, queues: &mut [Queue], mem: &GuestMemory);
    /// The device's own saved state (beyond the transport's), encoded for
    /// [`VirtioState::device`].
    fn save(&self) -> Vec<u8>;
    /// Loads what [`VirtioDevice::save`] produced.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), DeviceStateError>;
}

/// A device's saved state that cannot be loaded into this device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceStateError {
    /// The saved state is not one this device type writes.
    #[error("saved {device} state is malformed: {len} bytes")]
    Malformed {
        /// The device type.
        device: &'static str,
        /// The length of the saved state.
        len: usize,
    },
    /// The saved virtio-net device had another MAC than the one configured now.
    #[error("saved virtio-net MAC {saved} differs from --net mac={configured}")]
    MacMismatch {
        /// The saved MAC, `aa:bb:cc:dd:ee:ff`.
        saved: String,
        /// The configured MAC.
        configured: String,
    },
    /// The saved virtio-blk device had an image of another capacity or mode than the one
    /// configured now.
    #[error("saved virtio-blk image {saved} differs from --disk {configured}")]
    DiskMismatch {
        /// The saved image: `PATH (N bytes[, read-only])`.
        saved: String,
        /// The configured image, the same way.
        configured: String,
    },
}

/// Saved transport or device state that cannot be restored.
#[derive(Debug, Error)]
pub enum VirtioRestoreError {
    /// The saved device is of another type, or has another number of queues.
    #[error(
        "saved virtio device {saved_id} with {saved_queues} queues does not match device \
         {device_id} with {queues}"
    )]
    Mismatch {
        /// The saved device ID (virtio 1.2 section 5).
        saved_id: u32,
        /// The saved number of queues.
        saved_queues: usize,
        /// This device's ID.
        device_id: u32,
        /// This device's number of queues.
        queues: usize,
    },
    /// A saved virtqueue fails virtio-queue's checks.
    #[error("saved virtqueue is invalid: {0:?}")]
    Queue(virtio_queue::Error),
    /// The device's own state.
    #[error(transparent)]
    Device(#[from] DeviceStateError),
}

/// The transport's state plus the device's, as saved in snapshots and checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtioState {
    /// The device ID.
    pub device_id: u32,
    /// The device status register (virtio 1.2 section 2.1).
    pub status: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// Which 32 bits of the device features the driver reads.
    pub device_features_sel: u32,
    /// Which 32 bits of the driver features the driver writes.
    pub driver_features_sel: u32,
    /// The queue the driver addresses.
    pub queue_sel: u32,
    /// Interrupt status bits (never raised: the guest polls).
    pub interrupt_status: u32,
    /// Configuration generation counter.
    pub config_generation: u32,
    /// Each virtqueue's state, in queue order.
    pub queues: Vec<QueueState>,
    /// The device's own state, as [`VirtioDevice::save`] encoded it.
    pub device: Vec<u8>,
}
