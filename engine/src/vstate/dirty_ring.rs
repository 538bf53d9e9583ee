//! The KVM dirty ring (`KVM_CAP_DIRTY_LOG_RING`): each vCPU pushes the pages it dirties
//! into a ring shared with the VMM, which harvests the entries, marks them collected and
//! asks KVM to re-protect them (`KVM_RESET_DIRTY_RINGS`).
//!
//! The alternative to the bitmap in [`super::dirty`], selected per VM at creation (the two
//! are exclusive). A full ring stops its vCPU (`KVM_EXIT_DIRTY_RING_FULL`) until the next
//! harvest: the guest is throttled, memory stays bounded.

use std::sync::atomic::{fence, Ordering};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xAE;
/// The ioctl number of `KVM_RESET_DIRTY_RINGS`, which kvm-ioctls does not wrap.
mod ioctls {
    use super::*;
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use ioctls::KVM_RESET_DIRTY_RINGS;

const F_DIRTY: u32 = 1;
const F_RESET: u32 = 2;

/// The dirty ring could not be set up or reset.
#[derive(Debug, Error)]
pub enum RingError {
    /// KVM refused the ring size.
    #[error("KVM has no dirty ring of {entries} entries: {source}")]
    Enable {
        /// Entries asked for per vCPU.
        entries: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A vCPU's ring could not be mapped (its index, and the error).
    #[error("cannot map vCPU {index}'s dirty ring: {source}")]
    Map {
        /// The vCPU.
        index: u32,
        /// The error from `mmap`.
        source: std::io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    Reset(std::io::Error),
}

/// Turns the ring on for `vm`; before any vCPU exists. `entries` is a power of two.
pub fn enable(vm: &VmFd, entries: u32) -> Result<(), RingError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        args: [
            u64::from(entries) * std::mem::size_of::<kvm_dirty_gfn>() as u64,
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|source| RingError::Enable { entries, source })
}

/// One vCPU's ring, mapped from its fd.
pub struct DirtyRing {
    gfns: *mut kvm_dirty_gfn,
    entries: u32,
    next: u32,
}

// SAFETY: the mapping is process-wide memory shared with KVM; the ring is only read and
// written through this struct (one owner at a time, behind the Machine's lock).
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps vCPU `index`'s ring of `entries` entries from its fd.
    pub fn map(vcpu: &VcpuFd, index: u32, entries: u32) -> Result<DirtyRing, RingError> {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        use std::os::fd::{AsRawFd, BorrowedFd};
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: the vCPU fd is open for as long as `vcpu` is borrowed, which covers the call.
        let fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
        // SAFETY: mapping a fresh region (no address hint, so nothing existing is replaced)
        // of the vCPU fd at the offset KVM documents for the dirty ring; the mapping is
        // unmapped in Drop.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                u64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * 4096,
            )
        }
        .map_err(|e| RingError::Map {
            index,
            source: e.into(),
        })?;
        Ok(DirtyRing {
            gfns: p.cast(),
            entries,
            next: 0,
        })
    }

    /// Collects the dirty entries as `(slot, page offset in slot)`, marking each collected.
    pub fn harvest(&mut self, out: &mut impl FnMut(u32, u64)) {
        loop {
            let i = (self.next % self.entries) as usize;
            // SAFETY: `i < entries`, inside the mapping; KVM writes the entry before setting
            // its DIRTY flag, so the flag is read first (volatile) and then fenced.
            let e = unsafe { self.gfns.add(i) };
            // SAFETY: as above; `e` points at a live, aligned kvm_dirty_gfn.
            let flags = unsafe { std::ptr::read_volatile(&raw const (*e).flags) };
            if flags & F_DIRTY == 0 {
                return;
            }
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            out(slot, offset);
            fence(Ordering::Release);
            // SAFETY: as above; setting RESET hands the entry back to KVM.
            unsafe { std::ptr::write_volatile(&raw mut (*e).flags, F_RESET) };
            self.next = self.next.wrapping_add(1);
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly the region mapped in `map`, which nothing uses after
        // this.
        let _ = unsafe { rustix::mm::munmap(self.gfns.cast(), len) };
    }
}

/// Asks KVM to re-protect every entry marked collected.
pub fn reset(vm: &VmFd) -> Result<(), RingError> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is a VM fd.
    let r = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if r < 0 {
        return Err(RingError::Reset(std::io::Error::last_os_error()));
    }
    Ok(())
}
