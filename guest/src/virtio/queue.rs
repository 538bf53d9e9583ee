//! A split virtqueue (virtio 1.2, section 2.7), driven by polling: no interrupts, no
//! `VIRTIO_F_EVENT_IDX`.
//!
//! Descriptor `i` always describes buffer `i` of its owner (the net driver keeps one
//! buffer per descriptor, never chains), so making a buffer available is writing its
//! index into the available ring, and the used ring hands back the same index. The block
//! driver chains descriptors 0, 1, 2 of one request ([`Queue::set_chained`]).

use alloc::alloc::{alloc_zeroed, Layout};
use core::sync::atomic::{fence, Ordering};

use crate::abi::PAGE_SIZE;

/// Descriptor flag: the chain goes on in descriptor `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (receive buffers).
pub const DESC_F_WRITE: u16 = 2;

/// One entry of the descriptor table.
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One entry of the used ring.
#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

/// The driver's side of one split virtqueue, in page-aligned guest RAM.
pub struct Queue {
    size: u16,
    desc: *mut Desc,
    /// `flags: u16, idx: u16, ring: [u16; size], used_event: u16`.
    avail: *mut u16,
    /// `flags: u16, idx: u16, ring: [UsedElem; size], avail_event: u16`.
    used: *mut u16,
    /// The available index as the driver counts it (published by [`Queue::publish`]).
    next_avail: u16,
    /// The next used entry the driver has not consumed yet.
    next_used: u16,
}

/// Zeroed, page-aligned memory of `bytes` bytes that lives for the rest of the guest.
pub fn pages(bytes: usize) -> *mut u8 {
    let size = bytes.next_multiple_of(PAGE_SIZE as usize);
    let layout = Layout::from_size_align(size, PAGE_SIZE as usize).expect("a valid layout");
    // SAFETY: a non-zero size with a power-of-two alignment.
    let ptr = unsafe { alloc_zeroed(layout) };
    if ptr.is_null() {
        alloc::alloc::handle_alloc_error(layout);
    }
    ptr
}

impl Queue {
    /// A queue of `size` entries (a power of two, at most 32768), all three parts zeroed.
    pub fn new(size: u16) -> Queue {
        debug_assert!(size.is_power_of_two());
        let n = usize::from(size);
        Queue {
            size,
            desc: pages(16 * n).cast(),
            avail: pages(6 + 2 * n).cast(),
            used: pages(6 + 8 * n).cast(),
            next_avail: 0,
            next_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available and used rings (the
    /// guest is identity mapped).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Points descriptor `id` at `len` bytes at guest address `addr`.
    pub fn set_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16) {
        assert!(id < self.size);
        // SAFETY: `id` is inside the descriptor table, which this queue owns; the device
        // reads a descriptor only after it appears in the available ring, and `publish`
        // orders this write before that.
        unsafe {
            self.desc.add(usize::from(id)).write_volatile(Desc {
                addr,
                len,
                flags,
                next: 0,
            })
        };
    }

    /// Points descriptor `id` at `len` bytes at `addr`, followed in its chain by
    /// descriptor `next` (DESC_F_NEXT is added to `flags`).
    pub fn set_chained(&mut self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(id < self.size && next < self.size);
        // SAFETY: as in `set_desc`: inside the table, read by the device only once
        // published.
        unsafe {
            self.desc.add(usize::from(id)).write_volatile(Desc {
                addr,
                len,
                flags: flags | DESC_F_NEXT,
                next,
            })
        };
    }

    /// Adds descriptor `id` to the available ring; the device sees it after `publish`.
    pub fn push(&mut self, id: u16) {
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: ring entry `slot` of the available ring (after its two header fields);
        // the device reads entries only below the published index, and this one is not.
        unsafe { self.avail.add(2 + slot).write_volatile(id) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes every pushed descriptor visible to the device (the caller then notifies).
    pub fn publish(&mut self) {
        // The descriptors and ring entries must be visible before the index that
        // covers them (section 2.7.13).
        fence(Ordering::Release);
        // SAFETY: the available ring's `idx` field, which only the driver writes.
        unsafe { self.avail.add(1).write_volatile(self.next_avail) };
        fence(Ordering::SeqCst);
    }

    /// Whether the device has used a buffer the driver has not taken yet.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.next_used
    }

    /// The next buffer the device has finished with: its descriptor and the number of
    /// bytes the device wrote into it.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.next_used {
            return None;
        }
        // The entry was written before the index that covers it (section 2.7.14).
        fence(Ordering::Acquire);
        let slot = usize::from(self.next_used % self.size);
        // SAFETY: entry `slot` of the used ring (after the 4-byte header), below the
        // device's published index, so the device no longer writes it.
        let elem = unsafe {
            self.used
                .add(2)
                .cast::<UsedElem>()
                .add(slot)
                .read_volatile()
        };
        self.next_used = self.next_used.wrapping_add(1);
        let id = u16::try_from(elem.id)
            .ok()
            .filter(|id| *id < self.size)
            .expect("the device used a descriptor index outside the queue");
        Some((id, elem.len))
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring's `idx` field, which the device updates; read volatile.
        unsafe { self.used.add(1).read_volatile() }
    }
}
