//! Booting a Linux kernel: an uncompressed ELF `vmlinux` entered through its PVH note (or,
//! without one, at its 64-bit entry) or a `bzImage` entered at its 64-bit entry, with the
//! command line, an initramfs and the e820 map.
//!
//! Sources: the Linux x86 boot protocol (`Documentation/arch/x86/boot.rst`: `boot_params`,
//! the setup header at 0x1f1, the 64-bit entry at the protected-mode kernel + 0x200 with
//! `boot_params` in RSI), the PVH boot ABI (Xen's `docs/misc/pvh.pandoc` and
//! `xen/include/public/arch-x86/hvm/start_info.h`: 32-bit protected mode without paging,
//! EBX = the `hvm_start_info`, found through the `XEN_ELFNOTE_PHYS32_ENTRY` note). The
//! structures are linux-loader's; where they go is [`layout`].

pub mod acpi;
pub mod cpu;
pub mod layout;

use std::io::Cursor;

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::size::format_size;
use crate::vstate::memory::GuestMemory;
use layout::*;

/// The kernel, initramfs and command line of a Linux guest.
#[derive(Clone, Debug)]
pub struct LinuxBoot {
    /// The kernel image: an ELF `vmlinux` or a `bzImage`.
    pub kernel: Vec<u8>,
    /// The initramfs (a cpio archive, compressed or not), if any.
    pub initramfs: Option<Vec<u8>>,
    /// The kernel command line, without the devices lockstep adds.
    pub cmdline: String,
}

/// The kernel command line when none is given: the console on the 16550 from the first
/// line on (`earlyprintk`), reboot through the i8042 (`reboot=k`), reboot on panic after
/// 1 s, no PCI probing (there is no PCI bus).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 pci=off";

/// The kinds of kernel image lockstep boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A `bzImage` (setup sectors, then the compressed kernel with its decompressor).
    BzImage,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "vmlinux",
            KernelFormat::BzImage => "bzImage",
        })
    }
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, EBX = [`START_INFO_ADDR`].
    Pvh {
        /// The `XEN_ELFNOTE_PHYS32_ENTRY` address.
        rip: u64,
    },
    /// The 64-bit boot protocol: long mode with the first GiB identity mapped, RSI =
    /// [`ZERO_PAGE_ADDR`].
    Long {
        /// `startup_64`: the ELF entry, or a bzImage's protected-mode kernel + 0x200.
        rip: u64,
    },
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Pvh { rip } => write!(f, "PVH entry at {rip:#x}"),
            Entry::Long { rip } => write!(f, "64-bit entry at {rip:#x}"),
        }
    }
}

/// What [`load`] placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The image's kind.
    pub format: KernelFormat,
    /// Where and how the boot vCPU starts.
    pub entry: Entry,
    /// The end of the kernel image in guest memory (bytes, guest-physical).
    pub kernel_end: u64,
    /// The initramfs's guest-physical address and size in bytes, if there is one.
    pub initramfs: Option<(u64, u64)>,
}

/// A kernel that cannot be booted, or boot structures that cannot be written.
#[derive(Debug, Error)]
pub enum LinuxBootError {
    /// The image is neither an ELF nor a bzImage.
    #[error(
        "kernel image is neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' boot \
         header at offset 0x202)"
    )]
    NotAKernel,
    /// The ELF is not an x86-64 executable.
    #[error("kernel image is an ELF but not an x86-64 executable vmlinux ({0})")]
    NotVmlinux(&'static str),
    /// linux-loader refused the ELF.
    #[error("kernel image is not a loadable vmlinux: {0}")]
    Elf(linux_loader::loader::Error),
    /// linux-loader refused the bzImage.
    #[error("kernel image is not a loadable bzImage: {0}")]
    BzImage(linux_loader::loader::Error),
    /// The bzImage has no 64-bit entry (`XLF_KERNEL_64` clear in `xloadflags`).
    #[error("bzImage has no 64-bit entry point (boot protocol {0:#x}, xloadflags without XLF_KERNEL_64)")]
    No64BitEntry(u16),
    /// Guest RAM is outside what a Linux guest gets (bytes).
    #[error(
        "--mem {}: a Linux guest takes {} to {} of RAM (below the 32-bit MMIO hole)",
        format_size(*.0), format_size(MIN_LINUX_RAM), format_size(MAX_LINUX_RAM)
    )]
    RamSize(u64),
    /// The kernel does not fit in guest RAM (bytes).
    #[error("kernel ends at {end:#x}, beyond the {ram:#x} bytes of guest RAM")]
    KernelTooLarge {
        /// Where the kernel ends (guest-physical).
        end: u64,
        /// Bytes of guest RAM.
        ram: u64,
    },
    /// The initramfs does not fit between the kernel and the end of RAM (bytes).
    #[error("initramfs of {size} bytes does not fit in guest RAM above the kernel (ends at {kernel_end:#x}, RAM {ram:#x})")]
    InitramfsTooLarge {
        /// The initramfs's size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// Bytes of guest RAM.
        ram: u64,
    },
    /// The command line is too long (bytes).
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// The command line's length.
        len: usize,
        /// The most that fit.
        max: usize,
    },
    /// Writing guest memory failed.
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The magic of `hvm_start_info` (`XEN_HVM_START_MAGIC_VALUE`).
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// "HdrS", the boot protocol header's magic at 0x202.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `boot_flag` at 0x1fe.
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader`: a boot loader without an assigned id.
const LOADER_OTHER: u8 = 0xff;
/// `xloadflags`: the kernel has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// `loadflags`: the protected-mode kernel is loaded at 0x100000.
const LOADED_HIGH: u8 = 1;
/// `kernel_alignment` for a vmlinux without a setup header (2 MiB x 8, as Firecracker).
const KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// Which kind of image `image` is, by its magic numbers.
pub fn detect(image: &[u8]) -> Result<KernelFormat, LinuxBootError> {
    if image.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    let hdrs = image
        .get(0x202..0x206)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    if hdrs == Some(HDRS_MAGIC) {
        return Ok(KernelFormat::BzImage);
    }
    Err(LinuxBootError::NotAKernel)
}

/// Loads the kernel and the initramfs and writes the boot structures for its entry: the
/// GDT, the ACPI tables for `vcpus` and `devices`, the PVH `hvm_start_info` with its
/// memory map and module list, or `boot_params` and the page tables of the 64-bit entry.
/// `cmdline` is the whole command line (the devices included).
pub fn load(
    mem: &GuestMemory,
    boot: &LinuxBoot,
    cmdline: &str,
    vcpus: u32,
    devices: &[acpi::MmioDevice],
) -> Result<LoadedKernel, LinuxBootError> {
    let ram = crate::vstate::memory::ram_size(mem);
    if !(MIN_LINUX_RAM..=MAX_LINUX_RAM).contains(&ram) {
        return Err(LinuxBootError::RamSize(ram));
    }
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(LinuxBootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let format = detect(&boot.kernel)?;
    let (entry, kernel_end, header) = match format {
        KernelFormat::Elf => load_elf(mem, &boot.kernel)?,
        KernelFormat::BzImage => load_bzimage(mem, &boot.kernel)?,
    };
    if kernel_end > ram {
        return Err(LinuxBootError::KernelTooLarge {
            end: kernel_end,
            ram,
        });
    }
    let initramfs = match &boot.initramfs {
        Some(data) => {
            let limit = match header {
                Some(h) if h.initrd_addr_max != 0 => ram.min(u64::from(h.initrd_addr_max) + 1),
                _ => ram,
            };
            let size = data.len() as u64;
            let addr = limit
                .checked_sub(size)
                .map(|a| a & !0xfff)
                .filter(|&a| a >= kernel_end.next_multiple_of(4096))
                .ok_or(LinuxBootError::InitramfsTooLarge {
                    size,
                    kernel_end,
                    ram,
                })?;
            mem.write_slice(data, GuestAddress(addr))?;
            Some((addr, size))
        }
        None => None,
    };
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE_ADDR))?;
    cpu::write_gdt(mem, &entry)?;
    let rsdp = acpi::write_tables(mem, vcpus, devices)?;
    match entry {
        Entry::Pvh { .. } => write_start_info(mem, ram, initramfs, rsdp)?,
        Entry::Long { .. } => {
            cpu::write_page_tables(mem)?;
            write_zero_page(mem, ram, header, cmdline.len(), initramfs, rsdp)?;
        }
    }
    Ok(LoadedKernel {
        format,
        entry,
        kernel_end,
        initramfs,
    })
}

/// Loads a vmlinux at its segments' physical addresses; the PVH note gives the entry when
/// there is one, else the ELF entry (`startup_64`) is entered in long mode.
fn load_elf(
    mem: &GuestMemory,
    image: &[u8],
) -> Result<(Entry, u64, Option<setup_header>), LinuxBootError> {
    // e_ident[EI_CLASS] = ELFCLASS64, e_type = ET_EXEC, e_machine = EM_X86_64.
    if image.get(4) != Some(&2) {
        return Err(LinuxBootError::NotVmlinux("not a 64-bit ELF"));
    }
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    if u16_at(0x12) != Some(62) {
        return Err(LinuxBootError::NotVmlinux("machine is not x86-64"));
    }
    if u16_at(0x10) != Some(2) {
        return Err(LinuxBootError::NotVmlinux(
            "not an executable (ET_EXEC) image",
        ));
    }
    // Nothing may land on the boot structures below 1 MiB.
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(LinuxBootError::Elf)?;
    let end = crate::boot::load_segments(image)
        .into_iter()
        .map(|(paddr, _, memsz)| paddr + memsz)
        .fold(loaded.kernel_end, u64::max);
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Entry::Pvh { rip: addr.0 },
        _ => Entry::Long {
            rip: loaded.kernel_load.0,
        },
    };
    Ok((entry, end, None))
}

/// Loads a bzImage's protected-mode kernel at its `code32_start` (1 MiB); it is entered at
/// its 64-bit entry, and decompresses itself.
fn load_bzimage(
    mem: &GuestMemory,
    image: &[u8],
) -> Result<(Entry, u64, Option<setup_header>), LinuxBootError> {
    let loaded = BzImage::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(LinuxBootError::BzImage)?;
    let header = loaded
        .setup_header
        .expect("the bzImage loader reads the header");
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxBootError::No64BitEntry(header.version));
    }
    // The decompressor needs init_size bytes from where the kernel runs: the load address,
    // or its preferred address (`pref_address`, CONFIG_PHYSICAL_START) when it was loaded
    // below it, where a relocatable 64-bit kernel moves itself.
    let runs_at = loaded.kernel_load.0.max(header.pref_address);
    let end = loaded.kernel_end.max(runs_at + u64::from(header.init_size));
    Ok((
        Entry::Long {
            rip: loaded.kernel_load.0 + 0x200,
        },
        end,
        Some(header),
    ))
}

/// The PVH `hvm_start_info` (version 1, with the RSDP), the memory map and the module list.
fn write_start_info(
    mem: &GuestMemory,
    ram: u64,
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), LinuxBootError> {
    let map: Vec<hvm_memmap_table_entry> = e820(ram)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.r#type,
            reserved: 0,
        })
        .collect();
    for (i, e) in map.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(MEMMAP_ADDR + (i * 24) as u64))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        mem.write_obj(
            hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            },
            GuestAddress(MODLIST_ADDR),
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(START_INFO_ADDR))?;
    Ok(())
}

/// `boot_params` of the 64-bit boot protocol: the bzImage's setup header (or one made up
/// for a vmlinux), the command line, the initramfs and the e820 map.
fn write_zero_page(
    mem: &GuestMemory,
    ram: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), LinuxBootError> {
    let mut p = boot_params {
        acpi_rsdp_addr: rsdp,
        hdr: header.unwrap_or(setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            kernel_alignment: KERNEL_ALIGNMENT,
            ..Default::default()
        }),
        ..Default::default()
    };
    p.hdr.type_of_loader = LOADER_OTHER;
    p.hdr.loadflags |= LOADED_HIGH;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820(ram);
    p.e820_table[..map.len()].copy_from_slice(&map);
    p.e820_entries = map.len() as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_one(
        mem: &GuestMemory,
        boot: &LinuxBoot,
        cmdline: &str,
    ) -> Result<LoadedKernel, LinuxBootError> {
        load(mem, boot, cmdline, 1, &[])
    }

    fn boot(kernel: Vec<u8>) -> LinuxBoot {
        LinuxBoot {
            kernel,
            initramfs: None,
            cmdline: String::new(),
        }
    }

    #[test]
    fn refuses_what_is_not_a_kernel_with_the_reason() {
        let mem = crate::vstate::memory::create(64 << 20).unwrap();
        let e = load_one(&mem, &boot(b"hello".to_vec()), "").unwrap_err();
        assert!(matches!(e, LinuxBootError::NotAKernel), "{e}");
        // The reference guest is an ELF, but a 64-bit executable at 2 MiB: it loads; a
        // 32-bit ELF does not.
        let mut elf32 = crate::BUILTIN_GUEST.to_vec();
        elf32[4] = 1;
        let e = load_one(&mem, &boot(elf32), "").unwrap_err();
        assert!(e.to_string().contains("not a 64-bit ELF"), "{e}");
        let mut dynamic = crate::BUILTIN_GUEST.to_vec();
        dynamic[0x10] = 3;
        let e = load_one(&mem, &boot(dynamic), "").unwrap_err();
        assert!(e.to_string().contains("ET_EXEC"), "{e}");
        // A setup header with HdrS but no protected-mode kernel behind it.
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        assert_eq!(detect(&bz).unwrap(), KernelFormat::BzImage);
        let e = load_one(&mem, &boot(bz), "").unwrap_err();
        assert!(matches!(e, LinuxBootError::BzImage(_)), "{e}");
    }

    #[test]
    fn ram_and_command_line_limits() {
        let small = crate::vstate::memory::create(32 << 20).unwrap();
        let e = load_one(&small, &boot(crate::BUILTIN_GUEST.to_vec()), "").unwrap_err();
        assert!(matches!(e, LinuxBootError::RamSize(_)), "{e}");
        let mem = crate::vstate::memory::create(64 << 20).unwrap();
        let long = "x".repeat(CMDLINE_MAX);
        let e = load_one(&mem, &boot(crate::BUILTIN_GUEST.to_vec()), &long).unwrap_err();
        assert!(matches!(e, LinuxBootError::CmdlineTooLong { .. }), "{e}");
    }

    #[test]
    fn an_elf_without_pvh_note_gets_the_64_bit_entry_and_boot_params() {
        let mem = crate::vstate::memory::create(64 << 20).unwrap();
        let mut b = boot(crate::BUILTIN_GUEST.to_vec());
        b.initramfs = Some(vec![7u8; 10_000]);
        let k = load_one(&mem, &b, "console=ttyS0").unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert!(matches!(k.entry, Entry::Long { .. }));
        let (addr, size) = k.initramfs.unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr >= k.kernel_end && addr + size <= 64 << 20);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = p.hdr;
        let (magic, line_ptr, line_size, ramdisk) = (
            hdr.header,
            hdr.cmd_line_ptr,
            hdr.cmdline_size,
            hdr.ramdisk_image,
        );
        assert_eq!(magic, HDRS_MAGIC);
        assert_eq!(u64::from(line_ptr), CMDLINE_ADDR);
        assert_eq!(line_size, 13);
        assert_eq!(u64::from(ramdisk), addr);
        assert_eq!(p.e820_entries, 3);
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, acpi::RSDP_ADDR);
        let mut line = [0u8; 14];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
        let e = load_one(
            &mem,
            &LinuxBoot {
                initramfs: Some(vec![0; 63 << 20]),
                ..b
            },
            "",
        )
        .unwrap_err();
        assert!(matches!(e, LinuxBootError::InitramfsTooLarge { .. }), "{e}");
    }
}
