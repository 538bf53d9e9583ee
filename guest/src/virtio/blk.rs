//! A polled virtio-blk driver (virtio 1.2, section 5.2) over the modern MMIO transport.
//!
//! One request queue, one request in flight at a time: descriptor 0 holds the 16-byte
//! header (`type`, `reserved`, `sector`), descriptor 1 the data (the caller's buffer,
//! device-writable for reads), descriptor 2 the status byte; the driver publishes the
//! chain, writes QueueNotify and polls the used ring, parking on the idle port between
//! looks (the VMM wakes it when the device completes). The driver accepts
//! `VIRTIO_F_VERSION_1`, `VIRTIO_BLK_F_FLUSH` and `VIRTIO_BLK_F_RO` when offered.
//!
//! A used entry that shows up while no request is in flight means the device completed a
//! request twice: every later call fails with [`IoError::Duplicate`].

use core::fmt;

use super::mmio::{self, Regs};
use super::queue::{pages, Queue, DESC_F_WRITE};
use crate::abi::VIRTIO_ID_BLOCK;
use crate::ports::idle;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;

/// Bytes per sector (capacity and request offsets count in them).
pub const SECTOR: u64 = 512;
/// Length of the device ID string.
pub const ID_LEN: usize = 20;
const QUEUE_SIZE: u32 = 16;
/// The longest the driver parks between two looks at the used ring.
const POLL_US: u32 = 1000;

/// Why the device could not be brought up. Printed as the `error: ...` line.
#[derive(Clone, Copy, Debug)]
pub enum BlkError {
    Magic { base: u64, magic: u32 },
    Version { base: u64, version: u32 },
    DeviceId { base: u64, id: u32 },
    NoVersion1 { base: u64, features: u64 },
    FeaturesRefused { base: u64 },
    Queue { base: u64 },
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BlkError::Magic { base, magic } => {
                write!(f, "virtio-blk at {base:#x}: bad magic {magic:#010x}")
            }
            BlkError::Version { base, version } => write!(
                f,
                "virtio-blk at {base:#x}: virtio-mmio version {version}, this driver needs version 2 (virtio 1.x)"
            ),
            BlkError::DeviceId { base, id } => write!(
                f,
                "virtio-blk at {base:#x}: device id {id}, expected {VIRTIO_ID_BLOCK} (block)"
            ),
            BlkError::NoVersion1 { base, features } => write!(
                f,
                "virtio-blk at {base:#x}: the device does not offer VIRTIO_F_VERSION_1 (features {features:#x})"
            ),
            BlkError::FeaturesRefused { base } => write!(
                f,
                "virtio-blk at {base:#x}: the device did not accept the features (FEATURES_OK not set)"
            ),
            BlkError::Queue { base } => write!(
                f,
                "virtio-blk at {base:#x}: queue 0 is missing or already ready after a reset"
            ),
        }
    }
}

/// A request that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The device answered with this status (1 IOERR, 2 UNSUPP).
    Status(u8),
    /// The request is outside the disk or not whole sectors (checked before sending).
    Range,
    /// The disk is read-only.
    ReadOnly,
    /// The device completed a request twice, or one that was never made.
    Duplicate,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Status(s) => write!(f, "the device answered status {s}"),
            IoError::Range => write!(f, "outside the disk or not whole sectors"),
            IoError::ReadOnly => write!(f, "the disk is read-only"),
            IoError::Duplicate => write!(
                f,
                "the device completed a request twice (a used entry with none in flight)"
            ),
        }
    }
}

/// The request header (section 5.2.6), in its own page with the status byte.
#[repr(C)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// A brought-up virtio-blk device.
pub struct VirtioBlk {
    regs: Regs,
    queue: Queue,
    /// The header at the page's start, the status byte at offset 64.
    page: *mut u8,
    sectors: u64,
    readonly: bool,
    broken: bool,
}

impl VirtioBlk {
    /// Resets and initialises the device at `base` (section 3.1.1) and sets DRIVER_OK.
    ///
    /// # Safety
    ///
    /// `base` is the identity-mapped register window of a virtio-mmio device from the
    /// boot info, which nothing else drives; the heap is initialised.
    pub unsafe fn new(base: u64) -> Result<VirtioBlk, BlkError> {
        // SAFETY: as promised by the caller.
        let regs = unsafe { Regs::new(base) };
        let magic = regs.read(mmio::MAGIC_VALUE);
        if magic != mmio::MAGIC {
            return Err(BlkError::Magic { base, magic });
        }
        let version = regs.read(mmio::VERSION);
        if version != mmio::VERSION_MODERN {
            return Err(BlkError::Version { base, version });
        }
        let id = regs.read(mmio::DEVICE_ID);
        if id != VIRTIO_ID_BLOCK {
            return Err(BlkError::DeviceId { base, id });
        }
        regs.write(mmio::STATUS, 0);
        let mut status = mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER;
        regs.write(mmio::STATUS, mmio::STATUS_ACKNOWLEDGE);
        regs.write(mmio::STATUS, status);
        let mut offered = 0u64;
        for sel in 0..2 {
            regs.write(mmio::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(regs.read(mmio::DEVICE_FEATURES)) << (32 * sel);
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            regs.write(mmio::STATUS, status | mmio::STATUS_FAILED);
            return Err(BlkError::NoVersion1 {
                base,
                features: offered,
            });
        }
        let accepted = offered & (VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_RO);
        for sel in 0..2 {
            regs.write(mmio::DRIVER_FEATURES_SEL, sel);
            regs.write(mmio::DRIVER_FEATURES, (accepted >> (32 * sel)) as u32);
        }
        status |= mmio::STATUS_FEATURES_OK;
        regs.write(mmio::STATUS, status);
        if regs.read(mmio::STATUS) & mmio::STATUS_FEATURES_OK == 0 {
            regs.write(mmio::STATUS, status | mmio::STATUS_FAILED);
            return Err(BlkError::FeaturesRefused { base });
        }
        regs.write(mmio::QUEUE_SEL, 0);
        let max = regs.read(mmio::QUEUE_NUM_MAX).min(QUEUE_SIZE);
        if max < 4 || regs.read(mmio::QUEUE_READY) != 0 {
            regs.write(mmio::STATUS, status | mmio::STATUS_FAILED);
            return Err(BlkError::Queue { base });
        }
        let size = 1u16 << (31 - max.leading_zeros());
        let queue = Queue::new(size);
        regs.write(mmio::QUEUE_NUM, u32::from(size));
        let (desc, driver, device) = queue.addresses();
        regs.write_addr(mmio::QUEUE_DESC_LOW, mmio::QUEUE_DESC_HIGH, desc);
        regs.write_addr(mmio::QUEUE_DRIVER_LOW, mmio::QUEUE_DRIVER_HIGH, driver);
        regs.write_addr(mmio::QUEUE_DEVICE_LOW, mmio::QUEUE_DEVICE_HIGH, device);
        regs.write(mmio::QUEUE_READY, 1);
        let sectors = read_capacity(regs);
        regs.write(mmio::STATUS, status | mmio::STATUS_DRIVER_OK);
        Ok(VirtioBlk {
            regs,
            queue,
            page: pages(4096),
            sectors,
            readonly: accepted & VIRTIO_BLK_F_RO != 0,
            broken: false,
        })
    }

    /// The disk's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// Whether the device is read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Reads `buf.len()` bytes (whole sectors) from byte `offset` (a sector multiple).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.check(offset, buf.len())?;
        self.request(
            T_IN,
            offset / SECTOR,
            Some((buf.as_mut_ptr() as u64, buf.len(), true)),
        )
    }

    /// Writes `buf` (whole sectors) at byte `offset` (a sector multiple).
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        if self.readonly {
            return Err(IoError::ReadOnly);
        }
        self.check(offset, buf.len())?;
        self.request(
            T_OUT,
            offset / SECTOR,
            Some((buf.as_ptr() as u64, buf.len(), false)),
        )
    }

    /// Makes every completed write durable (VIRTIO_BLK_T_FLUSH).
    pub fn flush(&mut self) -> Result<(), IoError> {
        self.request(T_FLUSH, 0, None)
    }

    /// The device's ID string (GET_ID), NUL-padded.
    pub fn id(&mut self) -> Result<[u8; ID_LEN], IoError> {
        let mut id = [0u8; ID_LEN];
        self.request(T_GET_ID, 0, Some((id.as_mut_ptr() as u64, ID_LEN, true)))?;
        Ok(id)
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), IoError> {
        let len = len as u64;
        if offset % SECTOR != 0 || len % SECTOR != 0 || len == 0 {
            return Err(IoError::Range);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity() => Ok(()),
            _ => Err(IoError::Range),
        }
    }

    /// Sends one request and waits for its completion. `data`: guest address, length,
    /// whether the device writes it.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(u64, usize, bool)>,
    ) -> Result<(), IoError> {
        if self.broken || self.queue.has_used() {
            self.broken = true;
            return Err(IoError::Duplicate);
        }
        let header = self.page.cast::<Header>();
        // SAFETY: the page belongs to this driver; the device reads it only while a
        // request is in flight, and none is.
        let status = unsafe {
            header.write_volatile(Header {
                kind,
                reserved: 0,
                sector,
            });
            let status = self.page.add(64);
            status.write_volatile(0xff);
            status
        };
        let header_addr = header as u64;
        match data {
            Some((addr, len, writes)) => {
                let flags = if writes { DESC_F_WRITE } else { 0 };
                self.queue.set_chained(0, header_addr, 16, 0, 1);
                self.queue.set_chained(1, addr, len as u32, flags, 2);
            }
            None => self.queue.set_chained(0, header_addr, 16, 0, 2),
        }
        self.queue.set_desc(2, status as u64, 1, DESC_F_WRITE);
        self.queue.push(0);
        self.queue.publish();
        self.regs.write(mmio::QUEUE_NOTIFY, 0);
        let (id, _len) = loop {
            if let Some(used) = self.queue.pop_used() {
                break used;
            }
            idle(POLL_US);
        };
        if id != 0 || self.queue.has_used() {
            self.broken = true;
            return Err(IoError::Duplicate);
        }
        // SAFETY: the device completed the request, so it no longer writes the status.
        match unsafe { status.read_volatile() } {
            S_OK => Ok(()),
            s => Err(IoError::Status(s)),
        }
    }
}

/// `capacity` (le64 at config offset 0), read under ConfigGeneration.
fn read_capacity(regs: Regs) -> u64 {
    loop {
        let generation = regs.read(mmio::CONFIG_GENERATION);
        let mut bytes = [0u8; 8];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = regs.config_u8(i);
        }
        if regs.read(mmio::CONFIG_GENERATION) == generation {
            return u64::from_le_bytes(bytes);
        }
    }
}
