//! The boot contract between the VMM and the reference guest.
//!
//! This file is compiled twice: into the engine (`engine::boot::abi`) and into the
//! `no_std` guest (`#[path]` include), so both sides read one definition. It must stay
//! `no_std`-clean: constants and `#[repr(C)]` plain data only.
//!
//! Guest physical memory (identity mapped, every page user-accessible):
//!
//! ```text
//! 0x0000_0500  GDT (null, 64-bit code DPL3, data DPL3, TSS)
//! 0x0000_0600  TSS with an I/O permission bitmap allowing ports 0..4096
//! 0x0001_0000  boot-info pages, one per vCPU (BOOT_INFO_BASE + index * 4096); the
//!              vCPU's kvmclock record at PVCLOCK_OFFSET in the same page
//! 0x0002_0000  page tables: PML4, PDPT, then one PD per GiB (2 MiB pages)
//! 0x0004_0000  vCPU stacks, STACK_SIZE each, vCPU i's top at STACK_BASE + (i+1)*STACK_SIZE
//! 0x0020_0000  the guest ELF image (linked with --image-base 0x200000)
//! heap_start   free RAM up to ram_size (page aligned, after the image)
//! MMIO_BASE    virtio-mmio devices, MMIO_DEVICE_SIZE apart
//! ```
//!
//! Entry: 64-bit mode, CPL3, IOPL=3 and a TSS I/O bitmap for ports 0..4096, IF=0 as set by
//! the VMM. Under PVM (our machines) the guest observes IOPL=0 and IF=1: port I/O works
//! through the TSS bitmap, and no interrupt is ever raised (the PIT and LAPIC stay
//! unprogrammed, there is no IDT). RIP = ELF entry, RSP = stack top - 8,
//! RDI = this vCPU's boot-info address, RSI = vCPU index.
//!
//! Ports: 16550 serial at `SERIAL_PORT`; `out EXIT_PORT, eax` stops the VM with status
//! `eax`; `out IDLE_PORT, eax` parks the vCPU in the VMM for at most `eax` microseconds or
//! until a device has something for the guest (the guest's `hlt`).
//!
//! Time: when `BootInfo::kvmclock` is not zero, the VMM has turned on KVM's clock for the
//! vCPU (`MSR_KVM_SYSTEM_TIME_NEW`) with its [`PvClockTimeInfo`] at that address, and guest
//! time is `system_time + ((rdtsc - tsc_timestamp) scaled by tsc_to_system_mul and
//! tsc_shift)` nanoseconds, read under the `version` protocol (odd: being updated). KVM
//! keeps it right across pauses, snapshots and promotions (`KVM_SET_CLOCK` makes it go on
//! from where it was captured), where the raw TSC may not: see `engine::vstate::vm`. With
//! zero, time is the raw TSC at `tsc_khz`.

/// "LKST" in little endian.
pub const BOOT_INFO_MAGIC: u32 = 0x5453_4b4c;
/// Bumped whenever anything in this file changes meaning.
/// 2: `BootInfo::kvmclock` and the kvmclock record.
pub const ABI_VERSION: u32 = 2;

/// The guest's page size, 4 KiB; guest RAM, dirty tracking and the wire all count in it.
pub const PAGE_SIZE: u64 = 4096;
/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the TSS.
pub const TSS_ADDR: u64 = 0x600;
/// Guest-physical address of vCPU 0's boot-info page; vCPU `i`'s is `i` pages above.
pub const BOOT_INFO_BASE: u64 = 0x1_0000;
/// Guest-physical address of the identity-mapping page tables.
pub const PAGE_TABLE_BASE: u64 = 0x2_0000;
/// Page-table area ends where the stacks begin.
pub const PAGE_TABLE_END: u64 = 0x4_0000;
/// Guest-physical address of vCPU 0's stack area; vCPU `i`'s is `i * STACK_SIZE` above.
pub const STACK_BASE: u64 = 0x4_0000;
/// Bytes of stack per vCPU (64 KiB).
pub const STACK_SIZE: u64 = 0x1_0000;
/// The most vCPUs the layout has boot-info pages and stacks for.
pub const MAX_VCPUS: u32 = 16;
/// Guest-physical address the guest ELF is loaded at (2 MiB).
pub const IMAGE_BASE: u64 = 0x20_0000;

/// Base of the virtio-mmio window, above any RAM we accept.
pub const MMIO_BASE: u64 = 0x10_0000_0000;
/// Bytes of MMIO window per virtio device (one page).
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The most virtio devices the boot info can list.
pub const MAX_VIRTIO: usize = 8;
/// The largest guest RAM the layout maps (the page tables must fit below the stacks).
pub const MAX_RAM: u64 = 16 << 30;

/// I/O port of the 16550 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// I/O port the guest writes its exit status to (a 32-bit `out`).
pub const EXIT_PORT: u16 = 0x600;
/// I/O port the guest writes to when it has nothing to do: the vCPU parks in the VMM for
/// at most the value written, in µs, or until a device wakes it.
pub const IDLE_PORT: u16 = 0x604;

/// The longest guest command line the boot info holds, in bytes.
pub const CMDLINE_MAX: usize = 2048;

/// GDT selectors, RPL 3.
pub const CODE_SELECTOR: u16 = 0x08 | 3;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10 | 3;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x18;

/// virtio device ids (virtio 1.x, section 5).
pub const VIRTIO_ID_NET: u32 = 1;
/// virtio-blk's device ID (`--disk`: after the net device in `virtio[]`, in `--disk` order).
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// One virtio-mmio device the guest may drive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioDeviceInfo {
    /// Guest-physical address of the device's MMIO window.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// The virtio device ID (`VIRTIO_ID_*`).
    pub device_id: u32,
    /// Zero.
    pub _reserved: u32,
}

/// The page at `BOOT_INFO_BASE + vcpu_index * PAGE_SIZE`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub version: u32,
    /// This vCPU's index, from 0.
    pub vcpu_index: u32,
    /// How many vCPUs the guest has.
    pub vcpu_count: u32,
    /// Bytes of guest RAM from GPA 0.
    pub ram_size: u64,
    /// The first free guest-physical address after the image (page aligned).
    pub heap_start: u64,
    /// The TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Guest-physical address of this vCPU's [`PvClockTimeInfo`]; 0 without kvmclock.
    pub kvmclock: u64,
    /// How many entries of `virtio` are valid.
    pub virtio_count: u32,
    /// How many bytes of `cmdline` are valid.
    pub cmdline_len: u32,
    /// The virtio-mmio devices, `virtio_count` of them.
    pub virtio: [VirtioDeviceInfo; MAX_VIRTIO],
    /// The guest's command line, `cmdline_len` bytes of UTF-8.
    pub cmdline: [u8; CMDLINE_MAX],
}

/// Offset of the vCPU's kvmclock record in its boot-info page.
pub const PVCLOCK_OFFSET: u64 = 0xf00;

/// KVM's per-vCPU time record (`struct pvclock_vcpu_time_info`), written by KVM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PvClockTimeInfo {
    /// Odd while KVM updates the record (the seqlock of the pvclock ABI).
    pub version: u32,
    /// Padding.
    pub pad0: u32,
    /// The TSC when `system_time` was taken.
    pub tsc_timestamp: u64,
    /// Nanoseconds of guest time at `tsc_timestamp`.
    pub system_time: u64,
    /// Multiplier from TSC ticks to nanoseconds (32.32 fixed point, after `tsc_shift`).
    pub tsc_to_system_mul: u32,
    /// Shift applied to the TSC delta before `tsc_to_system_mul`.
    pub tsc_shift: i8,
    /// `PVCLOCK_*` flags.
    pub flags: u8,
    /// Padding.
    pub pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<BootInfo>() <= PVCLOCK_OFFSET as usize);
const _: () = assert!(core::mem::size_of::<PvClockTimeInfo>() == 32);
const _: () = assert!(PVCLOCK_OFFSET as usize + 32 <= PAGE_SIZE as usize);
const _: () = assert!(TSS_ADDR + 0x68 + 4096 / 8 < BOOT_INFO_BASE);
const _: () = assert!(STACK_BASE + MAX_VCPUS as u64 * STACK_SIZE <= IMAGE_BASE);
const _: () = assert!(BOOT_INFO_BASE + MAX_VCPUS as u64 * PAGE_SIZE <= PAGE_TABLE_BASE);
