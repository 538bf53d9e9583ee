//! A polled virtio-net driver (virtio 1.2, section 5.1) over the modern MMIO transport,
//! and its `smoltcp` `phy::Device` face.
//!
//! Queue 0 receives, queue 1 transmits. The driver accepts exactly `VIRTIO_F_VERSION_1`
//! and `VIRTIO_NET_F_MAC`: no offloads, no mergeable buffers, no event index, no
//! interrupts. Every buffer starts with the 12-byte `virtio_net_hdr_v1`, all zero on
//! transmit and ignored on receive. Receive buffers are posted once and recycled after
//! smoltcp has read them; a transmit buffer is one descriptor with header and frame
//! together, reclaimed from the used ring (the device usually completes it during the
//! QueueNotify write, but may do it later, e.g. when its egress buffer is full).

use alloc::alloc::{alloc_zeroed, Layout};
use alloc::vec::Vec;
use core::fmt;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::mmio::{self, Regs};
use super::queue::{Queue, DESC_F_WRITE};
use crate::abi::VIRTIO_ID_NET;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
const MAX_QUEUE_SIZE: u32 = 256;
/// Receive buffers posted at once.
const RX_BUFFERS: u16 = 128;
/// Bytes per buffer: header plus the largest frame without offloads, rounded up.
const BUF_SIZE: usize = 2048;
/// `virtio_net_hdr_v1` with `VIRTIO_F_VERSION_1`.
const HDR_LEN: usize = 12;
/// The largest Ethernet frame (header included) this driver sends or takes.
pub const MTU: usize = 1514;

/// The MAC address used when the device does not offer one.
const FALLBACK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// Why the device could not be brought up. Printed as the `error: ...` line.
#[derive(Clone, Copy, Debug)]
pub enum NetError {
    Magic { base: u64, magic: u32 },
    Version { base: u64, version: u32 },
    DeviceId { base: u64, id: u32 },
    NoVersion1 { base: u64, features: u64 },
    FeaturesRefused { base: u64 },
    QueueBusy { base: u64, queue: u32 },
    QueueMissing { base: u64, queue: u32 },
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NetError::Magic { base, magic } => write!(
                f,
                "virtio-net at {base:#x}: bad magic {magic:#010x} (expected {:#010x})",
                mmio::MAGIC
            ),
            NetError::Version { base, version } => write!(
                f,
                "virtio-net at {base:#x}: virtio-mmio version {version}, this driver needs version 2 (virtio 1.x)"
            ),
            NetError::DeviceId { base, id } => write!(
                f,
                "virtio-net at {base:#x}: device id {id}, expected {VIRTIO_ID_NET} (net)"
            ),
            NetError::NoVersion1 { base, features } => write!(
                f,
                "virtio-net at {base:#x}: the device does not offer VIRTIO_F_VERSION_1 (features {features:#x})"
            ),
            NetError::FeaturesRefused { base } => write!(
                f,
                "virtio-net at {base:#x}: the device did not accept features VERSION_1|MAC (FEATURES_OK not set)"
            ),
            NetError::QueueBusy { base, queue } => write!(
                f,
                "virtio-net at {base:#x}: queue {queue} is already ready after a reset"
            ),
            NetError::QueueMissing { base, queue } => write!(
                f,
                "virtio-net at {base:#x}: queue {queue} is not available (QueueNumMax = 0)"
            ),
        }
    }
}

/// The receive side: queue 0 and its buffers.
struct Rx {
    regs: Regs,
    queue: Queue,
    buffers: *mut u8,
    /// Buffers given back since the last notification.
    recycled: bool,
}

/// The transmit side: queue 1, its buffers and the descriptors not in flight.
struct Tx {
    regs: Regs,
    queue: Queue,
    buffers: *mut u8,
    free: Vec<u16>,
}

/// A brought-up virtio-net device.
pub struct VirtioNet {
    mac: [u8; 6],
    rx: Rx,
    tx: Tx,
}

/// `count` buffers of `BUF_SIZE` bytes, zeroed, for the rest of the guest's life.
fn buffers(count: u16) -> *mut u8 {
    let layout = Layout::from_size_align(usize::from(count) * BUF_SIZE, 4096).expect("layout");
    // SAFETY: a non-zero size with a power-of-two alignment.
    let ptr = unsafe { alloc_zeroed(layout) };
    if ptr.is_null() {
        alloc::alloc::handle_alloc_error(layout);
    }
    ptr
}

impl VirtioNet {
    /// Resets and initialises the device at `base` (section 3.1.1), posts the receive
    /// buffers and sets DRIVER_OK.
    ///
    /// # Safety
    ///
    /// `base` is the identity-mapped register window of a virtio-mmio device from the
    /// boot info, which nothing else drives.
    pub unsafe fn new(base: u64) -> Result<VirtioNet, NetError> {
        // SAFETY: as promised by the caller.
        let regs = unsafe { Regs::new(base) };
        let magic = regs.read(mmio::MAGIC_VALUE);
        if magic != mmio::MAGIC {
            return Err(NetError::Magic { base, magic });
        }
        let version = regs.read(mmio::VERSION);
        if version != mmio::VERSION_MODERN {
            return Err(NetError::Version { base, version });
        }
        let id = regs.read(mmio::DEVICE_ID);
        if id != VIRTIO_ID_NET {
            return Err(NetError::DeviceId { base, id });
        }

        regs.write(mmio::STATUS, 0);
        let mut status = mmio::STATUS_ACKNOWLEDGE;
        regs.write(mmio::STATUS, status);
        status |= mmio::STATUS_DRIVER;
        regs.write(mmio::STATUS, status);

        let mut offered = 0u64;
        for sel in 0..2 {
            regs.write(mmio::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(regs.read(mmio::DEVICE_FEATURES)) << (32 * sel);
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            regs.write(mmio::STATUS, status | mmio::STATUS_FAILED);
            return Err(NetError::NoVersion1 {
                base,
                features: offered,
            });
        }
        let accepted = offered & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        for sel in 0..2 {
            regs.write(mmio::DRIVER_FEATURES_SEL, sel);
            regs.write(mmio::DRIVER_FEATURES, (accepted >> (32 * sel)) as u32);
        }
        status |= mmio::STATUS_FEATURES_OK;
        regs.write(mmio::STATUS, status);
        if regs.read(mmio::STATUS) & mmio::STATUS_FEATURES_OK == 0 {
            regs.write(mmio::STATUS, status | mmio::STATUS_FAILED);
            return Err(NetError::FeaturesRefused { base });
        }

        let fail = |err| {
            regs.write(mmio::STATUS, status | mmio::STATUS_FAILED);
            Err(err)
        };
        let rx_queue = match setup_queue(regs, RX_QUEUE) {
            Ok(queue) => queue,
            Err(err) => return fail(err),
        };
        let tx_queue = match setup_queue(regs, TX_QUEUE) {
            Ok(queue) => queue,
            Err(err) => return fail(err),
        };

        let mac = if accepted & VIRTIO_NET_F_MAC != 0 {
            read_mac(regs)
        } else {
            FALLBACK_MAC
        };

        let rx_count = RX_BUFFERS.min(rx_queue.size());
        let tx_count = tx_queue.size();
        let mut net = VirtioNet {
            mac,
            rx: Rx {
                regs,
                queue: rx_queue,
                buffers: buffers(rx_count),
                recycled: false,
            },
            tx: Tx {
                regs,
                queue: tx_queue,
                buffers: buffers(tx_count),
                free: (0..tx_count).rev().collect(),
            },
        };
        for id in 0..rx_count {
            let addr = net.rx.buffer(id) as u64;
            net.rx
                .queue
                .set_desc(id, addr, BUF_SIZE as u32, DESC_F_WRITE);
            net.rx.queue.push(id);
        }
        net.rx.queue.publish();

        status |= mmio::STATUS_DRIVER_OK;
        regs.write(mmio::STATUS, status);
        regs.write(mmio::QUEUE_NOTIFY, RX_QUEUE);
        Ok(net)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether a received frame waits in the receive queue and can be taken now (smoltcp
    /// takes a frame only with a free transmit buffer for its answer; while the device
    /// holds them all, e.g. when output commit holds the egress, the frame waits).
    pub fn rx_ready(&mut self) -> bool {
        if !self.rx.queue.has_used() {
            return false;
        }
        self.tx.reclaim();
        !self.tx.free.is_empty()
    }

    /// Tells the device about receive buffers given back since the last call.
    pub fn flush(&mut self) {
        if self.rx.recycled {
            self.rx.recycled = false;
            self.rx.regs.write(mmio::QUEUE_NOTIFY, RX_QUEUE);
        }
    }
}

/// Sets up queue `index` (section 4.2.3.2): size min(QueueNumMax, 256) rounded down to a
/// power of two, rings in fresh page-aligned RAM, then QueueReady.
fn setup_queue(regs: Regs, index: u32) -> Result<Queue, NetError> {
    let base = regs.base();
    regs.write(mmio::QUEUE_SEL, index);
    if regs.read(mmio::QUEUE_READY) != 0 {
        return Err(NetError::QueueBusy { base, queue: index });
    }
    let max = regs.read(mmio::QUEUE_NUM_MAX).min(MAX_QUEUE_SIZE);
    if max == 0 {
        return Err(NetError::QueueMissing { base, queue: index });
    }
    let size = 1u16 << (31 - max.leading_zeros());
    let queue = Queue::new(size);
    regs.write(mmio::QUEUE_NUM, u32::from(size));
    let (desc, driver, device) = queue.addresses();
    regs.write_addr(mmio::QUEUE_DESC_LOW, mmio::QUEUE_DESC_HIGH, desc);
    regs.write_addr(mmio::QUEUE_DRIVER_LOW, mmio::QUEUE_DRIVER_HIGH, driver);
    regs.write_addr(mmio::QUEUE_DEVICE_LOW, mmio::QUEUE_DEVICE_HIGH, device);
    regs.write(mmio::QUEUE_READY, 1);
    Ok(queue)
}

/// Reads `mac` from the device configuration, retrying if the device changed the
/// configuration meanwhile (ConfigGeneration, section 4.2.2.2).
fn read_mac(regs: Regs) -> [u8; 6] {
    loop {
        let generation = regs.read(mmio::CONFIG_GENERATION);
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = regs.config_u8(i);
        }
        if regs.read(mmio::CONFIG_GENERATION) == generation {
            return mac;
        }
    }
}

impl Rx {
    fn buffer(&self, id: u16) -> *mut u8 {
        // SAFETY: `id` is below the number of buffers allocated (the descriptors the
        // driver set up), so the offset stays inside the allocation.
        unsafe { self.buffers.add(usize::from(id) * BUF_SIZE) }
    }

    fn recycle(&mut self, id: u16) {
        self.queue.push(id);
        self.queue.publish();
        self.recycled = true;
    }
}

impl Tx {
    /// Takes back the buffers the device has finished sending.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.queue.pop_used() {
            self.free.push(id);
        }
    }

    fn send(&mut self, id: u16, len: usize, fill: impl FnOnce(&mut [u8])) {
        // SAFETY: `id` came off the free list, so the device does not own this buffer;
        // it lies inside the allocation of `tx_count` buffers.
        let buffer = unsafe {
            core::slice::from_raw_parts_mut(self.buffers.add(usize::from(id) * BUF_SIZE), BUF_SIZE)
        };
        buffer[..HDR_LEN].fill(0);
        fill(&mut buffer[HDR_LEN..HDR_LEN + len]);
        self.queue
            .set_desc(id, buffer.as_ptr() as u64, (HDR_LEN + len) as u32, 0);
        self.queue.push(id);
        self.queue.publish();
        self.regs.write(mmio::QUEUE_NOTIFY, TX_QUEUE);
        self.reclaim();
    }
}

/// A received frame; its buffer goes back to the device once smoltcp has read it.
pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
}

/// Room for one frame to send: a free transmit buffer, taken when the token is used.
pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let len = self.len.clamp(HDR_LEN, BUF_SIZE);
        // SAFETY: the device has used this buffer (it came off the used ring) and does
        // not touch it again until it is recycled below; `len` is clamped to the buffer.
        let frame = unsafe { core::slice::from_raw_parts(self.rx.buffer(self.id), len) };
        let result = f(&frame[HDR_LEN..]);
        self.rx.recycle(self.id);
        result
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        assert!(len <= MTU, "smoltcp sent a frame of {len} bytes");
        let id = self
            .tx
            .free
            .pop()
            .expect("a token exists only with a free buffer");
        let mut result = None;
        self.tx.send(id, len, |frame| result = Some(f(frame)));
        result.expect("send calls the closure")
    }
}

impl Tx {
    fn token(&mut self) -> Option<TxToken<'_>> {
        if self.free.is_empty() {
            self.reclaim();
        }
        if self.free.is_empty() {
            return None;
        }
        Some(TxToken { tx: self })
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if !self.rx.queue.has_used() {
            return None;
        }
        // Hold back the frame when no transmit buffer is free: smoltcp needs both.
        let tx = self.tx.token()?;
        let (id, len) = self.rx.queue.pop_used()?;
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len: len as usize,
            },
            tx,
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        self.tx.token()
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}
