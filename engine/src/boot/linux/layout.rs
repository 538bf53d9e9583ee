//! Where a Linux guest's boot structures live in guest-physical memory, and its e820 map.
//!
//! ```text
//! 0x0000_0500  GDT: null, code (0x08), data (0x10), TSS (0x18)
//! 0x0000_0520  IDT (empty: the kernel installs its own before it enables interrupts)
//! 0x0000_6000  PVH: hvm_start_info (Xen's arch-x86/hvm/start_info.h), its module list at 0x6040
//! 0x0000_7000  PVH: the memory map; 64-bit boot protocol: boot_params (the "zero page")
//! 0x0000_8ff0  the stack of the 64-bit entry
//! 0x0000_9000  64-bit entry: PML4, PDPT, PD identity-mapping the first GiB (2 MiB pages)
//! 0x0002_0000  the kernel command line
//! 0x0009_fc00  EBDA .. 1 MiB: reserved in the e820 map (VGA hole, BIOS area)
//! 0x000e_0000  the ACPI tables: RSDP, XSDT, DSDT, FADT, MADT (`acpi.rs`)
//! 0x0010_0000  a bzImage's protected-mode kernel; RAM from here on
//! 0x0100_0000  a vmlinux (its segments' physical addresses, CONFIG_PHYSICAL_START)
//! (top)        the initramfs, page aligned, as high as RAM and the kernel allow
//! ```
//!
//! Guest RAM is one range from 0, so it must end below the 32-bit MMIO hole the IOAPIC
//! (0xfec0_0000), the LAPIC (0xfee0_0000) and KVM's TSS (0xfffb_d000) live in: at most
//! [`MAX_LINUX_RAM`]. The virtio-mmio window stays where the reference guest has it, at
//! 64 GiB ([`crate::boot::abi::MMIO_BASE`]).

use linux_loader::loader::bootparam::boot_e820_entry;

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the (empty) IDT.
pub const IDT_ADDR: u64 = 0x520;
/// Guest-physical address of the PVH `hvm_start_info`.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Guest-physical address of the PVH module list (one entry: the initramfs).
pub const MODLIST_ADDR: u64 = 0x6040;
/// Guest-physical address of the PVH memory map.
pub const MEMMAP_ADDR: u64 = 0x7000;
/// Guest-physical address of `boot_params` (the 64-bit boot protocol's zero page).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// The 64-bit entry's initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The 64-bit entry's PML4; the PDPT and the PD follow, a page each.
pub const PML4_ADDR: u64 = 0x9000;
/// Guest-physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The longest command line, NUL included (x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Where the Extended BIOS Data Area would start: RAM below 640 KiB ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// The start of RAM above the ISA hole (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// The largest RAM a Linux guest gets: below the 32-bit MMIO hole.
pub const MAX_LINUX_RAM: u64 = 3 << 30;
/// The smallest RAM that holds the boot structures and a kernel loaded at 16 MiB.
pub const MIN_LINUX_RAM: u64 = 64 << 20;

// The boot structures do not overlap, and all lie in RAM below the EBDA.
const _: () = assert!(START_INFO_ADDR + 56 <= MODLIST_ADDR);
const _: () = assert!(MODLIST_ADDR + 32 <= MEMMAP_ADDR);
const _: () = assert!(ZERO_PAGE_ADDR + 4096 <= BOOT_STACK);
const _: () = assert!(BOOT_STACK < PML4_ADDR);
const _: () = assert!(PML4_ADDR + 3 * 4096 <= CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The guest's memory map: RAM below the EBDA, the EBDA to 1 MiB reserved (the ACPI tables
/// are there), and RAM from 1 MiB to `ram` bytes.
pub fn e820(ram: u64) -> Vec<boot_e820_entry> {
    vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: ram - HIMEM_START,
            r#type: E820_RAM,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_leaves_the_isa_hole_out_and_ends_at_ram() {
        let map = e820(512 << 20);
        assert_eq!(map.len(), 3);
        let (lo, hi) = (map[0], map[2]);
        assert_eq!(map[1].addr + map[1].size, HIMEM_START);
        assert!(map[1].addr <= super::super::acpi::RSDP_ADDR);
        assert_eq!((lo.addr, lo.size), (0, EBDA_START));
        assert_eq!(hi.addr + hi.size, 512 << 20);
    }
}
