//! `--disk path=FILE[,readonly]`: a raw disk image, opened and locked, and the virtio-blk
//! device over it with its I/O thread.
//!
//! The image is opened read-write (read-only with `,readonly`) and locked with `flock`:
//! exclusively for read-write, shared for read-only, so two lockstep processes never
//! write one image (nor one writes what another reads). The lock goes with the process.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};
use rustix::fs::{flock, FlockOperation};
use thiserror::Error;

use super::virtio::block::{Block, BlockTransport, DiskWrite};
use super::virtio::mmio::MmioTransport;
use super::{journal, lock};
use crate::boot::abi::{VirtioDeviceInfo, MMIO_DEVICE_SIZE, VIRTIO_ID_BLOCK};
use crate::info;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::Waker;

/// The smallest image accepted, in bytes (1 MiB).
pub const MIN_IMAGE_BYTES: u64 = 1 << 20;
/// virtio-blk's sector, in bytes (virtio 1.2 section 5.2.4: capacity counts 512-byte
/// sectors whatever the block size).
pub const SECTOR: u64 = 512;

/// `--disk path=FILE[,readonly]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// The guest may only read (VIRTIO_BLK_F_RO); the image is opened read-only.
    pub readonly: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = DiskConfigError;

    /// Parses `path=FILE[,readonly]`.
    fn from_str(s: &str) -> Result<DiskConfig, DiskConfigError> {
        let mut path = None;
        let mut readonly = false;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                None if part == "readonly" => readonly = true,
                _ => return Err(DiskConfigError::Shape(s.to_string())),
            }
        }
        let path = path.ok_or_else(|| DiskConfigError::NoPath(s.to_string()))?;
        Ok(DiskConfig { path, readonly })
    }
}

/// A `--disk` value that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiskConfigError {
    /// A part is neither `path=FILE` nor `readonly` (the value given).
    #[error("--disk {0}: expected path=FILE[,readonly]")]
    Shape(String),
    /// `path=FILE` is missing (the value given).
    #[error("--disk {0}: path=FILE is required")]
    NoPath(String),
}

/// A disk image that cannot be used. Each message is one line naming the image.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The image could not be opened (missing, unreadable, not writable).
    #[error("--disk {path}: cannot open the image {how}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// "read-write" or "read-only".
        how: &'static str,
        /// The error from the file system.
        source: io::Error,
    },
    /// The path is not a regular file.
    #[error("--disk {path}: is a {kind}, not a disk image file")]
    NotAFile {
        /// The image.
        path: PathBuf,
        /// "directory", "block device", ...
        kind: &'static str,
    },
    /// The file has no write permission and `,readonly` was not given.
    #[error(
        "--disk {path}: the image is read-only (mode {mode:03o}); give path={path},readonly \
         or make it writable"
    )]
    ReadOnly {
        /// The image.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The image is smaller than [`MIN_IMAGE_BYTES`].
    #[error("--disk {path}: the image is {size} bytes; a disk image must have at least {MIN_IMAGE_BYTES} bytes (1 MiB)")]
    TooSmall {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// Another process holds the image's lock.
    #[error("--disk {path}: the image is in use by another lockstep (or another process holds its lock)")]
    InUse {
        /// The image.
        path: PathBuf,
    },
    /// The image was left in the middle of an initial sync (its journal says so).
    #[error("--disk {path}: the image was left in the middle of an initial sync from a primary and matches no epoch; give it to `lockstep backup --disk` again (its sync repairs it) or restore it from a copy")]
    MidSync {
        /// The image.
        path: PathBuf,
    },
    /// The image's journal could not be read or replayed.
    #[error("--disk {path}: {source}")]
    Journal {
        /// The image.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A backup could not reserve the image's blocks.
    #[error("--disk {path}: cannot reserve the image's {size} bytes on its file system: {source}")]
    Reserve {
        /// The image.
        path: PathBuf,
        /// The image's size.
        size: u64,
        /// The error.
        source: io::Error,
    },
    /// Reading the image's metadata or taking its lock failed otherwise.
    #[error("--disk {path}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// An open, locked disk image.
pub struct Image {
    /// The file, read-write unless `readonly`.
    pub file: File,
    /// The path it was opened by.
    pub path: PathBuf,
    /// Its size in bytes (the device's capacity is this in [`SECTOR`]s, rounded down).
    pub size: u64,
    /// Opened read-only; the guest may not write.
    pub readonly: bool,
}

impl Image {
    /// Opens and locks the image `cfg` names, checking that it can serve as a disk. An
    /// image a backup was applying an epoch to is completed first (its journal, see
    /// [`journal`](super::journal)); one left in the middle of an initial sync is refused.
    pub fn open(cfg: &DiskConfig) -> Result<Image, DiskError> {
        let image = Image::open_locked(cfg)?;
        match image.recover(false)? {
            journal::Recovered::Syncing => Err(DiskError::MidSync { path: image.path }),
            r => {
                if let Some(line) = r.describe(&image.path) {
                    info!("{line}");
                }
                Ok(image)
            }
        }
    }

    /// Opens an image for a backup (`lockstep backup --disk`): read-write whatever the
    /// guest's mode (the backup writes the primary's data into it), its journal completed
    /// (a mid-sync mark cleared: the sync that follows repairs it), and every block
    /// reserved on the file system, so that applying an epoch never meets a full disk
    /// half-way (a full file system shows at start, or on the journal, before the image
    /// is touched).
    pub fn open_for_backup(cfg: &DiskConfig) -> Result<(Image, journal::Recovered), DiskError> {
        let image = Image::open_locked(&DiskConfig {
            path: cfg.path.clone(),
            readonly: false,
        })?;
        let recovered = image.recover(true)?;
        rustix::fs::fallocate(
            &image.file,
            rustix::fs::FallocateFlags::empty(),
            0,
            image.size,
        )
        .map_err(|e| DiskError::Reserve {
            path: image.path.clone(),
            size: image.size,
            source: e.into(),
        })?;
        Ok((
            Image {
                readonly: cfg.readonly,
                ..image
            },
            recovered,
        ))
    }

    fn recover(&self, clear_syncing: bool) -> Result<journal::Recovered, DiskError> {
        if self.readonly {
            // A read-only open cannot complete a journal; one that exists means the image
            // is not complete.
            if journal::path_of(&self.path).exists() {
                return Err(DiskError::Journal {
                    path: self.path.clone(),
                    source: io::Error::other(
                        "the image has a journal to complete: open it read-write once first",
                    ),
                });
            }
            return Ok(journal::Recovered::Clean);
        }
        journal::recover(&self.path, &self.file, clear_syncing).map_err(|source| {
            DiskError::Journal {
                path: self.path.clone(),
                source,
            }
        })
    }

    fn open_locked(cfg: &DiskConfig) -> Result<Image, DiskError> {
        let path = cfg.path.clone();
        let io_err = |source| DiskError::Io {
            path: path.clone(),
            source,
        };
        // Whatever the path is, say so before trying to open it as a file.
        if let Ok(meta) = std::fs::metadata(&path) {
            let ft = meta.file_type();
            if !ft.is_file() {
                return Err(DiskError::NotAFile {
                    path,
                    kind: file_kind(&ft),
                });
            }
            let mode = meta.permissions().mode() & 0o777;
            if !cfg.readonly && mode & 0o222 == 0 {
                // Root could write it anyway; a file nobody may write is not meant to be.
                return Err(DiskError::ReadOnly { path, mode });
            }
        }
        let how = if cfg.readonly {
            "read-only"
        } else {
            "read-write"
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&path)
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                how,
                source,
            })?;
        let op = if cfg.readonly {
            FlockOperation::NonBlockingLockShared
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        match flock(&file, op) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(DiskError::InUse { path }),
            Err(e) => return Err(io_err(e.into())),
        }
        let size = file.metadata().map_err(io_err)?.len();
        if size < MIN_IMAGE_BYTES {
            return Err(DiskError::TooSmall { path, size });
        }
        if size % SECTOR != 0 {
            crate::warn!(
                "--disk {}: the image is {size} bytes, not a whole number of {SECTOR}-byte \
                 sectors: the guest sees {} bytes, the last {} are out of its reach",
                path.display(),
                size / SECTOR * SECTOR,
                size % SECTOR
            );
        }
        Ok(Image {
            file,
            path,
            size,
            readonly: cfg.readonly,
        })
    }

    /// The capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR
    }
}

fn file_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "directory"
    } else if ft.is_block_device() {
        "block device (only image files are supported)"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// A virtio-blk device over an image, with the thread that does its I/O.
pub struct BlockDevice {
    transport: BlockTransport,
    /// Guest-physical address of the device's MMIO window.
    pub base: u64,
    kicks: Sender<()>,
    kicked: Mutex<Option<Receiver<()>>>,
    stop: Arc<AtomicBool>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl BlockDevice {
    /// Opens `cfg`'s image and builds the device at MMIO window `base` over guest memory
    /// `mem`; its I/O thread starts with [`BlockDevice::start`].
    pub fn new(cfg: &DiskConfig, base: u64, mem: GuestMemory) -> Result<BlockDevice, DiskError> {
        let image = Image::open(cfg)?;
        let (kicks, kicked) = unbounded();
        let block = Block::new(image, kicks.clone());
        Ok(BlockDevice {
            transport: Arc::new(Mutex::new(MmioTransport::new(block, mem))),
            base,
            kicks,
            kicked: Mutex::new(Some(kicked)),
            stop: Arc::new(AtomicBool::new(false)),
            worker: Mutex::new(None),
        })
    }

    /// What the boot info tells the guest about the device.
    pub fn info(&self) -> VirtioDeviceInfo {
        VirtioDeviceInfo {
            base: self.base,
            size: MMIO_DEVICE_SIZE,
            device_id: VIRTIO_ID_BLOCK,
            _reserved: 0,
        }
    }

    /// Whether `addr` is in the device's MMIO window.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.base + MMIO_DEVICE_SIZE
    }

    /// The device behind its transport (MMIO accesses, freeze, save and restore).
    pub fn transport(&self) -> &BlockTransport {
        &self.transport
    }

    /// The image's path and size in bytes.
    pub fn image(&self) -> (PathBuf, u64) {
        let t = lock(&self.transport);
        (t.device.image_path().to_path_buf(), t.device.image_size())
    }

    /// Whether the guest may write the image.
    pub fn writable(&self) -> bool {
        !lock(&self.transport).device.readonly()
    }

    /// Starts the I/O thread; completed requests wake vCPUs through `waker`.
    pub fn start(&self, waker: Waker) {
        let Some(kicked) = lock(&self.kicked).take() else {
            return;
        };
        lock(&self.transport).device.set_waker(waker);
        *lock(&self.worker) = Some(spawn_worker(
            Arc::clone(&self.transport),
            kicked,
            Arc::clone(&self.stop),
        ));
    }

    /// Keeps every completed write as a [`DiskWrite`] from now on, for
    /// [`BlockDevice::take_writes`] (`false`: stops, and forgets what was kept).
    pub fn record_writes(&self, on: bool) -> Vec<u64> {
        lock(&self.transport).device.record_writes(on)
    }

    /// Keeps which chunks of `chunk` bytes are written from now on (see
    /// [`BlockDevice::take_dirty_chunks`]), instead of the writes.
    pub fn track_chunks(&self, chunk: u64) {
        lock(&self.transport).device.track_chunks(chunk);
    }

    /// The chunks written since tracking began or the last call. Together with
    /// [`BlockDevice::record_writes`], which returns the last of them as it switches to
    /// keeping writes, no write is missed: each is either in a chunk taken after it
    /// completed or kept as a write.
    pub fn take_dirty_chunks(&self) -> Vec<u64> {
        lock(&self.transport).device.take_dirty_chunks()
    }

    /// A second handle on the image file, for reads beside the I/O thread.
    pub fn image_file(&self) -> std::io::Result<File> {
        lock(&self.transport).device.image_file()
    }

    /// The writes completed since the last call, in completion order. Taken while the
    /// device is frozen (a checkpoint), they are exactly the writes of the epoch that
    /// ends there: a request is completed whole under the transport's lock, and a frozen
    /// device completes none.
    pub fn take_writes(&self) -> Vec<DiskWrite> {
        lock(&self.transport).device.take_writes()
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.kicks.send(());
        if let Some(t) = lock(&self.worker).take() {
            let _ = t.join();
        }
    }
}

/// The I/O thread: each kick (a QueueNotify, a thaw) makes it complete every request the
/// guest has made available, with the transport locked throughout. So a request is
/// either still in the available ring (not started: the queue's saved `next_avail` is
/// before it, and it runs after a restore or promotion) or completed with its used
/// entry written; never half done when the device is frozen for a capture, since
/// freezing takes the same lock.
fn spawn_worker(
    transport: BlockTransport,
    kicked: Receiver<()>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("virtio-blk".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if kicked.recv().is_err() {
                    return;
                }
                while kicked.try_recv().is_ok() {}
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let mut t = lock(&transport);
                if !t.is_active() {
                    continue;
                }
                let mem = t.memory().clone();
                let MmioTransport { device, queues, .. } = &mut *t;
                device.process(&mut queues[0], &mem);
            }
        })
        .expect("spawn the virtio-blk thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn disk_config_parses_with_one_line_errors() {
        let c: DiskConfig = "path=/tmp/a.img".parse().unwrap();
        assert_eq!(c.path, PathBuf::from("/tmp/a.img"));
        assert!(!c.readonly);
        let r: DiskConfig = "path=/tmp/a.img,readonly".parse().unwrap();
        assert!(r.readonly);
        assert_eq!(
            "readonly".parse::<DiskConfig>(),
            Err(DiskConfigError::NoPath("readonly".into()))
        );
        assert_eq!(
            "path=x,cache=none"
                .parse::<DiskConfig>()
                .unwrap_err()
                .to_string(),
            "--disk path=x,cache=none: expected path=FILE[,readonly]"
        );
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lockstep-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bad_images_get_one_line_errors_naming_them() {
        let dir = temp("bad");
        let open = |path: &Path, readonly| {
            Image::open(&DiskConfig {
                path: path.to_path_buf(),
                readonly,
            })
            .err()
            .expect("refused")
            .to_string()
        };
        let missing = dir.join("missing.img");
        let e = open(&missing, false);
        assert!(
            e.contains("missing.img") && e.contains("No such file"),
            "{e}"
        );
        let e = open(&dir, false);
        assert!(e.contains("is a directory"), "{e}");
        let small = dir.join("small.img");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        let e = open(&small, false);
        assert!(e.contains("4096 bytes") && e.contains("at least"), "{e}");
        let ro = dir.join("ro.img");
        File::create(&ro).unwrap().set_len(2 << 20).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = open(&ro, false);
        assert!(e.contains("read-only") && e.contains(",readonly"), "{e}");
        assert!(Image::open(&DiskConfig {
            path: ro.clone(),
            readonly: true
        })
        .is_ok());
        for e in [
            open(&missing, false),
            open(&dir, false),
            open(&small, false),
            open(&ro, false),
        ] {
            assert!(!e.contains('\n'), "not one line: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_image_is_locked_against_a_second_writer_and_readers() {
        let dir = temp("lock");
        let path = dir.join("a.img");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let rw = DiskConfig {
            path: path.clone(),
            readonly: false,
        };
        let ro = DiskConfig {
            path: path.clone(),
            readonly: true,
        };
        let first = Image::open(&rw).unwrap();
        assert_eq!(first.sectors(), 2048);
        // flock locks belong to the open file description: a second open conflicts even
        // in the same process.
        assert!(matches!(Image::open(&rw), Err(DiskError::InUse { .. })));
        assert!(matches!(Image::open(&ro), Err(DiskError::InUse { .. })));
        drop(first);
        let r1 = Image::open(&ro).unwrap();
        let _r2 = Image::open(&ro).expect("readers share the image");
        let e = Image::open(&rw).err().unwrap().to_string();
        assert!(e.contains("in use by another lockstep"), "{e}");
        drop(r1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
