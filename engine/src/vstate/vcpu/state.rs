//! A vCPU's state as KVM holds it: what is saved at a checkpoint and loaded on restore
//! or promotion, and the vCPU thread's save and restore of it.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;

use super::{VcpuError, VcpuThread};

/// Everything KVM holds for one vCPU.
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// The x87/SSE state (legacy FXSAVE area).
    pub fpu: kvm_fpu,
    /// The XSAVE area (legacy 4 KiB layout).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The MSRs KVM lists that this vCPU can read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Run state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            // kvm_xsave ends in a flexible array (always empty here), so it is not Clone.
            xsave: zerocopy::FromBytes::read_from_bytes(zerocopy::IntoBytes::as_bytes(&self.xsave))
                .expect("same type, same size"),
            msrs: self.msrs.clone(),
            ..*self
        }
    }
}

/// The MSRs of the index list that this vCPU can actually read (KVM lists some that are
/// only valid with features the guest's CPUID lacks).
pub(super) fn readable_msrs(fd: &VcpuFd, index: u32, list: &[u32]) -> Result<Vec<u32>, VcpuError> {
    let mut ok = Vec::with_capacity(list.len());
    for &msr in list {
        let mut one = msrs_of(
            &[kvm_msr_entry {
                index: msr,
                ..Default::default()
            }],
            index,
        )?;
        if fd.get_msrs(&mut one).unwrap_or(0) == 1 {
            ok.push(msr);
        }
    }
    Ok(ok)
}

pub(super) fn msrs_of(entries: &[kvm_msr_entry], index: u32) -> Result<Msrs, VcpuError> {
    Msrs::from_entries(entries).map_err(|_| VcpuError::Msrs {
        index,
        set: 0,
        total: entries.len(),
        msr: 0,
    })
}

impl VcpuThread {
    pub(super) fn save(&self) -> Result<VcpuState, VcpuError> {
        let fd = &self.fd;
        let mut entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(&entries, self.index)?;
        let n = fd.get_msrs(&mut msrs).map_err(self.err("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                set: n,
                total: entries.len(),
                msr: entries[n].index,
            });
        }
        entries.copy_from_slice(msrs.as_slice());
        Ok(VcpuState {
            regs: fd.get_regs().map_err(self.err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?,
            fpu: fd.get_fpu().map_err(self.err("KVM_GET_FPU"))?,
            xsave: fd.get_xsave().map_err(self.err("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(self.err("KVM_GET_XCRS"))?,
            msrs: entries,
            lapic: fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))?,
            events: fd
                .get_vcpu_events()
                .map_err(self.err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(self.err("KVM_GET_MP_STATE"))?,
            debugregs: fd.get_debug_regs().map_err(self.err("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Loads a saved state, in the order Firecracker uses (sregs before the MSRs that
    /// depend on EFER, LAPIC before events).
    pub(super) fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let fd = &self.fd;
        fd.set_mp_state(s.mp_state)
            .map_err(self.err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(self.err("KVM_SET_REGS"))?;
        fd.set_sregs(&s.sregs).map_err(self.err("KVM_SET_SREGS"))?;
        fd.set_fpu(&s.fpu).map_err(self.err("KVM_SET_FPU"))?;
        // SAFETY: `s.xsave` is a full `kvm_xsave` as returned by KVM_GET_XSAVE (the legacy
        // 4 KiB layout); this VM never enabled KVM_CAP_XSAVE2, so KVM reads exactly that size.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(self.err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(self.err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(self.err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(self.err("KVM_SET_LAPIC"))?;
        let msrs = msrs_of(&s.msrs, self.index)?;
        let n = fd.set_msrs(&msrs).map_err(self.err("KVM_SET_MSRS"))?;
        if n != s.msrs.len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                set: n,
                total: s.msrs.len(),
                msr: s.msrs[n].index,
            });
        }
        fd.set_vcpu_events(&s.events)
            .map_err(self.err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
