//! The virtio-mmio transport, version 2 ("modern"), virtio 1.2 section 4.2.2.

use virtio_queue::{Queue, QueueT};

use super::{VirtioDevice, VirtioRestoreError, VirtioState, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4c4b_5354; // "LKST"

const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// One virtio device at one MMIO window.
pub struct MmioTransport<D: VirtioDevice> {
    /// The device behind the transport.
    pub device: D,
    /// The device's virtqueues, as the driver set them up.
    pub queues: Vec<Queue>,
    mem: GuestMemory,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// While set (a checkpoint is being taken), nothing touches guest memory.
    frozen: bool,
    /// The interrupt line (an irqfd), for a guest that takes interrupts; `None` for the
    /// reference guest, which polls.
    irq: Option<vmm_sys_util::eventfd::EventFd>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A reset transport for `device` over guest memory `mem`.
    pub fn new(device: D, mem: GuestMemory) -> MmioTransport<D> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue max sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            queues,
            mem,
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            frozen: false,
            irq: None,
        }
    }

    /// Raises `irq` (an eventfd registered as an irqfd) whenever the device puts buffers
    /// in a used ring, with bit 0 (used buffer notification) of InterruptStatus set, as
    /// virtio 1.2 section 4.2.3.4 has it; the driver acknowledges through InterruptACK.
    pub fn set_irq(&mut self, irq: vmm_sys_util::eventfd::EventFd) {
        self.irq = Some(irq);
    }

    /// Lets the device process `queue`, and interrupts the driver when a used ring moved.
    fn notify_device(&mut self, queue: usize) {
        let before: Vec<u16> = self.queues.iter().map(|q| q.next_used()).collect();
        self.device.notify(queue, &mut self.queues, &self.mem);
        let moved = self
            .queues
            .iter()
            .zip(before)
            .any(|(q, b)| q.next_used() != b);
        if moved {
            if let Some(irq) = &self.irq {
                const USED_BUFFER: u32 = 1;
                self.interrupt_status |= USED_BUFFER;
                // A full eventfd counter still has the interrupt pending: nothing is lost.
                let _ = irq.write(1);
            }
        }
    }

    /// The guest memory the queues live in.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Whether the driver finished initialization and the device may use the queues.
    pub fn is_active(&self) -> bool {
        const DRIVER_OK: u32 = 4;
        self.status & DRIVER_OK != 0 && self.status & STATUS_FAILED == 0 && !self.frozen
    }

    /// While frozen the device leaves guest memory alone (a consistent point is being captured); notifications wait until thawed.
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// Lets the device make progress on `queue` (used when a backend becomes ready).
    pub fn kick(&mut self, queue: usize) {
        if self.is_active() {
            self.notify_device(queue);
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A driver read of the register at `offset` in the MMIO window (virtio 1.2 section 4.2.2).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_id(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected().map_or(0, |q| q.max_size() as u32),
            0x044 => self.selected().map_or(0, |q| q.ready() as u32),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        write_le(data, v);
    }

    /// A driver write of the register at `offset` in the MMIO window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // No device here has writable configuration.
            return;
        }
        let v = read_le(data);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                    if v == 1 && !q.is_valid(&mem) {
                        q.set_ready(false);
                        self.status |= STATUS_FAILED;
                    }
                }
            }
            0x050 if self.is_active() => {
                self.notify_device(v as usize);
            }
            0x064 => self.interrupt_status &= !v,
            0x070 => self.set_status(v),
            0x080 => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self
                .selected()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // FEATURES_OK does not stick: the driver reads it back and gives up.
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.status = v;
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// The transport's registers, the queues' state and the device's own state.
    pub fn save(&self) -> VirtioState {
        VirtioState {
            device_id: self.device.device_id(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state()).collect(),
            device: self.device.save(),
        }
    }

    /// Loads what [`MmioTransport::save`] produced into a device of the same type.
    pub fn restore(&mut self, s: &VirtioState) -> Result<(), VirtioRestoreError> {
        if s.device_id != self.device.device_id() || s.queues.len() != self.queues.len() {
            return Err(VirtioRestoreError::Mismatch {
                saved_id: s.device_id,
                saved_queues: s.queues.len(),
                device_id: self.device.device_id(),
                queues: self.queues.len(),
            });
        }
        let queues = s
            .queues
            .iter()
            .map(|&qs| Queue::try_from(qs).map_err(VirtioRestoreError::Queue))
            .collect::<Result<Vec<_>, _>>()?;
        self.device.restore(&s.device)?;
        self.queues = queues;
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        Ok(())
    }
}

fn write_le(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

fn read_le(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}
