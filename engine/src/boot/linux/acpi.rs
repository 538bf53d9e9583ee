//! The ACPI tables of a Linux guest: how it finds its CPUs, its IOAPIC, its virtio-mmio
//! devices, and how it powers off.
//!
//! RSDP (revision 2) → XSDT → FADT (hardware-reduced: no PM timer, no SCI, no GPEs) → DSDT,
//! and the MADT. The DSDT holds one `LNRO0005` device per virtio-mmio device (the ACPI id
//! Linux's virtio_mmio driver matches) with its window and its interrupt in `_CRS`, and
//! `_S5` so that a power-off writes SLP_TYP 5 with SLP_EN to the FADT's sleep control
//! register, an I/O port the vCPU thread ends the run on. The FADT's reset register is the
//! i8042's command port with the pulse-reset value. The MADT lists one local APIC per vCPU
//! (APIC id = vCPU index) and KVM's IOAPIC at 0xfec0_0000 with GSIs 0..23; ISA IRQs map
//! one to one to GSIs (KVM's default routing), so there are no source overrides.
//!
//! Source: the ACPI specification 6.5 (5.2.5 RSDP, 5.2.8 XSDT, 5.2.9 FADT, 5.2.12 MADT,
//! 6.4 resource descriptors, 19/20 AML encoding).

use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemory;

/// Guest-physical address of the RSDP (in the BIOS area, where Linux also scans for it).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The I/O port of the FADT's sleep control register.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// The sleep type `_S5` gives (written in bits 2..5 with SLP_EN, bit 5).
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;

/// Where the local APICs and the IOAPIC are.
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    /// Guest-physical base of the window.
    pub base: u64,
    /// Bytes of the window.
    pub size: u64,
    /// Its interrupt (GSI).
    pub irq: u32,
}

/// Makes every byte of `table` sum to zero through the byte at `at`.
fn checksum(table: &mut [u8], at: usize) {
    table[at] = 0;
    let sum = table.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    table[at] = 0u8.wrapping_sub(sum);
}

/// A table with its 36-byte header; `fill` appends the body. Length and checksum are set.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(b"LKSTEP"); // OEM id
    t.extend_from_slice(b"LOCKSTEP"); // OEM table id
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"LKST"); // creator id
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    checksum(&mut t, 9);
    t
}

/// A Generic Address Structure in system I/O space, byte access.
fn gas_io(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // SystemIO
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The FADT, revision 6: hardware-reduced, the DSDT at `dsdt`, sleep control and status at
/// [`SLEEP_CONTROL_PORT`], reset through the i8042.
fn fadt(dsdt: u64) -> Vec<u8> {
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;
    const IAPC_NO_VGA: u16 = 1 << 2;
    const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    b[at(109)..at(111)].copy_from_slice(&(IAPC_NO_VGA | IAPC_NO_CMOS_RTC).to_le_bytes());
    b[at(112)..at(116)].copy_from_slice(&(HW_REDUCED_ACPI | RESET_REG_SUP).to_le_bytes());
    b[at(116)..at(128)].copy_from_slice(&gas_io(0x64));
    b[at(128)] = 0xfe; // the i8042's pulse reset
    b[at(131)] = 5; // FADT minor version (6.5)
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    b[at(244)..at(256)].copy_from_slice(&gas_io(SLEEP_CONTROL_PORT));
    b[at(256)..at(268)].copy_from_slice(&gas_io(SLEEP_CONTROL_PORT));
    b[at(268)..at(276)].copy_from_slice(b"LOCKSTEP");
    sdt(b"FACP", 6, &b)
}

/// The MADT: a local APIC per vCPU and the IOAPIC.
fn madt(vcpus: u32) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for i in 0..vcpus {
        // Processor Local APIC: type 0, length 8, UID, APIC id, flags (enabled).
        b.extend_from_slice(&[0, 8, i as u8, i as u8]);
        b.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    b.extend_from_slice(&[1, 12, 0, 0]);
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    sdt(b"APIC", 5, &b)
}

/// AML PkgLength of a package whose contents are `len` bytes (the encoding's own bytes
/// counted in, as the encoding requires).
fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 0x40 {
        return vec![(len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    unreachable!("AML packages here are far below 256 MiB")
}

/// `op PkgLength contents`.
fn aml_pkg(op: &[u8], contents: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(pkg_length(contents.len()));
    v.extend_from_slice(contents);
    v
}

/// `Name(seg, object)`.
fn aml_name(seg: &[u8; 4], object: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(seg);
    v.extend_from_slice(object);
    v
}

/// An AML string.
fn aml_string(s: &str) -> Vec<u8> {
    let mut v = vec![0x0d];
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// An AML integer (the shortest encoding).
fn aml_int(n: u64) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, n as u8],
        0x100..=0xffff => [&[0x0b][..], &(n as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[0x0c][..], &(n as u32).to_le_bytes()].concat(),
        _ => [&[0x0e][..], &n.to_le_bytes()].concat(),
    }
}

/// `_CRS` of a virtio-mmio device: its window (a QWord memory range) and its interrupt
/// (an edge-triggered, active-high Extended Interrupt), then the end tag.
fn mmio_crs(d: &MmioDevice) -> Vec<u8> {
    let mut r = vec![0x8a, 43, 0]; // QWord Address Space Descriptor, 43 bytes follow
    r.push(0); // memory range
    r.push(0x0c); // min and max fixed
    r.push(0x01); // read-write, non-cacheable
    for v in [0, d.base, d.base + d.size - 1, 0, d.size] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    r.extend_from_slice(&[0x89, 6, 0, 0x03, 1]); // Extended Interrupt: consumer, edge, high
    r.extend_from_slice(&d.irq.to_le_bytes());
    r.extend_from_slice(&[0x79, 0]); // end tag
    let mut buffer = aml_int(r.len() as u64);
    buffer.extend(r);
    aml_pkg(&[0x11], &buffer)
}

/// The DSDT: `_S5` and, under `\_SB`, one `LNRO0005` device per virtio-mmio device.
fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    // Name(_S5, Package(4) {5, 0, 0, 0})
    let mut s5 = vec![4];
    s5.extend(aml_int(u64::from(S5_SLEEP_TYPE)));
    s5.extend([0, 0, 0]);
    body.extend(aml_name(b"_S5_", &aml_pkg(&[0x12], &s5)));
    let mut sb = b"\\_SB_".to_vec();
    for (i, d) in devices.iter().enumerate() {
        let mut dev = format!("V{i:03}").into_bytes();
        dev.extend(aml_name(b"_HID", &aml_string("LNRO0005")));
        dev.extend(aml_name(b"_UID", &aml_int(i as u64)));
        dev.extend(aml_name(b"_CRS", &mmio_crs(d)));
        sb.extend(aml_pkg(&[0x5b, 0x82], &dev));
    }
    body.extend(aml_pkg(&[0x10], &sb));
    sdt(b"DSDT", 2, &body)
}

/// Writes the RSDP at [`RSDP_ADDR`] and the tables after it; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u32,
    devices: &[MmioDevice],
) -> Result<u64, vm_memory::GuestMemoryError> {
    let xsdt_addr = RSDP_ADDR + 0x40;
    // The XSDT has two entries: 36 + 16 bytes.
    let dsdt_addr = (xsdt_addr + 52).next_multiple_of(16);
    let dsdt = dsdt(devices);
    let fadt_addr = (dsdt_addr + dsdt.len() as u64).next_multiple_of(16);
    let fadt = fadt(dsdt_addr);
    let madt_addr = (fadt_addr + fadt.len() as u64).next_multiple_of(16);
    let madt = madt(vcpus);
    let mut entries = Vec::new();
    entries.extend_from_slice(&fadt_addr.to_le_bytes());
    entries.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &entries);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(b"LKSTEP");
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    let (first, _) = rsdp.split_at_mut(20);
    checksum(first, 8);
    checksum(&mut rsdp, 32);

    for (addr, table) in [
        (RSDP_ADDR, &rsdp),
        (xsdt_addr, &xsdt),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
    ] {
        mem.write_slice(table, GuestAddress(addr))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_good_checksums() {
        let mem = crate::vstate::memory::create(64 << 20).unwrap();
        let dev = MmioDevice {
            base: 0x10_0000_0000,
            size: 0x1000,
            irq: 5,
        };
        let rsdp_addr = write_tables(&mem, 2, &[dev]).unwrap();
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read(&mem, xsdt_addr, 52);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(u32_at(&xsdt, 4), 52);
        assert_eq!(sum(&xsdt), 0);
        let table = |addr: u64| {
            let len = u32_at(&read(&mem, addr, 8), 4) as usize;
            let t = read(&mem, addr, len);
            assert_eq!(sum(&t), 0, "{:?}", &t[..4]);
            t
        };
        let fadt = table(u64_at(&xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "hardware-reduced");
        let dsdt = table(u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(u64::from(u32_at(&fadt, 40)), u64_at(&fadt, 140));
        let madt = table(u64_at(&xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        // Two local APICs (8 bytes each) and the IOAPIC (12) after the 8 bytes of fields.
        assert_eq!(madt.len(), 36 + 8 + 2 * 8 + 12);
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(&madt[60..62], &[1, 12]);
        // The device: its id, its window and its interrupt, inside \_SB.
        let find = |needle: &[u8]| dsdt.windows(needle.len()).position(|w| w == needle);
        let sb = find(b"\\_SB_").expect("\\_SB");
        assert!(find(b"V000").is_some_and(|d| d > sb));
        assert!(find(b"LNRO0005\0").is_some());
        let crs = find(&[0x8a, 43, 0, 0, 0x0c, 0x01]).expect("the window");
        assert_eq!(u64_at(&dsdt, crs + 6 + 8), dev.base);
        assert_eq!(u64_at(&dsdt, crs + 6 + 16), dev.base + 0xfff);
        assert_eq!(u64_at(&dsdt, crs + 6 + 32), 0x1000);
        assert_eq!(&dsdt[crs + 46..crs + 55], &[0x89, 6, 0, 3, 1, 5, 0, 0, 0]);
        assert!(find(b"_S5_\x12\x07\x04\x0a\x05\x00\x00\x00").is_some());
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(0), vec![1]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 bytes of contents: 65 with a two-byte PkgLength.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        assert_eq!(
            pkg_length(4000),
            vec![0x40 | (4002 & 0xf) as u8, (4002 >> 4) as u8]
        );
    }
}
