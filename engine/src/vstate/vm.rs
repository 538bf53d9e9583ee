//! The KVM VM: system fd, VM fd, memory slots with dirty logging, in-kernel irqchip and
//! PIT, and the VM-wide state (irqchip, PIT, clock).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use super::memory::{self, GuestMemory};

/// Creating the VM, or saving or restoring its state, failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (lockstep needs KVM and permission to use it)")]
    OpenKvm(kvm_ioctls::Error),
    /// The dirty ring could not be turned on.
    #[error(transparent)]
    Ring(#[from] super::dirty_ring::RingError),
    /// A KVM ioctl failed.
    #[error("KVM ioctl {what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// MSRs a guest's state includes that KVM's index list leaves out (QEMU saves them by
/// name too): the MTRRs (variable pairs 0x200..0x20f, the fixed ranges, the default type
/// 0x2ff), PAT (0x277) and IA32_MISC_ENABLE (0x1a0). A Linux guest reads its memory types
/// from them; lost on a restore, it would find the MTRRs off. Those a vCPU cannot read are
/// dropped per vCPU, as for the index list.
const ARCH_MSRS_TO_SAVE: [std::ops::RangeInclusive<u32>; 7] = [
    0x200..=0x20f,
    0x250..=0x250,
    0x258..=0x259,
    0x268..=0x26f,
    0x277..=0x277,
    0x2ff..=0x2ff,
    0x1a0..=0x1a0,
];

/// Where KVM keeps its real-mode TSS (three pages just below 4 GiB, never RAM here).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The KVM VM: the system and VM fds, guest memory registered as slots with dirty logging, and the MSRs KVM saves.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemory,
    msr_list: Vec<u32>,
    manual_protect: bool,
}

/// The VM-wide device state kept in the kernel. The GSI routing is KVM's default (made by
/// `KVM_CREATE_IRQCHIP`: GSI n to PIC pin n below 16 and to IOAPIC pin n) and never changed,
/// so a restored VM has the same routes; what the guest programmed (the IOAPIC's
/// redirection table, the PICs' masks and modes, pending IRRs) is in the irqchip state.
#[derive(Clone)]
pub struct VmState {
    /// The master PIC.
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
}

impl Vm {
    /// Opens KVM, creates the VM with its irqchip and PIT, and registers `memory` with dirty
    /// logging enabled on every slot.
    pub fn new(memory: GuestMemory) -> Result<Vm, VmError> {
        Vm::with_dirty_ring(memory, None)
    }

    /// Like [`Vm::new`]; with `ring` entries, dirty pages are tracked by the dirty ring
    /// instead of the bitmap.
    pub fn with_dirty_ring(memory: GuestMemory, ring: Option<u32>) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        // KVM_CREATE_VM fails with EINTR when a signal is pending on the thread while the
        // kernel registers the VM's MMU notifier (`mm_take_all_locks`); seen once in a
        // promotion. Nothing was created: try again (a few times, not forever).
        let mut tries = 0;
        let fd = loop {
            match kvm.create_vm() {
                Err(e) if e.errno() == libc::EINTR && tries < 100 => tries += 1,
                r => break r.map_err(kvm_err("KVM_CREATE_VM"))?,
            }
        };
        // Before any slot has dirty logging on.
        let manual_protect = match ring {
            Some(entries) => {
                super::dirty_ring::enable(&fd, entries)?;
                false
            }
            None => super::dirty::enable_manual_protect(&fd),
        };
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        for (slot, (gpa, host, len)) in memory::regions(&memory).into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa,
                memory_size: len as u64,
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which this Vm keeps for
            // as long as the VM fd (and so the slot) exists.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let mut msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        for msr in ARCH_MSRS_TO_SAVE.iter().cloned().flatten() {
            if !msr_list.contains(&msr) {
                msr_list.push(msr);
            }
        }
        Ok(Vm {
            kvm,
            fd,
            memory,
            msr_list,
            manual_protect,
        })
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// A harvester for this VM's dirty pages.
    pub fn dirty_log(&self) -> super::dirty::DirtyLog {
        super::dirty::DirtyLog::new(self.manual_protect)
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// MSRs that every vCPU saves and restores.
    pub fn msr_list(&self) -> &[u32] {
        &self.msr_list
    }

    /// The CPUID KVM supports, given to every vCPU.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Captures the in-kernel irqchip, PIT and clock.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads what [`Vm::save_state`] captured.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        // The flags KVM_GET_CLOCK reports (TSC_STABLE, REALTIME, HOST_TSC) describe that
        // host's clock; restoring takes the guest clock value alone.
        //
        // Guest time across a restore or a promotion. The vCPUs' MSR_IA32_TSC is restored
        // with their MSRs; on a host with hardware virtualization KVM then offsets the
        // guest's TSC so it goes on from the captured value. The KVM on our machines (PVM,
        // a shadow-paging hypervisor that runs guest CPL3 code natively) does not: found
        // by experiment, restoring after a 3 s delay, reading MSR_IA32_TSC back and
        // watching the guest's own `rdtsc`:
        //   - KVM_SET_MSRS of MSR_IA32_TSC: accepted (returns 1), ignored: reads back as
        //     the host TSC, and the guest's rdtsc jumps by the delay;
        //   - MSR_IA32_TSC_ADJUST: stored (reads back), no effect on rdtsc;
        //   - KVM_SET_DEVICE_ATTR KVM_VCPU_TSC_CTRL / KVM_VCPU_TSC_OFFSET: HAS and SET
        //     succeed, GET reads 0 afterwards, no effect on rdtsc;
        //   - KVM_SET_CLOCK: honoured. KVM_GET_CLOCK right after returns the captured value
        //     plus microseconds, and kvmclock (MSR_KVM_SYSTEM_TIME_NEW, the pvclock record
        //     KVM keeps in guest memory) goes on from there.
        // So the reference guest reads its time from kvmclock (the boot ABI gives it the
        // record's address), and this clock restore is what keeps its time continuous:
        // it resumes where it was captured, however long the snapshot sat on disk.
        let clock = kvm_clock_data {
            flags: 0,
            ..state.clock
        };
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
