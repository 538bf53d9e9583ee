//! virtio-blk (virtio 1.2 section 5.2) backed by a raw image file.
//!
//! One request queue (queue 0). Offered features: VERSION_1, FLUSH (section 5.2.3) and,
//! for `,readonly`, RO. A request is a descriptor chain: a 16-byte device-readable header
//! (`type: u32, reserved: u32, sector: u64`), the data (device-readable for OUT,
//! device-writable for IN and GET_ID) and a one-byte device-writable status (section
//! 5.2.6). The header, data and status may be split over descriptors any way the driver
//! likes: the device reads the chain's readable bytes and writes its writable bytes as two
//! streams. Types served: IN (0), OUT (1), FLUSH (4), GET_ID (8, 20 bytes); any other gets
//! VIRTIO_BLK_S_UNSUPP, a request outside the capacity, not a multiple of 512 bytes, a
//! write to a read-only disk or a failed system call VIRTIO_BLK_S_IOERR.
//!
//! The I/O runs on the device's own thread (`devices::disk`), synchronous `pread` /
//! `pwrite` / `fdatasync` on the image, with the transport locked: a request is completed
//! whole (data, status, used entry) or not started. io_uring would let several requests
//! run at once, but the polled guest has one request in flight at a time, and a batch
//! completed under one lock hold is what makes a checkpoint see no half-done request.
//!
//! Everything written into guest memory goes through vm-memory, whose dirty bitmap the
//! replication harvest reads. Completed writes can be recorded as [`DiskWrite`]s
//! ([`Block::record_writes`]) for the epoch that produced them.

use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use crossbeam_channel::Sender;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress};

use super::{DeviceStateError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::boot::abi::VIRTIO_ID_BLOCK;
use crate::devices::disk::{Image, SECTOR};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::Waker;

/// VIRTIO_BLK_F_RO: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH: the device takes VIRTIO_BLK_T_FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request types (section 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush the device's write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Read the device ID string (20 bytes).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status values (section 5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// The request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// The request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the ID string GET_ID returns.
pub const ID_LEN: usize = 20;
const HEADER_LEN: usize = 16;
const QUEUE_SIZE: u16 = 256;
/// The largest request the device takes (4 MiB of data); a longer one gets IOERR.
const MAX_DATA: usize = 4 << 20;

/// The block device behind its transport, shared by the vCPUs (MMIO) and its I/O thread.
pub type BlockTransport = std::sync::Arc<std::sync::Mutex<super::mmio::MmioTransport<Block>>>;

/// A write the guest completed: `data` was written at byte `offset` of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    /// Byte offset in the image (a multiple of 512).
    pub offset: u64,
    /// The bytes written (a multiple of 512).
    pub data: Bytes,
}

/// Counters of completed requests (for tests and, later, metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounters {
    /// IN requests completed with OK.
    pub reads: u64,
    /// OUT requests completed with OK.
    pub writes: u64,
    /// FLUSH requests completed with OK.
    pub flushes: u64,
    /// Requests completed with IOERR or UNSUPP.
    pub errors: u64,
}

/// What the device keeps of the writes it completes (see [`Block::track_chunks`] and
/// [`Block::record_writes`]).
#[derive(Debug, Default)]
enum Recording {
    /// Nothing.
    #[default]
    Off,
    /// Which chunks of `chunk` bytes were written (one bit each): the primary's initial
    /// disk sync resends them.
    Chunks { chunk: u64, dirty: Vec<u64> },
    /// The writes themselves, for the epoch that completes them.
    Writes(Vec<DiskWrite>),
}

/// The virtio-blk device proper (its queue lives in the transport).
pub struct Block {
    image: Image,
    /// Wakes the I/O thread (a QueueNotify, a thaw).
    kick: Sender<()>,
    waker: Option<Waker>,
    /// What is kept of completed writes, for replication.
    recording: Recording,
    counters: BlockCounters,
}

impl Block {
    /// A device over `image`; notifications are passed to the I/O thread through `kick`.
    pub fn new(image: Image, kick: Sender<()>) -> Block {
        Block {
            image,
            kick,
            waker: None,
            recording: Recording::Off,
            counters: BlockCounters::default(),
        }
    }

    /// Completed requests wake vCPUs parked on the idle port through `waker`.
    pub fn set_waker(&mut self, waker: Waker) {
        self.waker = Some(waker);
    }

    /// The image's path.
    pub fn image_path(&self) -> &Path {
        &self.image.path
    }

    /// The image's size in bytes.
    pub fn image_size(&self) -> u64 {
        self.image.size
    }

    /// Whether the device is read-only.
    pub fn readonly(&self) -> bool {
        self.image.readonly
    }

    /// The counters of completed requests.
    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// Starts (or stops, forgetting them) keeping completed writes. Returns the chunks
    /// written since the last [`Block::take_dirty_chunks`] when it was tracking chunks.
    pub fn record_writes(&mut self, on: bool) -> Vec<u64> {
        let dirty = self.take_dirty_chunks();
        self.recording = if on {
            Recording::Writes(Vec::new())
        } else {
            Recording::Off
        };
        dirty
    }

    /// The writes kept since the last call.
    pub fn take_writes(&mut self) -> Vec<DiskWrite> {
        match &mut self.recording {
            Recording::Writes(w) => std::mem::take(w),
            _ => Vec::new(),
        }
    }

    /// From now on, keeps which chunks of `chunk` bytes (a power of two) are written,
    /// instead of the writes (the initial disk sync).
    pub fn track_chunks(&mut self, chunk: u64) {
        let chunks = self.image.size.div_ceil(chunk);
        self.recording = Recording::Chunks {
            chunk,
            dirty: vec![0; chunks.div_ceil(64) as usize],
        };
    }

    /// The chunks written since tracking began or the last call, in order.
    pub fn take_dirty_chunks(&mut self) -> Vec<u64> {
        let Recording::Chunks { dirty, .. } = &mut self.recording else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, w) in dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(w);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// A second handle on the image file (reads beside the I/O thread).
    pub fn image_file(&self) -> std::io::Result<std::fs::File> {
        self.image.file.try_clone()
    }

    /// Completes every request available on `q`; returns how many.
    pub fn process(&mut self, q: &mut Queue, mem: &GuestMemory) -> usize {
        let mut done = 0;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut readable = Vec::new();
            let mut writable = Vec::new();
            for d in chain {
                let seg = (d.addr().0, d.len() as usize);
                if d.is_write_only() {
                    writable.push(seg);
                } else {
                    readable.push(seg);
                }
            }
            let used = self.execute(&readable, &writable, mem);
            let _ = q.add_used(mem, head, used);
            done += 1;
        }
        if done > 0 {
            if let Some(w) = &self.waker {
                w.wake_all();
            }
        }
        done
    }

    /// Runs one request; returns the bytes written into its device-writable part.
    fn execute(
        &mut self,
        readable: &[(u64, usize)],
        writable: &[(u64, usize)],
        mem: &GuestMemory,
    ) -> u32 {
        let writable_len: usize = writable.iter().map(|s| s.1).sum();
        if writable_len == 0 {
            // Nowhere to put the status: nothing can be reported, nothing is done.
            self.counters.errors += 1;
            return 0;
        }
        let status_at = writable_len - 1;
        let mut header = [0u8; HEADER_LEN];
        let (status, data_written) = if gather(mem, readable, 0, &mut header).is_err() {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            let readable_len: usize = readable.iter().map(|s| s.1).sum();
            match kind {
                VIRTIO_BLK_T_IN => self.read(mem, writable, sector, status_at),
                VIRTIO_BLK_T_OUT => (
                    self.write(mem, readable, sector, readable_len - HEADER_LEN),
                    0,
                ),
                VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
                VIRTIO_BLK_T_GET_ID => {
                    let mut id = [0u8; ID_LEN];
                    let name = self
                        .image
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let n = name.len().min(ID_LEN);
                    id[..n].copy_from_slice(&name.as_bytes()[..n]);
                    let n = ID_LEN.min(status_at);
                    match scatter(mem, writable, 0, &id[..n]) {
                        Ok(()) => (VIRTIO_BLK_S_OK, n),
                        Err(()) => (VIRTIO_BLK_S_IOERR, 0),
                    }
                }
                _ => (VIRTIO_BLK_S_UNSUPP, 0),
            }
        };
        if status != VIRTIO_BLK_S_OK {
            self.counters.errors += 1;
        }
        let _ = scatter(mem, writable, status_at, &[status]);
        (data_written + 1) as u32
    }

    /// The byte range `[sector * 512, + len)` when it is whole sectors inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len as u64)?;
        (len as u64 % SECTOR == 0 && len <= MAX_DATA && end <= self.image.sectors() * SECTOR)
            .then_some(offset)
    }

    fn read(
        &mut self,
        mem: &GuestMemory,
        writable: &[(u64, usize)],
        sector: u64,
        len: usize,
    ) -> (u8, usize) {
        let Some(offset) = self.range(sector, len) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut buf = vec![0u8; len];
        if self.image.file.read_exact_at(&mut buf, offset).is_err()
            || scatter(mem, writable, 0, &buf).is_err()
        {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        self.counters.reads += 1;
        (VIRTIO_BLK_S_OK, len)
    }

    fn write(
        &mut self,
        mem: &GuestMemory,
        readable: &[(u64, usize)],
        sector: u64,
        len: usize,
    ) -> u8 {
        let Some(offset) = self.range(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        if self.image.readonly {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut buf = vec![0u8; len];
        if gather(mem, readable, HEADER_LEN, &mut buf).is_err()
            || self.image.file.write_all_at(&buf, offset).is_err()
        {
            return VIRTIO_BLK_S_IOERR;
        }
        self.counters.writes += 1;
        match &mut self.recording {
            // A zero-length write changes nothing.
            _ if len == 0 => {}
            Recording::Off => {}
            Recording::Chunks { chunk, dirty } => {
                for c in offset / *chunk..=(offset + len as u64 - 1) / *chunk {
                    if let Some(w) = dirty.get_mut((c / 64) as usize) {
                        *w |= 1 << (c % 64);
                    }
                }
            }
            Recording::Writes(w) => w.push(DiskWrite {
                offset,
                data: Bytes::from(buf),
            }),
        }
        VIRTIO_BLK_S_OK
    }

    fn flush(&mut self) -> u8 {
        if self.image.readonly {
            return VIRTIO_BLK_S_OK;
        }
        match self.image.file.sync_data() {
            Ok(()) => {
                self.counters.flushes += 1;
                VIRTIO_BLK_S_OK
            }
            Err(_) => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Reads `out.len()` bytes starting `skip` bytes into the stream of segments.
fn gather(mem: &GuestMemory, segs: &[(u64, usize)], skip: usize, out: &mut [u8]) -> Result<(), ()> {
    walk(segs, skip, out.len(), |addr, at, n| {
        mem.read_slice(&mut out[at..at + n], GuestAddress(addr))
            .map_err(|_| ())
    })
}

/// Writes `data` starting `skip` bytes into the stream of segments.
fn scatter(mem: &GuestMemory, segs: &[(u64, usize)], skip: usize, data: &[u8]) -> Result<(), ()> {
    walk(segs, skip, data.len(), |addr, at, n| {
        mem.write_slice(&data[at..at + n], GuestAddress(addr))
            .map_err(|_| ())
    })
}

/// Calls `f(guest_addr, offset_in_buffer, n)` for each piece of the `len` bytes that
/// start `skip` bytes into the segments; fails when the segments are too short.
fn walk(
    segs: &[(u64, usize)],
    mut skip: usize,
    len: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut at = 0;
    for &(addr, seg_len) in segs {
        if at == len {
            break;
        }
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len - at);
        f(addr.checked_add(skip as u64).ok_or(())?, at, n)?;
        at += n;
        skip = 0;
    }
    if at == len {
        Ok(())
    } else {
        Err(())
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.image.readonly {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64) first; the fields after it belong to
        // features not offered and read as zero.
        let mut config = [0u8; 8];
        config.copy_from_slice(&self.image.sectors().to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn notify(&mut self, _queue: usize, _queues: &mut [Queue], _mem: &GuestMemory) {
        // The I/O thread takes the transport's lock and processes the queue.
        let _ = self.kick.send(());
    }

    fn save(&self) -> Vec<u8> {
        BlockState {
            sectors: self.image.sectors(),
            readonly: self.image.readonly,
            path: self.image.path.to_string_lossy().into_owned(),
        }
        .to_bytes()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), DeviceStateError> {
        let saved = BlockState::from_bytes(bytes)?;
        if saved.sectors != self.image.sectors() || saved.readonly != self.image.readonly {
            return Err(DeviceStateError::DiskMismatch {
                saved: saved.describe(),
                configured: BlockState {
                    sectors: self.image.sectors(),
                    readonly: self.image.readonly,
                    path: self.image.path.to_string_lossy().into_owned(),
                }
                .describe(),
            });
        }
        Ok(())
    }
}

/// What virtio-blk saves beyond the transport: the image it had (its path, for the
/// operator, and its capacity and mode, which a restore must match). Requests are not
/// state: at a capture each one is either completed (data, status and used entry in
/// guest memory) or not yet taken from the available ring, so the restored queue takes
/// it again (see `devices::disk`). The image's contents are not in the state: a restore
/// expects the image as it was at the capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Whether the device was read-only.
    pub readonly: bool,
    /// The image's path when the state was captured (UTF-8, lossy).
    pub path: String,
}

/// The longest image path a saved state may hold, in bytes.
pub const MAX_PATH: usize = 4096;

impl BlockState {
    /// The encoding in [`super::VirtioState::device`]: `sectors: u64 LE`, `flags: u8`
    /// (bit 0 read-only, the others zero), `path_len: u32 LE`, the path's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(13 + self.path.len());
        b.extend_from_slice(&self.sectors.to_le_bytes());
        b.push(u8::from(self.readonly));
        b.extend_from_slice(&(self.path.len() as u32).to_le_bytes());
        b.extend_from_slice(self.path.as_bytes());
        b
    }

    /// Reads what [`BlockState::to_bytes`] wrote; anything else is malformed.
    pub fn from_bytes(bytes: &[u8]) -> Result<BlockState, DeviceStateError> {
        let bad = || DeviceStateError::Malformed {
            device: "virtio-blk",
            len: bytes.len(),
        };
        if bytes.len() < 13 {
            return Err(bad());
        }
        let sectors = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
        let flags = bytes[8];
        let len = u32::from_le_bytes(bytes[9..13].try_into().expect("4 bytes")) as usize;
        if flags & !1 != 0 || len > MAX_PATH || bytes.len() != 13 + len {
            return Err(bad());
        }
        let path = std::str::from_utf8(&bytes[13..])
            .map_err(|_| bad())?
            .to_string();
        Ok(BlockState {
            sectors,
            readonly: flags & 1 != 0,
            path,
        })
    }

    /// `PATH (N bytes[, read-only])`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} bytes{})",
            self.path,
            self.sectors * SECTOR,
            if self.readonly { ", read-only" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::disk::DiskConfig;
    use crate::vstate::memory;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use vm_memory::Address;

    const DESC_F_NEXT: u32 = 1;
    const DESC_F_WRITE: u32 = 2;

    #[test]
    fn block_state_round_trips_and_refuses_damage() {
        let s = BlockState {
            sectors: 2048,
            readonly: true,
            path: "/var/lib/a.img".into(),
        };
        assert_eq!(BlockState::from_bytes(&s.to_bytes()), Ok(s.clone()));
        let mut b = s.to_bytes();
        b[8] = 2;
        assert!(BlockState::from_bytes(&b).is_err());
        let b = s.to_bytes();
        assert!(BlockState::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(BlockState::from_bytes(&[0; 5]).is_err());
    }

    #[test]
    fn walk_splits_over_segments() {
        let segs = [(0x1000, 4), (0x2000, 8), (0x3000, 4)];
        let mut pieces = vec![];
        walk(&segs, 2, 12, |a, at, n| {
            pieces.push((a, at, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            pieces,
            vec![(0x1002, 0, 2), (0x2000, 2, 8), (0x3000, 10, 2)]
        );
        assert!(walk(&segs, 10, 7, |_, _, _| Ok(())).is_err());
    }

    /// A device over a fresh 1 MiB image in a temp file, and guest memory.
    fn device(name: &str, readonly: bool) -> (Block, GuestMemory, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("lockstep-blk-{}-{name}.img", std::process::id(),));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        let image = Image::open(&DiskConfig {
            path: path.clone(),
            readonly,
        })
        .unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        (
            Block::new(image, tx),
            memory::create(16 << 20).unwrap(),
            path,
        )
    }

    /// Puts one request on a mock queue at 0x10000 and processes it: header at 0x100000,
    /// data at 0x101000 (`data` bytes, device-writable for IN/GET_ID), status at 0x102000.
    fn request(
        dev: &mut Block,
        mem: &GuestMemory,
        kind: u32,
        sector: u64,
        data: &[u8],
    ) -> (u8, u32) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x10_0000)).unwrap();
        let data_write = kind != VIRTIO_BLK_T_OUT;
        if !data_write {
            mem.write_slice(data, GuestAddress(0x10_1000)).unwrap();
        }
        let mock = MockSplitQueue::new(mem, 16);
        let f = |w: bool, next: bool| {
            (if w { DESC_F_WRITE } else { 0 } | if next { DESC_F_NEXT } else { 0 }) as u16
        };
        let mut descs = vec![RawDescriptor::from(Descriptor::new(
            0x10_0000,
            16,
            f(false, true),
            1,
        ))];
        if !data.is_empty() {
            descs.push(RawDescriptor::from(Descriptor::new(
                0x10_1000,
                data.len() as u32,
                f(data_write, true),
                2,
            )));
        }
        descs.push(RawDescriptor::from(Descriptor::new(
            0x10_2000,
            1,
            f(true, false),
            0,
        )));
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert_eq!(dev.process(&mut q, mem), 1);
        let used = q.next_used();
        assert_eq!(used, 1);
        let len: u32 = mem
            .read_obj(mock.used_addr().checked_add(4 + 4).unwrap())
            .unwrap();
        let status: u8 = mem.read_obj(GuestAddress(0x10_2000)).unwrap();
        (status, len)
    }

    #[test]
    fn reads_writes_flushes_and_ids_through_a_queue() {
        let (mut dev, mem, path) = device("rw", false);
        dev.record_writes(true);
        let block: Vec<u8> = (0..4096).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(
            request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 8, &block),
            (VIRTIO_BLK_S_OK, 1)
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[4096..8192], &block[..]);
        assert_eq!(
            dev.take_writes(),
            vec![DiskWrite {
                offset: 4096,
                data: Bytes::from(block.clone())
            }]
        );
        assert!(dev.take_writes().is_empty());

        mem.write_slice(&[0u8; 4096], GuestAddress(0x10_1000))
            .unwrap();
        let (status, len) = request(&mut dev, &mem, VIRTIO_BLK_T_IN, 8, &[0u8; 4096]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 4097));
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x10_1000)).unwrap();
        assert_eq!(back, block);

        assert_eq!(
            request(&mut dev, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]),
            (VIRTIO_BLK_S_OK, 1)
        );
        let (status, len) = request(&mut dev, &mem, VIRTIO_BLK_T_GET_ID, 0, &[0u8; 20]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x10_1000)).unwrap();
        assert!(id.starts_with(b"lockstep-blk-"));

        // Past the end, not whole sectors, unknown types.
        assert_eq!(
            request(&mut dev, &mem, VIRTIO_BLK_T_IN, 2047, &[0u8; 1024]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 0, &[0u8; 100]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            request(&mut dev, &mem, 11, 0, &[0u8; 512]).0,
            VIRTIO_BLK_S_UNSUPP
        );
        assert_eq!(
            dev.counters(),
            BlockCounters {
                reads: 1,
                writes: 1,
                flushes: 1,
                errors: 3
            }
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_readonly_disk_refuses_writes_and_says_so_in_its_features() {
        let (mut dev, mem, path) = device("ro", true);
        assert_ne!(dev.features() & VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 0, &[1u8; 512]).0,
            VIRTIO_BLK_S_IOERR
        );
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let _ = std::fs::remove_file(&path);
    }

    /// A request made available while the device is frozen (a checkpoint being taken)
    /// is in no saved state but the queue's: after a restore into a new device it runs
    /// exactly once, and a request completed before the capture does not run again.
    #[test]
    fn a_request_pending_at_a_capture_runs_once_after_the_restore() {
        use super::super::mmio::MmioTransport;
        use super::super::VirtioState;
        let (dev, mem, path) = device("pending", false);
        let mock = MockSplitQueue::new(&mem, 16);
        let chain = |sector: u64, fill: u8, slot: u16| {
            let at = 0x10_0000 + u64::from(slot) * 0x4000;
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&header, GuestAddress(at)).unwrap();
            mem.write_slice(&[fill; 512], GuestAddress(at + 0x1000))
                .unwrap();
            let next = DESC_F_NEXT as u16;
            let write = DESC_F_WRITE as u16;
            let base = slot * 3;
            [
                RawDescriptor::from(Descriptor::new(at, 16, next, base + 1)),
                RawDescriptor::from(Descriptor::new(at + 0x1000, 512, next, base + 2)),
                RawDescriptor::from(Descriptor::new(at + 0x2000, 1, write, 0)),
            ]
        };
        mock.add_desc_chains(&chain(0, 0xaa, 0), 0).unwrap();
        let q: Queue = mock.create_queue().unwrap();
        let mut first = MmioTransport::new(dev, mem.clone());
        first
            .restore(&VirtioState {
                device_id: VIRTIO_ID_BLOCK,
                status: 1 | 2 | 4 | 8,
                driver_features: VIRTIO_F_VERSION_1,
                queues: vec![q.state()],
                device: first.device.save(),
                ..VirtioState::default()
            })
            .unwrap();
        let process = |t: &mut MmioTransport<Block>| {
            // What the I/O thread does on a kick.
            if !t.is_active() {
                return 0;
            }
            let MmioTransport { device, queues, .. } = t;
            device.process(&mut queues[0], &mem)
        };
        assert_eq!(process(&mut first), 1);

        // Frozen for a capture: the guest's next request and its notification find a
        // device that leaves the queue alone.
        first.set_frozen(true);
        mock.add_desc_chains(&chain(1, 0xbb, 1), 3).unwrap();
        first.write(0x50, &0u32.to_le_bytes());
        assert_eq!(process(&mut first), 0);
        let saved = first.save();
        drop(first);
        let image = std::fs::read(&path).unwrap();
        assert!(image[..512].iter().all(|&b| b == 0xaa));
        assert!(image[512..1024].iter().all(|&b| b == 0), "ran while frozen");

        // Restored (a restore, a promotion): the pending request runs, once.
        let image = Image::open(&DiskConfig {
            path: path.clone(),
            readonly: false,
        })
        .unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let mut second = MmioTransport::new(Block::new(image, tx), mem.clone());
        second.restore(&saved).unwrap();
        assert_eq!(process(&mut second), 1);
        assert_eq!(process(&mut second), 0);
        assert_eq!(
            second.device.counters().writes,
            1,
            "the first write ran again"
        );
        let image = std::fs::read(&path).unwrap();
        assert!(image[512..1024].iter().all(|&b| b == 0xbb));
        let used_idx: u16 = mem
            .read_obj(mock.used_addr().checked_add(2).unwrap())
            .unwrap();
        assert_eq!(used_idx, 2);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn restore_checks_capacity_and_mode() {
        let (mut dev, _mem, path) = device("restore", false);
        let saved = dev.save();
        assert!(dev.restore(&saved).is_ok());
        let other = BlockState {
            sectors: 4096,
            readonly: false,
            path: "/elsewhere.img".into(),
        };
        let e = dev.restore(&other.to_bytes()).unwrap_err().to_string();
        assert!(e.contains("/elsewhere.img (2097152 bytes)"), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
