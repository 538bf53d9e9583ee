//! Emulated devices and the bus that routes vCPU port and MMIO exits to them.

pub mod disk;
pub mod egress;
pub mod journal;
pub mod serial;
pub mod tap;
pub mod virtio;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;

use crate::boot::abi::{
    VirtioDeviceInfo, MMIO_BASE, MMIO_DEVICE_SIZE, SERIAL_PORT, VIRTIO_ID_BLOCK, VIRTIO_ID_NET,
};
use crate::boot::linux::acpi::SLEEP_CONTROL_PORT;
use disk::BlockDevice;
use egress::Egress;
use serial::SerialDevice;
use tap::{Tap, TapError};
use virtio::mmio::MmioTransport;
use virtio::net::{Net, NetTransport};
use virtio::{VirtioRestoreError, VirtioState};

/// `--net tap=NAME,mac=MAC`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap device's name (at most 15 bytes).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

impl std::str::FromStr for NetConfig {
    type Err = NetConfigError;

    /// Parses `tap=NAME,mac=aa:bb:cc:dd:ee:ff` (the MAC defaults to 52:54:00:12:34:56).
    fn from_str(s: &str) -> Result<NetConfig, NetConfigError> {
        let mut tap = None;
        let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
                Some(("mac", v)) => {
                    mac = virtio::net::parse_mac(v)
                        .ok_or_else(|| NetConfigError::BadMac(v.to_string()))?
                }
                _ => return Err(NetConfigError::Shape(s.to_string())),
            }
        }
        let tap = tap.ok_or_else(|| NetConfigError::NoTap(s.to_string()))?;
        Ok(NetConfig { tap, mac })
    }
}

/// A `--net` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    /// The MAC is not six hex bytes separated by ':' (the MAC given).
    #[error("--net: bad MAC '{0}'")]
    BadMac(String),
    /// A part is neither `tap=NAME` nor `mac=MAC` (the value given).
    #[error("--net {0}: expected tap=NAME[,mac=aa:bb:cc:dd:ee:ff]")]
    Shape(String),
    /// `tap=NAME` is missing (the value given).
    #[error("--net {0}: tap=NAME is required")]
    NoTap(String),
}

/// The virtio-net device with its tap, egress path and receive thread.
pub struct NetDevice {
    transport: NetTransport,
    egress: Arc<Egress>,
    /// Guest-physical address of the device's MMIO window.
    pub base: u64,
    rx_stop: Arc<AtomicBool>,
    rx_thread: Mutex<Option<JoinHandle<()>>>,
    tap: Arc<Tap>,
}

impl NetDevice {
    /// Opens the tap `cfg.tap` and builds the device over guest memory `mem`; the receive thread starts with [`NetDevice::start`].
    pub fn new(
        cfg: &NetConfig,
        mem: crate::vstate::memory::GuestMemory,
    ) -> Result<NetDevice, TapError> {
        let tap = Arc::new(Tap::open(&cfg.tap)?);
        let egress = Arc::new(Egress::new(Arc::clone(&tap)));
        let net = Net::new(cfg.mac, Arc::clone(&egress));
        Ok(NetDevice {
            transport: Arc::new(Mutex::new(MmioTransport::new(net, mem))),
            egress,
            base: MMIO_BASE,
            rx_stop: Arc::new(AtomicBool::new(false)),
            rx_thread: Mutex::new(None),
            tap,
        })
    }

    /// What the boot info tells the guest about the device.
    pub fn info(&self) -> VirtioDeviceInfo {
        VirtioDeviceInfo {
            base: self.base,
            size: MMIO_DEVICE_SIZE,
            device_id: VIRTIO_ID_NET,
            _reserved: 0,
        }
    }

    /// Starts receiving; received frames wake vCPUs through `waker`.
    pub fn start(&self, waker: crate::vstate::vcpu::Waker) {
        lock(&self.transport).device.set_waker(waker);
        *lock(&self.rx_thread) = Some(virtio::net::spawn_rx(
            Arc::clone(&self.transport),
            Arc::clone(&self.tap),
            Arc::clone(&self.rx_stop),
        ));
    }

    /// Interrupts the guest through `irq` (an irqfd) when the device uses buffers.
    pub fn set_irq(&self, irq: vmm_sys_util::eventfd::EventFd) {
        lock(&self.transport).set_irq(irq);
    }

    /// Announces the guest's MAC on the tap: three RARP frames, as QEMU sends after a live
    /// migration, so that bridges and switches learn the new port at once.
    pub fn announce(&self) {
        let mac = lock(&self.transport).device.mac();
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x80, 0x35]); // ethertype RARP
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 3]); // Ethernet/IPv4, op 3
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
        f.resize(60, 0);
        for _ in 0..3 {
            let _ = self.tap.write_frame(&f);
        }
    }

    /// Sends `frames` on the tap before the guest runs: the output of committed epochs
    /// that a dead primary may still have held (a promotion). Returns how many went out.
    pub fn replay(&self, frames: &[Bytes]) -> usize {
        self.egress.replay(frames)
    }

    /// The handle the replication roles steer output commit with.
    pub fn output(&self) -> OutputCommit {
        OutputCommit {
            egress: Arc::clone(&self.egress),
            transport: Arc::clone(&self.transport),
        }
    }
}

/// Output commit (Remus, section 3.2 of the paper; invariant 2 of the architecture
/// notes): while protected, every frame the guest transmits is held, tagged with the epoch
/// open when it was sent, until the backup has committed that epoch.
///
/// The whole API the primary uses: [`protect`](Self::protect) once, before the first
/// epoch; [`begin_epoch`](Self::begin_epoch) at every checkpoint, with the guest paused;
/// [`commit`](Self::commit) when the backup acknowledges an epoch (from any thread);
/// [`unprotect`](Self::unprotect) when the backup is gone and the primary runs on alone.
/// Nothing else touches the device's transport or TX queue.
#[derive(Clone)]
pub struct OutputCommit {
    egress: Arc<Egress>,
    transport: NetTransport,
}

impl OutputCommit {
    /// Holds output from now on; frames sent from now on belong to `epoch` (the first
    /// epoch the primary will take).
    ///
    /// Returns the protection's session, which [`commit`](Self::commit) takes: acks from
    /// an earlier protection's backup never release this one's frames.
    pub fn protect(&self, epoch: u64) -> u64 {
        self.egress.set_open_epoch(epoch);
        self.egress.protect()
    }

    /// Frames sent from now on belong to `epoch` and leave once [`commit`](Self::commit)
    /// reaches it. Called with the guest paused, as a checkpoint is taken.
    pub fn begin_epoch(&self, epoch: u64) {
        self.egress.set_open_epoch(epoch);
    }

    /// The frames held for `epoch` of protection `session` and the last epoch released
    /// before it (see [`Egress::held_of`](egress::Egress::held_of)): shipped to the backup
    /// with the epoch.
    pub fn held_of(&self, session: u64, epoch: u64) -> (u64, Vec<Bytes>) {
        self.egress.held_of(session, epoch)
    }

    /// Whether the guest sent output since the last [`begin_epoch`](Self::begin_epoch)
    /// that waits for a checkpoint not yet taken (an early checkpoint shortens its wait).
    pub fn output_waits(&self) -> bool {
        self.egress.open_output()
    }

    /// `waker` gets a message (when it has room) each time output starts to wait: the
    /// first frame held after a [`begin_epoch`](Self::begin_epoch), so the epoch loop can
    /// sleep rather than poll [`output_waits`](Self::output_waits).
    pub fn wake_on_output(&self, waker: crossbeam_channel::Sender<()>) {
        self.egress.wake_on_output(waker);
    }

    /// The backup of protection `session` committed every epoch up to `epoch`: their
    /// frames leave, in order, and a TX queue that stopped on a full buffer is processed
    /// again. An ack of another session releases nothing.
    pub fn commit(&self, session: u64, epoch: u64) {
        self.egress.release(session, epoch);
        kick_blocked_tx(&self.transport);
    }

    /// Stops holding: everything held leaves, in order, and output goes straight out from
    /// now on (the backup is gone, or fenced, and the primary continues unprotected).
    pub fn unprotect(&self) {
        self.egress.unprotect();
        kick_blocked_tx(&self.transport);
    }

    /// Hold time p50 and p99 in µs, and the number of frames ever held.
    pub fn hold_times(&self) -> (u64, u64, u64) {
        self.egress.hold_times()
    }

    /// Frames held now (waiting for an ack, or for the backup to be fenced).
    pub fn held_frames(&self) -> u64 {
        self.egress.held_frames()
    }

    /// Frames sent to the tap, and those the tap refused.
    pub fn counters(&self) -> egress::EgressCounters {
        self.egress.counters()
    }

    /// The egress buffer's figures (held packets and bytes now, hold times) with the
    /// frames sent and refused, read together (for the metrics).
    pub fn stats(&self) -> (netbuffer::Stats, egress::EgressCounters) {
        self.egress.stats()
    }

    /// Whether `other` steers the same network device.
    pub fn same_device(&self, other: &OutputCommit) -> bool {
        Arc::ptr_eq(&self.egress, &other.egress)
    }
}

/// Processes the TX queue again if it stopped on a full egress buffer.
fn kick_blocked_tx(transport: &NetTransport) {
    let mut t = lock(transport);
    if t.device.tx_blocked() {
        t.kick(1);
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.rx_stop.store(true, Ordering::Relaxed);
        if let Some(t) = lock(&self.rx_thread).take() {
            let _ = t.join();
        }
    }
}

/// Where vCPU threads send the port and MMIO accesses that KVM hands to userspace.
pub trait Bus: Send + Sync {
    /// A port read of `data.len()` bytes at `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A port write of `data` at `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// An MMIO read of `data.len()` bytes at guest-physical `addr`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// An MMIO write of `data` at guest-physical `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// The VM's devices.
pub struct Devices {
    /// The 16550 UART on COM1.
    pub serial: Mutex<SerialDevice>,
    /// The virtio-net device, if the machine has one.
    pub net: Option<NetDevice>,
    /// The virtio-blk devices, in `--disk` order (MMIO windows after the net device's).
    pub disks: Vec<BlockDevice>,
}

/// The MMIO window of the `index`th disk: after the net device's, whether or not the
/// machine has one, so a disk's address does not depend on `--net`.
pub fn disk_base(index: usize) -> u64 {
    MMIO_BASE + (index as u64 + 1) * MMIO_DEVICE_SIZE
}

impl Devices {
    fn net_at(&self, addr: u64) -> Option<(&NetDevice, u64)> {
        self.net
            .as_ref()
            .filter(|n| addr >= n.base && addr < n.base + MMIO_DEVICE_SIZE)
            .map(|n| (n, addr - n.base))
    }

    fn disk_at(&self, addr: u64) -> Option<(&BlockDevice, u64)> {
        self.disks
            .iter()
            .find(|d| d.contains(addr))
            .map(|d| (d, addr - d.base))
    }

    /// Stops devices from touching guest memory (a consistent point is being captured).
    /// A disk request being completed is finished first (freezing waits for the disk's
    /// lock), so none is half done at the capture.
    pub fn freeze(&self) {
        if let Some(n) = &self.net {
            lock(&n.transport).set_frozen(true);
        }
        for d in &self.disks {
            lock(d.transport()).set_frozen(true);
        }
    }

    /// Lets devices touch guest memory again, and lets through what waited during the freeze.
    pub fn thaw(&self) {
        if let Some(n) = &self.net {
            let mut t = lock(&n.transport);
            t.set_frozen(false);
            // Whatever waited during the freeze (a received frame, blocked output).
            t.kick(0);
            if t.device.tx_blocked() {
                t.kick(1);
            }
        }
        for d in &self.disks {
            let mut t = lock(d.transport());
            t.set_frozen(false);
            // Requests made available while frozen (or restored, not yet taken).
            t.kick(0);
        }
    }

    /// The state of every virtio device, in device order: the net device, then the disks.
    pub fn save_virtio(&self) -> Vec<VirtioState> {
        self.net
            .iter()
            .map(|n| lock(&n.transport).save())
            .chain(self.disks.iter().map(|d| lock(d.transport()).save()))
            .collect()
    }

    /// Loads the virtio devices' state saved by [`Devices::save_virtio`]; the devices configured now must match those saved.
    pub fn restore_virtio(&self, states: &[VirtioState]) -> Result<(), DevicesRestoreError> {
        let nets: Vec<_> = states
            .iter()
            .filter(|s| s.device_id == VIRTIO_ID_NET)
            .collect();
        let disks: Vec<_> = states
            .iter()
            .filter(|s| s.device_id == VIRTIO_ID_BLOCK)
            .collect();
        if let Some(other) = states
            .iter()
            .find(|s| s.device_id != VIRTIO_ID_NET && s.device_id != VIRTIO_ID_BLOCK)
        {
            return Err(DevicesRestoreError::UnknownDevice(other.device_id));
        }
        match (&self.net, nets.as_slice()) {
            (None, []) => {}
            (Some(n), [s]) => lock(&n.transport).restore(s)?,
            (None, _) => return Err(DevicesRestoreError::NetMissing),
            (Some(_), _) => return Err(DevicesRestoreError::NetUnexpected),
        }
        if disks.len() != self.disks.len() {
            let saved = disks
                .iter()
                .map(|s| {
                    virtio::block::BlockState::from_bytes(&s.device)
                        .map_or_else(|_| "?".to_string(), |b| b.describe())
                })
                .collect::<Vec<_>>();
            return Err(DevicesRestoreError::Disks {
                saved: disks.len(),
                images: if saved.is_empty() {
                    "none".into()
                } else {
                    saved.join(", ")
                },
                configured: self.disks.len(),
            });
        }
        for (d, s) in self.disks.iter().zip(disks) {
            lock(d.transport()).restore(s)?;
        }
        Ok(())
    }
}

/// The saved devices do not fit the devices configured now.
#[derive(Debug, thiserror::Error)]
pub enum DevicesRestoreError {
    /// The saved machine had a network device; none is configured.
    #[error("the saved machine has a virtio-net device: give --net tap=NAME")]
    NetMissing,
    /// A network device is configured; the saved machine had none.
    #[error("the saved machine has no virtio-net device: drop --net")]
    NetUnexpected,
    /// The saved machine had another number of disks than `--disk` gives.
    #[error(
        "the saved machine has {saved} virtio-blk device(s) (images: {images}); {configured} \
         --disk given: give --disk path=FILE for each, in the same order, each image as it \
         was when the state was captured"
    )]
    Disks {
        /// Disks saved.
        saved: usize,
        /// The saved images, `PATH (N bytes)`, comma separated (or "none").
        images: String,
        /// Disks configured now.
        configured: usize,
    },
    /// The saved state has a virtio device of a type this lockstep does not know.
    #[error("the saved machine has a virtio device of unknown type {0}")]
    UnknownDevice(u32),
    /// The saved virtio device's state does not load.
    #[error(transparent)]
    Virtio(#[from] VirtioRestoreError),
}

const SERIAL_PORTS: std::ops::Range<u16> = SERIAL_PORT..SERIAL_PORT + 8;
/// The i8042's data (0x60) and status/command (0x64) ports.
const I8042_PORTS: [u16; 2] = [0x60, 0x64];

impl Bus for Devices {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if SERIAL_PORTS.contains(&port) && data.len() == 1 {
            data[0] = lock(&self.serial).read((port - SERIAL_PORT) as u8);
        } else if I8042_PORTS.contains(&port) || port == SLEEP_CONTROL_PORT {
            // An i8042 with nothing to read and room for a command: enough for Linux's
            // `reboot=k` (it waits for an empty input buffer, then sends the pulse reset
            // the vCPU thread acts on). The ACPI sleep status register: nothing to report
            // (a write of S5 to the control register ends the run in the vCPU thread).
            data.fill(0);
        } else {
            // Nothing there: an open bus reads as all ones.
            data.fill(0xff);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if SERIAL_PORTS.contains(&port) && data.len() == 1 {
            lock(&self.serial).write((port - SERIAL_PORT) as u8, data[0]);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some((n, offset)) = self.net_at(addr) {
            lock(&n.transport).read(offset, data);
        } else if let Some((d, offset)) = self.disk_at(addr) {
            lock(d.transport()).read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((n, offset)) = self.net_at(addr) {
            lock(&n.transport).write(offset, data);
        } else if let Some((d, offset)) = self.disk_at(addr) {
            lock(d.transport()).write(offset, data);
        }
    }
}

/// Locks a device mutex; a device is plain data, so a panic elsewhere leaves it usable.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_config_parses_with_typed_errors_and_one_line_messages() {
        let c: NetConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac, [2, 0, 0, 0, 0, 1]);
        let d: NetConfig = "tap=tap1".parse().unwrap();
        assert_eq!(d.mac, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(
            "mac=02:00:00:00:00:01".parse::<NetConfig>(),
            Err(NetConfigError::NoTap("mac=02:00:00:00:00:01".into()))
        );
        assert_eq!(
            "tap=t,mac=nope".parse::<NetConfig>(),
            Err(NetConfigError::BadMac("nope".into()))
        );
        assert_eq!(
            "tap=t,speed=10"
                .parse::<NetConfig>()
                .unwrap_err()
                .to_string(),
            "--net tap=t,speed=10: expected tap=NAME[,mac=aa:bb:cc:dd:ee:ff]"
        );
    }
}
