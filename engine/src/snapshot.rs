//! Snapshots on disk: a directory with `state.bin` (the sealed machine state plus the size
//! and CRC32 of memory), `memory.bin` (guest RAM, zero pages left as holes) and a copy of
//! each disk image as the snapshot found it, `disk<i>.img` (taken with the guest paused
//! and its devices frozen, so no request is half done in it).
//!
//! The directory is written under a temporary name and renamed into place, so a crash
//! never leaves a half-written snapshot that looks complete.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::persist::state::MachineState;
use crate::persist::{self, PersistError, Reader, Writer};
use crate::vstate::memory::{ram_size, GuestMemory};

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

/// A snapshot that cannot be written or read.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error from the file system.
        source: io::Error,
    },
    /// The state file is unreadable.
    #[error("{path}: {source}")]
    Format {
        /// The state file.
        path: PathBuf,
        /// Why it cannot be read.
        source: PersistError,
    },
    /// The memory file has another size than the state says (bytes).
    #[error("{path}: memory file is {found} bytes, the state says {expected}")]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Bytes the state says.
        expected: u64,
        /// Bytes the file has.
        found: u64,
    },
    /// The memory file's checksum is not the one recorded.
    #[error("{path}: memory checksum mismatch (expected {expected:#010x}, found {found:#010x})")]
    MemoryChecksum {
        /// The memory file.
        path: PathBuf,
        /// The CRC32 recorded with the state.
        expected: u32,
        /// The file's CRC32.
        found: u32,
    },
    /// The target exists and is not a snapshot directory.
    #[error("{path} already exists and is not a lockstep snapshot; refusing to replace it")]
    NotASnapshot {
        /// The directory.
        path: PathBuf,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory access failed: {0}")]
    Guest(#[from] vm_memory::GuestMemoryError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The copy of disk `index` in a snapshot directory.
pub fn disk_file(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("disk{index}.img"))
}

/// Writes a snapshot of a paused machine (its devices frozen) to `dir`, with a copy of
/// each image in `disks` (replacing an earlier snapshot there). Returns the bytes of
/// non-zero memory written.
pub fn write(
    dir: &Path,
    state: &MachineState,
    mem: &GuestMemory,
    disks: &[PathBuf],
) -> Result<u64, SnapshotError> {
    if dir.exists()
        && !dir.join(STATE_FILE).exists()
        && fs::read_dir(dir).map_err(io_err(dir))?.next().is_some()
    {
        return Err(SnapshotError::NotASnapshot {
            path: dir.to_path_buf(),
        });
    }
    let tmp = dir.with_extension("tmp-snapshot");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    let mem_path = tmp.join(MEMORY_FILE);
    let file = File::create(&mem_path).map_err(io_err(&mem_path))?;
    let size = ram_size(mem);
    file.set_len(size).map_err(io_err(&mem_path))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let n = CHUNK.min((size - offset) as usize);
        mem.read_slice(&mut buf[..n], GuestAddress(offset))?;
        crc.update(&buf[..n]);
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                file.write_all_at(page, offset + (i * PAGE) as u64)
                    .map_err(io_err(&mem_path))?;
                written += page.len() as u64;
            }
        }
        offset += n as u64;
    }
    file.sync_all().map_err(io_err(&mem_path))?;
    for (i, image) in disks.iter().enumerate() {
        // copy_file_range underneath: a reflink or an in-kernel copy where it can.
        let copy = disk_file(&tmp, i);
        fs::copy(image, &copy).map_err(io_err(&copy))?;
        File::open(&copy)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&copy))?;
    }

    let mut w = Writer::default();
    w.u64(size);
    w.u32(crc.finalize());
    state.encode(&mut w);
    let state_path = tmp.join(STATE_FILE);
    fs::write(&state_path, persist::seal(&w.buf)).map_err(io_err(&state_path))?;
    File::open(&state_path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&state_path))?;

    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io_err(dir))?;
    Ok(written)
}

/// A snapshot read back: the state, and where its memory is.
pub struct Snapshot {
    /// The machine state.
    pub state: MachineState,
    mem_path: PathBuf,
    mem_size: u64,
    mem_crc: u32,
}

/// Reads and verifies `dir/state.bin`; memory is verified while it is loaded.
pub fn read(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let blob = fs::read(&state_path).map_err(io_err(&state_path))?;
    let format = |source| SnapshotError::Format {
        path: state_path.clone(),
        source,
    };
    let payload = persist::unseal(&blob).map_err(format)?;
    let mut r = Reader::new(payload);
    let mem_size = r.u64("memory size").map_err(format)?;
    let mem_crc = r.u32("memory checksum").map_err(format)?;
    let state = MachineState::decode(&mut r).map_err(format)?;
    r.finish().map_err(format)?;
    let mem_path = dir.join(MEMORY_FILE);
    let found = fs::metadata(&mem_path).map_err(io_err(&mem_path))?.len();
    if found != mem_size || state.mem_size != mem_size {
        return Err(SnapshotError::MemorySize {
            path: mem_path,
            expected: mem_size,
            found,
        });
    }
    Ok(Snapshot {
        state,
        mem_path,
        mem_size,
        mem_crc,
    })
}

impl Snapshot {
    /// Copies the memory file into guest RAM, checking its CRC.
    pub fn load_memory(&self, mem: &GuestMemory) -> Result<(), SnapshotError> {
        let mut file = File::open(&self.mem_path).map_err(io_err(&self.mem_path))?;
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        while offset < self.mem_size {
            let n = CHUNK.min((self.mem_size - offset) as usize);
            file.read_exact(&mut buf[..n])
                .map_err(io_err(&self.mem_path))?;
            crc.update(&buf[..n]);
            // Fresh guest RAM is already zero.
            if buf[..n].iter().any(|&b| b != 0) {
                mem.write_slice(&buf[..n], GuestAddress(offset))?;
            }
            offset += n as u64;
        }
        let found = crc.finalize();
        if found != self.mem_crc {
            return Err(SnapshotError::MemoryChecksum {
                path: self.mem_path.clone(),
                expected: self.mem_crc,
                found,
            });
        }
        Ok(())
    }
}
