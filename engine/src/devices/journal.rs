//! The backup's disk journal: how an epoch's disk writes reach a backup's image all or
//! nothing.
//!
//! A verified epoch's writes are first written whole to `IMAGE.lockstep-journal.tmp`,
//! which is then renamed over `IMAGE.lockstep-journal` (an atomic step); only then are
//! they written into the image. So whenever the process stops:
//!
//! - a `.tmp` file is an epoch whose journal was not complete: it was never applied, and
//!   the image holds the epoch before it;
//! - the journal names an epoch E whose writes may be partly in the image: writing them
//!   again (in order; writing a block twice is harmless) makes the image hold E.
//!
//! Every open of the image for writing ([`recover`]) does this first and says which.
//! While the initial sync writes into the image, the journal says so (`Syncing`): such an
//! image matches no epoch, and only a backup (whose next sync repairs it) may open it.
//!
//! The journal is written through the page cache without `fsync`: it makes the image
//! consistent against the backup *process* stopping at any point (SIGKILL, a crash). A
//! backup *host* that loses power may lose what was not written back; its next sync
//! compares every chunk with the primary's and repairs it.
//!
//! Layout, little-endian: `"LKSJRNL1"`, kind u32 (1 epoch, 2 syncing), 0 u32, epoch u64,
//! count u32, 0 u32, count x (offset u64, length u32, 0 u32), the data of each in order,
//! then the CRC32 of everything before it (u32).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"LKSJRNL1";
const KIND_EPOCH: u32 = 1;
const KIND_SYNCING: u32 = 2;
const HEADER: usize = 32;
const ENTRY: usize = 16;

/// The journal of the image at `image`.
pub fn path_of(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".lockstep-journal");
    PathBuf::from(p)
}

fn tmp_of(image: &Path) -> PathBuf {
    let mut p = path_of(image).into_os_string();
    p.push(".tmp");
    PathBuf::from(p)
}

/// What an image's journal said when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// No journal: the image is as its last user left it.
    Clean,
    /// The journal of committed epoch `epoch` was written again into the image, which
    /// now holds that epoch (`incomplete`: a later epoch's journal was not complete and
    /// was discarded, never applied).
    Replayed {
        /// The epoch the image holds.
        epoch: u64,
        /// A later epoch's incomplete journal was discarded.
        incomplete: bool,
    },
    /// Only an incomplete journal: it was discarded, the image holds the last epoch that
    /// was applied whole.
    Discarded,
    /// The image was being synced from a primary: it matches no epoch.
    Syncing,
}

impl Recovered {
    /// One line for the log, naming the image.
    pub fn describe(&self, image: &Path) -> Option<String> {
        let image = image.display();
        match self {
            Recovered::Clean => None,
            Recovered::Replayed { epoch, incomplete } => Some(format!(
                "disk {image}: the journal of committed epoch {epoch} was written again: the \
                 image holds epoch {epoch}{}",
                if *incomplete {
                    " (the incomplete journal of the next epoch was discarded, never applied)"
                } else {
                    ""
                }
            )),
            Recovered::Discarded => Some(format!(
                "disk {image}: an incomplete epoch journal was discarded (never applied): the \
                 image holds the epoch before it"
            )),
            Recovered::Syncing => Some(format!(
                "disk {image}: the image was left in the middle of an initial sync from a \
                 primary: it matches no epoch"
            )),
        }
    }
}

/// Brings the image `file` at `path` to the epoch its journal names (see the module
/// docs) and removes the journal. A `Syncing` journal is left in place unless
/// `clear_syncing` (a backup that will sync the image again).
pub fn recover(path: &Path, file: &File, clear_syncing: bool) -> io::Result<Recovered> {
    let tmp = tmp_of(path);
    let incomplete = match std::fs::remove_file(&tmp) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    let journal = path_of(path);
    let bytes = match std::fs::read(&journal) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(if incomplete {
                Recovered::Discarded
            } else {
                Recovered::Clean
            })
        }
        Err(e) => return Err(e),
    };
    let parsed = parse(&bytes).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the journal {} is damaged (the image may hold a partly applied epoch): \
                 sync the image from the primary again, or restore it from a copy",
                journal.display()
            ),
        )
    })?;
    let recovered = match parsed {
        Parsed::Syncing => {
            if !clear_syncing {
                return Ok(Recovered::Syncing);
            }
            Recovered::Syncing
        }
        Parsed::Epoch { epoch, writes } => {
            for (offset, data) in writes {
                file.write_all_at(data, offset)?;
            }
            Recovered::Replayed { epoch, incomplete }
        }
    };
    std::fs::remove_file(&journal)?;
    Ok(recovered)
}

enum Parsed<'a> {
    Syncing,
    Epoch {
        epoch: u64,
        writes: Vec<(u64, &'a [u8])>,
    },
}

fn parse(b: &[u8]) -> Option<Parsed<'_>> {
    let body = b.get(..b.len().checked_sub(4)?)?;
    let crc = u32::from_le_bytes(b[body.len()..].try_into().ok()?);
    if crc32fast::hash(body) != crc || body.get(..8)? != MAGIC {
        return None;
    }
    let u32_at = |at: usize| Some(u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?));
    let kind = u32_at(8)?;
    let epoch = u64_at(16)?;
    let count = u32_at(24)? as usize;
    match kind {
        KIND_SYNCING => return Some(Parsed::Syncing),
        KIND_EPOCH => {}
        _ => return None,
    }
    let mut data_at = HEADER.checked_add(count.checked_mul(ENTRY)?)?;
    let mut writes = Vec::with_capacity(count.min(body.len() / ENTRY));
    for i in 0..count {
        let at = HEADER + i * ENTRY;
        let offset = u64_at(at)?;
        let len = u32_at(at + 8)? as usize;
        let data = body.get(data_at..data_at.checked_add(len)?)?;
        writes.push((offset, data));
        data_at += len;
    }
    (data_at == body.len()).then_some(Parsed::Epoch { epoch, writes })
}

fn encode(kind: u32, epoch: u64, writes: &[(u64, &[u8])]) -> Vec<u8> {
    let data: usize = writes.iter().map(|(_, d)| d.len()).sum();
    let mut b = Vec::with_capacity(HEADER + writes.len() * ENTRY + data + 4);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(&(writes.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for (offset, d) in writes {
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&(d.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    for (_, d) in writes {
        b.extend_from_slice(d);
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Writes `bytes` as the journal of `image` in one step (a temporary file renamed); on
/// failure the temporary file is removed (it would hold space on a full file system).
fn install(image: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_of(image);
    let r = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path_of(image)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// How [`apply`] failed: before the journal was in place (the image holds the epoch
/// before, untouched) or after (the next open completes the epoch from the journal).
#[derive(Debug)]
pub enum ApplyError {
    /// The journal could not be written: the image is untouched.
    Journal(io::Error),
    /// Writing the image failed after the journal was in place.
    Image(io::Error),
}

/// Marks `image` as being synced (see [`Recovered::Syncing`]).
pub fn mark_syncing(image: &Path) -> io::Result<()> {
    install(image, &encode(KIND_SYNCING, 0, &[]))
}

/// Makes the image `file` at `path` hold committed epoch `epoch`: its journal first, then
/// `writes` (in order) into the image. An error before the journal is in place leaves the
/// image at the previous epoch; after, [`recover`] completes it.
pub fn apply(
    path: &Path,
    file: &File,
    epoch: u64,
    writes: &[(u64, &[u8])],
) -> Result<(), ApplyError> {
    install(path, &encode(KIND_EPOCH, epoch, writes)).map_err(ApplyError::Journal)?;
    for (offset, data) in writes {
        file.write_all_at(data, *offset)
            .map_err(ApplyError::Image)?;
    }
    Ok(())
}

/// Removes the image's journal (the image is complete: a clean end, or a promotion after
/// which the guest writes it directly).
pub fn remove(image: &Path) -> io::Result<()> {
    match std::fs::remove_file(path_of(image)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str) -> (PathBuf, File) {
        let dir =
            std::env::temp_dir().join(format!("lockstep-journal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.img");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 16).unwrap();
        (path, f)
    }

    fn at(f: &File, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).unwrap();
        b[0]
    }

    #[test]
    fn a_journal_replays_once_and_an_incomplete_one_is_never_applied() {
        let (path, f) = image("replay");
        assert_eq!(recover(&path, &f, false).unwrap(), Recovered::Clean);
        apply(&path, &f, 7, &[(0, &[1u8; 512][..]), (0, &[2u8; 512][..])]).unwrap();
        assert_eq!(at(&f, 0), 2);
        // The process stopped before the writes: the image holds something else there.
        f.write_all_at(&[9u8; 512], 0).unwrap();
        // And epoch 8's journal was cut short.
        std::fs::write(tmp_of(&path), b"LKSJ").unwrap();
        let r = recover(&path, &f, false).unwrap();
        assert_eq!(
            r,
            Recovered::Replayed {
                epoch: 7,
                incomplete: true
            }
        );
        assert!(r.describe(&path).unwrap().contains("holds epoch 7"));
        assert_eq!(at(&f, 0), 2, "the writes of epoch 7, in order");
        assert!(!path_of(&path).exists() && !tmp_of(&path).exists());
        assert_eq!(recover(&path, &f, false).unwrap(), Recovered::Clean);
    }

    #[test]
    fn a_damaged_journal_is_an_error_and_a_syncing_image_stays_marked() {
        let (path, f) = image("damaged");
        apply(&path, &f, 3, &[(512, &[5u8; 512][..])]).unwrap();
        let mut b = std::fs::read(path_of(&path)).unwrap();
        let n = b.len();
        b[n - 10] ^= 1;
        std::fs::write(path_of(&path), &b).unwrap();
        let e = recover(&path, &f, false).unwrap_err().to_string();
        assert!(e.contains("is damaged"), "{e}");
        mark_syncing(&path).unwrap();
        assert_eq!(recover(&path, &f, false).unwrap(), Recovered::Syncing);
        assert!(path_of(&path).exists(), "kept for whoever opens it next");
        assert_eq!(recover(&path, &f, true).unwrap(), Recovered::Syncing);
        assert!(!path_of(&path).exists());
        for cut in [0, 8, HEADER, n - 1] {
            assert!(parse(&b[..cut.min(b.len())]).is_none(), "{cut}");
        }
    }
}
