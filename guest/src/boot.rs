//! This vCPU's view of the boot-info page, checked once at entry.

use core::fmt;

use crate::abi::{
    BootInfo, PvClockTimeInfo, VirtioDeviceInfo, ABI_VERSION, BOOT_INFO_MAGIC, CMDLINE_MAX,
    MAX_VCPUS, MAX_VIRTIO, PAGE_SIZE,
};

/// What the VMM handed this vCPU, checked.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    pub vcpu_index: u32,
    pub vcpu_count: u32,
    pub ram_size: u64,
    /// First byte of free RAM (page aligned); free RAM ends at `ram_size`.
    pub heap_start: u64,
    pub tsc_khz: u64,
    /// This vCPU's kvmclock record (0: no kvmclock; time comes from the TSC).
    pub kvmclock: u64,
    pub cmdline: &'static str,
    /// The virtio-mmio devices the VMM gave the guest.
    pub virtio: &'static [VirtioDeviceInfo],
}

/// Why the boot-info page cannot be used. Printed as the `error: ...` line (status 3).
#[derive(Clone, Copy, Debug)]
pub enum BootError {
    Null,
    Magic(u32),
    Version(u32),
    Index { register: u64, page: u32 },
    Count(u32),
    Heap { heap_start: u64, ram_size: u64 },
    TscKhz,
    KvmClock(u64),
    CmdlineLen(u32),
    CmdlineUtf8,
    VirtioCount(u32),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BootError::Null => write!(f, "boot info: null pointer"),
            BootError::Magic(magic) => write!(
                f,
                "boot info: bad magic {magic:#010x} (expected {BOOT_INFO_MAGIC:#010x})"
            ),
            BootError::Version(version) => write!(
                f,
                "boot info: ABI version {version}, this guest speaks version {ABI_VERSION}"
            ),
            BootError::Index { register, page } => write!(
                f,
                "boot info: vCPU index {page} does not match the index {register} in RSI"
            ),
            BootError::Count(count) => {
                write!(f, "boot info: vcpu_count={count} (expected 1..={MAX_VCPUS})")
            }
            BootError::Heap {
                heap_start,
                ram_size,
            } => write!(
                f,
                "boot info: heap_start={heap_start:#x} is not a page-aligned address below ram_size={ram_size:#x}"
            ),
            BootError::TscKhz => write!(f, "boot info: tsc_khz=0"),
            BootError::KvmClock(addr) => write!(
                f,
                "boot info: kvmclock={addr:#x} is not a 32-byte aligned record inside RAM"
            ),
            BootError::CmdlineLen(len) => {
                write!(f, "boot info: cmdline_len={len} exceeds {CMDLINE_MAX}")
            }
            BootError::CmdlineUtf8 => write!(f, "boot info: the command line is not UTF-8"),
            BootError::VirtioCount(count) => {
                write!(f, "boot info: virtio_count={count} exceeds {MAX_VIRTIO}")
            }
        }
    }
}

impl Boot {
    /// Checks the boot-info page that the VMM passed in RDI, with the index from RSI.
    ///
    /// # Safety
    ///
    /// `info` is null or points to a boot-info page that stays mapped and unchanged for
    /// the life of the guest (the VMM writes it before the vCPU starts).
    pub unsafe fn from_raw(info: *const BootInfo, vcpu_index: u64) -> Result<Self, BootError> {
        if info.is_null() {
            return Err(BootError::Null);
        }
        // SAFETY: non-null, and the caller promises it points to a live boot-info page
        // that nothing writes any more.
        let info: &'static BootInfo = unsafe { &*info };
        if info.magic != BOOT_INFO_MAGIC {
            return Err(BootError::Magic(info.magic));
        }
        if info.version != ABI_VERSION {
            return Err(BootError::Version(info.version));
        }
        if u64::from(info.vcpu_index) != vcpu_index {
            return Err(BootError::Index {
                register: vcpu_index,
                page: info.vcpu_index,
            });
        }
        if info.vcpu_count == 0 || info.vcpu_count > MAX_VCPUS || info.vcpu_index >= info.vcpu_count
        {
            return Err(BootError::Count(info.vcpu_count));
        }
        if info.heap_start % PAGE_SIZE != 0 || info.heap_start > info.ram_size {
            return Err(BootError::Heap {
                heap_start: info.heap_start,
                ram_size: info.ram_size,
            });
        }
        if info.tsc_khz == 0 {
            return Err(BootError::TscKhz);
        }
        let record = core::mem::size_of::<PvClockTimeInfo>() as u64;
        if info.kvmclock != 0
            && (info.kvmclock % record != 0 || info.kvmclock.saturating_add(record) > info.ram_size)
        {
            return Err(BootError::KvmClock(info.kvmclock));
        }
        let len = info.cmdline_len as usize;
        if len > CMDLINE_MAX {
            return Err(BootError::CmdlineLen(info.cmdline_len));
        }
        let cmdline =
            core::str::from_utf8(&info.cmdline[..len]).map_err(|_| BootError::CmdlineUtf8)?;
        let virtio = info
            .virtio
            .get(..info.virtio_count as usize)
            .ok_or(BootError::VirtioCount(info.virtio_count))?;
        Ok(Boot {
            vcpu_index: info.vcpu_index,
            vcpu_count: info.vcpu_count,
            ram_size: info.ram_size,
            heap_start: info.heap_start,
            tsc_khz: info.tsc_khz,
            kvmclock: info.kvmclock,
            cmdline,
            virtio,
        })
    }

    /// Whether this is vCPU 0, the one that prints and exits.
    pub fn is_leader(&self) -> bool {
        self.vcpu_index == 0
    }

    /// Bytes of free RAM for workloads.
    pub fn free_bytes(&self) -> u64 {
        self.ram_size - self.heap_start
    }

    /// The part `[start, end)` of `0..total` that this vCPU owns when `total` items are
    /// split as evenly as possible across the vCPUs.
    pub fn shard(&self, total: u64) -> (u64, u64) {
        shard(total, self.vcpu_index, self.vcpu_count)
    }
}

/// The part `[start, end)` of `0..total` that vCPU `index` of `count` owns.
pub fn shard(total: u64, index: u32, count: u32) -> (u64, u64) {
    let at = |i: u32| ((u128::from(total) * u128::from(i)) / u128::from(count)) as u64;
    (at(index), at(index + 1))
}
