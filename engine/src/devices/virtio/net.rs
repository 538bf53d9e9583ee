//! virtio-net (virtio 1.2 section 5.1) backed by a tap device.
//!
//! Queue 0 receives, queue 1 transmits. Offered features: VERSION_1 and MAC; no offloads,
//! so every buffer starts with a 12-byte `virtio_net_hdr_v1` that is all zero but for
//! `num_buffers = 1` on receive. Transmit runs on the vCPU thread that wrote QueueNotify;
//! receive runs on the device's own thread ([`spawn_rx`]), which reads the tap, fills the
//! guest's receive buffers and wakes vCPUs parked on the idle port.
//!
//! Everything the device writes into guest memory goes through vm-memory, whose dirty
//! bitmap the replication harvest reads, so received frames and used-ring updates are
//! replicated like the guest's own writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress};

use super::mmio::MmioTransport;
use super::{DeviceStateError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::boot::abi::VIRTIO_ID_NET;
use crate::devices::egress::Egress;
use crate::devices::lock;
use crate::devices::tap::Tap;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::Waker;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const HDR_LEN: usize = 12;
/// The largest frame without offloads (Ethernet header + 1500 + VLAN tag), plus slack.
const MAX_FRAME: usize = 1522;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// The virtio-net device proper (its queues live in the transport).
pub struct Net {
    mac: [u8; 6],
    egress: Arc<Egress>,
    /// A frame read from the tap that found no receive buffer yet.
    pending_rx: Option<Vec<u8>>,
    waker: Option<Waker>,
    /// TX stopped because the egress buffer was full; retried after a release.
    tx_blocked: bool,
}

impl Net {
    /// A device with MAC `mac` whose transmitted frames go to `egress`.
    pub fn new(mac: [u8; 6], egress: Arc<Egress>) -> Net {
        Net {
            mac,
            egress,
            pending_rx: None,
            waker: None,
            tx_blocked: false,
        }
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether TX stopped on a full egress buffer (and waits for a release to go on).
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked
    }

    /// Received frames wake vCPUs parked on the idle port through `waker`.
    pub fn set_waker(&mut self, waker: Waker) {
        self.waker = Some(waker);
    }

    fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemory) {
        self.tx_blocked = false;
        loop {
            if !self.egress.has_room(MAX_FRAME) {
                self.tx_blocked = true;
                return;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return;
            };
            let head = chain.head_index();
            let mut frame = Vec::with_capacity(HDR_LEN + MAX_FRAME);
            for desc in chain.readable() {
                let len = (desc.len() as usize).min(HDR_LEN + 65535 - frame.len());
                let start = frame.len();
                frame.resize(start + len, 0);
                if mem.read_slice(&mut frame[start..], desc.addr()).is_err() {
                    frame.truncate(start);
                    break;
                }
            }
            // Used length 0: the device wrote nothing into a TX buffer.
            let _ = q.add_used(mem, head, 0);
            if frame.len() > HDR_LEN {
                let f = Bytes::from(frame).slice(HDR_LEN..);
                if self.egress.send(f).is_err() {
                    // has_room said yes; a refusal here means the frame is larger than
                    // the whole buffer, which MAX_FRAME rules out. Count it as a drop.
                    self.tx_blocked = false;
                }
            }
        }
    }

    /// Puts `frame` into the next receive buffer; false when the guest posted none.
    fn deliver(&mut self, q: &mut Queue, mem: &GuestMemory, frame: &[u8]) -> bool {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut hdr = [0u8; HDR_LEN];
        hdr[10] = 1; // num_buffers
        let mut src = hdr.iter().chain(frame.iter()).copied();
        let total = HDR_LEN + frame.len();
        let mut written = 0usize;
        for desc in chain.writable() {
            let n = (desc.len() as usize).min(total - written);
            let chunk: Vec<u8> = src.by_ref().take(n).collect();
            if mem
                .write_slice(&chunk, GuestAddress(desc.addr().0))
                .is_err()
            {
                break;
            }
            written += n;
            if written == total {
                break;
            }
        }
        let _ = q.add_used(mem, head, written as u32);
        if let Some(w) = &self.waker {
            w.wake_all();
        }
        true
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], then status (absent: VIRTIO_NET_F_STATUS is not offered).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn notify(&mut self, queue: usize, queues: &mut [Queue], mem: &GuestMemory) {
        match queue {
            TX => self.process_tx(&mut queues[TX], mem),
            RX => {
                if let Some(frame) = self.pending_rx.take() {
                    if !self.deliver(&mut queues[RX], mem, &frame) {
                        self.pending_rx = Some(frame);
                    }
                }
            }
            _ => {}
        }
    }

    fn save(&self) -> Vec<u8> {
        NetState { mac: self.mac }.to_bytes()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), DeviceStateError> {
        let state = NetState::from_bytes(bytes);
        if state.as_ref().map(|s| s.mac) != Ok(self.mac) {
            return Err(DeviceStateError::MacMismatch {
                saved: format_mac(bytes),
                configured: format_mac(&self.mac),
            });
        }
        self.pending_rx = None;
        Ok(())
    }
}

/// What virtio-net saves beyond the transport (as Firecracker's
/// `devices/virtio/net/persist.rs`): the MAC it was created with. Frames in flight are
/// not state: a frame waiting for a receive buffer is dropped on restore, as a lossy wire
/// would; the guest's TCP retransmits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetState {
    /// The device's MAC address.
    pub mac: [u8; 6],
}

impl NetState {
    /// The encoding in [`super::VirtioState::device`]: the six bytes of the MAC.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.mac.to_vec()
    }

    /// Reads what [`NetState::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<NetState, DeviceStateError> {
        let mac = bytes.try_into().map_err(|_| DeviceStateError::Malformed {
            device: "virtio-net",
            len: bytes.len(),
        })?;
        Ok(NetState { mac })
    }
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// The net device behind its transport, shared by the vCPUs (MMIO), the receive thread and output commit.
pub type NetTransport = Arc<Mutex<MmioTransport<Net>>>;

/// The receive thread: tap → guest. Stops when `stop` is set.
pub fn spawn_rx(net: NetTransport, tap: Arc<Tap>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("net-rx".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                // A frame still waiting for a receive buffer: let the guest post some
                // (QueueNotify on queue 0 delivers it) before reading more.
                let waiting = lock(&net).device.pending_rx.is_some();
                if waiting {
                    lock(&net).kick(RX);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    continue;
                }
                if !tap.wait_readable(100) {
                    continue;
                }
                let n = match tap.read_frame(&mut buf) {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                let frame = buf[..n].to_vec();
                let mut t = lock(&net);
                let active = t.is_active();
                let mem = t.memory().clone();
                let MmioTransport { device, queues, .. } = &mut *t;
                if !(active && device.deliver(&mut queues[RX], &mem, &frame)) {
                    device.pending_rx = Some(frame);
                }
            }
        })
        .expect("spawn the net-rx thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_state_round_trips_and_refuses_other_lengths() {
        let s = NetState {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        };
        assert_eq!(NetState::from_bytes(&s.to_bytes()), Ok(s));
        assert_eq!(
            NetState::from_bytes(&[1, 2, 3]),
            Err(DeviceStateError::Malformed {
                device: "virtio-net",
                len: 3
            })
        );
    }

    #[test]
    fn macs_parse_and_format() {
        let mac = parse_mac("52:54:00:12:34:5f").unwrap();
        assert_eq!(format_mac(&mac), "52:54:00:12:34:5f");
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:zz"), None);
    }
}
