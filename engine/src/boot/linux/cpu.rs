//! The boot vCPU's state at a Linux kernel's entry (segments, control registers, general
//! registers, MSRs), the GDT and page tables it needs, and the CPUID a Linux guest sees.
//!
//! PVH (Xen's `docs/misc/pvh.pandoc`): 32-bit protected mode, paging off, CS a flat 32-bit
//! code segment, DS/ES/SS flat data segments, TR a 32-bit TSS, EBX = the `hvm_start_info`,
//! CR0.PE set, CR4 = 0, EFER = 0. The 64-bit boot protocol (`Documentation/arch/x86/
//! boot.rst`, "64-bit Boot Protocol"): long mode, paging on with the kernel, the zero page
//! and the command line identity mapped, RSI = `boot_params`, interrupts off.

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PML4_ADDR, START_INFO_ADDR, ZERO_PAGE_ADDR};
use super::Entry;
use crate::vstate::memory::GuestMemory;

/// A GDT descriptor from its flags (access byte in bits 0..8, G/DB/L/AVL in 12..16), base
/// and limit, in the layout of the Intel SDM vol. 3, 3.4.5.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// Selectors of the boot GDT.
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// The boot GDT: null, code, data, TSS. The code segment is 32-bit for PVH, 64-bit for the
/// 64-bit entry.
fn gdt(entry: &Entry) -> [u64; 4] {
    match entry {
        Entry::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        Entry::Long { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x808b, 0, 0xf_ffff),
        ],
    }
}

/// Writes the boot GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemory, entry: &Entry) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(gdt(entry), GuestAddress(GDT_ADDR))?;
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
}

/// Identity map of the first GiB with 2 MiB pages (supervisor only), for the 64-bit entry.
pub fn write_page_tables(mem: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    const PRESENT_WRITE: u64 = 0x3;
    const LARGE: u64 = 1 << 7;
    let pdpt = PML4_ADDR + 0x1000;
    let pd = PML4_ADDR + 0x2000;
    mem.write_obj(pdpt | PRESENT_WRITE, GuestAddress(PML4_ADDR))?;
    mem.write_obj(pd | PRESENT_WRITE, GuestAddress(pdpt))?;
    let entries: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | PRESENT_WRITE | LARGE).to_le_bytes())
        .collect();
    mem.write_slice(&entries, GuestAddress(pd))
}

/// The `kvm_segment` a descriptor loads into a segment register.
fn segment(descriptor: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((descriptor >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((descriptor >> 16) & 0xff_ffff) | ((descriptor >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((descriptor >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Segment and control registers at the entry (`base` is the vCPU's reset state).
pub fn initial_sregs(mut sregs: kvm_sregs, entry: &Entry) -> kvm_sregs {
    let g = gdt(entry);
    sregs.cs = segment(g[1], CODE_SELECTOR);
    let data = segment(g[2], DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(g[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (g.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    match entry {
        Entry::Pvh { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        Entry::Long { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers at the entry: interrupts off, the boot structure's address where the
/// protocol wants it.
pub fn initial_regs(entry: &Entry) -> kvm_regs {
    const RFLAGS_RESERVED: u64 = 1 << 1;
    match *entry {
        Entry::Pvh { rip } => kvm_regs {
            rip,
            rbx: START_INFO_ADDR,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        Entry::Long { rip } => kvm_regs {
            rip,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: ZERO_PAGE_ADDR,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    }
}

/// `IA32_MISC_ENABLE`.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MISC_ENABLE.FAST_STRING`.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE`.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// MSRs a Linux guest finds set at power-on beyond KVM's reset values: fast strings on,
/// MTRRs enabled with write-back as the default type (else the kernel takes all memory
/// for uncached and turns PAT off).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The CPUID of a Linux guest: what KVM supports on this host (KVM's signature
/// `KVMKVMKVM` at 0x4000_0000 and its paravirtual features, kvm-clock among them, at
/// 0x4000_0001 are part of it), with the processor count of leaf 1 and the hypervisor bit
/// set. Each vCPU's APIC id is set when it is created.
pub fn linux_cpuid(mut cpuid: CpuId, vcpus: u32) -> CpuId {
    const HYPERVISOR: u32 = 1 << 31;
    const HTT: u32 = 1 << 28;
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= HYPERVISOR;
            e.ebx = (e.ebx & !0x00ff_0000) | ((vcpus & 0xff) << 16);
            if vcpus > 1 {
                e.edx |= HTT;
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_the_segments_the_protocols_require() {
        let pvh = Entry::Pvh { rip: 0x100_0000 };
        let s = initial_sregs(kvm_sregs::default(), &pvh);
        // Flat 32-bit code and data, ring 0.
        assert_eq!(
            (s.cs.base, s.cs.limit, s.cs.db, s.cs.l),
            (0, 0xffff_ffff, 1, 0)
        );
        assert_eq!((s.cs.type_, s.cs.s, s.cs.dpl, s.cs.present), (0xb, 1, 0, 1));
        assert_eq!((s.ds.type_, s.ds.db, s.ds.limit), (0x3, 1, 0xffff_ffff));
        assert_eq!((s.tr.type_, s.tr.s, s.tr.limit), (0xb, 0, 0x67));
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer, 0);
        assert_eq!(initial_regs(&pvh).rbx, START_INFO_ADDR);
        let long = Entry::Long { rip: 0x100_0000 };
        let s = initial_sregs(kvm_sregs::default(), &long);
        assert_eq!((s.cs.l, s.cs.db), (1, 0));
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(initial_regs(&long).rsi, ZERO_PAGE_ADDR);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = crate::vstate::memory::create(64 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        let pdpt: u64 = mem.read_obj(GuestAddress(pml4 & !0xfff)).unwrap();
        let pd = pdpt & !0xfff;
        let e8: u64 = mem.read_obj(GuestAddress(pd + 8 * 8)).unwrap();
        assert_eq!(e8 & !0xfff, 16 << 20);
        assert_eq!(e8 & 0x83, 0x83);
    }
}
