//! The state of a whole machine at a consistent point (every vCPU paused): what a snapshot
//! and a checkpoint epoch carry besides guest memory.

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, KVM_MAX_CPUID_ENTRIES};
use virtio_queue::QueueState;
use vm_superio::serial::SerialState;

use crate::devices::virtio::VirtioState;
use crate::machine::Platform;

use super::{PersistError, Reader, Writer};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Upper bound on vCPUs in a blob, so a corrupt count cannot make us allocate wildly.
const MAX_VCPUS_IN_BLOB: u32 = 256;
const MAX_MSRS: u64 = 4096;

/// Everything a checkpoint or snapshot holds besides guest RAM.
#[derive(Clone)]
pub struct MachineState {
    /// What the machine runs (it decides how the devices are wired on restore).
    pub platform: Platform,
    /// The CPUID the vCPUs were given (each vCPU's APIC id is set on restore).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Bytes of guest RAM the state belongs to.
    pub mem_size: u64,
    /// Each vCPU's state, in vCPU order.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip, PIT and clock.
    pub vm: VmState,
    /// The UART.
    pub serial: SerialState,
    /// The virtio devices, in device order.
    pub virtio: Vec<VirtioState>,
}

impl MachineState {
    /// Appends the state to a payload.
    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.platform.code());
        w.u32(self.cpuid.len() as u32);
        for e in &self.cpuid {
            w.pod(e);
        }
        w.u64(self.mem_size);
        w.u32(self.vcpus.len() as u32);
        for v in &self.vcpus {
            encode_vcpu(w, v);
        }
        w.pod(&self.vm.pic_master);
        w.pod(&self.vm.pic_slave);
        w.pod(&self.vm.ioapic);
        w.pod(&self.vm.pit);
        w.pod(&self.vm.clock);
        encode_serial(w, &self.serial);
        w.u32(self.virtio.len() as u32);
        for v in &self.virtio {
            encode_virtio(w, v);
        }
    }

    /// Reads what [`MachineState::encode`] wrote.
    pub fn decode(r: &mut Reader<'_>) -> Result<MachineState, PersistError> {
        let code = r.u32("platform")?;
        let platform = Platform::from_code(code)
            .ok_or_else(|| PersistError::Malformed(format!("platform {code}")))?;
        let n = r.u32("CPUID entry count")?;
        if n == 0 || n > KVM_MAX_CPUID_ENTRIES as u32 {
            return Err(PersistError::Malformed(format!("CPUID entry count {n}")));
        }
        let cpuid = (0..n)
            .map(|_| r.pod("CPUID entry"))
            .collect::<Result<Vec<kvm_cpuid_entry2>, _>>()?;
        let mem_size = r.u64("memory size")?;
        let n = r.u32("vCPU count")?;
        if n == 0 || n > MAX_VCPUS_IN_BLOB {
            return Err(PersistError::Malformed(format!("vCPU count {n}")));
        }
        let vcpus = (0..n)
            .map(|_| decode_vcpu(r))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmState {
            pic_master: r.pod("PIC master")?,
            pic_slave: r.pod("PIC slave")?,
            ioapic: r.pod("IOAPIC")?,
            pit: r.pod("PIT")?,
            clock: r.pod("KVM clock")?,
        };
        let serial = decode_serial(r)?;
        let n = r.u32("virtio device count")?;
        if n > crate::boot::abi::MAX_VIRTIO as u32 {
            return Err(PersistError::Malformed(format!("virtio device count {n}")));
        }
        let virtio = (0..n)
            .map(|_| decode_virtio(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            platform,
            cpuid,
            mem_size,
            vcpus,
            vm,
            serial,
            virtio,
        })
    }

    /// The state alone, sealed (header, version, checksum).
    pub fn to_blob(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode(&mut w);
        super::seal(&w.buf)
    }

    /// Reads a blob [`MachineState::to_blob`] sealed.
    pub fn from_blob(blob: &[u8]) -> Result<MachineState, PersistError> {
        let mut r = Reader::new(super::unseal(blob)?);
        let s = MachineState::decode(&mut r)?;
        r.finish()?;
        Ok(s)
    }
}

fn encode_vcpu(w: &mut Writer, v: &VcpuState) {
    w.pod(&v.regs);
    w.pod(&v.sregs);
    encode_fpu(w, &v.fpu);
    w.pod(&v.xsave);
    w.pod(&v.xcrs);
    w.u64(v.msrs.len() as u64);
    for m in &v.msrs {
        w.pod(m);
    }
    w.pod(&v.lapic);
    w.pod(&v.events);
    w.pod(&v.mp_state);
    w.pod(&v.debugregs);
}

fn decode_vcpu(r: &mut Reader<'_>) -> Result<VcpuState, PersistError> {
    let regs = r.pod("regs")?;
    let sregs = r.pod("sregs")?;
    let fpu = decode_fpu(r)?;
    let xsave = r.pod("xsave")?;
    let xcrs = r.pod("xcrs")?;
    let n = r.u64("MSR count")?;
    if n > MAX_MSRS {
        return Err(PersistError::Malformed(format!("MSR count {n}")));
    }
    let msrs = (0..n)
        .map(|_| r.pod("MSR"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VcpuState {
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        msrs,
        lapic: r.pod("LAPIC")?,
        events: r.pod("vCPU events")?,
        mp_state: r.pod("MP state")?,
        debugregs: r.pod("debug registers")?,
    })
}

/// kvm_fpu has no zerocopy impls in kvm-bindings; its fields are written one by one.
fn encode_fpu(w: &mut Writer, f: &kvm_fpu) {
    for r in &f.fpr {
        w.buf.extend_from_slice(r);
    }
    w.u32(u32::from(f.fcw) | u32::from(f.fsw) << 16);
    w.u32(u32::from(f.ftwx) | u32::from(f.last_opcode) << 16);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for x in &f.xmm {
        w.buf.extend_from_slice(x);
    }
    w.u32(f.mxcsr);
}

fn decode_fpu(r: &mut Reader<'_>) -> Result<kvm_fpu, PersistError> {
    let mut f = kvm_fpu::default();
    for reg in f.fpr.iter_mut() {
        *reg = r.pod("fpu")?;
    }
    let a = r.u32("fpu")?;
    let b = r.u32("fpu")?;
    if b & 0xff00 != 0 {
        return Err(PersistError::Malformed(format!(
            "fpu: padding byte is {:#x}, expected 0",
            (b >> 8) & 0xff
        )));
    }
    f.fcw = a as u16;
    f.fsw = (a >> 16) as u16;
    f.ftwx = b as u8;
    f.last_opcode = (b >> 16) as u16;
    f.last_ip = r.u64("fpu")?;
    f.last_dp = r.u64("fpu")?;
    for x in f.xmm.iter_mut() {
        *x = r.pod("fpu")?;
    }
    f.mxcsr = r.u32("fpu")?;
    Ok(f)
}

fn encode_serial(w: &mut Writer, s: &SerialState) {
    for b in [
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ] {
        w.u8(b);
    }
    w.bytes(&s.in_buffer);
}

fn decode_serial(r: &mut Reader<'_>) -> Result<SerialState, PersistError> {
    Ok(SerialState {
        baud_divisor_low: r.u8("serial")?,
        baud_divisor_high: r.u8("serial")?,
        interrupt_enable: r.u8("serial")?,
        interrupt_identification: r.u8("serial")?,
        line_control: r.u8("serial")?,
        line_status: r.u8("serial")?,
        modem_control: r.u8("serial")?,
        modem_status: r.u8("serial")?,
        scratch: r.u8("serial")?,
        in_buffer: r.bytes("serial input")?.to_vec(),
    })
}

fn encode_virtio(w: &mut Writer, v: &VirtioState) {
    for x in [
        v.device_id,
        v.status,
        v.device_features_sel,
        v.driver_features_sel,
        v.queue_sel,
        v.interrupt_status,
        v.config_generation,
    ] {
        w.u32(x);
    }
    w.u64(v.driver_features);
    w.u32(v.queues.len() as u32);
    for q in &v.queues {
        w.u32(u32::from(q.max_size) | u32::from(q.size) << 16);
        w.u32(u32::from(q.next_avail) | u32::from(q.next_used) << 16);
        w.u8(u8::from(q.ready) | u8::from(q.event_idx_enabled) << 1);
        w.u64(q.desc_table);
        w.u64(q.avail_ring);
        w.u64(q.used_ring);
    }
    w.bytes(&v.device);
}

fn decode_virtio(r: &mut Reader<'_>) -> Result<VirtioState, PersistError> {
    let mut v = VirtioState {
        device_id: r.u32("virtio")?,
        status: r.u32("virtio")?,
        device_features_sel: r.u32("virtio")?,
        driver_features_sel: r.u32("virtio")?,
        queue_sel: r.u32("virtio")?,
        interrupt_status: r.u32("virtio")?,
        config_generation: r.u32("virtio")?,
        driver_features: r.u64("virtio")?,
        ..Default::default()
    };
    let n = r.u32("virtqueue count")?;
    if n > 16 {
        return Err(PersistError::Malformed(format!("virtqueue count {n}")));
    }
    for _ in 0..n {
        let sizes = r.u32("virtqueue")?;
        let idx = r.u32("virtqueue")?;
        let flags = r.u8("virtqueue")?;
        if flags & !3 != 0 {
            return Err(PersistError::Malformed(format!(
                "virtqueue flags {flags:#x}: unknown bits"
            )));
        }
        v.queues.push(QueueState {
            max_size: sizes as u16,
            size: (sizes >> 16) as u16,
            next_avail: idx as u16,
            next_used: (idx >> 16) as u16,
            ready: flags & 1 != 0,
            event_idx_enabled: flags & 2 != 0,
            desc_table: r.u64("virtqueue")?,
            avail_ring: r.u64("virtqueue")?,
            used_ring: r.u64("virtqueue")?,
        });
    }
    v.device = r.bytes("virtio device state")?.to_vec();
    Ok(v)
}
