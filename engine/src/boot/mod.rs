//! Entering the reference guest: ELF loading, page tables, GDT, boot-info pages, and the
//! initial vCPU registers, all per the contract in [`abi`].

pub mod abi;
pub mod linux;

use std::io::Cursor;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::{elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::vstate::memory::GuestMemory;
use abi::*;

/// The guest could not be loaded or its boot structures not written.
#[derive(Debug, Error)]
pub enum BootError {
    /// The image is not an ELF linux-loader can load.
    #[error("guest image is not a loadable x86-64 ELF: {0}")]
    Elf(linux_loader::loader::Error),
    /// The image does not fit in guest RAM (`end` and `ram` in bytes).
    #[error("guest image ends at {end:#x}, beyond the {ram:#x} bytes of guest RAM")]
    ImageTooLarge {
        /// Where the image ends (guest-physical, bytes).
        end: u64,
        /// Bytes of guest RAM.
        ram: u64,
    },
    /// The command line does not fit in the boot info.
    #[error("guest command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// The command line's length in bytes.
        len: usize,
        /// The most that fit.
        max: usize,
    },
    /// The vCPU count is outside 1..=[`MAX_VCPUS`].
    #[error("{0} vCPUs requested; the guest layout supports 1 to {MAX_VCPUS}")]
    VcpuCount(u32),
    /// More virtio devices than the boot info lists.
    #[error("{0} virtio devices; at most {MAX_VIRTIO} fit in the boot info")]
    TooManyDevices(usize),
    /// Writing guest memory failed.
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

// SAFETY: BootInfo is #[repr(C)], made only of integers and arrays of integers, and has no
// padding (its size is a multiple of 8 and every field is naturally aligned), so any byte
// pattern is a valid value.
unsafe impl ByteValued for BootInfo {}

/// What the loader placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedGuest {
    /// The guest's entry point (virtual = physical).
    pub entry: u64,
    /// The first free guest-physical address after the image.
    pub heap_start: u64,
}

/// Everything the boot code needs to know about the VM.
pub struct BootParams<'a> {
    /// The guest's command line.
    pub cmdline: &'a str,
    /// How many vCPUs the guest has.
    pub vcpu_count: u32,
    /// The TSC frequency in kHz, for the guest's clock.
    pub tsc_khz: u64,
    /// Whether the VMM turns kvmclock on for every vCPU (the boot info then says where).
    pub kvmclock: bool,
    /// The virtio-mmio devices the guest may drive.
    pub virtio: &'a [VirtioDeviceInfo],
}

/// Loads the guest ELF and writes page tables, GDT/TSS and one boot-info page per vCPU.
pub fn load(
    mem: &GuestMemory,
    image: &[u8],
    params: &BootParams<'_>,
) -> Result<LoadedGuest, BootError> {
    if params.vcpu_count == 0 || params.vcpu_count > MAX_VCPUS {
        return Err(BootError::VcpuCount(params.vcpu_count));
    }
    if params.cmdline.len() > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: params.cmdline.len(),
            max: CMDLINE_MAX,
        });
    }
    if params.virtio.len() > MAX_VIRTIO {
        return Err(BootError::TooManyDevices(params.virtio.len()));
    }
    let ram = crate::vstate::memory::ram_size(mem);
    let loaded = Elf::load(mem, None, &mut Cursor::new(image), None).map_err(BootError::Elf)?;
    // linux-loader skips segments without file bytes (a pure .bss) when it computes
    // kernel_end, so the image's end comes from the program headers.
    let image_end = load_segments(image)
        .into_iter()
        .map(|(paddr, filesz, memsz)| {
            // Zero the .bss part of each segment (RAM may not be fresh on every path).
            let bss = vec![0u8; memsz.saturating_sub(filesz) as usize];
            mem.write_slice(&bss, GuestAddress(paddr + filesz))
                .map(|_| paddr + memsz)
        })
        .try_fold(loaded.kernel_end, |end, seg| seg.map(|e| end.max(e)))?;
    let heap_start = image_end.next_multiple_of(PAGE_SIZE);
    if heap_start > ram {
        return Err(BootError::ImageTooLarge {
            end: heap_start,
            ram,
        });
    }

    write_page_tables(mem, ram)?;
    write_gdt(mem)?;
    for index in 0..params.vcpu_count {
        let mut info = BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: ABI_VERSION,
            vcpu_index: index,
            vcpu_count: params.vcpu_count,
            ram_size: ram,
            heap_start,
            tsc_khz: params.tsc_khz,
            kvmclock: if params.kvmclock {
                pvclock_addr(index)
            } else {
                0
            },
            virtio_count: params.virtio.len() as u32,
            cmdline_len: params.cmdline.len() as u32,
            virtio: [VirtioDeviceInfo::default(); MAX_VIRTIO],
            cmdline: [0; CMDLINE_MAX],
        };
        info.virtio[..params.virtio.len()].copy_from_slice(params.virtio);
        info.cmdline[..params.cmdline.len()].copy_from_slice(params.cmdline.as_bytes());
        mem.write_obj(info, GuestAddress(boot_info_addr(index)))?;
    }
    Ok(LoadedGuest {
        entry: loaded.kernel_load.0,
        heap_start,
    })
}

/// `(p_paddr, p_filesz, p_memsz)` of each PT_LOAD segment of a 64-bit ELF that
/// linux-loader already accepted (so the header is sane); malformed entries are skipped.
pub(crate) fn load_segments(image: &[u8]) -> Vec<(u64, u64, u64)> {
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        image
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Vec::new();
    };
    const PT_LOAD: u32 = 1;
    (0..phnum)
        .filter_map(|i| {
            let ph = usize::try_from(phoff).ok()?.checked_add(i * phentsize)?;
            let p_type = u32::from_le_bytes(image.get(ph..ph + 4)?.try_into().ok()?);
            (p_type == PT_LOAD).then_some(())?;
            Some((u64_at(ph + 24)?, u64_at(ph + 32)?, u64_at(ph + 40)?))
        })
        .collect()
}

/// Guest-physical address of vCPU `vcpu_index`'s boot-info page.
pub fn boot_info_addr(vcpu_index: u32) -> u64 {
    BOOT_INFO_BASE + u64::from(vcpu_index) * PAGE_SIZE
}

/// Where vCPU `vcpu_index`'s kvmclock record lives (in its boot-info page).
pub fn pvclock_addr(vcpu_index: u32) -> u64 {
    boot_info_addr(vcpu_index) + PVCLOCK_OFFSET
}

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_LARGE: u64 = 1 << 7;
const PTE_FLAGS: u64 = PTE_PRESENT | PTE_WRITE | PTE_USER;
const GIB: u64 = 1 << 30;

/// Identity map of RAM and of the first 2 MiB of the MMIO window with 2 MiB pages,
/// every level user-accessible (the guest runs at CPL3).
fn write_page_tables(mem: &GuestMemory, ram: u64) -> Result<(), BootError> {
    let pml4 = PAGE_TABLE_BASE;
    let pdpt = pml4 + PAGE_SIZE;
    let first_pd = pdpt + PAGE_SIZE;
    mem.write_obj(pdpt | PTE_FLAGS, GuestAddress(pml4))?;

    let mut gibs: Vec<u64> = (0..ram.div_ceil(GIB)).collect();
    gibs.push(MMIO_BASE / GIB);
    for (n, gib) in gibs.iter().enumerate() {
        let pd = first_pd + n as u64 * PAGE_SIZE;
        debug_assert!(pd + PAGE_SIZE <= PAGE_TABLE_END);
        mem.write_obj(pd | PTE_FLAGS, GuestAddress(pdpt + gib * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| ((gib * GIB + (i << 21)) | PTE_FLAGS | PTE_LARGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

/// The TSS: 104 bytes, then an I/O permission bitmap that allows ports 0..IO_PORTS.
/// Port I/O at CPL3 is legal with IOPL=3 on hardware virtualization, but a hypervisor
/// that runs the guest's CPL3 natively at host CPL3 (PVM) cannot grant IOPL and instead
/// emulates the trapped instruction, checking the guest's TSS bitmap: so we provide both.
const IO_PORTS: u64 = 4096;
const TSS_IOMAP_BASE: u64 = 0x68;
/// Limit covers the bitmap and its terminating 0xff byte.
const TSS_LIMIT: u64 = TSS_IOMAP_BASE + IO_PORTS / 8;

const GDT: [u64; 5] = [
    0,
    // 64-bit code, DPL3, present, readable.
    0x00af_fb00_0000_ffff,
    // data, DPL3, present, writable.
    0x00cf_f300_0000_ffff,
    // 64-bit TSS at TSS_ADDR (low half, then high half of the base).
    0x0000_8b00_0000_0000
        | TSS_LIMIT
        | ((TSS_ADDR & 0xff_ffff) << 16)
        | ((TSS_ADDR >> 24 & 0xff) << 56),
    TSS_ADDR >> 32,
];

fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    mem.write_obj(GDT, GuestAddress(GDT_ADDR))?;
    let mut tss = vec![0u8; (TSS_LIMIT + 1) as usize];
    tss[0x66..0x68].copy_from_slice(&(TSS_IOMAP_BASE as u16).to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_ADDR))?;
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit mode at CPL3 (`base` holds the vCPU's reset state).
pub fn initial_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(CODE_SELECTOR, 0xb, true);
    let data = segment(DATA_SELECTOR, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT as u32,
        selector: TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PAGE_TABLE_BASE;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the ELF entry: IOPL=3, IF=0, stack and boot-info per vCPU.
pub fn initial_regs(entry: u64, vcpu_index: u32) -> kvm_regs {
    const RFLAGS_RESERVED: u64 = 1 << 1;
    const RFLAGS_IOPL3: u64 = 3 << 12;
    kvm_regs {
        rip: entry,
        rsp: STACK_BASE + (u64::from(vcpu_index) + 1) * STACK_SIZE - 8,
        rdi: boot_info_addr(vcpu_index),
        rsi: u64::from(vcpu_index),
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    }
}

/// x87 and SSE control words at their reset values.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn page_tables_map_ram_and_mmio_window() {
        let mem = crate::vstate::memory::create(64 << 20).unwrap();
        write_page_tables(&mem, 64 << 20).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PAGE_TABLE_BASE)).unwrap();
        let pdpt = pml4 & !0xfff;
        let pd0: u64 = mem.read_obj(GuestAddress(pdpt)).unwrap();
        let pd_mmio: u64 = mem
            .read_obj(GuestAddress(pdpt + (MMIO_BASE / GIB) * 8))
            .unwrap();
        assert_eq!(pd0 & 7, 7);
        assert_eq!(pd_mmio & 7, 7);
        let e: u64 = mem.read_obj(GuestAddress((pd0 & !0xfff) + 8)).unwrap();
        assert_eq!(e & !0xfff, 2 << 20);
        let m: u64 = mem.read_obj(GuestAddress(pd_mmio & !0xfff)).unwrap();
        assert_eq!(m & !0xfff, MMIO_BASE);
        assert!(mem.address_in_range(GuestAddress(PAGE_TABLE_END - 1)));
    }

    #[test]
    fn rejects_bad_params() {
        let mem = crate::vstate::memory::create(64 << 20).unwrap();
        let p = BootParams {
            cmdline: "",
            vcpu_count: 0,
            tsc_khz: 1,
            kvmclock: false,
            virtio: &[],
        };
        assert!(matches!(
            load(&mem, crate::BUILTIN_GUEST, &p),
            Err(BootError::VcpuCount(0))
        ));
        let long = "x".repeat(CMDLINE_MAX + 1);
        let p = BootParams {
            cmdline: &long,
            vcpu_count: 1,
            tsc_khz: 1,
            kvmclock: false,
            virtio: &[],
        };
        assert!(matches!(
            load(&mem, crate::BUILTIN_GUEST, &p),
            Err(BootError::CmdlineTooLong { .. })
        ));
        let p = BootParams {
            cmdline: "",
            vcpu_count: 1,
            tsc_khz: 1,
            kvmclock: false,
            virtio: &[],
        };
        assert!(matches!(
            load(&mem, b"not an elf", &p),
            Err(BootError::Elf(_))
        ));
    }

    #[test]
    fn loads_builtin_guest() {
        let mem = crate::vstate::memory::create(64 << 20).unwrap();
        let p = BootParams {
            cmdline: "workload=counter limit=1",
            vcpu_count: 2,
            tsc_khz: 1000,
            kvmclock: true,
            virtio: &[],
        };
        let g = load(&mem, crate::BUILTIN_GUEST, &p).unwrap();
        assert!(g.entry >= IMAGE_BASE && g.entry < g.heap_start);
        // The heap starts after every segment, .bss included.
        for (paddr, _, memsz) in load_segments(crate::BUILTIN_GUEST) {
            assert!(paddr + memsz <= g.heap_start);
        }
        let info: BootInfo = mem.read_obj(GuestAddress(boot_info_addr(1))).unwrap();
        assert_eq!(info.magic, BOOT_INFO_MAGIC);
        assert_eq!(info.vcpu_index, 1);
        assert_eq!(info.kvmclock, boot_info_addr(1) + PVCLOCK_OFFSET);
        assert_eq!(
            &info.cmdline[..info.cmdline_len as usize],
            p.cmdline.as_bytes()
        );
    }
}
