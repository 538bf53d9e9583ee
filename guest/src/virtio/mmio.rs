//! The virtio 1.x "modern" MMIO transport (virtio 1.2, section 4.2.2): register offsets
//! and volatile 32-bit access to one device's register window.

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) transport; 1 is the legacy one, which this driver does not do.
pub const VERSION_MODERN: u32 = 2;

pub const MAGIC_VALUE: usize = 0x000;
pub const VERSION: usize = 0x004;
pub const DEVICE_ID: usize = 0x008;
pub const DEVICE_FEATURES: usize = 0x010;
pub const DEVICE_FEATURES_SEL: usize = 0x014;
pub const DRIVER_FEATURES: usize = 0x020;
pub const DRIVER_FEATURES_SEL: usize = 0x024;
pub const QUEUE_SEL: usize = 0x030;
pub const QUEUE_NUM_MAX: usize = 0x034;
pub const QUEUE_NUM: usize = 0x038;
pub const QUEUE_READY: usize = 0x044;
pub const QUEUE_NOTIFY: usize = 0x050;
// InterruptStatus (0x060) and InterruptACK (0x064) stay unused: the driver polls.
pub const STATUS: usize = 0x070;
pub const QUEUE_DESC_LOW: usize = 0x080;
pub const QUEUE_DESC_HIGH: usize = 0x084;
pub const QUEUE_DRIVER_LOW: usize = 0x090;
pub const QUEUE_DRIVER_HIGH: usize = 0x094;
pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
pub const CONFIG_GENERATION: usize = 0x0fc;
/// Device-specific configuration space.
pub const CONFIG: usize = 0x100;

/// Device status bits (section 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

/// One device's register window.
#[derive(Clone, Copy, Debug)]
pub struct Regs {
    base: usize,
}

impl Regs {
    /// # Safety
    ///
    /// `base` is the identity-mapped, user-accessible address of a virtio-mmio register
    /// window of at least 0x200 bytes that only this `Regs` (and its copies) drives.
    pub unsafe fn new(base: u64) -> Self {
        Regs {
            base: base as usize,
        }
    }

    pub fn read(&self, offset: usize) -> u32 {
        debug_assert!(offset % 4 == 0 && offset < 0x200);
        // SAFETY: inside the register window promised by `new`, 4-byte aligned.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    pub fn write(&self, offset: usize, value: u32) {
        debug_assert!(offset % 4 == 0 && offset < 0x200);
        // SAFETY: inside the register window promised by `new`, 4-byte aligned.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    /// Writes a 64-bit guest-physical address into a LOW/HIGH register pair.
    pub fn write_addr(&self, low: usize, high: usize, addr: u64) {
        self.write(low, addr as u32);
        self.write(high, (addr >> 32) as u32);
    }

    /// Reads one byte of the device configuration space (byte access, as the spec
    /// allows for fields of that size).
    pub fn config_u8(&self, offset: usize) -> u8 {
        debug_assert!(offset < 0x100);
        // SAFETY: inside the register window promised by `new`.
        unsafe { ((self.base + CONFIG + offset) as *const u8).read_volatile() }
    }

    pub fn base(&self) -> u64 {
        self.base as u64
    }
}
